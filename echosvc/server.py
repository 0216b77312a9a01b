"""The server: accept loops, one handler task per connection, graceful shutdown.

Shape (after hypercorn's trio server): the *handler* nursery outlives the
*accept* nursery. `Server.shutdown` cancels the accept scope, so every
listener stops accepting and is closed at once; it asks each connection to
`~echosvc.connection.Connection.stop` (finish the echo under way, echo what
was received, close); and it gives the handler nursery a deadline of
``shutdown_grace`` seconds, after which whatever is left is cancelled. No
flag is polled: shutdown is cancel scopes and one deadline.

Capacity is a `trio.CapacityLimiter`: an accept loop takes a token before
``accept()`` and the handler gives it back when its connection closes, so at
``max_connections`` the loops stop accepting and new clients wait in the
kernel's backlog (backpressure, logged once as ``capacity_reached``). Each
loop first waits for its socket to become readable and only then takes a
token: a loop idling on a quiet listener must not hold the token that a
client queued on another listener needs.

An accept loop wakes when its listener is readable and then accepts up to
`_ACCEPT_BATCH` connections, each under a token of its own, with the plain
non-blocking ``accept`` until ``EAGAIN``: one readiness wait and one trip
through the scheduler per burst instead of per connection, as Go's accept
loop drains the backlog. Accepted sockets inherit ``TCP_NODELAY`` and
``TCP_NOTSENT_LOWAT`` from the listener, so a connection costs no
``setsockopt`` either.

Running out of file descriptors (or kernel memory) makes ``accept()`` fail
while the connection stays queued. The loop backs off -- 5 ms doubling to
1 s, as Go's ``net/http.Server`` does -- and logs ``accept_paused`` once and
``accept_resumed`` when an accept succeeds again, instead of
`trio.serve_listeners`' traceback every 100 ms.

Each handler task runs the connection's pipeline (`echosvc.pipeline`: the
stages the config asks for, then the echo), so no stage can stall
accepting. The server knows the stage list, not what each stage does.

The running totals -- accepted, closed by reason, lines, bytes, accept
failures, a histogram of connection durations -- live on the server instance
(`Tally`), updated once per connection when it closes, and
`Server.statistics` returns them as a frozen snapshot: what a metrics
endpoint exposes, with no process-global state.

UDP echo (`echosvc.udp`), when there are datagram sockets to serve, runs in
the accept nursery: a shutdown stops it and closes its sockets at once,
with the listeners, since a datagram has nothing to drain.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import itertools
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import attrs
import structlog
import trio

from .config import CloseReason, Config
from .connection import Connection, ConnectionStats
from .listeners import format_address, open_listeners_and_udp
from .netpoll import Netpoller
from .pipeline import Stage, stages_for
from .socketstream import EchoSocketStream, tune
from .udp import UdpEcho

__all__ = ["DURATION_BUCKETS_S", "DurationHistogram", "Server", "ServerStatistics", "serve"]

_log = structlog.get_logger("echosvc")

# Upper bounds of the connection-duration histogram, in seconds: from a
# health check's round trip to an idle client held for the 300 s default
# read timeout and beyond (Prometheus' convention: cumulative, then +Inf).
DURATION_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)  # fmt: skip

# accept(2) errors meaning "the system is out of something": the queued
# connection is still there, so retry later (trio.serve_listeners' list).
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

# accept(2) errors that concern only the connection being accepted -- it died
# in the backlog -- so the next accept is fine. This is trio.SocketListener's
# list (see the literature review in trio/_highlevel_socket.py); we call
# accept() on the socket ourselves because SocketListener.accept() discards
# the peer address, which we log even when the peer has already reset.
_IGNORABLE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ENOSR",
        "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT",
        "ETIMEDOUT",
        "ECONNRESET",
    )
    if hasattr(errno, name)
)

_TASK_NAME = "echosvc connection"

# Go's http.Server: "if max := 1 * time.Second; tempDelay > max".
_FIRST_BACKOFF_S = 0.005
_MAX_BACKOFF_S = 1.0

# Accepts per wake-up of an accept loop (the listen backlog is 4096 at most).
_ACCEPT_BATCH = 64


@contextlib.contextmanager
def _nonblocking_accept(
    listener: trio.socket.SocketType,
) -> Iterator[Callable[[], tuple[socket.socket, Any]]]:
    """The listener's plain ``accept``, non-blocking, for the accept loop.

    `trio.socket`'s ``accept`` is a checkpoint and wraps each new socket in a
    `trio.socket.SocketType` that the stream unwraps again; the loop waits for
    readability itself and needs neither. The listener is tuned here once, so
    accepted sockets inherit the options (tcp(7)). The stdlib socket shares
    the descriptor (no dup: a listener costs one descriptor) and is detached,
    not closed, when the loop ends; the listener still closes it.
    """
    sock = socket.socket(listener.family, listener.type, listener.proto, fileno=listener.fileno())
    try:
        tune(sock)
        sock.setblocking(False)
        yield sock.accept
    finally:
        sock.detach()


@attrs.frozen
class DurationHistogram:
    """How long closed connections lasted, as a cumulative histogram.

    Attributes:
      buckets: ``(upper_bound_s, count)`` pairs, counts cumulative (closed
          connections that lasted at most that long), the last bound
          ``math.inf``: Prometheus' ``le`` buckets.
      count: connections observed (the ``+Inf`` bucket).
      sum_s: their durations added up, in seconds.

    """

    buckets: tuple[tuple[float, int], ...]
    count: int
    sum_s: float


@attrs.frozen
class ServerStatistics:
    """A snapshot of a server's counters.

    Attributes:
      active: connections being served now.
      served: connections that have been served and closed.
      limit: ``max_connections``.
      accepting: ``False`` once shutdown has begun.
      accepted: connections accepted since the server started.
      closed: closed connections by ``reason`` (every `CloseReason` value is
          a key, from 0).
      lines: lines echoed, over all closed connections.
      bytes_in: echo payload received, over all closed connections.
      bytes_out: echo payload sent, over all closed connections.
      accept_failures: ``accept()`` calls that failed for want of
          descriptors or memory (each retry counts).
      duration: a `DurationHistogram` of closed connections.

    """

    active: int
    served: int
    limit: int
    accepting: bool
    accepted: int = 0
    closed: Mapping[str, int] = attrs.field(factory=dict, hash=False)
    lines: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    accept_failures: int = 0
    duration: DurationHistogram = DurationHistogram((), 0, 0.0)


class Tally:
    """A server's running totals, added to once per closed connection."""

    __slots__ = (
        "accept_failures",
        "accepted",
        "bytes_in",
        "bytes_out",
        "closed",
        "duration_counts",
        "duration_sum",
        "lines",
    )

    def __init__(self) -> None:
        self.accepted = 0
        self.accept_failures = 0
        self.closed = dict.fromkeys((reason.value for reason in CloseReason), 0)
        self.lines = 0
        self.bytes_in = 0
        self.bytes_out = 0
        # One count per bucket of DURATION_BUCKETS_S, and one past the last.
        self.duration_counts = [0] * (len(DURATION_BUCKETS_S) + 1)
        self.duration_sum = 0.0

    def record(self, stats: ConnectionStats) -> None:
        self.closed[stats.reason.value] += 1
        self.lines += stats.lines
        self.bytes_in += stats.bytes_in
        self.bytes_out += stats.bytes_out
        self.duration_counts[bisect.bisect_left(DURATION_BUCKETS_S, stats.duration_s)] += 1
        self.duration_sum += stats.duration_s

    def histogram(self) -> DurationHistogram:
        cumulative = list(itertools.accumulate(self.duration_counts))
        bounds = (*DURATION_BUCKETS_S, float("inf"))
        return DurationHistogram(
            buckets=tuple(zip(bounds, cumulative, strict=True)),
            count=cumulative[-1],
            sum_s=self.duration_sum,
        )


