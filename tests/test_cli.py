"""The ``echosvc`` command as users run it: a real subprocess, real signals.

Logs are read from the daemon's stderr and parsed as the JSON they promise to
be; the exit status and stderr of bad invocations are what a user would see.
"""

from __future__ import annotations

import datetime
import os
import pty
import re
import resource
import select
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import trio

from echosvc import __file__ as echosvc_init
from echosvc import __version__

from .support import (
    CONSOLE_SCRIPT,
    ECHOSVC,
    Daemon,
    child_env,
    connect,
    receive_exactly,
    receive_until_eof,
    round_trip,
)
from .test_server import has_ipv6_loopback

TIME_LIMIT = 30


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ECHOSVC, *args],
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=TIME_LIMIT,
        check=False,
    )


def test_version_from_the_console_script_and_python_m() -> None:
    for argv in ([str(CONSOLE_SCRIPT), "--version"], [*ECHOSVC, "--version"]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIME_LIMIT, check=False)
        assert (done.returncode, done.stdout) == (0, f"echosvc {__version__}\n")


async def test_serve_logs_json_serves_and_stops_cleanly_on_sigterm() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0", "--shutdown-grace", "7")
            listening = daemon.listening
            assert listening["addresses"] == [f"127.0.0.1:{daemon.port}"]
            assert listening["mode"] == "line"
            assert listening["pid"] == daemon.process.pid
            assert listening["activation"] == "bind"
            async with await connect(daemon.port) as client:
                await round_trip(client, b"over the real CLI\n")
            await daemon.wait_for("connection_closed")
            assert await daemon.stop(signal.SIGTERM) == 0
    [started] = daemon.events("shutdown_started")
    assert (started["signal"], started["active"], started["grace_s"]) == ("SIGTERM", 0, 7.0)
    [stopped] = daemon.events("stopped")
    assert stopped["connections_served"] == 1
    for record in daemon.records:
        assert record["level"] in {"debug", "info", "warning", "error"}
        stamp = datetime.datetime.fromisoformat(record["timestamp"])
        assert stamp.utcoffset() == datetime.timedelta(0)
    # One JSON object per line, and nothing else on stderr.
    assert len(daemon.records) == len([line for line in daemon.raw_lines if line])


async def test_sigint_is_graceful_too_and_an_idle_client_gets_its_partial_line() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0")
            client = await connect(daemon.port)
            await client.send_all(b"done\nhalf")
            assert await receive_exactly(client, 5) == b"done\n"
            await trio.sleep(0.1)
            daemon.send_signal(signal.SIGINT)
            assert await receive_until_eof(client) == b"half"
            assert await daemon.wait() == 0
            await client.aclose()
    assert daemon.events("shutdown_started")[0]["signal"] == "SIGINT"
    [closed] = daemon.events("connection_closed")
    assert (closed["reason"], closed["bytes_in"], closed["bytes_out"]) == ("shutdown", 9, 9)


async def test_a_second_signal_stops_at_once_with_status_1() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(
                nursery, "--port", "0", "--shutdown-grace", "60", "--write-timeout", "60"
            )
            stuck = await connect(daemon.port)
            with trio.move_on_after(0.5):  # fill both socket buffers, never read
                while True:
                    await stuck.send_all(b"q" * 1023 + b"\n")
            daemon.send_signal(signal.SIGTERM)
            await daemon.wait_for("shutdown_started")
            with trio.move_on_after(0.3) as still_draining:
                await daemon.process.wait()
            assert still_draining.cancelled_caught, "exited without waiting for the echo"
            started = trio.current_time()
            assert await daemon.stop(signal.SIGTERM) == 1
            assert trio.current_time() - started < 5
            await stuck.aclose()
    assert daemon.events("shutdown_forced")[0]["signal"] == "SIGTERM"
    assert daemon.events("connection_closed")[0]["reason"] == "shutdown"
    assert daemon.events("stopped")
    assert "Traceback" not in daemon.stderr_text()


