"""Prometheus metrics: collectors over a server's figures, and the scrape endpoint.

The figures already exist: `Server.statistics` is a frozen snapshot of the
server's running totals, and `trio.lowlevel.current_statistics` describes
the run loop. This module only *reads* them, at scrape time, through custom
`prometheus_client` collectors -- no counter is incremented twice and
nothing is registered in prometheus_client's process-global ``REGISTRY``:

* `ServerCollector` turns one server's snapshot (and its UDP echo's) into
  the ``echosvc_*`` connection series and ``echosvc_build_info``; a library
  user registers it in a registry of their own.
* `LoopCollector` exposes the Trio run loop (tasks living, runnable, waiting
  for I/O) and the event-loop lag that a `LoopMonitor` measures: a task that
  wakes up every 0.1 s and records how late it ran. A blocked or saturated
  loop makes every wake-up late, so it shows there before anywhere else.
* `daemon_registry` is the daemon's registry: both of the above plus
  prometheus_client's own process, platform and garbage-collector
  collectors (the process one made to work under systemd's ``ProcSubset=pid``).
* `WorkersView` is a supervisor's: each scrape asks every worker for its
  families at once (`encode_families`, one line of JSON), gives each
  `WORKER_ANSWER_S`, labels what came back ``worker`` and adds
  ``echosvc_worker_up``; a worker that did not answer is up 0, its series
  missing, and the scrape is on time all the same.

Both collectors read Trio state, which belongs to the Trio thread. Called
from another thread (prometheus_client's threaded ``start_http_server`` in an
application that embeds echosvc), they hop into the Trio run with
`trio.from_thread.run_sync` to take their snapshot.

The endpoint (`serve_metrics`) is a small HTTP/1.1 server on listeners of
its own, parsed with h11 (sans-IO, the HTTP library made for Trio): ``GET``
and ``HEAD /metrics`` answer in the text format or, when ``Accept`` asks
for it, OpenMetrics -- both written by `prometheus_client.exposition`, never
by hand. Each connection is its own task with one deadline of
`SCRAPE_TIMEOUT_S` for the whole exchange and a request head of at most
`MAX_HEAD_BYTES`, so a stuck or hostile scraper holds one task for ten
seconds at most and never delays another. One request per connection
(``Connection: close``): a scrape every few seconds does not need
keep-alive, and an idle keep-alive connection would need a timeout of its
own.

What is exposed is a function of its source: a `prometheus_client` collector
(usually a registry), or an async callable returning one -- the seam through
which a supervisor gathers its workers' figures before answering.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import http
import json
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol, TypeVar

import attrs
import h11
import structlog
import trio
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._version import __version__
from .config import CloseReason
from .server import ServerStatistics
from .udp import DropCause, UdpEcho, UdpStatistics

__all__ = [
    "LAG_INTERVAL_S",
    "MAX_HEAD_BYTES",
    "SCRAPE_TIMEOUT_S",
    "WORKER_ANSWER_S",
    "LoopCollector",
    "LoopMonitor",
    "SandboxedProcessCollector",
    "ServerCollector",
    "Source",
    "WorkersView",
    "daemon_registry",
    "decode_families",
    "encode_families",
    "handle_scrape",
    "serve_metrics",
]

_log = structlog.get_logger("echosvc")

# DESIGN.md: one deadline for the whole request, and a bounded head.
SCRAPE_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 8192

# How often the loop monitor wakes up, and how many of its measurements the
# lag gauge looks back over: 150 wake-ups, at least the last 15 s -- as long
# as the scrape interval commonly used (and the one deploy/README suggests),
# so a short block between two scrapes is still seen by the next one.
LAG_INTERVAL_S = 0.1
LAG_WINDOW = 150

# Scrapes served at once. A scrape takes milliseconds; the cap only matters
# when connections sit idle, each for SCRAPE_TIMEOUT_S at most, so past it
# new scrapers wait in the kernel's backlog for seconds, not forever, and a
# flood of idle connections cannot take a descriptor per connection.
MAX_CONCURRENT_SCRAPES = 64

# After the response: how long to read and drop what the client still sends
# (a body we did not ask for), so that closing with unread input does not
# reset the connection and lose the response on its way (Apache's lingering
# close, as connection.py does for the echo).
_LINGER_S = 1.0

# accept(2) out of descriptors or memory: the connection stays queued, so
# back off and retry (server.py's list and Go's 5 ms..1 s back-off); the
# echo port's accept loop logs such episodes already.
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_FIRST_BACKOFF_S = 0.005
_MAX_BACKOFF_S = 1.0

_RECEIVE_SIZE = 4096
_METRICS_PATH = "/metrics"
_ALLOWED = "GET, HEAD"

_T = TypeVar("_T")


class HasStatistics(Protocol):
    """Anything with a `Server`-like ``statistics()``."""

    def statistics(self) -> ServerStatistics: ...


#: What the endpoint exposes: a collector (a `CollectorRegistry` is one), or
#: an async callable that returns one for each scrape.
Source = Collector | Callable[[], Awaitable[Collector]]


class _InTrio:
    """Runs snapshots in the Trio thread of the run this object was made in."""

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()

    def call(self, function: Callable[[], _T]) -> _T | None:
        """``function()`` in the Trio thread; None once that run has ended."""
        try:
            if trio.lowlevel.current_trio_token() is self._token:
                return function()
        except RuntimeError:
            pass  # not in a Trio thread at all
        try:
            return trio.from_thread.run_sync(function, trio_token=self._token)
        except trio.RunFinishedError:
            return None


# --- the server's series --------------------------------------------------------


class ServerCollector(Collector):
    """A `prometheus_client` collector over one server's `statistics()`.

    Register it in a registry of your own; nothing process-global is used::

        registry = prometheus_client.CollectorRegistry()
        registry.register(echosvc.metrics.ServerCollector(server))

    Every scrape reads one snapshot, so the series of one scrape agree with
    each other. Make it in the server's Trio run (it remembers which); it
    may then be collected from any thread.

    Args:
      server: an `echosvc.Server`, or anything with its ``statistics()``.

    """

    def __init__(self, server: HasStatistics) -> None:
        self._server = server
        self._trio = _InTrio()

    def describe(self) -> Iterable[Metric]:
        # The names, without asking the server, for the registry's
        # duplicate check.
        empty = ServerStatistics(active=0, served=0, limit=0, accepting=True)
        udp = UdpStatistics(echoed=0, dropped={}, sources=0) if self._udp() else None
        return server_families(empty, udp)

    def collect(self) -> Iterable[Metric]:
        snapshot = self._trio.call(self._snapshot)
        return [] if snapshot is None else server_families(*snapshot)

    def _udp(self) -> UdpEcho | None:
        udp: UdpEcho | None = getattr(self._server, "udp", None)
        return udp

    def _snapshot(self) -> tuple[ServerStatistics, UdpStatistics | None]:
        udp = self._udp()
        return self._server.statistics(), None if udp is None else udp.statistics()


def server_families(stats: ServerStatistics, udp: UdpStatistics | None = None) -> list[Metric]:
    """The ``echosvc_*`` families of one statistics snapshot (and its UDP echo's)."""
    accepted = CounterMetricFamily(
        "echosvc_connections_accepted",
        "Connections accepted since the server started.",
        value=stats.accepted,
    )
    active = GaugeMetricFamily(
        "echosvc_connections_active",
        "Connections being served now (capacity tokens taken).",
        value=stats.active,
    )
    limit = GaugeMetricFamily(
        "echosvc_connections_limit",
        "Connections served at once at most (--max-connections); at the limit"
        " new clients wait in the listen backlog.",
        value=stats.limit,
    )
    closed = CounterMetricFamily(
        "echosvc_connections_closed",
        "Connections closed, by the reason of connection_closed.",
        labels=["reason"],
    )
    # Every reason from the start, at 0: a rate() over a series that appears
    # only at its first increment misses that increment.
    for reason in CloseReason:
        closed.add_metric([reason.value], stats.closed.get(reason.value, 0))
    duration = HistogramMetricFamily(
        "echosvc_connection_duration_seconds",
        "How long closed connections lasted, from accept to the reason for closing.",
        buckets=[(_le(le), count) for le, count in stats.duration.buckets] or [("+Inf", 0)],
        sum_value=stats.duration.sum_s,
        unit="seconds",
    )
    lines = CounterMetricFamily(
        "echosvc_lines",
        "Lines echoed, over closed connections (a final unterminated line included).",
        value=stats.lines,
    )
    received = CounterMetricFamily(
        "echosvc_received_bytes",
        "Echo payload received, over closed connections (PROXY headers not included).",
        value=stats.bytes_in,
        unit="bytes",
    )
    sent = CounterMetricFamily(
        "echosvc_sent_bytes",
        "Echo payload sent (completed sends only), over closed connections.",
        value=stats.bytes_out,
        unit="bytes",
    )
    failures = CounterMetricFamily(
        "echosvc_accept_failures",
        "accept() calls that failed for want of file descriptors or memory (each retry).",
        value=stats.accept_failures,
    )
    families = [accepted, active, limit, closed, duration, lines, received, sent, failures]
    families.append(build_info())
    if udp is not None:
        datagrams = CounterMetricFamily(
            "echosvc_udp_datagrams",
            "UDP datagrams received, by what became of them: echoed, or the cause"
            " they were dropped without a reply (as in udp_dropped).",
            labels=["result"],
        )
        datagrams.add_metric(["echoed"], udp.echoed)
        for cause in DropCause:
            datagrams.add_metric([cause.value], udp.dropped.get(cause.value, 0))
        sources = GaugeMetricFamily(
            "echosvc_udp_sources",
            "Sources the UDP rate limiter tracks now; its table is bounded (65,536 by"
            " default), past that new sources share one bucket.",
            value=udp.sources,
        )
        families += [datagrams, sources]
    return families


def build_info() -> Metric:
    """``echosvc_build_info{version}``, an info metric (a gauge of 1 in the text format)."""
    return InfoMetricFamily(
        "echosvc_build", "The echosvc version serving.", value={"version": __version__}
    )


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it: ``0.005``, ``1.0``, ``+Inf``."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


# --- the run loop -----------------------------------------------------------------


class LoopMonitor:
    """Measures how late the Trio loop runs a periodic wake-up.

    `run` sleeps until a deadline `LAG_INTERVAL_S` ahead, again and again,
    and records by how much each wake-up missed its deadline. `lag` is the
    worst of the last `LAG_WINDOW` measurements (at least 15 s), or how
    overdue the pending wake-up already is, if that is worse: a scrape that
    was itself held up by a blocked loop reports that block.

    Call `lag` from the Trio thread (`LoopCollector` does).
    """

    def __init__(self, interval: float = LAG_INTERVAL_S, window: int = LAG_WINDOW) -> None:
        self.interval = interval
        self._lags: deque[float] = deque(maxlen=window)
        self._due: float | None = None

    async def run(self) -> None:
        """Measure until cancelled."""
        while True:
            self._due = trio.current_time() + self.interval
            await trio.sleep_until(self._due)
            self._lags.append(max(trio.current_time() - self._due, 0.0))

    def lag(self) -> float:
        """The worst lateness in the window, in seconds (0 before the first)."""
        overdue = 0.0 if self._due is None else trio.current_time() - self._due
        return max(overdue, *self._lags, 0.0)


class LoopCollector(Collector):
    """The Trio run loop as ``echosvc_trio_*`` gauges and the event-loop lag.

    Args:
      monitor: a `LoopMonitor` running in this Trio run, for
          ``echosvc_event_loop_lag_seconds``; without one that series is
          left out.

    Make it in the Trio run it describes; it may be collected from any thread.
    """

    def __init__(self, monitor: LoopMonitor | None = None) -> None:
        self._monitor = monitor
        self._trio = _InTrio()

    def describe(self) -> Iterable[Metric]:
        return loop_families(_LoopSnapshot(0, 0, 0, 0, 0.0 if self._monitor else None))

    def collect(self) -> Iterable[Metric]:
        snapshot = self._trio.call(self._snapshot)
        return [] if snapshot is None else loop_families(snapshot)

    def _snapshot(self) -> _LoopSnapshot:
        stats = trio.lowlevel.current_statistics()
        io = stats.io_statistics
        return _LoopSnapshot(
            living=stats.tasks_living,
            runnable=stats.tasks_runnable,
            # epoll and Windows count readers and writers; kqueue does not.
            waiting_read=getattr(io, "tasks_waiting_read", None),
            waiting_write=getattr(io, "tasks_waiting_write", None),
            lag=None if self._monitor is None else self._monitor.lag(),
        )


@attrs.frozen
class _LoopSnapshot:
    living: int
    runnable: int
    waiting_read: int | None
    waiting_write: int | None
    lag: float | None


def loop_families(loop: _LoopSnapshot) -> list[Metric]:
    families: list[Metric] = [
        GaugeMetricFamily(
            "echosvc_trio_tasks_living",
            "Trio tasks alive in this process (one per connection, plus a few).",
            value=loop.living,
        ),
        GaugeMetricFamily(
            "echosvc_trio_tasks_runnable",
            "Trio tasks ready to run, waiting for their turn on the loop.",
            value=loop.runnable,
        ),
    ]
    if loop.waiting_read is not None:
        families.append(
            GaugeMetricFamily(
                "echosvc_trio_tasks_waiting_read",
                "Trio tasks waiting in Trio's I/O manager for a socket to become readable"
                " (listeners; connections too, unless parked on echosvc's netpoller).",
                value=loop.waiting_read,
            )
        )
    if loop.waiting_write is not None:
        families.append(
            GaugeMetricFamily(
                "echosvc_trio_tasks_waiting_write",
                "Trio tasks waiting in Trio's I/O manager for a socket to become writable"
                " (clients slow to read, unless parked on echosvc's netpoller).",
                value=loop.waiting_write,
            )
        )
    if loop.lag is not None:
        families.append(
            GaugeMetricFamily(
                "echosvc_event_loop_lag_seconds",
                f"Worst lateness of the event loop's {LAG_INTERVAL_S:g} s periodic wake-up"
                " over the last 15 s: a busy or blocked loop shows here first.",
                value=loop.lag,
                unit="seconds",
            )
        )
    return families


class SandboxedProcessCollector(ProcessCollector):
    """prometheus_client's ``process_*`` collector, working under ``ProcSubset=pid``.

    It reads the boot time from ``/proc/stat`` (for
    ``process_start_time_seconds``) and reports nothing at all without it;
    echosvc.service hides that file (``ProcSubset=pid``) while ``/proc/self``
    stays readable. The boot time is then the wall clock minus
    ``CLOCK_BOOTTIME``, which is what the kernel derives ``btime`` from.
    """

    def _boot_time(self) -> float:
        try:
            btime = super()._boot_time()  # type: ignore[no-untyped-call]
        except OSError:
            btime = None
        if btime:
            return float(btime)
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def daemon_registry(server: HasStatistics | None, monitor: LoopMonitor) -> CollectorRegistry:
    """The daemon's registry: the server, the run loop and the process.

    A registry of its own (never prometheus_client's global ``REGISTRY``),
    with prometheus_client's process (``process_*``: CPU, memory, open
    descriptors), platform (``python_info``) and garbage-collector
    (``python_gc_*``) collectors beside echosvc's. Without a server (a
    supervisor's own figures) the connection series are left out and
    ``echosvc_build_info`` stands alone.
    """
    registry = CollectorRegistry()
    registry.register(ServerCollector(server) if server is not None else _Fixed([build_info()]))
    registry.register(LoopCollector(monitor))
    # New instances: prometheus_client's module-level ones live in REGISTRY.
    SandboxedProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


# --- a supervisor's view of its workers ----------------------------------------------

#: How long a supervisor's scrape waits for each worker (DESIGN.md).
WORKER_ANSWER_S = 1.0


def encode_families(collector: Collector) -> str:
    """``collector``'s families as one line of JSON, for a worker's answer.

    Names, types, help, units and samples survive the trip (`decode_families`);
    timestamps and exemplars, which echosvc does not use, do not.
    """
    return json.dumps(
        [
            {
                "name": family.name,
                "help": family.documentation,
                "type": family.type,
                "unit": family.unit,
                "samples": [[s.name, s.labels, s.value] for s in family.samples],
            }
            for family in collector.collect()
        ],
        separators=(",", ":"),
    )


def decode_families(text: str) -> list[Metric]:
    """The families `encode_families` wrote.

    Raises:
      ValueError: ``text`` is not what it writes.

    """
    entries = json.loads(text)  # a JSONDecodeError is a ValueError
    if not isinstance(entries, list):
        # ValueError, not TypeError: to the caller, garbled is garbled.
        raise ValueError(f"not a metrics snapshot: a {type(entries).__name__}")  # noqa: TRY004
    try:
        families = []
        for entry in entries:
            family = Metric(entry["name"], entry["help"], entry["type"], entry["unit"])
            for name, labels, value in entry["samples"]:
                family.add_sample(str(name), {str(k): str(v) for k, v in labels.items()}, value)
            families.append(family)
    except (TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"not a metrics snapshot: {exc!r}") from None
    return families


def worker_families(
    answers: Sequence[Sequence[Metric] | None], own: Iterable[Metric] = ()
) -> list[Metric]:
    """One view of every worker: ``answers[i]`` is worker ``i``'s families, or
    None if it did not answer.

    Each answering worker's samples get ``worker="i"`` and the families of
    the same name are merged -- with ``own``, the supervisor's, whose samples
    keep their labels and come first -- since a name may appear once in an
    exposition; each worker's samples stay together, as OpenMetrics wants a
    label set's samples. ``echosvc_worker_up{worker}`` is 1 for a worker
    that answered and 0 for one that did not, whose series are then missing.
    """
    up = GaugeMetricFamily(
        "echosvc_worker_up",
        f"1 if the worker answered this scrape within {WORKER_ANSWER_S:g} s; 0 if not,"
        " and its series are missing from this scrape.",
        labels=["worker"],
    )
    merged: dict[str, Metric] = {}

    def family_like(family: Metric) -> Metric:
        into = merged.get(family.name)
        if into is None:
            into = merged[family.name] = Metric(
                family.name, family.documentation, family.type, family.unit
            )
        return into

    for family in own:
        family_like(family).samples.extend(family.samples)
    for index, families in enumerate(answers):
        up.add_metric([str(index)], 0 if families is None else 1)
        for family in families or ():
            into = family_like(family)
            for sample in family.samples:
                into.add_sample(sample.name, {**sample.labels, "worker": str(index)}, sample.value)
    return [up, *merged.values()]


class WorkersView:
    """A supervisor's `Source`: each scrape asks every worker, at once.

    Args:
      count: how many workers there are (indexes ``0`` to ``count - 1``).
      ask: ``await ask(i)`` is worker ``i``'s `encode_families` answer; it
          may raise `OSError`/`ValueError` (no such worker now) or take too
          long -- either way the worker is ``up`` 0 in that scrape.
      own: the supervisor's own collector (its process and run loop), whose
          series carry no ``worker`` label.

    """

    def __init__(self, count: int, ask: Callable[[int], Awaitable[str]], own: Collector) -> None:
        self._count = count
        self._ask = ask
        self._own = own

    async def __call__(self) -> Collector:
        answers: list[list[Metric] | None] = [None] * self._count

        async def one(index: int) -> None:
            # Gone, garbled or late: up 0, and its series are missing.
            with trio.move_on_after(WORKER_ANSWER_S), contextlib.suppress(OSError, ValueError):
                answers[index] = decode_families(await self._ask(index))

        async with trio.open_nursery() as nursery:
            for index in range(self._count):
                nursery.start_soon(one, index)
        return _Fixed(worker_families(answers, own=self._own.collect()))


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


# --- the endpoint ---------------------------------------------------------------


async def serve_metrics(listeners: Sequence[trio.SocketListener], source: Source) -> None:
    """Serve ``GET``/``HEAD /metrics`` on ``listeners`` until cancelled.

    The listeners are listening already, so a scrape that arrives before
    the accept loops run waits in the backlog: start it with ``start_soon``.

    Args:
      listeners: the endpoint's own listeners; ``serve_metrics`` takes
          ownership and closes them.
      source: what to expose: a collector (a registry), or an async
          callable returning one for each scrape.

    Resource handling:
      Each connection is its own task under one `SCRAPE_TIMEOUT_S` deadline
      and closed when it ends; cancelling the call closes every listener and
      connection.

    """
    limiter = trio.CapacityLimiter(MAX_CONCURRENT_SCRAPES)
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, source, limiter, nursery)
    finally:
        for listener in listeners:
            listener.socket.close()


