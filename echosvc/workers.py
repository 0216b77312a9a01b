"""The supervisor-worker wire protocol: both ends of it, in one place.

A worker is `echosvc.daemon` started by `echosvc.supervisor`. The two talk
over three channels, all set up by the supervisor at the spawn:

* **The environment**, once. ``_ECHOSVC_WORKER`` holds the worker's index
  (and tells the process it is a worker), ``_ECHOSVC_LISTEN_FDS`` the
  inherited sockets to serve under socket activation, ``NOTIFY_SOCKET`` the
  supervisor's socket for this one process. The ``ECHOSVC_*`` settings are
  the supervisor's own, as `echosvc.config.environment_for` writes them.
* **Orders, down the worker's stdin**, one line each: ``VERB [SIGNAL]\\n``.
  ``stop`` drains, ``force`` stops at once, ``reload`` reloads (`Verb`);
  ``SIGNAL`` names the signal the supervisor got, empty when it decided by
  itself. EOF means the supervisor is gone: stop. Orders travel down a pipe,
  not as signals, so that one request stays one: a worker runs in a process
  group of its own, which a Ctrl-C on the terminal does not reach, and it
  ignores the signals that do reach it (systemd's default
  ``KillMode=control-group`` signals every process of the unit). A reader
  ignores verbs it does not know.
* **Reports, up the notify socket**: sd_notify(3) datagrams, exactly what
  the worker would tell systemd (``READY=1``, ``STATUS=``, ``STOPPING=1``),
  plus a ``WATCHDOG=1`` heartbeat every `HEARTBEAT_INTERVAL_S` from the
  worker's own Trio loop, its counters as ``X_ECHOSVC_*`` (sd_notify
  leaves ``X_`` names to applications), and ``X_ECHOSVC_RELOADED=1`` once
  it has carried out a ``reload`` order that had something to reload (the
  supervisor's ``READY=1`` after ``RELOADING=1`` waits for every worker's).
  Every process gets a socket of its own, so a report is never credited to
  the wrong process, and a heartbeat a dead one left queued cannot keep its
  successor alive.

A question that wants an answer is an order carrying an id: ``stats 7``
asks for the worker's metrics, answered by a report of the same id on the
same socket (``X_ECHOSVC_STATS=7 [...]``, the families as one line of JSON,
`echosvc.metrics.encode_families`). The supervisor awaits it under a
deadline (1 s, `echosvc.metrics.WORKER_ANSWER_S`); a worker that cannot
answer in time is missing from that scrape, nothing more. `REPORT_MAX_BYTES`
leaves room: an answer is about 10 KiB.

The grammar is sans-IO (`OrderDecoder`, `parse_report`); the functions
around it do each end's I/O. `StopControl`, which turns requests (signals
or orders) into one graceful stop, then a forced one, is here because both
ends use it.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from enum import StrEnum

import attrs
import structlog
import trio

from . import systemd

__all__ = [
    "HEARTBEAT_INTERVAL_S",
    "LISTEN_FDS_ENV",
    "WORKER_ENV",
    "Heartbeats",
    "Order",
    "OrderDecoder",
    "Report",
    "StopControl",
    "Verb",
    "counters",
    "describe_signal",
    "obey",
    "open_report_socket",
    "parse_report",
    "send_order",
    "stats_answer",
    "worker_argv",
    "worker_environment",
]

WORKER_ENV = "_ECHOSVC_WORKER"
LISTEN_FDS_ENV = "_ECHOSVC_LISTEN_FDS"
# The whole Config as JSON (config.config_to_json): a worker starts straight
# into the daemon, with no command line to parse and no CLI to import.
CONFIG_ENV = "_ECHOSVC_CONFIG"

# "At least once a second" (DESIGN.md) with room for one late beat; the
# shortest --worker-timeout allowed (1 s, `echosvc.config`) is two of these.
HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT = "WATCHDOG=1"
ACTIVE_KEY = "X_ECHOSVC_ACTIVE"
SERVED_KEY = "X_ECHOSVC_SERVED"
STATS_KEY = "X_ECHOSVC_STATS"
# A worker has carried out a reload order (its own records say how it went).
RELOADED = "X_ECHOSVC_RELOADED=1"
# Far above any report sent today; a statistics snapshot fits. (An AF_UNIX
# datagram may be this large: the limit is the socket buffer, ~200 KiB.)
REPORT_MAX_BYTES = 65536
# An order line is a few bytes; a longer one is garbage, not an order.
_ORDER_MAX_BYTES = 1024


class Verb(StrEnum):
    """What an order asks of a worker."""

    STOP = "stop"  # drain, as on a first SIGTERM
    FORCE = "force"  # stop at once, as on a second
    RELOAD = "reload"  # as on SIGHUP
    STATS = "stats"  # answer with your metrics; the argument is the question's id


_VERBS = {verb.value for verb in Verb}


@attrs.frozen
class Order:
    verb: Verb
    # The signal the supervisor got; for ``stats``, the question's id.
    signal: str | None = None

    def encode(self) -> bytes:
        return f"{self.verb} {self.signal or ''}\n".encode()


class OrderDecoder:
    """Bytes from the supervisor in, `Order` objects out."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes | bytearray) -> list[Order]:
        *lines, self._buffer = (self._buffer + bytes(data)).split(b"\n")
        if len(self._buffer) > _ORDER_MAX_BYTES:
            self._buffer = b""
        orders = []
        for line in lines:
            word, _, name = line.decode("ascii", errors="replace").strip().partition(" ")
            if word in _VERBS:
                orders.append(Order(Verb(word), name.strip() or None))
        return orders


