"""Fairness: request/response latency beside a connection that never stops sending.

    .venv/bin/python bench/fairness.py [--servers echosvc,go,asyncio-streams] [--rounds 3]

For each server (the templates of `harness.py`, pinned to CPU 0): 49
connections doing request/response with 64-byte lines (the load generator on
CPU 1) for ``--duration`` seconds, once alone and once beside a flood: one more
connection, from a second load generator process, that keeps 4 lines of 16 KiB
in flight (64 KiB bursts, never a pause). The figure is the p99 of the 49
connections' round trips with the flood divided by the p99 without it, each
the median over ``--rounds`` rounds, alone and flooded runs interleaved.
Issue 13's target for echosvc: at most 2x.

A server whose echo loop did not yield while its flooded socket stays
readable would serve the 49 only between the flood's bursts; one that is
fair pays for the flood's bytes (the 49's latency rises because the one core
also echoes the flood), but hands out its time per receive, not per socket.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # after the path: the harness's servers, build and helpers

FLOOD_SIZE = 16384
FLOOD_DEPTH = 4
RR_CONNS = 49


def loadgen(port: int, pid: int, conns: int, size: int, depth: int, duration: float) -> list[str]:
    argv = [str(harness.BUILD / "loadgen"), "-addr", f"{harness.HOST}:{port}", "-json"]
    argv += ["-conns", str(conns), "-size", str(size), "-depth", str(depth)]
    argv += ["-duration", str(duration), "-warmup", "1", "-server-pid", str(pid)]
    return harness.pinned(1, argv)


def one_run(name: str, flooded: bool, duration: float) -> dict[str, Any]:
    port = harness.free_port()
    argv = harness.pinned(0, harness.expand(harness.SERVERS[name], port))
    server = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    flood = None
    try:
        if not harness.wait_listening(server, port, 20):
            raise RuntimeError(f"{name} did not start")
        if flooded:
            # Longer than the measured run, so it floods the whole window.
            flood = subprocess.Popen(
                loadgen(port, server.pid, 1, FLOOD_SIZE, FLOOD_DEPTH, duration + 4),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
        out = subprocess.run(
            loadgen(port, server.pid, RR_CONNS, 64, 1, duration),
            capture_output=True,
            text=True,
            timeout=duration + 60,
            check=True,
        )
        report: dict[str, Any] = json.loads(out.stdout)
        flood_report = None
        if flood is not None:
            flood_out, _ = flood.communicate(timeout=duration + 60)
            flood_report = json.loads(flood_out)
        return {
            "server": name,
            "flooded": flooded,
            "rr_p99_us": report["latency_us"]["p99"],
            "rr_p50_us": report["latency_us"]["p50"],
            "rr_req_s": report["req_per_s"],
            "flood_mb_s": flood_report["mb_per_s"] if flood_report else None,
        }
    finally:
        if flood is not None and flood.poll() is None:
            flood.kill()
            flood.wait()
        harness.stop_server(server, 10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="echosvc,go,asyncio-streams")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8)
    parser.add_argument("--out", default="bench/results/fairness")
    args = parser.parse_args()
    harness.build([])
    names = [n.strip() for n in args.servers.split(",")]
    runs = [
        one_run(name, flooded, args.duration)
        for _ in range(args.rounds)
        for name in names
        for flooded in (False, True)
    ]
    lines = [
        f"# Fairness ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {harness.git_meta()})",
        "",
        f"`.venv/bin/python bench/fairness.py {' '.join(sys.argv[1:])}`: {RR_CONNS} connections"
        f" request/response (64 B), alone and beside one connection keeping {FLOOD_DEPTH}"
        f" lines of {FLOOD_SIZE} B in flight; medians of {args.rounds} rounds",
        "",
        "| server | rr p50 alone µs | rr p99 alone µs | rr p50 flooded µs | rr p99 flooded µs"
        " | p99 flooded ÷ alone | rr req/s flooded | flood MB/s |",
        "| --- | --: | --: | --: | --: | --: | --: | --: |",
    ]
    summary = {}
    for name in names:

        def med(key: str, flooded: bool, name: str = name) -> float:
            return float(
                statistics.median(
                    r[key] for r in runs if r["server"] == name and r["flooded"] is flooded
                )
            )

        ratio = med("rr_p99_us", True) / med("rr_p99_us", False)
        summary[name] = round(ratio, 2)
        lines.append(
            f"| {name} | {med('rr_p50_us', False):,.0f} | {med('rr_p99_us', False):,.0f}"
            f" | {med('rr_p50_us', True):,.0f} | {med('rr_p99_us', True):,.0f} | **{ratio:.2f}**"
            f" | {med('rr_req_s', True):,.0f} | {med('flood_mb_s', True):,.1f} |"
        )
    out = harness.REPO / args.out
    out.with_suffix(".json").write_text(json.dumps({"runs": runs, "p99_ratio": summary}, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
