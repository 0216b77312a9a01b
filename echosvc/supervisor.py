"""``--workers N``: several processes, each its own Trio run, on one port.

A Trio run is one thread, so one process uses one core; this is the Trio
answer to ``GOMAXPROCS``. The supervisor serves nothing itself. It starts N
copies of ``echosvc serve`` (`echosvc.daemon`, told it is a worker; the
wire protocol is `echosvc.workers`) and:

* **shares the port.** Bound: every worker binds the address itself with
  ``SO_REUSEPORT`` and the kernel spreads new connections across their
  accept queues. The supervisor holds one socket per address, bound with
  ``SO_REUSEPORT`` but never listening: it resolves ``--port 0`` once,
  reserves the port while a worker restarts, and -- since it does not
  listen -- is never handed a connection. Socket-activated: the sockets
  systemd passed are passed on to every worker, which accept from the same
  queues.
* **knows when they are ready, and that they are alive.** Each worker
  process reports on a notify socket of its own, exactly as it would to
  systemd. Once every worker has sent ``READY=1`` the supervisor logs
  ``listening`` and sends its own ``READY=1``, then ``STATUS=`` with the
  totals -- unless a stop began first: nothing is announced after
  ``STOPPING=1``. A worker also sends a heartbeat (``WATCHDOG=1``) twice a
  second from its loop. A watch per process sleeps in a cancel scope whose
  deadline each heartbeat pushes back to ``--worker-timeout`` later
  (counted from the spawn until the first). When it fires, and no
  heartbeat is still waiting to be read (the late one may be the
  supervisor itself, stopped or starved), the watch cancels the scope
  around the process, which SIGKILLs it (``worker_unresponsive``); it is
  restarted as if it had died.
* **forwards requests.** SIGTERM/SIGINT and SIGHUP become ``stop``,
  ``force`` and ``reload`` orders down every worker's stdin. With TLS, a
  reload is bracketed for systemd: ``RELOADING=1`` when the orders go out,
  ``READY=1`` once every worker told has reported it done (each logs its
  own ``tls_reloaded`` or ``tls_reload_failed``) or has exited. Workers run
  in process groups of their own and ignore signals, so that a Ctrl-C, a
  hangup of the terminal or a signal to the whole unit stays one request. A stop
  is a standing order: a worker whose spawn is under way gets it the moment
  its process exists, a worker waiting to be restarted is not restarted.
  A forced stop also gives every worker `FORCE_KILL_AFTER_S` to exit before
  it is killed, so a wedged worker cannot hold the supervisor either.
* **restarts** a worker that exits unexpectedly, whatever its status or
  signal, after 0.1 s doubling to 5 s (reset once a worker has run for 30
  s), logging ``worker_exited``. A process that could not even be spawned
  counts as one that exited. If workers exit unexpectedly 5 times within
  60 s the supervisor stops them all and exits 1 (``workers_failing``): a
  crash loop is for the operator.
* **answers for every worker** with ``--metrics`` (or an inherited socket
  named ``metrics``): its endpoint is the service's. Each scrape sends every
  running worker a ``stats`` order with a fresh id and waits up to 1 s for
  the report of that id (`echosvc.metrics.WorkersView`): what came back is
  labelled ``worker``, a worker that did not answer is
  ``echosvc_worker_up`` 0, and the supervisor's own process and loop are
  there without a label. Workers bind no metrics address of their own.
"""

from __future__ import annotations

import collections
import itertools
import os
import signal
import socket
import subprocess
import sys
from functools import partial

import attrs
import structlog
import trio

from . import logs, systemd, workers
from .config import Config, config_to_json, environment_for
from .daemon import (
    metrics_listeners,
    split_metrics_socket,
    start_metrics,
    take_inherited_sockets_with_names,
)
from .listeners import BindError, format_address, reserve_addresses
from .udp import format_udp_address
from .workers import Order, StopControl, Verb

__all__ = ["run"]