@attrs.frozen
class Report:
    """What one notify datagram from a worker says (None: not said)."""

    ready: bool = False
    heartbeat: bool = False
    active: int | None = None
    served: int | None = None
    # The answer to a ``stats`` question: its id and the metrics, as sent.
    stats: tuple[int, str] | None = None
    reloaded: bool = False


def parse_report(datagram: bytes) -> Report:
    ready = heartbeat = reloaded = False
    active = served = None
    stats = None
    for assignment in datagram.decode(errors="replace").split("\n"):
        key, _, value = assignment.partition("=")
        if assignment == "READY=1":
            ready = True
        elif assignment == HEARTBEAT:
            heartbeat = True
        elif assignment == RELOADED:
            reloaded = True
        elif key == ACTIVE_KEY and value.isdigit():
            active = int(value)
        elif key == SERVED_KEY and value.isdigit():
            served = int(value)
        elif key == STATS_KEY:
            question, _, answer = value.partition(" ")
            if question.isdigit():
                stats = (int(question), answer)
    return Report(
        ready=ready,
        heartbeat=heartbeat,
        active=active,
        served=served,
        stats=stats,
        reloaded=reloaded,
    )


# --- the supervisor's end ----------------------------------------------------


def worker_argv() -> list[str]:
    """The command that starts a worker (spawn it in a process group of its own)."""
    return [sys.executable, "-m", "echosvc", "serve"]


def worker_environment(
    base: Mapping[str, str],
    settings: Mapping[str, str],
    *,
    index: int,
    notify_socket: str,
    listen_fds: list[int],
    config_json: str | None = None,
) -> dict[str, str]:
    """A worker's environment: ``base`` without our variables, then ``settings``.

    ``config_json`` (`echosvc.config.config_to_json`) lets the worker skip
    the command line, and typer, click and rich with it.
    """
    env = {
        key: value
        for key, value in base.items()
        if not key.startswith(("ECHOSVC_", "WATCHDOG_", "NOTIFY_SOCKET", "_ECHOSVC_"))
    }
    env.update(settings)
    env[WORKER_ENV] = str(index)
    env["NOTIFY_SOCKET"] = notify_socket
    if listen_fds:
        env[LISTEN_FDS_ENV] = ",".join(str(fd) for fd in listen_fds)
    if config_json is not None:
        env[CONFIG_ENV] = config_json
    return env


def open_report_socket(index: int) -> tuple[socket.socket, str]:
    """A bound, non-blocking socket for one worker process, and its ``NOTIFY_SOCKET``.

    Abstract (Linux): nothing to clean up in the file system, whatever happens.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    name = f"echosvc-{os.getpid()}-{os.urandom(4).hex()}-{index}"
    try:
        sock.bind("\0" + name)
    except BaseException:
        sock.close()
        raise
    return sock, "@" + name


def send_order(process: trio.Process, order: Order) -> bool:
    """Write ``order`` down the worker's stdin without waiting.

    Returns ``False`` if it could not be delivered: the worker has exited,
    or it has left 64 KiB of orders unread (it is wedged, and its heartbeat
    timeout deals with it).
    """
    if process.returncode is not None or not isinstance(process.stdin, trio.lowlevel.FdStream):
        return False
    # Trio made the pipe non-blocking, and an order is shorter than PIPE_BUF:
    # one write, whole or not at all.
    try:
        os.write(process.stdin.fileno(), order.encode())
    except OSError:  # EPIPE: it has just exited; EAGAIN: the pipe is full
        return False
    return True


# --- the worker's end ----------------------------------------------------------


def counters(active: int, served: int) -> list[str]:
    """The assignments that report a worker's counts to its supervisor."""
    return [f"{ACTIVE_KEY}={active}", f"{SERVED_KEY}={served}"]


