"""echosvc: a TCP echo service on Trio's structured concurrency.

Run it as a daemon (``echosvc serve``), under systemd, or as a library::

    async with trio.open_nursery() as nursery:
        server: echosvc.Server = await nursery.start(echosvc.serve, echosvc.Config(port=0))

or serve any Trio stream with ``await echosvc.handle_stream(stream, config)``.

The names below are imported on first use (PEP 562), so that ``import
echosvc`` costs nothing until something is used: the command line can take
charge of a Ctrl-C before Trio, structlog and typer are even imported, and a
worker process imports only what it serves with.
"""

from __future__ import annotations

import importlib

from ._version import __version__

# typing.TYPE_CHECKING without importing typing: the fewer imports before
# __main__ can take charge of a Ctrl-C, the better (type checkers read it).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .config import CloseReason, Config, ConfigError, LogFormat, LogLevel, Mode
    from .connection import Connection, ConnectionStats, handle_stream
    from .framing import LineFramer
    from .listeners import BindError, adopt_listeners, open_listeners
    from .pipeline import Link, Refused, Stage
    from .server import Server, ServerStatistics, serve

# name -> the module that defines it
_EXPORTS = {
    "BindError": "listeners",
    "CloseReason": "config",
    "Config": "config",
    "ConfigError": "config",
    "Connection": "connection",
    "ConnectionStats": "connection",
    "LineFramer": "framing",
    "Link": "pipeline",
    "LogFormat": "config",
    "LogLevel": "config",
    "Mode": "config",
    "Refused": "pipeline",
    "Server": "server",
    "ServerStatistics": "server",
    "Stage": "pipeline",
    "adopt_listeners": "listeners",
    "handle_stream": "connection",
    "open_listeners": "listeners",
    "serve": "server",
}

__all__ = [
    "BindError",
    "CloseReason",
    "Config",
    "ConfigError",
    "Connection",
    "ConnectionStats",
    "LineFramer",
    "Link",
    "LogFormat",
    "LogLevel",
    "Mode",
    "Refused",
    "Server",
    "ServerStatistics",
    "Stage",
    "__version__",
    "adopt_listeners",
    "handle_stream",
    "open_listeners",
    "serve",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'echosvc' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