class Server:
    """A running echo server; what ``await nursery.start(serve, config)`` returns.

    Attributes:
      listeners: the `trio.SocketListener` objects being served.
      udp: the UDP echo and its counters (`echosvc.udp.UdpEcho`), or None.

    """

    def __init__(
        self,
        config: Config,
        listeners: Sequence[trio.SocketListener],
        stages: Sequence[Stage] | None = None,
        udp_sockets: Sequence[socket.socket] = (),
    ) -> None:
        self.config = config
        self.listeners = list(listeners)
        self.stages = tuple(stages_for(config) if stages is None else stages)
        self.udp = UdpEcho(udp_sockets, config) if udp_sockets else None
        self._tally = Tally()
        self._netpoller = Netpoller()
        # One bound method for every connection, not one each.
        self._on_connection_closed = self._connection_closed
        self._limiter = trio.CapacityLimiter(config.max_connections)
        # A dict as an ordered set: at 10,000 members a set's table costs
        # about 105 bytes a member, a dict's about 33 (CPython 3.11).
        self._connections: dict[Connection, None] = {}
        self._ids = itertools.count(1)
        self._served = 0
        self._accept_scope = trio.CancelScope()
        self._handlers_scope: trio.CancelScope | None = None
        self._stopping = False
        self._at_capacity = False
        self._paused_since: float | None = None
        self._failures_in_episode = 0

    @property
    def addresses(self) -> list[str]:
        """Every listening address as ``"host:port"`` (``"[::1]:port"`` for IPv6).

        UDP echo addresses follow, as ``"udp://host:port"``.
        """
        udp = self.udp.addresses if self.udp is not None else []
        return [format_address(listener.socket.getsockname()) for listener in self.listeners] + udp

    @property
    def port(self) -> int:
        """The port of the first listener (all share it when ``serve`` bound them)."""
        if not self.listeners and self.udp is not None:  # UDP alone, socket-activated
            udp_port: int = self.udp.sockets[0].getsockname()[1]
            return udp_port
        port: int = self.listeners[0].socket.getsockname()[1]
        return port

    def statistics(self) -> ServerStatistics:
        """Return a frozen snapshot of the server's counters."""
        tally = self._tally
        return ServerStatistics(
            active=int(self._limiter.borrowed_tokens),
            served=self._served,
            limit=self.config.max_connections,
            accepting=not self._stopping,
            accepted=tally.accepted,
            closed=MappingProxyType(dict(tally.closed)),
            lines=tally.lines,
            bytes_in=tally.bytes_in,
            bytes_out=tally.bytes_out,
            accept_failures=tally.accept_failures,
            duration=tally.histogram(),
        )

    def shutdown(self) -> None:
        """Begin a graceful shutdown; `serve` returns when it is complete.

        Listeners close at once. Connections waiting for input echo what they
        have received, their unfinished line included, and close (reason
        ``shutdown``); a connection in the middle of an echo may finish it.
        After ``shutdown_grace`` seconds everything left is cancelled.
        Idempotent. Call it from the Trio thread (from another thread, use
        ``trio.from_thread.run_sync(server.shutdown)``).
        """
        if self._stopping:
            return
        self._stopping = True
        self._accept_scope.cancel()
        for connection in self._connections:
            connection.stop()
        assert self._handlers_scope is not None, "shutdown() before serve() started"
        self._handlers_scope.deadline = trio.current_time() + self.config.shutdown_grace

    async def _run(self, task_status: trio.TaskStatus[Server]) -> None:
        try:
            # The netpoller outlives every connection that waits through it,
            # and its failure cancels them all and is serve()'s error.
            async with trio.open_nursery() as system:
                system.start_soon(self._netpoller.run, name="echosvc netpoller")
                async with trio.open_nursery() as handlers:
                    self._handlers_scope = handlers.cancel_scope
                    with self._accept_scope:
                        async with trio.open_nursery() as accepting:
                            for listener in self.listeners:
                                accepting.start_soon(self._accept_loop, listener, handlers)
                            if self.udp is not None:  # stops with accepting, at once
                                accepting.start_soon(self.udp.serve)
                            task_status.started(self)
                    # Listeners close at once; connections drain in `handlers`.
                    self._close_listeners()
                system.cancel_scope.cancel()
        finally:
            self._close_listeners()

    def _close_listeners(self) -> None:
        for listener in self.listeners:
            listener.socket.close()
        if self.udp is not None:
            self.udp.close()

    async def _accept_loop(self, listener: trio.SocketListener, handlers: trio.Nursery) -> None:
        with _nonblocking_accept(listener.socket) as accept:
            await self._accept_batches(listener.socket, accept, handlers)

    async def _accept_batches(
        self,
        sock: trio.socket.SocketType,
        accept: Callable[[], tuple[socket.socket, Any]],
        handlers: trio.Nursery,
    ) -> None:
        limiter = self._limiter
        delay = _FIRST_BACKOFF_S
        while True:
            await trio.lowlevel.wait_readable(sock)
            token: object | None = object()
            if not limiter.available_tokens and not self._at_capacity:
                self._at_capacity = True
                _log.warning(
                    "capacity_reached", active=limiter.borrowed_tokens, limit=limiter.total_tokens
                )
            await limiter.acquire_on_behalf_of(token)
            # Up to a batch of accepts per wake-up, as Go's accept loop takes
            # what the backlog holds: one readiness wait and one trip through
            # the scheduler serve many connections in a flood. Each accept
            # holds a token of its own, taken before it, so capacity stays
            # exact.
            failure: OSError | None = None
            accepted = 0
            try:
                for _ in range(_ACCEPT_BATCH):
                    try:
                        conn_sock, addr = accept()
                    except BlockingIOError:
                        break  # the backlog is empty: wait for the next edge
                    except OSError as exc:
                        if exc.errno in _IGNORABLE_ERRNOS:
                            continue
                        if exc.errno not in _CAPACITY_ERRNOS:
                            raise
                        failure = exc
                        break
                    accepted += 1
                    self._tally.accepted += 1
                    if self._paused_since is not None:
                        self._note_accept_resumed()
                    ticket, token = token, None
                    self._start(conn_sock, addr, ticket, handlers)
                    if not limiter.available_tokens:
                        break  # at capacity: the next wait logs it and blocks
                    token = object()
                    limiter.acquire_on_behalf_of_nowait(token)
            finally:
                if token is not None:
                    limiter.release_on_behalf_of(token)
            if failure is None:
                delay = _FIRST_BACKOFF_S
                continue
            if accepted:
                # Out of descriptors mid-batch: the connections just accepted
                # hold them, and in a flood most of the backlog is clients
                # that close at their first read. Let them run and retry soon;
                # only a failure with nothing accepted is an episode.
                self._tally.accept_failures += 1
                await trio.sleep(_FIRST_BACKOFF_S)
                continue
            # Out of descriptors or memory; the connection is still queued.
            # (The sleep is outside the except block so that a cancellation
            # arriving during it cannot be mistaken for the accept error.)
            self._note_accept_failure(failure, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, _MAX_BACKOFF_S)

    def _start(self, sock: socket.socket, addr: Any, token: object, handlers: trio.Nursery) -> None:
        """Hand an accepted socket to a new handler task; the token comes back
        with the connection in `_connection_closed`, however it ends."""
        try:
            # Accepted sockets inherit the listener's options (_nonblocking_accept).
            stream = EchoSocketStream(sock, self._netpoller, tuned=True)
        except trio.ClosedResourceError:
            # The netpoller has stopped, so the server is going down (its
            # failure is serve()'s error): this connection goes with it.
            self._discard(sock, token)
            return
        except BaseException:
            self._discard(sock, token)
            raise
        connection = Connection(
            stream,
            self.config,
            conn_id=next(self._ids),
            peer=format_address(addr),
            address=addr if self.stages else None,
            stages=self.stages,
            on_closed=self._on_connection_closed,
            ticket=token,
        )
        self._connections[connection] = None
        if self._stopping:  # accepted just as shutdown began
            connection.stop()
        # The task is the connection itself, no wrapper around it: a
        # suspended frame less for every idle connection. A constant name:
        # trio would format a new string per task.
        handlers.start_soon(connection.run, name=_TASK_NAME)

    def _discard(self, sock: socket.socket, token: object) -> None:
        sock.close()
        self._release(token)

    def _connection_closed(self, connection: Connection) -> None:
        assert connection.stats is not None
        self._tally.record(connection.stats)
        self._connections.pop(connection, None)
        self._served += 1
        self._release(connection.ticket)

    def _release(self, token: object) -> None:
        self._limiter.release_on_behalf_of(token)
        if self._at_capacity and self._limiter.available_tokens:
            self._at_capacity = False

    def _note_accept_failure(self, exc: OSError, delay: float) -> None:
        self._failures_in_episode += 1
        self._tally.accept_failures += 1
        if self._paused_since is None:
            self._paused_since = trio.current_time()
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            _log.warning("accept_paused", error=name, retry_in_s=delay)

    def _note_accept_resumed(self) -> None:
        assert self._paused_since is not None
        _log.info(
            "accept_resumed",
            paused_s=round(trio.current_time() - self._paused_since, 6),
            failures=self._failures_in_episode,
        )
        self._paused_since = None
        self._failures_in_episode = 0


