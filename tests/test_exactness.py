"""Exactness: a stop, a deadline and arriving data, landing in any scheduler pass.

DESIGN.md's "Exactness": the reason a connection closes is the cause that
came first in time, a line that arrived before its read deadline is echoed,
and a stop never cuts an echo. Trio delivers I/O and expired deadlines in the
same scheduler pass, and a cancel can be requested while a task is runnable
but has not run yet -- interleavings a test that settles
(`trio.testing.wait_all_tasks_blocked`) after every step never produces. So
these tests deliver data synchronously, let ``k`` scheduler passes go by, and
then stop the connection or let a deadline expire, for every ``k`` from 0
until the handler is parked again.

Everything runs on ``MockClock(autojump_threshold=0)``, with the time moved by
hand (`MockClock.jump`) where a deadline must expire in a chosen pass. The
same sweeps run on memory streams (the generic path: every echo through
``send_all``) and on the server's own `EchoSocketStream` over an ``AF_UNIX``
socket pair, which delivers inside ``send()``, so the kernel's part is
deterministic too (the fast path: ``send_nowait``, a lagging wait scope, and
the drain of what the kernel holds when a stop is handled).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.testing

from echosvc import CloseReason, Config, Connection, ConnectionStats, handle_stream
from echosvc.netpoll import Netpoller
from echosvc.socketstream import EchoSocketStream

from .support import MemoryPeer, captured_logs

# Far more passes than any handler needs between waking up and parking again.
K_MAX = 60


@attrs.define
class Handler:
    connection: Connection
    stats: ConnectionStats | None = None
    ended_at: float | None = None


def start(nursery: trio.Nursery, stream: trio.abc.Stream, config: Config) -> Handler:
    handler = Handler(Connection(stream, config))

    async def run() -> None:
        started = trio.current_time()
        handler.stats = await handler.connection.run()
        handler.ended_at = started + handler.stats.duration_s

    nursery.start_soon(run)
    return handler


async def let_passes(k: int) -> bool:
    """Let ``k`` scheduler passes go by; return True if by then every other task
    was parked (nothing runnable in the last two passes: a task still in the
    current batch would be runnable in the next)."""
    quiet = 0
    for _ in range(k):
        await trio.lowlevel.checkpoint()
        quiet = quiet + 1 if trio.lowlevel.current_statistics().tasks_runnable == 0 else 0
    return quiet >= 2


async def sweep(case: Callable[[int], Awaitable[bool]]) -> int:
    """Run ``case(k)`` for k = 0, 1, ... until it reports the handler parked."""
    for k in range(K_MAX):
        if await case(k):
            return k
    pytest.fail(f"the handler was still busy after {K_MAX} passes: widen K_MAX")


# --- the server's own socket stream, deterministically ---------------------------


class SocketClient:
    """The client's end of an ``AF_UNIX`` socket pair: synchronous sends, a
    reader task, and a small receive buffer so that big echoes need it."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.received = bytearray()
        self.echo_times: list[float] = []
        self.closed_by_server = False

    def send(self, data: bytes) -> None:
        # AF_UNIX delivers inside send(): the data is in the server's queue now.
        assert self.sock.send(data) == len(data), "keep test data within the buffer"

    async def read_until_eof(self) -> None:
        for _ in range(100_000):
            await trio.lowlevel.wait_readable(self.sock)
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed_by_server = True
                return
            self.received += chunk
            self.echo_times.append(trio.current_time())
        raise AssertionError("the server never closed")


# Both ways the server's own stream can wait: through Trio's I/O manager, and
# through the edge-triggered netpoller (echosvc.netpoll).
WAITS = pytest.mark.parametrize("netpoll", [False, True], ids=["trio-waits", "netpoll"])


@asynccontextmanager
async def socket_connection(
    config: Config, *, netpoll: bool, sndbuf: int | None = None
) -> AsyncIterator[tuple[Handler, SocketClient]]:
    """A `Connection` on an `EchoSocketStream`, with a reader on the other end."""
    server_sock, client_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if sndbuf is not None:  # a small send buffer puts big echoes on the slow path
        server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    client = SocketClient(client_sock)
    with client_sock:
        async with trio.open_nursery() as system:
            poller = Netpoller(adapt=False) if netpoll else None  # always polling
            if poller is not None:
                system.start_soon(poller.run)
            async with trio.open_nursery() as nursery:
                handler = start(nursery, EchoSocketStream(server_sock, poller), config)
                nursery.start_soon(client.read_until_eof)
                await trio.testing.wait_all_tasks_blocked()
                yield handler, client
                # The server lingers until we hang up after its EOF; we never do.
            if poller is not None:
                assert poller.registered == 0, "the registration outlived its socket"
            system.cancel_scope.cancel()


