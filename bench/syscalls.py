"""System calls per request, by name: each server under ``strace -c -f -p PID``.

    .venv/bin/python bench/syscalls.py                     # rr: 20,000 round trips over 50 conns
    .venv/bin/python bench/syscalls.py --mode short        # per short connection (short50)
    .venv/bin/python bench/syscalls.py --servers echosvc,c-floor --requests 50000

For each server (names from harness.py's table) it starts the server pinned to CPU 0 as
harness.py does, attaches ``strace -c -f -p PID`` to the server and nothing else (``-f``
with ``-p`` takes every thread of the process), and waits until strace says it is
attached. Then the Go load generator (pinned to CPU 1) drives a fixed amount of
verified work: ``-requests N`` round trips over ``--conns`` connections (``--mode rr``),
or ``-short`` connections for ``--duration`` seconds (``--mode short``: connect, one
64 B line, close; the count is whatever completed). strace is stopped with SIGINT once
the load generator is done and the server had a moment to close its side; its summary
divided by the work done gives calls (and failed calls, mostly EAGAIN) per request or
per connection.

strace stops the server twice per system call, so it runs many times slower: **only
the counts mean something, not the times**. Even counts move where they depend on
timing: a slowed server finds more connections ready per ``epoll_wait``, so
``epoll_wait`` per request is lower than it would be undisturbed, and so may be the
share of reads that fail with EAGAIN. The per-request pattern of the rest (``recv``,
``send``, ``epoll_ctl``) is the code's. In rr mode the setup and teardown of the
``--conns`` connections (accept, registration, close) is included, amortized over
requests / conns round trips each.

``--tool perf`` counts with ``perf stat -e syscalls:sys_enter_NAME,... -p PID``
instead: kernel tracepoints, which cost the server next to nothing, so the counts
that depend on timing (``epoll_wait``) come out as they are undisturbed; but only for
the names in ``PERF_SYSCALLS`` (plus the total of every call), and without failed
calls. It is the cross-check of strace's counts, not a replacement.

Writes ``PREFIX.json`` and ``PREFIX.md`` (default ``bench/results/syscalls-<mode>``,
``-perf`` appended with ``--tool perf``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # the server table, the build and the process helpers

DEFAULT_SERVERS = ["c-floor", "go", "asyncio-protocol", "asyncio-streams", "echosvc"]
ATTACH_TIMEOUT_S = 10.0
PERF_ATTACH_S = 1.0  # perf stat prints nothing when attached: give it this long
# What the five servers call on these loads (from strace's tables); perf counts only these
# by name, and raw_syscalls:sys_enter for the total.
PERF_SYSCALLS = [
    "epoll_wait",
    "epoll_pwait",
    "epoll_ctl",
    "recvfrom",
    "sendto",
    "read",
    "write",
    "accept4",
    "close",
    "setsockopt",
    "getsockname",
    "getpeername",
    "ioctl",
    "getpid",
    "futex",
    "nanosleep",
    "io_uring_enter",
]
SETTLE_S = 0.5  # after the load generator exits: the server closes its side


def parse_strace_summary(text: str) -> dict[str, dict[str, int]]:
    """``strace -c`` table -> {syscall: {"calls": n, "errors": n}} (no "total" row).

    A row is ``% time, seconds, usecs/call, calls, [errors,] syscall``: the errors
    column is blank when a call never failed.
    """
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) not in (5, 6) or not fields[0][0].isdigit() or fields[-1] == "total":
            continue
        try:
            calls = int(fields[3])
            errors = int(fields[4]) if len(fields) == 6 else 0
        except ValueError:
            continue
        out[fields[-1]] = {"calls": calls, "errors": errors}
    return out


def parse_perf_csv(text: str) -> dict[str, dict[str, int]]:
    """``perf stat -x,`` output -> {syscall: {"calls": n, "errors": 0}}; the total of all
    calls (``raw_syscalls:sys_enter``) as ``(all)``."""
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) < 3 or not fields[0].strip().isdigit():
            continue  # comments, "<not counted>"
        event = fields[2].strip()
        name = "(all)" if event == "raw_syscalls:sys_enter" else event.split("sys_enter_")[-1]
        out[name] = {"calls": int(fields[0]), "errors": 0}
    return out


def tracer_argv(tool: str, pid: int, out: Path) -> list[str]:
    if tool == "strace":
        return ["strace", "-c", "-f", "-o", str(out), "-p", str(pid)]
    events = ["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{n}" for n in PERF_SYSCALLS]
    return ["perf", "stat", "-x", ",", "-o", str(out), "-e", ",".join(events), "-p", str(pid)]


def wait_attached(log_path: Path, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "attached" in log_path.read_text(errors="replace"):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def run_one(name: str, args: argparse.Namespace, loadgen: Path) -> dict[str, Any]:
    port = harness.free_port()
    argv = harness.expand(harness.SERVERS[name], port)
    harness.LOGS.mkdir(parents=True, exist_ok=True)
    server_log = harness.LOGS / f"syscalls-{args.mode}-{name}.log"
    strace_out = harness.LOGS / f"syscalls-{args.mode}-{name}.{args.tool}"
    strace_log = harness.LOGS / f"syscalls-{args.mode}-{name}.{args.tool}-stderr"
    result: dict[str, Any] = {"server": name, "command": argv, "status": "failed"}
    with server_log.open("wb") as log_file:
        server = subprocess.Popen(
            harness.pinned(args.server_cpu, argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=harness.REPO,
            start_new_session=True,
        )
        strace: subprocess.Popen[bytes] | None = None
        try:
            if not harness.wait_listening(server, port, 20):
                result["error"] = f"server did not start: {harness.tail(server_log)}"
                return result
            with strace_log.open("wb") as err_file:
                strace = subprocess.Popen(
                    tracer_argv(args.tool, server.pid, strace_out),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err_file,
                )
            if args.tool == "perf":
                time.sleep(PERF_ATTACH_S)
                attached = strace.poll() is None
            else:
                attached = wait_attached(strace_log, strace, ATTACH_TIMEOUT_S)
            if not attached:
                result["error"] = f"{args.tool} did not attach: {harness.tail(strace_log)}"
                return result
            lg = [str(loadgen), "-addr", f"{harness.HOST}:{port}", "-json"]
            lg += ["-conns", str(args.conns), "-size", str(args.size)]
            if args.mode == "rr":
                lg += ["-depth", str(args.depth), "-requests", str(args.requests)]
                lg += ["-duration", str(args.time_limit)]
            else:
                lg += ["-short", "-warmup", "0", "-duration", str(args.duration)]
            done = subprocess.run(
                harness.pinned(args.loadgen_cpu, lg),
                capture_output=True,
                text=True,
                timeout=args.time_limit + args.duration + 60,
                stdin=subprocess.DEVNULL,
            )
            time.sleep(SETTLE_S)
            strace.send_signal(signal.SIGINT)  # detach and write the summary
            strace.wait(30)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            report = json.loads(lines[-1]) if lines else {}
            # What the server did: every request (rr) or connection (short) verified.
            work = report.get("verified", 0)
            result |= {
                "loadgen_exit": done.returncode,
                "work": work,
                "mismatches": report.get("mismatches"),
                "errors": report.get("errors"),
                "error_samples": report.get("error_samples"),
                "syscalls": (parse_strace_summary if args.tool == "strace" else parse_perf_csv)(
                    strace_out.read_text()
                ),
            }
            if done.returncode != 0 or not work:
                result["error"] = f"loadgen exit {done.returncode}: {done.stderr.strip()[-300:]}"
            else:
                result["status"] = "ok"
        finally:
            if strace is not None and strace.poll() is None:
                strace.kill()
                strace.wait(10)
            result["server_exit"], _ = harness.stop_server(server, 15)
    return result


def per_unit(result: dict[str, Any]) -> dict[str, tuple[float, float]]:
    work = result["work"]
    return {name: (v["calls"] / work, v["errors"] / work) for name, v in result["syscalls"].items()}


def render_md(doc: dict[str, Any]) -> str:
    meta, results = doc["meta"], [r for r in doc["results"] if r["status"] == "ok"]
    unit = "request" if meta["mode"] == "rr" else "connection"
    rates = {r["server"]: per_unit(r) for r in results}
    names = sorted(
        {n for per in rates.values() for n in per},
        key=lambda n: (-max(per.get(n, (0.0, 0.0))[0] for per in rates.values()), n),
    )
    tool = meta.get("tool", "strace")
    how = "strace -c" if tool == "strace" else "perf stat, syscall tracepoints"
    out = [f"# System calls per {unit}, by name ({how})", ""]
    out += [
        f"- **date**: {meta['date']}",
        f"- **command**: `{meta['command']}`",
        f"- **tree**: {meta['git']}",
        f"- **tools**: {meta['strace']}, {meta['kernel']}",
        f"- **load**: {meta['load']}",
        (
            "- strace stops the server at every system call, so it runs many times slower:"
            " only counts mean something, not times; and `epoll_wait` per request (and the"
            " EAGAIN share of reads) is lower than undisturbed, since a slowed server finds"
            " more connections ready per wait."
            if tool == "strace"
            else "- perf counts kernel tracepoints and barely slows the server, so these are"
            " the undisturbed counts; only the names listed in `PERF_SYSCALLS` are counted"
            " by name (`(all)` is every call), and failed calls are not counted apart."
        ),
        "",
        f"Calls per {unit}; in parentheses the calls that failed (mostly EAGAIN). Work done: "
        + ", ".join(f"{r['server']} {r['work']:,}" for r in results)
        + ".",
        "",
        "| syscall | " + " | ".join(rates) + " |",
        "|---|" + "--:|" * len(rates),
    ]

    def cell(calls: float, errors: float) -> str:
        if not calls:
            return ""
        return f"{calls:.2f}" + (f" ({errors:.2f})" if errors >= 0.005 else "")

    for name in names:
        row = [cell(*rates[s].get(name, (0.0, 0.0))) for s in rates]
        if any(row):
            out.append(f"| `{name}` | " + " | ".join(row) + " |")
    totals = [
        (sum(c for n, (c, _) in per.items() if n != "(all)"), sum(e for _, e in per.values()))
        for per in rates.values()
    ]
    out.append("| **total** | " + " | ".join(f"**{cell(c, e)}**" for c, e in totals) + " |")
    failed = [r for r in doc["results"] if r["status"] != "ok"]
    if failed:
        out += ["", "## Failed", ""]
        out += [f"- {r['server']}: {r.get('error', '')}" for r in failed]
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--servers", default=",".join(DEFAULT_SERVERS))
    p.add_argument("--mode", choices=["rr", "short"], default="rr")
    p.add_argument("--tool", choices=["strace", "perf"], default="strace")
    p.add_argument("--requests", type=int, default=20_000, help="rr: round trips in all")
    p.add_argument("--conns", type=int, default=50, help="connections (rr) or clients (short)")
    p.add_argument("--depth", type=int, default=1, help="rr: requests in flight per connection")
    p.add_argument("--size", type=int, default=64, help="bytes per line, newline included")
    p.add_argument("--duration", type=float, default=3.0, help="short: seconds of connections")
    p.add_argument("--time-limit", type=float, default=120.0, help="rr: seconds allowed")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--loadgen-cpu", type=int, default=1)
    p.add_argument("--out", type=Path, help="output prefix (default bench/results/syscalls-MODE)")
    args = p.parse_args()
    if shutil.which(args.tool) is None:
        package = "strace" if args.tool == "strace" else "linux-perf"
        sys.exit(f"syscalls.py: {args.tool} not found (apt-get install {package})")
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in servers if s not in harness.SERVERS]
    if unknown:
        sys.exit(f"syscalls.py: unknown server(s) {unknown} (known: {', '.join(harness.SERVERS)})")
    suffix = "" if args.tool == "strace" else f"-{args.tool}"
    out = args.out or harness.BENCH / "results" / f"syscalls-{args.mode}{suffix}"
    loadgen, unbuilt = harness.build([])
    servers = [s for s in servers if s not in unbuilt]
    os.sched_setaffinity(0, {args.loadgen_cpu})  # off the server's core
    if args.mode == "rr":
        load = f"{args.requests:,} round trips of {args.size} B over {args.conns} connections"
        load += f", {args.depth} in flight each"
    else:
        load = f"{args.conns} clients: connect, one {args.size} B line, close, for "
        load += f"{args.duration:g} s"
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": shlex.join([os.path.relpath(sys.executable, Path.cwd()), *sys.argv]),
        "git": harness.git_meta(),
        "mode": args.mode,
        "tool": args.tool,
        "load": load,
        "strace": (harness.run_text([args.tool, "--version"]) or args.tool).splitlines()[0],
        "kernel": harness.machine_meta()["kernel"],
    }
    results = []
    for name in servers:
        result = run_one(name, args, loadgen)
        results.append(result)
        calls = result.get("syscalls", {})
        total = (
            calls["(all)"]["calls"] if "(all)" in calls else sum(v["calls"] for v in calls.values())
        )
        harness.log(
            f"{name:18} {result['status']:6} work {result.get('work', 0):>7,} "
            f"syscalls {total:>8,} {result.get('error', '')}"
        )
    doc = {"meta": meta, "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(render_md(doc))
    harness.log(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