async def test_environment_variables_configure_and_flags_beat_them() -> None:
    env = {
        "ECHOSVC_PORT": "0",
        "ECHOSVC_MODE": "stream",
        "ECHOSVC_LOG_LEVEL": "debug",
        "ECHOSVC_READ_TIMEOUT": "0.3",
    }
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, env=env)
            assert daemon.listening["mode"] == "stream"
            async with await connect(daemon.port) as client:
                await round_trip(client, b"no newline needed")
                assert await receive_until_eof(client) == b""  # idle timeout from the env
            assert (await daemon.wait_for("connection_closed"))[0]["reason"] == "read_timeout"
            assert daemon.events("connection_opened")  # debug level from the env
            assert await daemon.stop() == 0

            daemon = await Daemon.start(nursery, "--mode", "line", env=env)
            assert daemon.listening["mode"] == "line"
            assert await daemon.stop() == 0


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no ::1")
async def test_echosvc_host_takes_a_comma_separated_list() -> None:
    env = {"ECHOSVC_HOST": "127.0.0.1, ::1", "ECHOSVC_PORT": "0"}
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, env=env)
            port = daemon.port
            assert daemon.listening["addresses"] == [f"127.0.0.1:{port}", f"[::1]:{port}"]
            async with await connect(port, "::1") as client:
                await round_trip(client, b"six\n")
            assert await daemon.stop() == 0


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["--port", "70000"], {}, "'--port'"),
        (["--port", "http"], {}, "'--port'"),
        (["--read-timeout", "-1"], {}, "'--read-timeout'"),
        (["--write-timeout", "soon"], {}, "'--write-timeout'"),
        (["--shutdown-grace", "-3"], {}, "'--shutdown-grace'"),
        (["--max-line-bytes", "0"], {}, "'--max-line-bytes'"),
        (["--mode", "lines"], {}, "'--mode'"),
        (["--log-format", "xml"], {}, "'--log-format'"),
        (["--backlog", "0"], {}, "'--backlog'"),
        (["--colour"], {}, "--colour"),
        ([], {"ECHOSVC_MAX_CONNECTIONS": "0"}, "ECHOSVC_MAX_CONNECTIONS"),
        ([], {"ECHOSVC_PORT": "-5"}, "ECHOSVC_PORT"),
    ],
)
def test_bad_values_are_usage_errors_that_name_the_option(
    args: list[str], env: dict[str, str], names: str
) -> None:
    done = run_cli("serve", *args, env=env)
    assert done.returncode == 2
    assert names in done.stderr
    assert "Traceback" not in done.stderr
    assert "listening" not in done.stderr


@pytest.mark.parametrize("command", ["check", "bench"])
@pytest.mark.parametrize("port", ["70000", "0", "-1"])
def test_check_and_bench_refuse_a_port_out_of_range(command: str, port: str) -> None:
    """The C library would wrap 70000 to 4464 and probe that instead."""
    done = run_cli(command, "--port", port)
    assert done.returncode == 2
    assert "'--port'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("entry", ["python -m", "console script"])
