"""The per-source limit: counting per real client, episodes, and every slot given back.

`SourceCounter` is pure and tested directly; `SourceLimitStage` runs through
`echosvc.Connection` on `MemoryPeer` under the mock clock, behind the PROXY
stage where the source is the client a header names, and then through
`echosvc.serve` on real loopback sockets.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from echosvc import CloseReason, Config, Connection, Server, serve
from echosvc.limits import Admission, SourceCounter, SourceLimitStage, source_of
from echosvc.pipeline import Link, Refused, Stage, stages_for
from echosvc.proxyproto import ProxyCommand, encode_v1, encode_v2

from .support import MemoryPeer, captured_logs, round_trip

TIME_LIMIT = 20
SERVER = ("192.0.2.1", 9000)


# --- the counter ----------------------------------------------------------------------


def test_sources_are_ipv4_addresses_and_ipv6_slash_64s() -> None:
    assert source_of(("192.0.2.7", 1)) == "192.0.2.7"
    assert source_of(("2001:db8::7", 1, 0, 0)) == "2001:db8::/64"
    assert source_of(("2001:db8:0:0:ffff:ffff:ffff:ffff", 1, 0, 0)) == "2001:db8::/64"
    assert source_of(("2001:db8:0:1::7", 1, 0, 0)) == "2001:db8:0:1::/64"
    assert source_of(("fe80::1%lo", 1, 0, 1)) == "fe80::/64"
    assert source_of(("::ffff:192.0.2.7", 1, 0, 0)) == "192.0.2.7"
    assert source_of(("::1", 1, 0, 0)) == "::/64"
    assert source_of(None) is None
    assert source_of("/run/echosvc.sock") is None
    assert source_of(("", 0)) is None


def test_the_counter_admits_up_to_the_limit_and_reports_each_episode_once() -> None:
    counter = SourceCounter(2)
    assert [counter.acquire("a") for _ in range(2)] == [Admission.ADMITTED] * 2
    assert counter.acquire("a") is Admission.REFUSED_FIRST
    assert counter.acquire("a") is Admission.REFUSED
    assert counter.acquire("b") is Admission.ADMITTED, "another source has its own slots"
    counter.release("a")  # below the limit: that episode is over
    assert counter.acquire("a") is Admission.ADMITTED
    assert counter.acquire("a") is Admission.REFUSED_FIRST, "a new episode"
    assert (counter.count("a"), counter.count("b"), len(counter)) == (2, 1, 2)


def test_the_counter_keeps_no_entry_for_a_source_with_nothing_open() -> None:
    counter = SourceCounter(1)
    sources = [f"192.0.2.{i}" for i in range(250)]
    outcomes = [counter.acquire(source) for _ in range(4) for source in sources]
    assert (
        outcomes
        == [Admission.ADMITTED] * 250 + [Admission.REFUSED_FIRST] * 250 + [Admission.REFUSED] * 500
    )
    assert len(counter) == 250
    for source in sources:
        counter.release(source)
    assert len(counter) == 0
    assert counter._episodes == set()
    with pytest.raises(KeyError):
        counter.release("192.0.2.1")
    with pytest.raises(ValueError, match="at least 1"):
        SourceCounter(0)


# --- the stage, on memory streams ---------------------------------------------------------


class Held:
    """Connections kept open by a test, each from a given source, behind ``stages``."""

    def __init__(self, nursery: trio.Nursery, stages: list[Stage], config: Config) -> None:
        self.nursery = nursery
        self.stages = stages
        self.config = config
        self.connections: list[tuple[Connection, MemoryPeer]] = []

    async def open(
        self, address: tuple[Any, ...], data: bytes = b""
    ) -> tuple[Connection, MemoryPeer]:
        """Start a connection and let it run its stages, so the order is the test's."""
        peer = MemoryPeer()
        if data:
            peer.send(data)
        conn = Connection(
            peer.server_stream(),
            self.config,
            peer=f"{address[0]}:{address[1]}",
            address=address,
            stages=self.stages,
        )
        self.nursery.start_soon(conn.run)
        self.connections.append((conn, peer))
        await trio.sleep(0.001)
        return conn, peer


def reasons(held: Held) -> list[str | None]:
    return [None if c.stats is None else c.stats.reason.value for c, _ in held.connections]


