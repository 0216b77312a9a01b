"""``echosvc bench``: spread the load model over processes and report it.

One Python process drives a limited number of requests per second, so the
load is spread over ``--processes`` child processes (``echosvc bench
--child``), each running `echosvc.client.generate_load` on its share of the
connections. They talk to the parent in JSON lines on stdout: ``ready``
once connected, ``progress`` four times a second, ``result`` at the end.
The parent starts them all at once (a line on each child's stdin), shows a
live progress line on a terminal, and merges the results: requests, rates
and latency percentiles from the merged histograms. Any mismatch or error
makes the run fail (exit status 1): a benchmark of wrong answers measures
nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .client import LoadReport, LoadShape, ProxyClaim, TLSClient, generate_load, percentile_us

__all__ = ["BenchResult", "run_bench", "run_child"]


@attrs.frozen
class BenchResult:
    """A whole run, all processes merged."""

    shape: LoadShape
    processes: int
    connected: int
    requests: int
    mismatches: int
    errors: int
    error_samples: list[str]
    histogram: dict[int, int]

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.errors and self.connected > 0

    def as_dict(self) -> dict[str, Any]:
        seconds = self.shape.duration
        return {
            "connections": self.shape.connections,
            "connected": self.connected,
            "size": self.shape.size,
            "depth": self.shape.depth,
            "duration_s": seconds,
            "warmup_s": self.shape.warmup,
            "processes": self.processes,
            "requests": self.requests,
            "requests_per_s": round(self.requests / seconds, 1),
            "mb_per_s": round(self.requests * self.shape.size / seconds / 1e6, 3),
            "latency_us": {
                name: round(percentile_us(self.histogram, fraction), 1)
                for name, fraction in (
                    ("p50", 0.50),
                    ("p90", 0.90),
                    ("p99", 0.99),
                    ("p999", 0.999),
                    ("max", 1.0),
                )
            },
            "mismatches": self.mismatches,
            "errors": self.errors,
            "error_samples": self.error_samples,
            "ok": self.ok,
        }


async def run_bench(
    host: str,
    port: int,
    shape: LoadShape,
    processes: int,
    on_progress: Callable[[float, int], None] | None = None,
    proxy: ProxyClaim | None = None,
    tls: TLSClient | None = None,
) -> BenchResult:
    """Run ``shape`` from ``processes`` child processes; merge what they report.

    ``on_progress(seconds_since_start, requests_completed)`` is called as
    reports arrive. With ``proxy``, every connection starts with its header.
    """
    shares = [
        shape.connections // processes + (i < shape.connections % processes)
        for i in range(processes)
    ]
    children = _plan(host, port, shape, shares)
    if proxy is not None:
        children = [[*argv, *proxy.argv()] for argv in children]
    if tls is not None:
        children = [[*argv, *tls.argv()] for argv in children]
    completed = [0] * len(children)
    reports: list[LoadReport | None] = [None] * len(children)
    ready = [trio.Event() for _ in children]
    started_at = [0.0]

    async def watch(index: int, argv: list[str]) -> None:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            assert process.stdout is not None
            buffer = b""
            while chunk := await process.stdout.receive_some():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    message = json.loads(line)
                    if message["type"] == "ready":
                        ready[index].set()
                        await _all_ready_then_go(ready, process, index, started_at)
                    elif message["type"] == "progress":
                        completed[index] = message["completed"]
                        if on_progress is not None and started_at[0]:
                            on_progress(trio.current_time() - started_at[0], sum(completed))
                    elif message["type"] == "result":
                        reports[index] = LoadReport(**message["report"])
            await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
                    await process.wait()

    async with trio.open_nursery() as nursery:
        for index, argv in enumerate(children):
            nursery.start_soon(watch, index, argv)

    merged = LoadReport()
    for report in reports:
        if report is None:
            merged.add_error("a load process exited without a result")
            continue
        merged.connected += report.connected
        merged.requests += report.requests
        merged.mismatches += report.mismatches
        merged.errors += report.errors
        merged.error_samples += report.error_samples[: 5 - len(merged.error_samples)]
        for bucket, count in report.histogram.items():
            merged.histogram[int(bucket)] = merged.histogram.get(int(bucket), 0) + count
    return BenchResult(
        shape=shape,
        processes=processes,
        connected=merged.connected,
        requests=merged.requests,
        mismatches=merged.mismatches,
        errors=merged.errors,
        error_samples=merged.error_samples,
        histogram=merged.histogram,
    )


def _plan(host: str, port: int, shape: LoadShape, shares: list[int]) -> list[list[str]]:
    argvs = []
    offset = 0
    for share in shares:
        if not share:
            continue
        argvs.append(
            [
                sys.executable,
                "-m",
                "echosvc",
                "bench",
                "--child",
                f"--offset={offset}",
                f"--host={host}",
                f"--port={port}",
                f"--connections={share}",
                f"--size={shape.size}",
                f"--depth={shape.depth}",
                f"--warmup={shape.warmup}",
                f"--duration={shape.duration}",
            ]
        )
        offset += share
    return argvs


async def _all_ready_then_go(
    ready: list[trio.Event], process: trio.Process, index: int, started_at: list[float]
) -> None:
    for event in ready:
        await event.wait()
    if not started_at[0]:
        started_at[0] = trio.current_time()
    assert process.stdin is not None
    await process.stdin.send_all(b"go\n")


def run_child(
    host: str,
    port: int,
    shape: LoadShape,
    offset: int,
    proxy: ProxyClaim | None = None,
    tls: TLSClient | None = None,
) -> None:
    """The child's side: connect, report ready, wait for go, load, report."""

    def say(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    async def main() -> None:
        stdin = trio.lowlevel.FdStream(sys.stdin.fileno())

        async def wait_for_go() -> None:
            say({"type": "ready"})
            await stdin.receive_some()

        report = await generate_load(
            host,
            port,
            shape,
            offset=offset,
            wait_for_go=wait_for_go,
            on_progress=lambda n: say({"type": "progress", "completed": n}),
            proxy=proxy,
            tls=tls,
        )
        say({"type": "result", "report": attrs.asdict(report)})

    trio.run(main)
