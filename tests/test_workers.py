"""``--workers N``: a supervisor process and N workers sharing one port."""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import pytest
import trio
import trio.testing
import typer.main

from echosvc import Config, supervisor, workers
from echosvc.cli import app
from echosvc.config import environment_for

from .support import (
    ECHOSVC,
    Daemon,
    captured_logs,
    connect,
    receive_exactly,
    receive_until_eof,
    round_trip,
)
from .test_cli import run_cli
from .test_systemd import Manager, free_port

TIME_LIMIT = 60


def test_the_cli_names_its_variables_by_the_rule_workers_are_configured_with() -> None:
    command = typer.main.get_command(app)
    serve = command.commands["serve"]  # type: ignore[attr-defined]
    flags = {param.name: param.envvar for param in serve.params if param.envvar}
    expected = environment_for(
        Config(
            backlog=1,
            metrics="127.0.0.1:0",
            tls_cert="c.pem",
            tls_key="k.pem",
            tls_client_ca="ca.pem",
        )
    )
    assert sorted(flags.values()) == sorted(expected)
    assert flags["host"] == "ECHOSVC_HOST"


def test_workers_must_be_a_positive_number_or_auto() -> None:
    for value in ("0", "many", "-2"):
        done = run_cli("serve", "--workers", value)
        assert done.returncode == 2
        assert "'--workers'" in done.stderr


async def wait_for_supervisor(daemon: Daemon, workers: int) -> dict[str, object]:
    records = await daemon.wait_for("listening", workers + 1)
    [announced] = [r for r in records if "workers" in r]
    return announced


def live_workers(daemon: Daemon) -> dict[int, int]:
    """Worker index -> pid of the process that reported ``listening`` last."""
    return {r["worker"]: r["pid"] for r in daemon.events("listening") if "worker" in r}


async def wait_until_the_supervisor_stopped(daemon: Daemon) -> None:
    """Until the supervisor's own ``stopped``: its workers' records all came before."""
    while not [r for r in daemon.events("stopped") if "workers" in r]:
        await daemon.wait_for("stopped", len(daemon.events("stopped")) + 1)


def assert_stopped_cleanly(daemon: Daemon, *, killed: int = 0) -> None:
    """No traceback, nothing forced, every worker spawned gone, and drained by
    its order unless it is one of the ``killed``; nothing announced after the stop."""
    text = daemon.stderr_text()
    assert all(line.startswith(b"{") for line in daemon.raw_lines if line), text
    assert not daemon.events("shutdown_forced"), text
    spawned = {r["pid"] for r in daemon.events("worker_started")}
    for pid in spawned:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    if spawned:  # known at --log-level debug
        drained = [r for r in daemon.events("stopped") if "worker" in r]
        assert len(drained) == len(spawned) - killed, text
    # The supervisor's own records: its worker_* ones carry "worker".
    own = [r["event"] for r in daemon.records if "worker" not in r]
    assert "listening" not in own[own.index("shutdown_started") :], text


def assert_ready_never_after_stopping(manager: Manager) -> None:
    said = [line for _, text in manager.messages for line in text.split("\n")]
    assert "STOPPING=1" in said, said
    assert said.count("READY=1") <= 1, said
    assert "READY=1" not in said[said.index("STOPPING=1") :], said


async def notify_manager() -> Manager:
    manager = Manager(f"@echosvc-test-workers-{os.getpid()}-{secrets.token_hex(4)}")
    await manager.bind()
    return manager


async def test_two_workers_share_the_port_and_stop_together() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0", "--workers", "2")
            announced = await wait_for_supervisor(daemon, 2)
            assert announced["pid"] == daemon.process.pid
            assert announced["workers"] == 2
            port = daemon.port
            assert announced["addresses"] == [f"127.0.0.1:{port}"]
            worker_pids = {r["pid"] for r in daemon.events("listening") if "worker" in r}
            assert len(worker_pids) == 2
            assert daemon.process.pid not in worker_pids
            # The kernel spreads connections across both workers' queues.
            clients = [await connect(port) for _ in range(40)]
            for i, client in enumerate(clients):
                await round_trip(client, b"%d\n" % i)
            for client in clients:
                await client.aclose()
            closed = await daemon.wait_for("connection_closed", 40)
            assert {record["worker"] for record in closed} == {0, 1}
            assert await daemon.stop() == 0
    [stopped] = [r for r in daemon.events("stopped") if "workers" in r]
    assert stopped["connections_served"] == 40
    assert len(daemon.events("stopped")) == 3


