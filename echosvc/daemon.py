"""The process around the server: logs, limits, signals and the service manager.

Everything process-global lives here and only here (the library touches
none of it): structlog's configuration, ``RLIMIT_NOFILE``, signal handling,
``$LISTEN_FDS`` and ``$NOTIFY_SOCKET``.

Lifecycle: bind (or adopt systemd's sockets) before anything else, so a bind
failure is one line and exit status 1; start `echosvc.serve`; log
``listening`` and send ``READY=1``. The first SIGTERM or SIGINT logs
``shutdown_started``, sends ``STOPPING=1`` and calls `Server.shutdown`; the
process exits 0 once the connections have drained. A second signal cancels
everything at once and the process exits 1. ``STATUS=`` and ``WATCHDOG=1``
are sent until the very end, through the shutdown grace.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
from functools import partial

import structlog
import trio

from . import logs, systemd
from .config import Config
from .listeners import BindError, adopt_listeners, open_listeners
from .server import Server, serve

__all__ = ["raise_open_files_limit", "run"]

# How often STATUS= may change: systemctl status is read by people.
STATUS_INTERVAL_S = 1.0


def raise_open_files_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit, as Go does; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return hard


def run(config: Config, *, address_given: bool = False) -> int:
    """Run the service in this process until it is stopped; return the exit status.

    Args:
      config: the service configuration; ``log_format``/``log_level`` apply.
      address_given: ``--host``/``--port`` were set explicitly; with
          socket activation they are ignored, and that deserves a warning.

    """
    logs.configure(config.log_format, config.log_level)
    raise_open_files_limit()
    return trio.run(_main, config, address_given)


async def _main(config: Config, address_given: bool) -> int:
    log = structlog.get_logger("echosvc")
    notifier = systemd.Notifier()
    # Signals are ours from the first moment, so a SIGTERM during start-up
    # is a graceful stop too, not a KeyboardInterrupt traceback.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        try:
            inherited = systemd.listen_sockets()
            if inherited:
                listeners = adopt_listeners(inherited)
                activation = "systemd"
                if address_given:
                    log.warning(
                        "address_ignored",
                        reason="socket activation: serving the sockets systemd passed",
                    )
            else:
                listeners = await open_listeners(config)
                activation = "bind"
        except (BindError, ValueError) as exc:
            message = exc.strerror if isinstance(exc, BindError) else str(exc)
            print(f"echosvc: {message}", file=sys.stderr)
            return 1

        exit_status = 0
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(
                partial(_serve_then_stop, config, listeners, nursery.cancel_scope)
            )
            log.info(
                "listening",
                addresses=server.addresses,
                mode=config.mode.value,
                pid=os.getpid(),
                activation=activation,
            )
            notifier.send("READY=1", _status(server))
            if notifier.enabled:
                nursery.start_soon(_report_status, notifier, server)
            interval = systemd.watchdog_interval()
            if interval is not None and notifier.enabled:
                nursery.start_soon(_keep_watchdog_fed, notifier, interval)
            async for signum in signals:
                name = signal.Signals(signum).name
                if server.statistics().accepting:
                    stats = server.statistics()
                    log.info(
                        "shutdown_started",
                        signal=name,
                        active=stats.active,
                        grace_s=config.shutdown_grace,
                    )
                    notifier.send("STOPPING=1", _status(server))
                    server.shutdown()
                else:
                    log.warning("shutdown_forced", signal=name, active=server.statistics().active)
                    exit_status = 1
                    nursery.cancel_scope.cancel()
        log.info("stopped", connections_served=server.statistics().served)
        notifier.close()
        return exit_status


async def _serve_then_stop(  # noqa: ASYNC128 -- serve() calls started()
    config: Config,
    listeners: list[trio.SocketListener],
    daemon_scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[Server],
) -> None:
    await serve(config, listeners=listeners, task_status=task_status)
    # Drained: the status reporter, the watchdog and the signal loop go too.
    daemon_scope.cancel()


def _status(server: Server) -> str:
    stats = server.statistics()
    noun = "connection" if stats.active == 1 else "connections"
    verb = "serving" if stats.accepting else "draining"
    return f"STATUS={verb} {stats.active} {noun}"


async def _report_status(notifier: systemd.Notifier, server: Server) -> None:
    last = ""
    while True:
        status = _status(server)
        if status != last:
            notifier.send(status)
            last = status
        await trio.sleep(STATUS_INTERVAL_S)


async def _keep_watchdog_fed(notifier: systemd.Notifier, interval: float) -> None:
    while True:
        notifier.send("WATCHDOG=1")
        await trio.sleep(interval)
