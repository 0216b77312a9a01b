"""``--workers N``: several processes, each its own Trio run, on one port.

A Trio run is one thread, so one process uses one core; this is the Trio
answer to ``GOMAXPROCS``. The supervisor serves nothing itself. It starts N
copies of ``echosvc serve`` (`echosvc.daemon`, unchanged) and:

* **shares the port.** Bound: every worker binds the address itself with
  ``SO_REUSEPORT`` and the kernel spreads new connections across their
  accept queues. The supervisor holds one socket per address, bound with
  ``SO_REUSEPORT`` but never listening: it resolves ``--port 0`` once,
  reserves the port while a worker restarts, and -- since it does not
  listen -- is never handed a connection. Socket-activated: the sockets
  systemd passed are passed on to every worker, which accept from the same
  queues.
* **knows when they are ready.** Each worker's ``$NOTIFY_SOCKET`` is one of
  the supervisor's: a worker reports ``READY=1`` and its counters exactly as
  it would to systemd, and the supervisor logs ``listening`` and sends its
  own ``READY=1`` once every worker has, then ``STATUS=`` with the totals.
* **forwards stop requests.** The first SIGTERM/SIGINT is passed to every
  worker, which drains within its grace; the second too, and they stop at
  once. They go down each worker's stdin, and a worker ignores signals, so
  that a signal sent to the whole process group (Ctrl-C on a terminal,
  systemd's default ``KillMode=control-group``) is one request, not two; a
  worker whose supervisor is gone sees EOF there and stops.
* **restarts** a worker that exits unexpectedly, after 0.1 s doubling to
  5 s (reset once a worker has run for 30 s), logging ``worker_exited``. If
  workers exit unexpectedly 5 times within 60 s the supervisor stops them
  all and exits 1 (``workers_failing``): a crash loop is for the operator.
"""

from __future__ import annotations

import collections
import os
import secrets
import signal
import socket
import subprocess
import sys
from contextlib import suppress
from functools import partial

import attrs
import structlog
import trio

from . import logs, systemd
from .config import Config, environment_for
from .daemon import (
    LISTEN_FDS_ENV,
    METRICS_FD_NAME,
    WORKER_ENV,
    StopControl,
    split_metrics_socket,
    take_inherited_sockets_with_names,
)
from .listeners import BindError, format_address, reserve_addresses

__all__ = ["run"]

RESTART_FIRST_S = 0.1
RESTART_MAX_S = 5.0
STABLE_AFTER_S = 30.0
GIVE_UP_EXITS = 5
GIVE_UP_WINDOW_S = 60.0


@attrs.define(eq=False)
class _Worker:
    index: int
    notify_address: str
    notify_socket: trio.socket.SocketType
    process: trio.Process | None = None
    ready: bool = False
    active: int = 0
    served_now: int = 0  # by the current process
    served_before: int = 0  # by the ones that exited


def run(config: Config, *, address_given: bool = False) -> int:
    """Supervise ``config.workers`` worker processes; return the exit status."""
    logs.configure(config.log_format, config.log_level)
    try:
        inherited, metrics_socket = split_metrics_socket(take_inherited_sockets_with_names())
    except ValueError as exc:
        print(f"echosvc: {exc}", file=sys.stderr)
        return 1
    if metrics_socket is not None:
        # Never passed on as an echo socket. Serving it needs the workers'
        # statistics, which the worker protocol does not carry yet.
        metrics_socket.close()
        structlog.get_logger("echosvc").warning(
            "address_ignored",
            reason=f"the socket named {METRICS_FD_NAME} is not served with"
            f" {config.workers} workers yet",
        )
    return trio.run(_Supervisor(config, inherited, address_given).run)