async def serve(  # noqa: ASYNC128 -- Server._run calls started()
    config: Config,
    *,
    listeners: Sequence[trio.SocketListener] | None = None,
    stages: Sequence[Stage] | None = None,
    udp_sockets: Sequence[socket.socket] | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve echo on every configured address until shut down or cancelled.

    Use it with ``nursery.start``, which returns the `Server` handle once
    every listener is live::

        async with trio.open_nursery() as nursery:
            server: echosvc.Server = await nursery.start(echosvc.serve, config)
            print(server.addresses)
            ...
            server.shutdown()  # graceful; serve() returns when drained

    Args:
      config: an `echosvc.Config`.
      listeners: serve these instead of binding ``config.hosts``/``port``
          (socket activation, or sockets you opened yourself). ``serve`` takes
          ownership and closes them.
      stages: the `echosvc.pipeline.Stage` objects every connection passes
          through before its echo, in order; by default the ones ``config``
          asks for (`echosvc.pipeline.stages_for`).
      udp_sockets: bound UDP sockets to serve UDP echo on, besides those
          ``config.udp`` binds (one per listener address, only when
          ``listeners`` is not given). ``serve`` takes ownership of them too.
      task_status: for ``nursery.start``; receives the `Server`.

    Returns:
      After a graceful `Server.shutdown` has finished.

    Raises:
      echosvc.BindError: if a configured address cannot be bound; raised
          before ``nursery.start`` returns.
      echosvc.tls.TLSLoadError: the ``tls_*`` files cannot be used (a
          `ValueError`; its ``field`` names the option); raised before
          anything is bound.

    Resource handling:
      Cancelling the surrounding scope stops everything promptly: listeners
      and connections are closed, and no task outlives the call.

    """
    if stages is None:
        # Before binding: TLS files that cannot be used are the caller's error
        # before a port is taken.
        stages = stages_for(config)
    if listeners is None:
        listeners, bound_udp = await open_listeners_and_udp(config)
        udp_sockets = [*(udp_sockets or ()), *bound_udp]
    await Server(config, listeners, stages, udp_sockets or ())._run(task_status)
