"""The chaos run: hundreds of clients, well-behaved and abusive, against a real daemon.

`run_soak` starts ``echosvc serve`` as a subprocess on loopback (through
`tests.support.Daemon`, so the JSON log is the evidence) and keeps
``clients`` client slots busy for ``duration`` seconds. Each slot runs one
connection after another, each time drawing one behaviour (`Kind`):

well_behaved
    random binary lines cut into random chunks, read concurrently; every
    echoed byte is checked in order, the final unterminated line included,
    then a half-close and a read to EOF. A quarter of them think between
    lines (a tenth to three tenths of the read timeout), so the connection
    outlives the read timeout while no line does. Expected close: ``eof``.
trickler
    a few good lines, then a slowloris: one byte of a line every 0.3 s.
    Expected: ``read_timeout``, and the unfinished line never echoed.
never_reader
    16 KiB lines as fast as the kernel takes them, never reading, until the
    server gives up on it (several MB fill both sockets' buffers first).
    Expected: ``write_timeout``.
giant_line
    a few good lines, then one line longer than ``--max-line-bytes``.
    Expected: ``line_too_long``, the good lines echoed and nothing of it.
rst_mid_line
    a few good lines, half a line, then ``SO_LINGER`` 0 and close: a RST.
    Expected: ``reset``.
half_close_partial
    a few lines and a partial one, then a half-close; the partial line must
    come back before EOF. Expected: ``eof``.
connect_idle
    connects and sends nothing. Expected: ``read_timeout``.

A canary (`tests.soak.canary`, in its own process) opens a fresh connection
every 100 ms and times connect plus one round trip: if the accept loop or the
server's event loop stalls, its latency shows it.

Every client binds its own source address in 127.0.0.0/8 (slot *i* is
``127.77.i/250.i%250+1``): each slot has a port range to itself, and the
``peer`` of a ``connection_closed`` record names exactly one connection the
client opened, so each connection is matched to the server's account of it.

With ``sigterm_after`` the run is the shutdown-under-load test instead:
SIGTERM arrives while every kind of client is active, and the checks are
the graceful-shutdown contract. `SoakReport.problems` lists every check that
failed, in both modes; README.md beside this file lists the checks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import math
import random
import signal
import socket
import struct
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

import attrs
import trio

from ..support import Daemon
from .proc import open_fds, rss_bytes

__all__ = ["EXPECTED_REASON", "EchoCheck", "Kind", "SoakConfig", "SoakReport", "run_soak"]

# Where ``python -m tests.soak.canary`` is found.
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
SERVER_HOST = "127.0.0.1"
CANARY_SOURCE = "127.78.0.1"
RECEIVE_SIZE = 65536
LAG_PROBE_S = 0.05
TRICKLE_INTERVAL_S = 0.3
NEVER_READER_LINE = 16384
NEVER_READER_CAP = 256 * 2**20  # bytes; the server must give up long before
MIB = 2**20
_NO_NEWLINE = bytes.maketrans(b"\n", b" ")
# F_SETPIPE_SZ, fcntl(2): a pipe that holds more of the server's log.
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# IP_BIND_ADDRESS_NO_PORT (ip(7)): bind() picks the address, connect() the port.
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class Kind(StrEnum):
    WELL_BEHAVED = "well_behaved"
    TRICKLER = "trickler"
    NEVER_READER = "never_reader"
    GIANT_LINE = "giant_line"
    RST_MID_LINE = "rst_mid_line"
    HALF_CLOSE_PARTIAL = "half_close_partial"
    CONNECT_IDLE = "connect_idle"
    CANARY = "canary"


EXPECTED_REASON: dict[Kind, str] = {
    Kind.WELL_BEHAVED: "eof",
    Kind.TRICKLER: "read_timeout",
    Kind.NEVER_READER: "write_timeout",
    Kind.GIANT_LINE: "line_too_long",
    Kind.RST_MID_LINE: "reset",
    Kind.HALF_CLOSE_PARTIAL: "eof",
    Kind.CONNECT_IDLE: "read_timeout",
    Kind.CANARY: "eof",
}

# How often each behaviour is drawn. Each slot's first connection instead
# cycles through them in order, so even a short run has every kind.
WEIGHTS: dict[Kind, int] = {
    Kind.WELL_BEHAVED: 40,
    Kind.TRICKLER: 9,
    Kind.NEVER_READER: 6,
    Kind.GIANT_LINE: 10,
    Kind.RST_MID_LINE: 12,
    Kind.HALF_CLOSE_PARTIAL: 13,
    Kind.CONNECT_IDLE: 10,
}
_CLIENT_KINDS = list(WEIGHTS)


def source_address(slot: int) -> str:
    """The loopback address slot ``slot`` connects from."""
    return f"127.77.{slot // 250}.{slot % 250 + 1}"


@attrs.frozen(kw_only=True)
class SoakConfig:
    """One chaos run. The server's timeouts are short so abuse ends quickly."""

    duration: float = 60.0
    clients: int = 300
    seed: int = 0
    read_timeout: float = 2.0
    write_timeout: float = 2.0
    max_line_bytes: int = 65536
    shutdown_grace: float = 3.0
    warmup: float | None = None  # default: a quarter of the run, at most 10 s
    rss_bound_mib: float = 16.0
    canary_interval: float = 0.1
    canary_max_s: float = 1.0
    fd_settle_s: float = 1.0
    sigterm_after: float | None = None

    @property
    def warmup_s(self) -> float:
        return self.warmup if self.warmup is not None else min(10.0, self.duration / 4)

    def server_args(self) -> list[str]:
        return [
            "--port=0",
            f"--read-timeout={self.read_timeout}",
            f"--write-timeout={self.write_timeout}",
            f"--max-line-bytes={self.max_line_bytes}",
            f"--shutdown-grace={self.shutdown_grace}",
            # connection_opened (debug) shows which handlers were started.
            f"--log-level={'debug' if self.sigterm_after is not None else 'info'}",
        ]