@pytest.mark.parametrize(
    ("addresses", "source"),
    [
        ([("192.0.2.7", port) for port in range(1, 6)], "192.0.2.7"),
        # One /64, five addresses in it: one source.
        ([(f"2001:db8::{i}", 1, 0, 0) for i in range(1, 6)], "2001:db8::/64"),
    ],
)
async def test_one_over_the_limit_is_refused_at_once_and_logged_once_per_episode(
    autojump_clock: trio.testing.MockClock, addresses: list[tuple[Any, ...]], source: str
) -> None:
    limit = SourceLimitStage(2)
    with captured_logs() as logs:
        async with trio.open_nursery() as nursery:
            held = Held(nursery, [limit], Config(read_timeout=0))
            for address in addresses[:4]:
                await held.open(address)
            await trio.sleep(1)
            # Two held, two refused at once and without a reply, one warning.
            assert reasons(held) == [None, None, "source_limit", "source_limit"]
            assert [c.stats.duration_s for c, _ in held.connections[2:] if c.stats] == [0, 0]
            assert [peer.echo() for _, peer in held.connections[2:]] == [b"", b""]
            assert [peer.closed_by_server for _, peer in held.connections[2:]] == [True, True]
            reached = logs.events("source_limit_reached")
            assert [(r["source"], r["limit"], r["log_level"]) for r in reached] == [
                (source, 2, "warning")
            ]
            # A different source is not affected.
            other, _ = await held.open(
                ("198.51.100.1", 1) if "." in source else ("2001:db8:1::1", 1)
            )
            # One held connection leaves: the episode ends, a slot is free.
            held.connections[0][1].send_eof()
            await trio.sleep(1)
            assert limit.counter.count(source) == 1
            await held.open(addresses[4])  # admitted
            await held.open(addresses[4])  # over again: a new episode, a new warning
            await trio.sleep(1)
            assert reasons(held)[4:] == [None, None, "source_limit"]
            assert len(logs.events("source_limit_reached")) == 2
            nursery.cancel_scope.cancel()
    refused = [e for e in logs.events("connection_closed") if e["reason"] == "source_limit"]
    assert len(refused) == 3
    assert {e["log_level"] for e in refused} == {"debug"}
    assert {e.get("detail") for e in refused} == {None}
    assert len(limit.counter) == 0, "every slot given back, the cancelled ones too"
    assert other.stats is not None


