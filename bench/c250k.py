"""C250K: hold N concurrent connections to one `echosvc serve --workers W`, every one verified.

    flock /tmp/bench.lock .venv/bin/python bench/c250k.py \
        --connections 250000 --workers 14 --hold 60

What it does, in order (every step bounded in count and time; all traffic on 127.0.0.0/8):

1. Records the kernel settings that matter (somaxconn, tcp_max_syn_backlog,
   ip_local_port_range, tcp_mem, nf_conntrack) and checks the plan fits the machine's
   limits: every server process under ``--max-per-process`` (19,000) connections, every
   load process under 19,000 descriptors, every source address under its 28,232
   ephemeral ports. It changes no sysctl.
2. Starts the server: ``echosvc serve --workers W --max-connections 19000 --log-level
   warning`` (or a peer, ``--server go|asyncio-streams``, as W copies sharing the port with
   SO_REUSEPORT), waits for W listening sockets, and takes the baseline: RSS and CPU time
   of every server process, /proc/net/sockstat, /proc/meminfo's Slab, /proc/slabinfo.
3. Starts L load processes (``bench/.build/loadgen -many n``: one thread, one epoll set,
   edge-triggered, a ~200-byte struct per connection), each binding its own source
   addresses 127.(20+i).0.1..S with IP_BIND_ADDRESS_NO_PORT. Every connection echoes one
   verified 64-byte line as soon as it is connected.
4. Holds them for ``--hold`` seconds; over ``--idle-window`` seconds inside the hold it
   measures the server's CPU (utime+stime of every server process, from /proc): the idle
   CPU, in cores. Connections per worker (descriptors in /proc/PID/fd) are counted before
   that window, never inside it.
5. After the hold: a **burst** (every connection sends its second line at once, the
   issue's case) and then a **paced** round (``--paced-rate`` lines per second over all
   load processes, evenly spaced), each line verified; p50/p90/p99/max of each, and the
   server CPU per echo of each round.
6. Closes everything, stops the server, and writes ``bench/results/c250k-<N>.json``
   (every figure, the per-second timeline, the per-process figures) and ``.md``.

Reported: connections held and verified (and every failure, by kind), server RSS per
connection and per process, kernel socket memory for both ends (sockstat ``TCP mem`` pages,
Slab, the TCP/sock_inode_cache/dentry slabs), connections opened per second and server CPU
per accepted connection (accept, the first echo and its registration, over the ramp),
after-hold p50/p99 burst and paced, idle CPU, the spread over workers, and a timeline.
Exit status 0 only when every connection was held and verified in every round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # the build and process helpers, from this directory

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
PORTS_PER_SOURCE = 28_232  # ip_local_port_range 32768-60999; checked at start
FDS_PER_PROCESS = 19_000  # under the hard RLIMIT_NOFILE of 20,000, with room to spare
SYSCTLS = (
    "net/core/somaxconn",
    "net/ipv4/tcp_max_syn_backlog",
    "net/ipv4/ip_local_port_range",
    "net/ipv4/tcp_mem",
    "net/ipv4/tcp_rmem",
    "net/ipv4/tcp_wmem",
    "net/ipv4/tcp_syncookies",
    "net/ipv4/tcp_max_orphans",
    "net/ipv4/tcp_migrate_req",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_count",
    "fs/file-max",
    "fs/nr_open",
)

SERVERS = {
    # --max-connections per worker: below the descriptor limit, so EMFILE never happens.
    "echosvc": (
        "{python} -m echosvc serve --host {host} --port {port} --workers {workers}"
        " --max-connections {maxconn} --log-format json --log-level warning"
    ),
    # The peers have no supervisor: W copies of the process share the port.
    "go": "{build}/echo-go -host {host} -port {port} -reuseport",
    "asyncio-streams": (
        "{python} {peers}/asyncio_streams.py --host {host} --port {port} --loop uvloop --reuse-port"
    ),
}


# ------------------------------------------------------------------------- /proc probes


def read_sysctls() -> dict[str, str]:
    out = {}
    for key in SYSCTLS:
        try:
            out[key.replace("/", ".")] = " ".join(Path("/proc/sys", key).read_text().split())
        except OSError:
            out[key.replace("/", ".")] = "(absent)"
    return out


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(utime+stime ticks, RSS KiB) of one process, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    rss = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return int(fields[11]) + int(fields[12]), rss


def sched_ns(pids: list[int]) -> dict[int, int]:
    """Nanoseconds on a CPU per process (/proc/PID/schedstat, all threads), far finer
    than the 10 ms ticks of utime+stime: what the idle figure needs."""
    out = {}
    for pid in pids:
        total = 0
        for path in Path(f"/proc/{pid}/task").glob("*/schedstat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int(path.read_text().split()[0])
        out[pid] = total
    return out


def children(pid: int) -> list[int]:
    out: list[int] = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out += [int(p) for p in path.read_text().split()]
    return out


def sockstat() -> dict[str, int]:
    """/proc/net/sockstat's TCP line: inuse, orphan, tw, alloc, mem (pages)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            f = line.split()[1:]
            return {f[i]: int(f[i + 1]) for i in range(0, len(f) - 1, 2)}
    return {}


