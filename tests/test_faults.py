"""Faults from below: the process runs out of descriptors, the network drops and delays,
the client reads slowly when the server hangs up.

Each runs the real ``echosvc serve`` in a subprocess and judges it by what a
user sees: its JSON log, its exit status, the echoes, and what the kernel
reports about it in ``/proc``.
"""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import warnings
from typing import Any

import pytest
import trio

from .soak.netns import FaultyLink, Impairment, NamespacesRefusedError, faulty_link
from .soak.proc import cpu_seconds, open_fds
from .support import ECHOSVC, Daemon, connect, receive_until_eof, round_trip

pytestmark = pytest.mark.slow

# --- running out of file descriptors -------------------------------------

NOFILE = 64  # the server's hard and soft RLIMIT_NOFILE
FLOOD = 150  # clients at once: more than the server has descriptors for
FLOOD_S = 3.0  # how long the flood stays while the server's CPU time is counted
CPU_SHARE_BOUND = 0.1  # of one core, while paused: a retry loop that spins uses all of it


async def test_out_of_descriptors_pauses_accepting_without_spinning_then_serves_again() -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(
                nursery,
                "--port=0",
                "--read-timeout=60",
                # prlimit execs the server: same pid, and a hard limit it cannot raise.
                argv=["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--", *ECHOSVC, "serve"],
            )
            pid = daemon.process.pid
            baseline = open_fds(pid)
            flood: list[trio.SocketStream] = []
            try:
                # The kernel completes every handshake into the backlog; the
                # server accepts until accept() fails with EMFILE.
                while len(flood) < FLOOD:
                    flood.append(await connect(daemon.port))
                await daemon.wait_for("accept_paused")
                cpu_before, started = cpu_seconds(pid), trio.current_time()
                # The connections it did accept are still served meanwhile.
                await round_trip(flood[0], b"served while paused\n")
                await trio.sleep(FLOOD_S)
                burnt = cpu_seconds(pid) - cpu_before
                wall = trio.current_time() - started
                fds_at_limit = open_fds(pid)
                assert daemon.process.returncode is None, daemon.stderr_text()
            finally:
                for stream in flood:
                    await stream.aclose()

            # The flood is gone: the queued connections are accepted (and
            # see EOF), and a new client is served within the backoff's cap.
            recovery_started = trio.current_time()
            async with await connect(daemon.port) as late:
                await round_trip(late, b"served after the flood\n")
            recovery_s = trio.current_time() - recovery_started
            await daemon.wait_for("accept_resumed")
            await daemon.wait_for("connection_closed", FLOOD + 1)
            # Each record is logged just before its socket is closed: give
            # the last ones a moment (no event to wait for in another process).
            for _ in range(100):
                fds_after = open_fds(pid)
                if fds_after <= baseline:
                    break
                await trio.sleep(0.01)
            assert await daemon.stop() == 0

    [paused] = daemon.events("accept_paused")  # once per episode, not once per retry
    [resumed] = daemon.events("accept_resumed")
    print(
        f"fd exhaustion: {FLOOD} clients against RLIMIT_NOFILE={NOFILE}: server at"
        f" {fds_at_limit} fds; {burnt:.3f} CPU s in {wall:.2f} s paused"
        f" ({resumed['failures']} failed accepts in {resumed['paused_s']:.2f} s);"
        f" new client served {recovery_s:.2f} s after the flood left"
    )
    assert fds_at_limit == NOFILE
    assert burnt <= CPU_SHARE_BOUND * wall, f"{burnt:.3f} CPU s in {wall:.2f} s: spinning"
    assert recovery_s < 3.0
    assert fds_after == baseline
    assert (paused["error"], paused["retry_in_s"]) == ("EMFILE", 0.005)
    assert resumed["paused_s"] >= FLOOD_S
    # Backoff from 5 ms doubling to a 1 s cap: a handful of retries per second.
    assert 5 <= resumed["failures"] <= 10 + 2 * (resumed["paused_s"] - 1)
    reasons = {record["reason"] for record in daemon.events("connection_closed")}
    assert reasons == {"eof"}
    assert "Traceback" not in daemon.stderr_text()


# --- a slow, lossy, reordering network -------------------------------------

IMPAIRMENT = Impairment(delay_s=0.1, loss=0.05, reorder=0.25)
READ_TIMEOUT = 3.0
ECHO_CLIENTS = 6


def _random_lines(rng: random.Random, total: int) -> bytes:
    """Binary lines of every size up to 16 KiB (many segments each), about ``total`` bytes."""
    lines = bytearray()
    while len(lines) < total:
        size = rng.choice([0, 1, rng.randint(2, 200), rng.randint(200, 3000), 16383])
        lines += rng.randbytes(size).replace(b"\n", b"\r") + b"\n"
    return bytes(lines)


async def _open(link: FaultyLink, port: int) -> tuple[trio.SocketStream, str]:
    sock = link.client_socket()
    try:
        await sock.connect((link.server_ip, port))
    except BaseException:
        sock.close()
        raise
    host, local_port = sock.getsockname()
    return trio.SocketStream(sock), f"{host}:{local_port}"


