"""``--workers N``: a supervisor process and N workers sharing one port."""

from __future__ import annotations

import os
import shutil
import signal
import sys

import pytest
import trio
import typer.main

from echosvc import Config
from echosvc.cli import app
from echosvc.config import environment_for

from .support import Daemon, connect, receive_until_eof, round_trip
from .test_cli import run_cli
from .test_systemd import Manager, free_port

TIME_LIMIT = 60


def test_the_cli_names_its_variables_by_the_rule_workers_are_configured_with() -> None:
    command = typer.main.get_command(app)
    serve = command.commands["serve"]  # type: ignore[attr-defined]
    flags = {param.name: param.envvar for param in serve.params if param.envvar}
    expected = environment_for(Config(backlog=1, metrics="127.0.0.1:0"))
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


async def test_a_worker_that_dies_is_restarted_and_the_service_goes_on() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0", "--workers", "2")
            await wait_for_supervisor(daemon, 2)
            victim = next(r for r in daemon.events("listening") if r.get("worker") == 1)
            os.kill(int(victim["pid"]), signal.SIGKILL)
            [exited] = await daemon.wait_for("worker_exited")
            assert (exited["worker"], exited["pid"], exited["status"]) == (
                1,
                victim["pid"],
                "SIGKILL",
            )
            assert exited["restart_in_s"] == 0.1
            # Its replacement reports in.
            await daemon.wait_for("listening", 4)
            replacement = daemon.events("listening")[-1]
            assert replacement["worker"] == 1
            assert replacement["pid"] != victim["pid"]
            for _ in range(10):
                async with await connect(daemon.port) as client:
                    await round_trip(client, b"still served\n")
            assert await daemon.stop() == 0


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
