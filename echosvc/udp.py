"""UDP echo (RFC 862 over UDP), made safe to expose.

A UDP echo is the textbook reflector: it answers whoever the source address
says, so a spoofed source turns it into an amplifier or into one end of an
endless loop with another echo, chargen or daytime service (CERT CA-1996-01,
CVE-1999-0103; US-CERT TA14-017A). So every datagram is classified before
anything is sent, and one that fails a rule is dropped without reply and
counted by cause (`DropCause`):

- ``size``: longer than ``udp_max_bytes``. Each receive asks for one byte
  more than the limit, so a longer datagram is seen whole-or-more and never
  echoed cut short.
- ``source``: a source that is ours -- our listening port, from any address:
  our own address and port (a datagram that would loop through ourselves),
  or another echo on our port, which is FreeBSD inetd's rule against two
  echo services ping-ponging (so a fleet of echosvc on one port cannot be
  looped into itself) -- or one no reply may go to: multicast, broadcast,
  unspecified, or the reserved 240/4 (IPv4, IPv6, and IPv4 inside IPv6).
- ``port``: source port 0 or below 1024, the services that answer anything
  (echo, chargen, daytime, time, qotd), as xinetd refuses them.
- ``rate``: over ``udp_rate`` per source (an IPv4 address, or an IPv6 /64,
  which one host can rotate through at will), by `echosvc.limits`.
- ``send``: the reply could not be handed to the kernel at once (a full send
  buffer, an unreachable network). A reply is never waited for.

The rules are checked cheapest first, and only a datagram that passes the
others reaches the rate limiter, so nothing dropped for another cause costs
a place in its table. `DatagramPolicy` is that decision, sans-IO;
`UdpEcho` is the I/O: one task per socket that waits until the socket is
readable, then receives, decides and echoes up to `BATCH` datagrams without
blocking (the kernel's non-blocking calls) before it yields, so a flood
takes its turn with the TCP connections instead of starving them.

Drops are logged as ``udp_dropped`` (warning) with the counts per cause since
the previous record: the first drop is logged at once, then at most one
record per `DROP_LOG_INTERVAL_S`, so a flood cannot flood the log.
"""

from __future__ import annotations

import errno
import socket
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import StrEnum

import attrs
import structlog
import trio

from .config import Config
from .limits import DEFAULT_SOURCE_CAPACITY, SourceRateLimiter

__all__ = [
    "BATCH",
    "DROP_LOG_INTERVAL_S",
    "DatagramPolicy",
    "DropCause",
    "UdpEcho",
    "UdpStatistics",
    "format_udp_address",
]

# Datagrams handled per wake-up before the task yields to the others.
BATCH = 64

DROP_LOG_INTERVAL_S = 10.0

# Errors a receive reports for an earlier datagram (ICMP errors queued on
# the socket) or for one the kernel gave up on: the next receive is fine.
_TRANSIENT_RECV_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ECONNREFUSED", "EHOSTUNREACH", "ENETUNREACH", "ECONNRESET", "ENOBUFS", "ENOMEM")
    if hasattr(errno, name)
)

_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


class DropCause(StrEnum):
    """Why a datagram got no reply: the fields of ``udp_dropped``."""

    RATE = "rate"
    PORT = "port"
    SIZE = "size"
    SOURCE = "source"
    SEND = "send"


@attrs.frozen
class UdpStatistics:
    """A snapshot of a UDP echo's counters since it started.

    Attributes:
      echoed: datagrams sent back.
      dropped: datagrams dropped without reply, per `DropCause` value
          (every cause present, at 0 if none).
      sources: sources in the rate limiter's table now.

    """

    echoed: int
    dropped: Mapping[str, int]
    sources: int


def format_udp_address(sockaddr: tuple[object, ...]) -> str:
    """``"udp://host:port"``, IPv6 as ``"udp://[::1]:port"``, as in ``listening``."""
    host, port = sockaddr[0], sockaddr[1]
    if ":" in str(host):
        return f"udp://[{host}]:{port}"
    return f"udp://{host}:{port}"


def _packed_source(host: str) -> bytes | None:
    """The source address as 4 (IPv4, also when IPv4-mapped) or 16 bytes."""
    try:
        if ":" not in host:
            return socket.inet_pton(socket.AF_INET, host)
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    except OSError:
        return None
    if packed[:12] == _V4_MAPPED_PREFIX:
        return packed[12:]
    return packed


def _no_reply_possible(packed: bytes) -> bool:
    """Multicast, broadcast, unspecified or otherwise not one host."""
    if len(packed) == 4:
        # 0/8 is "this network" (0.0.0.0 unspecified); 224/4 multicast;
        # 240/4 reserved, 255.255.255.255 the limited broadcast among them.
        return packed[0] == 0 or packed[0] >= 224
    return packed[0] == 0xFF or packed == bytes(16)  # ff00::/8, ::