class EchoCheck:
    """What a client sent, and whether what came back is a byte-exact prefix of it."""

    __slots__ = ("mismatch_at", "received", "sent")

    def __init__(self) -> None:
        self.sent = bytearray()
        self.received = 0
        self.mismatch_at: int | None = None

    def expect(self, data: bytes) -> None:
        """Record ``data`` as sent (call before sending: its echo may beat send_all)."""
        self.sent += data

    def check(self, data: bytes) -> None:
        if self.mismatch_at is None:
            want = self.sent[self.received : self.received + len(data)]
            if want != data:
                self.mismatch_at = self.received + next(
                    (i for i, (a, b) in enumerate(zip(want, data, strict=False)) if a != b),
                    min(len(want), len(data)),
                )
        self.received += len(data)


@attrs.define(eq=False)
class Session:
    """One connection a client opened, and what became of it."""

    kind: Kind
    slot: int
    started: float
    peer: str | None = None
    ended: float = math.nan
    echo: EchoCheck | None = None
    must_echo: int | None = None  # bytes that must come back; None: all sent
    outcome: str = "unfinished"  # the client's view: eof, reset, rst_sent, refused...
    eof_sent: bool = False
    latency: float | None = None  # the canary's connect + round trip
    # Well-behaved: the longest this client took between two sends, and the
    # longest it took to send one line (from the last byte of the line before,
    # which is about when its echo restarted the server's read deadline, to
    # its own last byte, or to EOF for a final line without a newline). A
    # client that took longer than the read timeout for a line -- a starved
    # machine can make it -- is cut off rightly; see _check_session.
    longest_pause: float = 0.0
    longest_line_s: float = 0.0
    record: dict[str, Any] | None = None

    def owed(self) -> int:
        """How many echo bytes must come back when nothing interrupts the connection."""
        if self.echo is None:
            return 0
        return len(self.echo.sent) if self.must_echo is None else self.must_echo


class _Unexpected(Exception):
    """The server did something a client of this kind must never see."""


def _line(rng: random.Random, max_line_bytes: int) -> bytes:
    """A random binary line, newline included, of at most ``max_line_bytes``."""
    draw = rng.random()
    if draw < 0.7:
        size = rng.randint(0, 100)
    elif draw < 0.95:
        size = rng.randint(100, 4000)
    else:
        size = rng.randint(4000, 60000)
    return rng.randbytes(min(size, max_line_bytes - 1)).translate(_NO_NEWLINE) + b"\n"


def _partial(rng: random.Random, most: int = 200) -> bytes:
    return rng.randbytes(rng.randint(1, most)).translate(_NO_NEWLINE)


def _chunked(data: bytes, rng: random.Random, most: int = 20) -> list[bytes]:
    if len(data) < 2:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, most))))
    points = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)]


