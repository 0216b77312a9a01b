"""A real Prometheus scrapes a real echosvc.

The Debian ``prometheus`` binary runs on loopback with a temporary config
(a 1 s scrape interval) and storage directory; echosvc is the real CLI in a
subprocess. The test makes connections whose fate it knows -- echoed until
EOF, or cut off by the read deadline -- then asks Prometheus' HTTP API what
it scraped, so the whole chain is checked by Prometheus' own parser: the
content negotiation (Prometheus asks for OpenMetrics first), the format, the
names and the values -- for one process, and for a supervisor answering for
its workers, whose figures add up over the ``worker`` label.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from .support import Daemon, connect, receive_until_eof
from .test_metrics import eof_connection, http_request, metrics_port
from .test_metrics_workers import start_with_workers
from .test_systemd import free_port

TIME_LIMIT = 45
PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus is not installed (Debian package prometheus)"
)
READY_TIMEOUT = 20
SCRAPED_TIMEOUT = 20


class Prometheus:
    """The HTTP API of a Prometheus server on loopback."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log = log

    async def get(self, path: str, **params: str) -> Any:
        target = path + ("?" + urllib.parse.urlencode(params) if params else "")
        status, _, body = await http_request(self.port, target=target)
        assert status == 200, (status, body)
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return answer["data"]

    async def query(self, expression: str) -> dict[str, float]:
        """An instant query: each result's labels (as text) and value."""
        data = await self.get("/api/v1/query", query=expression)
        return {
            json.dumps(result["metric"], sort_keys=True): float(result["value"][1])
            for result in data["result"]
        }

    async def wait_for(self, expression: str, expected: float) -> None:
        """Until ``expression`` is one series of value ``expected``."""
        last: dict[str, float] = {}
        with trio.move_on_after(SCRAPED_TIMEOUT):
            while list(last.values()) != [expected]:
                last = await self.query(expression)
                await trio.sleep(0.25)
            return
        raise AssertionError(f"{expression} is {last}, not {expected}:\n{self.log.read_text()}")


@asynccontextmanager
async def prometheus(tmp_path: Path, targets: list[str]) -> AsyncIterator[Prometheus]:
    assert PROMETHEUS is not None
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: echosvc\n"
        "    static_configs:\n"
        f"      - targets: {json.dumps(targets)}\n"
    )
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as output:
        process = await trio.lowlevel.open_process(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )
    try:
        server = Prometheus(port, log)
        with trio.fail_after(READY_TIMEOUT):
            while True:
                assert process.returncode is None, log.read_text()
                try:
                    status, _, _ = await http_request(port, target="/-/ready")
                except OSError:
                    status = 0
                if status == 200:
                    break
                await trio.sleep(0.1)
        yield server
    finally:
        # Shielded, and bounded: a failed test must not leave a Prometheus behind.
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(10, shield=True):
            await process.wait()
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(5, shield=True):
                await process.wait()


async def timed_out_connection(port: int) -> None:
    """A client that sends nothing: the server's read deadline closes it."""
    async with await connect(port) as client:
        assert await receive_until_eof(client) == b""


@needs_prometheus
async def test_prometheus_scrapes_what_echosvc_did(tmp_path: Path) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(
                nursery, "--port", "0", "--metrics", "127.0.0.1:0", "--read-timeout", "0.5"
            )
            target = f"127.0.0.1:{metrics_port(daemon)}"
            async with prometheus(tmp_path, [target]) as server:
                async with trio.open_nursery() as clients:
                    for _ in range(3):
                        clients.start_soon(eof_connection, daemon.port)
                    for _ in range(2):
                        clients.start_soon(timed_out_connection, daemon.port)
                await daemon.wait_for("connection_closed", 5)
                await server.wait_for(f'up{{instance="{target}"}}', 1)
                await server.wait_for("echosvc_connections_accepted_total", 5)
                await server.wait_for('echosvc_connections_closed_total{reason="read_timeout"}', 2)
                await server.wait_for('echosvc_connections_closed_total{reason="eof"}', 3)
                await server.wait_for('echosvc_connections_closed_total{reason="tls_failed"}', 0)
                await server.wait_for("echosvc_connection_duration_seconds_count", 5)
                await server.wait_for("echosvc_lines_total", 3)
                await server.wait_for("echosvc_connections_active", 0)
                assert await server.query("echosvc_event_loop_lag_seconds < 1")
                assert await server.query("process_resident_memory_bytes > 0")
                # It asked for OpenMetrics and got it: only that format
                # carries units and the info type.
                metadata = await server.get("/api/v1/metadata")
                assert metadata["echosvc_connection_duration_seconds"][0]["unit"] == "seconds"
                assert metadata["echosvc_build"][0]["type"] == "info"
            assert await daemon.stop() == 0


@needs_prometheus
async def test_prometheus_scrapes_every_worker_through_the_supervisor(tmp_path: Path) -> None:
    """--workers 2: one target, the supervisor, and the sums over ``worker``
    are what the clients did, whichever worker the kernel gave each to."""
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await start_with_workers(
                nursery, "--metrics", "127.0.0.1:0", "--read-timeout", "0.5"
            )
            target = f"127.0.0.1:{metrics_port(daemon)}"
            async with prometheus(tmp_path, [target]) as server:
                async with trio.open_nursery() as clients:
                    for _ in range(6):
                        clients.start_soon(eof_connection, daemon.port)
                    for _ in range(4):
                        clients.start_soon(timed_out_connection, daemon.port)
                await daemon.wait_for("connection_closed", 10)
                await server.wait_for(f'up{{instance="{target}"}}', 1)
                await server.wait_for("count(echosvc_worker_up == 1)", 2)
                await server.wait_for("sum(echosvc_connections_accepted_total)", 10)
                await server.wait_for(
                    'sum(echosvc_connections_closed_total{reason="read_timeout"})', 4
                )
                await server.wait_for('sum(echosvc_connections_closed_total{reason="eof"})', 6)
                await server.wait_for("sum(echosvc_connection_duration_seconds_count)", 10)
                # Each worker's series apart, and the supervisor's process beside them.
                await server.wait_for("count(count by (worker) (echosvc_lines_total))", 2)
                await server.wait_for("count(process_resident_memory_bytes)", 3)
            assert await daemon.stop() == 0