class DatagramPolicy:
    """Decides, without I/O, whether a datagram gets its echo.

    Args:
      max_bytes: the longest payload echoed.
      own_ports: the ports we serve UDP on.
      limiter: the per-source rate limiter.

    """

    def __init__(self, max_bytes: int, own_ports: Iterable[int], limiter: SourceRateLimiter):
        self.max_bytes = max_bytes
        self.own_ports = frozenset(own_ports)
        self.limiter = limiter

    def classify(self, source: tuple[object, ...], size: int) -> DropCause | None:
        """The cause to drop a datagram of ``size`` bytes from ``source``, or None.

        ``size`` is what the receive returned; anything over ``max_bytes``
        (receive ``max_bytes + 1`` to tell) is oversize. Only a datagram that
        passes every other rule takes a token from its source's bucket.
        """
        if size > self.max_bytes:
            return DropCause.SIZE
        host, port = source[0], source[1]
        if port in self.own_ports:
            return DropCause.SOURCE
        packed = _packed_source(host) if isinstance(host, str) else None
        if packed is None or _no_reply_possible(packed):
            return DropCause.SOURCE
        if not isinstance(port, int) or port < 1024:
            return DropCause.PORT
        # An IPv6 source is its /64: one host may use every address in it.
        if not self.limiter.allow(packed if len(packed) == 4 else packed[:8]):
            return DropCause.RATE
        return None


class UdpEcho:
    """Serves UDP echo on bound datagram sockets; owns them and their counters.

    Run `serve` in a nursery and cancel it to stop; `close` releases the
    sockets. The counters live on the instance (`statistics`), so two
    servers in one process share nothing.

    Args:
      sockets: bound ``SOCK_DGRAM`` sockets (IPv4 or IPv6).
      config: supplies ``udp_max_bytes`` and ``udp_rate``.
      clock: the limiter's clock; `trio.current_time` by default, so it
          follows a `trio.testing.MockClock`.
      capacity: the most sources the rate limiter tracks.

    """

    def __init__(
        self,
        sockets: Sequence[socket.socket],
        config: Config,
        *,
        clock: Callable[[], float] = trio.current_time,
        capacity: int = DEFAULT_SOURCE_CAPACITY,
    ) -> None:
        self.sockets = list(sockets)
        self._names = [format_udp_address(sock.getsockname()) for sock in self.sockets]
        self.policy = DatagramPolicy(
            config.udp_max_bytes,
            (sock.getsockname()[1] for sock in self.sockets),
            SourceRateLimiter(config.udp_rate, clock=clock, capacity=capacity),
        )
        self._echoed = 0
        self._dropped = dict.fromkeys(DropCause, 0)
        self._reported = dict.fromkeys(DropCause, 0)
        self._drop_seen = trio.Event()
        self._log = structlog.get_logger("echosvc")

    @property
    def addresses(self) -> list[str]:
        """Every socket's address as ``"udp://host:port"``."""
        return list(self._names)

    def statistics(self) -> UdpStatistics:
        """Return a frozen snapshot of the counters."""
        return UdpStatistics(
            echoed=self._echoed,
            dropped=types.MappingProxyType({str(c): n for c, n in self._dropped.items()}),
            sources=len(self.policy.limiter),
        )

    async def serve(self) -> None:
        """Serve every socket until cancelled (the sockets stay open: `close`)."""
        for sock in self.sockets:
            sock.setblocking(False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._report_drops)
            for sock in self.sockets:
                nursery.start_soon(self._serve_socket, sock, name="echosvc udp")

    def close(self) -> None:
        """Close every socket at once (idempotent)."""
        for sock in self.sockets:
            if sock.fileno() != -1:
                # Wakes, with ClosedResourceError, anything still waiting on it.
                trio.lowlevel.notify_closing(sock)
                sock.close()

    async def _serve_socket(self, sock: socket.socket) -> None:
        classify = self.policy.classify
        dropped = self._dropped
        # One byte more than the limit: a longer datagram shows as oversize
        # instead of being cut to fit (recvfrom discards what does not fit).
        buffer = bytearray(self.policy.max_bytes + 1)
        view = memoryview(buffer)
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(BATCH):
                try:
                    size, source = sock.recvfrom_into(buffer)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _TRANSIENT_RECV_ERRNOS:
                        continue
                    raise
                cause = classify(source, size)
                if cause is None:
                    cause = self._send(sock, view[:size], source)
                    if cause is None:
                        self._echoed += 1
                        continue
                dropped[cause] += 1
                self._drop_seen.set()

    @staticmethod
    def _send(sock: socket.socket, payload: memoryview, source: object) -> DropCause | None:
        try:
            sock.sendto(payload, source)  # type: ignore[call-overload]
        except OSError as exc:
            # Without SO_BROADCAST the kernel refuses to send to an address it
            # knows to be a broadcast one (a local subnet's): EACCES.
            return DropCause.SOURCE if exc.errno == errno.EACCES else DropCause.SEND
        return None

    async def _report_drops(self) -> None:
        while True:
            await self._drop_seen.wait()
            counts = {
                str(cause): self._dropped[cause] - self._reported[cause] for cause in DropCause
            }
            self._reported = dict(self._dropped)
            self._drop_seen = trio.Event()
            self._log.warning("udp_dropped", **counts)
            await trio.sleep(DROP_LOG_INTERVAL_S)