async def test_a_connection_without_an_ip_source_is_not_limited(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limit = SourceLimitStage(1)
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            peer = MemoryPeer()
            nursery.start_soon(Connection(peer.server_stream(), Config(), stages=[limit]).run)
        await trio.sleep(1)
        assert len(limit.counter) == 0
        nursery.cancel_scope.cancel()


class RefuseAfter(Stage):
    """A later stage (TLS, say) that refuses: the limit's slot must come back."""

    async def open(self, link: Link) -> Link:
        await trio.sleep(1)
        raise Refused(CloseReason.TLS_FAILED, "refused by a later stage")


Scenario = Callable[[MemoryPeer, Connection], Awaitable[None]]


async def _eof(peer: MemoryPeer, conn: Connection) -> None:
    await trio.lowlevel.checkpoint()
    peer.send(b"line\n")
    peer.send_eof()


async def _idle(peer: MemoryPeer, conn: Connection) -> None:
    await trio.lowlevel.checkpoint()  # and nothing more: the read deadline fires


async def _too_long(peer: MemoryPeer, conn: Connection) -> None:
    await trio.lowlevel.checkpoint()
    peer.send(b"x" * 100)


async def _reset(peer: MemoryPeer, conn: Connection) -> None:
    await trio.sleep(1)
    peer.reset()


async def _never_reads(peer: MemoryPeer, conn: Connection) -> None:
    await trio.lowlevel.checkpoint()
    peer.send(b"y" * 50 + b"\n")  # the echo cannot leave: capacity 0


async def _stopped(peer: MemoryPeer, conn: Connection) -> None:
    await trio.sleep(1)
    conn.stop()


@pytest.mark.parametrize(
    ("scenario", "reason", "later"),
    [
        (_eof, CloseReason.EOF, False),
        (_idle, CloseReason.READ_TIMEOUT, False),
        (_too_long, CloseReason.LINE_TOO_LONG, False),
        (_reset, CloseReason.RESET, False),
        (_never_reads, CloseReason.WRITE_TIMEOUT, False),
        (_stopped, CloseReason.SHUTDOWN, False),
        (_idle, CloseReason.TLS_FAILED, True),
    ],
)
async def test_the_slot_is_given_back_whatever_the_reason(
    autojump_clock: trio.testing.MockClock, scenario: Scenario, reason: CloseReason, later: bool
) -> None:
    limit = SourceLimitStage(1)
    config = Config(read_timeout=5, write_timeout=5, max_line_bytes=64)
    stages: list[Stage] = [limit, RefuseAfter()] if later else [limit]
    peer = MemoryPeer(capacity=0 if scenario is _never_reads else 10**9)
    conn = Connection(
        peer.server_stream(), config, peer="p", address=("192.0.2.7", 1), stages=stages
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        await trio.sleep(0.001)
        assert limit.counter.count("192.0.2.7") == 1
        await scenario(peer, conn)
    assert conn.stats is not None
    assert conn.stats.reason is reason
    assert len(limit.counter) == 0


async def test_the_slot_is_given_back_when_cancelled_in_any_stage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Cancelled while the PROXY stage waits (no slot taken yet), and while
    # the echo waits (slot taken): either way nothing is left counted.
    stages = list(stages_for(Config(proxy_protocol="v1", max_per_source=1)))
    limit = stages[1]
    assert isinstance(limit, SourceLimitStage)
    for data in (b"PROXY TCP4 ", encode_v1(("203.0.113.7", 1), SERVER)):
        peer = MemoryPeer()
        peer.send(data)
        conn = Connection(
            peer.server_stream(), Config(), peer="lb", address=("127.0.0.1", 1), stages=stages
        )
        with trio.move_on_after(3):
            await conn.run()
        assert conn.stats is not None
        assert conn.stats.reason is CloseReason.SHUTDOWN
        assert len(limit.counter) == 0


async def test_behind_the_proxy_stage_the_limit_is_per_real_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stages = list(stages_for(Config(proxy_protocol="any", max_per_source=1)))
    limit = stages[1]
    assert isinstance(limit, SourceLimitStage)
    balancer = ("127.0.0.1", 40000)  # every connection comes from it
    with captured_logs() as logs:
        async with trio.open_nursery() as nursery:
            held = Held(nursery, stages, Config(read_timeout=0))
            await held.open(balancer, encode_v2(("203.0.113.7", 1), SERVER))
            await held.open(balancer, encode_v1(("203.0.113.8", 1), SERVER))
            await held.open(balancer, encode_v1(("2001:db8::1", 1), ("2001:db8::2", 9)))
            # The balancer's own health check (LOCAL) counts against the balancer.
            await held.open(balancer, encode_v2(None, None, command=ProxyCommand.LOCAL))
            # Over the limit: the same client again, and the same /64.
            await held.open(balancer, encode_v2(("203.0.113.7", 2), SERVER))
            await held.open(balancer, encode_v1(("2001:db8::ffff", 1), ("2001:db8::2", 9)))
            await trio.sleep(1)
            assert reasons(held) == [None, None, None, None, "source_limit", "source_limit"]
            nursery.cancel_scope.cancel()
    reached = {r["source"] for r in logs.events("source_limit_reached")}
    assert reached == {"203.0.113.7", "2001:db8::/64"}
    refused = [e for e in logs.events("connection_closed") if e["reason"] == "source_limit"]
    assert {e["peer"] for e in refused} == {"203.0.113.7:2", "[2001:db8::ffff]:1"}
    assert {e["proxy"] for e in refused} == {"127.0.0.1:40000"}
    assert len(limit.counter) == 0


# --- through the server ---------------------------------------------------------------


async def connect_from(source_ip: str, port: int) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        await sock.bind((source_ip, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def test_the_server_limits_each_source_and_counts_the_refusals() -> None:
    config = Config(port=0, max_per_source=2, read_timeout=60)
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(partial(serve, config))
            clients = [await connect_from("127.0.0.2", server.port) for _ in range(2)]
            for client in clients:
                await round_trip(client, b"held\n")
            third = await connect_from("127.0.0.2", server.port)
            await logs.wait_for("source_limit_reached")
            other = await connect_from("127.0.0.3", server.port)
            await round_trip(other, b"another source\n")
            await clients[0].aclose()
            await logs.wait_for("connection_closed", 2)  # the refusal and the close
            fourth = await connect_from("127.0.0.2", server.port)
            await round_trip(fourth, b"a free slot again\n")
            server.shutdown()
            for stream in (*clients[1:], third, other, fourth):
                await stream.aclose()
    [reached] = logs.events("source_limit_reached")
    assert (reached["source"], reached["limit"]) == ("127.0.0.2", 2)
    closed = server.statistics().closed
    assert closed["source_limit"] == 1
    assert closed["eof"] + closed["shutdown"] == 4