RESTART_FIRST_S = 0.1
RESTART_MAX_S = 5.0
STABLE_AFTER_S = 30.0
GIVE_UP_EXITS = 5
GIVE_UP_WINDOW_S = 60.0
# After a forced stop: far more than a worker needs to cancel everything and
# exit, and short enough that a second Ctrl-C still feels immediate.
FORCE_KILL_AFTER_S = 2.0
# Reports read per wake-up before yielding: a chatty worker cannot starve the rest.
_REPORTS_PER_WAKEUP = 64


@attrs.define(eq=False)
class _Spawn:
    """One process of a worker, from its spawn to its exit."""

    heard_at: float  # the last heartbeat, or the spawn
    # The heartbeat watch's: each heartbeat pushes its deadline back.
    silence: trio.CancelScope | None = None
    # Around the process: cancelled, it kills the process. Cancelled by the
    # heartbeat watch; a forced stop sets its deadline.
    kill: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    unresponsive: bool = False
    process: trio.Process | None = None
    spawn_error: OSError | None = None
    killed_at: float | None = None
    ready: bool = False
    # Told to reload, and not yet reported it done (X_ECHOSVC_RELOADED).
    reloading: bool = False
    active: int = 0
    served: int = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def status(self) -> str:
        """``exit 3``, ``SIGKILL``, ``signal 35``, or why it never started."""
        if self.process is None:
            # No Process object: the spawn failed, or was cut short by a
            # fired scope (the child, if any, was killed by run_process).
            return f"spawn failed: {self.spawn_error or 'cancelled'}"
        returncode = self.process.returncode
        assert returncode is not None, "asked only once it has exited"
        if returncode < 0:
            return workers.describe_signal(-returncode)
        return f"exit {returncode}"


@attrs.define(eq=False)
class _Question:
    """A ``stats`` order sent to one process, and its answer once it comes."""

    spawn: _Spawn
    answered: trio.Event = attrs.field(factory=trio.Event)
    answer: str = ""


@attrs.define(eq=False)
class _Worker:
    index: int
    spawn: _Spawn | None = None  # the current process, spawning or running
    served_before: int = 0  # by the processes that exited


def run(config: Config, *, address_given: bool = False) -> int:
    """Supervise ``config.workers`` worker processes; return the exit status."""
    logs.configure(config.log_format, config.log_level)
    try:
        inherited, metrics_socket = split_metrics_socket(take_inherited_sockets_with_names())
    except ValueError as exc:
        print(f"echosvc: {exc}", file=sys.stderr)
        return 1
    return trio.run(_Supervisor(config, inherited, address_given, metrics_socket).run)