# Makes a worker exit with status 3 on SIGUSR1, as a worker with a bug
# might: loaded by every Python process on PYTHONPATH, acting only in workers.
EXIT_3_ON_SIGUSR1 = """
import os, signal
if "_ECHOSVC_WORKER" in os.environ:
    signal.signal(signal.SIGUSR1, lambda *_: os._exit(3))
"""

DEATHS = [
    pytest.param(signal.SIGKILL, "SIGKILL", id="SIGKILL"),
    # Real-time signals have no name in Python's signal.Signals.
    pytest.param(signal.SIGRTMIN + 1, f"signal {signal.SIGRTMIN + 1}", id="RTMIN+1"),
    pytest.param(signal.SIGUSR1, "exit 3", id="exit-3"),
]


@pytest.mark.parametrize(("signum", "status"), DEATHS)
async def test_a_worker_that_dies_is_restarted_and_the_service_goes_on(
    signum: int, status: str, tmp_path: Path
) -> None:
    (tmp_path / "sitecustomize.py").write_text(EXIT_3_ON_SIGUSR1)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.getenv("PYTHONPATH")]))}
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0", "--workers", "2", env=env)
            await wait_for_supervisor(daemon, 2)
            victim = live_workers(daemon)[1]
            os.kill(victim, signum)
            [exited] = await daemon.wait_for("worker_exited")
            assert (exited["worker"], exited["pid"], exited["status"]) == (1, victim, status)
            assert exited["restart_in_s"] == 0.1
            # Its replacement reports in.
            await daemon.wait_for("listening", 4)
            replacement = daemon.events("listening")[-1]
            assert replacement["worker"] == 1
            assert replacement["pid"] != victim
            for _ in range(10):
                async with await connect(daemon.port) as client:
                    await round_trip(client, b"still served\n")
            assert await daemon.stop() == 0
    assert_stopped_cleanly(daemon, killed=1)


async def test_workers_that_keep_dying_make_the_supervisor_give_up() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0", "--workers", "2")
            await wait_for_supervisor(daemon, 2)
            killed: set[int] = set()
            for round_ in range(5):
                # Kill whichever worker has reported in most recently.
                await daemon.wait_for("listening", 3 + round_)
                pid = int(daemon.events("listening")[-1]["pid"])
                if pid == daemon.process.pid or pid in killed:
                    pid = int(daemon.events("listening")[-2]["pid"])
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
                await daemon.wait_for("worker_exited", round_ + 1)
            assert await daemon.wait() == 1
    [failing] = daemon.events("workers_failing")
    assert failing["exits"] == 5


async def test_a_second_signal_stops_the_workers_at_once() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(
                nursery, "--port", "0", "--workers", "2", "--shutdown-grace", "60"
            )
            await wait_for_supervisor(daemon, 2)
            stuck = await connect(daemon.port)
            with trio.move_on_after(0.5):  # never reads: keeps its worker draining
                while True:
                    await stuck.send_all(b"x" * 1023 + b"\n")
            daemon.send_signal(signal.SIGTERM)
            await daemon.wait_for("shutdown_started", 3)
            with trio.move_on_after(0.5) as draining:
                await daemon.process.wait()
            assert draining.cancelled_caught
            assert await daemon.stop() == 1
            await stuck.aclose()
    assert daemon.events("shutdown_forced")


async def test_ctrl_c_to_the_whole_process_group_is_one_graceful_stop() -> None:
    """A terminal signals every process in the group; workers must not count
    the supervisor's forwarded request as a second one."""
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0", "--workers", "2", new_session=True)
            await wait_for_supervisor(daemon, 2)
            client = await connect(daemon.port)
            await client.send_all(b"half a line")
            await trio.sleep(0.2)
            os.killpg(daemon.process.pid, signal.SIGINT)
            assert await daemon.wait() == 0
            assert await receive_until_eof(client) == b"half a line"
            await client.aclose()
    assert not daemon.events("shutdown_forced")
    assert len(daemon.events("shutdown_started")) == 3
    [closed] = daemon.events("connection_closed")
    assert closed["reason"] == "shutdown"