class _Outcomes:
    """What each client saw, by the peer address the server logs."""

    def __init__(self) -> None:
        self.echoed: dict[str, tuple[bytes, bytes]] = {}  # peer: (sent, received)
        self.timed: dict[str, tuple[str, float, bytes]] = {}  # peer: (case, idle s, received)


async def _echo_client(link: FaultyLink, port: int, seed: int, out: _Outcomes) -> None:
    rng = random.Random(seed)
    data = _random_lines(rng, 48_000) + b"final line, no newline \x00\xff"
    stream, peer = await _open(link, port)
    async with stream, trio.open_nursery() as nursery:

        async def read() -> None:
            out.echoed[peer] = (data, await receive_until_eof(stream))

        nursery.start_soon(read)
        offset = 0
        while offset < len(data):
            size = rng.choice([1, 7, 500, 1448, 5000, 20000])
            await stream.send_all(data[offset : offset + size])
            offset += size
        await stream.send_eof()


async def _idle_client(link: FaultyLink, port: int, out: _Outcomes) -> None:
    """Sends nothing: cut off ``read_timeout`` after the server accepted it."""
    stream, peer = await _open(link, port)
    async with stream:
        connected = trio.current_time()
        received = await receive_until_eof(stream)
        out.timed[peer] = ("idle", trio.current_time() - connected, received)


async def _quiet_after_echo(link: FaultyLink, port: int, out: _Outcomes) -> None:
    """One line, its echo, then half a line and silence: cut off a read timeout after the echo."""
    stream, peer = await _open(link, port)
    async with stream:
        await round_trip(stream, b"one line\n")
        echoed = trio.current_time()
        await stream.send_all(b"and half of ano")
        rest = await receive_until_eof(stream)
        out.timed[peer] = ("quiet", trio.current_time() - echoed, b"one line\n" + rest)


async def _slow_line(link: FaultyLink, port: int, out: _Outcomes) -> None:
    """A slowloris: one byte every 0.4 s, never a newline."""
    stream, peer = await _open(link, port)
    async with stream, trio.open_nursery() as nursery:
        connected = trio.current_time()

        async def read() -> None:
            received = await receive_until_eof(stream)
            out.timed[peer] = ("slowloris", trio.current_time() - connected, received)
            nursery.cancel_scope.cancel()

        nursery.start_soon(read)
        for _ in range(int(READ_TIMEOUT / 0.4) + 10):
            try:
                await stream.send_all(b"z")
            except trio.BrokenResourceError:
                break
            await trio.sleep(0.4)


async def _late_but_in_time(link: FaultyLink, port: int, out: _Outcomes) -> None:
    """Each line in three pieces 0.3 s apart: slow, but inside the deadline every time.

    A line's deadline runs from the previous echo, so each line has about a
    second and a half to spare for retransmissions.
    """
    stream, peer = await _open(link, port)
    data = b""
    async with stream:
        for number in range(3):
            line = b"line %d arrives in pieces\n" % number
            data += line
            for piece in (line[:5], line[5:12], line[12:]):
                await stream.send_all(piece)
                await trio.sleep(0.3)
        await stream.send_eof()
        out.echoed[peer] = (data, await receive_until_eof(stream))


async def test_echoes_stay_exact_and_deadlines_fire_on_a_lossy_slow_reordering_link() -> None:
    try:
        async with faulty_link(IMPAIRMENT, seed=7) as link:
            await _faulty_network_session(link)
    except NamespacesRefusedError as exc:
        pytest.skip(f"the kernel refused to create a network namespace: {exc}")


