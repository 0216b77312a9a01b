"""The pipeline seam: stages before the echo, each under its own deadline and reasons.

The stage here is written for the test, as a user's own protocol in front of
the echo would be: ``Greeting`` reads one ``HELLO <name>\\n`` line byte by
byte-agnostic chunks, names the client after it, and hands on whatever came
after the greeting. It is driven through `echosvc.Connection` on memory
streams under the mock clock, and through `echosvc.serve` on real sockets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import pytest
import trio
import trio.testing

from echosvc import CloseReason, Config, Connection, Server, handle_stream, serve
from echosvc.pipeline import Link, Refused, Stage

from .support import MemoryPeer, captured_logs, connect, receive_exactly, receive_until_eof

TIME_LIMIT = 20


class Greeting(Stage):
    """``HELLO <name>\\n`` first; the echo gets the rest."""

    timeout_reason = CloseReason.PROXY_TIMEOUT

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self.opened: list[str] = []
        self.closed: list[str] = []

    async def open(self, link: Link) -> Link:
        buffer = link.pending
        while b"\n" not in buffer:
            if len(buffer) > 64:
                raise Refused(CloseReason.PROXY_INVALID, "greeting too long")
            chunk = await link.stream.receive_some(4096)
            if not chunk:
                raise Refused(CloseReason.PROXY_INVALID, "no greeting")
            buffer += chunk
        line, _, rest = buffer.partition(b"\n")
        if not line.startswith(b"HELLO "):
            raise Refused(CloseReason.PROXY_INVALID, "not a greeting", quiet=line == b"QUIET")
        name = line[6:].decode()
        self.opened.append(name)
        return link.evolve(peer=name, pending=rest).with_field("greeted_by", str(link.peer))

    def close(self, link: Link) -> None:
        self.closed.append(str(link.peer))


class Explodes(Stage):
    async def open(self, link: Link) -> Link:
        await trio.lowlevel.checkpoint()
        raise RuntimeError("a bug in a stage")


async def run_with(
    stages: Sequence[Stage], peer: MemoryPeer, config: Config | None = None
) -> Connection:
    connection = Connection(peer.server_stream(), config or Config(), peer="lb:1", stages=stages)
    await connection.run()
    return connection


# --- on memory streams, under the mock clock --------------------------------------


async def test_bytes_after_the_stage_in_the_same_segment_are_the_echos_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    greeting = Greeting()
    peer = MemoryPeer()
    peer.send(b"HELLO alice\none\ntw")
    peer.send(b"o\n")
    peer.send_eof()
    with captured_logs() as logs:
        connection = await run_with([greeting], peer)
    assert peer.echo() == b"one\ntwo\n"
    assert connection.stats is not None
    assert connection.stats.reason is CloseReason.EOF
    assert connection.stats.bytes_in == 8  # the greeting is not echo payload
    [closed] = logs.events("connection_closed")
    assert closed["peer"] == "alice"
    assert closed["greeted_by"] == "lb:1"
    assert greeting.closed == ["alice"]


async def test_a_stage_deadline_closes_with_its_own_reason_at_its_own_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peer = MemoryPeer()
    peer.send(b"HELLO slo")  # and nothing more
    started = trio.current_time()
    connection = await run_with([Greeting(timeout=3)], peer, Config(read_timeout=300))
    assert connection.stats is not None
    assert connection.stats.reason is CloseReason.PROXY_TIMEOUT
    assert connection.stats.duration_s == pytest.approx(3)
    assert trio.current_time() == pytest.approx(started + 3), "closed at once: no linger"
    assert peer.echo() == b""
    assert peer.closed_by_server


async def test_the_read_deadline_starts_when_the_stages_are_done(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peer = MemoryPeer()
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_with, [Greeting(timeout=5)], peer, Config(read_timeout=10))
        await trio.sleep(4)
        peer.send(b"HELLO late\n")
    # 4 s in the stage, then a whole read timeout for the first line.
    assert trio.current_time() == pytest.approx(started + 4 + 10 + 2)  # + the linger


@pytest.mark.parametrize(
    ("data", "detail", "level"),
    [
        (b"GET / HTTP/1.0\n", "not a greeting", "info"),
        (b"x" * 100, "greeting too long", "info"),
        (b"QUIET\n", "not a greeting", "debug"),
    ],
)
async def test_a_refusal_closes_at_once_with_the_stages_reason_and_no_echo(
    autojump_clock: trio.testing.MockClock, data: bytes, detail: str, level: str
) -> None:
    greeting = Greeting()
    peer = MemoryPeer()
    peer.send(data)
    with captured_logs() as logs:
        connection = await run_with([greeting], peer)
    assert connection.stats is not None
    assert connection.stats.reason is CloseReason.PROXY_INVALID
    assert peer.echo() == b""
    [closed] = logs.events("connection_closed")
    assert (closed["detail"], closed["log_level"]) == (detail, level)
    assert greeting.closed == [], "close() is for stages whose open() returned"


async def test_a_stop_during_a_stage_closes_at_once_with_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peer = MemoryPeer()
    async with trio.open_nursery() as nursery:
        connection = Connection(peer.server_stream(), Config(), stages=[Greeting(timeout=60)])
        nursery.start_soon(connection.run)
        peer.send(b"HELLO bo")
        await trio.sleep(1)
        stopped_at = trio.current_time()
        connection.stop()
    assert connection.stats is not None
    assert connection.stats.reason is CloseReason.SHUTDOWN
    assert trio.current_time() == pytest.approx(stopped_at), "nothing to drain, no linger"
    assert peer.echo() == b""


async def test_a_stop_and_a_stage_deadline_together_the_earlier_names_the_reason(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for stop_first in (True, False):
        peer = MemoryPeer()
        async with trio.open_nursery() as nursery:
            connection = Connection(peer.server_stream(), Config(), stages=[Greeting(timeout=5)])
            nursery.start_soon(connection.run)
            await trio.sleep(4)
            if stop_first:
                connection.stop()
                autojump_clock.jump(1)  # the stage's deadline passes before it runs
            else:
                autojump_clock.jump(1)
                await trio.lowlevel.checkpoint()  # the deadline fires...
                connection.stop()  # ...and the stop follows in the same pass
        assert connection.stats is not None
        expected = CloseReason.SHUTDOWN if stop_first else CloseReason.PROXY_TIMEOUT
        assert connection.stats.reason is expected


async def test_every_opened_stage_is_closed_however_the_connection_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    first, second = Greeting(), Greeting()
    peer = MemoryPeer()
    peer.send(b"HELLO a\nHELLO b\nnot a greeting at all\n")
    connection = await run_with([first, second, Greeting()], peer)
    assert connection.stats is not None
    assert connection.stats.reason is CloseReason.PROXY_INVALID
    assert (first.closed, second.closed) == (["a"], ["b"])

    # Cancelled from outside, in the echo.
    greeting = Greeting()
    peer = MemoryPeer()
    peer.send(b"HELLO c\n")
    with trio.move_on_after(1):
        await run_with([greeting], peer)
    assert greeting.closed == ["c"]


async def test_a_stage_that_raises_is_contained_and_logged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peer = MemoryPeer()
    with captured_logs() as logs:
        connection = await run_with([Explodes()], peer)
    assert connection.stats is not None
    assert connection.stats.reason is CloseReason.ERROR
    [closed] = logs.events("connection_closed")
    assert closed["log_level"] == "error"
    assert isinstance(closed["exc_info"], RuntimeError)


async def test_handle_stream_runs_stages_too(autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b"HELLO dave\nhi\n")
    await client.send_eof()
    stats = await handle_stream(server, Config(), stages=[Greeting()])
    assert (stats.peer, stats.reason, stats.lines) == ("dave", CloseReason.EOF, 1)
    assert dict(stats.extra) == {"greeted_by": "None"}
    assert await receive_until_eof(client) == b"hi\n"


# --- through the server, on real sockets ------------------------------------------


async def test_the_server_runs_its_stages_in_each_handler_task() -> None:
    greeting = Greeting(timeout=math.inf)
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(partial(serve, Config(port=0), stages=[greeting]))
            # A client stuck in its stage does not stall the accept loop.
            stuck = await connect(server.port)
            async with await connect(server.port) as client:
                await client.send_all(b"HELLO erin\nping\n")
                assert await receive_exactly(client, 5) == b"ping\n"
            await logs.wait_for("connection_closed")
            server.shutdown()
            await stuck.aclose()
    closed = {e["peer"]: e for e in logs.events("connection_closed")}
    assert closed["erin"]["reason"] == "eof"
    assert closed["erin"]["greeted_by"].startswith("127.0.0.1:")
    stats = server.statistics()
    assert (stats.closed["eof"], stats.closed["shutdown"], stats.accepted) == (1, 1, 2)
    assert greeting.closed == ["erin"]
