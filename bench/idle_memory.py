"""What one idle echosvc connection costs in memory, and where it goes.

    .venv/bin/python bench/idle_memory.py                    # 10,000 connections
    .venv/bin/python bench/idle_memory.py --connections 2000 --top 30

The server runs in this script's process (``await nursery.start(echosvc.serve,
echosvc.Config(port=0, ...))``), so its heap can be inspected; the clients run in a
child process (trio sockets), so that nothing of theirs is in the measured heap. The
child is told what to do over its stdin and answers on its stdout:

1. ``warmup``: a few connections echo one line and close, so that what is allocated
   once (code paths run for the first time, caches, interned strings) is not counted
   per connection;
2. ``open``: N connections, each echoing one verified 64-byte line, all left open;
3. ``close``: all of them closed; the server's heap should come back to where it was.

Snapshots are taken before step 2, after it (once every handler has had a second to
park in its read), and after step 3, each after ``gc.collect()``. Two fresh processes
do the measuring, one after the other:

- **rss**: no tracing, RSS (``VmRSS`` of /proc/self/status) only: the clean figure;
- **trace**: ``tracemalloc`` on, grouped by file and by file:line (with the source
  line, so the table explains itself), plus a census of gc-tracked objects by type
  (count and ``sys.getsizeof``). tracemalloc keeps its own bookkeeping per block, so
  this process's RSS is higher: it is reported, not used.

A coroutine object (and its frame, which Python 3.11 keeps inside it) is allocated
on the line that *calls* the async function, and an object by the line that builds
it: so the file:line table reads as "who made what". Grouping is by file and line,
not by echosvc's private names, so the script keeps working through refactors.
Kernel socket memory (buffers, the TCP control block) is not process memory and is
in none of these figures; see /proc/net/sockstat for it.

Writes ``PREFIX.json`` and ``PREFIX.md`` (default ``bench/results/idle_memory``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import linecache
import logging
import os
import resource
import shlex
import subprocess
import sys
import sysconfig
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
WARMUP_CONNECTIONS = 32
CONNECT_AT_ONCE = 64
SETTLE_S = 1.0  # after the last echo: every handler back in its read
STEP_TIMEOUT_S = 180.0
SIZE = 64


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def probe_line(i: int) -> bytes:
    head = f"{i:08d} idle-memory probe ".encode()
    return head + b"x" * (SIZE - 1 - len(head)) + b"\n"


# ------------------------------------------------------------------------------ client


async def echo_verified(sock: trio.socket.SocketType, port: int, i: int) -> None:
    await sock.connect(("127.0.0.1", port))
    line = probe_line(i)
    await sock.send(line)
    got = b""
    while len(got) < len(line):
        data = await sock.recv(len(line) - len(got))
        if not data:
            raise ConnectionError(f"connection {i}: EOF after {len(got)} bytes")
        got += data
    if got != line:
        raise ValueError(f"connection {i}: echo {got!r} != {line!r}")


async def client(port: int, n: int) -> None:
    """The child: take orders on stdin, answer ``ok ...`` on stdout."""
    raise_nofile()
    held: list[trio.socket.SocketType] = []
    stdin = trio.lowlevel.FdStream(os.dup(0))
    limiter = trio.CapacityLimiter(CONNECT_AT_ONCE)

    async def echo_one(i: int, keep: bool) -> None:
        async with limiter:
            sock = trio.socket.socket()
            try:
                await echo_verified(sock, port, i)
            except BaseException:
                sock.close()
                raise
            if keep:
                held.append(sock)
            else:
                sock.close()

    async def many(count: int, keep: bool) -> None:
        with trio.fail_after(STEP_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(echo_one, i, keep)

    buf = b""
    while True:
        while b"\n" not in buf:
            data = await stdin.receive_some()
            if not data:
                return
            buf += data
        order, _, buf = buf.partition(b"\n")
        if order == b"warmup":
            await many(WARMUP_CONNECTIONS, keep=False)
            reply = f"ok {WARMUP_CONNECTIONS}"
        elif order == b"open":
            await many(n, keep=True)
            reply = f"ok {len(held)}"
        elif order == b"close":
            for sock in held:
                sock.close()
            reply = f"ok {len(held)}"
            held.clear()
        else:
            return
        print(reply, flush=True)


# ----------------------------------------------------------------------------- measure


def short_path(filename: str) -> str:
    """A file as ``trio/_core/_run.py``, ``echosvc/connection.py`` or ``<stdlib>/socket.py``."""
    path = os.path.abspath(filename)
    stdlib = sysconfig.get_paths()["stdlib"]
    roots = [p for p in sys.path if p and path.startswith(os.path.abspath(p) + os.sep)]
    root = max(roots, key=len, default=None)
    if root is not None and os.path.abspath(root) != stdlib:
        return os.path.relpath(path, root)
    if path.startswith(stdlib + os.sep):
        return "<stdlib>/" + os.path.relpath(path, stdlib)
    return filename


def census() -> Counter[tuple[str, str]]:
    """gc-tracked objects by type: Counter of (type, "count"/"bytes")."""
    out: Counter[tuple[str, str]] = Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        name = f"{kind.__module__}.{kind.__qualname__}"
        out[name, "count"] += 1
        out[name, "bytes"] += sys.getsizeof(obj)
    return out


class Probe:
    """One state of the process: RSS, and with tracing a snapshot and a type census."""

    def __init__(self, tracing: bool) -> None:
        gc.collect()
        self.rss_kib = rss_kib()  # first: the census below allocates
        self.snapshot: tracemalloc.Snapshot | None = None
        self.types: Counter[tuple[str, str]] = Counter()
        self.traced = 0
        if tracing:
            ignore = [tracemalloc.Filter(False, __file__), tracemalloc.Filter(False, "<frozen *>")]
            ignore.append(tracemalloc.Filter(False, tracemalloc.__file__))
            self.snapshot = tracemalloc.take_snapshot().filter_traces(ignore)
            self.traced = sum(stat.size for stat in self.snapshot.statistics("filename"))
            self.types = census()


async def read_reply(stdout: trio.abc.ReceiveStream, buf: bytearray) -> str:
    while b"\n" not in buf:
        data = await stdout.receive_some()
        if not data:
            raise RuntimeError("the client process exited")
        buf += data
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode()


async def wait_active(server: Any, count: int) -> None:
    with trio.fail_after(STEP_TIMEOUT_S):
        # Polled: the server's public API has counters, not an event for this.
        while server.statistics().active != count:  # noqa: ASYNC110
            await trio.sleep(0.05)


async def measure(n: int, tracing: bool, frames: int) -> dict[str, Any]:
    import structlog

    import echosvc  # here: the client child needs none of it

    # The library logs connection_opened/closed at debug/info through structlog;
    # the daemon would filter those at --log-level warning, and so do we.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    raise_nofile()
    if tracing:
        tracemalloc.start(frames)
    config = echosvc.Config(port=0, max_connections=n + WARMUP_CONNECTIONS + 100)
    probes: dict[str, Probe] = {}
    async with trio.open_nursery() as nursery:
        server = await nursery.start(echosvc.serve, config)
        argv = [sys.executable, str(HERE), "--client", "--port", str(server.port)]
        child = await trio.lowlevel.open_process(
            [*argv, "--connections", str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert child.stdin is not None
        assert child.stdout is not None
        buf = bytearray()

        async def order(what: str) -> str:
            assert child.stdin is not None
            assert child.stdout is not None
            await child.stdin.send_all(what.encode() + b"\n")
            with trio.fail_after(STEP_TIMEOUT_S):
                return await read_reply(child.stdout, buf)

        try:
            await order("warmup")
            await wait_active(server, 0)
            probes["before"] = Probe(tracing)
            t0 = time.monotonic()
            reply = await order("open")
            ramp_s = time.monotonic() - t0
            if reply != f"ok {n}":
                raise RuntimeError(f"the client opened {reply!r} of {n}")
            await wait_active(server, n)
            await trio.sleep(SETTLE_S)
            probes["held"] = Probe(tracing)
            await order("close")
            await wait_active(server, 0)
            probes["after_close"] = Probe(tracing)
        finally:
            # Shielded and bounded: the child must be told to go even if we were
            # cancelled, and must not hold us up for more than a few seconds.
            with trio.move_on_after(10, shield=True):
                await child.stdin.aclose()  # EOF on its stdin: the child exits
                await child.wait()
            if child.returncode is None:
                child.kill()
            server.shutdown()
    return summarize(n, probes, ramp_s, tracing)


def by_line(now: tracemalloc.Snapshot, then: tracemalloc.Snapshot, n: int) -> list[dict[str, Any]]:
    lines = []
    for diff in now.compare_to(then, "lineno"):
        if abs(diff.size_diff) < n:  # less than a byte per connection
            continue
        frame = diff.traceback[0]
        lines.append(
            {
                "where": f"{short_path(frame.filename)}:{frame.lineno}",
                "source": linecache.getline(frame.filename, frame.lineno).strip(),
                "bytes_per_conn": round(diff.size_diff / n, 1),
                "blocks_per_conn": round(diff.count_diff / n, 2),
            }
        )
    return sorted(lines, key=lambda x: -x["bytes_per_conn"])


def summarize(n: int, probes: dict[str, Probe], ramp_s: float, tracing: bool) -> dict[str, Any]:
    before, held, after = probes["before"], probes["held"], probes["after_close"]
    out: dict[str, Any] = {
        "connections": n,
        "ramp_s": round(ramp_s, 2),
        "rss_kib": {"before": before.rss_kib, "held": held.rss_kib, "after_close": after.rss_kib},
        "rss_bytes_per_conn": round((held.rss_kib - before.rss_kib) * 1024 / n, 1),
    }
    if not tracing:
        return out
    assert before.snapshot is not None
    assert held.snapshot is not None
    out["traced_bytes"] = {"before": before.traced, "held": held.traced, "after": after.traced}
    out["traced_bytes_per_conn"] = round((held.traced - before.traced) / n, 1)
    out["traced_left_after_close_per_conn"] = round((after.traced - before.traced) / n, 1)

    by_file: Counter[str] = Counter()
    blocks_by_file: Counter[str] = Counter()
    for diff in held.snapshot.compare_to(before.snapshot, "filename"):
        name = short_path(diff.traceback[0].filename)
        by_file[name] += diff.size_diff
        blocks_by_file[name] += diff.count_diff
    out["by_file"] = [
        {
            "file": f,
            "bytes_per_conn": round(b / n, 1),
            "blocks_per_conn": round(blocks_by_file[f] / n, 2),
        }
        for f, b in by_file.most_common()
        if abs(b) >= n  # at least a byte per connection
    ]
    out["by_line"] = by_line(held.snapshot, before.snapshot, n)
    # What closing every connection did not give back: containers keep their
    # capacity, a lazily pruned heap keeps entries; a leak would show here too.
    assert after.snapshot is not None
    out["left_after_close_by_line"] = by_line(after.snapshot, before.snapshot, n)

    types: dict[str, dict[str, float]] = {}
    for (name, what), value in (held.types - before.types).items():
        types.setdefault(name, {"count_per_conn": 0.0, "bytes_per_conn": 0.0})
        types[name][f"{what}_per_conn"] = round(value / n, 2)
    out["by_type"] = sorted(
        ({"type": k, **v} for k, v in types.items() if v["count_per_conn"] >= 0.01),
        key=lambda x: -x["bytes_per_conn"],
    )
    return out


# ---------------------------------------------------------------------------- report


def render_md(doc: dict[str, Any], top: int) -> str:
    meta, rss, trace = doc["meta"], doc["rss"], doc["trace"]
    n = rss["connections"]
    out = ["# Memory per idle echosvc connection", ""]
    out += [
        f"- **date**: {meta['date']}",
        f"- **command**: `{meta['command']}`",
        f"- **tree**: {meta['git']}",
        f"- **versions**: {meta['versions']}",
        f"- **load**: {n:,} connections, each echoed one {SIZE}-byte line and then idle; the"
        " server in-process (`echosvc.serve`, `echosvc.Config(port=0)`), the clients in a"
        " child process",
        "",
        "| figure | per connection |",
        "|---|--:|",
        f"| RSS, untraced process ({rss['rss_kib']['before'] / 1024:.1f} → "
        f"{rss['rss_kib']['held'] / 1024:.1f} MiB) | **{rss['rss_bytes_per_conn']:,.0f} B** |",
        f"| Python heap traced by tracemalloc (the traced process) "
        f"| {trace['traced_bytes_per_conn']:,.0f} B |",
        f"| RSS of the traced process (tracemalloc's own bookkeeping included) "
        f"| {trace['rss_bytes_per_conn']:,.0f} B |",
        f"| traced heap left over after every connection closed "
        f"| {trace['traced_left_after_close_per_conn']:,.0f} B |",
        "",
        "RSS minus the traced heap is what the allocators keep around the objects (pymalloc"
        " pools and arenas, malloc headers, partly used pages) and memory outside Python's"
        " allocator. Kernel socket memory is in neither.",
        "",
        "## By file (where the allocation happened)",
        "",
        "| file | bytes/conn | blocks/conn |",
        "|---|--:|--:|",
    ]
    out += [
        f"| `{r['file']}` | {r['bytes_per_conn']:,.1f} | {r['blocks_per_conn']:.2f} |"
        for r in trace["by_file"]
    ]
    out += [
        f"| **total** | **{trace['traced_bytes_per_conn']:,.1f}** | "
        f"**{sum(r['blocks_per_conn'] for r in trace['by_file']):.2f}** |",
        "",
        f"## By line (top {top})",
        "",
        "A coroutine (with its frame) is counted on the line that calls the async function.",
        "",
        "| where | source | bytes/conn | blocks/conn |",
        "|---|---|--:|--:|",
    ]
    for r in trace["by_line"][:top]:
        source = r["source"].replace("|", "\\|")
        out.append(
            f"| `{r['where']}` | `{source}` "
            f"| {r['bytes_per_conn']:,.1f} | {r['blocks_per_conn']:.2f} |"
        )
    out += [
        "",
        "## Left over after every connection closed (by line)",
        "",
        "| where | source | bytes/conn | blocks/conn |",
        "|---|---|--:|--:|",
    ]
    for r in trace["left_after_close_by_line"][:top]:
        source = r["source"].replace("|", "\\|")
        out.append(
            f"| `{r['where']}` | `{source}` "
            f"| {r['bytes_per_conn']:,.1f} | {r['blocks_per_conn']:.2f} |"
        )
    out += [
        "",
        f"## By type (gc-tracked objects, top {top})",
        "",
        "`sys.getsizeof` is shallow: a dict or list is counted apart from its owner, and"
        " objects gc does not track (bytes, str, float, int) are not here at all.",
        "",
        "| type | objects/conn | bytes/conn |",
        "|---|--:|--:|",
    ]
    out += [
        f"| `{r['type']}` | {r['count_per_conn']:.2f} | {r['bytes_per_conn']:,.1f} |"
        for r in trace["by_type"][:top]
    ]
    return "\n".join(out) + "\n"


def run_child(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, str(HERE), "--measure", mode, "--connections", str(args.connections)]
    argv += ["--frames", str(args.frames)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=3 * STEP_TIMEOUT_S + 60)
    if done.returncode != 0:
        sys.exit(f"idle_memory.py: the {mode} run failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--top", type=int, default=25, help="rows of the by-line and by-type tables")
    p.add_argument("--frames", type=int, default=1, help="tracemalloc frames per allocation")
    p.add_argument("--out", type=Path, default=HERE.parent / "results" / "idle_memory")
    p.add_argument("--measure", choices=["rss", "trace"], help=argparse.SUPPRESS)
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        trio.run(client, args.port, args.connections)
        return 0
    if args.measure:
        result = trio.run(measure, args.connections, args.measure == "trace", args.frames)
        print(json.dumps(result))
        return 0

    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=REPO, check=False)
        return done.stdout.strip()

    import importlib.metadata

    versions = ", ".join(
        f"{dist} {importlib.metadata.version(dist)}" for dist in ("echosvc", "trio", "structlog")
    )
    doc: dict[str, Any] = {
        "meta": {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": shlex.join([os.path.relpath(sys.executable, Path.cwd()), *sys.argv]),
            "git": git("rev-parse", "--short", "HEAD")
            + (" + uncommitted changes" if git("status", "--porcelain") else ""),
            "versions": f"Python {sys.version.split()[0]}, {versions}",
        }
    }
    print(f"measuring RSS with {args.connections:,} idle connections ...", file=sys.stderr)
    doc["rss"] = run_child("rss", args)
    print("measuring again with tracemalloc ...", file=sys.stderr)
    doc["trace"] = run_child("trace", args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    text = render_md(doc, args.top)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    written = f"{args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}"
    print(f"wrote {written}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