async def test_workers_stop_by_themselves_when_the_supervisor_is_killed() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0", "--workers", "2")
            await wait_for_supervisor(daemon, 2)
            daemon.send_signal(signal.SIGKILL)
            assert await daemon.wait() == -signal.SIGKILL
            # The workers share our stderr pipe: their last records arrive.
            stopped = await daemon.wait_for("stopped", 2)
    assert {record["worker"] for record in stopped} == {0, 1}
    assert {r["signal"] for r in daemon.events("shutdown_started")} == {None}


async def test_auto_means_one_worker_per_available_cpu() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0", env={"ECHOSVC_WORKERS": "auto"})
            cpus = len(os.sched_getaffinity(0))
            if cpus == 1:
                assert "workers" not in daemon.listening  # one process, no supervisor
            else:
                assert (await wait_for_supervisor(daemon, cpus))["workers"] == cpus
            assert await daemon.stop() == 0


async def test_the_supervisor_is_ready_when_its_workers_are() -> None:
    manager = Manager(f"@echosvc-test-workers-{os.getpid()}")
    await manager.bind()
    env = {"NOTIFY_SOCKET": manager.address, "WATCHDOG_USEC": "400000"}
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager.collect)
            daemon = await Daemon.start(nursery, "--port", "0", "--workers", "2", env=env)
            await manager.wait_for("READY=1")
            assert len([r for r in daemon.events("listening") if "worker" in r]) == 2
            async with await connect(daemon.port) as client:
                await round_trip(client, b"counted\n")
                await manager.wait_for("STATUS=serving 1 connection in 2 workers")
            await manager.wait_for("WATCHDOG=1")
            assert await daemon.stop() == 0
            nursery.cancel_scope.cancel()
    assert manager.received("STOPPING=1")
    # Only the supervisor talks to the manager: one READY, not three.
    assert len(manager.received("READY=1")) == 1


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed (Debian package systemd)",
)
async def test_socket_activated_workers_share_the_inherited_socket() -> None:
    port = free_port()
    argv = [
        "systemd-socket-activate",
        "-E",
        "PATH",
        "-l",
        f"127.0.0.1:{port}",
        sys.executable,
        "-m",
        "echosvc",
        "serve",
        "--workers",
        "2",
    ]
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, argv=argv, wait_for=None)
            with trio.fail_after(10):
                while True:
                    try:
                        first = await connect(port)
                        break
                    except OSError:
                        await trio.sleep(0.05)
            await round_trip(first, b"wake up\n")
            announced = await wait_for_supervisor(daemon, 2)
            assert announced["activation"] == "systemd"
            workers = [r for r in daemon.events("listening") if "worker" in r]
            assert {r["activation"] for r in workers} == {"systemd"}
            clients = [await connect(port) for _ in range(20)]
            for client in clients:
                await round_trip(client, b"shared\n")
                await client.aclose()
            await first.aclose()
            assert await daemon.stop() == 0


# --- stops at every moment ------------------------------------------------------

# After the supervisor's first worker_started (its loop and signal handling
# are up): the other worker still spawning, both importing, binding, reporting
# READY=1, the supervisor announcing. "Ctrl-C" signals the whole process group.
START_UP_STOPS = [
    (0.0, "SIGTERM"),
    (0.0, "Ctrl-C"),
    (0.2, "SIGTERM"),
    (0.4, "Ctrl-C"),
    (0.8, "SIGTERM"),
]


