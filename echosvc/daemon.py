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
`Reloads` hooks, stopping nothing. Nothing registers one yet (the TLS
certificates will), so today a SIGHUP changes nothing.

A worker started by `echosvc.supervisor` is this same daemon, told so by
its environment (`echosvc.workers` has the protocol): it binds with
``SO_REUSEPORT`` (or adopts the sockets the supervisor passed), its notify
socket is the supervisor's, to which it also reports its counters and sends
a heartbeat from its loop, and it takes stop and reload requests from its
supervisor's orders only, never from signals.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import structlog
import trio

from . import logs, systemd, workers
from .config import Config, config_from_json
from .listeners import BindError, adopt_listeners, open_listeners_and_udp, take_datagram_sockets
from .server import Server, serve
from .workers import LISTEN_FDS_ENV, WORKER_ENV, StopControl

__all__ = ["Reloads", "raise_open_files_limit", "run", "take_inherited_sockets"]


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
    fds = os.environ.pop(LISTEN_FDS_ENV, None)
    if fds:
        try:
            numbers = [int(fd) for fd in fds.split(",")]
        except ValueError:
            raise ValueError(f"{LISTEN_FDS_ENV}={fds!r} is not a list of descriptors") from None
        return systemd.sockets_from_fds(numbers)
    return systemd.listen_sockets()


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
        inherited = take_inherited_sockets()
        # Datagram sockets (ListenDatagram=) serve the UDP echo.
        udp_inherited, inherited = take_datagram_sockets(inherited)
    except ValueError as exc:
        print(f"echosvc: {exc}", file=sys.stderr)
        return 1
    return trio.run(_main, config, inherited, address_given, worker, udp_inherited)


async def _main(
    config: Config,
    inherited: list[socket.socket],
    address_given: bool,
    worker: int | None,
    udp_inherited: list[socket.socket],
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

        exit_status = 0

        def force(_: str | None) -> None:
            nonlocal exit_status
            exit_status = 1
            nursery.cancel_scope.cancel()

        reloads = Reloads()
        async with trio.open_nursery() as nursery:
            if worker is not None:
                # From the loop's first moment: a worker wedged in its
                # start-up is noticed too.
                nursery.start_soon(workers.send_heartbeats, notifier)
            server: Server = await nursery.start(
                partial(_serve_then_stop, config, listeners, nursery.cancel_scope, udp_sockets)
            )
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
                await workers.obey(trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())), control)
                await trio.sleep_forever()  # until the drain ends
        log.info("stopped", connections_served=server.statistics().served)
        notifier.send(*status())  # a supervisor adds up the final counts
        notifier.close()
        return exit_status


ReloadHook = Callable[[], Awaitable[None]]


class Reloads:
    """What a reload request (SIGHUP, or a supervisor's ``reload`` order) reloads.

    A part that can reload registers a hook with `add` (the TLS stage will
    register one that reads its certificates again). `request` logs
    ``reload_requested`` at once, with ``reloads`` naming the hooks (empty:
    there is nothing to reload); `run` calls the hooks in order, one reload
    at a time, and requests that arrive during a reload make one more, not
    one each. A hook reports its own outcome (``tls_reloaded``,
    ``tls_reload_failed``) and keeps what it had when loading fails; an
    exception out of a hook is a bug and propagates. The systemd
    ``RELOADING=1``/``READY=1`` bracket belongs around the hooks in `run`,
    once there are any.
    """

    def __init__(self) -> None:
        self._hooks: list[tuple[str, ReloadHook]] = []
        self._wanted = trio.Event()
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
            for _, hook in self._hooks:
                await hook()


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