@attrs.define
class SoakReport:
    """The numbers of one run and every check that failed (`problems`)."""

    config: SoakConfig
    elapsed_s: float = 0.0
    sessions: list[Session] = attrs.field(factory=list, repr=False)
    fd_baseline: int = 0
    fd_after: int | None = None
    fd_settle_s: float | None = None
    fd_peak: int = 0
    rss_warm: int | None = None
    rss_after: int | None = None
    unmatched_records: int = 0
    exit_status: int | None = None
    exit_s: float | None = None
    stderr_tracebacks: int = 0
    handlers_unfinished: list[int] = attrs.field(factory=list)
    closed_after_stopped: int = 0
    served_reported: int | None = None
    closed_records: int = 0
    sigterm_at: float | None = None
    load_lag_max: float = 0.0
    problem_list: list[str] = attrs.field(factory=list)

    # --- numbers ----------------------------------------------------------

    @property
    def by_kind(self) -> dict[str, int]:
        counts = Counter(s.kind.value for s in self.sessions)
        return {kind.value: counts[kind.value] for kind in Kind}

    @property
    def closes_by_reason(self) -> dict[str, int]:
        return dict(Counter(s.record["reason"] for s in self.sessions if s.record).most_common())

    @property
    def bytes_verified(self) -> int:
        return sum(s.echo.received for s in self.sessions if s.echo is not None)

    @property
    def bytes_expected(self) -> int:
        """Echo bytes the clients were owed (what they sent, less what must not return)."""
        return sum(s.owed() for s in self.sessions)

    @property
    def echo_cut_by_close(self) -> int:
        """Connections whose client received less than the server logged as echoed.

        A client that reset the connection itself is not owed the rest: when a
        stop lands before the server has read the RST, the server rightly
        echoes the unfinished line it holds (a stop echoes every byte
        received), into a connection the client has already thrown away.
        """
        return sum(
            1
            for s in self.sessions
            if s.echo is not None
            and s.record
            and s.outcome != "rst_sent"
            and s.echo.received < s.record["bytes_out"]
        )

    @property
    def mismatches(self) -> int:
        return sum(1 for s in self.sessions if s.echo and s.echo.mismatch_at is not None)

    def _canary_latencies(self) -> list[float]:
        return [s.latency for s in self.sessions if s.latency is not None]

    @property
    def canary(self) -> dict[str, float]:
        latencies = self._canary_latencies()
        probes = sum(1 for s in self.sessions if s.kind is Kind.CANARY)
        return {
            "probes": probes,
            "failures": probes - len(latencies),
            "p50_ms": round(_percentile(latencies, 0.50) * 1000, 2),
            "p99_ms": round(_percentile(latencies, 0.99) * 1000, 2),
            "max_ms": round(max(latencies, default=math.nan) * 1000, 2),
        }

    @property
    def rss_growth(self) -> int | None:
        if self.rss_warm is None or self.rss_after is None:
            return None
        return self.rss_after - self.rss_warm

    def problems(self) -> list[str]:
        return list(self.problem_list)

    def as_dict(self) -> dict[str, Any]:
        growth = self.rss_growth
        return {
            "config": attrs.asdict(self.config),
            "elapsed_s": round(self.elapsed_s, 2),
            "clients_run": len(self.sessions),
            "by_kind": self.by_kind,
            "bytes_verified": self.bytes_verified,
            "bytes_expected": self.bytes_expected,
            "mismatches": self.mismatches,
            "echo_cut_by_close": self.echo_cut_by_close,
            "closes_by_reason": self.closes_by_reason,
            "fd_baseline": self.fd_baseline,
            "fd_peak": self.fd_peak,
            "fd_after": self.fd_after,
            "fd_settle_s": None if self.fd_settle_s is None else round(self.fd_settle_s, 3),
            "rss_warm_mib": None if self.rss_warm is None else round(self.rss_warm / MIB, 2),
            "rss_after_mib": None if self.rss_after is None else round(self.rss_after / MIB, 2),
            "rss_growth_mib": None if growth is None else round(growth / MIB, 2),
            "canary": self.canary,
            "exit_status": self.exit_status,
            "exit_s": None if self.exit_s is None else round(self.exit_s, 3),
            "load_generator_lag_max_ms": round(self.load_lag_max * 1000, 1),
            "problems": self.problems(),
        }

    def text(self) -> str:
        data = self.as_dict()
        config = self.config
        lines = [
            f"soak: {data['clients_run']} clients in {data['elapsed_s']} s"
            f" ({config.clients} at once, seed {config.seed})",
            "  by kind:  " + ", ".join(f"{k}={v}" for k, v in data["by_kind"].items()),
            f"  bytes verified: {data['bytes_verified']} (owed {data['bytes_expected']});"
            f" mismatches: {data['mismatches']};"
            f" echoed but not received: {data['echo_cut_by_close']} connections",
            "  closes by reason: "
            + ", ".join(f"{k}={v}" for k, v in data["closes_by_reason"].items()),
        ]
        canary = "  canary: " + ", ".join(f"{k}={v}" for k, v in data["canary"].items())
        if config.sigterm_after is None:
            lines += [
                f"  fds: baseline {data['fd_baseline']}, peak {data['fd_peak']},"
                f" after {data['fd_after']} (settled in {data['fd_settle_s']} s)",
                f"  rss: after warm-up {data['rss_warm_mib']} MiB, after the run"
                f" {data['rss_after_mib']} MiB, growth {data['rss_growth_mib']} MiB"
                f" (bound {config.rss_bound_mib} MiB)",
                canary + f" (bound {config.canary_max_s * 1000:g} ms)",
                f"  server exit status {data['exit_status']} on SIGTERM after the run",
            ]
        else:
            lines += [
                f"  SIGTERM after {config.sigterm_after} s: exit status {data['exit_status']}"
                f" in {data['exit_s']} s (bound: grace {config.shutdown_grace} s + 1 s);"
                f" {self.closed_records} connections closed, `stopped` counted"
                f" {self.served_reported}; handlers never closed:"
                f" {len(self.handlers_unfinished)}; closed after `stopped`:"
                f" {self.closed_after_stopped}",
                canary + " (until SIGTERM)",
            ]
        lines.append(
            f"  load generator: event loop {data['load_generator_lag_max_ms']} ms late at worst"
        )
        problems = data["problems"]
        lines.append(f"  problems: {len(problems)}")
        lines.extend(f"    - {p}" for p in problems[:40])
        return "\n".join(lines)


