"""UDP test helpers: peers bound to chosen sources, forged datagrams, a flood.

A forged datagram is a raw IPv4 packet (``IPPROTO_RAW`` implies
``IP_HDRINCL``, root only) whose source address and port the test picks:
our own address and port, port 0, or thousands of different ``127.x.y.z``
sources, which on loopback the kernel delivers like any other datagram.

``python -m tests.udp_support flood ...`` runs `flood` in its own process, so
a test's own Trio loop measures latency without competing with the sender.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import trio


@asynccontextmanager
async def real_time_limit(seconds: float) -> AsyncIterator[None]:
    """`trio.fail_after` in real time, for tests whose MockClock stands still."""
    done = threading.Event()

    async def watchdog() -> None:
        if not await trio.to_thread.run_sync(done.wait, seconds, abandon_on_cancel=True):
            raise TimeoutError(f"still running after {seconds} s of real time")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog)
        try:
            yield
        finally:
            done.set()


def can_forge() -> bool:
    """Raw sockets need root (CAP_NET_RAW)."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
    except PermissionError:
        return False
    return True


class Peer:
    """A UDP socket bound to ``bind``; sends to the server and reads replies."""

    def __init__(self, bind: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        family = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        try:
            self.sock.bind(bind)
        except BaseException:
            self.sock.close()
            raise
        self.address: tuple[str, int] = self.sock.getsockname()[:2]

    def send(self, payload: bytes, to: tuple[str, int]) -> None:
        self.sock.sendto(payload, to)

    async def receive(self) -> bytes:
        """The next datagram (the caller bounds the wait)."""
        while True:
            try:
                return self.sock.recv(70000)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)

    def pending(self) -> list[bytes]:
        """Every datagram already queued, without waiting."""
        datagrams = []
        while True:
            try:
                datagrams.append(self.sock.recv(70000))
            except BlockingIOError:
                return datagrams

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def forged_udp(source: tuple[str, int], destination: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4 packet carrying ``payload`` from ``source`` to ``destination``.

    The kernel fills in the IP total length and checksum (raw(7)); a UDP
    checksum of 0 means "none", which IPv4 allows.
    """
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,  # version 4, 5 words of header
        0,
        20 + 8 + len(payload),
        0,  # id: the kernel picks one
        0x4000,  # don't fragment
        64,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(source[0]),
        socket.inet_aton(destination[0]),
    )
    udp = struct.pack("!HHHH", source[1], destination[1], 8 + len(payload), 0)
    return ip + udp + payload


class Forger:
    """A raw socket for `forged_udp` packets."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)

    def send(self, source: tuple[str, int], destination: tuple[str, int], payload: bytes) -> None:
        self.sock.sendto(forged_udp(source, destination, payload), (destination[0], 0))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Forger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def loopback_sources(count: int, start: int = 0) -> Iterator[str]:
    """``count`` distinct addresses in 127.0.0.0/8 (skipping .0 and .255 hosts)."""
    produced = 0
    index = start
    while produced < count:
        b, c, d = (index >> 16) & 0xFF, (index >> 8) & 0xFF, index & 0xFF
        index += 1
        if d in (0, 255) or b == 0:
            continue
        produced += 1
        yield f"127.{b}.{c}.{d}"


def flood(
    port: int, count: int, *, start: int, seconds: float, pace: int, payload_size: int
) -> int:
    """Send ``count`` datagrams to 127.0.0.1:``port``, each from its own forged
    ``127.x.y.z`` source, for at most ``seconds``; return how many were sent.

    Every ``pace`` datagrams a marker from a real socket must come back (or
    0.5 s pass) before going on, so the server's receive queue never
    overflows and every forged source reaches it.
    """
    payload = os.urandom(payload_size)
    destination = ("127.0.0.1", port)
    deadline = time.monotonic() + seconds
    sent = 0
    with Forger() as forger, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as marker:
        marker.bind(("127.0.0.1", 0))
        marker.settimeout(0.5)
        for i, source in enumerate(loopback_sources(count, start)):
            if time.monotonic() > deadline:
                break
            try:
                forger.send((source, 40000 + i % 20000), destination, payload)
            except OSError as exc:  # pragma: no cover - a full raw socket buffer
                if exc.errno != errno.ENOBUFS:
                    raise
                time.sleep(0.001)
                continue
            sent += 1
            if pace and sent % pace == 0:
                marker.sendto(b"marker", destination)
                try:
                    while marker.recv(64) != b"marker":
                        pass
                except TimeoutError:
                    pass
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.udp_support")
    parser.add_argument("command", choices=["flood"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--pace", type=int, default=0)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    sent = flood(
        args.port,
        args.count,
        start=args.start,
        seconds=args.seconds,
        pace=args.pace,
        payload_size=args.size,
    )
    print(sent)


if __name__ == "__main__":
    main()