@pytest.mark.parametrize(("delay", "how"), START_UP_STOPS)
async def test_a_stop_at_any_moment_of_start_up_is_clean_and_nothing_is_announced_after_it(
    delay: float, how: str
) -> None:
    manager = await notify_manager()
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager.collect)
            daemon = await Daemon.start(
                nursery,
                "--port=0",
                "--workers=2",
                "--log-level=debug",
                env={"NOTIFY_SOCKET": manager.address},
                wait_for="worker_started",
                new_session=True,
            )
            await trio.sleep(delay)
            if how == "Ctrl-C":
                os.killpg(daemon.process.pid, signal.SIGINT)
            else:
                daemon.send_signal(signal.SIGTERM)
            assert await daemon.wait() == 0
            await wait_until_the_supervisor_stopped(daemon)
            await trio.testing.wait_all_tasks_blocked()  # every datagram read
            nursery.cancel_scope.cancel()
    ended_by_the_signal = daemon.events("worker_exited")
    if how == "Ctrl-C":
        # A worker caught between its fork and leaving our process group gets
        # the terminal's SIGINT too, before it can ignore it: reported, and
        # not restarted.
        for record in ended_by_the_signal:
            assert (record["status"], record["restart_in_s"]) == ("SIGINT", None)
    else:
        assert not ended_by_the_signal
    assert_stopped_cleanly(daemon, killed=len(ended_by_the_signal))
    assert_ready_never_after_stopping(manager)


# After worker_exited (a 0.1 s back-off): backing off, then spawning (a few
# ms from 0.1 s on: where a stop used to be lost, so three points there), the
# replacement importing, and reporting in.
RESTART_STOPS = [0.0, 0.05, 0.099, 0.101, 0.103, 0.3, 0.8]


@pytest.mark.parametrize("delay", RESTART_STOPS)
async def test_a_stop_at_any_moment_of_a_restart_is_clean(delay: float) -> None:
    manager = await notify_manager()
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager.collect)
            daemon = await Daemon.start(
                nursery,
                "--port=0",
                "--workers=2",
                "--log-level=debug",
                env={"NOTIFY_SOCKET": manager.address},
            )
            await wait_for_supervisor(daemon, 2)
            os.kill(live_workers(daemon)[1], signal.SIGKILL)
            [exited] = await daemon.wait_for("worker_exited")
            await trio.sleep(delay)
            assert await daemon.stop() == 0
            await wait_until_the_supervisor_stopped(daemon)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert_stopped_cleanly(daemon, killed=1)
    assert daemon.events("worker_exited") == [exited]
    assert_ready_never_after_stopping(manager)


async def test_a_stop_ends_a_restart_back_off_at_once() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port=0", "--workers=2", "--log-level=debug")
            await wait_for_supervisor(daemon, 2)
            # Four quick deaths: the fifth restart would wait 0.8 s.
            for round_ in range(4):
                await daemon.wait_for("listening", 3 + round_)
                os.kill(live_workers(daemon)[1], signal.SIGKILL)
                await daemon.wait_for("worker_exited", round_ + 1)
            assert daemon.events("worker_exited")[-1]["restart_in_s"] == 0.8
            assert await daemon.stop() == 0
            await wait_until_the_supervisor_stopped(daemon)
    assert_stopped_cleanly(daemon, killed=4)
    own = [r for r in daemon.records if "worker" not in r]
    began, ended = (
        datetime.fromisoformat(next(r for r in own if r["event"] == name)["timestamp"])
        for name in ("shutdown_started", "stopped")
    )
    # Worker 0's drain, not what was left of the back-off.
    assert (ended - began).total_seconds() < 0.7


# --- deaths that must not take the service down -----------------------------------


