"""The server end to end, in-process: ``nursery.start(serve, config)`` on loopback.

Real sockets and the real clock; every test runs under ``trio.fail_after`` so
a hang fails instead of stalling the suite. Deadlines here are short real
ones: on real sockets the autojump clock would jump while the kernel is still
delivering bytes.
"""

from __future__ import annotations

import os
import resource
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager, suppress
from typing import Any

import pytest
import trio
import trio.testing

from echosvc import BindError, Config, Server, serve

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
    return await trio.open_tcp_stream(host, server.port)


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


async def test_a_chatty_client_outlives_many_read_timeouts_and_an_idle_one_does_not() -> None:
    """Each line gets read_timeout from the previous echo, on the fast socket path."""
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        async with (
            running(Config(port=0, read_timeout=0.4)) as server,
            await connect(server) as client,
        ):
            for i in range(8):  # 1.6 s in all, four read timeouts' worth
                await trio.sleep(0.2)
                await round_trip(client, b"%d\n" % i)
            last_echo = trio.current_time()
            assert await receive_until_eof(client) == b""
            closed_after = trio.current_time() - last_echo
    [closed] = closed_events(logs)
    assert closed["reason"] == "read_timeout"
    assert closed["lines"] == 8
    assert 0.35 <= closed_after < 0.8


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


ABUSERS: dict[str, tuple[Callable[[trio.SocketStream], Awaitable[None]], str]] = {
    "trickler": (trickle, "read_timeout"),
    "never-reader": (never_read, "write_timeout"),
    "huge-line": (huge_line, "line_too_long"),
}


@pytest.mark.parametrize("abuser", ABUSERS)
async def test_an_abusive_client_is_cut_off_while_others_are_served(abuser: str) -> None:
    behave, expected_reason = ABUSERS[abuser]
    config = Config(port=0, read_timeout=0.5, write_timeout=0.5, max_line_bytes=4096)
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        async with running(config) as server:
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


async def test_running_out_of_file_descriptors_pauses_accepting_then_resumes() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        async with running(Config(port=0)) as server:
            client = trio.socket.socket()
            await client.connect(("127.0.0.1", server.port))  # queued, not yet accepted
            try:
                # The kernel hands out the lowest free descriptor: below this
                # one every descriptor is taken, and the limit forbids it.
                lowest_free = os.open(os.devnull, os.O_RDONLY)
                os.close(lowest_free)
                resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
                await logs.wait_for("accept_paused")
                await trio.sleep(0.2)  # several failed retries, one log record
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            stream = trio.SocketStream(client)
            await round_trip(stream, b"served after all\n")
            await stream.aclose()
            await logs.wait_for("connection_closed")
    [paused] = logs.events("accept_paused")
    assert paused["error"] == "EMFILE"
    assert paused["retry_in_s"] == 0.005
    [resumed] = logs.events("accept_resumed")
    # 0.2 s of backoff doubling from 5 ms is a handful of retries, not a spin.
    assert 2 <= resumed["failures"] <= 8
    assert resumed["paused_s"] >= 0.2


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


async def test_an_echo_in_flight_is_cut_when_the_grace_runs_out() -> None:
    config = Config(port=0, shutdown_grace=0.3, write_timeout=30)
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(serve, config)
            stuck = await connect(server)
            with trio.move_on_after(0.5):
                await never_read(stuck)  # fills both socket buffers
            started = trio.current_time()
            server.shutdown()
        took = trio.current_time() - started
        await stuck.aclose()
    assert 0.25 <= took < 2
    [closed] = closed_events(logs)
    assert closed["reason"] == "shutdown"


async def test_the_write_deadline_still_names_the_reason_during_the_grace() -> None:
    config = Config(port=0, shutdown_grace=10, write_timeout=0.3)
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(serve, config)
            stuck = await connect(server)
            with trio.move_on_after(0.2):
                await never_read(stuck)
            started = trio.current_time()
            server.shutdown()
        took = trio.current_time() - started
        await stuck.aclose()
    assert took < 2
    [closed] = closed_events(logs)
    assert closed["reason"] == "write_timeout"


async def test_zero_grace_cancels_at_once() -> None:
    with trio.fail_after(TIME_LIMIT), captured_logs() as logs:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(serve, Config(port=0, shutdown_grace=0))
            client = await connect(server)
            await round_trip(client, b"hi\n")
            server.shutdown()
        assert await receive_until_eof(client) == b""
        await client.aclose()
    [closed] = closed_events(logs)
    assert closed["reason"] == "shutdown"


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
                assert open_fds() == baseline + 1 + 2 * 20
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
