"""``python -m tests.soak``: the chaos run from the command line.

Exit status 0 when every check passed, 1 otherwise; ``--json`` prints the
report as one JSON object (for scripts), otherwise a short table.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from functools import partial

import trio

from .chaos import SoakConfig, run_soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=300, help="clients at once")
    parser.add_argument("--seed", type=int, default=None, help="default: random, reported")
    parser.add_argument("--read-timeout", type=float, default=2.0)
    parser.add_argument("--write-timeout", type=float, default=2.0)
    parser.add_argument("--max-line-bytes", type=int, default=65536)
    parser.add_argument("--shutdown-grace", type=float, default=3.0)
    parser.add_argument("--rss-bound-mib", type=float, default=16.0)
    parser.add_argument("--canary-max-ms", type=float, default=1000.0)
    parser.add_argument(
        "--sigterm-after",
        type=float,
        default=None,
        metavar="S",
        help="send SIGTERM after S seconds and check the graceful shutdown instead",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    config = SoakConfig(
        duration=args.duration,
        clients=args.clients,
        seed=args.seed if args.seed is not None else random.randrange(2**32),
        read_timeout=args.read_timeout,
        write_timeout=args.write_timeout,
        max_line_bytes=args.max_line_bytes,
        shutdown_grace=args.shutdown_grace,
        rss_bound_mib=args.rss_bound_mib,
        canary_max_s=args.canary_max_ms / 1000,
        sigterm_after=args.sigterm_after,
    )

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = trio.run(partial(run_soak, config, progress=None if args.json else progress))
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.text())
    return 1 if report.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