class _Run:
    def __init__(self, config: SoakConfig, report: SoakReport) -> None:
        self.config = config
        self.report = report
        self.port = 0
        self.end = math.inf  # when slots stop starting connections
        self.stopping = trio.Event()  # shutdown mode: no new connections, no more EOFs
        self.stop_canary = trio.Event()
        self.sigterm_at: float | None = None
        self.exited_at: float | None = None
        self.active = 0

    # --- the connection every kind starts with ------------------------------

    async def connect(self, session: Session, source: str) -> trio.SocketStream:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            await sock.bind((source, 0))
            await sock.connect((SERVER_HOST, self.port))
        except BaseException:
            sock.close()
            raise
        host, port = sock.getsockname()
        session.peer = f"{host}:{port}"
        return trio.SocketStream(sock)

    async def read_to_close(self, stream: trio.SocketStream, echo: EchoCheck | None) -> str:
        """Read until the server closes; check every byte; return how it closed."""
        try:
            while chunk := await stream.receive_some(RECEIVE_SIZE):
                if echo is None:
                    raise _Unexpected(f"{len(chunk)} bytes from the server")
                echo.check(chunk)
        except trio.BrokenResourceError:
            return "reset"
        return "eof"

    async def round_trip(self, stream: trio.SocketStream, echo: EchoCheck, data: bytes) -> None:
        """Send ``data`` (complete lines) and read until all of it came back."""
        if not data:
            return
        echo.expect(data)
        want = len(echo.sent)
        await stream.send_all(data)
        while echo.received < want:
            chunk = await stream.receive_some(want - echo.received)
            if not chunk:
                raise _Unexpected(f"EOF with {want - echo.received} bytes of echo missing")
            echo.check(chunk)

    def good_lines(self, rng: random.Random, most: int = 3) -> bytes:
        return b"".join(_line(rng, 4000) for _ in range(rng.randint(0, most)))

    # --- the kinds --------------------------------------------------------------

    async def well_behaved(self, s: Session, stream: trio.SocketStream, rng: random.Random) -> None:
        echo = s.echo = EchoCheck()
        lines = [_line(rng, self.config.max_line_bytes) for _ in range(rng.randint(1, 25))]
        final = _partial(rng) if rng.random() < 0.7 else b""
        if rng.random() < 0.25 and self.end - trio.current_time() > 4 * self.config.read_timeout:
            # Interactive: a pause to think between lines, so the connection
            # outlives the read timeout many times over while no line does.
            think = (0.1 * self.config.read_timeout, 0.3 * self.config.read_timeout)
            lines = lines[:6]
        else:
            think = (0.0, 0.0)
            lines = [b"".join(lines)]
        # Each pause falls between two lines, never inside one: the partial
        # line and the half-close after it are sent together, since both
        # count against the same read deadline.
        plan = [(_chunked(line, rng), rng.uniform(*think)) for line in lines]
        if final:
            plan.append((_chunked(final, rng), 0.0))
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                s.outcome = await self.read_to_close(stream, echo)

            nursery.start_soon(read)
            last_send = line_began = trio.current_time()
            try:
                for index, (chunks, pause) in enumerate(plan):
                    for chunk in chunks:
                        echo.expect(chunk)
                        await stream.send_all(chunk)
                        now = trio.current_time()
                        s.longest_pause = max(s.longest_pause, now - last_send)
                        last_send = now
                        if rng.random() < 0.3:
                            await trio.sleep(rng.uniform(0, 0.03))
                    if not (final and index == len(plan) - 1):  # that one ends at EOF
                        s.longest_line_s = max(s.longest_line_s, last_send - line_began)
                        line_began = last_send
                    await trio.sleep(pause)
                # Shutdown mode: no half-close once SIGTERM is on its way, so
                # every connection still open is one the shutdown must close.
                if not self.stopping.is_set():
                    await stream.send_eof()
                    if final:
                        span = trio.current_time() - line_began
                        s.longest_line_s = max(s.longest_line_s, span)
                    s.eof_sent = True
            except trio.BrokenResourceError:
                if not self.stopping.is_set():
                    raise

    async def trickler(self, s: Session, stream: trio.SocketStream, rng: random.Random) -> None:
        echo = s.echo = EchoCheck()
        await self.round_trip(stream, echo, self.good_lines(rng, 2))
        s.must_echo = len(echo.sent)
        closed = trio.Event()
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                s.outcome = await self.read_to_close(stream, echo)
                closed.set()

            nursery.start_soon(read)
            budget = self.config.read_timeout + 5 + (self.config.shutdown_grace or 0)
            for _ in range(math.ceil(budget / TRICKLE_INTERVAL_S)):
                byte = bytes([rng.choice(b"abcdefghijklmnopqrstuvwxyz")])
                echo.expect(byte)
                try:
                    await stream.send_all(byte)
                except trio.BrokenResourceError:
                    break  # the server hung up; the reader tells how
                with trio.move_on_after(TRICKLE_INTERVAL_S):
                    await closed.wait()
                if closed.is_set():
                    break

    async def never_reader(self, s: Session, stream: trio.SocketStream, rng: random.Random) -> None:
        line = rng.randbytes(NEVER_READER_LINE - 1).translate(_NO_NEWLINE) + b"\n"
        sent = 0
        try:
            while sent < NEVER_READER_CAP:
                await stream.send_all(line)
                sent += len(line)
        except trio.BrokenResourceError:
            s.outcome = "reset"
        else:
            s.outcome = f"sent {sent} bytes and was never cut off"

    async def giant_line(self, s: Session, stream: trio.SocketStream, rng: random.Random) -> None:
        echo = s.echo = EchoCheck()
        await self.round_trip(stream, echo, self.good_lines(rng))
        s.must_echo = len(echo.sent)
        size = self.config.max_line_bytes + rng.randint(1, 200_000)
        giant = rng.randbytes(size).translate(_NO_NEWLINE) + (b"\n" if rng.random() < 0.5 else b"")
        echo.expect(giant)
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                s.outcome = await self.read_to_close(stream, echo)

            nursery.start_soon(read)
            # The server hangs up mid-line, usually with a RST (unread data).
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(giant)

    async def rst_mid_line(self, s: Session, stream: trio.SocketStream, rng: random.Random) -> None:
        echo = s.echo = EchoCheck()
        await self.round_trip(stream, echo, self.good_lines(rng))
        s.must_echo = len(echo.sent)
        partial = _partial(rng)
        echo.expect(partial)
        await stream.send_all(partial)
        await trio.sleep(rng.uniform(0, 0.05))
        # SO_LINGER with a zero timeout: close() sends a RST, not a FIN.
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()
        s.outcome = "rst_sent"

    async def half_close_partial(
        self, s: Session, stream: trio.SocketStream, rng: random.Random
    ) -> None:
        echo = s.echo = EchoCheck()
        data = self.good_lines(rng) + _partial(rng)
        for chunk in _chunked(data, rng, most=3):
            echo.expect(chunk)
            await stream.send_all(chunk)
        await stream.send_eof()
        s.eof_sent = True
        s.outcome = await self.read_to_close(stream, echo)

    async def connect_idle(self, s: Session, stream: trio.SocketStream, rng: random.Random) -> None:
        s.echo = EchoCheck()  # sends nothing, so nothing may come back
        s.outcome = await self.read_to_close(stream, s.echo)

    # --- the slots ----------------------------------------------------------------

    def bound_for(self, kind: Kind) -> float:
        """How long a connection of ``kind`` may last before the client calls it stuck."""
        config = self.config
        slack = 10.0 + (config.shutdown_grace if config.sigterm_after is not None else 0.0)
        if kind in (Kind.TRICKLER, Kind.CONNECT_IDLE):
            return config.read_timeout + slack
        if kind is Kind.NEVER_READER:
            return config.write_timeout + slack
        return 20.0 + slack

    async def session(self, kind: Kind, slot: int, rng: random.Random, source: str) -> Session:
        s = Session(kind=kind, slot=slot, started=trio.current_time())
        self.report.sessions.append(s)
        self.active += 1
        try:
            with trio.move_on_after(self.bound_for(kind)) as bound:
                await self.connect_and_behave(s, rng, source)
            if bound.cancelled_caught:
                s.outcome = f"stuck: still open after {self.bound_for(kind)} s"
        except* (_Unexpected, trio.BrokenResourceError, OSError) as group:
            exc = group.exceptions[0]
            s.outcome = f"error: {type(exc).__name__}: {exc}"
        finally:
            s.ended = trio.current_time()
            self.active -= 1
        return s

    async def connect_and_behave(self, s: Session, rng: random.Random, source: str) -> None:
        behaviour: Callable[[Session, trio.SocketStream, random.Random], Any] = getattr(
            self, s.kind.value
        )
        try:
            stream = await self.connect(s, source)
        except OSError as exc:
            s.outcome = f"connect failed: {errno.errorcode.get(exc.errno or 0, exc)}"
            return
        async with stream:
            await behaviour(s, stream, rng)

    async def client(self, slot: int, end: float) -> None:
        source = source_address(slot)
        first = _CLIENT_KINDS[slot % len(_CLIENT_KINDS)]
        kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
        number = 0
        # Bounded: every session takes a few ms at least, and the run has an end.
        while trio.current_time() < end and not self.stopping.is_set():
            rng = random.Random(f"{self.config.seed}-{slot}-{number}")
            kind = first if number == 0 else rng.choices(kinds, weights)[0]
            await self.session(kind, slot, rng, source)
            number += 1

    async def canary(self) -> None:
        """Run the canary process until the clients are done; keep its probes."""
        argv = [
            sys.executable,
            "-m",
            "tests.soak.canary",
            SERVER_HOST,
            str(self.port),
            CANARY_SOURCE,
            str(self.config.canary_interval),
        ]
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=_PROJECT_ROOT
        )
        assert process.stdin is not None
        assert process.stdout is not None
        try:
            async with trio.open_nursery() as nursery:

                async def stop() -> None:
                    await self.stop_canary.wait()
                    assert process.stdin is not None
                    await process.stdin.aclose()

                nursery.start_soon(stop)
                buffer = b""
                while chunk := await process.stdout.receive_some():
                    *lines, buffer = (buffer + chunk).split(b"\n")
                    for line in lines:
                        self.canary_probe(json.loads(line))
        finally:
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
                await process.wait()

    def canary_probe(self, probe: dict[str, Any]) -> None:
        now = trio.current_time()
        latency = probe["latency"]
        s = Session(
            kind=Kind.CANARY,
            slot=-1,
            started=now - (latency or 0.0),
            peer=probe["peer"],
            ended=now,
            latency=latency,
            outcome="eof" if probe["error"] is None else f"error: {probe['error']}",
        )
        self.report.sessions.append(s)

    async def measure_lag(self) -> None:
        """How late this process's own event loop wakes up: the load generator's health."""
        while True:
            asked = trio.current_time() + LAG_PROBE_S
            await trio.sleep_until(asked)
            self.report.load_lag_max = max(self.report.load_lag_max, trio.current_time() - asked)

    async def watch(self, pid: int, warm_at: float, progress: Callable[[str], None] | None) -> None:
        """Measure RSS after warm-up, track the fd peak, and show progress."""
        started = trio.current_time()
        last_progress = started
        while True:
            now = trio.current_time()
            try:
                self.report.fd_peak = max(self.report.fd_peak, open_fds(pid))
                if self.report.rss_warm is None and now >= warm_at:
                    self.report.rss_warm = rss_bytes(pid)
            except FileNotFoundError:  # the process is gone (shutdown mode)
                return
            if progress is not None and now - last_progress >= 5:
                last_progress = now
                canary = self.report.canary
                progress(
                    f"{now - started:5.1f} s: {len(self.report.sessions)} connections,"
                    f" {self.active} open, server fds {open_fds(pid)},"
                    f" canary p99 {canary['p99_ms']} ms max {canary['max_ms']} ms"
                )
            await trio.sleep(0.25)