# --- a stop in any pass after data arrives ----------------------------------------

DATA = [b"hello\n", b"hello\nwor", b"wor", b"a\nb\nc\n"]


@pytest.mark.parametrize("data", DATA)
async def test_memory_a_stop_in_any_pass_after_data_arrives_echoes_all_of_it(
    autojump_clock: trio.testing.MockClock, data: bytes
) -> None:
    async def case(k: int) -> bool:
        peer = MemoryPeer()
        async with trio.open_nursery() as nursery:
            handler = start(nursery, peer.server_stream(), Config())
            await trio.testing.wait_all_tasks_blocked()
            peer.send(data)
            parked = await let_passes(k)
            handler.connection.stop()
        assert handler.stats is not None
        assert (peer.echo(), handler.stats.reason) == (data, CloseReason.SHUTDOWN), f"k={k}"
        assert handler.stats.bytes_out == handler.stats.bytes_in == len(data)
        assert handler.stats.lines == data.count(b"\n") + (not data.endswith(b"\n"))
        return parked

    await sweep(case)


async def test_memory_a_stop_during_a_slow_echo_lets_it_finish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The first reproduction of the exactness issue: the stop lands while the
    handler is entering a send that has to wait for the client to read."""
    line = b"x" * 4000 + b"\n"

    async def case(k: int) -> bool:
        peer = MemoryPeer(capacity=16)

        async def read_slowly() -> None:
            for _ in range(10_000):
                await trio.sleep(0.01)
                peer.take(256)
                if peer.closed_by_server and not peer.inbox:
                    return

        async with trio.open_nursery() as nursery:
            handler = start(nursery, peer.server_stream(), Config(write_timeout=30))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(read_slowly)
            peer.send(line)
            parked = await let_passes(k)
            handler.connection.stop()
        assert handler.stats is not None
        assert handler.stats.reason is CloseReason.SHUTDOWN, f"k={k}"
        assert bytes(peer.received) == line, f"k={k}"
        return parked

    await sweep(case)


@pytest.mark.parametrize("data", DATA)
@WAITS
async def test_socket_a_stop_in_any_pass_after_data_arrives_echoes_all_of_it(
    netpoll: bool, autojump_clock: trio.testing.MockClock, data: bytes
) -> None:
    async def case(k: int) -> bool:
        async with socket_connection(Config(), netpoll=netpoll) as (handler, client):
            client.send(data)
            parked = await let_passes(k)
            handler.connection.stop()
            client.sock.shutdown(socket.SHUT_WR)  # so the linger ends
        assert handler.stats is not None
        assert (bytes(client.received), handler.stats.reason) == (data, CloseReason.SHUTDOWN), (
            f"k={k}"
        )
        assert handler.stats.bytes_out == len(data)
        return parked

    await sweep(case)


@WAITS
async def test_socket_a_stop_during_a_slow_echo_lets_it_finish(
    netpoll: bool,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The same on the fast path: the kernel takes part of a 48 KiB echo at once,
    the rest waits for the client, and the stop lands anywhere in between."""
    line = b"y" * (48 * 1024 - 1) + b"\n"

    async def case(k: int) -> bool:
        async with socket_connection(Config(), netpoll=netpoll, sndbuf=4096) as (handler, client):
            client.send(line)
            parked = await let_passes(k)
            handler.connection.stop()
            client.sock.shutdown(socket.SHUT_WR)
        assert handler.stats is not None
        assert handler.stats.reason is CloseReason.SHUTDOWN, f"k={k}"
        assert bytes(client.received) == line, f"k={k}"
        return parked

    await sweep(case)


# --- a deadline expiring in any pass after data arrives ----------------------------


async def arrive_just_in_time(
    clock: trio.testing.MockClock, deadline: float, send: Callable[[], object], k: int
) -> bool:
    """Deliver data 1 s before ``deadline``, let ``k`` passes go by, then move
    the clock to the deadline: it expires in the next pass."""
    await trio.sleep_until(deadline - 1)
    send()
    parked = await let_passes(k)
    clock.jump(deadline - trio.current_time())
    return parked


