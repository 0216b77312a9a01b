"""Start-up time and memory of `echosvc serve`, alone and with `--workers`.

    .venv/bin/python bench/startup.py [--rounds 5] [--workers 2] [--out bench/results/startup]

For each round it starts the service, waits for its ``listening`` event (JSON
logs on stderr; under ``--workers`` the supervisor logs it once every worker
is ready), then reads the resident set (``VmRSS`` of ``/proc/PID/status``) of
every process of the service, and stops it with SIGTERM. Start-up is the wall
time from ``exec`` to that event, so it includes the interpreter's own start.

Beside it, the floor any Trio service pays: the RSS of a bare interpreter and
of one that only imports ``trio`` (and structlog), measured the same way in
fresh processes.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def private_kib(pid: int) -> int:
    """What the process adds to the machine: its pages no other process maps
    (``Private_Clean + Private_Dirty`` of ``smaps_rollup``). RSS also counts
    the interpreter's and OpenSSL's shared pages once in every worker."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0])
    return fields["Private_Clean"] + fields["Private_Dirty"]


def children(pid: int) -> list[int]:
    """Every process whose parent is ``pid`` (workers are spawned from a
    thread, so ``/proc/PID/task/PID/children`` misses them)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines())
        except (OSError, ValueError):
            continue  # gone meanwhile
        if int(fields.get("PPid", "0")) == pid:
            found.append(int(status.parent.name))
    return found


@dataclass
class Round:
    startup_s: float
    main_rss_kib: int
    worker_rss_kib: list[int]
    worker_private_kib: list[int]


def one_round(workers: int) -> Round:
    argv = [sys.executable, "-m", "echosvc", "serve", "--port", "0", "--log-format", "json"]
    if workers:
        argv += ["--workers", str(workers)]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    assert proc.stderr is not None
    try:
        deadline = started + 30
        for raw in proc.stderr:
            if json.loads(raw).get("event") == "listening":
                break
            if time.monotonic() > deadline:
                raise RuntimeError("no listening event in 30 s")
        else:
            raise RuntimeError(f"exited with {proc.wait()} before listening")
        startup_s = time.monotonic() - started
        time.sleep(0.5)  # let the workers settle after their READY
        worker_pids = children(proc.pid) if workers else []
        return Round(
            round(startup_s, 4),
            rss_kib(proc.pid),
            [rss_kib(pid) for pid in worker_pids],
            [private_kib(pid) for pid in worker_pids],
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def floor_kib(code: str) -> int:
    # VmRSS, as for the service: ru_maxrss would carry this parent's peak
    # across the fork (getrusage(2)).
    probe = (
        f"{code}\nfor line in open('/proc/self/status'):\n"
        "    if line.startswith('VmRSS:'): print(line.split()[1])"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return int(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="bench/results/startup")
    args = parser.parse_args()
    single = [one_round(0) for _ in range(args.rounds)]
    multi = [one_round(args.workers) for _ in range(args.rounds)]
    med = statistics.median
    floor = {
        "nothing": floor_kib("pass"),
        "trio": floor_kib("import trio"),
        "trio and structlog": floor_kib("import trio, structlog"),
    }
    worker_rss = [kib for r in multi for kib in r.worker_rss_kib]
    worker_private = [kib for r in multi for kib in r.worker_private_kib]
    summary = {
        "single_startup_s": med(r.startup_s for r in single),
        "single_rss_mib": med(r.main_rss_kib for r in single) / 1024,
        "workers_startup_s": med(r.startup_s for r in multi),
        "supervisor_rss_mib": med(r.main_rss_kib for r in multi) / 1024,
        "worker_rss_mib": med(worker_rss) / 1024,
        "worker_private_mib": med(worker_private) / 1024,
    }
    result = {
        "command": " ".join(["bench/startup.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip(),
        "python": sys.version.split()[0],
        "single": [asdict(r) for r in single],
        "workers": [asdict(r) for r in multi],
        "floor_maxrss_kib": floor,
        "summary": summary,
    }
    out = REPO / args.out
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    w = f"`--workers {args.workers}`"
    # The supervisor starts like one process, then spawns the workers at once.
    extra_s = summary["workers_startup_s"] - summary["single_startup_s"]
    lines = [
        f"# Start-up and memory ({result['date']}, {result['commit']})",
        "",
        f"`.venv/bin/python {result['command']}`, medians of {args.rounds} rounds",
        "",
        "| figure | value |",
        "| --- | --: |",
        f"| `echosvc serve`: exec to `listening` | {summary['single_startup_s']:.3f} s |",
        f"| `echosvc serve`: RSS | {summary['single_rss_mib']:.1f} MiB |",
        f"| {w}: exec to `listening` | {summary['workers_startup_s']:.3f} s |",
        f"| {w}: supervisor RSS | {summary['supervisor_rss_mib']:.1f} MiB |",
        f"| {w}: RSS per worker | {summary['worker_rss_mib']:.1f} MiB |",
        f"| {w}: private memory per worker | {summary['worker_private_mib']:.1f} MiB |",
        f"| {w}: later than one process (the workers' own start-up) | {extra_s:.3f} s |",
    ]
    for what, kib in floor.items():
        lines.append(f"| floor: RSS of a Python that imports {what} | {kib / 1024:.1f} MiB |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
