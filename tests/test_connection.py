"""The echo protocol of one connection, on trio.testing streams and a virtual clock.

Every deadline here runs on ``MockClock(autojump_threshold=0)`` (pytest-trio's
``autojump_clock`` fixture): when every task is blocked the clock jumps to
the next deadline, so DESIGN.md's 300-second default is tested in
milliseconds, and the times asserted are exact.

A peer that never reads needs `lockstep_stream_pair`: memory streams buffer
without limit, so on them a send never blocks and a write deadline could
never fire.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import attrs
import pytest
import structlog
import trio
import trio.lowlevel
import trio.testing

import echosvc.connection
from echosvc import CloseReason, Config, Connection, ConnectionStats, Mode, handle_stream
from echosvc.connection import LINGER_S

from .support import captured_logs, receive_exactly, receive_until_eof


@attrs.define
class Handler:
    """A connection running in a test's nursery, and what became of it."""

    connection: Connection
    stats: ConnectionStats | None = None
    ended_at: float | None = None


def start(nursery: trio.Nursery, stream: trio.abc.Stream, config: Config, **kwargs: Any) -> Handler:
    handler = Handler(Connection(stream, config, **kwargs))

    async def run() -> None:
        started = trio.current_time()
        handler.stats = await handler.connection.run()
        # When it closed; a polite close may linger after that.
        handler.ended_at = started + handler.stats.duration_s

    nursery.start_soon(run)
    return handler


class CountingStream(trio.abc.HalfCloseableStream):
    """Passes everything through and counts the handler's sends."""

    def __init__(self, inner: trio.StapledStream[Any, Any]) -> None:
        self.inner = inner
        self.sends: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sends.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


# --- echo -------------------------------------------------------------------


async def test_lines_are_echoed_byte_exact_and_the_final_partial_line_too() -> None:
    client, server = trio.testing.memory_stream_pair()
    data = b"hello\n\x00\xff\xfe not utf-8 \xc3\x28\r\nno newline at the end"
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, Config())
        await client.send_all(data)
        await client.send_eof()
        assert await receive_until_eof(client) == data
    assert handler.stats is not None
    assert handler.stats.reason is CloseReason.EOF
    assert handler.stats.lines == 3
    assert handler.stats.bytes_in == handler.stats.bytes_out == len(data)


async def test_lines_arriving_together_leave_in_one_send() -> None:
    client, server_end = trio.testing.memory_stream_pair()
    server = CountingStream(server_end)
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, Config())
        await client.send_all(b"a\nb\nc\npart")
        assert await receive_exactly(client, 6) == b"a\nb\nc\n"
        await client.send_all(b"ial\n")
        assert await receive_exactly(client, 8) == b"partial\n"
        await client.send_eof()
        assert await receive_until_eof(client) == b""
    assert server.sends == [b"a\nb\nc\n", b"partial\n"]
    assert handler.stats is not None
    assert handler.stats.lines == 4


async def test_nothing_is_logged_per_line_at_info() -> None:
    client, server = trio.testing.memory_stream_pair()
    with captured_logs() as logs:
        async with trio.open_nursery() as nursery:
            start(nursery, server, Config(), conn_id=7, peer="127.0.0.1:5555")
            for i in range(50):
                await client.send_all(b"line %d\n" % i)
                await receive_exactly(client, len(b"line %d\n" % i))
            await client.send_eof()
            await receive_until_eof(client)
    assert [(e["event"], e["log_level"]) for e in logs.entries] == [
        ("connection_opened", "debug"),
        ("connection_closed", "info"),
    ]
    closed = logs.entries[1]
    assert closed["conn_id"] == 7
    assert closed["peer"] == "127.0.0.1:5555"
    assert closed["reason"] == "eof"
    assert closed["lines"] == 50
    assert closed["bytes_in"] == closed["bytes_out"] > 0
    assert closed["duration_s"] >= 0