async def test_a_worker_that_cannot_be_spawned_counts_as_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fork or exec failing (EAGAIN, ENOMEM, a missing interpreter) is logged and
    retried like any death, never a traceback that takes the supervisor down."""
    missing = "/nonexistent/echosvc-worker"
    monkeypatch.setattr(workers, "worker_argv", lambda: [missing])
    with captured_logs() as logs, trio.fail_after(TIME_LIMIT):
        status = await supervisor._Supervisor(Config(port=0, workers=2), [], False).run()
    assert status == 1
    [failing] = logs.events("workers_failing")
    assert failing["exits"] == supervisor.GIVE_UP_EXITS
    # The other worker's spawn may fail once more as the supervisor gives up.
    exits = logs.events("worker_exited")
    assert len(exits) in (supervisor.GIVE_UP_EXITS, supervisor.GIVE_UP_EXITS + 1)
    for record in exits:
        assert record["pid"] is None
        assert record["status"].startswith("spawn failed: [Errno 2]"), record
        assert missing in record["status"]
    restarts = [record["restart_in_s"] for record in exits]
    assert None not in restarts[: supervisor.GIVE_UP_EXITS - 1]
    assert set(restarts[supervisor.GIVE_UP_EXITS - 1 :]) == {None}  # it gives up instead


# --- heartbeats -------------------------------------------------------------------

# Short, to keep the tests short, but above a worker's start-up time (which
# the silence counts too) on a loaded machine: 0.5 s idle, 2 s and more with
# other test runs on the same two cores.
WORKER_TIMEOUT = 4.0


def wait_until_stopped(pid: int) -> None:
    """SIGSTOP is asynchronous: wait (bounded) until the kernel shows state T."""
    for _ in range(1000):
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        os.sched_yield()
    raise AssertionError(f"{pid} did not stop")


def kill_quietly(pid: int) -> None:
    """A stopped process never sees its supervisor go: never leave one behind."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


async def test_a_wedged_worker_is_killed_after_the_timeout_and_replaced() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(
                nursery, "--port=0", "--workers=2", f"--worker-timeout={WORKER_TIMEOUT:g}"
            )
            await wait_for_supervisor(daemon, 2)
            healthy, victim = live_workers(daemon)[0], live_workers(daemon)[1]
            try:
                os.kill(victim, signal.SIGSTOP)  # its loop stops, its socket stays open
                wedged_at = trio.current_time()
                [unresponsive] = await daemon.wait_for("worker_unresponsive")
                noticed_after = trio.current_time() - wedged_at
            finally:
                kill_quietly(victim)
            assert (unresponsive["worker"], unresponsive["pid"]) == (1, victim)
            assert unresponsive["level"] == "warning"
            # Silent since its last heartbeat, at most 0.5 s before the SIGSTOP.
            assert WORKER_TIMEOUT <= unresponsive["silent_s"] < WORKER_TIMEOUT + 0.5
            assert noticed_after <= WORKER_TIMEOUT + 1
            [exited] = await daemon.wait_for("worker_exited")
            assert (exited["worker"], exited["pid"], exited["status"]) == (1, victim, "SIGKILL")
            assert exited["restart_in_s"] == 0.1
            await daemon.wait_for("listening", 4)
            replacement = live_workers(daemon)[1]
            assert replacement != victim
            # Every new connection is answered, and the replacement takes its share.
            for i in range(20):
                async with await connect(daemon.port) as client:
                    await round_trip(client, b"new connection %d\n" % i)
            closed = await daemon.wait_for("connection_closed", 20)
            assert {record["worker"] for record in closed} == {0, 1}

            # The supervisor itself stopped for longer than the timeout: its
            # workers' heartbeats wait in its sockets, and on waking it kills
            # neither for its own lateness.
            daemon.send_signal(signal.SIGSTOP)
            wait_until_stopped(daemon.process.pid)
            await trio.sleep(WORKER_TIMEOUT + 0.5)
            daemon.send_signal(signal.SIGCONT)
            for i in range(5):
                async with await connect(daemon.port) as client:
                    await round_trip(client, b"after the pause %d\n" % i)
            assert await daemon.stop() == 0
            await wait_until_the_supervisor_stopped(daemon)
    assert [r["pid"] for r in daemon.events("worker_unresponsive")] == [victim]
    assert len(daemon.events("worker_exited")) == 1
    assert live_workers(daemon) == {0: healthy, 1: replacement}
    assert_stopped_cleanly(daemon, killed=1)


