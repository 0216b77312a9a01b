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

A worker started by `echosvc.supervisor` is this same daemon with two
differences, both set through the environment by its supervisor: it binds
with ``SO_REUSEPORT`` (or adopts the sockets the supervisor passed), and its
notify socket is the supervisor's, to which it also reports its counters.

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
from collections.abc import AsyncIterator, Callable
from functools import partial

import structlog
import trio

from . import logs, systemd
from .config import Config, split_host_port
from .listeners import (
    BindError,
    adopt_listeners,
    format_address,
    open_listeners,
    open_listeners_and_udp,
    take_datagram_sockets,
)
from .server import Server, serve

__all__ = [
    "METRICS_FD_NAME",
    "StopControl",
    "raise_open_files_limit",
    "run",
    "split_metrics_socket",
    "take_inherited_sockets",
    "take_inherited_sockets_with_names",
]

# Set by the supervisor for its workers; not for people.
WORKER_ENV = "_ECHOSVC_WORKER"
LISTEN_FDS_ENV = "_ECHOSVC_LISTEN_FDS"

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
    main = partial(_main, metrics_socket=metrics_socket)
    return trio.run(main, config, inherited, address_given, worker, udp_inherited)


async def _main(
    config: Config,
    inherited: list[socket.socket],
    address_given: bool,
    worker: int | None,
    udp_inherited: list[socket.socket],
    *,
    metrics_socket: socket.socket | None = None,
) -> int:
    log = structlog.get_logger("echosvc")
    notifier = systemd.Notifier()
    # Signals are ours from the first moment, so a SIGTERM during start-up
    # is a graceful stop too, not a KeyboardInterrupt traceback.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
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
            metrics_listeners = await _metrics_listeners(config, metrics_socket, worker)
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

        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(
                partial(_serve_then_stop, config, listeners, nursery.cancel_scope, udp_sockets)
            )
            if metrics_listeners:
                _start_metrics(nursery, server, metrics_listeners)
            log.info(
                "listening",
                addresses=server.addresses,
                mode=config.mode.value,
                pid=os.getpid(),
                activation=activation,
            )
            status = partial(_status, server, counters=worker is not None)
            notifier.send("READY=1", *status())
            if notifier.enabled:
                nursery.start_soon(systemd.report_status, notifier, status)
            interval = systemd.watchdog_interval()
            if interval is not None and notifier.enabled:
                nursery.start_soon(systemd.keep_watchdog_fed, notifier, interval)
            control = StopControl(
                notifier,
                active=lambda: server.statistics().active,
                grace_s=config.shutdown_grace,
                stop=lambda _: server.shutdown(),
                force=force,
            )
            if worker is None:
                await control.watch_signals(signals)
            else:
                # A worker takes orders from its supervisor only. A signal
                # sent to the whole process group (Ctrl-C, systemd's default
                # KillMode) reaches the supervisor too, which passes it on;
                # counting it here as well could make one request two.
                nursery.start_soon(_ignore, signals)
                await control.watch_supervisor(trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())))
                await trio.sleep_forever()  # until the drain ends
        log.info("stopped", connections_served=server.statistics().served)
        notifier.send(*status())  # a supervisor adds up the final counts
        notifier.close()
        return exit_status


class StopControl:
    """Turns stop requests into one graceful stop, then a forced one.

    Requests come from signals (SIGTERM, SIGINT) or, in a worker, only from
    the supervisor, over stdin. The first request logs ``shutdown_started``,
    sends ``STOPPING=1`` and calls ``stop``; a second *signal* logs
    ``shutdown_forced`` and calls ``force``.
    """

    def __init__(
        self,
        notifier: systemd.Notifier,
        *,
        active: Callable[[], int],
        grace_s: float,
        stop: Callable[[str | None], None],
        force: Callable[[str | None], None],
    ) -> None:
        self._notifier = notifier
        self._active = active
        self._grace_s = grace_s
        self._stop = stop
        self._force = force
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
            self.request(signal.Signals(signum).name)

    async def watch_supervisor(self, commands: trio.abc.ReceiveStream) -> None:
        """A worker's orders, one per line: ``stop SIGNAL`` or ``force SIGNAL``.

        The supervisor forwards the signals it receives this way rather than
        as signals, so that a signal sent to the whole process group (Ctrl-C
        on a terminal, systemd's default KillMode) is not counted twice. If
        the supervisor goes away (EOF), the worker stops gracefully.
        """
        buffer = b""
        while chunk := await commands.receive_some():
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                order, _, name = line.decode(errors="replace").partition(" ")
                if order == "stop":
                    self.request(name or None, escalate=False)
                elif order == "force":
                    if not self.stopping:
                        self.request(name or None)
                    self.request(name or None)
        self.request(None, escalate=False)


async def _serve_then_stop(  # noqa: ASYNC128 -- serve() calls started()
    config: Config,
    listeners: list[trio.SocketListener],
    daemon_scope: trio.CancelScope,
    udp_sockets: list[socket.socket],
    *,
    task_status: trio.TaskStatus[Server],
) -> None:
    await serve(config, listeners=listeners, udp_sockets=udp_sockets, task_status=task_status)
    # Drained: the status reporter, the watchdog and the signal loop go too.
    daemon_scope.cancel()


async def _metrics_listeners(
    config: Config, inherited: socket.socket | None, worker: int | None
) -> list[trio.SocketListener]:
    """The endpoint's listeners: the inherited ``metrics`` socket, or --metrics bound.

    Raises:
      BindError: ``--metrics`` cannot be bound.

    """
    if inherited is not None:
        if config.metrics is not None and worker is None:
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


def _start_metrics(
    nursery: trio.Nursery, server: Server, listeners: list[trio.SocketListener]
) -> None:
    # Imported here: prometheus_client and h11 are start-up time that only
    # a daemon serving metrics should pay.
    from . import metrics

    monitor = metrics.LoopMonitor()
    nursery.start_soon(monitor.run, name="echosvc loop monitor")
    registry = metrics.daemon_registry(server, monitor)
    addresses = [format_address(listener.socket.getsockname()) for listener in listeners]
    nursery.start_soon(metrics.serve_metrics, listeners, registry, name="echosvc metrics")
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
    if counters:  # for a supervisor; sd_notify(3) reserves X_ names for this
        status += [f"X_ECHOSVC_ACTIVE={stats.active}", f"X_ECHOSVC_SERVED={stats.served}"]
    return status