async def test_loggers_are_built_once_not_per_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """With cache_logger_on_first_use (the daemon's setting) the bound logger
    is built once; structlog.get_logger() per record built one per record,
    a third of a filtered debug record's cost."""
    # A proxy of the test's own: a cached one would keep this configuration.
    monkeypatch.setattr(echosvc.connection, "_log", structlog.get_logger("echosvc"))
    built = []

    def factory(*args: Any) -> structlog.PrintLogger:
        built.append(args)
        return structlog.PrintLogger(file=io.StringIO())

    previous = structlog.get_config()
    structlog.configure(
        processors=[structlog.processors.KeyValueRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    try:
        for _ in range(50):
            client, server = trio.testing.memory_stream_pair()
            await client.send_eof()
            await handle_stream(server, Config())
    finally:
        structlog.configure(**previous)
    assert len(built) <= 1, f"{len(built)} loggers built for 100 records"


async def test_handle_stream_returns_the_stats_and_closes_the_stream() -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b"x\n")
    await client.send_eof()
    stats = await handle_stream(server, Config(), conn_id=1, peer="p")
    assert stats == ConnectionStats(
        conn_id=1,
        peer="p",
        reason=CloseReason.EOF,
        lines=1,
        bytes_in=2,
        bytes_out=2,
        duration_s=stats.duration_s,
    )
    assert await receive_until_eof(client) == b"x\n"
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"more")


async def test_the_peer_may_keep_reading_after_its_half_close() -> None:
    client, server = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, Config())

        async def write_then_half_close() -> None:
            await client.send_all(b"first\nsecond")
            await client.send_eof()

        nursery.start_soon(write_then_half_close)
        assert await receive_until_eof(client) == b"first\nsecond"
    assert handler.stats is not None
    assert handler.stats.reason is CloseReason.EOF


# --- read deadline ----------------------------------------------------------


async def test_the_default_read_deadline_closes_a_silent_client_at_300s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    start_time = trio.current_time()
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, Config())
        assert await receive_until_eof(client) == b""
    assert handler.stats is not None
    assert handler.stats.reason is CloseReason.READ_TIMEOUT
    assert handler.ended_at == pytest.approx(start_time + 300)


async def test_a_trickling_client_is_cut_off_though_bytes_keep_coming(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Go's SetReadDeadline bounds the whole line, not the gap between bytes."""
    client, server = trio.testing.memory_stream_pair()
    start_time = trio.current_time()
    sent = 0
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, Config())

        async def trickle() -> None:
            nonlocal sent
            for _ in range(10):  # one byte a minute, for longer than the deadline
                try:
                    await client.send_all(b"x")
                except trio.BrokenResourceError:
                    return
                sent += 1
                await trio.sleep(60)

        nursery.start_soon(trickle)
        # The unfinished line is not echoed when the deadline fires.
        assert await receive_until_eof(client) == b""
    assert handler.stats is not None
    assert handler.stats.reason is CloseReason.READ_TIMEOUT
    assert handler.ended_at == pytest.approx(start_time + 300)
    assert handler.stats.bytes_in == 5  # at 0, 60, 120, 180, 240 s
    assert handler.stats.bytes_out == 0


async def test_each_line_gets_a_fresh_read_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, Config(read_timeout=300))
        for i in range(5):  # 1000 s in all, 200 s per line
            await trio.sleep(200)
            await client.send_all(b"line %d\n" % i)
            assert await receive_exactly(client, 7) == b"line %d\n" % i
        await client.send_eof()
        assert await receive_until_eof(client) == b""
    assert handler.stats is not None
    assert handler.stats.reason is CloseReason.EOF
    assert handler.stats.lines == 5


async def test_the_next_lines_deadline_starts_when_its_predecessor_was_echoed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.lockstep_stream_pair()
    start_time = trio.current_time()
    config = Config(read_timeout=300, write_timeout=1000)
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, config)
        await client.send_all(b"one\n")
        await trio.sleep(100)  # the echo is handed over only when we read
        assert await receive_exactly(client, 4) == b"one\n"
        assert await receive_until_eof(client) == b""
    assert handler.stats is not None
    assert handler.stats.reason is CloseReason.READ_TIMEOUT
    assert handler.ended_at == pytest.approx(start_time + 100 + 300)


async def test_a_read_deadline_shorter_than_the_write_deadline_is_not_delayed_by_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.lockstep_stream_pair()
    start_time = trio.current_time()
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, Config(read_timeout=10, write_timeout=100))
        await client.send_all(b"slowly read\n")
        await trio.sleep(50)
        assert await receive_exactly(client, 12) == b"slowly read\n"
        assert await receive_until_eof(client) == b""
    assert handler.stats is not None
    assert handler.stats.reason is CloseReason.READ_TIMEOUT
    assert handler.ended_at == pytest.approx(start_time + 50 + 10)


