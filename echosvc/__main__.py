"""``python -m echosvc`` and the ``echosvc`` console script.

The daemon takes charge of its signals once its Trio run starts; before that
-- while Python imports Trio, typer and rich, or while logging is set up,
about half a second -- ``serve`` must still behave as a service does:

* SIGINT (Ctrl-C) and SIGTERM are stop requests for something that has not
  started: exit quietly, SIGINT with 130 (128 + SIGINT, what a shell reports
  for Ctrl-C), SIGTERM with 0 (the graceful stop's status), never with a
  KeyboardInterrupt traceback or killed by the signal;
* SIGHUP is a reload request, and nothing is loaded yet: ignored, never a
  stop (a reload must not kill a service that is still starting).

Once the daemon runs, `trio.open_signal_receiver` replaces these handlers.
"""

import signal
import sys
from types import FrameType

# Exit status for a Ctrl-C before anything started.
INTERRUPTED = 130


def _stop_before_start(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)  # nothing has started, so nothing to drain


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        signal.signal(signal.SIGTERM, _stop_before_start)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        from echosvc.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED)


if __name__ == "__main__":
    main()