class _Supervisor:
    def __init__(self, config: Config, inherited: list[socket.socket], address_given: bool) -> None:
        self.config = config
        self.inherited = inherited
        self.address_given = address_given
        self.log = structlog.get_logger("echosvc")
        self.notifier = systemd.Notifier()
        self.workers: list[_Worker] = []
        self.stopping = False
        self.exit_status = 0
        self.unexpected_exits: collections.deque[float] = collections.deque()
        self.all_ready = trio.Event()
        self.control = StopControl(
            self.notifier,
            active=self._active,
            grace_s=config.shutdown_grace,
            stop=partial(self._order, "stop"),
            force=partial(self._order, "force"),
        )

    async def run(self) -> int:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            held: list[socket.socket] | list[trio.socket.SocketType]
            if self.inherited:
                held = self.inherited
                activation = "systemd"
                if self.address_given:
                    self.log.warning(
                        "address_ignored",
                        reason="socket activation: serving the sockets systemd passed",
                    )
            else:
                try:
                    # Held until exit: the port stays ours across restarts.
                    held = await reserve_addresses(self.config)
                except BindError as exc:
                    print(f"echosvc: {exc.strerror}", file=sys.stderr)
                    return 1
                activation = "bind"
            addresses = [format_address(sock.getsockname()) for sock in held]
            port: int = held[0].getsockname()[1]

            async with trio.open_nursery() as nursery:
                for index in range(self.config.workers):
                    worker = self._new_worker(index)
                    self.workers.append(worker)
                    nursery.start_soon(self._listen_to, worker)
                async with trio.open_nursery() as workers:
                    for worker in self.workers:
                        workers.start_soon(self._keep_running, worker, port, workers)
                    nursery.start_soon(
                        self._announce, addresses, activation, nursery, name="announce"
                    )
                    nursery.start_soon(self.control.watch_signals, signals)
                # Every worker has exited for good.
                nursery.cancel_scope.cancel()
            for sock in held:
                sock.close()
        served = sum(w.served_before + w.served_now for w in self.workers)
        self.log.info("stopped", connections_served=served, workers=len(self.workers))
        self.notifier.close()
        return self.exit_status

    def _new_worker(self, index: int) -> _Worker:
        address = f"\0echosvc-{os.getpid()}-{secrets.token_hex(4)}-{index}"
        notify_socket = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        return _Worker(index=index, notify_address=address, notify_socket=notify_socket)

    async def _listen_to(self, worker: _Worker) -> None:
        """Receive the worker's sd_notify messages for as long as we run."""
        with worker.notify_socket:
            await worker.notify_socket.bind(worker.notify_address)
            while True:
                message = (await worker.notify_socket.recv(4096)).decode(errors="replace")
                for assignment in message.split("\n"):
                    key, _, value = assignment.partition("=")
                    if key == "READY" and value == "1":
                        worker.ready = True
                        if all(w.ready for w in self.workers):
                            self.all_ready.set()
                    elif key == "X_ECHOSVC_ACTIVE" and value.isdigit():
                        worker.active = int(value)
                    elif key == "X_ECHOSVC_SERVED" and value.isdigit():
                        worker.served_now = int(value)

    async def _announce(self, addresses: list[str], activation: str, nursery: trio.Nursery) -> None:
        await self.all_ready.wait()
        self.log.info(
            "listening",
            addresses=addresses,
            mode=self.config.mode.value,
            pid=os.getpid(),
            activation=activation,
            workers=len(self.workers),
        )
        self.notifier.send("READY=1", self._status())
        if self.notifier.enabled:
            nursery.start_soon(systemd.report_status, self.notifier, lambda: [self._status()])
            interval = systemd.watchdog_interval()
            if interval is not None:
                nursery.start_soon(systemd.keep_watchdog_fed, self.notifier, interval)

    async def _keep_running(self, worker: _Worker, port: int, workers: trio.Nursery) -> None:
        delay = RESTART_FIRST_S
        while not self.stopping:
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                process: trio.Process = await nursery.start(
                    partial(
                        trio.run_process,
                        [sys.executable, "-m", "echosvc", "serve"],
                        env=self._environment(worker, port),
                        pass_fds=[s.fileno() for s in self.inherited],
                        # Orders go down this pipe; its EOF tells an
                        # orphaned worker to stop.
                        stdin=subprocess.PIPE,
                        check=False,
                        deliver_cancel=_kill,
                    )
                )
                worker.process = process
                self.log.debug("worker_started", worker=worker.index, pid=process.pid)
            worker.process = None
            worker.ready, worker.active = False, 0
            worker.served_before += worker.served_now
            worker.served_now = 0
            if self.stopping:
                return
            now = trio.current_time()
            if now - started >= STABLE_AFTER_S:
                delay = RESTART_FIRST_S
            self.log.warning(
                "worker_exited",
                worker=worker.index,
                pid=process.pid,
                status=_describe_status(process.returncode),
                restart_in_s=delay,
            )
            self.unexpected_exits.append(now)
            while now - self.unexpected_exits[0] > GIVE_UP_WINDOW_S:
                self.unexpected_exits.popleft()
            if len(self.unexpected_exits) >= GIVE_UP_EXITS:
                self.log.error(
                    "workers_failing",
                    exits=len(self.unexpected_exits),
                    window_s=GIVE_UP_WINDOW_S,
                )
                self.exit_status = 1
                self.control.request(None, escalate=False)
                return
            await trio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX_S)

    def _environment(self, worker: _Worker, port: int) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("ECHOSVC_", "WATCHDOG_", "NOTIFY_SOCKET"))
        }
        # The metrics endpoint is the supervisor's alone: workers bind none.
        worker_config = attrs.evolve(self.config, port=port, workers=1, metrics=None)
        env.update(environment_for(worker_config))
        env[WORKER_ENV] = str(worker.index)
        env["NOTIFY_SOCKET"] = "@" + worker.notify_address[1:]
        if self.inherited:
            env[LISTEN_FDS_ENV] = ",".join(str(s.fileno()) for s in self.inherited)
        return env

    def _order(self, order: str, signal_name: str | None) -> None:
        """Tell every worker to ``stop`` (drain) or ``force`` (stop at once)."""
        if order == "force":
            self.exit_status = 1
        self.stopping = True
        message = f"{order} {signal_name or ''}\n".encode()
        for worker in self.workers:
            process = worker.process
            if process is None or process.returncode is not None:
                continue
            orders = process.stdin
            assert isinstance(orders, trio.lowlevel.FdStream)
            # A few bytes into an empty pipe: a plain write never blocks.
            with suppress(OSError):  # it has just exited: nothing to tell
                os.write(orders.fileno(), message)

    def _active(self) -> int:
        return sum(worker.active for worker in self.workers)

    def _status(self) -> str:
        active = self._active()
        noun = "connection" if active == 1 else "connections"
        verb = "draining" if self.stopping else "serving"
        return f"STATUS={verb} {active} {noun} in {len(self.workers)} workers"


async def _kill(process: trio.Process) -> None:
    """Only the supervisor's own failure cancels a worker: end it now."""
    process.kill()
    await trio.lowlevel.checkpoint()


def _describe_status(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return signal.Signals(-returncode).name
    return f"exit {returncode}"
