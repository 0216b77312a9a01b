"""The systemd service protocol: sd_notify, the watchdog and socket activation.

A leaf: plain sockets and the environment. `Notifier.send` is
synchronous and never blocks -- one datagram to ``$NOTIFY_SOCKET``, dropped
if the socket is full -- so it is safe to call from any task (sd_notify(3)).
Without ``$NOTIFY_SOCKET`` every call is a no-op, so the daemon calls it
unconditionally.

Written by hand rather than with a library: the protocol is one datagram
(sd_notify(3)). ``sdnotify`` (last release 2017) sends on a blocking socket
and swallows every exception; ``systemd-python`` (last release 2023) is an
sdist-only C extension that needs libsystemd headers and a compiler. See the
README.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable, MutableMapping

import trio

__all__ = [
    "Notifier",
    "keep_watchdog_fed",
    "listen_sockets",
    "listen_sockets_with_names",
    "monotonic_usec",
    "report_status",
    "sockets_from_fds",
    "watchdog_interval",
]

# How often STATUS= may change: `systemctl status` is read by people.
STATUS_INTERVAL_S = 1.0

# sd_listen_fds(3): passed sockets start at fd 3.
LISTEN_FDS_START = 3


class Notifier:
    """Sends state changes to the service manager.

    Args:
      environ: where ``$NOTIFY_SOCKET`` is read; `os.environ` by default.

    """

    def __init__(self, environ: MutableMapping[str, str] = os.environ) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self._address = address
        self._sock: socket.socket | None = None
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *assignments: str) -> bool:
        """Send ``"READY=1"``, ``"STATUS=..."`` etc. as one message.

        Returns ``False`` if the message could not be delivered (no notify
        socket, the manager's queue is full, or the socket is gone).
        """
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(assignments).encode(), self._address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: MutableMapping[str, str] = os.environ) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None.

    None when the unit sets no ``WatchdogSec=``, or when ``$WATCHDOG_PID``
    names another process.
    """
    usec = environ.get("WATCHDOG_USEC")
    pid = environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        microseconds = int(usec)
    except ValueError:
        return None
    return microseconds / 2 / 1_000_000 if microseconds > 0 else None


def listen_sockets(environ: MutableMapping[str, str] = os.environ) -> list[socket.socket]:
    """Take the sockets systemd passed us (``$LISTEN_FDS``), if any are for us.

    Consumes ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` from
    ``environ`` so that child processes do not think they were activated.

    Raises:
      ValueError: ``$LISTEN_FDS`` is malformed, or an fd is not a socket.

    """
    return [sock for sock, _ in listen_sockets_with_names(environ)]


def listen_sockets_with_names(
    environ: MutableMapping[str, str] = os.environ,
) -> list[tuple[socket.socket, str]]:
    """`listen_sockets`, each with its ``FileDescriptorName=`` (``$LISTEN_FDNAMES``).

    Without ``$LISTEN_FDNAMES`` every name is ``"unknown"``, as
    sd_listen_fds_with_names(3) has it.

    Raises:
      ValueError: as `listen_sockets`, or ``$LISTEN_FDNAMES`` does not name
          as many sockets as ``$LISTEN_FDS`` counts.

    """
    pid = environ.pop("LISTEN_PID", None)
    count = environ.pop("LISTEN_FDS", None)
    names = environ.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None or pid != str(os.getpid()):
        return []
    try:
        n = int(count)
    except ValueError:
        raise ValueError(f"LISTEN_FDS={count!r} is not a number") from None
    labels = names.split(":") if names else ["unknown"] * n
    if len(labels) != n:
        raise ValueError(f"LISTEN_FDNAMES={names!r} does not name LISTEN_FDS={n} sockets")
    sockets = sockets_from_fds(range(LISTEN_FDS_START, LISTEN_FDS_START + n))
    return list(zip(sockets, labels, strict=True))


def sockets_from_fds(fds: Iterable[int]) -> list[socket.socket]:
    """Socket objects for inherited descriptors (not passed on to children).

    Raises:
      ValueError: a descriptor is not a socket, or not one echosvc can
          serve: a stream socket that is not listening (``Accept=yes`` in the
          socket unit hands over one connected socket per connection), or
          neither a stream nor a datagram socket. (Datagram sockets, for the
          UDP echo, are checked by `echosvc.listeners.take_datagram_sockets`.)

    """
    sockets = []
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ValueError(f"inherited fd {fd} is not a socket: {exc.strerror}") from None
        _check_servable(sock)
        sockets.append(sock)
    return sockets


def _check_servable(sock: socket.socket) -> None:
    fd = sock.fileno()
    if sock.type == socket.SOCK_STREAM:
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError(
                f"inherited fd {fd} is a connected stream socket, not a listening one"
                " (Accept=yes in the socket unit? echosvc needs Accept=no)"
            )
        return
    if sock.type == socket.SOCK_DGRAM:
        return
    kind = "a seqpacket" if sock.type == socket.SOCK_SEQPACKET else f"a type {int(sock.type)}"
    raise ValueError(
        f"inherited fd {fd} is {kind} socket; echosvc serves stream and datagram sockets"
    )


def monotonic_usec() -> str:
    """``MONOTONIC_USEC=`` now: what ``RELOADING=1`` carries (sd_notify(3)),
    so the manager can tell this reload from an earlier one."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


async def report_status(notifier: Notifier, status: Callable[[], list[str]]) -> None:
    """Send ``status()`` whenever it changes, at most once per second."""
    last: list[str] = []
    while True:
        current = status()
        if current != last:
            notifier.send(*current)
            last = current
        await trio.sleep(STATUS_INTERVAL_S)


async def keep_watchdog_fed(notifier: Notifier, interval: float) -> None:
    """Send ``WATCHDOG=1`` every ``interval`` seconds, until cancelled."""
    while True:
        notifier.send("WATCHDOG=1")
        await trio.sleep(interval)