async def _accept_loop(
    listener: trio.SocketListener,
    source: Source,
    limiter: trio.CapacityLimiter,
    handlers: trio.Nursery,
) -> None:
    delay = _FIRST_BACKOFF_S
    while True:
        token = object()
        await limiter.acquire_on_behalf_of(token)
        try:
            stream = await listener.accept()
        except OSError as exc:
            limiter.release_on_behalf_of(token)
            if exc.errno not in _CAPACITY_ERRNOS:
                raise
        except BaseException:
            limiter.release_on_behalf_of(token)
            raise
        else:
            delay = _FIRST_BACKOFF_S
            handlers.start_soon(_handle, stream, source, limiter, token, name="echosvc scrape")
            continue
        # Outside the except block, so a cancellation here is not mistaken
        # for the accept error.
        await trio.sleep(delay)
        delay = min(delay * 2, _MAX_BACKOFF_S)


async def _handle(
    stream: trio.SocketStream, source: Source, limiter: trio.CapacityLimiter, token: object
) -> None:
    try:
        await handle_scrape(stream, source)
    finally:
        limiter.release_on_behalf_of(token)


async def handle_scrape(stream: trio.abc.Stream, source: Source) -> None:
    """Answer one HTTP request on ``stream``, then close it.

    The whole exchange -- receiving the head, collecting, sending -- runs
    under one `SCRAPE_TIMEOUT_S` deadline; at the deadline the connection
    is closed with no answer. A head over `MAX_HEAD_BYTES` is answered 431,
    a malformed one 400, a path other than ``/metrics`` 404, a method other
    than ``GET`` and ``HEAD`` 405. An exception while collecting is a 500,
    logged (``metrics_scrape_failed``) with its traceback.

    Resource handling:
      ``stream`` is closed however this returns.

    """
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    try:
        with trio.move_on_after(SCRAPE_TIMEOUT_S):
            try:
                request = await _receive_request(stream, connection)
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                await _respond(stream, connection, status, *_plain(f"{exc}\n"))
                return
            if request is None:
                return  # the client hung up without asking
            status, headers, body = await _answer(request, source)
            if request.method == b"HEAD":
                # The headers a GET would get, Content-Length included.
                headers.append(("Content-Length", str(len(body))))
                body = b""
            await _respond(stream, connection, status, headers, body)
            with trio.move_on_after(_LINGER_S):
                await _drain(stream)
    except trio.BrokenResourceError:
        pass  # the scraper went away; there is no one left to answer
    finally:
        await trio.aclose_forcefully(stream)