async def test_a_wedged_worker_cannot_hold_a_graceful_stop() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(
                nursery,
                "--port=0",
                "--workers=2",
                f"--worker-timeout={WORKER_TIMEOUT:g}",
                "--shutdown-grace=60",
            )
            await wait_for_supervisor(daemon, 2)
            victim = live_workers(daemon)[1]
            try:
                os.kill(victim, signal.SIGSTOP)
                wait_until_stopped(victim)
                stopped_at = trio.current_time()
                assert await daemon.stop() == 0
                assert trio.current_time() - stopped_at <= WORKER_TIMEOUT + 1
            finally:
                kill_quietly(victim)
    [unresponsive] = daemon.events("worker_unresponsive")
    assert unresponsive["pid"] == victim
    [exited] = daemon.events("worker_exited")
    assert (exited["pid"], exited["status"], exited["restart_in_s"]) == (victim, "SIGKILL", None)
    assert_stopped_cleanly(daemon, killed=1)


async def test_a_second_signal_ends_a_wedged_worker_even_with_no_timeout() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(
                nursery, "--port=0", "--workers=2", "--worker-timeout=0", "--shutdown-grace=60"
            )
            await wait_for_supervisor(daemon, 2)
            victim = live_workers(daemon)[1]
            try:
                os.kill(victim, signal.SIGSTOP)
                wait_until_stopped(victim)
                daemon.send_signal(signal.SIGTERM)
                await daemon.wait_for("shutdown_started", 2)  # the other worker's
                with trio.move_on_after(1) as waiting:  # no timeout: no kill
                    await daemon.process.wait()
                assert waiting.cancelled_caught
                daemon.send_signal(signal.SIGTERM)
                forced_at = trio.current_time()
                assert await daemon.wait() == 1
                assert trio.current_time() - forced_at < supervisor.FORCE_KILL_AFTER_S + 2
            finally:
                kill_quietly(victim)
    [exited] = daemon.events("worker_exited")
    assert (exited["pid"], exited["status"], exited["restart_in_s"]) == (victim, "SIGKILL", None)
    assert not daemon.events("worker_unresponsive")


# --- SIGHUP -----------------------------------------------------------------------


async def test_sighup_reaches_every_worker_once_and_stops_nothing() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port=0", "--workers=2", new_session=True)
            await wait_for_supervisor(daemon, 2)
            before = live_workers(daemon)
            client = await connect(daemon.port)
            await round_trip(client, b"before\n")
            daemon.send_signal(signal.SIGHUP)
            first = await daemon.wait_for("reload_requested", 3)
            # A hangup of the terminal signals the whole group, and systemd's
            # `kill --kill-whom=all` every process: still one reload each.
            os.killpg(daemon.process.pid, signal.SIGHUP)
            await daemon.wait_for("reload_requested", 6)
            os.kill(before[0], signal.SIGHUP)  # ignored: workers obey orders only
            daemon.send_signal(signal.SIGHUP)
            await daemon.wait_for("reload_requested", 9)
            await round_trip(client, b"after\n")  # the open connection is untouched
            for _ in range(5):
                async with await connect(daemon.port) as other:
                    await round_trip(other, b"new\n")
            await client.aclose()
            assert await daemon.stop() == 0
            await wait_until_the_supervisor_stopped(daemon)
    supervisor_record, *worker_records = sorted(first, key=lambda r: r.get("worker", -1))
    assert supervisor_record == {**supervisor_record, "signal": "SIGHUP", "workers": 2}
    assert [(r["worker"], r["signal"], r["reloads"]) for r in worker_records] == [
        (0, "SIGHUP", []),
        (1, "SIGHUP", []),
    ]
    assert len(daemon.events("reload_requested")) == 9
    assert live_workers(daemon) == before
    assert not daemon.events("worker_exited")
    assert len(daemon.events("shutdown_started")) == 3  # only the stop at the end
    assert_stopped_cleanly(daemon)


async def test_sighup_without_workers_is_a_reload_request_that_stops_nothing() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port=0")
            client = await connect(daemon.port)
            await round_trip(client, b"before\n")
            daemon.send_signal(signal.SIGHUP)
            [record] = await daemon.wait_for("reload_requested")
            await round_trip(client, b"after\n")
            async with await connect(daemon.port) as other:
                await round_trip(other, b"new\n")
            await client.aclose()
            assert await daemon.stop() == 0
    assert (record["signal"], record["reloads"]) == ("SIGHUP", [])
    assert "worker" not in record
    [started] = daemon.events("shutdown_started")
    assert started["signal"] == "SIGTERM"


