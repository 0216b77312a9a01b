"""The netpoller: registered once, edge-triggered, and nothing lost or left behind.

The exactness sweeps (tests/test_exactness.py) and every server test already
run on the netpoller, since the server always waits through it; these test
what is particular to it, on ``AF_UNIX`` socket pairs (which deliver inside
``send()``) under the mock clock where time matters, and against the
kernel's own view of the epoll set (``/proc/self/fdinfo``).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial

import pytest
import trio
import trio.testing

import echosvc.netpoll
from echosvc import CloseReason, Config, Connection, Server, serve
from echosvc.netpoll import Netpoller
from echosvc.socketstream import EchoSocketStream

from .support import captured_logs, round_trip

TIME_LIMIT = 20


def kernel_registrations(poller: Netpoller) -> int:
    """Descriptors the kernel has in the poller's epoll set (``tfd:`` lines)."""
    with open(f"/proc/self/fdinfo/{poller._epoll.fileno()}") as info:
        return sum(line.startswith("tfd:") for line in info)


@asynccontextmanager
async def running_poller(*, adapt: bool = False) -> AsyncIterator[Netpoller]:
    """A poller in its own task; by default always polling, never direct."""
    async with trio.open_nursery() as nursery:
        poller = Netpoller(adapt=adapt)
        nursery.start_soon(poller.run)
        yield poller
        nursery.cancel_scope.cancel()


