"""echosvc: a TCP echo service on Trio's structured concurrency.

Run it as a daemon (``echosvc serve``), under systemd, or as a library::

    async with trio.open_nursery() as nursery:
        server: echosvc.Server = await nursery.start(echosvc.serve, echosvc.Config(port=0))

or serve any Trio stream with ``await echosvc.handle_stream(stream, config)``.
"""

from ._version import __version__
from .config import CloseReason, Config, ConfigError, LogFormat, LogLevel, Mode
from .connection import Connection, ConnectionStats, handle_stream
from .framing import LineFramer
from .listeners import BindError, adopt_listeners, open_listeners
from .server import Server, ServerStatistics, serve

__all__ = [
    "BindError",
    "CloseReason",
    "Config",
    "ConfigError",
    "Connection",
    "ConnectionStats",
    "LineFramer",
    "LogFormat",
    "LogLevel",
    "Mode",
    "Server",
    "ServerStatistics",
    "__version__",
    "adopt_listeners",
    "handle_stream",
    "open_listeners",
    "serve",
]