async def test_ctrl_c_at_any_moment_of_start_up_exits_quietly(entry: str) -> None:
    """Before the daemon owns its signals (imports, log set-up) a SIGINT is a
    quiet exit with 130; after, it is a graceful stop with 0. Never a
    KeyboardInterrupt traceback. The delays sweep start-up, which takes
    about half a second here, mostly importing typer and rich.

    The interpreter's own first ~20 ms (``site``, ``runpy`` and what they
    import, before any code of ours runs) can print a traceback no program
    can guard against; a delivery that landed there -- a traceback without a
    single frame of the echosvc package -- is not counted."""
    package = str(Path(echosvc_init).parent)
    argv = [*ECHOSVC] if entry == "python -m" else [str(CONSOLE_SCRIPT)]
    statuses = []
    for delay in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.45, 0.7, 1.0, 1.5):
        process = await trio.lowlevel.open_process(
            [*argv, "serve", "--port", "0", "--log-format", "json"],
            env=child_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        await trio.sleep(delay)
        process.send_signal(signal.SIGINT)
        assert process.stderr is not None
        stderr = b""
        with trio.fail_after(15):
            while chunk := await process.stderr.receive_some():
                stderr += chunk
            status = await process.wait()
        text = stderr.decode()
        frames = re.findall(r'File "([^"]+)"', text)
        if "KeyboardInterrupt" in text and not any(f.startswith(package) for f in frames):
            continue  # the interpreter's start-up, before echosvc runs
        assert "Traceback" not in text, (delay, text)
        assert "KeyboardInterrupt" not in text, (delay, text)
        # -SIGINT: the signal came before Python had installed its handler.
        assert status in (130, 0, -signal.SIGINT), (delay, status, text)
        if status == 0:
            assert '"event": "shutdown_started"' in text
        statuses.append(status)
    assert 130 in statuses, f"no delay landed in start-up: {statuses}"


async def handled_by_the_process(pid: int, signum: signal.Signals) -> None:
    """Wait until the process ignores or catches ``signum`` (``/proc/PID/status``):
    from then on its own code decides. Before, the interpreter is still
    starting, which on a loaded machine takes as long as it takes."""
    bit = 1 << (signum - 1)
    for _ in range(2000):
        status = Path(f"/proc/{pid}/status").read_text()  # noqa: ASYNC240 -- procfs, never blocks
        masks = dict(line.split(":\t", 1) for line in status.splitlines() if line.startswith("Sig"))
        if (int(masks["SigIgn"], 16) | int(masks["SigCgt"], 16)) & bit:
            return
        await trio.sleep(0.005)
    raise AssertionError(f"the process never took charge of {signum.name}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
async def test_sigterm_and_sighup_at_any_moment_of_start_up(signum: signal.Signals) -> None:
    """Before the daemon owns its signals, SIGTERM is a quiet stop with status
    0 (afterwards, a graceful one), and SIGHUP -- a reload request -- never
    stops the service: it goes on to listen and serve. The delays start once
    the process has a handler for the signal (before that the interpreter is
    still starting, and no program has a say) and sweep the rest of start-up."""
    for delay in (0.0, 0.1, 0.2, 0.3, 0.45, 0.7, 1.0):
        daemon_args = ["serve", "--port", "0", "--log-format", "json"]
        process = await trio.lowlevel.open_process(
            [*ECHOSVC, *daemon_args],
            env=child_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        with trio.fail_after(20):
            await handled_by_the_process(process.pid, signum)
        await trio.sleep(delay)
        process.send_signal(signum)
        assert process.stderr is not None
        stderr = b""
        with trio.fail_after(20):
            if signum == signal.SIGHUP:  # it must live on, and serve
                while b'"event": "listening"' not in stderr:
                    chunk = await process.stderr.receive_some()
                    assert chunk, f"died after a SIGHUP at {delay} s: {stderr!r}"
                    stderr += chunk
                port = int(re.findall(rb'"addresses": \["127.0.0.1:(\d+)"', stderr)[0])
                async with await connect(port) as client:
                    await round_trip(client, b"still here\n")
                process.send_signal(signal.SIGTERM)
            while chunk := await process.stderr.receive_some():
                stderr += chunk
            status = await process.wait()
        text = stderr.decode()
        assert status == 0, (delay, status, text)
        assert "Traceback" not in text, (delay, text)


def test_a_port_in_use_is_one_line_and_status_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("serve", "--port", str(port))
    assert done.returncode == 1
    assert done.stderr == f"echosvc: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_an_unknown_host_is_one_line_and_status_1() -> None:
    done = run_cli("serve", "--host", "no-such-host.invalid", "--port", "0")
    assert done.returncode == 1
    assert done.stderr.startswith("echosvc: cannot resolve host 'no-such-host.invalid'")
    assert done.stderr.count("\n") == 1


async def test_the_soft_open_files_limit_is_raised_to_the_hard_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def lower_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0", preexec_fn=lower_soft_limit)
            limits = await trio.Path(f"/proc/{daemon.process.pid}/limits").read_text()
            [line] = [line for line in limits.splitlines() if line.startswith("Max open files")]
            assert line.split()[3:5] == [str(hard), str(hard)]
            assert await daemon.stop() == 0


async def test_check_reports_a_round_trip_or_why_not() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0")
            port = str(daemon.port)
            ok = await trio.to_thread.run_sync(run_cli, "check", "--port", port)
            assert ok.returncode == 0
            assert ok.stdout.startswith(f"ok 127.0.0.1:{port} round trip ")
            by_env = await trio.to_thread.run_sync(
                lambda: run_cli("check", env={"ECHOSVC_PORT": port, "ECHOSVC_HOST": "127.0.0.1"})
            )
            assert by_env.returncode == 0
            await daemon.wait_for("connection_closed", 2)
            assert await daemon.stop() == 0
    refused = run_cli("check", "--port", port)
    assert refused.returncode == 1
    assert refused.stderr == f"echosvc check: 127.0.0.1:{port}: connection refused\n"


async def test_check_fails_against_something_that_does_not_echo() -> None:
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        port = mute.getsockname()[1]
        done = await trio.to_thread.run_sync(
            run_cli, "check", "--port", str(port), "--timeout", "0.5"
        )
    assert done.returncode == 1
    assert "no echo within 0.5 s" in done.stderr


def test_console_logs_on_a_tty_by_default() -> None:
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [*ECHOSVC, "serve", "--port", "0"],
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=terminal,
        )
        os.close(terminal)
        output = b""
        while b"listening" not in output:
            readable, _, _ = select.select([controller], [], [], TIME_LIMIT)
            assert readable, "no log line on the terminal"
            chunk = os.read(controller, 4096)
            assert chunk, "the daemon closed its terminal"
            output += chunk
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=TIME_LIMIT) == 0
    finally:
        os.close(controller)
    first = output.decode(errors="replace").splitlines()[0]
    assert not first.lstrip().startswith("{")
    assert "listening" in first
    assert "activation" in first


def test_json_lines_carry_a_journald_priority_when_stderr_is_the_journal() -> None:
    read_end, write_end = os.pipe()
    stat = os.fstat(write_end)
    env = child_env({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"})
    process = subprocess.Popen(
        [*ECHOSVC, "serve", "--port", "0", "--log-format", "json"],
        env=env,
        stdin=subprocess.DEVNULL,
        stderr=write_end,
    )
    os.close(write_end)
    with os.fdopen(read_end, "rb") as logs:
        first = logs.readline()
        process.send_signal(signal.SIGTERM)
        rest = logs.read()
    assert process.wait(timeout=TIME_LIMIT) == 0
    assert first.startswith(b'<6>{"timestamp"')
    assert rest.startswith(b'<6>{"timestamp"')