# --- net.ipv4.tcp_migrate_req -------------------------------------------------------

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(namespace: BinaryIO) -> None:
    if _libc.setns(namespace.fileno(), _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


@contextlib.contextmanager
def inside(namespace: str) -> Iterator[None]:
    """This thread in network namespace ``namespace`` for the block (setns(2))."""
    with (
        open("/proc/thread-self/ns/net", "rb") as home,
        open(f"/run/netns/{namespace}", "rb") as there,
    ):
        _setns(there)
        try:
            yield
        finally:
            _setns(home)


def set_migrate_req(namespace: str, value: int) -> None:
    # /proc/sys/net is the namespace of the thread that opens it.
    with inside(namespace), open("/proc/sys/net/ipv4/tcp_migrate_req", "w") as knob:
        knob.write(str(value))


@contextlib.asynccontextmanager
async def network_namespace(migrate_req: int) -> AsyncIterator[str]:
    """A fresh namespace with loopback up and ``tcp_migrate_req`` set, or a skip."""
    if shutil.which("ip") is None:
        pytest.skip("ip is not installed (Debian package iproute2)")
    name = f"esw{os.getpid() % 100000}{secrets.token_hex(2)}"
    added = await trio.run_process(["ip", "netns", "add", name], capture_stderr=True, check=False)
    if added.returncode:
        reason = added.stderr.decode(errors="replace").strip()
        pytest.skip(f"the kernel refused to create a network namespace: {reason}")
    try:
        await trio.run_process(["ip", "-n", name, "link", "set", "lo", "up"])
        try:
            set_migrate_req(name, migrate_req)
        except OSError as exc:
            pytest.skip(
                "this kernel does not let a network namespace set"
                f" net.ipv4.tcp_migrate_req (Linux 5.14 or later): {exc}"
            )
        yield name
    finally:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 10):
            await trio.run_process(["ip", "netns", "del", name], check=False)


CLIENTS_WHILE_WEDGED = 20


@pytest.mark.parametrize("migrate_req", [1, 0], ids=["tcp_migrate_req=1", "tcp_migrate_req=0"])
async def test_connections_queued_on_a_killed_worker_move_to_a_live_one_with_tcp_migrate_req(
    migrate_req: int,
) -> None:
    """The kernel completes handshakes into a wedged worker's accept queue; when
    the worker dies, those connections move to a live worker only with
    net.ipv4.tcp_migrate_req=1, and are reset without it (deploy/README.md)."""
    async with network_namespace(migrate_req) as namespace:
        with trio.fail_after(TIME_LIMIT):
            async with trio.open_nursery() as nursery:
                daemon = await Daemon.start(
                    nursery,
                    "--port=0",
                    "--workers=2",
                    argv=["ip", "netns", "exec", namespace, *ECHOSVC, "serve"],
                )
                await wait_for_supervisor(daemon, 2)
                victim = live_workers(daemon)[1]
                try:
                    os.kill(victim, signal.SIGSTOP)
                    wait_until_stopped(victim)
                    clients = []
                    for i in range(CLIENTS_WHILE_WEDGED):
                        with inside(namespace):
                            sock = trio.socket.socket()
                        await sock.connect(("127.0.0.1", daemon.port))
                        client = trio.SocketStream(sock)
                        await client.send_all(b"queued %d\n" % i)
                        clients.append(client)
                finally:
                    # However it dies: a crash, or the supervisor's SIGKILL
                    # after --worker-timeout (test_workers.py above).
                    kill_quietly(victim)
                outcomes = []
                for i, client in enumerate(clients):
                    line = b"queued %d\n" % i
                    try:
                        outcomes.append(await receive_exactly(client, len(line)) == line)
                    except trio.BrokenResourceError:  # ECONNRESET
                        outcomes.append(False)
                    await client.aclose()
                assert await daemon.stop() == 0
    if migrate_req:
        assert all(outcomes), outcomes
    else:
        # Half of them hashed to the wedged worker; 2**-20 odds that none did.
        assert not all(outcomes), outcomes
        assert any(outcomes), outcomes