async def test_a_zero_read_timeout_waits_forever(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, Config(read_timeout=0))
        await trio.sleep(10 * 365 * 86400)
        await client.send_all(b"still here\n")
        assert await receive_exactly(client, 11) == b"still here\n"
        await client.send_eof()
    assert handler.stats is not None
    assert handler.stats.reason is CloseReason.EOF


# --- write deadline ---------------------------------------------------------


async def test_a_client_that_never_reads_is_closed_at_the_write_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.lockstep_stream_pair()
    start_time = trio.current_time()
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, Config())
        await client.send_all(b"read me, if you dare\n")
        # ...and never read: the handler's send cannot complete.
    assert handler.stats is not None
    assert handler.stats.reason is CloseReason.WRITE_TIMEOUT
    assert handler.ended_at == pytest.approx(start_time + 30)
    assert handler.stats.bytes_in == 21
    assert handler.stats.bytes_out == 0  # a cancelled send is not counted
    assert handler.stats.lines == 0


async def test_the_final_flush_at_eof_has_a_write_deadline_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, Config(write_timeout=5))
        await client.send_all(b"no newline")
        await client.send_eof()
    assert handler.stats is not None
    assert handler.stats.reason is CloseReason.WRITE_TIMEOUT


# --- line limit -------------------------------------------------------------


async def test_an_oversize_line_closes_after_the_lines_before_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, Config(max_line_bytes=8))
        await client.send_all(b"fits\nalso ok\n" + b"x" * 20 + b"\nafter\n")
        assert await receive_until_eof(client) == b"fits\nalso ok\n"
    assert handler.stats is not None
    assert handler.stats.reason is CloseReason.LINE_TOO_LONG
    assert handler.stats.lines == 2


async def test_a_huge_line_without_newline_is_cut_off_at_the_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, Config(max_line_bytes=1024))

        async def flood() -> None:
            for _ in range(100):  # up to 100 KiB, never a newline
                try:
                    await client.send_all(b"y" * 1024)
                except trio.BrokenResourceError:
                    return
                await trio.lowlevel.checkpoint()

        nursery.start_soon(flood)
        assert await receive_until_eof(client) == b""
    assert handler.stats is not None
    assert handler.stats.reason is CloseReason.LINE_TOO_LONG
    assert handler.stats.bytes_in <= 2048  # memory stayed bounded


# --- graceful stop ----------------------------------------------------------


async def test_stop_echoes_the_unfinished_line_then_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, Config())
        await client.send_all(b"one\npart")
        assert await receive_exactly(client, 4) == b"one\n"
        await trio.testing.wait_all_tasks_blocked()
        handler.connection.stop()
        assert await receive_until_eof(client) == b"part"
    assert handler.stats is not None
    assert handler.stats.reason is CloseReason.SHUTDOWN
    assert handler.stats.lines == 2
    assert handler.stats.bytes_out == handler.stats.bytes_in == 8


async def test_stop_lets_an_echo_in_flight_finish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, Config())
        await client.send_all(b"whole line\nrest")
        await trio.sleep(5)  # the handler is blocked in its send
        handler.connection.stop()
        handler.connection.stop()  # idempotent
        assert await receive_until_eof(client) == b"whole line\nrest"
    assert handler.stats is not None
    assert handler.stats.reason is CloseReason.SHUTDOWN


async def test_the_write_deadline_still_applies_to_an_echo_finishing_after_stop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.lockstep_stream_pair()
    start_time = trio.current_time()
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, Config(write_timeout=30))
        await client.send_all(b"never read\n")
        await trio.sleep(5)
        handler.connection.stop()
    assert handler.stats is not None
    assert handler.stats.reason is CloseReason.WRITE_TIMEOUT
    assert handler.ended_at == pytest.approx(start_time + 30)


async def test_stop_before_run_closes_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b"unread\n")
    connection = Connection(server, Config())
    connection.stop()
    stats = await connection.run()
    assert stats.reason is CloseReason.SHUTDOWN
    assert stats.bytes_in == 0
    assert await receive_until_eof(client) == b""


async def test_cancelling_the_caller_closes_the_stream_and_logs_shutdown() -> None:
    client, server = trio.testing.memory_stream_pair()
    with captured_logs() as logs, trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            start(nursery, server, Config())
            await client.send_all(b"a\n")
            await receive_exactly(client, 2)
            scope.cancel()
    assert scope.cancelled_caught
    assert await receive_until_eof(client) == b""
    closed = logs.events("connection_closed")
    assert len(closed) == 1
    assert closed[0]["reason"] == "shutdown"
    assert closed[0]["lines"] == 1


