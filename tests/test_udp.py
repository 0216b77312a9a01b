"""UDP echo in-process: ``nursery.start(serve, Config(udp=True, port=0))`` on loopback.

Real sockets. Whether a datagram got no reply is told without waiting for
time to pass: after it, a *marker* datagram from another peer is sent and its
echo awaited. The server reads its socket in order and the kernel delivers a
loopback datagram before ``sendto`` returns, so once the marker is back
every earlier datagram has been decided, and any reply to it is already
queued at its peer.

Rate and log-interval tests run on a `trio.testing.MockClock` that stands
still until the test moves it, so a burst is exact; they are bounded by
`real_time_limit` instead of `trio.fail_after`, whose deadline would never
come.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from echosvc import Config, ConfigError, Server, serve
from echosvc.limits import SourceRateLimiter
from echosvc.udp import DatagramPolicy, DropCause, UdpEcho

from .support import captured_logs, connect, round_trip
from .test_server import has_ipv6_loopback
from .udp_support import Forger, Peer, can_forge, real_time_limit

TIME_LIMIT = 15
# Loose enough that only the rate test meets the limiter.
UNLIMITED = 10**6

needs_root = pytest.mark.skipif(not can_forge(), reason="forging datagrams needs root")


@asynccontextmanager
async def udp_server(**changes: Any) -> AsyncIterator[Server]:
    config = Config(port=0, udp=True).evolve(**{"udp_rate": UNLIMITED, **changes})
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, config)
        try:
            yield server
        finally:
            server.shutdown()


def udp_address(server: Server) -> tuple[str, int]:
    assert server.udp is not None
    host, port = server.udp.sockets[0].getsockname()[:2]
    return host, port


def dropped(server: Server) -> dict[str, int]:
    assert server.udp is not None
    return {cause: n for cause, n in server.udp.statistics().dropped.items() if n}


def echoed(server: Server) -> int:
    assert server.udp is not None
    return server.udp.statistics().echoed


async def settle(server: Server, marker_source: str = "127.0.0.2") -> None:
    """Return once every datagram sent so far has been decided."""
    host, port = udp_address(server)
    source = "::1" if ":" in host else marker_source
    with Peer((source, 0)) as marker:
        payload = os.urandom(8)
        marker.send(payload, (host, port))
        assert await marker.receive() == payload


# --- configuration -------------------------------------------------------------------


def test_udp_is_off_by_default_with_the_documented_limits() -> None:
    config = Config()
    assert (config.udp, config.udp_max_bytes, config.udp_rate) == (False, 1472, 100)


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"udp": "yes"}, "udp", "true or false"),
        ({"udp_max_bytes": 0}, "udp_max_bytes", "at least 1"),
        ({"udp_max_bytes": 65528}, "udp_max_bytes", "at most 65527"),
        ({"udp_max_bytes": "1472"}, "udp_max_bytes", "whole number"),
        ({"udp_rate": 0}, "udp_rate", "at least 1"),
        ({"udp_rate": 2.5}, "udp_rate", "whole number"),
    ],
)
def test_invalid_udp_values_name_their_field(
    changes: dict[str, object], field: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Config(**changes)  # type: ignore[arg-type]
    assert info.value.field == field
    assert words in info.value.message


# --- the echo -----------------------------------------------------------------------


async def test_each_datagram_comes_back_once_byte_exact_and_oversize_ones_not_at_all() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with udp_server() as server:
            assert server.addresses == [
                f"127.0.0.1:{server.port}",
                f"udp://127.0.0.1:{server.port}",
            ]
            target = udp_address(server)
            with Peer() as peer:
                for size in (0, 1, 1472):
                    payload = os.urandom(size)
                    peer.send(payload, target)
                    assert await peer.receive() == payload
                # One byte over the limit, and the largest datagram there is:
                # dropped whole, never cut to fit.
                peer.send(os.urandom(1473), target)
                peer.send(os.urandom(65507), target)
                await settle(server)
                assert peer.pending() == []
            assert echoed(server) == 3 + 1  # and the marker
            assert dropped(server) == {"size": 2}
            # TCP is served beside it, as ever.
            async with await connect(server.port) as client:
                await round_trip(client, b"still tcp\n")


async def test_the_limit_is_configurable() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with udp_server(udp_max_bytes=10) as server:
            with Peer() as peer:
                peer.send(b"0123456789", udp_address(server))
                assert await peer.receive() == b"0123456789"
                peer.send(b"0123456789A", udp_address(server))
                await settle(server)  # an 8-byte marker
                assert peer.pending() == []
            assert dropped(server) == {"size": 1}


# --- refusing to be a reflector -----------------------------------------------------


def bind_or_skip(address: tuple[str, int]) -> Peer:
    try:
        return Peer(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            pytest.skip(f"{address} is in use on this machine")
        raise


async def test_privileged_source_ports_get_no_reply() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with udp_server() as server:
            peers = [bind_or_skip(("127.0.0.5", port)) for port in (7, 19, 1023, 1024)]
            try:
                for peer in peers:
                    peer.send(b"loop?", udp_address(server))
                await settle(server)
                # echo (7), chargen (19), anything privileged: the loop class.
                assert [peer.pending() for peer in peers] == [[], [], [], [b"loop?"]]
            finally:
                for peer in peers:
                    peer.close()
            assert dropped(server) == {"port": 3}
            assert echoed(server) == 1 + 1


@needs_root
async def test_forged_sources_our_own_address_and_port_and_port_0_get_no_reply() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with udp_server() as server:
            ours = udp_address(server)
            with Forger() as forger, Peer(("127.0.0.9", 0)) as genuine:
                # The forging itself works: this one is echoed to its peer.
                forger.send(genuine.address, ours, b"forged but fine")
                assert await genuine.receive() == b"forged but fine"
                # Our own address and port: the reply would be our next input.
                forger.send(ours, ours, b"myself")
                # Another host on our port: another echo, looping with us.
                forger.send(("127.0.0.8", ours[1]), ours, b"my twin")
                forger.send(("127.0.0.7", 0), ours, b"port zero")
                await settle(server)
                await trio.testing.wait_all_tasks_blocked()
            assert dropped(server) == {"source": 2, "port": 1}
            assert echoed(server) == 1 + 1  # no loop went round


@pytest.mark.parametrize(
    "host",
    [
        "0.0.0.0",
        "0.1.2.3",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "::",
        "ff02::1",
        "ff05::1:3",
        "::ffff:0.0.0.0",
        "::ffff:224.0.0.251",
        "::ffff:255.255.255.255",
    ],
)
def test_sources_no_reply_may_go_to_are_refused(host: str) -> None:
    policy = DatagramPolicy(1472, [9000], SourceRateLimiter(100, clock=lambda: 0.0))
    assert policy.classify((host, 40000), 10) is DropCause.SOURCE
    assert len(policy.limiter) == 0, "a refused source takes no place in the table"


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "192.0.2.1", "223.255.255.254", "::1", "2001:db8::1", "::ffff:192.0.2.1"]
)
def test_unicast_sources_are_echoed(host: str) -> None:
    policy = DatagramPolicy(1472, [9000], SourceRateLimiter(100, clock=lambda: 0.0))
    assert policy.classify((host, 40000), 10) is None


def test_the_rules_in_order_and_the_source_of_the_rate_limit() -> None:
    policy = DatagramPolicy(100, [9000], SourceRateLimiter(2, clock=lambda: 0.0))
    assert policy.classify(("192.0.2.1", 7), 101) is DropCause.SIZE
    assert policy.classify(("192.0.2.1", 9000), 10) is DropCause.SOURCE
    assert policy.classify(("224.0.0.1", 7), 10) is DropCause.SOURCE
    assert policy.classify(("192.0.2.1", 0), 10) is DropCause.PORT
    # IPv4, also when IPv4-mapped, is one source per address...
    assert policy.classify(("192.0.2.1", 40000), 10) is None
    assert policy.classify(("::ffff:192.0.2.1", 40001), 10) is None
    assert policy.classify(("192.0.2.1", 40002), 10) is DropCause.RATE
    # ... and IPv6 one per /64, which one host can fill with addresses.
    assert policy.classify(("2001:db8:0:1::1", 40000), 10) is None
    assert policy.classify(("2001:db8:0:1::2", 40000), 10) is None
    assert policy.classify(("2001:db8:0:1:ffff::3", 40000), 10) is DropCause.RATE
    assert policy.classify(("2001:db8:0:2::1", 40000), 10) is None
    assert len(policy.limiter) == 3


# --- the rate limit, on a clock that stands still -----------------------------------


async def test_each_source_gets_a_burst_of_the_rate_then_the_rate(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with real_time_limit(TIME_LIMIT), udp_server(udp_rate=100) as server:
        target = udp_address(server)
        with Peer(("127.0.0.3", 0)) as eager, Peer(("127.0.0.4", 0)) as calm:

            async def send(peer: Peer, count: int) -> int:
                for i in range(count):
                    peer.send(b"%d" % i, target)
                await settle(server)
                return len(peer.pending())

            assert await send(eager, 150) == 100  # the burst is the rate
            assert dropped(server) == {"rate": 50}
            assert await send(calm, 3) == 3  # its own bucket
            mock_clock.jump(0.25)
            assert await send(eager, 50) == 25  # 100 a second
            mock_clock.jump(0.1)
            assert await send(eager, 50) == 10
            mock_clock.jump(5)
            assert await send(eager, 150) == 100  # full again, not fuller
            assert dropped(server) == {"rate": 50 + 25 + 40 + 50}


async def test_udp_dropped_is_logged_at_once_then_at_most_every_10_s(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with real_time_limit(TIME_LIMIT):
        with captured_logs() as logs:
            async with udp_server(udp_max_bytes=100) as server:
                target = udp_address(server)
                with bind_or_skip(("127.0.0.6", 19)) as chargen, Peer() as big:
                    chargen.send(b"x", target)
                    [first] = await logs.wait_for("udp_dropped")
                    big.send(bytes(101), target)
                    chargen.send(b"x", target)
                    chargen.send(b"x", target)
                    await settle(server)
                    mock_clock.jump(9.9)
                    await trio.testing.wait_all_tasks_blocked()
                    assert len(logs.events("udp_dropped")) == 1
                    mock_clock.jump(0.1)
                    [_, second] = await logs.wait_for("udp_dropped", 2)
                    # Nothing new: nothing logged, however long.
                    mock_clock.jump(60)
                    await trio.testing.wait_all_tasks_blocked()
                    assert len(logs.events("udp_dropped")) == 2
    fields = {"log_level": "warning", "event": "udp_dropped", "send": 0, "rate": 0, "source": 0}
    assert first == {**fields, "port": 1, "size": 0}
    assert second == {**fields, "port": 2, "size": 1}


# --- sockets: IPv6, several hosts, shutdown -------------------------------------------


async def test_ipv6_is_served_and_refused_alike() -> None:
    if not has_ipv6_loopback():
        pytest.skip("this machine has no ::1")
    with trio.fail_after(TIME_LIMIT):
        async with udp_server(hosts=("::1",)) as server:
            assert server.addresses == [f"[::1]:{server.port}", f"udp://[::1]:{server.port}"]
            target = ("::1", server.port)
            with Peer(("::1", 0)) as peer, bind_or_skip(("::1", 7)) as echo:
                peer.send(b"six", target)
                assert await peer.receive() == b"six"
                echo.send(b"loop?", target)
                peer.send(bytes(1473), target)
                await settle(server)
                assert echo.pending() == []
            assert dropped(server) == {"port": 1, "size": 1}


async def test_every_host_gets_a_udp_socket_on_the_port_tcp_got() -> None:
    hosts = ("127.0.0.1", "::1") if has_ipv6_loopback() else ("127.0.0.1", "127.0.0.2")
    with trio.fail_after(TIME_LIMIT):
        async with udp_server(hosts=hosts) as server:
            port = server.port
            tcp = [
                f"127.0.0.1:{port}",
                f"[::1]:{port}" if ":" in hosts[1] else f"{hosts[1]}:{port}",
            ]
            assert server.addresses == [*tcp, *(f"udp://{address}" for address in tcp)]
            for host in hosts:
                with Peer((host, 0)) as peer:
                    peer.send(host.encode(), (host, port))
                    assert await peer.receive() == host.encode()


async def test_without_udp_nothing_listens_for_datagrams() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(serve, Config(port=0))
            assert server.udp is None
            assert server.addresses == [f"127.0.0.1:{server.port}"]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as free:
                free.bind(("127.0.0.1", server.port))
            server.shutdown()


async def test_shutdown_closes_the_udp_sockets_at_once() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with udp_server(shutdown_grace=5) as server:
            port = server.port
            # A client that sends but never reads keeps the server draining.
            stuck = await connect(port)
            with trio.move_on_after(0.3):
                while True:
                    await stuck.send_all(b"s" * 1023 + b"\n")
            server.shutdown()
            await trio.testing.wait_all_tasks_blocked()
            assert server.statistics().active == 1
            # Draining TCP, yet the UDP port is free again, and nothing is
            # left waiting on the closed socket.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
                again.bind(("127.0.0.1", port))
            await trio.aclose_forcefully(stuck)


class FullSendBuffer(socket.socket):
    """A UDP socket whose send buffer is always full."""

    def sendto(self, *args: Any) -> int:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")


async def test_a_full_send_buffer_drops_the_reply_and_never_waits() -> None:
    sock = FullSendBuffer(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    udp = UdpEcho([sock], Config(udp=True, udp_rate=UNLIMITED))
    with trio.fail_after(TIME_LIMIT), Peer() as peer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(udp.serve)
            for _ in range(3):
                peer.send(b"hello?", sock.getsockname())
            # The datagrams are queued already: they are read and dropped
            # before every task is blocked again.
            await trio.testing.wait_all_tasks_blocked()
            assert udp.statistics().dropped["send"] == 3
            nursery.cancel_scope.cancel()
        udp.close()
        udp.close()  # idempotent
    assert udp.statistics().echoed == 0
    assert sock.fileno() == -1