class Heartbeats:
    """A worker's heartbeat to its supervisor, and its status on the same beat.

    `run` proves to the supervisor that this Trio loop runs, every
    `HEARTBEAT_INTERVAL_S`, until cancelled. Once `status` is set (the worker
    is listening), every beat that falls on `systemd.STATUS_INTERVAL_S` also
    sends the status if it changed, as `systemd.report_status` would: one
    task and one wake-up for both, since an idle worker's CPU is its
    periodic wake-ups (C250K in bench/RESULTS.md: about 0.0015 cores a
    worker, whatever its connections).
    """

    def __init__(self, notifier: systemd.Notifier) -> None:
        self.notifier = notifier
        self.status: Callable[[], list[str]] | None = None

    async def run(self) -> None:
        every = max(1, round(systemd.STATUS_INTERVAL_S / HEARTBEAT_INTERVAL_S))
        last: list[str] = []
        for beat in itertools.count():
            self.notifier.send(HEARTBEAT)
            if self.status is not None and beat % every == 0:
                current = self.status()
                if current != last:
                    self.notifier.send(*current)
                    last = current
            await trio.sleep(HEARTBEAT_INTERVAL_S)


def stats_answer(question: str, metrics: str) -> str:
    """The report that answers ``stats QUESTION`` with ``metrics`` (one line)."""
    return f"{STATS_KEY}={question} {metrics}"


async def obey(
    orders: trio.abc.ReceiveStream,
    control: StopControl,
    *,
    stats: Callable[[str], None] | None = None,
) -> None:
    """Carry out the supervisor's orders until its end of the pipe closes, then stop.

    ``stats(question)`` answers a ``stats`` order (without it, none is answered).
    """
    decoder = OrderDecoder()
    while chunk := await orders.receive_some():
        for order in decoder.feed(chunk):
            if order.verb is Verb.STOP:
                control.request(order.signal, escalate=False)
            elif order.verb is Verb.FORCE:
                if not control.stopping:
                    control.request(order.signal)
                control.request(order.signal)
            elif order.verb is Verb.STATS:
                if stats is not None and order.signal is not None and order.signal.isdigit():
                    stats(order.signal)
            else:
                control.reload(order.signal)
    control.request(None, escalate=False)


# --- both ends ------------------------------------------------------------------


class StopControl:
    """Turns requests into actions: one graceful stop, then a forced one.

    Requests come from signals (SIGTERM, SIGINT; SIGHUP to reload) or, in a
    worker, only from the supervisor's orders (`obey`). The first stop
    request logs ``shutdown_started``, sends ``STOPPING=1`` and calls
    ``stop``; a second one, unless it says ``escalate=False``, logs
    ``shutdown_forced`` and calls ``force``. A reload request calls
    ``reload``, whatever the state.
    """

    def __init__(
        self,
        notifier: systemd.Notifier,
        *,
        active: Callable[[], int],
        grace_s: float,
        stop: Callable[[str | None], None],
        force: Callable[[str | None], None],
        reload: Callable[[str | None], None],
    ) -> None:
        self._notifier = notifier
        self._active = active
        self._grace_s = grace_s
        self._stop = stop
        self._force = force
        self.reload = reload
        self._log = structlog.get_logger("echosvc")
        self.stopping = False

    def request(self, signal_name: str | None, *, escalate: bool = True) -> None:
        """A stop request; ``escalate=False`` never turns it into a forced stop."""
        if not self.stopping:
            self.stopping = True
            self._log.info(
                "shutdown_started", signal=signal_name, active=self._active(), grace_s=self._grace_s
            )
            self._notifier.send("STOPPING=1")
            self._stop(signal_name)
        elif escalate:
            self._log.warning("shutdown_forced", signal=signal_name, active=self._active())
            self._force(signal_name)

    async def watch_signals(self, signals: AsyncIterator[int]) -> None:
        """Run until cancelled (by whoever sees the drain finish)."""
        async for signum in signals:
            if signum == signal.SIGHUP:
                self.reload(describe_signal(signum))
            else:
                self.request(describe_signal(signum))


def describe_signal(signum: int) -> str:
    """``SIGKILL`` for the signals Python names, ``signal 35`` for the others.

    `signal.Signals` has no member for most real-time signals (``RTMIN+1``):
    a name must never be what raises.
    """
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
