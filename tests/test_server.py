"""The server end to end, in-process: ``nursery.start(serve, config)``.

Two kinds of listener. Tests about addresses, the backlog and the kernel's
TCP run on loopback TCP with the real clock, under ``trio.fail_after`` so a
hang fails instead of stalling the suite. Tests about deadlines, the shutdown
grace and abusive clients serve an ``AF_UNIX`` listener (`unix_server`) under
``MockClock(autojump_threshold=0)``: the same accept loop, handler and
`EchoSocketStream`, but ``AF_UNIX`` delivers inside ``send()``, so the clock
can only jump once the kernel has nothing left to deliver, and every time
asserted is exact.
"""

from __future__ import annotations

import errno
import itertools
import math
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager, suppress
from functools import partial
from typing import Any, cast

import pytest
import trio
import trio.testing

from echosvc import BindError, CloseReason, Config, Server, serve
from echosvc import server as server_module

from .support import Logs, captured_logs, receive_exactly, receive_until_eof, round_trip

TIME_LIMIT = 15


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[Server]:
    """A server for the duration of the block, shut down gracefully after it."""
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, config)
        try:
            yield server
        finally:
            server.shutdown()


async def connect(server: Server, host: str = "127.0.0.1") -> trio.SocketStream:
    if server.listeners[0].socket.family == socket.AF_UNIX:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(server.listeners[0].socket.getsockname())
        return trio.SocketStream(sock)
    return await trio.open_tcp_stream(host, server.port)


_unix_names = itertools.count()


@asynccontextmanager
async def unix_server(config: Config) -> AsyncIterator[Server]:
    """A server on an abstract ``AF_UNIX`` listener, for mock-clock tests."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(f"\0echosvc-test-{os.getpid()}-{next(_unix_names)}")
    sock.listen()
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(serve, config, listeners=[trio.SocketListener(sock)])
        )
        try:
            yield server
        finally:
            server.shutdown()


def closed_events(logs: Logs) -> list[MutableMapping[str, Any]]:
    return logs.events("connection_closed")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- the basics -------------------------------------------------------------


async def test_serve_returns_a_handle_once_listening_and_echoes() -> None:
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        async with running(Config(port=0)) as server:
            assert server.addresses == [f"127.0.0.1:{server.port}"]
            async with await connect(server) as client:
                await round_trip(client, b"hello\n")
                await round_trip(client, b"a\nb\nc\n")
                assert server.statistics().active == 1
            await logs.wait_for("connection_closed")
            await trio.testing.wait_all_tasks_blocked()
            stats = server.statistics()
            assert (stats.active, stats.served, stats.accepting) == (0, 1, True)
        assert not server.statistics().accepting
    [closed] = closed_events(logs)
    assert closed["peer"].startswith("127.0.0.1:")
    assert closed["reason"] == "eof"
    assert closed["lines"] == 4


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no ::1")
async def test_every_host_gets_the_same_port_even_with_port_zero() -> None:
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        async with running(Config(hosts=("127.0.0.1", "::1"), port=0)) as server:
            port = server.port
            assert server.addresses == [f"127.0.0.1:{port}", f"[::1]:{port}"]
            for host in ("127.0.0.1", "::1"):
                async with await connect(server, host) as client:
                    await round_trip(client, host.encode() + b"\n")
            await logs.wait_for("connection_closed", 2)
    assert closed_events(logs)[1]["peer"].startswith("[::1]:")


async def test_a_port_in_use_is_a_bind_error_naming_the_address() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with running(Config(port=0)) as server, trio.open_nursery() as nursery:
            with pytest.raises(BindError, match=rf"127\.0\.0\.1:{server.port}: Address already"):
                await nursery.start(serve, Config(port=server.port))


async def test_an_unresolvable_host_is_a_bind_error() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            with pytest.raises(BindError, match="cannot resolve host"):
                await nursery.start(serve, Config(hosts=("no-such-host.invalid",), port=0))


async def test_two_servers_in_one_process_share_nothing() -> None:
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        async with running(Config(port=0)) as one, running(Config(port=0)) as two:
            async with await connect(one) as a, await connect(one) as b:
                await round_trip(a, b"x\n")
                await round_trip(b, b"y\n")
                assert one.statistics().active == 2
                assert two.statistics().active == 0
            async with await connect(two) as c:
                await round_trip(c, b"z\n")
            await logs.wait_for("connection_closed", 3)
            await trio.testing.wait_all_tasks_blocked()
            assert (one.statistics().served, two.statistics().served) == (2, 1)
    ids = sorted(e["conn_id"] for e in closed_events(logs))
    assert ids == [1, 1, 2]  # each server numbers its own connections


async def test_a_peer_that_resets_is_logged_as_reset_with_its_address() -> None:
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        async with running(Config(port=0)) as server:
            client = await connect(server)
            local = client.socket.getsockname()
            await client.send_all(b"half a li")
            await trio.sleep(0.1)  # the bytes reach the server before the reset
            # SO_LINGER 0: close() sends RST instead of FIN.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await client.aclose()
            await logs.wait_for("connection_closed")
    [closed] = closed_events(logs)
    assert closed["reason"] == "reset"
    assert closed["peer"] == f"{local[0]}:{local[1]}"
    assert closed["bytes_in"] == 9
    assert closed["bytes_out"] == 0


async def test_a_chatty_client_outlives_many_read_timeouts_and_an_idle_one_does_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Each line gets read_timeout from the previous echo, on the fast socket path."""
    with captured_logs() as logs:
        async with (
            unix_server(Config(read_timeout=0.4)) as server,
            await connect(server) as client,
        ):
            started = trio.current_time()
            for i in range(8):  # 1.6 s in all, four read timeouts' worth
                await trio.sleep(0.2)
                await round_trip(client, b"%d\n" % i)
            assert await receive_until_eof(client) == b""
    [closed] = closed_events(logs)
    assert closed["reason"] == "read_timeout"
    assert closed["lines"] == 8
    # Exactly one read timeout after the last echo (the clock only jumps).
    assert closed["duration_s"] == pytest.approx(8 * 0.2 + 0.4)
    assert trio.current_time() >= started + 2.0


