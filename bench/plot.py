"""Draw the benchmark's pictures from the results JSON: one command, PNGs into bench/plots/.

    .venv/bin/python bench/plot.py [--harness bench/results/full.json] [--c250k FILE]

* ``cpu_per_request.png``: server CPU µs per request (per connection for ``short50``), per
  server per scenario, from a harness results JSON (default: the newest one in
  bench/results/ that compares echosvc with at least two peers over three scenarios).
* ``latency.png``: p50 and p99 per server per scenario from the same file, and the p50 to
  p99.9 of the C250K run's echoes after the hold, as a burst and paced.
* ``memory_per_connection.png``: server RSS per connection as connections grow (1k to 250k)
  for echosvc, Go and asyncio streams (uvloop), from every ``results/c250k-*.json``; the
  kernel's slab per connection (both ends) beside it.
* ``c250k_timeline.png``: the biggest echosvc C250K run over time: connections, server RSS,
  server CPU.

Needs matplotlib (``pip install -e '.[bench]'``); draws with the Agg backend, no display.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
PLOTS = BENCH / "plots"

# One colour per server, the same in every picture.
COLOURS = {
    "c-floor": "#7f7f7f",
    "go": "#1f77b4",
    "asyncio-protocol": "#17becf",
    "asyncio-streams": "#2ca02c",
    "asyncio-streams-std": "#98df8a",
    "asyncio-protocol-std": "#9edae5",
    "trio-naive-line": "#ff9896",
    "trio-naive-stream": "#c5b0d5",
    "echosvc": "#d62728",
}
LABELS = {
    "c-floor": "C floor (epoll)",
    "go": "Go original",
    "asyncio-protocol": "asyncio Protocol (uvloop)",
    "asyncio-streams": "asyncio streams (uvloop)",
    "asyncio-streams-std": "asyncio streams (default loop)",
    "asyncio-protocol-std": "asyncio Protocol (default loop)",
    "trio-naive-line": "Trio naive line",
    "trio-naive-stream": "Trio naive stream",
    "echosvc": "echosvc",
}
LOAD_SCENARIOS = ["rr1", "rr50", "pipe50", "pipe50w", "big50", "short50"]


def pick_harness() -> Path:
    """The newest harness JSON that compares echosvc with its peers: at least two servers
    that are not echosvc revisions, over at least three scenarios."""
    best: tuple[str, Path] | None = None
    for path in sorted(RESULTS.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or "summary" not in data or "runs" not in data:
            continue
        servers = {srv for row in data["summary"].values() for srv in row}
        peers = {srv for srv in servers if not srv.startswith("echosvc")}
        if len(peers) < 2 or len(data["summary"]) < 3 or "echosvc" not in servers:
            continue
        key = (data.get("meta", {}).get("date", ""), path)
        if best is None or key[0] > best[0]:
            best = key
    if best is None:
        sys.exit("plot: no harness results JSON in bench/results/")
    return best[1]


def plain_log_axis(ax: Any) -> None:
    """Log-scale y ticks as plain numbers (0.6, 2, 100), not 6x10^-1."""
    fmt = mpl.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_locator(mpl.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(mpl.ticker.NullFormatter())


def server_order(names: set[str]) -> list[str]:
    return [s for s in COLOURS if s in names] + sorted(names - set(COLOURS))


def cpu_per_request(harness: dict[str, Any], source: str, out: Path) -> None:
    summary = harness["summary"]
    scenarios = [s for s in LOAD_SCENARIOS if s in summary]
    servers = server_order({srv for s in scenarios for srv in summary[s]})
    fig, ax = plt.subplots(figsize=(11, 6))
    width = 0.8 / len(servers)
    for i, srv in enumerate(servers):
        xs, ys = [], []
        for j, sc in enumerate(scenarios):
            v = summary[sc].get(srv, {}).get("server_cpu_us_per_req")
            if v:
                xs.append(j + (i - (len(servers) - 1) / 2) * width)
                ys.append(v)
        bars = ax.bar(xs, ys, width, label=LABELS.get(srv, srv), color=COLOURS.get(srv))
        if srv == "echosvc":
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(scenarios)))
    ax.set_xticklabels(
        [f"{s}\n(µs per connection)" if s == "short50" else s for s in scenarios], fontsize=9
    )
    ax.set_ylabel("server CPU per request, µs (log scale)")
    ax.set_title(f"Server CPU time per request (utime+stime / verified requests)\n{source}")
    ax.grid(axis="y", which="both", alpha=0.3)
    plain_log_axis(ax)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def latency(harness: dict[str, Any], source: str, c250k: dict[str, Any] | None, out: Path) -> None:
    summary = harness["summary"]
    scenarios = [s for s in LOAD_SCENARIOS if s in summary]
    panels = len(scenarios) + (1 if c250k else 0)
    fig, axes = plt.subplots(1, panels, figsize=(3.3 * panels, 5), squeeze=False)
    for ax, sc in zip(axes[0], scenarios, strict=False):
        servers = server_order(set(summary[sc]))
        for i, srv in enumerate(servers):
            row = summary[sc][srv]
            p50, p99 = row.get("p50_us"), row.get("p99_us")
            if not p50 or not p99:
                continue
            colour = COLOURS.get(srv)
            ax.bar(i, p99 / 1000, 0.7, color=colour, alpha=0.35)
            ax.bar(i, p50 / 1000, 0.7, color=colour)
        ax.set_yscale("log")
        ax.set_xticks(range(len(servers)))
        ax.set_xticklabels([LABELS.get(s, s) for s in servers], rotation=60, ha="right", fontsize=7)
        ax.set_title(sc, fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
        plain_log_axis(ax)
    axes[0][0].set_ylabel("latency, ms (log): solid p50, pale p99")
    if c250k:
        ax = axes[0][-1]
        qs = ["p50_ms", "p90_ms", "p99_ms", "p999_ms"]
        for rd in c250k["after_hold"]:
            label = "burst" if rd["kind"] == "burst" else f"paced {rd['rate_per_s'] / 1000:g}k/s"
            ax.plot(
                ["p50", "p90", "p99", "p99.9"],
                [rd["latency"][q] for q in qs],
                marker="o",
                label=label,
            )
        ax.axhline(100, color="k", ls=":", lw=1)
        ax.text(0, 110, "target p99 100 ms", fontsize=7)
        ax.set_yscale("log")
        n = c250k["held"]["connections"]
        ax.set_title(f"C250K: echo after the hold\n({n:,} connections)", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(axis="y", which="both", alpha=0.3)
        plain_log_axis(ax)
    fig.suptitle(f"Latency percentiles, every echo verified ({source})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def c250k_runs() -> list[dict[str, Any]]:
    runs = []
    for path in sorted(RESULTS.glob("c250k-*.json")):
        data = json.loads(path.read_text())
        if data.get("held") and data.get("all_verified"):
            data["_file"] = path.name
            runs.append(data)
    return runs


def memory_per_connection(runs: list[dict[str, Any]], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 5.5))
    by_server: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        # One point per (server, connections): the latest run of it.
        by_server.setdefault(r["server"], {})[r["held"]["connections"]] = r
    for srv in server_order(set(by_server)):
        points = sorted(by_server[srv].items())
        xs = [n for n, _ in points]
        ys = [r["held"]["rss_bytes_per_conn"] / 1024 for _, r in points]
        ax.plot(xs, ys, marker="o", label=LABELS.get(srv, srv), color=COLOURS.get(srv))
        for (_n, r), x, y in zip(points, xs, ys, strict=True):
            ax.annotate(
                f"{r['workers']}p",
                (x, y),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=7,
                color=COLOURS.get(srv),
            )
    kernel = sorted(
        (r["held"]["connections"], r["held"]["slab_bytes_per_conn_both_ends"] / 1024)
        for r in by_server.get("echosvc", {}).values()
        # Below 10,000 connections the box's own slab churn is of the same size.
        if r["held"]["connections"] >= 10_000
    )
    if kernel:
        ax.plot(
            [k for k, _ in kernel],
            [v for _, v in kernel],
            ls="--",
            color="#555555",
            label="kernel slab per connection, both ends (echosvc runs)",
        )
    ax.axhline(4.0, color="k", ls=":", lw=1)
    ax.text(1000, 4.15, "target: 4.0 KiB of server RSS per connection", fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
    ax.set_xlabel("connections held (log scale); label: server processes (SO_REUSEPORT)")
    ax.set_ylabel("KiB per connection")
    ax.set_ylim(bottom=0)
    ax.set_title(
        "Server RSS per idle connection as connections grow\n"
        "(sum of every server process, held minus before; bench/c250k.py)"
    )
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


PHASE_COLOURS = {"ramp": "#fde0c5", "burst": "#f4cccc", "paced": "#d9ead3", "close": "#eeeeee"}


def timeline(run: dict[str, Any], out: Path) -> None:
    rows = run["timeline"]
    t = [r["t"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(10, 7.5), sharex=True)
    series = [
        ([r["connections"] for r in rows], "connections held\n(verified, per load process)"),
        ([r["server_rss_kib"] / 1024 for r in rows], "server RSS, MiB\n(all processes)"),
        ([r["server_cpu_cores"] for r in rows], "server CPU, cores\n(utime+stime per s)"),
    ]
    for ax, (ys, label) in zip(axes, series, strict=True):
        ax.plot(t, ys, color=COLOURS["echosvc"], lw=1.5)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
        start = None
        for i, r in enumerate(rows):
            phase = r["phase"]
            if start is None or phase != rows[start]["phase"] or i == len(rows) - 1:
                if start is not None and rows[start]["phase"] in PHASE_COLOURS:
                    ax.axvspan(t[start], t[i], color=PHASE_COLOURS[rows[start]["phase"]], lw=0)
                start = i
    axes[0].yaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    handles = [mpl.patches.Patch(color=c, label=p) for p, c in PHASE_COLOURS.items()]
    handles.append(mpl.patches.Patch(color="white", label="white: hold (idle)"))
    axes[0].legend(handles=handles, fontsize=8, loc="lower right", ncol=5)
    axes[-1].set_xlabel("seconds since the server was started")
    held = run["held"]["connections"]
    fig.suptitle(
        f"C250K: {held:,} connections to echosvc serve --workers {run['workers']},"
        f" {run['hold_s']:g} s hold ({run['_file']})",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--harness", type=Path, default=None, help="a harness results JSON")
    parser.add_argument("--c250k", type=Path, default=None, help="a bench/c250k.py results JSON")
    args = parser.parse_args()
    PLOTS.mkdir(exist_ok=True)
    path = args.harness or pick_harness()
    harness = json.loads(path.read_text())
    source = f"{path.name}, {harness.get('meta', {}).get('date', '')}"
    runs = c250k_runs()
    ours = [r for r in runs if r["server"] == "echosvc"]
    if args.c250k:
        big = json.loads(args.c250k.read_text())
        big["_file"] = args.c250k.name
    elif ours:
        # The C250K run itself when there is one, else the biggest.
        big = max(
            ours, key=lambda r: (r["held"]["connections"] == 250_000, r["held"]["connections"])
        )
    else:
        big = None
    cpu_per_request(harness, source, PLOTS / "cpu_per_request.png")
    latency(harness, source, big, PLOTS / "latency.png")
    memory_per_connection(runs, PLOTS / "memory_per_connection.png")
    if big is not None:
        timeline(big, PLOTS / "c250k_timeline.png")
    for png in sorted(PLOTS.glob("*.png")):
        print(png.relative_to(BENCH.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