class _Supervisor:
    def __init__(
        self,
        config: Config,
        inherited: list[socket.socket],
        address_given: bool,
        metrics_socket: socket.socket | None = None,
    ) -> None:
        self.config = config
        self.inherited = inherited
        self.address_given = address_given
        self.metrics_socket = metrics_socket
        self.questions: dict[int, _Question] = {}
        self.question_ids = itertools.count(1)
        self.log = structlog.get_logger("echosvc")
        self.notifier = systemd.Notifier()
        self.workers = [_Worker(index) for index in range(config.workers)]
        self.exit_status = 0
        self.unexpected_exits: collections.deque[float] = collections.deque()
        # Set once, by the first stop or force order: ends restart back-offs
        # and keeps anything from being spawned or announced after it.
        self.stop_began = trio.Event()
        self.standing_order: Order | None = None
        self.announced = False
        self.reloading = False  # between RELOADING=1 and its READY=1
        self.addresses: list[str] = []
        self.activation = "bind"
        self.control = StopControl(
            self.notifier,
            active=self._active,
            grace_s=config.shutdown_grace,
            stop=partial(self._order, Verb.STOP),
            force=partial(self._order, Verb.FORCE),
            reload=self._reload,
        )

    async def run(self) -> int:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            held: list[socket.socket] | list[trio.socket.SocketType]
            if self.inherited:
                held = self.inherited
                self.activation = "systemd"
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
            self.addresses = [_describe(sock) for sock in held]
            if self.config.udp and not self.inherited:  # the workers bind UDP there too
                self.addresses += [format_udp_address(sock.getsockname()) for sock in held]
            port: int = held[0].getsockname()[1]
            try:
                metrics_socks = await metrics_listeners(self.config, self.metrics_socket)
            except BindError as exc:
                print(f"echosvc: --metrics: {exc.strerror}", file=sys.stderr)
                for sock in held:
                    sock.close()
                return 1

            async with trio.open_nursery() as service:
                service.start_soon(self.control.watch_signals, signals)
                if metrics_socks:
                    self._serve_metrics(service, metrics_socks)
                async with trio.open_nursery() as slots:
                    for worker in self.workers:
                        slots.start_soon(self._keep_running, worker, port, service)
                # Every worker has exited for good.
                service.cancel_scope.cancel()
            for sock in held:
                sock.close()
        served = sum(w.served_before for w in self.workers)
        self.log.info("stopped", connections_served=served, workers=len(self.workers))
        self.notifier.close()
        return self.exit_status

    async def _keep_running(self, worker: _Worker, port: int, service: trio.Nursery) -> None:
        delay = RESTART_FIRST_S
        while not self.stop_began.is_set():
            started = trio.current_time()
            ended = await self._run_once(worker, port, service)
            now = trio.current_time()
            if self.stop_began.is_set():
                if not self._expected_after_stop(ended):
                    self._report_exit(worker, ended, restart_in_s=None)
                return
            if now - started >= STABLE_AFTER_S:
                delay = RESTART_FIRST_S
            self.unexpected_exits.append(now)
            while now - self.unexpected_exits[0] > GIVE_UP_WINDOW_S:
                self.unexpected_exits.popleft()
            failing = len(self.unexpected_exits) >= GIVE_UP_EXITS
            self._report_exit(worker, ended, restart_in_s=None if failing else delay)
            if failing:
                self.log.error(
                    "workers_failing",
                    exits=len(self.unexpected_exits),
                    window_s=GIVE_UP_WINDOW_S,
                )
                self.exit_status = 1
                self.control.request(None, escalate=False)
                return
            with trio.move_on_after(delay):
                await self.stop_began.wait()
            delay = min(delay * 2, RESTART_MAX_S)

    async def _run_once(self, worker: _Worker, port: int, service: trio.Nursery) -> _Spawn:
        """Spawn one process for ``worker`` and return once it has exited."""
        spawn = _Spawn(heard_at=trio.current_time())
        try:
            # Bound before the spawn, so the worker's first report has somewhere to go.
            reports, notify_socket = workers.open_report_socket(worker.index)
        except OSError as exc:  # EMFILE, ENOBUFS: as good as a failed spawn
            spawn.spawn_error = exc
            return spawn
        worker.spawn = spawn
        try:
            with reports:
                async with trio.open_nursery() as listening:
                    listening.start_soon(self._listen, spawn, reports, service)
                    if self.config.worker_timeout > 0:
                        listening.start_soon(self._watch_heartbeats, spawn, reports, service)
                    with spawn.kill:
                        await self._spawn_and_wait(worker, spawn, port, notify_socket)
                    listening.cancel_scope.cancel()
                # Its last words (the final counts) are already queued.
                self._take_reports(spawn, reports, service)
        finally:
            worker.spawn = None
            worker.served_before += spawn.served
            self._reload_settled()  # it will not report a reload now
        return spawn

    async def _spawn_and_wait(
        self, worker: _Worker, spawn: _Spawn, port: int, notify_socket: str
    ) -> None:
        # The metrics endpoint is the supervisor's alone: workers bind none.
        own = attrs.evolve(self.config, port=port, workers=1, metrics=None)
        env = workers.worker_environment(
            os.environ,
            environment_for(own),
            index=worker.index,
            notify_socket=notify_socket,
            listen_fds=[s.fileno() for s in self.inherited],
            config_json=config_to_json(own),
        )
        async with trio.open_nursery() as nursery:
            try:
                process: trio.Process = await nursery.start(
                    partial(
                        trio.run_process,
                        workers.worker_argv(),
                        env=env,
                        pass_fds=[s.fileno() for s in self.inherited],
                        # Orders go down this pipe; its EOF tells an
                        # orphaned worker to stop.
                        stdin=subprocess.PIPE,
                        # Out of our process group: a Ctrl-C on the terminal
                        # reaches us alone, even while a worker is still
                        # starting, before it has set up its own signals.
                        process_group=0,
                        check=False,
                        deliver_cancel=partial(_kill, spawn),
                    )
                )
            except OSError as exc:  # pipe, fork or exec failed: EMFILE, EAGAIN, ENOENT...
                spawn.spawn_error = exc
            else:
                spawn.process = process
                self.log.debug("worker_started", worker=worker.index, pid=process.pid)
                # A stop that came while the spawn ran in its thread.
                if self.standing_order is not None:
                    workers.send_order(process, self.standing_order)

    async def _watch_heartbeats(
        self, spawn: _Spawn, reports: socket.socket, service: trio.Nursery
    ) -> None:
        timeout = self.config.worker_timeout
        while True:
            with trio.CancelScope(deadline=spawn.heard_at + timeout) as spawn.silence:
                await trio.sleep_forever()
            # Heartbeats still queued count: the one late may be us, stopped
            # or starved, and healthy workers must not pay for that.
            self._take_reports(spawn, reports, service)
            if trio.current_time() >= spawn.heard_at + timeout:
                break
        spawn.unresponsive = True
        spawn.kill.cancel()

    async def _listen(self, spawn: _Spawn, reports: socket.socket, service: trio.Nursery) -> None:
        while True:
            await trio.lowlevel.wait_readable(reports)
            self._take_reports(spawn, reports, service)

    def _take_reports(self, spawn: _Spawn, reports: socket.socket, service: trio.Nursery) -> None:
        for _ in range(_REPORTS_PER_WAKEUP):
            try:
                datagram = reports.recv(workers.REPORT_MAX_BYTES)
            except BlockingIOError:
                return
            report = workers.parse_report(datagram)
            if report.heartbeat:
                spawn.heard_at = trio.current_time()
                if spawn.silence is not None:
                    spawn.silence.deadline = spawn.heard_at + self.config.worker_timeout
            if report.active is not None:
                spawn.active = report.active
            if report.served is not None:
                spawn.served = report.served
            if report.stats is not None:
                question = self.questions.get(report.stats[0])
                if question is not None and question.spawn is spawn:
                    question.answer = report.stats[1]
                    question.answered.set()
            if report.ready and not spawn.ready:
                spawn.ready = True
                self._announce_once_all_ready(service)
            if report.reloaded and spawn.reloading:
                spawn.reloading = False
                self._reload_settled()

    def _announce_once_all_ready(self, service: trio.Nursery) -> None:
        # Synchronous, in the step that saw the last READY=1: no stop can
        # slip in between the check and the announcement.
        if self.announced or self.stop_began.is_set():
            return
        if not all(w.spawn is not None and w.spawn.ready for w in self.workers):
            return
        self.announced = True
        self.log.info(
            "listening",
            addresses=self.addresses,
            mode=self.config.mode.value,
            pid=os.getpid(),
            activation=self.activation,
            workers=len(self.workers),
        )
        self.notifier.send("READY=1", self._status())
        if self.notifier.enabled:
            service.start_soon(systemd.report_status, self.notifier, lambda: [self._status()])
            interval = systemd.watchdog_interval()
            if interval is not None:
                service.start_soon(systemd.keep_watchdog_fed, self.notifier, interval)

    def _expected_after_stop(self, ended: _Spawn) -> bool:
        """Whether an exit after a stop is the one the order asked for."""
        if ended.process is None or ended.unresponsive:
            return False
        forced = self.standing_order is not None and self.standing_order.verb is Verb.FORCE
        return ended.process.returncode in ((0, 1) if forced else (0,))

    def _report_exit(self, worker: _Worker, ended: _Spawn, *, restart_in_s: float | None) -> None:
        if ended.unresponsive:
            assert ended.killed_at is not None
            self.log.warning(
                "worker_unresponsive",
                worker=worker.index,
                pid=ended.pid,
                silent_s=round(ended.killed_at - ended.heard_at, 3),
            )
        self.log.warning(
            "worker_exited",
            worker=worker.index,
            pid=ended.pid,
            status=ended.status(),
            restart_in_s=restart_in_s,
        )

    def _order(self, verb: Verb, signal_name: str | None) -> None:
        """Tell every worker to ``stop`` (drain) or ``force`` (stop at once)."""
        order = Order(verb, signal_name)
        if verb is Verb.FORCE:
            self.exit_status = 1
            deadline = trio.current_time() + FORCE_KILL_AFTER_S
            for worker in self.workers:
                if worker.spawn is not None:
                    worker.spawn.kill.deadline = min(worker.spawn.kill.deadline, deadline)
        self.standing_order = order
        self.stop_began.set()
        for worker in self.workers:
            if worker.spawn is not None and worker.spawn.process is not None:
                workers.send_order(worker.spawn.process, order)

    def _reload(self, signal_name: str | None) -> None:
        # A process still being spawned is not told: it has not loaded
        # anything yet, and what it loads will be the new files.
        running = [
            w.spawn.process
            for w in self.workers
            if w.spawn is not None and w.spawn.process is not None
        ]
        self.log.info("reload_requested", signal=signal_name, workers=len(running))
        # With something to reload (TLS), RELOADING=1 now and READY=1 once
        # every worker told has reported its reload done or has exited.
        bracket = self.config.tls_cert is not None and self.announced
        if bracket and not self.reloading:
            self.reloading = True
            self.notifier.send("RELOADING=1", systemd.monotonic_usec())
        for w in self.workers:
            if w.spawn is None or w.spawn.process is None:
                continue
            if workers.send_order(w.spawn.process, Order(Verb.RELOAD, signal_name)) and bracket:
                w.spawn.reloading = True
        self._reload_settled()

    def _reload_settled(self) -> None:
        """Send the READY=1 that closes a reload, once no worker is still at it."""
        if not self.reloading:
            return
        if any(w.spawn is not None and w.spawn.reloading for w in self.workers):
            return
        self.reloading = False
        if not self.stop_began.is_set():  # nothing announced after STOPPING=1
            self.notifier.send("READY=1", self._status())

    def _serve_metrics(self, service: trio.Nursery, listeners: list[trio.SocketListener]) -> None:
        # Imported here, as in the daemon: only a supervisor serving metrics pays.
        from . import metrics

        monitor = metrics.LoopMonitor()
        service.start_soon(monitor.run, name="echosvc loop monitor")
        own = metrics.daemon_registry(None, monitor)
        view = metrics.WorkersView(len(self.workers), self._ask_stats, own)
        start_metrics(service, listeners, view)

    async def _ask_stats(self, index: int) -> str:
        """Worker ``index``'s metrics; `OSError` if it has no process to ask.

        Unbounded: the caller (`echosvc.metrics.WorkersView`) holds the deadline.
        """
        spawn = self.workers[index].spawn
        if spawn is None or spawn.process is None:
            raise ConnectionRefusedError(f"worker {index} is not running")
        number = next(self.question_ids)
        question = self.questions[number] = _Question(spawn)
        try:
            if not workers.send_order(spawn.process, Order(Verb.STATS, str(number))):
                raise ConnectionRefusedError(f"worker {index} takes no orders")
            await question.answered.wait()
        finally:
            del self.questions[number]
        return question.answer

    def _active(self) -> int:
        return sum(w.spawn.active for w in self.workers if w.spawn is not None)

    def _status(self) -> str:
        active = self._active()
        noun = "connection" if active == 1 else "connections"
        verb = "draining" if self.stop_began.is_set() else "serving"
        return f"STATUS={verb} {active} {noun} in {len(self.workers)} workers"


async def _kill(spawn: _Spawn, process: trio.Process) -> None:
    """The heartbeat watch, a forced stop, or our own failure: end it now."""
    spawn.killed_at = trio.current_time()
    process.kill()
    await trio.lowlevel.checkpoint()


def _describe(sock: socket.socket | trio.socket.SocketType) -> str:
    """How ``listening`` names a held or inherited socket (UDP as ``udp://``)."""
    if sock.type == socket.SOCK_DGRAM:
        return format_udp_address(sock.getsockname())
    return format_address(sock.getsockname())
