"""Two network namespaces joined by a slow, lossy, reordering link.

`faulty_link` builds, for one test, a client namespace and a server namespace
with unique names (``ip netns add``), joins them with a veth pair and puts
``tc qdisc ... netem`` (delay, loss, reordering) on the client's side of the
link: every packet the client sends, data or ACK, goes through it. All the
traffic stays inside the two namespaces, which are deleted on the way out,
whatever happened.

Kernels built without ``sch_netem`` (``CONFIG_NET_SCH_NETEM``; some VM and
container kernels) refuse the qdisc. The same impairment is then applied in
user space: the two namespaces are joined by a TUN device each instead of
the veth pair, and a relay in the test process moves the IP packets between
them, dropping, delaying and reordering the client's packets exactly as the
netem line would (`FaultyLink.method` says which was used). Only when the
kernel refuses network namespaces themselves is there nothing to test.

Addresses are link-local (169.254.77.0/30): on-link by definition, never
routed, and here never outside the two namespaces anyway.

The server runs in its namespace under ``ip netns exec``. Client sockets are
created in the client namespace by the test process itself: `setns(2)`
moves only the calling thread, only for the moment the socket is created
(`FaultyLink.client_socket`), and a socket stays in the namespace it was
created in.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import random
import re
import secrets
import struct
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager

import attrs
import trio

__all__ = ["FaultyLink", "Impairment", "NamespacesRefusedError", "RelayStats", "faulty_link"]

CLIENT_IP = "169.254.77.1"
SERVER_IP = "169.254.77.2"
PREFIX = 30

_CLONE_NEWNET = 0x40000000
# linux/if_tun.h
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_libc = ctypes.CDLL(None, use_errno=True)


class NamespacesRefusedError(Exception):
    """The kernel (or the sandbox) does not let us create a network namespace."""


@attrs.frozen
class Impairment:
    """What the client's side of the link does to each packet, as netem(8) says it.

    ``reorder`` is the share of packets sent at once, overtaking the delayed
    ones (netem's ``reorder``, which needs a ``delay``).
    """

    delay_s: float = 0.1
    loss: float = 0.05
    reorder: float = 0.25

    def netem_args(self) -> list[str]:
        return [
            "delay",
            f"{self.delay_s * 1000:g}ms",
            "reorder",
            f"{self.reorder * 100:g}%",
            "50%",
            "loss",
            f"{self.loss * 100:g}%",
        ]


@attrs.define
class RelayStats:
    forwarded: int = 0
    dropped: int = 0
    delayed: int = 0
    overtaking: int = 0


@attrs.define
class FaultyLink:
    """The two namespaces and how to use them."""

    server_ns: str
    client_ns: str
    client_if: str
    method: str = ""  # "netem" or "tun relay"
    relay: RelayStats | None = None
    server_ip: str = SERVER_IP
    client_ip: str = CLIENT_IP

    def server_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the server namespace (same pid: ``ip`` execs it)."""
        return ["ip", "netns", "exec", self.server_ns, *argv]

    @contextmanager
    def in_client_ns(self) -> Iterator[None]:
        """Move this thread into the client namespace for the block."""
        with (
            open("/proc/thread-self/ns/net", "rb") as home,
            open(f"/run/netns/{self.client_ns}", "rb") as there,
        ):
            _setns(there.fileno())
            try:
                yield
            finally:
                _setns(home.fileno())

    def client_socket(self) -> trio.socket.SocketType:
        """A TCP socket in the client namespace."""
        with self.in_client_ns():
            return trio.socket.socket()

    def client_tcp_counters(self) -> dict[str, int]:
        """The client namespace's TCP counters from /proc/net/snmp (RetransSegs...)."""
        with self.in_client_ns(), open("/proc/thread-self/net/snmp", encoding="ascii") as snmp:
            rows = [line.split() for line in snmp if line.startswith("Tcp:")]
        return {name: int(value) for name, value in zip(rows[0][1:], rows[1][1:], strict=True)}

    async def dropped(self) -> int:
        """Packets the impairment dropped so far."""
        if self.relay is not None:
            return self.relay.dropped
        # " Sent 5924 bytes 58 pkt (dropped 3, overlimits 0 requeues 0)"
        shown = await _ip("netns", "exec", self.client_ns, "tc", "-s", "qdisc", "show")
        return sum(int(count) for count in re.findall(r"\(dropped (\d+),", shown))


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


async def _ip(*args: str, check: bool = True) -> str:
    done = await trio.run_process(
        ["ip", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if check and done.returncode:
        command = " ".join(args)
        raise OSError(errno.EINVAL, f"{command}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode(errors="replace")


@asynccontextmanager
async def faulty_link(impairment: Impairment, *, seed: int = 0) -> AsyncIterator[FaultyLink]:
    """Two fresh namespaces joined by an impaired link; deleted on the way out.

    Raises:
      NamespacesRefusedError: ``ip netns add`` failed (no CAP_SYS_ADMIN, or a
          kernel or sandbox without network namespaces).

    """
    tag = f"es{os.getpid() % 100000}{secrets.token_hex(2)}"
    link = FaultyLink(server_ns=f"{tag}-s", client_ns=f"{tag}-c", client_if=f"{tag}c")
    created: list[str] = []
    try:
        for ns in (link.server_ns, link.client_ns):
            try:
                await _ip("netns", "add", ns)
            except OSError as exc:
                raise NamespacesRefusedError(str(exc)) from None
            created.append(ns)
            await _ip("-n", ns, "link", "set", "lo", "up")
        server_if = f"{tag}s"
        if await _veth_with_netem(link, server_if, impairment):
            link.method = "netem"
            yield link
            return
        link.method = "tun relay"
        async with _tun_relay(link, server_if, impairment, random.Random(seed)):
            yield link
    finally:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 10):
            for ns in created:
                # Deleting a namespace deletes the devices in it.
                await _ip("netns", "del", ns, check=False)


async def _veth_with_netem(link: FaultyLink, server_if: str, impairment: Impairment) -> bool:
    """Join the namespaces with a veth pair and netem; False if netem is refused."""
    client, server = link.client_ns, link.server_ns
    await _ip(
        *("link", "add", link.client_if, "netns", client, "type", "veth"),
        *("peer", "name", server_if, "netns", server),
    )
    for ns, ifname, address in (
        (client, link.client_if, CLIENT_IP),
        (server, server_if, SERVER_IP),
    ):
        await _ip("-n", ns, "addr", "add", f"{address}/{PREFIX}", "dev", ifname)
        await _ip("-n", ns, "link", "set", ifname, "up")
    try:
        await _ip(
            *("netns", "exec", client, "tc", "qdisc", "add", "dev", link.client_if),
            *("root", "netem", *impairment.netem_args()),
        )
    except OSError:
        # "Specified qdisc kind is unknown": no sch_netem in this kernel.
        await _ip("-n", client, "link", "del", link.client_if)
        return False
    return True


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except BaseException:
        os.close(fd)
        raise
    return fd


@asynccontextmanager
async def _tun_relay(
    link: FaultyLink, server_if: str, impairment: Impairment, rng: random.Random
) -> AsyncIterator[None]:
    """netem in user space: a TUN device per namespace, packets relayed between them."""
    stats = link.relay = RelayStats()
    client_fd = _open_tun(link.client_if)
    try:
        server_fd = _open_tun(server_if)
        try:
            for ns, ifname, address, peer in (
                (link.client_ns, link.client_if, CLIENT_IP, SERVER_IP),
                (link.server_ns, server_if, SERVER_IP, CLIENT_IP),
            ):
                await _ip("link", "set", ifname, "netns", ns)
                await _ip("-n", ns, "addr", "add", address, "peer", f"{peer}/32", "dev", ifname)
                await _ip("-n", ns, "link", "set", ifname, "up")
            async with trio.open_nursery() as nursery:
                send_later, delayed = trio.open_memory_channel[tuple[float, bytes]](10_000)
                nursery.start_soon(_deliver_later, delayed, server_fd, stats)
                nursery.start_soon(_relay, client_fd, server_fd, stats, impairment, rng, send_later)
                nursery.start_soon(_relay, server_fd, client_fd, stats, None, rng, None)
                yield
                nursery.cancel_scope.cancel()
        finally:
            trio.lowlevel.notify_closing(server_fd)
            os.close(server_fd)
    finally:
        trio.lowlevel.notify_closing(client_fd)
        os.close(client_fd)


def _forward(fd: int, packet: bytes, stats: RelayStats) -> None:
    try:
        os.write(fd, packet)
    except OSError:  # a full queue or a device going away: the packet is lost
        stats.dropped += 1
    else:
        stats.forwarded += 1


async def _relay(
    source: int,
    target: int,
    stats: RelayStats,
    impairment: Impairment | None,
    rng: random.Random,
    send_later: trio.MemorySendChannel[tuple[float, bytes]] | None,
) -> None:
    """Move packets from ``source`` to ``target``, impaired as netem would (until cancelled)."""
    while True:
        await trio.lowlevel.wait_readable(source)
        try:
            packet = os.read(source, 65536)
        except BlockingIOError:
            continue
        if impairment is None or send_later is None:
            _forward(target, packet, stats)
        elif rng.random() < impairment.loss:
            stats.dropped += 1
        elif rng.random() < impairment.reorder:
            stats.overtaking += 1
            _forward(target, packet, stats)
        else:
            stats.delayed += 1
            try:
                send_later.send_nowait((trio.current_time() + impairment.delay_s, packet))
            except trio.WouldBlock:
                stats.dropped += 1  # netem's queue limit


async def _deliver_later(
    delayed: trio.MemoryReceiveChannel[tuple[float, bytes]], target: int, stats: RelayStats
) -> None:
    """Hand delayed packets to ``target`` in order, each at its time."""
    async for due, packet in delayed:
        await trio.sleep_until(due)
        _forward(target, packet, stats)
