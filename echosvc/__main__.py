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

A worker that a ``--workers`` supervisor started has its configuration in
its environment (`echosvc.workers.CONFIG_ENV`): it goes straight into the
daemon, importing neither the CLI (typer, click) nor rich.
"""

try:  # even these few statements are time in which a Ctrl-C can land
    import os
    import signal
    import sys
    from types import FrameType

    # Exit status for a Ctrl-C before anything started.
    INTERRUPTED = 130
except KeyboardInterrupt:
    raise SystemExit(130) from None


def _stop_before_start(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)  # nothing has started, so nothing to drain


def main() -> None:
    try:
        if sys.argv[1:2] == ["serve"]:
            signal.signal(signal.SIGTERM, _stop_before_start)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            if "_ECHOSVC_CONFIG" in os.environ:  # workers.CONFIG_ENV, without importing it
                # structlog.dev imports rich whenever it is installed (it is,
                # for typer and for bench's display), 4 MiB a worker never
                # uses: None in sys.modules makes that import fail, and
                # structlog falls back to its own plain rendering.
                sys.modules.setdefault("rich", None)  # type: ignore[arg-type]
                from echosvc.daemon import run_worker

                sys.exit(run_worker())
        from echosvc.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED)


if __name__ == "__main__":
    main()
