"""The PROXY protocol stage: a header read under its own deadline, from trusted peers only.

In-process, on `MemoryPeer` (the client's side is synchronous, so a test
decides in which scheduler pass each byte arrives) and
``MockClock(autojump_threshold=0)``, so the deadlines asserted are exact;
then through `echosvc.serve` on real loopback sockets, clients bound to
127.0.0.2 and 127.0.0.3. The parser itself is tested in test_proxyproto.py.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from echosvc import CloseReason, Config, Connection, Mode, Server, serve
from echosvc.config import DEFAULT_PROXY_TRUSTED, IPNetwork
from echosvc.connection import LINGER_S
from echosvc.pipeline import Stage, stages_for
from echosvc.proxyproto import (
    V2_SIGNATURE,
    Accept,
    ProxyCommand,
    ProxyParser,
    ProxyProtocolError,
    ProxyStage,
    encode_v1,
    encode_v2,
)

from .support import MemoryPeer, captured_logs, receive_exactly, receive_until_eof

TIME_LIMIT = 20
LB = ("127.0.0.1", 40000)  # the load balancer, as accept() names it
LB_PEER = "127.0.0.1:40000"
CLIENT = ("203.0.113.7", 4000)  # the client a header names
SERVER = ("192.0.2.1", 9000)

V1_HEADER = encode_v1(CLIENT, SERVER)
V2_HEADER = encode_v2(CLIENT, SERVER)


def stage(
    accept: Accept = "any",
    timeout: float = 5.0,
    trusted: Sequence[IPNetwork] = DEFAULT_PROXY_TRUSTED,
) -> ProxyStage:
    return ProxyStage(accept, trusted, timeout)


def connection(
    peer: MemoryPeer,
    stages: Sequence[Stage],
    config: Config | None = None,
    address: tuple[Any, ...] | None = LB,
) -> Connection:
    return Connection(
        peer.server_stream(),
        config or Config(),
        peer=None if address is None else f"{address[0]}:{address[1]}",
        address=address,
        stages=stages,
    )


async def run(
    peer: MemoryPeer,
    stages: Sequence[Stage] | None = None,
    config: Config | None = None,
    address: tuple[Any, ...] | None = LB,
) -> dict[str, Any]:
    """Run one connection to its end; return its ``connection_closed`` record."""
    with captured_logs() as logs:
        await connection(peer, [stage()] if stages is None else stages, config, address).run()
    [closed] = logs.events("connection_closed")
    return dict(closed)


def reason_and_detail(closed: dict[str, Any]) -> tuple[str, str | None]:
    return closed["reason"], closed.get("detail")


# --- the header's deadline ----------------------------------------------------------


async def test_an_unfinished_header_closes_exactly_at_the_proxy_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peer = MemoryPeer()
    peer.send(V2_HEADER[:20])  # and never the rest
    started = trio.current_time()
    closed = await run(peer, [stage(timeout=3)], Config(read_timeout=300))
    assert reason_and_detail(closed) == ("proxy_timeout", None)
    assert closed["duration_s"] == pytest.approx(3)
    assert trio.current_time() == pytest.approx(started + 3), "closed at once: no linger"
    assert closed["peer"] == LB_PEER
    assert "proxy" not in closed, "no header was accepted: nobody vouched for anyone"
    assert peer.echo() == b""
    assert peer.closed_by_server


async def test_a_silent_peer_is_closed_at_the_proxy_timeout_not_the_read_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    started = trio.current_time()
    closed = await run(MemoryPeer(), [stage(timeout=5)], Config(read_timeout=300))
    assert closed["reason"] == "proxy_timeout"
    assert trio.current_time() == pytest.approx(started + 5)


async def test_after_a_good_header_the_read_deadline_starts_fresh(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Header complete at 4.9 s of a 5 s budget; then the first line has a
    # whole read timeout of its own, counted from the header's end.
    peer = MemoryPeer()
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        conn = connection(peer, [stage(timeout=5)], Config(read_timeout=10))
        nursery.start_soon(conn.run)
        await trio.sleep(4.9)
        peer.send(V1_HEADER)
        await trio.sleep(9.8)  # 14.7 s: 9.8 s into the read deadline
        peer.send(b"just in time\n")
        await trio.sleep(1)
        assert peer.echo() == b"just in time\n"
    assert conn.stats is not None
    assert conn.stats.reason is CloseReason.READ_TIMEOUT
    # The line's echo re-armed the deadline at 14.7 s.
    assert conn.stats.duration_s == pytest.approx(14.7 + 10)
    assert trio.current_time() == pytest.approx(started + 14.7 + 10 + LINGER_S)


async def test_a_zero_proxy_timeout_waits_for_the_header_as_long_as_it_takes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peer = MemoryPeer()
    async with trio.open_nursery() as nursery:
        conn = connection(peer, [stage(timeout=0)], Config(read_timeout=0))
        nursery.start_soon(conn.run)
        await trio.sleep(10_000)
        peer.send(V1_HEADER + b"late\n")
        peer.send_eof()
    assert peer.echo() == b"late\n"


async def test_a_header_trickled_byte_by_byte_is_accepted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for header in (V1_HEADER, encode_v2(CLIENT, SERVER, tlvs=[(0xE0, b"x" * 50)], crc32c=True)):
        peer = MemoryPeer()
        async with trio.open_nursery() as nursery:
            conn = connection(peer, [stage(timeout=5)], Config(read_timeout=1))
            nursery.start_soon(conn.run)
            for byte in header:
                await trio.sleep(4 / len(header))  # all of it inside the 5 s
                peer.send(bytes([byte]))
            peer.send(b"after\n")
            peer.send_eof()
        assert conn.stats is not None
        assert (conn.stats.reason, conn.stats.peer) == (CloseReason.EOF, "203.0.113.7:4000")
        assert peer.echo() == b"after\n"


# --- refusals ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "accept"),
    [
        (b"GET / HTTP/1.1\r\n", "any"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 080 ", "any"),  # a leading zero
        (b"PROXY  TCP4", "any"),  # a double space
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 4000 9000\n", "any"),  # a bare LF
        (b"PROXY TCP6 fe80::1%eth0 ", "any"),  # a zone id
        (b"PROXY UNKNOWN" + b"x" * 100, "any"),  # no CRLF within 107 bytes
        (V2_SIGNATURE + b"\x31", "any"),  # version 3
        (V2_SIGNATURE + b"\x21\x41", "any"),  # family 0x41
        (V2_SIGNATURE + b"\x21\x11\x00\x04", "any"),  # length < the IPv4 block
        (V2_SIGNATURE + b"\x21\x11\x10\x01", "any"),  # length 4097
        (V1_HEADER, "v2"),
        (V2_HEADER, "v1"),
    ],
)
async def test_a_malformed_header_is_refused_at_once_not_at_the_deadline(
    autojump_clock: trio.testing.MockClock, data: bytes, accept: Accept
) -> None:
    peer = MemoryPeer()
    peer.send(data)  # and the connection stays open
    started = trio.current_time()
    closed = await run(peer, [stage(accept, timeout=5)])
    parser = ProxyParser(accept)
    with pytest.raises(ProxyProtocolError) as expected:
        parser.feed(data)
    assert reason_and_detail(closed) == ("proxy_invalid", expected.value.reason)
    assert trio.current_time() == started, "refused in the pass its bytes arrived"
    assert closed["log_level"] == "info"
    assert peer.echo() == b""
    assert peer.closed_by_server


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"", "connection closed before a PROXY header"),
        (V2_HEADER[:-1], "connection closed inside the PROXY header"),
        (V1_HEADER[:-1], "connection closed inside the PROXY header"),
    ],
)
async def test_eof_before_the_header_is_complete_is_invalid(
    autojump_clock: trio.testing.MockClock, data: bytes, detail: str
) -> None:
    peer = MemoryPeer()
    peer.send(data)
    peer.send_eof()
    closed = await run(peer)
    assert reason_and_detail(closed) == ("proxy_invalid", detail)
    assert peer.echo() == b""


@pytest.mark.parametrize(
    ("address", "trusted"),
    [
        (("192.0.2.50", 1234), DEFAULT_PROXY_TRUSTED),
        (("2001:db8::50", 1234, 0, 0), DEFAULT_PROXY_TRUSTED),
        (("127.0.0.1", 1234), (ipaddress.ip_network("10.0.0.0/8"),)),
        # An IPv4-mapped peer (a dual-stack socket) is an IPv4 peer: ::/0 is no cover.
        (("::ffff:192.0.2.50", 1234, 0, 0), (ipaddress.ip_network("::/0"),)),
    ],
)
async def test_an_untrusted_peer_is_closed_before_a_byte_is_read(
    autojump_clock: trio.testing.MockClock,
    address: tuple[Any, ...],
    trusted: Sequence[IPNetwork],
) -> None:
    receives = []

    async def count_receive() -> None:
        receives.append(trio.current_time())
        await trio.lowlevel.checkpoint()

    incoming = trio.testing.MemoryReceiveStream(receive_some_hook=count_receive)
    incoming.put_data(V1_HEADER + b"spoofed\n")
    outgoing = trio.testing.MemorySendStream()
    started = trio.current_time()
    with captured_logs() as logs:
        await Connection(
            trio.StapledStream(outgoing, incoming),
            Config(),
            peer="the-peer",
            address=address,
            stages=[stage(trusted=trusted)],
        ).run()
    [closed] = logs.events("connection_closed")
    assert reason_and_detail(dict(closed)) == ("proxy_untrusted", "peer is not a trusted proxy")
    assert closed["peer"] == "the-peer"
    assert receives == [], "not one receive for an untrusted peer"
    assert trio.current_time() == started
    assert outgoing.get_data_nowait() == b""


@pytest.mark.parametrize(
    ("address", "trusted"),
    [
        (("127.0.0.1", 1), DEFAULT_PROXY_TRUSTED),
        (("127.9.9.9", 1), DEFAULT_PROXY_TRUSTED),
        (("::1", 1, 0, 0), DEFAULT_PROXY_TRUSTED),
        (("::ffff:127.0.0.1", 1, 0, 0), DEFAULT_PROXY_TRUSTED),  # a dual-stack socket
        (("10.1.2.3", 1), (ipaddress.ip_network("10.0.0.0/8"),)),
        (("fe80::1%lo", 1, 0, 1), (ipaddress.ip_network("fe80::/10"),)),
        (None, (ipaddress.ip_network("10.0.0.0/8"),)),  # no IP: a UNIX socket, say
        (("", 0), (ipaddress.ip_network("10.0.0.0/8"),)),
    ],
)
async def test_trusted_peers(
    autojump_clock: trio.testing.MockClock,
    address: tuple[Any, ...] | None,
    trusted: Sequence[IPNetwork],
) -> None:
    assert stage(trusted=trusted).trusts(address)
    peer = MemoryPeer()
    peer.send(V2_HEADER + b"hi\n")
    peer.send_eof()
    closed = await run(peer, [stage(trusted=trusted)], address=address)
    assert (closed["reason"], closed["peer"]) == ("eof", "203.0.113.7:4000")
    assert peer.echo() == b"hi\n"


# --- what the header says -------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "peer"),
    [
        (encode_v1(("203.0.113.7", 4000), SERVER), "203.0.113.7:4000"),
        (encode_v1(("2001:db8::7", 4000), ("2001:db8::1", 9000)), "[2001:db8::7]:4000"),
        (encode_v2(("203.0.113.7", 65535), SERVER), "203.0.113.7:65535"),
        (encode_v2(("2001:db8::7", 0), ("2001:db8::1", 9000)), "[2001:db8::7]:0"),
        # The parser reports IPv4-mapped clients as IPv6; the logs say IPv4.
        (encode_v1(("::ffff:198.51.100.1", 5), ("::ffff:192.0.2.1", 9000)), "198.51.100.1:5"),
        (encode_v2(("::ffff:198.51.100.1", 5), ("::ffff:192.0.2.1", 9000)), "198.51.100.1:5"),
        # The socket's own addresses stand: health checks, UNKNOWN, and the
        # families a TCP echo cannot use.
        (encode_v2(None, None, command=ProxyCommand.LOCAL), LB_PEER),
        (V2_SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12), LB_PEER),  # LOCAL, block unread
        (b"PROXY UNKNOWN\r\n", LB_PEER),
        (b"PROXY UNKNOWN 1.2.3.4 whatever\r\n", LB_PEER),
        (encode_v2(None, None), LB_PEER),  # PROXY over UNSPEC
        (V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), LB_PEER),  # UDP over IPv4
        (V2_SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216), LB_PEER),  # UNIX stream
    ],
)
async def test_peer_is_the_client_the_header_names_and_proxy_the_balancer(
    autojump_clock: trio.testing.MockClock, header: bytes, peer: str
) -> None:
    memory = MemoryPeer()
    memory.send(header + b"payload\n")
    memory.send_eof()
    closed = await run(memory)
    assert (closed["reason"], closed["peer"], closed["proxy"]) == ("eof", peer, LB_PEER)
    assert (closed["lines"], closed["bytes_in"]) == (1, 8), "the header is not echo payload"
    assert memory.echo() == b"payload\n"


async def test_the_bytes_after_the_header_in_the_same_segment_are_echoed_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for header in (V1_HEADER, V2_HEADER):
        peer = MemoryPeer()
        peer.send(header + b"one\ntw")
        peer.send(b"o\n")
        peer.send_eof()
        closed = await run(peer)
        assert peer.echo() == b"one\ntwo\n"
        assert (closed["reason"], closed["lines"], closed["bytes_in"]) == ("eof", 2, 8)


async def test_a_second_header_is_payload_and_echoed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peer = MemoryPeer()
    peer.send(V1_HEADER + encode_v1(("198.51.100.9", 1), SERVER))
    peer.send_eof()
    closed = await run(peer)
    assert closed["peer"] == "203.0.113.7:4000"
    assert peer.echo() == encode_v1(("198.51.100.9", 1), SERVER)


@pytest.mark.parametrize("accept", ["v1", "v2", "any"])
async def test_each_accept_setting_takes_its_versions(
    autojump_clock: trio.testing.MockClock, accept: Accept
) -> None:
    for version, header in ((1, V1_HEADER), (2, V2_HEADER)):
        peer = MemoryPeer()
        peer.send(header + b"x\n")
        peer.send_eof()
        closed = await run(peer, [stage(accept)])
        taken = accept in ("any", f"v{version}")
        assert closed["reason"] == ("eof" if taken else "proxy_invalid"), (accept, version)


async def test_stream_mode_behind_a_header(autojump_clock: trio.testing.MockClock) -> None:
    peer = MemoryPeer()
    peer.send(V2_HEADER + b"no newline")
    peer.send(b" needed")
    peer.send_eof()
    closed = await run(peer, config=Config(mode=Mode.STREAM))
    assert peer.echo() == b"no newline needed"
    assert (closed["reason"], closed["peer"], closed["bytes_in"]) == ("eof", "203.0.113.7:4000", 17)


async def test_a_stop_while_reading_the_header_closes_at_once_with_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peer = MemoryPeer()
    async with trio.open_nursery() as nursery:
        conn = connection(peer, [stage(timeout=60)])
        nursery.start_soon(conn.run)
        peer.send(V1_HEADER[:10])
        await trio.sleep(1)
        stopped_at = trio.current_time()
        conn.stop()
    assert conn.stats is not None
    assert conn.stats.reason is CloseReason.SHUTDOWN
    assert trio.current_time() == pytest.approx(stopped_at)
    assert peer.echo() == b""


def test_stages_for_builds_the_pipeline_in_order() -> None:
    assert stages_for(Config()) == ()
    [proxy] = stages_for(Config(proxy_protocol="v1", proxy_timeout=2, proxy_trusted="10.0.0.0/8"))
    assert isinstance(proxy, ProxyStage)
    assert (proxy.accept, proxy.timeout, proxy.timeout_reason) == ("v1", 2, "proxy_timeout")
    assert proxy.trusted == (ipaddress.ip_network("10.0.0.0/8"),)
    first, second = stages_for(Config(proxy_protocol="any", max_per_source=3))
    assert isinstance(first, ProxyStage)
    assert type(second).__name__ == "SourceLimitStage"
    # Each server its own stages: two calls share nothing.
    assert stages_for(Config(max_per_source=3))[0] is not stages_for(Config(max_per_source=3))[0]


# --- through the server, on real sockets -------------------------------------------------


async def connect_from(source_ip: str, port: int) -> trio.SocketStream:
    """A client socket bound to ``source_ip`` (any of 127.0.0.0/8 is ours on Linux)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        await sock.bind((source_ip, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def echo_until_closed(stream: trio.SocketStream) -> bytes:
    """What the server sent before it closed: a refusal may come as a FIN or a RST
    (closed the hard way, with our bytes unread)."""
    try:
        return await receive_until_eof(stream)
    except trio.BrokenResourceError:
        return b""


async def test_the_server_reads_headers_from_trusted_peers_only() -> None:
    config = Config(port=0, proxy_protocol="v2", proxy_trusted=("127.0.0.2/32",))
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(partial(serve, config))
            async with await connect_from("127.0.0.2", server.port) as balancer:
                local = balancer.socket.getsockname()
                await balancer.send_all(V2_HEADER + b"via the balancer\n")
                assert await receive_exactly(balancer, 17) == b"via the balancer\n"
            async with await connect_from("127.0.0.3", server.port) as stranger:
                await stranger.send_all(V2_HEADER + b"spoofed\n")
                assert await echo_until_closed(stranger) == b""
            await logs.wait_for("connection_closed", 2)
            server.shutdown()
    by_reason = {entry["reason"]: entry for entry in logs.events("connection_closed")}
    assert by_reason["eof"]["peer"] == "203.0.113.7:4000"
    assert by_reason["eof"]["proxy"] == f"127.0.0.2:{local[1]}"
    assert by_reason["proxy_untrusted"]["peer"].startswith("127.0.0.3:")
    closed = server.statistics().closed
    assert (closed["eof"], closed["proxy_untrusted"]) == (1, 1)
    assert server.statistics().bytes_in == 17


async def test_the_server_refuses_a_client_that_sends_no_header() -> None:
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(
                partial(serve, Config(port=0, proxy_protocol="v1"))
            )
            async with await connect_from("127.0.0.1", server.port) as client:
                await client.send_all(b"hello\n")
                assert await echo_until_closed(client) == b""
            await logs.wait_for("connection_closed")
            server.shutdown()
    [closed] = logs.events("connection_closed")
    assert (closed["reason"], closed["detail"]) == ("proxy_invalid", "not a PROXY protocol header")
