"""``--workers N --metrics``: the supervisor's endpoint answers for every worker.

Real processes: the CLI with two workers; a worker frozen with SIGSTOP is
the one that cannot answer. The protocol's pieces (the ``stats`` order and
its report) are checked here too, fed the bytes the other end sends.
"""

from __future__ import annotations

import os
import signal
import sys
from functools import partial
from pathlib import Path

import trio
import trio.testing
from prometheus_client.metrics_core import Metric

from echosvc import systemd
from echosvc.workers import Order, OrderDecoder, Report, StopControl, Verb, obey, parse_report
from echosvc.workers import stats_answer as answer_report

from .support import Daemon, captured_logs, connect, receive_until_eof, round_trip
from .test_metrics import (
    OPENMETRICS,
    families,
    metrics_port,
    needs_promtool,
    run_tool,
    scrape,
)
from .test_systemd import free_port, needs_socket_activate

TIME_LIMIT = 45


# --- the protocol's pieces -----------------------------------------------------------


def test_a_stats_order_and_its_answer_on_the_wire() -> None:
    assert Order(Verb.STATS, "7").encode() == b"stats 7\n"
    assert OrderDecoder().feed(b"stats 7\n") == [Order(Verb.STATS, "7")]
    answer = answer_report("7", '[{"name":"x"}]')
    assert parse_report(answer.encode()) == Report(stats=(7, '[{"name":"x"}]'))
    heartbeat_too = f"WATCHDOG=1\n{answer}".encode()
    assert parse_report(heartbeat_too) == Report(heartbeat=True, stats=(7, '[{"name":"x"}]'))
    assert parse_report(b"X_ECHOSVC_STATS=seven []") == Report()


async def test_a_worker_answers_stats_orders_with_their_ids() -> None:
    questions: list[str] = []
    control = StopControl(
        systemd.Notifier({}),
        active=lambda: 0,
        grace_s=10,
        stop=lambda _: None,
        force=lambda _: None,
        reload=lambda _: None,
    )
    send, receive = trio.testing.memory_stream_one_way_pair()
    with captured_logs(), trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(obey, receive, control, stats=questions.append))
            await send.send_all(b"stats 1\nstats 2\nstats x\nstats\n")
            await send.aclose()
    assert questions == ["1", "2"]  # no id, or not a number: not a question


# --- the whole service ----------------------------------------------------------------


def by_worker(family: Metric, sample: str) -> dict[str | None, float]:
    return {s.labels.get("worker"): s.value for s in family.samples if s.name == sample}


async def start_with_workers(nursery: trio.Nursery, *args: str) -> Daemon:
    daemon = await Daemon.start(nursery, "--port", "0", "--workers", "2", *args, wait_for=None)
    with trio.fail_after(20):
        await daemon.wait_for("listening", 3)  # two workers, then the supervisor
    return daemon


@needs_promtool
async def test_one_scrape_answers_for_every_worker_and_a_frozen_one_is_up_0(
    tmp_path: Path,
) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await start_with_workers(nursery, "--metrics", "127.0.0.1:0")
            port = metrics_port(daemon)
            [record] = daemon.events("metrics_listening")
            assert "worker" not in record  # the supervisor's, and only its
            clients = [await connect(daemon.port) for _ in range(40)]
            for i, client in enumerate(clients):
                await round_trip(client, b"%d\n" % i)
            for client in clients:
                await client.send_eof()
                assert await receive_until_eof(client) == b""
                await client.aclose()
            await daemon.wait_for("connection_closed", 40)

            om = families(await scrape(port, OPENMETRICS), openmetrics=True)
            assert by_worker(om["echosvc_worker_up"], "echosvc_worker_up") == {"0": 1, "1": 1}
            accepted = by_worker(
                om["echosvc_connections_accepted"], "echosvc_connections_accepted_total"
            )
            assert sum(accepted.values()) == 40
            assert set(accepted) == {"0", "1"}
            assert all(accepted.values()), "the kernel spread the connections over both"
            eof = [
                s.value
                for s in om["echosvc_connections_closed"].samples
                if s.name.endswith("_total") and s.labels["reason"] == "eof"
            ]
            assert sum(eof) == 40
            # The supervisor's own process is there too, without a worker label.
            rss = by_worker(om["process_resident_memory_bytes"], "process_resident_memory_bytes")
            assert set(rss) == {None, "0", "1"}
            lag = by_worker(om["echosvc_event_loop_lag_seconds"], "echosvc_event_loop_lag_seconds")
            assert set(lag) == {None, "0", "1"}
            text = await scrape(port)
            lint = await run_tool(["promtool", "check", "metrics"], stdin=text.encode())
            assert lint.returncode == 0, lint.stdout + lint.stderr

            # A worker that cannot answer (frozen): up 0, its series missing,
            # and the scrape on time -- its 1 s, not the scraper's 10 s.
            pids = {r["worker"]: r["pid"] for r in daemon.events("listening") if "worker" in r}
            os.kill(pids[1], signal.SIGSTOP)
            try:
                start = trio.current_time()
                om = families(await scrape(port, OPENMETRICS), openmetrics=True)
                elapsed = trio.current_time() - start
            finally:
                os.kill(pids[1], signal.SIGCONT)
            assert 1.0 <= elapsed < 3.0, elapsed
            assert by_worker(om["echosvc_worker_up"], "echosvc_worker_up") == {"0": 1, "1": 0}
            labelled = {
                s.labels.get("worker")
                for family in om.values()
                if family.name != "echosvc_worker_up"
                for s in family.samples
            }
            assert labelled == {None, "0"}
            # Thawed, it answers again (a late answer to the old question is dropped).
            om = families(await scrape(port, OPENMETRICS), openmetrics=True)
            assert by_worker(om["echosvc_worker_up"], "echosvc_worker_up") == {"0": 1, "1": 1}
            assert await daemon.stop() == 0
    assert not daemon.events("worker_exited")


@needs_socket_activate
async def test_socket_activated_workers_are_scraped_on_the_socket_named_metrics() -> None:
    echo_port, port = free_port(), free_port()
    argv = ["systemd-socket-activate", "-E", "PATH", "--fdname=echo:metrics"]
    argv += ["-l", f"127.0.0.1:{echo_port}", "-l", f"127.0.0.1:{port}"]
    argv += [sys.executable, "-m", "echosvc", "serve"]
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--workers", "2", argv=argv, wait_for=None)
            with trio.fail_after(20):
                while True:
                    try:
                        text = await scrape(port)  # the scrape wakes the service
                        break
                    except OSError:
                        await trio.sleep(0.05)
            await daemon.wait_for("listening", 3)
            [announced] = [r for r in daemon.events("listening") if "workers" in r]
            assert announced["addresses"] == [f"127.0.0.1:{echo_port}"]
            assert [r["address"] for r in daemon.events("metrics_listening")] == [
                f"127.0.0.1:{port}"
            ]
            assert "echosvc_worker_up" in text
            async with await connect(echo_port) as client:
                await round_trip(client, b"to a worker\n")
            assert await daemon.stop() == 0
