"""How `echosvc serve --workers N` scales on this machine, load generator included.

    .venv/bin/python bench/scaling.py [--rounds 3] [--duration 10] [--workers 1,2]

Unlike harness.py nothing is pinned: the workers and the Go load generator
share the machine's cores, as they would on a box that runs both. For each
worker count and scenario (rr50, pipe50) it starts a fresh server, runs the
load generator for the window, and reads from /proc:

* req/s (from the load generator, every echo verified);
* the CPU time of the whole server process tree (supervisor + workers) per
  request, and of the load generator;
* how busy all cores were, which says what the box ran out of.

Runs interleave worker counts round by round; medians are printed as a
Markdown table and written to bench/results/scaling.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # the build and process helpers, from this directory

SCENARIOS = {"rr50": (50, 1), "pipe50": (50, 16)}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(root: int) -> float:
    """utime+stime of ``root`` and its children (workers), in seconds."""
    pids = [root]
    # Any thread may be a parent (trio spawns from a worker thread).
    for children in Path(f"/proc/{root}/task").glob("*/children"):
        pids += [int(pid) for pid in children.read_text().split()]
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def busy_jiffies() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def run_one(loadgen: Path, workers: int, scenario: str, duration: float) -> dict[str, Any]:
    conns, depth = SCENARIOS[scenario]
    port = harness.free_port()
    argv = [sys.executable, "-m", "echosvc", "serve", "--host", harness.HOST]
    argv += ["--port", str(port), "--workers", str(workers), "--max-connections", "20000"]
    argv += ["--log-format", "json", "--log-level", "warning"]
    server = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        if not harness.wait_listening(server, port, 30):
            raise RuntimeError(f"--workers {workers} did not start")
        time.sleep(1.0 + workers)  # every worker up, not just the first
        lg = [str(loadgen), "-addr", f"{harness.HOST}:{port}", "-json", "-warmup", "0"]
        lg += ["-conns", str(conns), "-depth", str(depth), "-duration", str(duration)]
        cpu0, (busy0, all0), t0 = tree_cpu_s(server.pid), busy_jiffies(), time.monotonic()
        done = subprocess.run(lg, capture_output=True, text=True, timeout=duration + 60)
        cpu1, (busy1, all1), t1 = tree_cpu_s(server.pid), busy_jiffies(), time.monotonic()
        result = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        harness.stop_server(server, 30)
    requests = result["requests"]
    return {
        "workers": workers,
        "scenario": scenario,
        "req_per_s": result["req_per_s"],
        "mismatches": result["mismatches"],
        "server_cpu_us_per_req": (cpu1 - cpu0) / requests * 1e6,
        "server_cores": (cpu1 - cpu0) / (t1 - t0),
        "loadgen_cores": result["loadgen_cpu_s"] / (t1 - t0),
        "machine_busy_pct": 100 * (busy1 - busy0) / max(all1 - all0, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--out", type=Path, default=harness.BENCH / "results" / "scaling")
    args = parser.parse_args()
    loadgen, _ = harness.build([])
    counts = [int(n) for n in args.workers.split(",")]
    runs = []
    for round_no in range(args.rounds):
        for scenario in SCENARIOS:
            for workers in counts:
                run = run_one(loadgen, workers, scenario, args.duration)
                run["round"] = round_no + 1
                runs.append(run)
                harness.log(
                    f"round {round_no + 1} {scenario} workers={workers}: "
                    f"{run['req_per_s']:,.0f} req/s, machine {run['machine_busy_pct']:.0f}% busy"
                )
    lines = [
        "| scenario | workers | req/s | server µs/req | server cores | loadgen cores"
        " | machine busy % | mismatches |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for scenario in SCENARIOS:
        for workers in counts:
            mine = [r for r in runs if r["scenario"] == scenario and r["workers"] == workers]

            def med(key: str, rows: list[dict[str, Any]] = mine) -> float:
                return statistics.median(r[key] for r in rows)

            lines.append(
                f"| {scenario} | {workers} | {med('req_per_s'):,.0f} "
                f"| {med('server_cpu_us_per_req'):.2f} | {med('server_cores'):.2f} "
                f"| {med('loadgen_cores'):.2f} | {med('machine_busy_pct'):.0f} "
                f"| {sum(r['mismatches'] for r in mine)} |"
            )
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(runs, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(
        f"`{' '.join(sys.argv)}` — medians over {args.rounds} rounds, "
        f"{args.duration:g} s windows, nothing pinned.\n\n{table}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