# --- failures ---------------------------------------------------------------


async def test_a_peer_that_vanishes_mid_echo_is_a_reset() -> None:
    client, server = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, Config())
        await client.send_all(b"going away\n")
        await trio.testing.wait_all_tasks_blocked()
        await client.aclose()
    assert handler.stats is not None
    assert handler.stats.reason is CloseReason.RESET


class ExplodingStream(CountingStream):
    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        raise RuntimeError("a bug in a stream wrapper")


async def test_an_unexpected_error_is_logged_with_its_traceback_and_contained() -> None:
    _, server = trio.testing.memory_stream_pair()
    with captured_logs() as logs:
        stats = await handle_stream(ExplodingStream(server), Config())
    assert stats.reason is CloseReason.ERROR
    [closed] = logs.events("connection_closed")
    assert closed["log_level"] == "error"
    assert isinstance(closed["exc_info"], RuntimeError)


class StubbornCloseStream(CountingStream):
    """Like a TLS stream whose peer stopped reading: a polite close hangs."""

    async def aclose(self) -> None:
        await trio.sleep_forever()


@pytest.mark.parametrize("write_timeout", [0.5, 7])
async def test_a_polite_close_that_hangs_is_cut_after_a_bounded_wait(
    autojump_clock: trio.testing.MockClock, write_timeout: float
) -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b"bye\n")
    await client.send_eof()
    start_time = trio.current_time()
    config = Config(write_timeout=write_timeout)
    stats = await handle_stream(StubbornCloseStream(server), config)
    assert stats.reason is CloseReason.EOF
    assert trio.current_time() == pytest.approx(start_time + min(write_timeout, LINGER_S))


async def test_a_polite_close_sends_eof_then_drains_until_the_peer_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A lingering close: the peer sees EOF at once, its late sends are dropped
    (not refused), and the handler is done when the peer hangs up."""
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, Config(max_line_bytes=4))
        await client.send_all(b"ok\ntoo long\n")
        assert await receive_until_eof(client) == b"ok\n"
        await client.send_all(b"late, and ignored\n")
        await trio.sleep(1)
        assert handler.stats is None, "still draining"
        await client.aclose()
    assert handler.stats is not None
    assert handler.stats.reason is CloseReason.LINE_TOO_LONG
    assert handler.stats.bytes_in == 12


# --- stream mode ------------------------------------------------------------


async def test_stream_mode_echoes_every_chunk_at_once() -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, Config(mode=Mode.STREAM))
        await client.send_all(b"no newline needed")
        assert await receive_exactly(client, 17) == b"no newline needed"
        await client.send_all(b"\x00\x01")
        assert await receive_exactly(client, 2) == b"\x00\x01"
        await client.send_eof()
        assert await receive_until_eof(client) == b""
    assert handler.stats is not None
    assert handler.stats.reason is CloseReason.EOF
    assert handler.stats.bytes_out == 19


async def test_stream_mode_read_timeout_is_an_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    start_time = trio.current_time()
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, Config(mode=Mode.STREAM, read_timeout=10))
        for _ in range(3):
            await trio.sleep(9)
            await client.send_all(b"tick")
            assert await receive_exactly(client, 4) == b"tick"
        assert await receive_until_eof(client) == b""
    assert handler.stats is not None
    assert handler.stats.reason is CloseReason.READ_TIMEOUT
    assert handler.ended_at == pytest.approx(start_time + 27 + 10)


async def test_stream_mode_has_a_write_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, Config(mode=Mode.STREAM, write_timeout=3))
        await client.send_all(b"unread")
    assert handler.stats is not None
    assert handler.stats.reason is CloseReason.WRITE_TIMEOUT


async def test_stream_mode_stops_gracefully(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        handler = start(nursery, server, Config(mode=Mode.STREAM))
        await client.send_all(b"abc")
        assert await receive_exactly(client, 3) == b"abc"
        await trio.testing.wait_all_tasks_blocked()
        handler.connection.stop()
        assert await receive_until_eof(client) == b""
    assert handler.stats is not None
    assert handler.stats.reason is CloseReason.SHUTDOWN