async def run_soak(
    config: SoakConfig, *, progress: Callable[[str], None] | None = None
) -> SoakReport:
    """Run the chaos described by ``config``; return the report (see `SoakReport.problems`)."""
    report = SoakReport(config)
    run = _Run(config, report)
    async with trio.open_nursery() as nursery:
        daemon = await Daemon.start(nursery, *config.server_args())
        try:
            stderr = daemon.process.stderr
            if isinstance(stderr, trio.lowlevel.FdStream):
                # A bigger pipe (up to fs.pipe-max-size, 1 MiB by default): the
                # server must not wait for this busy process to read its log.
                with contextlib.suppress(OSError):
                    fcntl.fcntl(stderr.fileno(), _F_SETPIPE_SZ, MIB)
            await _drive(run, daemon, progress)
        finally:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 10):
                await daemon.kill()
    _judge(report, daemon)
    return report


async def _drive(run: _Run, daemon: Daemon, progress: Callable[[str], None] | None) -> None:
    config, report = run.config, run.report
    pid = daemon.process.pid
    run.port = daemon.port
    report.fd_baseline = open_fds(pid)
    started = trio.current_time()
    end = run.end = started + config.duration
    async with trio.open_nursery() as canary:
        canary.start_soon(run.canary)  # until stop_canary
        async with trio.open_nursery() as watchers:
            watchers.start_soon(run.watch, pid, started + config.warmup_s, progress)
            watchers.start_soon(run.measure_lag)
            async with trio.open_nursery() as clients:
                for slot in range(config.clients):
                    clients.start_soon(run.client, slot, end)
                if config.sigterm_after is not None:
                    clients.start_soon(_sigterm, run, daemon, started + config.sigterm_after)
            run.stop_canary.set()
            watchers.cancel_scope.cancel()
    left = trio.current_time()
    report.elapsed_s = left - started

    if config.sigterm_after is not None:
        with trio.move_on_after(config.shutdown_grace + 10):
            report.exit_status = await daemon.process.wait()
        assert run.sigterm_at is not None
        if report.exit_status is not None and run.exited_at is not None:
            report.exit_s = run.exited_at - run.sigterm_at
        with trio.move_on_after(5):
            await daemon.wait_for("stopped")
        return

    # The idle baseline again, within a second of the last client leaving.
    for _ in range(int(config.fd_settle_s * 100) + 1):
        report.fd_after = open_fds(pid)
        if report.fd_after <= report.fd_baseline:
            report.fd_settle_s = trio.current_time() - left
            break
        await trio.sleep(0.01)
    connected = sum(1 for s in report.sessions if s.peer is not None)
    with trio.move_on_after(10):
        await daemon.wait_for("connection_closed", connected)
    report.rss_after = rss_bytes(pid)
    stopping = trio.current_time()
    report.exit_status = await daemon.stop()
    report.exit_s = trio.current_time() - stopping