async def _faulty_network_session(link: FaultyLink) -> None:
    if link.method != "netem":
        warnings.warn(
            "this kernel has no sch_netem (CONFIG_NET_SCH_NETEM): the same delay, loss and"
            " reordering were applied by the test's TUN relay instead of tc netem",
            stacklevel=1,
        )
    out = _Outcomes()
    retrans_before = link.client_tcp_counters()["RetransSegs"]
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(
                nursery,
                f"--host={link.server_ip}",
                "--port=0",
                f"--read-timeout={READ_TIMEOUT}",
                "--write-timeout=10",
                argv=link.server_argv([*ECHOSVC, "serve"]),
            )
            port = daemon.port
            # The link is slow: some of these round trips wait out the delay.
            stream, _ = await _open(link, port)
            rtts = []
            async with stream:
                for _ in range(10):
                    started = trio.current_time()
                    await round_trip(stream, b"ping\n")
                    rtts.append(trio.current_time() - started)
                await stream.send_eof()
                assert await receive_until_eof(stream) == b""
            async with trio.open_nursery() as clients:
                for seed in range(ECHO_CLIENTS):
                    clients.start_soon(_echo_client, link, port, seed, out)
                clients.start_soon(_idle_client, link, port, out)
                clients.start_soon(_quiet_after_echo, link, port, out)
                clients.start_soon(_slow_line, link, port, out)
                clients.start_soon(_late_but_in_time, link, port, out)
            expected = 1 + len(out.echoed) + len(out.timed)
            await daemon.wait_for("connection_closed", expected)
            assert await daemon.stop() == 0
    dropped = await link.dropped()
    retransmitted = link.client_tcp_counters()["RetransSegs"] - retrans_before
    records = {record["peer"]: record for record in daemon.events("connection_closed")}
    print(
        f"faulty link via {link.method}: rtt {min(rtts) * 1000:.0f}-{max(rtts) * 1000:.0f} ms,"
        f" {dropped} packets dropped, {retransmitted} segments retransmitted by clients;"
        f" {sum(len(sent) for sent, _ in out.echoed.values())} bytes echoed exactly"
    )
    # The impairment really was there.
    assert max(rtts) >= IMPAIRMENT.delay_s
    assert dropped > 0
    assert retransmitted > 0

    assert len(out.echoed) == ECHO_CLIENTS + 1
    for peer, (sent, received) in out.echoed.items():
        assert received == sent, f"{peer}: {len(received)} of {len(sent)} bytes, or different"
        _expect(records[peer], reason="eof", bytes_in=len(sent), bytes_out=len(sent))

    assert {case for case, _, _ in out.timed.values()} == {"idle", "quiet", "slowloris"}
    for peer, (case, idle_s, received) in out.timed.items():
        record = records[peer]
        assert record["reason"] == "read_timeout", (case, record)
        assert record["bytes_out"] == len(received)
        if case == "idle":
            # The deadline runs from accept, which the delayed handshake ACK
            # makes up to one delay (plus retransmissions) after connect().
            assert received == b""
            assert READ_TIMEOUT <= record["duration_s"] < READ_TIMEOUT + 0.1
            assert READ_TIMEOUT - 0.05 <= idle_s < READ_TIMEOUT + 1.5
        elif case == "quiet":
            # Cut a read timeout after the echo was sent; the partial line dropped.
            assert received == b"one line\n"
            assert READ_TIMEOUT - 0.05 <= idle_s < READ_TIMEOUT + 0.5
        else:  # the slowloris: its line never finished, so nothing came back
            assert received == b""
            assert READ_TIMEOUT <= record["duration_s"] < READ_TIMEOUT + 0.1


def _expect(record: dict[str, Any], **fields: object) -> None:
    assert {name: record[name] for name in fields} == fields, record


# --- closing on a client that is slow to read ---------------------------------
#
# Closing a socket with input still unread makes the kernel send a RST
# instead of a FIN and throw away whatever echo is still queued in it --
# bytes the log already counts in `bytes_out`. Both tests failed every time
# until echosvc got its lingering close (shutdown(SHUT_WR), then discard
# input until EOF or a short deadline); they keep it honest.


async def _small_window_client(port: int) -> trio.SocketStream:
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a few kB of window
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def _read_slowly(stream: trio.SocketStream) -> bytes:
    received = bytearray()
    with contextlib.suppress(trio.BrokenResourceError):  # ECONNRESET: the RST
        while chunk := await stream.receive_some(4096):
            received += chunk
            await trio.sleep(0.001)
    return bytes(received)


async def test_the_lines_before_an_oversize_one_reach_a_client_slow_to_read() -> None:
    good = b"".join(b"%05d" % n + b"g" * 994 + b"\n" for n in range(12))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port=0", "--max-line-bytes=1000")
            async with await _small_window_client(daemon.port) as client:
                await client.send_all(good)
                await trio.sleep(0.3)  # echoed: in our few kB of window, the rest queued
                async with trio.open_nursery() as sending:

                    async def oversize() -> None:
                        with contextlib.suppress(trio.BrokenResourceError):
                            await client.send_all(b"o" * 200_000)  # no newline: too long

                    sending.start_soon(oversize)
                    await daemon.wait_for("connection_closed")
                received = await _read_slowly(client)
            assert await daemon.stop() == 0
    [record] = daemon.events("connection_closed")
    assert (record["reason"], record["bytes_out"]) == ("line_too_long", len(good))
    assert received == good, f"the server echoed {len(good)} bytes, {len(received)} arrived"


async def test_the_echo_a_shutdown_lets_finish_reaches_a_client_slow_to_read() -> None:
    line = b"s" * 300_000 + b"\n"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(
                nursery, "--port=0", "--max-line-bytes=1000000", "--shutdown-grace=10"
            )
            async with await _small_window_client(daemon.port) as client:
                await client.send_all(line)
                await trio.sleep(0.3)  # the echo waits for us to read
                # Not read by the handler yet (it is mid-echo), but received by
                # the server's kernel before the stop: echoed too.
                await client.send_all(b"next line\n")
                await trio.sleep(0.3)
                daemon.send_signal(signal.SIGTERM)  # graceful: the echo may finish
                await daemon.wait_for("shutdown_started")
                received = await _read_slowly(client)
            assert await daemon.wait() == 0
    expected = line + b"next line\n"
    [record] = daemon.events("connection_closed")
    assert (record["reason"], record["bytes_out"]) == ("shutdown", len(expected))
    assert received == expected, f"the server echoed {len(expected)}, {len(received)} arrived"
