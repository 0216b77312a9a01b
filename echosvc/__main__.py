"""``python -m echosvc`` and the ``echosvc`` console script.

A Ctrl-C that lands before the daemon owns its signals -- while Python
imports Trio, typer and rich, or while logging is set up -- is a request to
stop something that has not started: exit quietly with 130 (128 + SIGINT,
what a shell reports for Ctrl-C), not with a KeyboardInterrupt traceback.
Once the daemon runs, SIGINT is a graceful stop like SIGTERM.
"""

import sys

# Exit status for a Ctrl-C before anything started.
INTERRUPTED = 130


def main() -> None:
    try:
        from echosvc.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED)


if __name__ == "__main__":
    main()
