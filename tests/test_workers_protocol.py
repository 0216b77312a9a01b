"""The supervisor-worker wire protocol without processes: orders, reports, reloads.

The end-to-end behaviour is in ``test_workers.py``; here are the pieces a
lost or misread order would come from, each fed exactly the bytes or calls
the other end produces.
"""

from __future__ import annotations

import re
import signal
import subprocess

import pytest
import trio
import trio.testing

from echosvc import Config, ConfigError, systemd, workers
from echosvc.config import config_to_json
from echosvc.daemon import Reloads
from echosvc.workers import (
    Order,
    OrderDecoder,
    Report,
    StopControl,
    Verb,
    counters,
    describe_signal,
    obey,
    parse_report,
)

from .support import ECHOSVC, captured_logs, child_env, connect, round_trip
from .test_cli import run_cli


def test_orders_survive_any_split_and_unknown_verbs_are_skipped() -> None:
    sent = b"".join(
        [
            Order(Verb.RELOAD, "SIGHUP").encode(),
            b"scale 7\n",  # a verb from a newer supervisor
            Order(Verb.STOP, "SIGTERM").encode(),
            Order(Verb.FORCE).encode(),
        ]
    )
    expected = [Order(Verb.RELOAD, "SIGHUP"), Order(Verb.STOP, "SIGTERM"), Order(Verb.FORCE)]
    for cut in range(len(sent) + 1):
        decoder = OrderDecoder()
        assert decoder.feed(sent[:cut]) + decoder.feed(sent[cut:]) == expected, cut
    decoder = OrderDecoder()
    assert [order for byte in sent for order in decoder.feed(bytes([byte]))] == expected


def test_a_garbage_line_is_dropped_without_losing_the_next_order() -> None:
    decoder = OrderDecoder()
    assert decoder.feed(b"x" * 100_000) == []
    assert decoder.feed(b"\n" + Order(Verb.STOP).encode()) == [Order(Verb.STOP)]


def test_reports_are_what_the_worker_sends() -> None:
    assert parse_report(b"WATCHDOG=1") == Report(heartbeat=True)
    status = ["READY=1", "STATUS=serving 2 connections", *counters(2, 17)]
    assert parse_report("\n".join(status).encode()) == Report(ready=True, active=2, served=17)
    assert parse_report(b"\xff\nX_ECHOSVC_ACTIVE=-1\nREADY=0") == Report()


def test_every_signal_has_a_readable_name() -> None:
    assert describe_signal(signal.SIGKILL) == "SIGKILL"
    rtmin_1 = signal.SIGRTMIN + 1
    assert describe_signal(rtmin_1) == f"signal {rtmin_1}"


async def test_a_worker_carries_out_its_orders_and_stops_when_the_pipe_closes() -> None:
    calls: list[tuple[str, str | None]] = []
    control = StopControl(
        systemd.Notifier({}),
        active=lambda: 0,
        grace_s=10,
        stop=lambda name: calls.append(("stop", name)),
        force=lambda name: calls.append(("force", name)),
        reload=lambda name: calls.append(("reload", name)),
    )
    send, receive = trio.testing.memory_stream_one_way_pair()
    with captured_logs(), trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(obey, receive, control)
            await send.send_all(Order(Verb.RELOAD, "SIGHUP").encode())
            await send.send_all(Order(Verb.STOP, "SIGTERM").encode())
            await send.send_all(Order(Verb.STOP, "SIGTERM").encode())  # never escalates
            await send.send_all(Order(Verb.FORCE, "SIGINT").encode())
            await send.aclose()
    assert calls == [("reload", "SIGHUP"), ("stop", "SIGTERM"), ("force", "SIGINT")]


async def test_a_force_as_the_first_order_stops_then_forces() -> None:
    calls: list[str] = []
    control = StopControl(
        systemd.Notifier({}),
        active=lambda: 0,
        grace_s=10,
        stop=lambda _: calls.append("stop"),
        force=lambda _: calls.append("force"),
        reload=lambda _: calls.append("reload"),
    )
    send, receive = trio.testing.memory_stream_one_way_pair()
    with captured_logs(), trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(obey, receive, control)
            await send.send_all(Order(Verb.FORCE).encode())
            await send.aclose()
    assert calls == ["stop", "force"]


async def test_reloads_run_one_at_a_time_and_requests_during_one_make_one_more() -> None:
    reloads = Reloads()
    runs = 0
    release = trio.Event()

    async def hook() -> None:
        nonlocal runs
        runs += 1
        await release.wait()

    reloads.add("tls", hook)
    with captured_logs() as logs, trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reloads.run)
            reloads.request("SIGHUP")
            await trio.testing.wait_all_tasks_blocked()
            assert runs == 1
            for _ in range(3):  # while the first reload runs
                reloads.request("SIGHUP")
            release.set()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert runs == 2
    requested = logs.events("reload_requested")
    assert [(r["signal"], r["reloads"]) for r in requested] == [("SIGHUP", ["tls"])] * 4


def test_worker_timeout_is_off_or_at_least_two_heartbeats() -> None:
    assert Config(worker_timeout=0).worker_timeout == 0
    assert Config(worker_timeout=1).worker_timeout == 1
    for value in (0.5, -1):
        with pytest.raises(ConfigError, match="worker_timeout"):
            Config(worker_timeout=value)
    done = run_cli("serve", "--worker-timeout", "0.5")
    assert done.returncode == 2
    assert "'--worker-timeout' / ECHOSVC_WORKER_TIMEOUT" in done.stderr


async def test_a_worker_starts_without_the_cli_and_serves() -> None:
    """Started as a supervisor starts it (its Config in _ECHOSVC_CONFIG), a
    worker imports neither typer nor click nor rich -- memory and start-up
    time a worker has no use for -- and still serves, then stops at EOF on
    its stdin as an orphan does."""
    config = Config(port=0, log_format="json")
    env = child_env(
        {
            workers.WORKER_ENV: "0",
            workers.CONFIG_ENV: config_to_json(config),
            "PYTHONPROFILEIMPORTTIME": "1",
        }
    )
    process = await trio.lowlevel.open_process(
        [*ECHOSVC, "serve"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    assert process.stdin is not None
    stderr = b""
    with trio.fail_after(20):
        while b'"event": "listening"' not in stderr:
            chunk = await process.stderr.receive_some()
            assert chunk, stderr.decode()
            stderr += chunk
        port = int(re.findall(rb'"addresses": \["127.0.0.1:(\d+)"', stderr)[0])
        async with await connect(port) as client:
            await round_trip(client, b"a worker serves\n")
        await process.stdin.aclose()  # the supervisor is gone
        while chunk := await process.stderr.receive_some():
            stderr += chunk
        assert await process.wait() == 0
    # -X importtime lists attempts too (structlog tries rich, and is
    # refused), so look for submodules: only a package that loaded has any.
    imported = {
        line.split("|")[-1].strip()
        for line in stderr.decode().splitlines()
        if line.startswith("import time:")
    }
    assert "trio._core" in imported, "the import-time report is there"
    cli = [name for name in imported if name.startswith(("typer.", "click.", "rich."))]
    assert cli == []
    assert b'"event": "stopped"' in stderr
