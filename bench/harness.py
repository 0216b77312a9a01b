"""Benchmark harness: echosvc against its peer servers, under a verifying Go load generator.

Theory of operation: every run starts one server fresh on a free loopback port, pinned to
one CPU (``taskset -c``), waits until the port accepts, runs ``bench/loadgen`` pinned to
the other CPU, then stops the server with SIGTERM (SIGKILL after a timeout). The load
generator verifies every echo byte-exact and in order, and samples the server's CPU time
(``/proc/PID/stat``), its RSS (``/proc/PID/status``) and the per-core ``/proc/stat``
counters itself, at the exact edges of its measured window. Rounds interleave the
servers (round 1 runs every server once per scenario, round 2 again, in a rotated order)
and the report gives medians over rounds.

Run from the repository root::

    .venv/bin/python bench/harness.py                 # full run, 3 rounds
    .venv/bin/python bench/harness.py --quick         # smoke test, about a minute a server

See bench/README.md for the method and the scenarios.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PEERS = BENCH / "peers"
BUILD = BENCH / ".build"
LOGS = BUILD / "logs"
HOST = "127.0.0.1"
TLS_CERT = BUILD / "tls.pem"  # made by build(): key and self-signed certificate
DISTURBED_PCT = 10.0  # a run where other processes took more of a pinned core is redone

# name -> command line template. Placeholders: {python} (this interpreter), {host},
# {port}, {repo}, {bench}, {peers}, {build}. Commands run with the repository root as
# working directory and without a shell; the process started must be the server itself
# (``env`` and ``taskset`` exec, so ``env -C DIR ...`` is fine): its pid is the one measured.
SERVERS: dict[str, str] = {
    "go": "{build}/echo-go -host {host} -port {port}",
    # The floor: C, one thread, edge-triggered epoll (bench/peers/c/echo_epoll.c).
    "c-floor": "{build}/echo-epoll -host {host} -port {port}",
    "asyncio-protocol": (
        "{python} {peers}/asyncio_protocol.py --host {host} --port {port} --loop uvloop"
    ),
    "asyncio-streams": (
        "{python} {peers}/asyncio_streams.py --host {host} --port {port} --loop uvloop"
    ),
    "asyncio-protocol-std": (
        "{python} {peers}/asyncio_protocol.py --host {host} --port {port} --loop asyncio"
    ),
    "asyncio-streams-std": (
        "{python} {peers}/asyncio_streams.py --host {host} --port {port} --loop asyncio"
    ),
    "trio-naive-line": "{python} {peers}/trio_naive_line.py --host {host} --port {port}",
    "trio-naive-stream": "{python} {peers}/trio_naive_stream.py --host {host} --port {port}",
    # --max-connections above the fd limit: `max` measures what one process
    # can hold, not the default cap of 10000.
    "echosvc": (
        "{python} -m echosvc serve --host {host} --port {port}"
        " --log-format json --log-level warning --max-connections 20000"
    ),
    # Over TLS 1.3, with a throw-away self-signed certificate the harness
    # makes ({tls_cert}, key included); the load generator runs with -tls.
    # Not in the default set: `--servers tls` (or the names).
    "echosvc-tls": (
        "{python} -m echosvc serve --host {host} --port {port}"
        " --log-format json --log-level warning --max-connections 20000"
        " --tls-cert {tls_cert}"
    ),
    "asyncio-streams-tls": (
        "{python} {peers}/asyncio_streams.py --host {host} --port {port} --loop uvloop"
        " --tls-cert {tls_cert}"
    ),
}
# Servers that speak TLS: the load generator connects to them with -tls.
TLS_SERVERS = {"echosvc-tls", "asyncio-streams-tls"}
DEFAULT_SERVERS = [
    "c-floor",
    "go",
    "asyncio-protocol",
    "asyncio-streams",
    "trio-naive-line",
    "trio-naive-stream",
    "echosvc",
]
SERVER_ALIASES: dict[str, list[str]] = {
    "default": DEFAULT_SERVERS,
    "peers": [name for name in SERVERS if name != "echosvc"],
    "all": list(SERVERS),
    "tls": ["echosvc", "echosvc-tls", "asyncio-streams", "asyncio-streams-tls"],
}


@dataclass(frozen=True)
class Scenario:
    name: str
    # "load" (throughput and latency), "short" (a connection per request: connect,
    # one line, close) or "idle" (connections held)
    kind: str
    title: str
    conns: int = 1
    size: int = 64
    depth: int = 1
    hold: float = 0.0
    # one write(2) per request (loadgen -split) instead of coalescing the
    # requests queued on a connection into one
    split: bool = False


def make_scenarios(quick: bool, idle_conns: int | None, max_conns: int | None) -> list[Scenario]:
    idle_n = idle_conns or (1000 if quick else 10_000)
    max_n = max_conns or (2000 if quick else 19_000)
    idle_hold, max_hold = (2.0, 1.0) if quick else (10.0, 5.0)
    return [
        Scenario("rr1", "load", "1 connection, request/response, 64 B lines", 1),
        Scenario("rr50", "load", "50 connections, request/response, 64 B lines", 50),
        Scenario("pipe50", "load", "50 connections, 16 requests in flight each, 64 B", 50, 64, 16),
        Scenario(
            "pipe50w",
            "load",
            "pipe50 with one write per request (never coalesced by the client)",
            50,
            64,
            16,
            split=True,
        ),
        Scenario("big50", "load", "50 connections, request/response, 4 KiB lines", 50, 4096),
        Scenario(
            "short50",
            "short",
            "50 clients, each: connect, one 64 B line and its echo, close; again (per connection)",
            50,
        ),
        Scenario(
            "idle10k",
            "idle",
            f"{idle_n} idle connections held {idle_hold:g} s (server RSS per connection)",
            idle_n,
            hold=idle_hold,
        ),
        Scenario(
            "max",
            "idle",
            f"{max_n} connections (open-files limit {nofile_limit()}), each verified "
            f"before and after a {max_hold:g} s hold",
            max_n,
            hold=max_hold,
        ),
    ]


@dataclass
class Settings:
    rounds: int
    duration: float
    warmup: float
    server_cpu: int | None
    loadgen_cpu: int | None
    wait_quiet: float = 60.0
    retries: int = 2  # extra attempts for a disturbed run
    start_timeout: float = 20.0
    stop_timeout: float = 15.0
    ramp_timeout: float = 120.0
    echo_timeout: float = 10.0
    clk_tck: int = field(default_factory=lambda: os.sysconf("SC_CLK_TCK"))


@dataclass
class Run:
    round: int
    scenario: str
    server: str
    command: list[str]
    status: str = "pending"  # ok | failed | start_failed | server_died | loadgen_timeout
    error: str = ""
    port: int = 0
    start_s: float = 0.0
    stop_s: float = 0.0
    server_exit: int | None = None
    loadgen_exit: int | None = None
    quiet_wait_s: float = 0.0
    busy_before: dict[int, float] = field(default_factory=dict)
    loadgen: dict[str, Any] | None = None
    log: str = ""


# ----------------------------------------------------------------------------- helpers


def nofile_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def free_port() -> int:
    # Below the ephemeral range, so thousands of client sockets never collide with it;
    # bound without SO_REUSEADDR, so a port with TIME_WAIT leftovers is skipped.
    for _ in range(200):
        port = random.randrange(20_000, 32_000)
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


def core_busy(cpus: Sequence[int], interval: float) -> dict[int, float]:
    """Busy % of each CPU over ``interval`` seconds, from /proc/stat."""

    def sample() -> dict[int, tuple[int, int]]:
        out = {}
        for line in Path("/proc/stat").read_text().splitlines():
            f = line.split()
            if f[0].startswith("cpu") and f[0] != "cpu" and int(f[0][3:]) in cpus:
                ticks = [int(x) for x in f[1:9]]
                out[int(f[0][3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
        return out

    a = sample()
    time.sleep(interval)
    b = sample()
    return {c: 100 * (b[c][0] - a[c][0]) / max(1, b[c][1] - a[c][1]) for c in a if c in b}


def wait_quiet(cpus: Sequence[int], limit: float) -> tuple[float, dict[int, float]]:
    """Wait up to ``limit`` s until every CPU in ``cpus`` is under 10 % busy for 1 s (the
    machine may be shared); returns (seconds waited, last busy % per CPU)."""
    t0 = time.monotonic()
    while True:
        busy = core_busy(cpus, 1.0)
        waited = time.monotonic() - t0
        if all(v < 10 for v in busy.values()) or waited >= limit:
            return round(waited, 1), {c: round(v, 1) for c, v in busy.items()}


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def stop_server(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int | None, float]:
    """SIGTERM, then SIGKILL after ``timeout`` s; returns (exit status, seconds to exit)."""
    t0 = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode, round(time.monotonic() - t0, 3)


def tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def run_text(argv: Sequence[str], timeout: float = 30, cwd: Path = REPO) -> str | None:
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def expand(template: str, port: int) -> list[str]:
    values = {
        "python": sys.executable,
        "host": HOST,
        "port": str(port),
        "repo": str(REPO),
        "bench": str(BENCH),
        "peers": str(PEERS),
        "build": str(BUILD),
        "tls_cert": str(TLS_CERT),
    }
    return [token.format(**values) for token in shlex.split(template)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- build


# The floor must build warning-free: it is the one peer whose correctness
# nothing else (no runtime, no library) vouches for.
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror"]


def build(notes: list[str]) -> tuple[Path, set[str]]:
    """Build the load generator, the Go peer and the C floor; returns (loadgen path,
    names of the servers that could not be built)."""
    loadgen, echo_go, echo_c = BUILD / "loadgen", BUILD / "echo-go", BUILD / "echo-epoll"
    BUILD.mkdir(parents=True, exist_ok=True)
    missing: set[str] = set()
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        notes.append("no C compiler (`gcc`, `cc`) found: the C floor is skipped")
        missing.add("c-floor")
    else:
        log(f"building {echo_c.relative_to(REPO)}")
        subprocess.run(
            [cc, *CFLAGS, "-o", str(echo_c), str(PEERS / "c" / "echo_epoll.c")],
            check=True,
            timeout=120,
        )
    if not TLS_CERT.exists() and shutil.which("openssl"):
        log(f"making {TLS_CERT.relative_to(REPO)} (self-signed, for the -tls servers)")
        key = BUILD / "tls.key"
        argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
        argv += ["-nodes", "-days", "30", "-subj", "/CN=127.0.0.1", "-keyout", str(key)]
        subprocess.run(
            [*argv, "-out", str(BUILD / "tls.crt")],
            check=True,
            timeout=60,
            capture_output=True,
        )
        TLS_CERT.write_bytes(key.read_bytes() + (BUILD / "tls.crt").read_bytes())
    go = shutil.which("go")
    if go is None:
        notes.append("`go` not found: the Go peer is skipped")
        if not loadgen.exists():
            sys.exit("harness: `go` is needed to build bench/loadgen (none prebuilt)")
        notes.append(f"using the prebuilt {loadgen.relative_to(REPO)}")
        return loadgen, missing | {"go"}
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOPROXY": "off", "CGO_ENABLED": "0"}
    env.setdefault("GOCACHE", str(BUILD / "gocache"))
    for src, out in ((BENCH / "loadgen", loadgen), (PEERS / "go", echo_go)):
        log(f"building {out.relative_to(REPO)}")
        subprocess.run(
            [go, "build", "-trimpath", "-o", str(out), "."],
            cwd=src,
            env=env,
            check=True,
            timeout=300,
        )
    return loadgen, missing


# -------------------------------------------------------------------------------- runs


def loadgen_argv(
    loadgen: Path, sc: Scenario, port: int, pid: int, st: Settings
) -> tuple[list[str], float]:
    argv = [str(loadgen), "-addr", f"{HOST}:{port}", "-size", str(sc.size), "-json"]
    argv += ["-server-pid", str(pid), "-clk-tck", str(st.clk_tck)]
    if sc.kind == "load":
        argv += ["-conns", str(sc.conns), "-depth", str(sc.depth)]
        argv += ["-duration", str(st.duration), "-warmup", str(st.warmup)]
        if sc.split:
            argv.append("-split")
        return argv, st.warmup + st.duration + 90
    if sc.kind == "short":
        # -sources: see "short50" in bench/README.md (TIME_WAIT, ephemeral ports).
        argv += ["-short", "-conns", str(sc.conns), "-echo-timeout", str(st.echo_timeout)]
        argv += ["-duration", str(st.duration), "-warmup", str(st.warmup)]
        return argv, st.warmup + st.duration + st.echo_timeout + 90
    argv += ["-idle", str(sc.conns), "-hold", str(sc.hold)]
    argv += ["-ramp-timeout", str(st.ramp_timeout), "-echo-timeout", str(st.echo_timeout)]
    return argv, st.ramp_timeout + sc.hold + st.echo_timeout + 90


def run_one(
    name: str, template: str, sc: Scenario, st: Settings, loadgen: Path, round_no: int
) -> Run:
    port = free_port()
    argv = expand(template, port)
    run = Run(round=round_no, scenario=sc.name, server=name, command=argv, port=port)
    cpus = [c for c in (st.server_cpu, st.loadgen_cpu) if c is not None]
    if st.wait_quiet > 0 and cpus:
        run.quiet_wait_s, run.busy_before = wait_quiet(cpus, st.wait_quiet)
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"r{round_no}-{sc.name}-{name}.log"
    run.log = str(log_path.relative_to(REPO))
    t0 = time.monotonic()
    with log_path.open("wb") as log_file:
        try:
            proc = subprocess.Popen(
                pinned(st.server_cpu, argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,  # a Ctrl-C of the harness reaches the harness only
            )
        except OSError as exc:
            run.status, run.error = "start_failed", str(exc)
            return run
        try:
            if not wait_listening(proc, port, st.start_timeout):
                run.status = "start_failed"
                state = (
                    f"exited with status {proc.returncode}"
                    if proc.poll() is not None
                    else f"not accepting on port {port} after {st.start_timeout:g} s"
                )
                run.error = state
                return run
            run.start_s = round(time.monotonic() - t0, 3)
            lg_argv, timeout = loadgen_argv(loadgen, sc, port, proc.pid, st)
            if name in TLS_SERVERS:
                lg_argv.append("-tls")
            try:
                out = subprocess.run(
                    pinned(st.loadgen_cpu, lg_argv),
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    stdin=subprocess.DEVNULL,
                )
            except subprocess.TimeoutExpired:
                run.status, run.error = (
                    "loadgen_timeout",
                    f"loadgen still running after {timeout} s",
                )
                return run
            run.loadgen_exit = out.returncode
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if lines:
                run.loadgen = json.loads(lines[-1])
            if proc.poll() is not None:
                run.status, run.error = (
                    "server_died",
                    f"server exited with status {proc.returncode}",
                )
            elif run.loadgen is None:
                run.status = "failed"
                run.error = f"loadgen exit {out.returncode}: {out.stderr.strip()[-300:]}"
            else:
                run.status, run.error = judge(sc, run.loadgen)
        finally:
            run.server_exit, run.stop_s = stop_server(proc, st.stop_timeout)
            if run.status != "ok":
                run.error = f"{run.error}; server log: {tail(log_path)}".strip("; ")
    return run


def judge(sc: Scenario, lg: dict[str, Any]) -> tuple[str, str]:
    """A run counts when every echo verified; an idle run may hold fewer than requested."""
    if lg.get("mismatches"):
        return "failed", f"{lg['mismatches']} echo mismatches: {lg.get('error_samples')}"
    if sc.kind in ("load", "short") and (lg.get("errors") or lg.get("connected") != sc.conns):
        return "failed", f"{lg.get('errors')} errors: {lg.get('error_samples')}"
    if sc.kind in ("load", "short") and not lg.get("requests"):
        return "failed", "no request completed in the window"
    return "ok", ""


# ----------------------------------------------------------------------------- summary


def median(values: Iterable[float | int | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.median(vals) if vals else None


def dig(d: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def summarize(
    runs: list[Run], scenarios: list[Scenario], servers: list[str], st: Settings
) -> dict[str, dict[str, dict[str, Any]]]:
    srv_cpu, lg_cpu = str(st.server_cpu), str(st.loadgen_cpu)
    cores = (srv_cpu, lg_cpu)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for sc in scenarios:
        rows: dict[str, dict[str, Any]] = {}
        for name in servers:
            mine = [r for r in runs if r.scenario == sc.name and r.server == name]
            if not mine:
                continue
            good = [r.loadgen for r in mine if r.status == "ok" and r.loadgen]
            if not good:  # every attempt disturbed: show them, flagged by other %
                good = [r.loadgen for r in mine if r.status == "disturbed" and r.loadgen]
            row: dict[str, Any] = {
                "rounds": len({r.round for r in mine}),
                "ok": sum(r.status == "ok" for r in mine),
                "disturbed": sum(r.status == "disturbed" for r in mine),
                "used": len(good),
            }

            def med(*keys: str, good: list[dict[str, Any]] = good) -> float | None:
                return median(dig(g, *keys) for g in good)

            if sc.kind in ("load", "short"):  # for short, a "request" is a connection
                rps = [g["req_per_s"] for g in good]
                row |= {
                    "req_per_s": median(rps),
                    "req_per_s_min": min(rps, default=None),
                    "req_per_s_max": max(rps, default=None),
                    "mb_per_s": med("mb_per_s"),
                    "server_cpu_us_per_req": med("server", "cpu_us_per_req"),
                    "server_cpu_pct": med("server", "cpu_pct"),
                    "server_core_us_per_req": med("cores", srv_cpu, "busy_us_per_req"),
                    "server_core_busy_pct": med("cores", srv_cpu, "busy_pct"),
                    "p50_us": med("latency_us", "p50"),
                    "p99_us": med("latency_us", "p99"),
                    "loadgen_cpu_pct": med("loadgen_cpu_pct"),
                    "loadgen_core_busy_pct": med("cores", lg_cpu, "busy_pct"),
                    # busy time of the two cores not charged to the server or the loadgen
                    "other_pct": median(other_pct(g, srv_cpu, lg_cpu) for g in good),
                    "steal_pct_max": max(
                        (dig(g, "cores", c, "steal_pct") or 0 for g in good for c in cores),
                        default=None,
                    ),
                    "rss_kib": med("server", "rss_kib_end"),
                }
            else:
                row |= {
                    "requested": sc.conns,
                    "established": med("established"),
                    "verified_initial": med("verified_initial"),
                    "verified_final": med("verified_final"),
                    "rss_kib_before": med("server", "rss_kib_before"),
                    "rss_kib_held": med("server", "rss_kib_held"),
                    "rss_kib_per_conn": med("server", "rss_kib_per_conn"),
                    "ramp_s": med("ramp_s"),
                }
            rows[name] = row
        out[sc.name] = rows
    return out


def other_pct(lg: dict[str, Any], srv_cpu: str, lg_cpu: str) -> float | None:
    srv_core, lg_core = dig(lg, "cores", srv_cpu, "busy_pct"), dig(lg, "cores", lg_cpu, "busy_pct")
    srv, gen = dig(lg, "server", "cpu_pct"), lg.get("loadgen_cpu_pct")
    if None in (srv_core, lg_core, srv, gen):
        return None
    return max(0.0, float(srv_core - srv), float(lg_core - gen))


def runs_cell(row: dict[str, Any]) -> str:
    cell = f"{row['ok']}/{row['rounds']}"
    return cell + (f" (+{row['disturbed']} disturbed)" if row["disturbed"] else "")


def fmt(v: float | None, digits: int = 0, scale: float = 1.0) -> str:
    if v is None:
        return "-"
    return f"{v / scale:,.{digits}f}"


def render_md(
    meta: dict[str, Any],
    scenarios: list[Scenario],
    summary: dict[str, dict[str, dict[str, Any]]],
    runs: list[Run],
    notes: list[str],
) -> str:
    st = meta["settings"]
    out = ["# echosvc benchmark results", ""]
    out += [
        f"- **date**: {meta['date']}",
        f"- **command**: `{meta['command']}`",
        f"- **machine**: {meta['machine']['cpu_model']}, {meta['machine']['cores']} cores, "
        f"{meta['machine']['mem_gib']} GiB, {meta['machine']['kernel']}",
        "- **versions**: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v is not None),
        f"- **tree**: {meta['git']}",
        f"- **method**: server pinned to CPU {st['server_cpu']}, load generator to CPU "
        f"{st['loadgen_cpu']} (`taskset -c`); {st['rounds']} round(s), servers interleaved "
        f"(order rotated each round), a fresh server process per run; medians over rounds; "
        f"{st['warmup']:g} s warmup then a {st['duration']:g} s measured window. CPU figures "
        "are sampled by the load generator at the window's edges. See bench/README.md.",
        "",
        f"Columns: **srv µs/req** = server process CPU time (utime+stime of /proc/PID/stat over"
        " the measured window) per request: the figure to compare, it holds whichever side"
        f" saturated. **core µs/req** = all busy time of CPU {st['server_cpu']} (the server's"
        " core, irq and softirq included) per request: it matches srv µs/req unless something"
        " else ran there. **srv CPU %** near 100 means server-bound. **lg CPU %** = load"
        f" generator process; **lg core %** = busy % of CPU {st['loadgen_cpu']}. **other %** ="
        " busy time on either pinned core not charged to the server or the load generator"
        " (other processes): above a few percent the run was disturbed. † marks lg core >= 90 %:"
        " the load generator may be the limit and req/s is a lower bound for that server;"
        " ‡ marks other % > 5 (median over rounds)."
        " Latency runs from a request's write to the last byte of its echo. Short-connection"
        " tables count connections (connect, one line, close) where the others count requests:"
        " latency there runs from socket(2) to the last byte of the echo. Idle tables:"
        " KiB/conn = (server RSS at the end of the hold - RSS before connecting) / connections"
        " held; verified after hold = connections that echoed again after the hold.",
        "",
    ]
    for sc in scenarios:
        rows = summary.get(sc.name, {})
        if not rows:
            continue
        out += [f"## {sc.name}: {sc.title}", ""]
        if sc.kind in ("load", "short"):
            unit = "conn" if sc.kind == "short" else "req"
            out += [
                f"| server | {unit}/s | min-max | srv µs/{unit} | core µs/{unit} | srv CPU % "
                "| p50 µs | p99 µs | lg CPU % | lg core % | other % | RSS MiB | ok runs |",
                "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
            ]
            for name, r in rows.items():
                if not r["used"]:
                    out.append(f"| {name} | failed | | | | | | | | | | | {runs_cell(r)} |")
                    continue
                dagger = " †" if (r["loadgen_core_busy_pct"] or 0) >= 90 else ""
                dagger += " ‡" if (r["other_pct"] or 0) > 5 else ""
                out.append(
                    f"| {name} | {fmt(r['req_per_s'])}{dagger} "
                    f"| {fmt(r['req_per_s_min'])}-{fmt(r['req_per_s_max'])} "
                    f"| {fmt(r['server_cpu_us_per_req'], 2)} "
                    f"| {fmt(r['server_core_us_per_req'], 2)} | {fmt(r['server_cpu_pct'])} "
                    f"| {fmt(r['p50_us'])} | {fmt(r['p99_us'])} | {fmt(r['loadgen_cpu_pct'])} "
                    f"| {fmt(r['loadgen_core_busy_pct'])} | {fmt(r['other_pct'])} "
                    f"| {fmt(r['rss_kib'], 1, 1024)} | {runs_cell(r)} |"
                )
        else:
            out += [
                "| server | requested | established | verified after hold | RSS before MiB "
                "| RSS held MiB | KiB/conn | ramp s | ok runs |",
                "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
            ]
            for name, r in rows.items():
                if not r["used"]:
                    out.append(f"| {name} | {r['requested']} | failed | | | | | | {runs_cell(r)} |")
                    continue
                out.append(
                    f"| {name} | {r['requested']} | {fmt(r['established'])} "
                    f"| {fmt(r['verified_final'])} | {fmt(r['rss_kib_before'], 1, 1024)} "
                    f"| {fmt(r['rss_kib_held'], 1, 1024)} | {fmt(r['rss_kib_per_conn'], 2)} "
                    f"| {fmt(r['ramp_s'], 2)} | {runs_cell(r)} |"
                )
        out.append("")
    notes = list(notes)
    busy = [r for r in runs if any(v >= 10 for v in r.busy_before.values())]
    if busy:
        notes.append(
            f"{len(busy)} run(s) started while a CPU was still >= 10 % busy after waiting "
            "--wait-quiet seconds (`busy_before` in the JSON)"
        )
    disturbed = [r for r in runs if r.status == "disturbed"]
    if disturbed:
        kept = [r for r in disturbed if "run again" not in r.error]
        notes.append(
            f"{len(disturbed)} run(s) were disturbed (other processes used more than "
            f"{DISTURBED_PCT:g} % of a pinned core) and left out of the medians where an "
            "undisturbed attempt exists; each was retried, up to "
            f"{meta['settings'].get('retries', 2)} times"
            + (
                ". Still disturbed after the retries: "
                + "; ".join(f"round {r.round} {r.scenario} {r.server}" for r in kept)
                # summarize() falls back on them when a row has no undisturbed run
                + ". A row with no undisturbed run shows the medians of its disturbed"
                " attempts, marked ‡ (its other % says by how much)"
                if kept
                else ""
            )
        )
    failed = [r for r in runs if r.status not in ("ok", "disturbed")]
    notes += [
        f"round {r.round}, {r.scenario}, {r.server}: **{r.status}**: {r.error[:400]}"
        for r in failed
    ]
    if notes:
        out += ["## Notes", ""]
        out += [f"- {n}" for n in notes]
        out.append("")
    return "\n".join(out) + "\n"


# -------------------------------------------------------------------------------- meta


def machine_meta() -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem_gib = round(kib / 2**20, 1)
    sysctl = {}
    for key in ("net/core/somaxconn", "net/ipv4/ip_local_port_range", "net/ipv4/tcp_autocorking"):
        with contextlib.suppress(OSError):
            sysctl[key.replace("/", ".")] = " ".join(Path("/proc/sys", key).read_text().split())
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "mem_gib": mem_gib,
        "kernel": f"{platform.system()} {platform.release()}",
        "loadavg": os.getloadavg(),
        "nofile_limit": nofile_limit(),
        "sysctl": sysctl,
    }


def versions(has_go: bool) -> dict[str, str | None]:
    out: dict[str, str | None] = {"Python": platform.python_version()}
    for dist in ("trio", "uvloop"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    go = run_text(["go", "version"]) if has_go else None
    out["Go"] = go.split()[2].removeprefix("go") if go else None
    out["gcc"] = run_text(["gcc", "-dumpfullversion"]) if shutil.which("gcc") else None
    echosvc = run_text([sys.executable, "-m", "echosvc", "--version"], timeout=20)
    out["echosvc"] = echosvc.split()[-1] if echosvc else None
    return out


def git_meta() -> str:
    rev = run_text(["git", "rev-parse", "--short", "HEAD"]) or "no commit"
    dirty = run_text(["git", "status", "--porcelain"])
    return f"{rev}{' + uncommitted changes' if dirty else ''}"


# -------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, help="rounds (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 s windows, 1 round")
    p.add_argument(
        "--servers",
        help="comma-separated server names or aliases (default, peers, all); "
        f"default: {','.join(DEFAULT_SERVERS)}",
    )
    p.add_argument(
        "--scenarios",
        help="comma-separated: rr1,rr50,pipe50,pipe50w,big50,short50,idle10k,max; rrN for any N",
    )
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=CMD",
        help="add a server (a command template like the table's) to the table and to this run",
    )
    p.add_argument("--duration", type=float, help="measured window, s (default 10; 2 quick)")
    p.add_argument("--warmup", type=float, help="warmup, s (default 2; 0.5 quick)")
    p.add_argument("--idle-conns", type=int, help="connections for idle10k")
    p.add_argument("--max-conns", type=int, help="connections for max (default 19000)")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        metavar="S",
        help="before each run wait up to S s for both CPUs to be under 10%% busy (0: don't)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        metavar="N",
        help="run a disturbed run again up to N times (default 2; 0 on a machine that stays busy)",
    )
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--loadgen-cpu", type=int, default=1)
    p.add_argument(
        "--out",
        type=Path,
        default=BENCH / "results" / "latest",
        help="output prefix: writes PREFIX.json and PREFIX.md (default bench/results/latest)",
    )
    p.add_argument("--list", action="store_true", help="print servers and scenarios, then exit")
    p.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="run nothing: render FILE (a results JSON) again as FILE with .md",
    )
    return p.parse_args(argv)


def select_servers(spec: str | None, extras: dict[str, str]) -> list[str]:
    names: list[str] = []
    for item in spec.split(",") if spec else ["default"]:
        item = item.strip()
        for name in SERVER_ALIASES.get(item, [item]):
            if name not in SERVERS:
                sys.exit(f"harness: unknown server {name!r} (known: {', '.join(SERVERS)})")
            if name not in names:
                names.append(name)
    return names + [n for n in extras if n not in names]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        rerender(args.from_json)
        return 0
    extras: dict[str, str] = {}
    for item in args.extra:
        name, sep, cmd = item.partition("=")
        if not sep or not name or not cmd or "{port}" not in cmd:
            sys.exit(f"harness: --extra wants NAME=CMD with {{port}} in CMD, got {item!r}")
        extras[name.strip()] = cmd.strip()
    SERVERS.update(extras)
    scenarios = make_scenarios(args.quick, args.idle_conns, args.max_conns)
    if args.list:
        for name, tmpl in SERVERS.items():
            print(f"{name:22} {tmpl}")
        for sc in scenarios:
            print(f"{sc.name:22} {sc.title}")
        return 0
    if args.scenarios:
        wanted = [s.strip() for s in args.scenarios.split(",")]
        known = {sc.name for sc in scenarios}
        for name in wanted:  # rrN: request/response over N connections, any N
            if name not in known and (found := re.fullmatch(r"rr([1-9][0-9]*)", name)):
                n = int(found[1])
                title = f"{n} connections, request/response, 64 B lines"
                scenarios.append(Scenario(name, "load", title, n))
        unknown = set(wanted) - {sc.name for sc in scenarios}
        if unknown:
            sys.exit(f"harness: unknown scenario(s) {sorted(unknown)}")
        scenarios = [sc for sc in scenarios if sc.name in wanted]
    servers = select_servers(args.servers, extras)

    notes: list[str] = []
    loadgen, unbuilt = build(notes)
    has_go = "go" not in unbuilt
    servers = [name for name in servers if name not in unbuilt]
    server_cpu: int | None = args.server_cpu
    loadgen_cpu: int | None = args.loadgen_cpu
    cpus = os.sched_getaffinity(0)
    if shutil.which("taskset") is None or not {args.server_cpu, args.loadgen_cpu} <= cpus:
        notes.append("no pinning: `taskset` missing or the CPUs requested are not available")
        server_cpu = loadgen_cpu = None
    else:
        os.sched_setaffinity(0, {args.loadgen_cpu})  # keep the harness off the server's core
    st = Settings(
        rounds=args.rounds or (1 if args.quick else 3),
        duration=args.duration or (2.0 if args.quick else 10.0),
        warmup=args.warmup if args.warmup is not None else (0.5 if args.quick else 2.0),
        server_cpu=server_cpu,
        loadgen_cpu=loadgen_cpu,
        wait_quiet=args.wait_quiet,
        retries=args.retries,
    )
    meta: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": shlex.join([os.path.relpath(sys.executable, Path.cwd()), *sys.argv]),
        "cwd": str(Path.cwd()),
        "machine": machine_meta(),
        "versions": versions(has_go),
        "git": git_meta(),
        "settings": asdict(st),
        "servers": {name: SERVERS[name] for name in servers},
        "scenarios": [asdict(sc) for sc in scenarios],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    broken: dict[str, str] = {}

    def write() -> None:
        summary = summarize(runs, scenarios, servers, st)
        all_notes = notes + [
            f"{name} was skipped after it failed to start: {why}" for name, why in broken.items()
        ]
        doc: dict[str, Any] = {"meta": meta, "notes": all_notes, "summary": summary}
        doc["runs"] = [asdict(r) for r in runs]
        args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(render_md(meta, scenarios, summary, runs, all_notes))

    for round_no in range(1, st.rounds + 1):
        shift = (round_no - 1) % len(servers)
        order = servers[shift:] + servers[:shift]
        for sc in scenarios:
            for name in order:
                if name in broken:
                    continue
                for attempt in range(st.retries + 1):
                    run = run_one(name, SERVERS[name], sc, st, loadgen, round_no)
                    other = other_pct(run.loadgen or {}, str(st.server_cpu), str(st.loadgen_cpu))
                    if run.status == "ok" and other is not None and other > DISTURBED_PCT:
                        run.status = "disturbed"
                        run.error = f"other processes used {other:.0f} % of a pinned core"
                        if attempt < st.retries:
                            run.error += "; run again"
                    runs.append(run)
                    log(f"[round {round_no}/{st.rounds}] {sc.name:8} {name:22} {progress(run)}")
                    write()
                    time.sleep(0.5)
                    if run.status != "disturbed":
                        break
                if run.status == "start_failed":
                    broken[name] = run.error
    write()
    log(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")
    return 0


def rerender(path: Path) -> None:
    doc = json.loads(path.read_text())
    meta = doc["meta"]
    scenarios = [Scenario(**sc) for sc in meta["scenarios"]]
    runs = [
        Run(**{**r, "busy_before": {int(k): v for k, v in r["busy_before"].items()}})
        for r in doc["runs"]
    ]
    st = Settings(**meta["settings"])
    summary = summarize(runs, scenarios, list(meta["servers"]), st)
    path.with_suffix(".md").write_text(render_md(meta, scenarios, summary, runs, doc["notes"]))
    log(f"wrote {path.with_suffix('.md')}")


def progress(run: Run) -> str:
    lg = run.loadgen or {}
    if run.status not in ("ok", "disturbed"):
        return f"{run.status}: {run.error[:200]}"
    if lg.get("mode") == "idle":
        return (
            f"held {lg['verified_final']}/{lg['requested']}, "
            f"{dig(lg, 'server', 'rss_kib_per_conn')} KiB/conn, "
            f"ramp {lg['ramp_s']} s"
        )
    unit = "conn" if lg.get("mode") == "short" else "req"
    return (
        f"{lg['req_per_s']:>10,.0f} {unit}/s  srv {dig(lg, 'server', 'cpu_us_per_req')} µs/{unit}  "
        f"p99 {dig(lg, 'latency_us', 'p99')} µs  loadgen {lg['loadgen_cpu_pct']}%"
        + (f"  [{run.error}]" if run.status == "disturbed" else "")
    )


if __name__ == "__main__":
    sys.exit(main())