def meminfo_kib(*keys: str) -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in keys:
            out[name] = int(rest.split()[0])
    return out


def slabinfo() -> dict[str, dict[str, int]] | None:
    """Bytes held by every slab cache (num_objs x objsize), or None if unreadable."""
    try:
        lines = Path("/proc/slabinfo").read_text().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines[2:]:
        f = line.split()
        if len(f) > 3:
            out[f[0]] = {"objs": int(f[2]), "objsize": int(f[3]), "bytes": int(f[2]) * int(f[3])}
    return out


def busy_ticks() -> tuple[int, int, int]:
    """(busy, all, softirq) clock ticks of every CPU together, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return sum(f) - f[3] - f[4], sum(f), f[6]


def listeners_on(port: int) -> int:
    """Listening TCP sockets on ``port`` (state 0A in /proc/net/tcp)."""
    hexport = f":{port:04X}"
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1].endswith(hexport) and f[3] == "0A":
            n += 1
    return n


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


# ---------------------------------------------------------------------------- the server


class ServerSet:
    """The server's processes: echosvc's supervisor and its workers, or W peer copies."""

    def __init__(self, name: str, workers: int, port: int, maxconn: int, log: Path) -> None:
        self.name, self.workers, self.port = name, workers, port
        template = SERVERS[name]
        argv = harness.expand(template.format_map(_Keep(workers=workers, maxconn=maxconn)), port)
        self.argv = argv
        copies = 1 if name == "echosvc" else workers
        self.log = log.open("wb")
        self.procs = [
            subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, cwd=harness.REPO
            )
            for _ in range(copies)
        ]

    def pids(self) -> list[int]:
        """Every server process; for echosvc the supervisor first, then its workers."""
        if self.name == "echosvc":
            root = self.procs[0].pid
            return [root, *sorted(children(root))]
        return [p.pid for p in self.procs]

    def worker_pids(self) -> list[int]:
        """The processes that serve: ``--workers 1`` is one process, no supervisor."""
        pids = self.pids()
        return (pids[1:] or pids) if self.name == "echosvc" else pids

    def wait_ready(self, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"{self.name} exited during start-up: see {self.log.name}")
            if listeners_on(self.port) >= self.workers:
                return time.monotonic() - t0
            time.sleep(0.02)
        raise RuntimeError(f"{self.name}: {self.workers} listeners not up in {timeout} s")

    def sample(self) -> dict[int, tuple[int, int]]:
        out = {}
        for pid in self.pids():
            s = proc_stat(pid)
            if s is not None:
                out[pid] = s
        return out

    def stop(self) -> list[int | None]:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        status = []
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
            status.append(p.returncode)
        self.log.close()
        return status


class _Keep(dict[str, Any]):
    """format_map that leaves {python}, {host}... for harness.expand."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def cpu_ticks(sample: dict[int, tuple[int, int]]) -> int:
    return sum(s[0] for s in sample.values())