async def _sigterm(run: _Run, daemon: Daemon, at: float) -> None:
    await trio.sleep_until(at)
    run.stopping.set()  # from here on, no new connections and no half-closes
    run.stop_canary.set()
    run.sigterm_at = run.report.sigterm_at = trio.current_time()
    daemon.send_signal(signal.SIGTERM)
    await daemon.process.wait()
    run.exited_at = trio.current_time()


def _judge(report: SoakReport, daemon: Daemon) -> None:
    """Match connections with their ``connection_closed`` records; list what is wrong."""
    config = report.config
    shutdown = config.sigterm_after is not None
    problems = report.problem_list
    closed = daemon.events("connection_closed")
    report.closed_records = len(closed)
    by_peer: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in closed:
        by_peer[record["peer"]].append(record)
    for s in sorted(report.sessions, key=lambda s: s.started):
        if s.peer is not None and by_peer.get(s.peer):
            s.record = by_peer[s.peer].pop(0)
    unmatched = [record for left in by_peer.values() for record in left]
    report.unmatched_records = len(unmatched)
    if unmatched:
        problems.append(
            f"{len(unmatched)} connection_closed records match no client, e.g. {unmatched[:3]}"
        )

    for s in report.sessions:
        problems.extend(_check_session(s, config, report.sigterm_at))

    if report.echo_cut_by_close:
        # The server's lingering close must deliver every echo it logged.
        problems.append(
            f"{report.echo_cut_by_close} clients received less than bytes_out of their echo"
        )

    tracebacks = daemon.stderr_text().count("Traceback")
    report.stderr_tracebacks = tracebacks
    if tracebacks:
        problems.append(f"{tracebacks} tracebacks on the server's stderr")
    errors = [r for r in closed if r["reason"] == "error"]
    if errors:
        problems.append(f"{len(errors)} connections closed with reason error")

    canary = report.canary
    if not shutdown:
        if canary["failures"]:
            problems.append(f"{canary['failures']} canary probes failed")
        if canary["max_ms"] > config.canary_max_s * 1000:
            problems.append(
                f"canary max latency {canary['max_ms']} ms > {config.canary_max_s * 1000:g} ms"
            )
        expected_probes = report.elapsed_s / config.canary_interval
        if canary["probes"] < 0.8 * expected_probes:
            problems.append(f"only {canary['probes']} canary probes in {report.elapsed_s:.1f} s")
        if report.fd_settle_s is None:
            problems.append(
                f"server fds {report.fd_after} > baseline {report.fd_baseline}"
                f" {config.fd_settle_s} s after the clients left"
            )
        growth = report.rss_growth
        if growth is None:
            problems.append("RSS was not measured (run shorter than the warm-up?)")
        elif growth > config.rss_bound_mib * MIB:
            problems.append(
                f"RSS grew {growth / MIB:.1f} MiB after warm-up > {config.rss_bound_mib} MiB"
            )
        if report.exit_status != 0:
            problems.append(f"server exit status {report.exit_status} on SIGTERM after the run")
        return

    # Shutdown under load: exit 0 within the grace plus a second, every
    # handler finished before the process said it stopped.
    if report.exit_status != 0:
        problems.append(f"exit status {report.exit_status} after SIGTERM, not 0")
    if report.exit_s is None or report.exit_s > config.shutdown_grace + 1:
        problems.append(
            f"exited {report.exit_s} s after SIGTERM; the bound is the grace"
            f" {config.shutdown_grace} s + 1 s"
        )
    names = [r["event"] for r in daemon.records]
    if "stopped" not in names:
        problems.append("no stopped record")
        return
    stopped_at = names.index("stopped")
    opened = {r["conn_id"] for r in daemon.events("connection_opened")}
    closed_ids = {r["conn_id"] for r in closed}
    report.handlers_unfinished = sorted(opened - closed_ids)
    if report.handlers_unfinished:
        problems.append(f"handlers never closed: conn_ids {report.handlers_unfinished[:10]}")
    report.closed_after_stopped = sum(1 for n in names[stopped_at:] if n == "connection_closed")
    if report.closed_after_stopped:
        problems.append(f"{report.closed_after_stopped} connections closed after stopped")
    report.served_reported = daemon.events("stopped")[0]["connections_served"]
    if report.served_reported != len(closed):
        problems.append(
            f"stopped says {report.served_reported} served, {len(closed)} connection_closed"
        )


