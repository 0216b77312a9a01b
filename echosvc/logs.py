"""Logging setup for the daemon: structlog, configured once, at the entry point.

Not on a TTY (journald, containers, pipes) every record is one JSON object
per line on stderr; on a TTY it is coloured ``key=value``. Every record has
``timestamp`` (ISO 8601, UTC), ``level`` and ``event``. A filtering bound
logger drops records below the level before any processor runs, so the
``connection_opened`` debug record costs next to nothing at ``info``.

Under systemd, when ``$JOURNAL_STREAM`` names our stderr, each JSON line is
prefixed with its syslog priority (``<6>{...}``): journald strips the prefix
and files the record at the right level (sd-daemon(3), SyslogLevelPrefix=).

The library never calls this; it only asks structlog for a logger.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from .config import LogFormat, LogLevel

__all__ = ["configure", "logs_to_journal"]

# sd-daemon(3) priorities for the levels we emit.
_SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


class _JournalPriorityPrefix:
    """Render with ``inner`` and put ``<N>`` in front for journald."""

    def __init__(self, inner: structlog.typing.Processor) -> None:
        self._inner = inner

    def __call__(self, logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> str:
        priority = _SYSLOG_PRIORITY.get(event_dict.get("level", "info"), 6)
        rendered = self._inner(logger, name, event_dict)
        assert isinstance(rendered, str), "the JSON renderer returns str"
        return f"<{priority}>{rendered}"


class _AddWorker:
    def __init__(self, worker: int) -> None:
        self._worker = worker

    def __call__(
        self, logger: Any, name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event_dict["worker"] = self._worker
        return event_dict


def _lead_with_essentials(
    logger: Any, name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Put ``timestamp``, ``level`` and ``event`` first, for people reading raw lines."""
    return {
        "timestamp": event_dict.pop("timestamp", None),
        "level": event_dict.pop("level", None),
        "event": event_dict.pop("event", None),
        **event_dict,
    }


def logs_to_journal(stream: TextIO, environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether ``stream`` is connected to journald (``$JOURNAL_STREAM`` is ``dev:inode``)."""
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        stat = os.fstat(stream.fileno())
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (ValueError, OSError):
        return False


def configure(
    log_format: LogFormat,
    level: LogLevel,
    stream: TextIO = sys.stderr,
    *,
    worker: int | None = None,
) -> None:
    """Configure structlog for the process: call once, before anything logs.

    ``worker``, when given, is added to every record (``--workers`` processes
    share one stderr).
    """
    tty = stream.isatty()
    use_json = log_format is LogFormat.JSON or (log_format is LogFormat.AUTO and not tty)
    processors: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if worker is not None:
        processors.append(_AddWorker(worker))
    if use_json:
        renderer: structlog.typing.Processor = structlog.processors.JSONRenderer()
        if logs_to_journal(stream):
            renderer = _JournalPriorityPrefix(renderer)
        processors += [structlog.processors.format_exc_info, _lead_with_essentials, renderer]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=tty))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
