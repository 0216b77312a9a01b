"""The process around the server: logs, limits, signals and the service manager.

Everything process-global lives here and in `echosvc.supervisor` (the
library touches none of it): structlog's configuration, ``RLIMIT_NOFILE``,
signal handling, ``$LISTEN_FDS`` and ``$NOTIFY_SOCKET``.

Lifecycle: bind (or adopt inherited sockets) before anything else, so a bind
failure is one line and exit status 1; start `echosvc.serve`; log
``listening`` and send ``READY=1``. The first SIGTERM or SIGINT logs
``shutdown_started``, sends ``STOPPING=1`` and calls `Server.shutdown`; the
process exits 0 once the connections have drained. A second signal cancels
everything at once and the process exits 1. ``STATUS=`` and ``WATCHDOG=1``
are sent until the very end, through the shutdown grace.

SIGHUP is a reload request: it logs ``reload_requested`` and runs the
`Reloads` hooks, stopping nothing. The TLS stage registers one (its
certificates are read again, `echosvc.tls`); without TLS a SIGHUP changes
nothing. TLS files that cannot be used at start are exit status 2, before
anything is served.

A worker started by `echosvc.supervisor` is this same daemon, told so by
its environment (`echosvc.workers` has the protocol): it binds with
``SO_REUSEPORT`` (or adopts the sockets the supervisor passed), its notify
socket is the supervisor's, to which it also reports its counters and sends
a heartbeat from its loop, and it takes stop and reload requests from its
supervisor's orders only, never from signals. A ``stats`` order is
answered with the worker's metrics (`echosvc.metrics`), for its supervisor's
endpoint.

With ``--metrics`` (or an inherited socket named ``metrics``) the daemon
also serves the Prometheus endpoint of `echosvc.metrics`, on listeners of
its own in the same nursery, from before ``listening`` until the process
exits: scrapes go on through the shutdown grace.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

import structlog
import trio

from . import logs, systemd, workers
from .config import Config, config_from_json, split_host_port
from .listeners import (
    BindError,
    adopt_listeners,
    format_address,
    open_listeners,
    open_listeners_and_udp,
    take_datagram_sockets,
)
from .pipeline import Stage, stages_for
from .server import Server, serve
from .workers import LISTEN_FDS_ENV, WORKER_ENV, StopControl

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from .metrics import Source

__all__ = [
    "METRICS_FD_NAME",
    "Reloads",
    "metrics_listeners",
    "raise_open_files_limit",
    "run",
    "split_metrics_socket",
    "start_metrics",
    "take_inherited_sockets",
    "take_inherited_sockets_with_names",
]

# FileDescriptorName= of the inherited socket that serves the metrics.
METRICS_FD_NAME = "metrics"


def raise_open_files_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit, as Go does; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return hard


def take_inherited_sockets() -> list[socket.socket]:
    """The listening sockets a supervisor or systemd passed us, if any.

    Raises:
      ValueError: the variables describing them are malformed.

    """
    return [sock for sock, _ in take_inherited_sockets_with_names()]


def take_inherited_sockets_with_names() -> list[tuple[socket.socket, str]]:
    """`take_inherited_sockets`, each with its name (``$LISTEN_FDNAMES``).

    A supervisor passes its workers echo sockets only, named ``"unknown"``.

    Raises:
      ValueError: the variables describing them are malformed.

    """
    fds = os.environ.pop(LISTEN_FDS_ENV, None)
    if fds:
        try:
            numbers = [int(fd) for fd in fds.split(",")]
        except ValueError:
            raise ValueError(f"{LISTEN_FDS_ENV}={fds!r} is not a list of descriptors") from None
        return [(sock, "unknown") for sock in systemd.sockets_from_fds(numbers)]
    return systemd.listen_sockets_with_names()


def split_metrics_socket(
    named: list[tuple[socket.socket, str]],
) -> tuple[list[socket.socket], socket.socket | None]:
    """The echo sockets, and the one named `METRICS_FD_NAME` if there is one.

    Raises:
      ValueError: several sockets are named ``metrics``, it is not a stream
          socket, or it is the only one passed (nothing to echo on).

    """
    metrics = [sock for sock, name in named if name == METRICS_FD_NAME]
    echo = [sock for sock, name in named if name != METRICS_FD_NAME]
    for sock in metrics:
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(
                f"inherited fd {sock.fileno()} is named {METRICS_FD_NAME!r} but is not a"
                " stream socket (ListenStream= in the socket unit)"
            )
    if len(metrics) > 1:
        fds = ", ".join(str(sock.fileno()) for sock in metrics)
        raise ValueError(f"inherited fds {fds} are all named {METRICS_FD_NAME!r}; one at most")
    if metrics and not echo:
        raise ValueError(
            f"the only inherited socket is the one named {METRICS_FD_NAME!r}: nothing to echo on"
        )
    return echo, (metrics[0] if metrics else None)


def run_worker() -> int:
    """A worker's entry: its configuration from its supervisor, no command line.

    The supervisor passes the whole `Config` (``_ECHOSVC_CONFIG``), so a
    worker imports neither typer nor click nor rich: less memory per
    worker, and a faster start (and restart).
    """
    return run(config_from_json(os.environ.pop(workers.CONFIG_ENV)))


def run(config: Config, *, address_given: bool = False) -> int:
    """Run the service in this process until it is stopped; return the exit status.

    Args:
      config: the service configuration; ``log_format``/``log_level`` apply.
          ``workers`` is the supervisor's business (`echosvc.supervisor`).
      address_given: ``--host``/``--port`` were set explicitly; with
          socket activation they are ignored, and that deserves a warning.

    """
    index = os.environ.pop(WORKER_ENV, None)
    worker = int(index) if index is not None else None
    logs.configure(config.log_format, config.log_level, worker=worker)
    raise_open_files_limit()
    try:
        inherited, metrics_socket = split_metrics_socket(take_inherited_sockets_with_names())
        # Datagram sockets (ListenDatagram=) serve the UDP echo.
        udp_inherited, inherited = take_datagram_sockets(inherited)
    except ValueError as exc:
        print(f"echosvc: {exc}", file=sys.stderr)
        return 1
    try:
        # Before anything is served: TLS files that cannot be used are a
        # usage error naming the flag (the CLI checked them already; they
        # may have changed since, or a worker's may differ).
        stages = stages_for(config)
    except ValueError as exc:
        field = getattr(exc, "field", None)
        flag = "--" + field.replace("_", "-") if isinstance(field, str) else "--tls-cert"
        print(f"echosvc: {flag}: {getattr(exc, 'message', exc)}", file=sys.stderr)
        for sock in (*inherited, *udp_inherited, *([metrics_socket] if metrics_socket else [])):
            sock.close()
        return 2
    main = partial(_main, metrics_socket=metrics_socket, stages=stages)
    return trio.run(main, config, inherited, address_given, worker, udp_inherited)


async def _main(
    config: Config,
    inherited: list[socket.socket],
    address_given: bool,
    worker: int | None,
    udp_inherited: list[socket.socket],
    *,
    metrics_socket: socket.socket | None = None,
    stages: Sequence[Stage] | None = None,
) -> int:
    log = structlog.get_logger("echosvc")
    notifier = systemd.Notifier()
    # Signals are ours from the first moment, so a SIGTERM during start-up
    # is a graceful stop too, not a KeyboardInterrupt traceback.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        if inherited or udp_inherited:
            listeners = adopt_listeners(inherited)
            udp_sockets = udp_inherited
            activation = "systemd"
            if address_given and worker is None:  # a supervisor set them, and warned
                log.warning(
                    "address_ignored",
                    reason="socket activation: serving the sockets systemd passed",
                )
            if config.udp and not udp_inherited and worker is None:
                log.warning(
                    "address_ignored",
                    reason="socket activation: --udp needs a datagram socket (ListenDatagram=)",
                )
        else:
            try:
                listeners, udp_sockets = await open_listeners_and_udp(
                    config, reuse_port=worker is not None
                )
            except BindError as exc:
                print(f"echosvc: {exc.strerror}", file=sys.stderr)
                return 1
            activation = "bind"
        try:
            metrics_socks = await metrics_listeners(config, metrics_socket)
        except BindError as exc:
            print(f"echosvc: --metrics: {exc.strerror}", file=sys.stderr)
            for listener in listeners:
                listener.socket.close()
            for sock in udp_sockets:
                sock.close()
            return 1

        exit_status = 0

        def force(_: str | None) -> None:
            nonlocal exit_status
            exit_status = 1
            nursery.cancel_scope.cancel()

        # A worker reports each reload done to its supervisor, whose is the
        # RELOADING=1/READY=1 bracket for systemd (echosvc.supervisor).
        reloads = Reloads(notifier, worker=worker is not None)
        heartbeats = workers.Heartbeats(notifier) if worker is not None else None
        async with trio.open_nursery() as nursery:
            if heartbeats is not None:
                # From the loop's first moment: a worker wedged in its
                # start-up is noticed too.
                nursery.start_soon(heartbeats.run)
            server: Server = await nursery.start(
                partial(
                    _serve_then_stop, config, listeners, nursery.cancel_scope, udp_sockets, stages
                )
            )
            for stage in server.stages:
                hook = getattr(stage, "reload", None)  # the TLS stage's certificates
                if hook is not None:
                    reloads.add("tls", hook)
            if metrics_socks:
                start_metrics(nursery, metrics_socks, _MetricsOf(server, nursery).registry())
            log.info(
                "listening",
                addresses=server.addresses,
                mode=config.mode.value,
                pid=os.getpid(),
                activation=activation,
            )
            status = partial(_status, server, counters=worker is not None)
            notifier.send("READY=1", *status())
            if heartbeats is not None:
                heartbeats.status = status  # on the heartbeat's wake-ups
            elif notifier.enabled:
                nursery.start_soon(systemd.report_status, notifier, status)
            interval = systemd.watchdog_interval()
            if interval is not None and notifier.enabled:
                nursery.start_soon(systemd.keep_watchdog_fed, notifier, interval)
            nursery.start_soon(reloads.run)
            control = StopControl(
                notifier,
                active=lambda: server.statistics().active,
                grace_s=config.shutdown_grace,
                stop=lambda _: server.shutdown(),
                force=force,
                reload=reloads.request,
            )
            if worker is None:
                await control.watch_signals(signals)
            else:
                # A worker takes orders from its supervisor only. A signal
                # sent to the whole process group (Ctrl-C, systemd's default
                # KillMode) reaches the supervisor too, which passes it on;
                # counting it here as well could make one request two.
                nursery.start_soon(_ignore, signals)
                stats = _MetricsOf(server, nursery)

                def answer(question: str) -> None:
                    notifier.send(workers.stats_answer(question, stats.encoded()))

                orders = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
                await workers.obey(orders, control, stats=answer)
                await trio.sleep_forever()  # until the drain ends
        log.info("stopped", connections_served=server.statistics().served)
        notifier.send(*status())  # a supervisor adds up the final counts
        notifier.close()
        return exit_status


ReloadHook = Callable[[], Awaitable[None]]


class Reloads:
    """What a reload request (SIGHUP, or a supervisor's ``reload`` order) reloads.

    A part that can reload registers a hook with `add` (the TLS stage
    registers one that reads its certificates again). `request` logs
    ``reload_requested`` at once, with ``reloads`` naming the hooks (empty:
    there is nothing to reload); `run` calls the hooks in order, one reload
    at a time, and requests that arrive during a reload make one more, not
    one each. A hook reports its own outcome (``tls_reloaded``,
    ``tls_reload_failed``) and keeps what it had when loading fails; an
    exception out of a hook is a bug and propagates.

    Given a ``notifier``, `run` brackets the hooks with ``RELOADING=1``
    (and ``MONOTONIC_USEC=``, as ``Type=notify-reload`` wants) and
    ``READY=1``, so ``systemctl reload`` returns once the reload is done.
    With no hooks nothing is sent: there is no reload to wait for. A
    worker's (``worker=True``) sends its supervisor ``X_ECHOSVC_RELOADED=1``
    after the hooks instead (`echosvc.workers.RELOADED`).
    """

    def __init__(self, notifier: systemd.Notifier | None = None, *, worker: bool = False) -> None:
        self._hooks: list[tuple[str, ReloadHook]] = []
        self._wanted = trio.Event()
        self._notifier = notifier
        self._worker = worker
        self._log = structlog.get_logger("echosvc")

    def add(self, name: str, hook: ReloadHook) -> None:
        self._hooks.append((name, hook))

    def request(self, signal_name: str | None) -> None:
        self._log.info(
            "reload_requested", signal=signal_name, reloads=[name for name, _ in self._hooks]
        )
        self._wanted.set()

    async def run(self) -> None:
        """Carry out requests until cancelled."""
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            if not self._hooks:
                continue
            if self._notifier is not None and not self._worker:
                self._notifier.send("RELOADING=1", systemd.monotonic_usec())
            for _, hook in self._hooks:
                await hook()
            if self._notifier is not None:
                self._notifier.send(workers.RELOADED if self._worker else "READY=1")


async def _serve_then_stop(  # noqa: ASYNC128 -- serve() calls started()
    config: Config,
    listeners: list[trio.SocketListener],
    daemon_scope: trio.CancelScope,
    udp_sockets: list[socket.socket],
    stages: Sequence[Stage] | None,
    *,
    task_status: trio.TaskStatus[Server],
) -> None:
    await serve(
        config,
        listeners=listeners,
        stages=stages,
        udp_sockets=udp_sockets,
        task_status=task_status,
    )
    # Drained: the status reporter, the watchdog and the signal loop go too.
    daemon_scope.cancel()


async def metrics_listeners(
    config: Config, inherited: socket.socket | None
) -> list[trio.SocketListener]:
    """The endpoint's listeners: the inherited ``metrics`` socket, or --metrics bound.

    With both, the inherited socket wins and ``address_ignored`` says so.
    (A worker has neither: its supervisor serves the endpoint.)

    Raises:
      BindError: ``--metrics`` cannot be bound.

    """
    if inherited is not None:
        if config.metrics is not None:
            structlog.get_logger("echosvc").warning(
                "address_ignored",
                reason=f"socket activation: metrics served on the socket named {METRICS_FD_NAME}",
            )
        return adopt_listeners([inherited])
    if config.metrics is None:
        return []
    host, port = split_host_port(config.metrics)
    # Every address the host resolves to, on one port, as --host does.
    return await open_listeners(Config(hosts=(host,), port=port))


class _MetricsOf:
    """This process's registry (`echosvc.metrics.daemon_registry`), made on first use.

    Imported and made only when asked for: prometheus_client and h11 are
    start-up time, and the loop monitor ten wake-ups a second, that only a
    process whose metrics are read should pay. A worker's first ``stats``
    order starts its monitor, so its lag is measured from its first scrape.
    """

    def __init__(self, server: Server | None, nursery: trio.Nursery) -> None:
        self._server = server
        self._nursery = nursery
        self._registry: Collector | None = None

    def registry(self) -> Collector:
        if self._registry is None:
            from . import metrics

            monitor = metrics.LoopMonitor()
            self._nursery.start_soon(monitor.run, name="echosvc loop monitor")
            self._registry = metrics.daemon_registry(self._server, monitor)
        return self._registry

    def encoded(self) -> str:
        from . import metrics

        return metrics.encode_families(self.registry())


def start_metrics(
    nursery: trio.Nursery, listeners: list[trio.SocketListener], source: Source
) -> None:
    """Serve ``source`` on ``listeners`` in ``nursery``, and log ``metrics_listening``."""
    from . import metrics

    addresses = [format_address(listener.socket.getsockname()) for listener in listeners]
    nursery.start_soon(metrics.serve_metrics, listeners, source, name="echosvc metrics")
    log = structlog.get_logger("echosvc")
    for address in addresses:
        log.info("metrics_listening", address=address)


async def _ignore(signals: AsyncIterator[int]) -> None:
    async for _ in signals:
        pass


def _status(server: Server, *, counters: bool) -> list[str]:
    stats = server.statistics()
    noun = "connection" if stats.active == 1 else "connections"
    verb = "serving" if stats.accepting else "draining"
    status = [f"STATUS={verb} {stats.active} {noun}"]
    if counters:  # for a supervisor
        status += workers.counters(stats.active, stats.served)
    return status