def pair(poller: Netpoller) -> tuple[EchoSocketStream, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setblocking(False)
    return EchoSocketStream(ours, poller), theirs


async def read_all(sock: socket.socket) -> bytes:
    received = bytearray()
    for _ in range(10_000):
        await trio.lowlevel.wait_readable(sock)
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(received)
        received += chunk
    raise AssertionError("never closed")


async def test_data_and_the_peers_eof_in_one_edge_are_both_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The last bytes and the FIN arrive together: one edge. A short read of
    the bytes must not count as "drained", or the EOF is never seen and the
    final unterminated line waits for the read deadline instead of its echo.
    (No complete line: an echo freeing our send buffer would make an edge of
    its own on AF_UNIX, which TCP does not, and hide the bug.)"""
    async with running_poller() as poller:
        stream, client = pair(poller)
        with client:
            async with trio.open_nursery() as nursery:
                connection = Connection(stream, Config(read_timeout=300))
                nursery.start_soon(connection.run)
                await trio.testing.wait_all_tasks_blocked()
                client.send(b"no newline")
                client.shutdown(socket.SHUT_WR)  # before the handler has run
                started = trio.current_time()
                assert await read_all(client) == b"no newline"
            assert connection.stats is not None
            assert connection.stats.reason is CloseReason.EOF
            assert trio.current_time() == started, "at once, not at the read deadline"


async def test_a_socket_closed_while_its_task_waits_wakes_it_with_closed_resource_error() -> None:
    async with running_poller() as poller:
        stream, client = pair(poller)
        with client:
            errors: list[BaseException] = []

            async def reader() -> None:
                try:
                    await stream.receive_some()
                except trio.ClosedResourceError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                stream.close()
            assert len(errors) == 1
            assert poller.registered == kernel_registrations(poller) == 0
            with pytest.raises(trio.ClosedResourceError):
                await stream.receive_some()


async def test_no_registration_outlives_its_socket_whatever_state_it_was_in(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two thousand connections, in six states, all closed: the poller's table
    and the kernel's epoll set are both empty afterwards."""
    states = ["idle", "partial", "mid-echo", "peer-eof", "peer-reset", "never-started"]
    async with running_poller() as poller:
        clients: list[socket.socket] = []
        with trio.CancelScope() as everything:
            async with trio.open_nursery() as nursery:
                for i in range(2000):
                    state = states[i % len(states)]
                    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                    clients.append(theirs)
                    if state == "mid-echo":  # an echo that cannot finish
                        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                    stream = EchoSocketStream(ours, poller)
                    if state == "never-started":
                        stream.close()
                        continue
                    nursery.start_soon(Connection(stream, Config(write_timeout=0)).run)
                    if state == "partial":
                        theirs.send(b"no newline")
                    elif state == "mid-echo":
                        theirs.send(b"m" * 60_000 + b"\n")
                    elif state == "peer-eof":
                        theirs.shutdown(socket.SHUT_WR)
                    elif state == "peer-reset":
                        theirs.close()
                await trio.testing.wait_all_tasks_blocked()
                assert poller.registered == kernel_registrations(poller) > 1000
                everything.cancel()  # the idle, partial and mid-echo ones
        for client in clients:
            client.close()
        assert poller.registered == 0
        assert kernel_registrations(poller) == 0


async def test_a_parked_task_cancelled_at_any_pass_leaves_the_registration_clean(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for k in range(12):
        async with running_poller() as poller:
            stream, client = pair(poller)
            with client, trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(Connection(stream, Config()).run)
                    await trio.testing.wait_all_tasks_blocked()
                    client.send(b"data\n")
                    for _ in range(k):
                        await trio.lowlevel.checkpoint()
                    scope.cancel()
            assert poller.registered == 0, f"k={k}"
            assert kernel_registrations(poller) == 0, f"k={k}"


class Exploded(Exception):
    pass


def break_the_poller(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Make every later `Netpoller.poll_now` raise `Exploded`; return the switch."""
    broken = False
    real = Netpoller.poll_now

    def poll_now(self: Netpoller) -> int:
        if broken and not self._epoll.closed:
            raise Exploded("the netpoller broke")
        return real(self)

    def switch() -> None:
        nonlocal broken
        broken = True

    monkeypatch.setattr(Netpoller, "poll_now", poll_now)
    return switch


async def open_parked_clients(server: Server, count: int) -> list[trio.SocketStream]:
    """Clients that have each echoed a line and whose handlers are parked."""
    clients = []
    for i in range(count):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await round_trip(stream, b"%d\n" % i)
        clients.append(stream)
    await trio.testing.wait_all_tasks_blocked()
    return clients


async def test_the_pollers_own_failure_is_the_servers_error_not_a_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The poller breaks with ten connections parked on it: the next lines
    wake it, and its error ends serve() instead of leaving them parked."""
    breaks = break_the_poller(monkeypatch)
    with trio.fail_after(TIME_LIMIT), pytest.RaisesGroup(Exploded, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(partial(serve, Config(port=0)))
            clients = await open_parked_clients(server, 10)
            breaks()
            for stream in clients:
                with suppress(trio.BrokenResourceError):  # the server may be dying
                    await stream.send_all(b"again\n")
            await trio.sleep_forever()


async def test_a_poller_failure_met_by_a_cancel_is_still_the_servers_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cancel makes a parked task's abort poll; an error there cannot be
    raised in the abort, and must not vanish when the poller itself is then
    cancelled without waking again (a shutdown)."""
    breaks = break_the_poller(monkeypatch)
    with trio.fail_after(TIME_LIMIT), pytest.RaisesGroup(Exploded, flatten_subgroups=True):
        async with running_poller() as poller:
            stream, client = pair(poller)
            with client, trio.CancelScope() as parked:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(stream.receive_some)
                    await trio.testing.wait_all_tasks_blocked()
                    assert stream._poll is not None
                    assert stream._poll.reader is not None
                    breaks()
                    parked.cancel()  # the abort polls, and meets the error
            stream.close()


async def test_a_poller_left_with_no_socket_sleeps_until_the_next_one(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Direct mode probes the set four times a second for active sockets;
    once the last one is gone there is nothing to probe, and an idle server
    should cost nothing."""
    probes = 0
    real = Netpoller.poll_now

    def counting(self: Netpoller) -> int:
        nonlocal probes
        probes += 1
        return real(self)

    monkeypatch.setattr(Netpoller, "poll_now", counting)
    async with running_poller(adapt=True) as poller:
        stream, client = pair(poller)
        with client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(Connection(stream, Config()).run)
                for i in range(300):  # 3 s of one busy connection: direct
                    client.send(b"%d\n" % i)
                    await trio.lowlevel.wait_readable(client)
                    assert client.recv(100) == b"%d\n" % i
                    await trio.sleep(0.01)
                assert poller.direct
                client.shutdown(socket.SHUT_WR)
        assert poller.registered == 0
        probes = 0
        await trio.sleep(60)
        assert probes <= 1, f"{probes} probes in a minute with no socket to probe"
        assert not poller.direct
        # ...and the next connection is served through the poller at once.
        stream, client = pair(poller)
        with client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(Connection(stream, Config()).run)
                client.send(b"next\n")
                await trio.lowlevel.wait_readable(client)
                assert client.recv(100) == b"next\n"
                client.shutdown(socket.SHUT_WR)


async def test_a_receive_on_a_socket_known_readable_is_still_a_checkpoint() -> None:
    """Edge triggering lets a ready socket be read without waiting, but a
    receive must still yield to the scheduler, or a connection whose socket
    never runs dry would keep the others from ever running."""
    async with running_poller() as poller:
        stream, client = pair(poller)
        with client:
            client.send(b"x" * 200_000)
            await trio.testing.wait_all_tasks_blocked()
            assert stream._poll is not None
            for _ in range(3):  # full reads: the socket stays known readable
                assert stream._poll.readable
                with trio.testing.assert_checkpoints():
                    assert len(await stream.receive_some(1000)) == 1000
            stream.close()


async def test_the_load_decides_between_polling_and_trios_own_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One busy connection: the poller's wake-ups carry one event each, so it
    goes direct. Sixteen busy at once: it takes over again. Every echo along
    the way is exact, switches included."""
    async with running_poller(adapt=True) as poller:
        pairs = [pair(poller) for _ in range(16)]
        async with trio.open_nursery() as nursery:
            for stream, _ in pairs:
                nursery.start_soon(Connection(stream, Config()).run)

            async def round_trips(client: socket.socket, count: int) -> None:
                for i in range(count):
                    line = b"%d\n" % i
                    client.send(line)
                    received = b""
                    while len(received) < len(line):
                        await trio.lowlevel.wait_readable(client)
                        received += client.recv(100)
                    assert received == line
                    await trio.sleep(0.01)

            assert not poller.direct
            await round_trips(pairs[0][1], 300)  # 3 s, one connection
            assert poller.direct, "one busy connection: Trio's waits are cheaper"
            async with trio.open_nursery() as busy:
                for _, client in pairs:
                    busy.start_soon(round_trips, client, 150)
                await trio.sleep(1)
                assert not poller.direct, "sixteen busy connections: the poller pays"
            for _, client in pairs:
                client.shutdown(socket.SHUT_WR)
        for _, client in pairs:
            client.close()


async def test_an_idle_spell_before_the_first_wake_up_is_no_evidence_of_small_batches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The measuring window starts at its first wake-up: a server that sat
    idle after start-up does not go direct on the first line it serves."""
    async with running_poller(adapt=True) as poller:
        await trio.sleep(5)  # idle since start-up
        stream, client = pair(poller)
        with client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(Connection(stream, Config()).run)
                for i in range(3):
                    client.send(b"%d\n" % i)
                    await trio.lowlevel.wait_readable(client)
                    assert client.recv(100) == b"%d\n" % i
                    await trio.sleep(0.1)
                assert not poller.direct, "three lines in 0.3 s are not a window yet"
                client.shutdown(socket.SHUT_WR)


async def test_a_crowd_of_idle_connections_keeps_the_poller_polling(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One busy connection among many idle ones: the idle crowd would cost
    Trio's bookkeeping per parked task in direct mode, so the poller stays."""
    monkeypatch.setattr(echosvc.netpoll, "DIRECT_MAX", 4)
    async with running_poller(adapt=True) as poller:
        pairs = [pair(poller) for _ in range(6)]  # more than DIRECT_MAX
        async with trio.open_nursery() as nursery:
            for stream, _ in pairs:
                nursery.start_soon(Connection(stream, Config()).run)
            busy = pairs[0][1]
            for i in range(300):  # 3 s of one busy connection
                busy.send(b"%d\n" % i)
                await trio.lowlevel.wait_readable(busy)
                assert busy.recv(100) == b"%d\n" % i
                await trio.sleep(0.01)
            assert not poller.direct
            for _, client in pairs:
                client.shutdown(socket.SHUT_WR)
        for _, client in pairs:
            client.close()


FLOOD_S = 10.0

# A flooding client in a process of its own (its own GIL, the other core):
# one thread sends bursts of short lines without pause, one reads and drops
# the echo, until stdin closes or FLOOD_S pass; then it exits 0.
FLOODER = f"""
import socket, sys, threading, time
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
burst = b"y\\n" * 32768
def drain():
    try:
        while sock.recv(1 << 20):
            pass
    except OSError:
        pass
threading.Thread(target=drain, daemon=True).start()
def send():
    deadline = time.monotonic() + {FLOOD_S}
    try:
        while time.monotonic() < deadline:
            sock.sendall(burst)
    except OSError:
        pass
threading.Thread(target=send, daemon=True).start()
print("flooding", flush=True)
sys.stdin.read()
"""


async def test_a_client_that_never_stops_sending_cannot_starve_another() -> None:
    """A flood keeps its socket readable with a full receive buffer and its echo
    never waits: its handler must still yield at every receive, or the other
    connection is served only once the flood has given up."""
    with trio.fail_after(FLOOD_S + 20), captured_logs():
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(partial(serve, Config(port=0)))
            flooder = await trio.lowlevel.open_process(
                [sys.executable, "-c", FLOODER, str(server.port)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            try:
                assert flooder.stdout is not None
                said = b""
                while not said.endswith(b"\n"):
                    said += await flooder.stdout.receive_some()
                assert said == b"flooding\n"
                await trio.sleep(0.2)  # the flood is under way
                async with await trio.open_tcp_stream("127.0.0.1", server.port) as calm:
                    for i in range(200):
                        await round_trip(calm, b"calm %d\n" % i)
                assert flooder.returncode is None, "served only after the flood gave up"
            finally:
                flooder.kill()
                with trio.move_on_after(5, shield=True):
                    await flooder.wait()
            server.shutdown()


async def test_a_poller_that_stopped_refuses_registrations() -> None:
    async with running_poller() as poller:
        pass
    ours, theirs = socket.socketpair()
    with ours, theirs, pytest.raises(trio.ClosedResourceError):
        poller.register(ours)