async def _receive_request(
    stream: trio.abc.ReceiveStream, connection: h11.Connection
) -> h11.Request | None:
    """The request head, or None if the client closed before sending one."""
    # h11's own limit applies to what it buffers while the head is incomplete,
    # so a whole head that arrived in one read could exceed it: read no more
    # than MAX_HEAD_BYTES before the head is complete, and refuse past that.
    budget = MAX_HEAD_BYTES
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            if not budget:
                raise h11.RemoteProtocolError(
                    f"request head over {MAX_HEAD_BYTES} bytes", error_status_hint=431
                )
            data = await stream.receive_some(min(_RECEIVE_SIZE, budget))
            budget -= len(data)
            connection.receive_data(bytes(data))
        elif isinstance(event, h11.Request):
            return event
        else:  # ConnectionClosed before any request
            return None


async def _answer(request: h11.Request, source: Source) -> tuple[int, list[tuple[str, str]], bytes]:
    path = request.target.decode("ascii", "replace").partition("?")[0]
    if path != _METRICS_PATH:
        return (404, *_plain(f"not found; the metrics are at {_METRICS_PATH}\n"))
    if request.method not in (b"GET", b"HEAD"):
        status, headers, body = 405, *_plain(f"method not allowed; use {_ALLOWED}\n")
        return status, [*headers, ("Allow", _ALLOWED)], body
    fields = dict(request.headers)  # h11 lower-cases the names
    encoder, content_type = choose_encoder(fields.get(b"accept", b"").decode("latin-1"))
    try:
        registry = await source() if callable(source) else source
        body = encoder(registry)
    except Exception as exc:  # noqa: BLE001 -- answered 500, logged with its traceback
        # A bug in a collector must not end the endpoint, nor stay silent.
        _log.exception("metrics_scrape_failed", error=repr(exc))
        return (500, *_plain("internal error while collecting metrics\n"))
    headers = [("Content-Type", content_type)]
    if gzip_accepted(fields.get(b"accept-encoding", b"").decode("latin-1")):
        body = gzip.compress(body, compresslevel=6)
        headers.append(("Content-Encoding", "gzip"))
    return 200, headers, body


def _plain(text: str) -> tuple[list[tuple[str, str]], bytes]:
    return [("Content-Type", "text/plain; charset=utf-8")], text.encode()


async def _respond(
    stream: trio.abc.SendStream,
    connection: h11.Connection,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
) -> None:
    if not any(name == "Content-Length" for name, _ in headers):
        headers = [*headers, ("Content-Length", str(len(body)))]
    response = h11.Response(
        status_code=status,
        reason=http.HTTPStatus(status).phrase.encode(),
        headers=[*headers, ("Connection", "close")],
    )
    data = connection.send(response) or b""
    if body:
        data += connection.send(h11.Data(data=body)) or b""
    data += connection.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def _drain(stream: trio.abc.Stream) -> None:
    """Half-close, then read and drop until the client hangs up."""
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()
    while await stream.receive_some(_RECEIVE_SIZE):
        pass