def rss_kib(sample: dict[int, tuple[int, int]]) -> int:
    return sum(s[1] for s in sample.values())


# ------------------------------------------------------------------------- load processes


class Loader:
    """One ``loadgen -many`` process and the JSON lines it prints."""

    def __init__(self, argv: list[str], index: int, n: int, sources: list[str]) -> None:
        self.index, self.n, self.sources = index, n, sources
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.last: dict[str, Any] = {}
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            with contextlib.suppress(ValueError):
                msg = json.loads(line)
                if msg.get("event") == "progress":
                    self.last = msg
                else:
                    self.lines.put(msg)
        self.lines.put({"event": "exited"})

    def wait_for(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"loader {self.index}: no {event!r} in {timeout:.0f} s")
            msg = self.lines.get(timeout=left)
            if msg["event"] == event:
                self.last = {k: v for k, v in msg.items() if k != "latencies_us"}
                return msg
            if msg["event"] == "exited":
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise RuntimeError(f"loader {self.index} exited before {event!r}: {err[-500:]}")

    def order(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()


def percentiles(values: list[int]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max/mean of latencies in µs, reported in ms."""
    if not values:
        return {}
    v = sorted(values)

    def q(p: float) -> float:
        return v[min(len(v) - 1, math.ceil(p * len(v)) - 1)] / 1000

    return {
        "p50_ms": q(0.50),
        "p90_ms": q(0.90),
        "p99_ms": q(0.99),
        "p999_ms": q(0.999),
        "max_ms": v[-1] / 1000,
        "mean_ms": round(statistics.fmean(v) / 1000, 3),
    }


# --------------------------------------------------------------------------------- a run


class Timeline:
    """One sample a second: connections, server RSS, server CPU, kernel TCP memory."""

    def __init__(self, server: ServerSet, loaders: list[Loader], t0: float) -> None:
        self.server, self.loaders, self.t0 = server, loaders, t0
        self.rows: list[dict[str, Any]] = []
        self.phase = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._prev: tuple[float, int] | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            s = self.server.sample()
            ticks = cpu_ticks(s)
            cores = None
            if self._prev is not None:
                cores = (ticks - self._prev[1]) / CLK_TCK / max(1e-3, now - self._prev[0])
            self._prev = (now, ticks)
            st = sockstat()
            self.rows.append(
                {
                    "t": round(now - self.t0, 2),
                    "phase": self.phase,
                    "connections": sum(
                        int(ld.last.get("established", 0)) - int(ld.last.get("lost", 0))
                        for ld in self.loaders
                    ),
                    "tcp_inuse": st.get("inuse"),
                    "tcp_mem_pages": st.get("mem"),
                    "server_rss_kib": rss_kib(s),
                    "server_cpu_cores": None if cores is None else round(cores, 4),
                }
            )
            self._stop.wait(1.0)


def plan(args: argparse.Namespace) -> tuple[list[int], list[list[str]]]:
    """Connections per load process and each one's source addresses."""
    loaders = args.loaders or max(1, math.ceil(args.connections / 18_000))
    base, extra = divmod(args.connections, loaders)
    counts = [base + (1 if i < extra else 0) for i in range(loaders)]
    if max(counts) > FDS_PER_PROCESS:
        sys.exit(f"c250k: {max(counts)} connections per load process: use more --loaders")
    sources = [
        [f"127.{20 + i}.0.{k + 1}" for k in range(args.sources_per_loader)] for i in range(loaders)
    ]
    per_source = max(counts) / args.sources_per_loader
    if per_source > PORTS_PER_SOURCE:
        sys.exit(f"c250k: {per_source:.0f} connections per source address > {PORTS_PER_SOURCE}")
    return counts, sources


def run(args: argparse.Namespace) -> dict[str, Any]:
    notes: list[str] = []
    loadgen, missing = harness.build(notes)
    if args.server in missing:
        sys.exit(f"c250k: {args.server} could not be built")
    expected_per_worker = args.connections / args.workers
    # SO_REUSEPORT spreads by a hash of the 4-tuple: a worker gets the mean +- a few sqrt.
    margin = 0 if args.workers == 1 else 5 * math.sqrt(expected_per_worker)
    if expected_per_worker + margin > args.max_per_process:
        sys.exit(
            f"c250k: {args.connections} over {args.workers} workers is {expected_per_worker:.0f}"
            f" each, too close to --max-per-process {args.max_per_process}: more --workers"
        )
    counts, sources = plan(args)
    ports = [int(p) for p in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()]
    sysctls_before = read_sysctls()
    port = harness.free_port()
    harness.LOGS.mkdir(parents=True, exist_ok=True)
    log_path = harness.LOGS / f"c250k-{args.server}-{args.connections}.log"
    harness.log(
        f"c250k: {args.server} x{args.workers} on port {port}; {len(counts)} load processes,"
        f" {args.sources_per_loader} source addresses each; kernel: {sysctls_before}"
    )
    sock0, slab0 = sockstat(), slabinfo()
    mem0 = meminfo_kib("Slab", "SReclaimable", "SUnreclaim", "MemAvailable")
    t_spawn = time.monotonic()
    server = ServerSet(args.server, args.workers, port, args.max_per_process, log_path)
    result: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "server": args.server,
        "server_argv": server.argv,
        "workers": args.workers,
        "connections_requested": args.connections,
        "hold_s": args.hold,
        "loaders": len(counts),
        "connections_per_loader": counts,
        "sources": sources,
        "ephemeral_ports": ports,
        "kernel": sysctls_before,
        "machine": harness.machine_meta(),
        "versions": harness.versions(shutil_go()),
        "git": harness.git_meta(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    loaders: list[Loader] = []
    timeline: Timeline | None = None
    try:
        result["startup_s"] = round(server.wait_ready(60), 3)
        time.sleep(args.settle)
        base = server.sample()
        fds0 = {pid: fd_count(pid) for pid in server.worker_pids()}
        result["baseline"] = {
            "rss_kib_per_process": {str(p): s[1] for p, s in base.items()},
            "rss_kib_total": rss_kib(base),
            "sockstat": sock0,
            "meminfo_kib": mem0,
            "slab": slab0,
        }
        harness.log(f"c250k: ready in {result['startup_s']} s, RSS {rss_kib(base) / 1024:.1f} MiB")
        t0 = time.monotonic()
        cpu_before_ramp = cpu_ticks(server.sample())
        for i, (n, src) in enumerate(zip(counts, sources, strict=True)):
            argv = [str(loadgen), "-addr", f"{harness.HOST}:{port}", "-many", str(n)]
            argv += ["-src", ",".join(src), "-many-ramp", str(args.ramp_per_loader)]
            argv += ["-ramp-timeout", str(args.ramp_timeout), "-echo-timeout"]
            argv += [str(args.echo_timeout), "-max-failures", str(args.max_failures)]
            loaders.append(Loader(argv, i, n, src))
        timeline = Timeline(server, loaders, t_spawn)
        timeline.phase = "ramp"
        timeline.start()
        ramped = [ld.wait_for("ramped", args.ramp_timeout + 60) for ld in loaders]
        t_ramped = time.monotonic()
        after_ramp = server.sample()
        established = sum(r["established"] for r in ramped)
        ramp_s = max(r["t"] for r in ramped)
        ramp_cpu_s = (cpu_ticks(after_ramp) - cpu_before_ramp) / CLK_TCK
        first = [x for r in ramped for x in r.get("latencies_us", [])]
        result["ramp"] = {
            "established": established,
            "verified": sum(r["verified"] for r in ramped),
            "failures": sum(r["failures"] for r in ramped),
            "mismatches": sum(r["mismatches"] for r in ramped),
            "seconds": ramp_s,
            "wall_s": round(t_ramped - t0, 2),
            "conn_per_s": round(established / max(ramp_s, 1e-3), 1),
            "server_cpu_s": round(ramp_cpu_s, 2),
            "server_cpu_us_per_conn": round(ramp_cpu_s * 1e6 / max(established, 1), 1),
            "server_cores": round(ramp_cpu_s / max(t_ramped - t0, 1e-3), 3),
            "loadgen_cpu_s": round(sum(r["loadgen_cpu_s"] for r in ramped), 2),
            "connect_to_first_echo": percentiles(first),
            "errors": [e for r in ramped for e in r.get("error_samples") or []][:20],
        }
        harness.log(f"c250k: ramp {result['ramp']}")

        # ---- the hold
        timeline.phase = "hold"
        t_hold = time.monotonic()
        time.sleep(max(0.0, args.idle_start - (time.monotonic() - t_hold)))
        pids = server.pids()
        i0, ti0, b0, n0 = server.sample(), time.monotonic(), busy_ticks(), sched_ns(pids)
        time.sleep(args.idle_window)
        i1, ti1, b1, n1 = server.sample(), time.monotonic(), busy_ticks(), sched_ns(pids)
        idle_window = ti1 - ti0
        result["idle"] = {
            "window_s": round(idle_window, 2),
            "server_cpu_s": (cpu_ticks(i1) - cpu_ticks(i0)) / CLK_TCK,
            "server_cores": round((cpu_ticks(i1) - cpu_ticks(i0)) / CLK_TCK / idle_window, 4),
            "per_process_cores": {
                str(p): round((i1[p][0] - i0[p][0]) / CLK_TCK / idle_window, 4)
                for p in i1
                if p in i0
            },
            "tick_s": 1 / CLK_TCK,
            "server_cores_schedstat": round(
                sum(n1[p] - n0[p] for p in n1 if p in n0) / 1e9 / idle_window, 5
            ),
            "per_process_cores_schedstat": {
                str(p): round((n1[p] - n0[p]) / 1e9 / idle_window, 5) for p in n1 if p in n0
            },
            # Every process on the box: the load processes and other sessions included.
            "machine_busy_cores": round(
                (b1[0] - b0[0]) / max(1, b1[1] - b0[1]) * (os.cpu_count() or 1), 3
            ),
        }
        time.sleep(max(0.0, args.hold - (time.monotonic() - t_hold)))
        held = server.sample()
        sock1, slab1 = sockstat(), slabinfo()
        mem1 = meminfo_kib("Slab", "SReclaimable", "SUnreclaim", "MemAvailable")
        # After the kernel snapshot: the census makes a proc inode + dentry per descriptor.
        per_worker = {pid: fd_count(pid) - fds0.get(pid, 0) for pid in server.worker_pids()}
        spread = list(per_worker.values())
        result["per_worker"] = {
            "connections": {str(p): n for p, n in per_worker.items()},
            "min": min(spread),
            "max": max(spread),
            "mean": round(statistics.fmean(spread), 1),
            "how": "descriptors in /proc/PID/fd, minus each worker's own before the ramp;"
            " counted after the kernel memory snapshot, since listing /proc/PID/fd makes"
            " a proc inode and a dentry per descriptor (about 2 KB of slab each)",
        }
        still = [ld.last for ld in loaders]
        lost_in_hold = sum(int(x.get("lost", 0)) for x in still)
        n_held = established - lost_in_hold
        result["held"] = {
            "connections": n_held,
            # Loaded but unused by any rule, conntrack stays at 0: no table to fill.
            "nf_conntrack_count": read_sysctls().get("net.netfilter.nf_conntrack_count"),
            "lost_during_hold": lost_in_hold,
            "hold_s": round(time.monotonic() - t_hold, 2),
            "rss_kib_per_process": {str(p): s[1] for p, s in held.items()},
            "rss_kib_total": rss_kib(held),
            "rss_bytes_per_conn": round((rss_kib(held) - rss_kib(base)) * 1024 / max(n_held, 1), 1),
            "sockstat": sock1,
            "meminfo_kib": mem1,
            "slab": slab1,
            # Both ends of every connection are sockets of this machine (loopback).
            "tcp_mem_bytes_per_conn_both_ends": round(
                (sock1.get("mem", 0) - sock0.get("mem", 0)) * PAGE / max(n_held, 1), 1
            ),
            "slab_bytes_per_conn_both_ends": round(
                (mem1["Slab"] - mem0["Slab"]) * 1024 / max(n_held, 1), 1
            ),
        }
        if slab0 is not None and slab1 is not None:
            grown = {
                name: (slab1[name]["bytes"] - slab0.get(name, {"bytes": 0})["bytes"])
                / max(n_held, 1)
                for name in slab1
            }
            top = sorted(grown.items(), key=lambda kv: -kv[1])[:10]
            result["held"]["slab_bytes_per_conn_by_cache"] = {k: round(v, 1) for k, v in top}
            # Keep the raw tables small: only the caches that grew.
            for table in (slab0, slab1):
                for name in list(table):
                    if name not in dict(top):
                        del table[name]
        harness.log(
            f"c250k: held {n_held}, RSS {result['held']['rss_bytes_per_conn']} B/conn,"
            f" idle {result['idle']['server_cores']} cores, spread {min(spread)}-{max(spread)}"
        )

        # ---- the echoes after the hold: a burst, then paced
        rounds = []
        rates = [0.0, *(float(x) for x in args.paced_rate.split(","))]
        for number, rate in enumerate(rates, 1):
            timeline.phase = "burst" if rate == 0 else "paced"
            per_loader = rate / len(loaders)
            c0, te0, busy0 = cpu_ticks(server.sample()), time.monotonic(), busy_ticks()
            lg0 = sum(float(ld.last.get("loadgen_cpu_s", 0)) for ld in loaders)
            for ld in loaders:
                ld.order(f"echo {number} {per_loader:.3f}")
            echoed = [ld.wait_for("echoed", n_held / max(rate, 1) + 120) for ld in loaders]
            c1, te1, busy1 = cpu_ticks(server.sample()), time.monotonic(), busy_ticks()
            lg1 = sum(float(e["loadgen_cpu_s"]) for e in echoed)
            machine = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]) * (os.cpu_count() or 1)
            lat = [x for e in echoed for x in e.get("latencies_us", [])]
            verified = sum(e["verified"] for e in echoed)
            rounds.append(
                {
                    "round": number,
                    "kind": "burst" if rate == 0 else "paced",
                    "rate_per_s": rate,
                    "verified": verified,
                    "failures_total": sum(e["failures"] for e in echoed),
                    "seconds": round(te1 - te0, 2),
                    "loader_seconds": max(e["duration_s"] for e in echoed),
                    "server_cpu_s": round((c1 - c0) / CLK_TCK, 2),
                    "server_cpu_us_per_echo": round(
                        (c1 - c0) / CLK_TCK * 1e6 / max(verified, 1), 1
                    ),
                    "server_cores": round((c1 - c0) / CLK_TCK / max(te1 - te0, 1e-3), 3),
                    "loadgen_cpu_s": round(lg1 - lg0, 2),
                    # Both cores' busy time (user+system+softirq...), all processes.
                    "machine_busy_cores": round(machine, 3),
                    # softirq time is the kernel's (loopback delivery): no process's utime+stime.
                    "softirq_cores": round(
                        (busy1[2] - busy0[2]) / max(1, busy1[1] - busy0[1]) * (os.cpu_count() or 1),
                        3,
                    ),
                    # Neither the server nor the load: other sessions on this shared box.
                    "other_cores": round(
                        machine - ((c1 - c0) / CLK_TCK + lg1 - lg0) / max(te1 - te0, 1e-3), 3
                    ),
                    "latency": percentiles(lat),
                    "errors": [x for e in echoed for x in e.get("error_samples") or []][:20],
                }
            )
            harness.log(f"c250k: round {number} ({rounds[-1]['kind']}): {rounds[-1]['latency']}")
            timeline.phase = "pause"
            time.sleep(args.pause)
        result["after_hold"] = rounds
        timeline.phase = "close"
        for ld in loaders:
            ld.order("close")
        closed = [ld.wait_for("closed", 60) for ld in loaders]
        result["failures_total"] = sum(c["failures"] for c in closed)
        result["lost_total"] = sum(c["lost"] for c in closed)
        result["mismatches_total"] = sum(c["mismatches"] for c in closed)
        result["loadgen_cpu_s"] = round(sum(c["loadgen_cpu_s"] for c in closed), 2)
        time.sleep(2)
    finally:
        if timeline is not None:
            timeline.stop()
            result["timeline"] = timeline.rows
        for ld in loaders:
            if ld.proc.poll() is None:
                with contextlib.suppress(OSError, ValueError):
                    ld.proc.stdin.close()  # type: ignore[union-attr]
                try:
                    ld.proc.wait(30)
                except subprocess.TimeoutExpired:
                    ld.proc.kill()
        result["server_exit"] = server.stop()
        result["kernel_after"] = read_sysctls()
        result["notes"] = notes
    ok = (
        result.get("ramp", {}).get("verified") == args.connections
        and all(r["verified"] == args.connections for r in result.get("after_hold", []))
        and len(result.get("after_hold", [])) >= 2
        and result.get("failures_total") == 0
    )
    result["all_verified"] = ok
    return result


def shutil_go() -> bool:
    import shutil

    return shutil.which("go") is not None


# -------------------------------------------------------------------------------- report


def render_md(r: dict[str, Any]) -> str:
    ramp, held, idle = r.get("ramp", {}), r.get("held", {}), r.get("idle", {})
    pw = r.get("per_worker", {})
    base = r.get("baseline", {})
    out = [
        f"# C{r['connections_requested'] // 1000}K: {r['server']}, {r['workers']} processes",
        "",
        f"`{r['command']}`",
        "",
        f"- date: {r['date_utc']}; tree: {r['git']}; versions: {r['versions']}",
        f"- machine: {r['machine']['cpu_model']}, {r['machine']['cores']} cores,"
        f" {r['machine']['mem_gib']} GiB, {r['machine']['kernel']}",
        f"- kernel settings (read, none changed): {r['kernel']}",
        f"- load: {r['loaders']} processes (`loadgen -many`), sources {r['sources'][0][0]}..."
        f" ({len(r['sources'][0])} per process), {r['connections_per_loader'][0]} connections each",
        f"- all verified: **{r['all_verified']}**; failures {r.get('failures_total')},"
        f" lost {r.get('lost_total')}, mismatches {r.get('mismatches_total')}",
        "",
        "| figure | value |",
        "| --- | --: |",
        f"| start-up (spawn to {r['workers']} listeners) | {r.get('startup_s')} s |",
        f"| server RSS before connections | {base.get('rss_kib_total', 0) / 1024:.1f} MiB |",
        f"| connections held and verified | {held.get('connections', 0):,} |",
        f"| ramp | {ramp.get('seconds')} s, {ramp.get('conn_per_s', 0):,.0f} conn/s |",
        f"| server CPU per accepted connection (ramp) | {ramp.get('server_cpu_us_per_conn')} µs |",
        f"| connect to first echo p50 / p99 | {ramp.get('connect_to_first_echo', {}).get('p50_ms')}"
        f" / {ramp.get('connect_to_first_echo', {}).get('p99_ms')} ms |",
        f"| server RSS per connection | {held.get('rss_bytes_per_conn', 0) / 1024:.2f} KiB |",
        f"| server RSS held (all processes) | {held.get('rss_kib_total', 0) / 1024:.1f} MiB |",
        f"| kernel TCP mem (sockstat), both ends | {held.get('tcp_mem_bytes_per_conn_both_ends')}"
        " B/conn |",
        f"| kernel Slab (meminfo), both ends | {held.get('slab_bytes_per_conn_both_ends')}"
        " B/conn |",
        f"| server CPU idle (over {idle.get('window_s')} s) | {idle.get('server_cores')} cores"
        f" (schedstat: {idle.get('server_cores_schedstat')}) |",
        f"| connections per worker, min / max | {pw.get('min')} / {pw.get('max')} |",
    ]
    for rd in r.get("after_hold", []):
        lat = rd["latency"]
        pace = f" at {rd['rate_per_s']:,.0f}/s" if rd["rate_per_s"] else ""
        out.append(
            f"| after-hold echo, {rd['kind']}{pace}:"
            f" p50 / p99 / max | {lat.get('p50_ms')} / {lat.get('p99_ms')} /"
            f" {lat.get('max_ms')} ms ({rd['verified']:,} verified in {rd['seconds']} s,"
            f" {rd['server_cpu_us_per_echo']} µs server CPU per echo,"
            f" server {rd['server_cores']} cores, machine {rd['machine_busy_cores']} cores) |"
        )
    slab = held.get("slab_bytes_per_conn_by_cache")
    if slab:
        out += ["", "Slab bytes per connection (both ends), by cache: " + str(slab)]
    out += ["", "Per process RSS KiB before / held:", ""]
    for pid, kib in held.get("rss_kib_per_process", {}).items():
        before = base.get("rss_kib_per_process", {}).get(pid)
        n = pw.get("connections", {}).get(pid, "-")
        out.append(f"- {pid}: {before} / {kib} ({n} connections)")
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--connections", type=int, default=250_000)
    p.add_argument("--workers", type=int, default=14, help="server processes (default 14)")
    p.add_argument("--server", choices=sorted(SERVERS), default="echosvc")
    p.add_argument("--hold", type=float, default=60.0, help="seconds held idle (default 60)")
    p.add_argument("--idle-start", type=float, default=10.0, help="idle window starts this far in")
    p.add_argument("--idle-window", type=float, default=30.0, help="seconds of idle CPU (>= 10)")
    p.add_argument(
        "--paced-rate", default="10000", help="paced rounds, lines/s over all loaders (a,b,...)"
    )
    p.add_argument("--max-per-process", type=int, default=FDS_PER_PROCESS)
    p.add_argument("--loaders", type=int, default=0, help="load processes (default N/18000)")
    p.add_argument("--sources-per-loader", type=int, default=4)
    p.add_argument("--ramp-per-loader", type=int, default=64, help="connects in flight each")
    p.add_argument("--ramp-timeout", type=float, default=600.0)
    p.add_argument("--echo-timeout", type=float, default=60.0)
    p.add_argument("--max-failures", type=int, default=200)
    p.add_argument("--settle", type=float, default=2.0, help="seconds after start-up")
    p.add_argument("--pause", type=float, default=5.0, help="seconds between the two rounds")
    p.add_argument("--out", type=Path, default=None, help="default bench/results/c250k-<N>")
    p.add_argument(
        "--series",
        default=None,
        help="run each of these connection counts in turn (e.g. 1000,10000,19000,50000),"
        " with one process up to 19,000 and N/18,000 (rounded up) above; --workers ignored",
    )
    args = p.parse_args(argv)
    if args.idle_window < 10 or args.idle_start + args.idle_window > args.hold:
        p.error("need --idle-window >= 10 and --idle-start + --idle-window <= --hold")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.series:
        status = 0
        for n in (int(x) for x in args.series.split(",")):
            one = argparse.Namespace(**vars(args))
            one.connections, one.series, one.out = n, None, None
            one.workers = 1 if n <= FDS_PER_PROCESS else math.ceil(n / 18_000)
            status |= run_and_write(one)
        return status
    return run_and_write(args)


def run_and_write(args: argparse.Namespace) -> int:
    result = run(args)
    out = args.out
    if out is None:
        k = f"{args.connections / 1000:g}"
        suffix = "" if args.server == "echosvc" else f"-{args.server}"
        out = harness.BENCH / "results" / f"c250k-{k}k{suffix}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = render_md(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0 if result["all_verified"] else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
