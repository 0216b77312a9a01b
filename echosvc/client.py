"""The client side: the health probe behind ``echosvc check`` and the load
model behind ``echosvc bench``.

`probe` connects, sends one random line and expects exactly that line back,
all under one deadline. It is what a load balancer, a container
``HEALTHCHECK`` or a monitoring system should run: it proves the service
accepts, reads, and echoes, not merely that a port is open.

`generate_load` is one process's share of a benchmark: connections that
each keep ``depth`` requests of ``size`` bytes in flight, verify every echo
byte-exact and in order, and record latencies in a mergeable histogram. It
is the same model as the benchmark harness's native load generator
(``bench/loadgen``), so the two can be compared.

Both can start every connection with a PROXY header (`ProxyClaim`), as a
load balancer would, so a listener with ``--proxy-protocol`` can be probed
and loaded directly.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import ipaddress
import math
import os
import secrets
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from enum import StrEnum
from typing import Any

import attrs
import trio

from . import proxyproto
from .listeners import format_address

__all__ = [
    "LoadReport",
    "LoadShape",
    "ProbeError",
    "ProxyClaim",
    "TLSClient",
    "generate_load",
    "parse_endpoint",
    "percentile_us",
    "probe",
    "probe_udp",
]


# --- PROXY headers for the client side ----------------------------------------


class HeaderVersion(StrEnum):
    """The PROXY protocol version a client sends."""

    V1 = "v1"
    V2 = "v2"


@attrs.frozen
class ProxyClaim:
    """The PROXY header a client sends first, as a load balancer would.

    Attributes:
      version: `HeaderVersion.V1` (text) or `HeaderVersion.V2` (binary).
      source: the client the header names, ``(ip, port)``; ``None``: the
          connection's own local address, so by default the header tells the
          truth and the server logs the prober it would have logged anyway.

    """

    version: HeaderVersion
    source: proxyproto.Address | None = None

    def header(self, local: tuple[Any, ...], remote: tuple[Any, ...]) -> bytes:
        """The header for a connection from ``local`` to ``remote`` (socket addresses).

        The destination named is ``remote``, in the source's family: an IPv4
        server behind an IPv6 claim is named as ``::ffff:a.b.c.d``; an IPv6
        server behind an IPv4 claim (which has no such form) as ``0.0.0.0``.
        echosvc reads only the source; the destination is there for the spec.
        """
        source = self.source or (_plain_ip(local[0]), local[1])
        host = _plain_ip(remote[0])
        source_v4 = ipaddress.ip_address(source[0]).version == 4
        if ipaddress.ip_address(host).version == 4 and not source_v4:
            host = f"::ffff:{host}"
        elif ipaddress.ip_address(host).version == 6 and source_v4:
            mapped = ipaddress.IPv6Address(host).ipv4_mapped
            host = str(mapped) if mapped is not None else "0.0.0.0"
        destination = (host, remote[1])
        if self.version is HeaderVersion.V1:
            return proxyproto.encode_v1(source, destination)
        return proxyproto.encode_v2(source, destination)

    def argv(self) -> list[str]:
        """The ``check``/``bench`` options that ask for this claim."""
        options = [f"--proxy-protocol={self.version.value}"]
        if self.source is not None:
            options.append(f"--proxy-source={format_address(self.source)}")
        return options


def _plain_ip(host: str) -> str:
    """``host`` without an IPv6 zone (meaningless to the receiver), IPv4-mapped as IPv4."""
    ip = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def parse_endpoint(text: str) -> proxyproto.Address:
    """``"203.0.113.7:4000"`` or ``"[2001:db8::7]:4000"`` -> ``(ip, port)``.

    Raises:
      ValueError: not an IP literal and a port 0-65535 in that form.

    """
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError(f"{text!r}: brackets are for IPv6 addresses")
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [2001:db8::7]:4000")
    if not colon or not port.isdigit() or port != str(int(port)) or int(port) > 65535:
        raise ValueError(f"{text!r}: expected IP:PORT, the port 0-65535")
    if "%" in host:
        raise ValueError(f"{text!r}: a zone id means nothing to the receiver")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    return str(ip), int(port)


@attrs.frozen
class TLSClient:
    """How a client speaks TLS to a ``--tls-cert`` listener.

    Attributes:
      ca: verify the server against the CA certificates in this PEM file;
          ``None``: against the system's trust store.
      insecure: verify nothing (self-signed test set-ups); the traffic is
          still encrypted, but anyone in the middle could read it.

    """

    ca: str | None = None
    insecure: bool = False

    def context(self) -> ssl.SSLContext:
        """A client context; raises `OSError` or `ssl.SSLError` for an unusable ``ca``."""
        context = ssl.create_default_context(cafile=self.ca)
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def argv(self) -> list[str]:
        """The options that make a child process speak the same TLS."""
        options = ["--tls"]
        if self.ca is not None:
            options.append(f"--tls-ca={self.ca}")
        if self.insecure:
            options.append("--tls-insecure")
        return options


async def _start_tls(
    stream: trio.SocketStream, host: str, context: ssl.SSLContext
) -> trio.SSLStream[trio.SocketStream]:
    """``stream`` wrapped in TLS, its handshake done; the stream is closed on failure."""
    tls = trio.SSLStream(stream, context, server_hostname=host)
    try:
        await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return tls


def _proxy_header(claim: ProxyClaim | None, stream: trio.SocketStream) -> bytes:
    if claim is None:
        return b""
    return claim.header(stream.socket.getsockname(), stream.socket.getpeername())


class ProbeError(Exception):
    """The probe failed; the message says why, for a human."""


async def probe(
    host: str,
    port: int,
    timeout: float,  # noqa: ASYNC109
    *,
    proxy: ProxyClaim | None = None,
    tls: TLSClient | None = None,
) -> float:
    """Round-trip one random line through the echo service at ``host:port``.

    ``timeout`` bounds the whole probe -- resolve, connect, send, receive --
    which is the contract of a health check, so it is a parameter rather
    than the caller's cancel scope. With ``proxy``, its header goes first,
    in the same send as the line (with ``tls``: in clear, then the
    handshake, then the line).

    Returns:
      The seconds from sending the line to receiving all of its echo.

    Raises:
      ProbeError: connection refused, timed out, closed early, or a mismatch.

    """
    line = b"echosvc-check " + secrets.token_hex(16).encode() + b"\n"
    try:
        context = tls.context() if tls is not None else None
    except (OSError, ssl.SSLError) as exc:
        raise ProbeError(f"--tls-ca {tls.ca if tls else ''}: {exc}") from None
    try:
        with trio.fail_after(timeout):
            tcp = await trio.open_tcp_stream(host, port)
            header = _proxy_header(proxy, tcp)
            stream: trio.abc.Stream = tcp
            if context is not None:
                if header:
                    await tcp.send_all(header)
                    header = b""
                stream = await _start_tls(tcp, host, context)
            async with stream:
                started = trio.current_time()
                await stream.send_all(header + line)
                received = b""
                while len(received) < len(line):
                    chunk = await stream.receive_some(len(line) - len(received))
                    if not chunk:
                        raise ProbeError(
                            f"connection closed after {len(received)} of {len(line)} bytes"
                        )
                    received += chunk
                elapsed = trio.current_time() - started
    except trio.TooSlowError:
        raise ProbeError(f"no echo within {timeout:g} s") from None
    except socket.gaierror as exc:
        raise ProbeError(f"cannot resolve {host!r}: {exc.strerror}") from None
    except OSError as exc:
        raise ProbeError(_describe(exc)) from None
    except trio.BrokenResourceError as exc:
        if isinstance(exc.__cause__, ssl.SSLError):
            raise ProbeError(f"TLS: {exc.__cause__}") from None
        raise ProbeError(f"connection broken: {exc.__cause__ or exc}") from None
    if received != line:
        raise ProbeError(f"echo mismatch: sent {line!r}, received {received!r}")
    return elapsed


# UDP may lose the probe or its echo: send again this many times in all,
# evenly over the timeout, each datagram distinct.
UDP_PROBE_ATTEMPTS = 4


async def probe_udp(host: str, port: int, timeout: float) -> float:  # noqa: ASYNC109
    """Round-trip one random datagram through the UDP echo at ``host:port``.

    Like `probe`, ``timeout`` bounds the whole probe. Since a datagram may be
    lost, a new one (each distinct) is sent every ``timeout / 4`` seconds,
    four at most, and the first exact echo of any of them is the answer.
    The socket is connected, so only the server's replies are read, and an
    ICMP "port unreachable" fails the probe at once.

    Returns:
      The seconds from sending the datagram that came back to its echo.

    Raises:
      ProbeError: nothing serves UDP there, no echo in time, or a reply
          that is not exactly one of the datagrams sent.

    """
    sent: dict[bytes, float] = {}
    try:
        with trio.fail_after(timeout):
            infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_DGRAM)
            family, _, _, _, sockaddr = infos[0]
            with trio.socket.socket(family, trio.socket.SOCK_DGRAM) as sock:
                await sock.connect(sockaddr)
                interval = timeout / UDP_PROBE_ATTEMPTS
                for attempt in range(1, UDP_PROBE_ATTEMPTS + 1):
                    datagram = b"echosvc-check " + secrets.token_hex(8).encode()
                    sent[datagram] = trio.current_time()
                    await sock.send(datagram)
                    # The last attempt waits for the probe's own deadline.
                    last = attempt == UDP_PROBE_ATTEMPTS
                    with trio.move_on_after(math.inf if last else interval):
                        reply = await sock.recv(65536)
                        if reply not in sent:
                            raise ProbeError(f"echo mismatch: received {reply!r}")
                        return trio.current_time() - sent[reply]
    except trio.TooSlowError:
        raise ProbeError(f"no echo within {timeout:g} s") from None
    except socket.gaierror as exc:
        raise ProbeError(f"cannot resolve {host!r}: {exc.strerror}") from None
    except OSError as exc:
        if exc.errno == errno.ECONNREFUSED:
            raise ProbeError("port unreachable: nothing serves UDP there") from None
        raise ProbeError(_describe(exc)) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _describe(exc: OSError) -> str:
    # When every address fails, open_tcp_stream raises a bare OSError whose
    # cause is an ExceptionGroup of the per-address errors: report the first.
    cause: BaseException = exc
    while isinstance(cause, OSError) and cause.errno is None and cause.__cause__ is not None:
        cause = cause.__cause__
        if isinstance(cause, BaseExceptionGroup):
            cause = cause.exceptions[0]
    if isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED:
        return "connection refused"
    if isinstance(cause, OSError) and cause.errno is not None:
        return os.strerror(cause.errno).lower()
    return str(exc)


# --- the load model behind ``echosvc bench`` --------------------------------

# Latencies are kept as a log-linear histogram: 2% wide buckets, so a
# process's report is small whatever the request count, and reports from
# several processes merge by adding counts.
_BUCKET_BASE = 1.02
_LOG_BASE = math.log(_BUCKET_BASE)


def latency_bucket(seconds: float) -> int:
    """The histogram bucket of a latency (microsecond resolution)."""
    return int(math.log(max(seconds * 1e6, 1.0)) / _LOG_BASE)


def bucket_latency_us(bucket: int) -> float:
    """The upper edge of a bucket, in microseconds."""
    return float(_BUCKET_BASE ** (bucket + 1))


def percentile_us(histogram: Mapping[int, int], fraction: float) -> float:
    """The latency below which ``fraction`` of the samples fall (0 if none)."""
    total = sum(histogram.values())
    if not total:
        return 0.0
    rank = fraction * total
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return bucket_latency_us(bucket)
    return bucket_latency_us(max(histogram))


@attrs.define
class LoadReport:
    """What one load process measured inside its window."""

    connected: int = 0
    requests: int = 0
    mismatches: int = 0
    errors: int = 0
    error_samples: list[str] = attrs.Factory(list)
    histogram: dict[int, int] = attrs.Factory(dict)

    def add_error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(message)


@attrs.frozen
class LoadShape:
    """The load model: how many connections, how big, how deep, how long."""

    connections: int
    size: int
    depth: int
    warmup: float
    duration: float


def request_line(connection: int, sequence: int, size: int) -> bytes:
    """Request ``sequence`` of ``connection``: exactly ``size`` bytes, ``\\n`` last.

    The numbers up front make every request distinct, so an echo that is
    reordered, duplicated or lost shows up as a mismatch.
    """
    head = b"%d:%d:" % (connection, sequence)
    filler = size - 1 - len(head)
    if filler < 0:
        return (head * (size // len(head) + 1))[: size - 1] + b"\n"
    return head + b"x" * filler + b"\n"


class _LoadConnection:
    def __init__(self, index: int, shape: LoadShape, report: LoadReport) -> None:
        self.index = index
        self.shape = shape
        self.report = report
        self.sequence = 0
        self.expected = bytearray()
        self.sent_at: collections.deque[float] = collections.deque()
        self.completed = 0

    def next_requests(self, count: int, now: float) -> bytes:
        batch = b"".join(
            request_line(self.index, self.sequence + i, self.shape.size) for i in range(count)
        )
        self.sequence += count
        self.expected += batch
        self.sent_at.extend([now] * count)
        return batch

    async def run(
        self, stream: trio.abc.Stream, window: tuple[float, float], progress: list[int]
    ) -> None:
        start, end = window
        size = self.shape.size
        verified = 0
        await stream.send_all(self.next_requests(self.shape.depth, trio.current_time()))
        while self.sent_at:
            chunk = await stream.receive_some(65536)
            if not chunk:
                self.report.add_error(f"connection {self.index}: closed by the server")
                return
            if chunk != self.expected[: len(chunk)]:
                self.report.mismatches += 1
                self.report.add_error(f"connection {self.index}: echo mismatch")
                return
            del self.expected[: len(chunk)]
            verified += len(chunk)
            done = verified // size - self.completed
            if not done:
                continue
            self.completed += done
            now = trio.current_time()
            for _ in range(done):
                sent = self.sent_at.popleft()
                if start <= now < end:
                    self.report.requests += 1
                    bucket = latency_bucket(now - sent)
                    self.report.histogram[bucket] = self.report.histogram.get(bucket, 0) + 1
            progress[0] += done
            if now < end:
                await stream.send_all(self.next_requests(done, now))


async def generate_load(
    host: str,
    port: int,
    shape: LoadShape,
    *,
    offset: int = 0,
    wait_for_go: Callable[[], Awaitable[None]] | None = None,
    on_progress: Callable[[int], None] | None = None,
    patience_s: float = 10.0,
    proxy: ProxyClaim | None = None,
    tls: TLSClient | None = None,
) -> LoadReport:
    """Drive ``shape`` against ``host:port`` from this process; verify every echo.

    Connects every connection first, then (after ``wait_for_go``, if given)
    keeps ``depth`` requests in flight on each for ``warmup + duration``
    seconds, counting only what completes after the warm-up. Outstanding
    requests are drained and verified before returning.

    Args:
      offset: the index of this process's first connection, so that request
          contents are distinct across processes.
      on_progress: called about four times a second with the number of
          requests completed so far.
      patience_s: seconds allowed to connect, and for the echoes still
          outstanding when the window closes.
      proxy: send this PROXY header on each connection as soon as it is
          connected, before the load starts.
      tls: speak TLS on each connection (after the PROXY header); the
          handshakes are done before the load starts.

    """
    report = LoadReport()
    streams: list[trio.abc.Stream] = []
    context = tls.context() if tls is not None else None
    try:
        with trio.move_on_after(patience_s):
            for _ in range(shape.connections):
                try:
                    tcp = await trio.open_tcp_stream(host, port)
                    streams.append(tcp)
                    if proxy is not None:
                        await tcp.send_all(_proxy_header(proxy, tcp))
                    if context is not None:
                        streams[-1] = await _start_tls(tcp, host, context)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    what = "the TLS handshake" if context is not None else "the PROXY header"
                    report.add_error(f"connect: {what}: {exc.__cause__ or exc}")
                    break
                except OSError as exc:
                    report.add_error(f"connect: {_describe(exc)}")
                    break
        report.connected = len(streams)
        if wait_for_go is not None:
            await wait_for_go()
        now = trio.current_time()
        window = (now + shape.warmup, now + shape.warmup + shape.duration)
        progress = [0]
        async with trio.open_nursery() as nursery:
            if on_progress is not None:
                nursery.start_soon(_report_progress, progress, on_progress)
            async with trio.open_nursery() as connections:
                for index, stream in enumerate(streams):
                    connections.start_soon(
                        _drive,
                        _LoadConnection(offset + index, shape, report),
                        stream,
                        window,
                        progress,
                        patience_s,
                    )
            nursery.cancel_scope.cancel()
        if on_progress is not None:
            on_progress(progress[0])
        # A polite close: over TLS a close_notify, or the server counts a
        # truncation (reset) where the bench simply finished.
        with trio.move_on_after(patience_s):
            for stream in streams:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.aclose()
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)
    return report


async def _drive(
    connection: _LoadConnection,
    stream: trio.abc.Stream,
    window: tuple[float, float],
    progress: list[int],
    patience_s: float,
) -> None:
    with trio.move_on_at(window[1] + patience_s) as scope:
        try:
            await connection.run(stream, window, progress)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            connection.report.add_error(f"connection {connection.index}: {exc}")
    if scope.cancelled_caught:
        connection.report.add_error(f"connection {connection.index}: echoes still missing")


async def _report_progress(progress: list[int], on_progress: Callable[[int], None]) -> None:
    while True:
        await trio.sleep(0.25)
        on_progress(progress[0])