@pytest.mark.parametrize(
    ("read_timeout", "write_timeout"), [(10, 30), (300, 30), (30, 30), (10, 0)]
)
async def test_memory_a_line_that_arrived_before_its_deadline_is_echoed(
    autojump_clock: trio.testing.MockClock, read_timeout: float, write_timeout: float
) -> None:
    """However late the handler runs: the line is echoed and the next line gets
    a full read deadline from that echo."""
    config = Config(read_timeout=read_timeout, write_timeout=write_timeout)

    async def case(k: int) -> bool:
        peer = MemoryPeer()
        async with trio.open_nursery() as nursery:
            handler = start(nursery, peer.server_stream(), config)
            await trio.testing.wait_all_tasks_blocked()
            t0 = trio.current_time()
            # An echo first, so an earlier echo's deadlines exist to get wrong.
            peer.send(b"first\n")
            await trio.testing.wait_all_tasks_blocked()
            parked = await arrive_just_in_time(
                autojump_clock, t0 + read_timeout, lambda: peer.send(b"just in time\n"), k
            )
        assert handler.stats is not None
        assert peer.echo() == b"first\njust in time\n", f"k={k}"
        assert handler.stats.reason is CloseReason.READ_TIMEOUT
        assert handler.ended_at == pytest.approx(peer.echo_times[-1] + read_timeout), f"k={k}"
        return parked

    await sweep(case)