def _check_session(s: Session, config: SoakConfig, sigterm_at: float | None) -> list[str]:
    shutdown = sigterm_at is not None
    where = f"{s.kind.value} {s.peer}"
    problems = []
    echo, record = s.echo, s.record
    if echo is not None and echo.mismatch_at is not None:
        problems.append(
            f"{where}: echo differs from what was sent at byte {echo.mismatch_at}"
            f" (sent {len(echo.sent)}, received {echo.received})"
        )
    if s.outcome.startswith(("error", "stuck", "connect failed", "sent ", "no answer")):
        # A connection the shutdown caught mid-way may see its echo cut
        # short or the connection refused; the prefix check above still holds.
        cut_by_shutdown = sigterm_at is not None and s.ended >= sigterm_at
        if s.outcome.startswith("stuck") or not cut_by_shutdown:
            problems.append(f"{where}: {s.outcome}")
    if s.peer is None:
        return problems
    if record is None:
        # Shutdown mode: a connection still in the backlog when the listener
        # closed was never accepted; the kernel reset it.
        if not (shutdown and (echo is None or echo.received == 0)):
            problems.append(f"{where}: no connection_closed record")
        return problems

    reason = record["reason"]
    expected = {EXPECTED_REASON[s.kind]}
    slow_client = (
        s.kind is Kind.WELL_BEHAVED
        and reason == "read_timeout"
        and s.longest_line_s >= config.read_timeout
    )
    if slow_client:
        # It took longer than the read timeout to send a line: the deadline
        # did its job. What must hold is that exactly the lines it finished
        # in time came back, and no byte of the one that was cut.
        sent = bytes(echo.sent[: record["bytes_in"]]) if echo is not None else b""
        complete = sent.rfind(b"\n") + 1
        if record["bytes_out"] != complete:
            problems.append(
                f"{where}: cut by its read deadline after {record['bytes_in']} bytes,"
                f" echoed {record['bytes_out']}, expected its {complete} bytes of whole lines"
            )
        if echo is not None and echo.received != record["bytes_out"]:
            problems.append(
                f"{where}: received {echo.received} bytes, the server sent {record['bytes_out']}"
            )
        return problems
    if shutdown:
        if s.kind is Kind.WELL_BEHAVED:
            expected = {"eof", "shutdown"} if s.eof_sent else {"shutdown"}
        else:
            expected |= {"shutdown"}
    if reason not in expected:
        why = ""
        if s.kind is Kind.WELL_BEHAVED and reason == "read_timeout":
            why = (
                f" (its longest pause between two sends: {s.longest_pause:.3f} s,"
                f" its longest line: {s.longest_line_s:.3f} s)"
            )
        problems.append(
            f"{where}: closed with {reason}, expected {' or '.join(sorted(expected))}{why}"
        )
    if s.kind in (Kind.WELL_BEHAVED, Kind.HALF_CLOSE_PARTIAL, Kind.CANARY) and (
        record["bytes_out"] != record["bytes_in"]
    ):
        problems.append(
            f"{where}: server read {record['bytes_in']} bytes and echoed {record['bytes_out']}"
        )
    if echo is None:
        return problems
    if echo.received > record["bytes_out"]:
        problems.append(
            f"{where}: received {echo.received} bytes, the server logged {record['bytes_out']}"
        )
    if shutdown and reason == "shutdown":
        return problems  # a prefix is all that is promised
    must = s.owed()
    if echo.received != must:
        problems.append(f"{where}: received {echo.received} bytes of echo, expected {must}")
    return problems
