"""``echosvc bench``: the load model, and the command against real servers."""

from __future__ import annotations

import json
import subprocess

import pytest
import trio

from echosvc.client import latency_bucket, percentile_us, request_line

from .support import ECHOSVC, Daemon, child_env

TIME_LIMIT = 60


def test_requests_have_the_exact_size_and_are_all_distinct() -> None:
    lines = {request_line(connection, seq, 64) for connection in range(3) for seq in range(500)}
    assert len(lines) == 1500
    assert {len(line) for line in lines} == {64}
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)
    assert len(request_line(123456, 7890, 8)) == 8


def test_percentiles_from_the_histogram_are_within_its_two_percent_buckets() -> None:
    samples = [i / 1e6 for i in range(1, 10001)]  # 1 µs .. 10 ms, uniform
    histogram: dict[int, int] = {}
    for sample in samples:
        bucket = latency_bucket(sample)
        histogram[bucket] = histogram.get(bucket, 0) + 1
    assert percentile_us(histogram, 0.5) == pytest.approx(5000, rel=0.03)
    assert percentile_us(histogram, 0.99) == pytest.approx(9900, rel=0.03)
    assert percentile_us(histogram, 1.0) == pytest.approx(10000, rel=0.03)
    assert percentile_us({}, 0.5) == 0


async def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [*ECHOSVC, "bench", *args],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=TIME_LIMIT,
            check=False,
        )
    )


@pytest.mark.parametrize(("depth", "processes"), [(1, 2), (16, 1)])
async def test_bench_verifies_every_echo_of_a_real_server(depth: int, processes: int) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0")
            done = await run_bench(
                f"--port={daemon.port}",
                "--connections=10",
                f"--depth={depth}",
                f"--processes={processes}",
                "--duration=1",
                "--warmup=0.2",
                "--json",
            )
            assert await daemon.stop() == 0
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] is True
    assert result["connected"] == 10
    assert result["processes"] == processes
    assert result["mismatches"] == result["errors"] == 0
    assert result["requests"] > 100
    assert result["requests_per_s"] == pytest.approx(result["requests"] / 1.0, rel=0.01)
    latency = result["latency_us"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]


async def corrupting_echo(stream: trio.SocketStream) -> None:
    """An echo server with a bug: every 50th chunk comes back altered."""
    count = 0
    async for data in stream:
        count += 1
        if count % 50 == 0:
            data = data.upper()
        await stream.send_all(data)


async def test_a_wrong_echo_is_counted_and_fails_the_run() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, corrupting_echo, 0)
            port = listeners[0].socket.getsockname()[1]
            done = await run_bench(
                f"--port={port}", "--connections=4", "--duration=1", "--warmup=0", "--json"
            )
            nursery.cancel_scope.cancel()
    assert done.returncode == 1
    result = json.loads(done.stdout)
    assert result["ok"] is False
    assert result["mismatches"] >= 1
    assert any("mismatch" in sample for sample in result["error_samples"])


async def test_the_table_is_printed_without_json() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0")
            done = await run_bench(f"--port={daemon.port}", "--connections=2", "--duration=0.5")
            assert await daemon.stop() == 0
    assert done.returncode == 0
    for label in ("requests/s", "latency p50 / p90 / p99", "mismatches"):
        assert label in done.stdout


async def test_nothing_listening_is_an_error_not_a_result() -> None:
    with trio.fail_after(TIME_LIMIT):
        done = await run_bench("--port=1", "--connections=2", "--duration=0.2", "--json")
    assert done.returncode == 1
    result = json.loads(done.stdout)
    assert result["connected"] == 0
    assert "refused" in result["error_samples"][0]


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--size=4"], "'--size'"),
        (["--connections=0"], "'--connections'"),
        (["--depth=1024", "--size=2048"], "'--depth' / '--size'"),
    ],
)
def test_bad_load_shapes_are_usage_errors(args: list[str], names: str) -> None:
    done = subprocess.run(
        [*ECHOSVC, "bench", *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=TIME_LIMIT,
        check=False,
    )
    assert done.returncode == 2
    assert names in done.stderr