async def test_memory_an_unfinished_line_at_its_deadline_is_cut_without_echo(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def case(k: int) -> bool:
        peer = MemoryPeer()
        async with trio.open_nursery() as nursery:
            handler = start(nursery, peer.server_stream(), Config(read_timeout=10))
            await trio.testing.wait_all_tasks_blocked()
            t0 = trio.current_time()
            parked = await arrive_just_in_time(
                autojump_clock, t0 + 10, lambda: peer.send(b"no newline yet"), k
            )
        assert handler.stats is not None
        assert (handler.stats.reason, peer.echo()) == (CloseReason.READ_TIMEOUT, b""), f"k={k}"
        assert handler.ended_at == pytest.approx(t0 + 10)
        assert handler.stats.bytes_in == 14
        return parked

    await sweep(case)


async def test_memory_an_earlier_echos_write_deadline_never_closes_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A slow echo ends at 5 s; its write deadline (30 s after it began) passes
    while the next line arrives: that line is echoed."""

    async def case(k: int) -> bool:
        peer = MemoryPeer(capacity=0)
        async with trio.open_nursery() as nursery:
            handler = start(nursery, peer.server_stream(), Config(read_timeout=300))
            await trio.testing.wait_all_tasks_blocked()
            t0 = trio.current_time()
            peer.send(b"slow\n")
            await trio.sleep(5)
            peer.take(5)  # the echo completes at 5 s
            await trio.testing.wait_all_tasks_blocked()
            peer.capacity = 10**9

            def send_next() -> None:
                peer.send(b"next\n")

            parked = await arrive_just_in_time(autojump_clock, t0 + 30, send_next, k)
            await trio.testing.wait_all_tasks_blocked()
            peer.send_eof()
        assert handler.stats is not None
        assert (peer.echo(), handler.stats.reason) == (b"slow\nnext\n", CloseReason.EOF), f"k={k}"
        return parked

    await sweep(case)


@WAITS
async def test_socket_a_line_meeting_the_lagging_scope_deadline_is_echoed(
    netpoll: bool,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The second reproduction: on the fast path the wait scope's own deadline
    lags behind the line's. A line arriving in the pass where the scope's older
    deadline fires is echoed, and the connection goes on to the real deadline."""

    async def case(k: int) -> bool:
        async with socket_connection(
            Config(read_timeout=300, write_timeout=30), netpoll=netpoll
        ) as (
            handler,
            client,
        ):
            t0 = trio.current_time()
            client.send(b"one\n")  # at 0: the scope's deadline is 300
            await trio.sleep(150)
            client.send(b"two\n")  # at 150: the line's deadline is 450, the scope's still 300
            await trio.testing.wait_all_tasks_blocked()
            parked = await arrive_just_in_time(
                autojump_clock, t0 + 300, lambda: client.send(b"three\n"), k
            )
            await trio.testing.wait_all_tasks_blocked()
        assert handler.stats is not None
        assert bytes(client.received) == b"one\ntwo\nthree\n", f"k={k}"
        assert handler.stats.reason is CloseReason.READ_TIMEOUT
        # The echo left between the line's arrival (299 s) and the first
        # pass after the jump (300 s); the next deadline runs from it.
        assert handler.ended_at is not None
        assert t0 + 299 + 300 <= handler.ended_at <= t0 + 300 + 300, f"k={k}"
        return parked

    await sweep(case)


@WAITS
async def test_socket_a_line_that_arrived_before_its_deadline_is_echoed(
    netpoll: bool,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def case(k: int) -> bool:
        async with socket_connection(Config(read_timeout=10), netpoll=netpoll) as (handler, client):
            t0 = trio.current_time()
            parked = await arrive_just_in_time(
                autojump_clock, t0 + 10, lambda: client.send(b"just in time\n"), k
            )
        assert handler.stats is not None
        assert bytes(client.received) == b"just in time\n", f"k={k}"
        assert handler.stats.reason is CloseReason.READ_TIMEOUT
        assert handler.ended_at is not None
        assert t0 + 9 + 10 <= handler.ended_at <= t0 + 10 + 10, f"k={k}"
        return parked

    await sweep(case)


# --- a stop and a deadline: the earlier names the reason -----------------------------


async def test_a_deadline_that_expired_before_the_stop_names_the_reason(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The deadline fires, and a stop follows before (or after) the handler has
    run: read_timeout, and the unfinished line is not echoed."""
    for k in range(4):
        peer = MemoryPeer()
        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            handler = start(nursery, peer.server_stream(), Config(read_timeout=10))
            peer.send(b"partial")
            await trio.sleep_until(t0 + 9)
            autojump_clock.jump(1)
            await let_passes(k)
            handler.connection.stop()
        assert handler.stats is not None
        assert (handler.stats.reason, peer.echo()) == (CloseReason.READ_TIMEOUT, b""), f"k={k}"
        assert handler.ended_at == pytest.approx(t0 + 10)


async def test_a_stop_before_the_deadline_names_the_reason_though_both_are_seen_together(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peer = MemoryPeer()
    async with trio.open_nursery() as nursery:
        handler = start(nursery, peer.server_stream(), Config(read_timeout=10))
        peer.send(b"partial")
        await trio.sleep_until(9)
        handler.connection.stop()  # the handler will only run after the deadline
        autojump_clock.jump(1)
    assert handler.stats is not None
    assert (handler.stats.reason, peer.echo()) == (CloseReason.SHUTDOWN, b"partial")


async def test_the_write_deadline_and_the_shutdown_grace_tie_goes_to_the_caller(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An echo stuck at its write deadline when the caller's grace ends at the
    same moment: the caller's cancellation propagates and is logged shutdown."""
    peer = MemoryPeer(capacity=0)
    with trio.move_on_after(30) as grace:
        async with trio.open_nursery() as nursery:
            handler = start(nursery, peer.server_stream(), Config(write_timeout=30))
            peer.send(b"never read\n")
            await trio.sleep_forever()  # until the grace ends, with the write deadline
    assert grace.cancelled_caught
    assert handler.stats is None  # run() raised Cancelled
    assert handler.connection.stats is not None
    assert handler.connection.stats.reason is CloseReason.SHUTDOWN


# --- closing never raises ----------------------------------------------------------


class CloseFails(trio.abc.HalfCloseableStream):
    """Echoes through a memory stream; its polite close fails as configured."""

    def __init__(
        self,
        inner: trio.StapledStream[trio.abc.SendStream, trio.abc.ReceiveStream],
        error: Exception,
    ) -> None:
        self.inner = inner
        self.error = error

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        raise self.error


@pytest.mark.parametrize(
    "error",
    [trio.BrokenResourceError("handshake broke"), RuntimeError("a bug in a wrapper")],
    ids=["broken", "bug"],
)
async def test_an_error_from_the_polite_close_is_contained(error: Exception) -> None:
    """The third reproduction: an exception from aclose() must not escape (a
    `trio.SSLStream` raises BrokenResourceError there when the close_notify or
    the handshake it must finish first breaks). In ``trio.serve_listeners(
    partial(handle_stream, config=...))`` it would have killed the server."""
    peer = MemoryPeer()
    peer.send(b"bye\n")
    peer.send_eof()
    with captured_logs() as logs:
        stats = await handle_stream(CloseFails(peer.server_stream(), error), Config())
    assert stats.reason is CloseReason.EOF  # what came first, not the close
    assert peer.echo() == b"bye\n"
    [closed] = logs.events("connection_closed")
    if isinstance(error, trio.BrokenResourceError):
        assert closed["log_level"] == "info"
    else:
        assert closed["log_level"] == "error"
        assert closed["exc_info"] is error
