"""Listening sockets: bound from the config, or adopted from a parent.

`open_listeners` binds every ``--host`` (each name may resolve to several
IPv4 and IPv6 addresses) on one port. It does what `trio.open_tcp_listeners`
does per address -- ``SO_REUSEADDR``, ``IPV6_V6ONLY``, the largest backlog
the kernel allows -- with two differences that need the sockets in hand
before ``bind``: with port ``0`` every address gets the port the first bind
picked (so one ``--port 0`` server has one port, however many hosts), and
``SO_REUSEPORT`` can be set for several worker processes sharing a port.

Everything is bound before any nursery opens, so a failure is one plain
`BindError` (an `OSError`) whose message says which address and why, with
every socket opened so far closed again.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket as stdlib_socket
from collections.abc import Iterable

import trio

from .config import Config

__all__ = [
    "BindError",
    "address_ip",
    "adopt_listeners",
    "format_address",
    "open_listeners",
    "open_listeners_and_udp",
    "open_udp_sockets",
    "reserve_addresses",
    "take_datagram_sockets",
]

# Linux and the BSDs store the backlog in 16 bits and truncate larger values
# silently; trio and Go both ask for "as many as the kernel allows" this way
# (see trio._highlevel_open_tcp_listeners._compute_backlog, golang/go#5030).
MAX_BACKLOG = 0xFFFF

# With --port 0 and several addresses, the port the kernel picks for the
# first may be taken on another; pick again a few times before giving up.
_SHARED_PORT_ATTEMPTS = 10


class BindError(OSError):
    """Listening failed: the message names the address and the cause."""


def format_address(sockaddr: tuple[object, ...] | str) -> str:
    """``"host:port"`` for IPv4, ``"[host]:port"`` for IPv6, as in the logs."""
    if isinstance(sockaddr, str):  # AF_UNIX
        return sockaddr
    host, port = sockaddr[0], sockaddr[1]
    if ":" in str(host):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def address_ip(
    sockaddr: tuple[object, ...] | str | None,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of a socket address, IPv4-mapped IPv6 as IPv4; None if it has none.

    A dual-stack socket (``IPV6_V6ONLY`` off, as systemd's ``ListenStream=9000``
    binds it) reports IPv4 peers as ``::ffff:a.b.c.d``: they are IPv4 peers,
    to a trust list and a per-source limit alike. ``AF_UNIX`` addresses (a
    path, or ``""`` for an unnamed client) have no IP.
    """
    if not isinstance(sockaddr, tuple) or not sockaddr or not isinstance(sockaddr[0], str):
        return None
    try:
        ip = ipaddress.ip_address(sockaddr[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


async def open_listeners(config: Config, *, reuse_port: bool = False) -> list[trio.SocketListener]:
    """Listen on every host of ``config`` at ``config.port``.

    Args:
      config: supplies ``hosts``, ``port`` and ``backlog``.
      reuse_port: set ``SO_REUSEPORT`` so that other processes can bind the
          same address and the kernel spreads connections between them.

    Returns:
      One `trio.SocketListener` per resolved address, all on the same port.

    Raises:
      BindError: a host does not resolve, or an address cannot be bound.

    """
    backlog = min(config.backlog or MAX_BACKLOG, MAX_BACKLOG)
    sockets = await _bind_all(config, reuse_port=reuse_port, backlog=backlog)
    return [trio.SocketListener(sock) for sock in sockets]


async def reserve_addresses(config: Config) -> list[trio.socket.SocketType]:
    """Bind every address of ``config`` with ``SO_REUSEPORT``, without listening.

    The sockets hold the port (and resolve port ``0`` to one port for all
    addresses) so that worker processes can bind it with ``SO_REUSEPORT``;
    since they never listen, the kernel never hands them a connection.

    With ``config.udp`` the workers will also bind UDP on that port. A bound
    UDP socket cannot be held the same way -- it would receive its share of
    the datagrams and never answer them -- so the UDP port is only checked:
    bound once per address and released, and with port ``0`` a port taken
    for UDP means picking another.

    Raises:
      BindError: as `open_listeners`, or a UDP address that cannot be bound.

    """
    for attempt in range(_SHARED_PORT_ATTEMPTS):
        sockets = await _bind_all(config, reuse_port=True, backlog=None)
        if not config.udp:
            return sockets
        try:
            for udp in open_udp_sockets([sock.getsockname() for sock in sockets], reuse_port=True):
                udp.close()
        except BindError as exc:
            _close(sockets)
            retry = config.port == 0 and exc.errno == errno.EADDRINUSE
            if not retry or attempt == _SHARED_PORT_ATTEMPTS - 1:
                raise
        except BaseException:
            _close(sockets)
            raise
        else:
            return sockets
    raise AssertionError("unreachable")  # pragma: no cover


async def _bind_all(
    config: Config, *, reuse_port: bool, backlog: int | None
) -> list[trio.socket.SocketType]:
    addresses = await _resolve(config.hosts, config.port)
    for attempt in range(_SHARED_PORT_ATTEMPTS):
        sockets: list[trio.socket.SocketType] = []
        port = config.port
        try:
            for family, sockaddr in addresses:
                if port != config.port:
                    sockaddr = (sockaddr[0], port, *sockaddr[2:])
                sockets.append(await _bind(family, sockaddr, reuse_port=reuse_port))
                if backlog is not None:
                    sockets[-1].listen(backlog)
                port = sockets[0].getsockname()[1]
        except BindError as exc:
            _close(sockets)
            retry = config.port == 0 and sockets and exc.errno == errno.EADDRINUSE
            if not retry or attempt == _SHARED_PORT_ATTEMPTS - 1:
                raise
        except BaseException:
            _close(sockets)
            raise
        else:
            return sockets
    raise AssertionError("unreachable")  # pragma: no cover


def adopt_listeners(sockets: Iterable[stdlib_socket.socket]) -> list[trio.SocketListener]:
    """Wrap already-listening sockets (from systemd or a parent process).

    Raises:
      ValueError: a socket is not a listening stream socket.

    """
    listeners = []
    for sock in sockets:
        if sock.type != stdlib_socket.SOCK_STREAM:
            raise ValueError(f"inherited fd {sock.fileno()} is not a stream socket")
        sock.setblocking(False)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
    return listeners


async def _resolve(hosts: Iterable[str], port: int) -> list[tuple[int, tuple[object, ...]]]:
    addresses: list[tuple[int, tuple[object, ...]]] = []
    for host in hosts:
        try:
            infos = await trio.socket.getaddrinfo(
                host, port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE
            )
        except stdlib_socket.gaierror as exc:
            raise BindError(exc.errno, f"cannot resolve host {host!r}: {exc.strerror}") from None
        for family, _, _, _, sockaddr in infos:
            if (family, sockaddr) not in addresses:
                addresses.append((family, sockaddr))
    return addresses


async def _bind(
    family: int, sockaddr: tuple[object, ...], *, reuse_port: bool
) -> trio.socket.SocketType:
    sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    try:
        # Restarting while old connections sit in TIME_WAIT must not fail
        # (trio#39); every server sets this on Unix.
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
        if family == trio.socket.AF_INET6:
            # "::" means IPv6 only; "0.0.0.0" is listed separately if wanted.
            sock.setsockopt(trio.socket.IPPROTO_IPV6, trio.socket.IPV6_V6ONLY, 1)
        await sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise BindError(
            exc.errno, f"cannot listen on {format_address(sockaddr)}: {reason}"
        ) from None
    except BaseException:
        sock.close()
        raise
    return sock


def _close(sockets: Iterable[trio.socket.SocketType]) -> None:
    for sock in sockets:
        sock.close()


# --- UDP echo: datagram sockets beside the listeners ------------------------


async def open_listeners_and_udp(
    config: Config, *, reuse_port: bool = False
) -> tuple[list[trio.SocketListener], list[stdlib_socket.socket]]:
    """`open_listeners`, plus with ``config.udp`` a UDP socket per listener address.

    Each UDP socket is bound to exactly its listener's address and port, so
    with port ``0`` UDP gets the port TCP got; if that port is taken for UDP,
    everything is bound again on another one, a few times.

    Raises:
      BindError: as `open_listeners`; or a UDP address cannot be bound.

    """
    for attempt in range(_SHARED_PORT_ATTEMPTS):
        listeners = await open_listeners(config, reuse_port=reuse_port)
        if not config.udp:
            return listeners, []
        try:
            udp = open_udp_sockets(
                [listener.socket.getsockname() for listener in listeners], reuse_port=reuse_port
            )
        except BindError as exc:
            _close(listener.socket for listener in listeners)
            retry = config.port == 0 and exc.errno == errno.EADDRINUSE
            if not retry or attempt == _SHARED_PORT_ATTEMPTS - 1:
                raise
        except BaseException:
            _close(listener.socket for listener in listeners)
            raise
        else:
            return listeners, udp
    raise AssertionError("unreachable")  # pragma: no cover


def open_udp_sockets(
    sockaddrs: Iterable[tuple[object, ...]], *, reuse_port: bool = False
) -> list[stdlib_socket.socket]:
    """Bind a non-blocking UDP socket to each address (numeric, port included).

    Raises:
      BindError: an address cannot be bound; the message names it.

    """
    sockets: list[stdlib_socket.socket] = []
    try:
        for sockaddr in sockaddrs:
            family = stdlib_socket.AF_INET6 if ":" in str(sockaddr[0]) else stdlib_socket.AF_INET
            sock = stdlib_socket.socket(family, stdlib_socket.SOCK_DGRAM)
            sockets.append(sock)
            sock.setblocking(False)
            # No SO_REUSEADDR: for UDP on Linux it lets a second process bind
            # the same address and silently take part of its datagrams;
            # there is no TIME_WAIT to wait out. SO_REUSEPORT only for workers.
            if reuse_port:
                sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEPORT, 1)
            if family == stdlib_socket.AF_INET6:
                sock.setsockopt(stdlib_socket.IPPROTO_IPV6, stdlib_socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise BindError(
                    exc.errno, f"cannot listen on udp://{format_address(sockaddr)}: {reason}"
                ) from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def take_datagram_sockets(
    sockets: Iterable[stdlib_socket.socket],
) -> tuple[list[stdlib_socket.socket], list[stdlib_socket.socket]]:
    """Split inherited sockets into UDP ones (for the UDP echo) and the rest.

    Raises:
      ValueError: a datagram socket is not UDP over IPv4 or IPv6, or is not
          bound to a port (systemd's ``ListenDatagram=`` binds it).

    """
    datagram, rest = [], []
    for sock in sockets:
        if sock.type != stdlib_socket.SOCK_DGRAM:
            rest.append(sock)
            continue
        if sock.family not in (stdlib_socket.AF_INET, stdlib_socket.AF_INET6):
            raise ValueError(
                f"inherited fd {sock.fileno()} is a datagram socket of family"
                f" {sock.family.name}; only UDP (IPv4 or IPv6) is served"
            )
        if sock.getsockname()[1] == 0:
            raise ValueError(f"inherited fd {sock.fileno()} is a UDP socket bound to no port")
        datagram.append(sock)
    return datagram, rest