async def test_statistics_carry_the_running_totals(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """What a metrics endpoint exposes: accepted, closed by reason (every
    reason from 0), lines and bytes, and the durations."""
    async with unix_server(Config(read_timeout=5, max_line_bytes=8)) as server:
        before = server.statistics()
        assert set(before.closed) == {reason.value for reason in CloseReason}
        assert set(before.closed.values()) == {0}
        assert before.duration.buckets[-1] == (math.inf, 0)
        async with await connect(server) as client:
            await round_trip(client, b"one\ntwo\n")
        idle = await connect(server)
        async with await connect(server) as long:
            await long.send_all(b"far too long\n")
            assert await receive_until_eof(long) == b""
        assert await receive_until_eof(idle) == b""  # cut at 5 s
        await idle.aclose()
        await trio.testing.wait_all_tasks_blocked()
        stats = server.statistics()
    assert stats.accepted == 3
    assert stats.served == 3
    assert {k: v for k, v in stats.closed.items() if v} == {
        "eof": 1,
        "line_too_long": 1,
        "read_timeout": 1,
    }
    assert (stats.lines, stats.bytes_in, stats.bytes_out) == (2, 8 + 13, 8)
    assert stats.duration.count == 3
    assert stats.duration.sum_s == pytest.approx(5, abs=0.01)
    buckets = dict(stats.duration.buckets)
    assert buckets[0.001] == 2  # the two that closed at once
    assert buckets[1.0] == 2
    assert buckets[5.0] == buckets[math.inf] == 3
    with pytest.raises(TypeError):
        stats.closed["eof"] = 0  # type: ignore[index]  # a frozen snapshot


# --- abusive clients do not disturb the others ------------------------------


async def trickle(client: trio.SocketStream) -> None:
    """Slowloris: a byte every 50 ms, never a newline."""
    for _ in range(200):
        await client.send_all(b"x")
        await trio.sleep(0.05)


async def never_read(client: trio.SocketStream) -> None:
    """Sends line after line and never reads an echo."""
    for _ in range(40000):
        await client.send_all(b"z" * 1023 + b"\n")


async def huge_line(client: trio.SocketStream) -> None:
    """One line that never ends."""
    for _ in range(400):
        await client.send_all(b"h" * 65536)


ABUSERS: dict[str, tuple[Callable[[trio.SocketStream], Awaitable[None]], str, float | None]] = {
    # what it does, the reason it is cut off with, and when (None: at once)
    "trickler": (trickle, "read_timeout", 0.5),
    "never-reader": (never_read, "write_timeout", None),
    "huge-line": (huge_line, "line_too_long", 0.0),
}


@pytest.mark.parametrize("abuser", ABUSERS)
async def test_an_abusive_client_is_cut_off_while_others_are_served(
    autojump_clock: trio.testing.MockClock, abuser: str
) -> None:
    behave, expected_reason, after = ABUSERS[abuser]
    config = Config(read_timeout=0.5, write_timeout=0.5, max_line_bytes=4096)
    with captured_logs() as logs:
        async with unix_server(config) as server:
            async with await connect(server) as bad, await connect(server) as good:

                async def abuse() -> None:
                    # The server hanging up on us is the point.
                    with suppress(trio.BrokenResourceError):
                        await behave(bad)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(abuse)
                    # A well-behaved client keeps being served meanwhile,
                    # each line well inside its own read deadline.
                    for i in range(30):
                        await round_trip(good, b"line %d\n" % i)
                        await trio.sleep(0.03)
                    await logs.wait_for("connection_closed")
                    nursery.cancel_scope.cancel()
                await round_trip(good, b"still here\n")
            await logs.wait_for("connection_closed", 2)
    first, second = closed_events(logs)
    assert first["reason"] == expected_reason
    if after is not None:
        assert first["duration_s"] == pytest.approx(after)
    else:  # the write deadline: 0.5 s after the echo that stuck began
        assert 0.5 <= first["duration_s"] < 1.0
    assert second["reason"] == "eof"
    assert second["lines"] == 31


async def test_at_max_connections_new_clients_wait_in_the_backlog() -> None:
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        async with running(Config(port=0, max_connections=2)) as server:
            first, second = await connect(server), await connect(server)
            await round_trip(first, b"1\n")
            await round_trip(second, b"2\n")
            # The kernel completes these handshakes, but nobody accepts them.
            third, fourth = await connect(server), await connect(server)
            await third.send_all(b"3\n")
            await fourth.send_all(b"4\n")
            with trio.move_on_after(0.3) as waited:
                await third.receive_some()
            assert waited.cancelled_caught, "served beyond max_connections"
            assert server.statistics().active == 2
            # The flood does not disturb those already being served.
            await round_trip(first, b"still 1\n")
            await round_trip(second, b"still 2\n")
            await first.aclose()
            assert await receive_exactly(third, 2) == b"3\n"
            await second.aclose()
            assert await receive_exactly(fourth, 2) == b"4\n"
            await third.aclose()
            await fourth.aclose()
            await logs.wait_for("connection_closed", 4)
    reached = logs.events("capacity_reached")
    assert len(reached) == 1, "logged once per episode"
    assert (reached[0]["active"], reached[0]["limit"]) == (2, 2)
    assert reached[0]["log_level"] == "warning"


async def test_a_quiet_listener_does_not_starve_a_busy_one_at_the_limit() -> None:
    """The capacity token is taken after the socket is readable, not before."""
    if not has_ipv6_loopback():
        pytest.skip("this machine has no ::1")
    with trio.fail_after(TIME_LIMIT):
        async with running(Config(hosts=("127.0.0.1", "::1"), port=0, max_connections=1)) as s:
            for _ in range(3):
                async with await connect(s, "::1") as client:
                    await round_trip(client, b"v6\n")


class FlakyListener:
    """A real listener whose accepts fail with ``errors`` first.

    The server accepts through `echosvc.server._nonblocking_accept`; `open`
    wraps it for this listener only, so the server waits on the real
    descriptor and meets the errors where a real shortage would raise them.
    """

    def __init__(self, sock: trio.socket.SocketType, errors: list[int]) -> None:
        self.socket = sock
        self.errors = errors

    @classmethod
    async def open(cls, errors: list[int], monkeypatch: pytest.MonkeyPatch) -> FlakyListener:
        sock = trio.socket.socket()
        await sock.bind(("127.0.0.1", 0))
        sock.listen()
        listener = cls(sock, errors)
        real = server_module._nonblocking_accept

        @contextmanager
        def flaky(
            lsock: trio.socket.SocketType,
        ) -> Iterator[Callable[[], tuple[socket.socket, Any]]]:
            with real(lsock) as accept:
                if lsock is not sock:
                    yield accept
                    return

                def accept_or_fail() -> tuple[socket.socket, Any]:
                    if listener.errors:
                        code = listener.errors.pop(0)
                        raise OSError(code, os.strerror(code))
                    return accept()

                yield accept_or_fail

        monkeypatch.setattr(server_module, "_nonblocking_accept", flaky)
        return listener


async def test_running_out_of_file_descriptors_pauses_accepting_then_resumes(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The accept loop backs off from 5 ms, doubling to 1 s, logs the episode
    once, and serves the queued connection after it."""
    listener = await FlakyListener.open([errno.EMFILE] * 9 + [errno.ENFILE] * 2, monkeypatch)
    with captured_logs() as logs:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(
                partial(serve, Config(), listeners=[cast(trio.SocketListener, listener)])
            )
            client = trio.socket.socket()
            await client.connect(listener.socket.getsockname())  # queued, not yet accepted
            started = trio.current_time()
            stream = trio.SocketStream(client)
            await round_trip(stream, b"served after all\n")
            waited = trio.current_time() - started
            await stream.aclose()
            await logs.wait_for("connection_closed")
            server.shutdown()
    [paused] = logs.events("accept_paused")
    assert (paused["error"], paused["retry_in_s"]) == ("EMFILE", 0.005)
    [resumed] = logs.events("accept_resumed")
    assert resumed["failures"] == 11
    # 5 + 10 + 20 + ... + 640 ms, then 1 s four times: the backoff, not a spin.
    backoff = sum(min(0.005 * 2**i, 1.0) for i in range(11))
    assert resumed["paused_s"] == pytest.approx(backoff)
    assert waited == pytest.approx(backoff)
    assert server.statistics().accept_failures == 11


async def test_an_unexpected_accept_error_propagates_and_stops_the_server(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EINVAL is no shortage to wait out: serve() raises instead of spinning."""
    listener = await FlakyListener.open([errno.ECONNABORTED, errno.EINVAL], monkeypatch)
    einval = pytest.RaisesExc(OSError, check=lambda exc: exc.errno == errno.EINVAL)
    with pytest.RaisesGroup(einval, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(serve, Config(), listeners=[cast(trio.SocketListener, listener)])
            )
            client = trio.socket.socket()
            await client.connect(listener.socket.getsockname())
            await trio.sleep_forever()
    assert listener.errors == [], "the ignorable error was skipped, then EINVAL raised"


# --- shutdown ---------------------------------------------------------------


async def test_graceful_shutdown_closes_listeners_and_drains_connections() -> None:
    config = Config(port=0, shutdown_grace=5)
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(serve, config)
            port = server.port
            idle = await connect(server)
            await idle.send_all(b"complete\nunfinished")
            assert await receive_exactly(idle, 9) == b"complete\n"
            await trio.sleep(0.05)  # the rest has reached the server
            server.shutdown()
            server.shutdown()  # idempotent
            # Waiting for input: what was received is echoed, then closed.
            assert await receive_until_eof(idle) == b"unfinished"
            await idle.aclose()  # hang up, as a client does at EOF
            with pytest.raises(OSError, match="connect"):
                await trio.open_tcp_stream("127.0.0.1", port)
        # serve() returned: the nursery could exit.
    [closed] = closed_events(logs)
    assert closed["reason"] == "shutdown"
    assert closed["bytes_out"] == closed["bytes_in"] == 19
    assert closed["lines"] == 2


async def fill_until_stuck(client: trio.SocketStream) -> None:
    """Send lines and never read, until both socket buffers are full."""
    with trio.move_on_after(0.5):
        await never_read(client)


async def test_an_echo_in_flight_is_cut_when_the_grace_runs_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with captured_logs() as logs:
        async with unix_server(Config(shutdown_grace=3, write_timeout=30)) as server:
            stuck = await connect(server)
            await fill_until_stuck(stuck)
            started = trio.current_time()
            server.shutdown()
        took = trio.current_time() - started
        await stuck.aclose()
    assert took == pytest.approx(3)
    [closed] = closed_events(logs)
    assert closed["reason"] == "shutdown"


async def test_the_write_deadline_still_names_the_reason_during_the_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with captured_logs() as logs:
        async with unix_server(Config(shutdown_grace=10, write_timeout=2)) as server:
            stuck = await connect(server)
            await fill_until_stuck(stuck)  # the echo that stuck began at once
            started = trio.current_time()
            server.shutdown()
        took = trio.current_time() - started
        await stuck.aclose()
    assert took == pytest.approx(2 - 0.5)  # the write deadline, not the grace
    [closed] = closed_events(logs)
    assert closed["reason"] == "write_timeout"


async def test_zero_grace_cancels_at_once(autojump_clock: trio.testing.MockClock) -> None:
    with captured_logs() as logs:
        async with unix_server(Config(shutdown_grace=0)) as server:
            client = await connect(server)
            await round_trip(client, b"hi\n")
            started = trio.current_time()
            server.shutdown()
        assert trio.current_time() == started
        assert await receive_until_eof(client) == b""
        await client.aclose()
    [closed] = closed_events(logs)
    assert closed["reason"] == "shutdown"


async def test_a_shutdown_in_any_pass_after_data_arrives_echoes_all_of_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Server.shutdown (Connection.stop for each) in the pass that delivers a
    line, or any pass after, until the handler is parked again."""
    for k in range(40):
        with captured_logs() as logs:
            async with unix_server(Config()) as server:
                client = await connect(server)
                await round_trip(client, b"warm\n")
                await trio.testing.wait_all_tasks_blocked()
                # Synchronous, so it lands in this pass: in the server's queue now.
                os.write(client.socket.fileno(), b"a line\nand half")
                for _ in range(k):
                    await trio.lowlevel.checkpoint()
                server.shutdown()
                assert await receive_until_eof(client) == b"a line\nand half", f"k={k}"
                await client.aclose()
        [closed] = closed_events(logs)
        assert (closed["reason"], closed["lines"]) == ("shutdown", 3), f"k={k}"


async def test_cancelling_the_callers_scope_stops_everything_and_leaks_nothing() -> None:
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        clients = []
        baseline = open_fds()
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                server: Server = await nursery.start(serve, Config(port=0, shutdown_grace=60))
                for i in range(20):
                    client = await connect(server)
                    await round_trip(client, b"%d\n" % i)
                    clients.append(client)
                assert open_fds() == baseline + 1 + 1 + 2 * 20  # the listener, the netpoller
                scope.cancel()
        for client in clients:
            assert await receive_until_eof(client) == b""
            await client.aclose()
    assert open_fds() <= baseline
    assert len(closed_events(logs)) == 20
    assert {e["reason"] for e in closed_events(logs)} == {"shutdown"}


async def close_at_eof(sock: trio.socket.SocketType) -> None:
    with sock, suppress(OSError):  # never accepted: reset when the listener closes
        while await sock.recv(4096):
            pass


async def test_shutdown_at_any_moment_of_an_accept_leaves_nothing_open() -> None:
    """Shutdown may land between accept() and the handler's first step; whatever
    was accepted is still closed with reason shutdown, and serve returns."""
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        for steps in range(12):
            async with trio.open_nursery() as nursery:
                server: Server = await nursery.start(serve, Config(port=0))
                client = trio.socket.socket()
                await client.connect(("127.0.0.1", server.port))
                # Like any client, it hangs up when the server does.
                nursery.start_soon(close_at_eof, client)
                for _ in range(steps):
                    await trio.lowlevel.cancel_shielded_checkpoint()
                server.shutdown()
    opened = [e["conn_id"] for e in logs.events("connection_opened")]
    closed = closed_events(logs)
    assert opened, "no accept happened at all: the test is not exercising anything"
    assert len(closed) == len(opened)
    assert {e["reason"] for e in closed} == {"shutdown"}
