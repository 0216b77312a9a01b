"""One connection: its pipeline stages, then the echo, until a reason to stop.

This is the goroutine of the Go original. Go arms ``conn.SetReadDeadline``
before every ``ReadString('\\n')``; here each deadline and each stop request
has exactly one owner, and when a wait is cancelled the owner that fired
first names the reason (`Connection._cause`). Nothing is inferred from what
the handler happened to be doing when it noticed.

The owners:

* **the read deadline** is a float, ``deadline``: the time by which the next
  whole line must have arrived, armed at accept and again each time an echo
  has been handed to the kernel. The handler waits for input inside a *wait
  scope*, a `trio.CancelScope` that both the read deadline and `stop` may
  cancel.
* **`stop`** records when it was asked (``_stop_at``) and cancels the wait
  scope if there is one. It cancels only a wait for input: an echo under way
  is outside any wait scope and is never cut by it.
* **the write deadline** is a scope of its own around the slow rest of each
  echo, outside the wait scope, so it covers only the echo it was armed for.
* **the caller** (the server's shutdown grace, or whoever runs us) cancels
  from outside: reason ``shutdown``, and the exception propagates.

The fast path. With the server's own `EchoSocketStream`, an echo is first
offered to the kernel with the synchronous ``send_nowait``, which is not a
checkpoint and nearly always takes everything; only a rest that did not fit
leaves the wait scope and is sent under the write deadline. So in steady
state one wait scope serves many lines and its own deadline *lags*: moving
``CancelScope.deadline`` after every echo costs a heap push in Trio's run
loop, several microseconds, so only the float moves. When the scope's older
deadline fires, `_cause` finds the real deadline still ahead and names
nothing; the handler waits on under a fresh scope armed at the real deadline
(once per ``read_timeout`` at most, and only for connections that kept
sending). A cancelled scope is never reused. A cancelled receive loses
nothing (Trio's receives are cancel-safe), so the early wake-up is invisible.

Exactness under any interleaving, which the tests sweep:

* Trio delivers I/O and expired deadlines in the same scheduler pass, and a
  task woken by I/O keeps its data even if a cancel arrives before it runs:
  the line is handled first and the pending cancel is taken at the next wait,
  where `_cause` compares the deadline with the clock *after* the echo
  re-armed it. A line that arrived before its deadline is echoed.
* A stop that lands while data is arriving lets the handler echo what it
  received (the echo is outside the wait scope), then closes with
  ``shutdown``. What the kernel had already received when the stop is handled
  is echoed too (`_drain`, on socket streams), and the unfinished line last.
* The stop and the deadline are compared by time: the earlier names the
  reason; at a tie the deadline does, since it was armed first.

Closing. After ``eof``, ``shutdown``, ``line_too_long`` and ``read_timeout``
the stream is closed politely, bounded in time; anything else, and any
connection a stage refused, is closed the hard way. Errors while closing are
contained: a close cannot take down whoever runs the connection.

The handler only ever uses the `trio.abc.Stream` interface, so it serves TLS
streams, memory streams and anything else as well as TCP sockets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import structlog
import trio

from .config import CloseReason, Config, Mode, seconds_or_never
from .framing import LineFramer
from .pipeline import Link, Refused, Stage
from .socketstream import EchoSocketStream

__all__ = ["Connection", "ConnectionStats", "handle_stream"]

# trio.SocketStream's own default: one receive can take a full 64 KiB
# segment train, so a pipelining client is served with few wakeups.
RECEIVE_SIZE = 65536

# How long a polite close waits for the peer to close its side (Apache's
# lingering close waits 2 s too); never longer than the write timeout.
LINGER_S = 2.0

# Reasons after which the stream is closed politely (a TLS close_notify, a
# FIN); after the others, or when cancelled, the peer is not listening, not
# there, or not to be waited for.
_GRACEFUL = frozenset(
    {CloseReason.EOF, CloseReason.SHUTDOWN, CloseReason.LINE_TOO_LONG, CloseReason.READ_TIMEOUT}
)

# One proxy for the module: structlog caches the bound logger on first use
# (cache_logger_on_first_use), where get_logger() per record would build one
# each time -- 5.6 us against 1.7 for a filtered debug record.
_log = structlog.get_logger("echosvc")


@attrs.frozen
class ConnectionStats:
    """What one connection did: the fields of the ``connection_closed`` event.

    ``extra`` holds the fields pipeline stages added (``proxy``,
    ``tls_version``...), as ``(name, value)`` pairs.
    """

    conn_id: int | None
    peer: str | None
    reason: CloseReason
    lines: int
    bytes_in: int
    bytes_out: int
    duration_s: float
    extra: tuple[tuple[str, str], ...] = ()


class Connection:
    """The echo protocol on one stream, and the handle to stop it gracefully.

    Most callers want `handle_stream`; a server that must stop its
    connections on shutdown keeps the `Connection` to call `stop`.

    Args:
      stream: any `trio.abc.Stream`. The connection takes ownership of it and
          closes it before `run` returns, whatever happens.
      config: the deadlines, the mode and the line limit.
      conn_id: identifies the connection in the logs.
      peer: the peer's ``"host:port"``, for the logs.
      address: the peer's socket address, for stages that need it.
      stages: `echosvc.pipeline.Stage` objects to run, in order, before the
          echo.
      on_closed: called with the connection once its stream is closed and
          its `stats` are set, before ``connection_closed`` is logged,
          however it ended (a server's tally and its capacity token).
      ticket: anything the caller wants back in ``on_closed`` (`ticket`).

    Attributes:
      stats: the `ConnectionStats`, once the connection has ended.
      ticket: what the caller passed as ``ticket``.

    """

    # Ten thousand idle connections are ten thousand of these.
    __slots__ = (
        "_address",
        "_config",
        "_fields",
        "_on_closed",
        "_origin",
        "_read_s",
        "_stages",
        "_stop_at",
        "_stream",
        "_waiting",
        "_write_s",
        "bytes_in",
        "bytes_out",
        "conn_id",
        "lines",
        "peer",
        "stats",
        "ticket",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        config: Config,
        *,
        conn_id: int | None = None,
        peer: str | None = None,
        address: tuple[Any, ...] | None = None,
        stages: Sequence[Stage] = (),
        on_closed: Callable[[Connection], None] | None = None,
        ticket: object = None,
    ) -> None:
        self._stream = self._origin = stream
        self._config = config
        self.conn_id = conn_id
        self.peer = peer
        self._address = address
        self._stages = stages
        self._on_closed = on_closed
        self.ticket = ticket
        self._fields: tuple[tuple[str, str], ...] = ()
        self.lines = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._read_s = seconds_or_never(config.read_timeout)
        self._write_s = seconds_or_never(config.write_timeout)
        self._stop_at: float | None = None
        self._waiting: trio.CancelScope | None = None
        self.stats: ConnectionStats | None = None

    def stop(self) -> None:
        """Close gracefully: finish the echo under way, echo every byte already
        received (the unfinished line included), then close with reason
        ``shutdown``. A connection still in a pipeline stage closes at once.
        Idempotent, and safe to call before `run` starts.
        """
        if self._stop_at is None:
            self._stop_at = trio.current_time()
        if self._waiting is not None:
            self._waiting.cancel()

    async def run(self) -> ConnectionStats:
        """Run the stages, then echo until the peer leaves, a deadline or limit
        fires, or `stop`.

        Returns:
          The connection's `ConnectionStats`, also logged as
          ``connection_closed``.

        Raises:
          trio.Cancelled: if the surrounding scope was cancelled (the server's
              shutdown grace ran out); logged with reason ``shutdown``.

        An unexpected exception is logged with its traceback (reason
        ``error``) and not re-raised, and so is one raised while closing: one
        connection's failure must not take down whoever runs the others.

        Resource handling:
          The stream is always closed before this returns or raises.

        """
        started = ended = trio.current_time()
        reason = CloseReason.ERROR
        error: Exception | None = None
        quiet = False
        # Idle connections are the many: nothing is kept for stages not there.
        opened: list[tuple[Stage, Link]] | tuple[()] = ()
        try:
            try:
                _log.debug("connection_opened", conn_id=self.conn_id, peer=self.peer)
                if self._stages:
                    opened = []
                    stream, pending = await self._open_stages(opened)
                else:
                    stream, pending = self._stream, b""
                reason = await self._echo(stream, pending)
            except Refused as refusal:
                reason, quiet = refusal.reason, refusal.quiet
                if refusal.detail:
                    self._fields += (("detail", refusal.detail),)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                reason = CloseReason.RESET
            except Exception as exc:  # noqa: BLE001 -- contained here, logged with its traceback
                reason, error = CloseReason.ERROR, exc
            except BaseException:
                reason = CloseReason.SHUTDOWN
                raise
            finally:
                # duration_s runs to the reason to close, not through a linger.
                ended = trio.current_time()
            # A stage's refusal leaves the stream in no state to be polite in
            # (a TLS handshake cut short would try to finish itself).
            if reason in _GRACEFUL and len(opened) == len(self._stages):
                error = await self._close_politely(reason) or error
        finally:
            try:
                # Closed at once, the stream the stages started from too (a
                # no-op if closed politely). aclose_forcefully closes before
                # its checkpoint, which re-raises a cancellation from outside;
                # the server's own sockets close synchronously, with none.
                for stream in self._streams():
                    try:
                        if isinstance(stream, EchoSocketStream):
                            stream.close()
                        else:
                            await trio.aclose_forcefully(stream)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    except Exception as exc:  # noqa: BLE001 -- logged with the record
                        error = error or exc
            finally:
                for stage, link in reversed(opened):
                    try:
                        stage.close(link)
                    except Exception as exc:  # noqa: BLE001 -- a stage's bug, logged
                        error = error or exc
                stats = self._closed(reason, round(ended - started, 6), error, quiet)
        return stats

    # --- the pipeline -----------------------------------------------------------

    async def _open_stages(self, opened: list[tuple[Stage, Link]]) -> tuple[trio.abc.Stream, bytes]:
        link = Link(self._stream, self.peer, self._address)
        for stage in self._stages:
            deadline = trio.current_time() + seconds_or_never(stage.timeout)
            with self._wait_scope(deadline) as scope:
                link = await stage.open(link)
            self._waiting = None
            if scope.cancelled_caught:
                reason = self._cause(deadline, stage.timeout_reason)
                assert reason is not None, "a stage's scope has no lagging deadline"
                raise Refused(reason)
            # The connection owns whatever stream the stage handed on.
            self._stream, self.peer, self._fields = link.stream, link.peer, link.fields
            opened.append((stage, link))
        return link.stream, link.pending

    # --- the echo ---------------------------------------------------------------

    async def _echo(self, stream: trio.abc.Stream, pending: bytes) -> CloseReason:
        framer = LineFramer(self._config.max_line_bytes) if self._config.mode is Mode.LINE else None
        # The server's own sockets take an echo without a checkpoint, and are
        # waited on without a frame of their own (EchoSocketStream.wait_readable).
        sock = stream if isinstance(stream, EchoSocketStream) else None
        read_s = self._read_s
        deadline = trio.current_time() + read_s
        while True:
            reason: CloseReason | None = None
            rest: bytes | bytearray = b""
            data: bytes | bytearray
            batch: bytes | bytearray
            sent = 0
            with self._wait_scope(deadline) as scope:
                while True:
                    if pending:
                        data, pending = pending, b""
                    elif sock is None:
                        # Drop the last buffers before waiting: idle
                        # connections are the many, and would each hold one.
                        data = batch = b""
                        data = await stream.receive_some(RECEIVE_SIZE)
                    else:  # sock.receive_some, with no frame of its own
                        data = batch = b""
                        if sock.known_readable:
                            await trio.lowlevel.checkpoint()  # a receive is a schedule point
                        else:
                            await trio.lowlevel.checkpoint_if_cancelled()
                            await sock.wait_readable()
                        got = sock.receive_nowait(RECEIVE_SIZE)
                        if got is None:
                            continue  # readable, then not: wait again
                        data, got = got, None
                    if not data:
                        reason = CloseReason.EOF
                        break
                    self.bytes_in += len(data)
                    batch = data if framer is None else framer.feed(data)
                    if batch:
                        sent = sock.send_nowait(batch) if sock is not None else 0
                        if sent < len(batch):
                            rest = batch  # the slow rest is sent outside this scope
                            break
                        self._count(batch, framer)
                        # SetReadDeadline for the next line (stream mode: an
                        # idle timeout). The scope's own deadline lags.
                        deadline = trio.current_time() + read_s
                    if framer is not None and framer.too_long:
                        reason = CloseReason.LINE_TOO_LONG
                        break
            self._waiting = None
            if scope.cancelled_caught:
                reason = self._cause(deadline, CloseReason.READ_TIMEOUT)
                if reason is None:  # the scope's older deadline: wait on under a fresh one
                    continue
            elif rest:
                if not await self._send_rest(stream, rest, sent):
                    return CloseReason.WRITE_TIMEOUT
                self._count(rest, framer)
                deadline = trio.current_time() + read_s
                if framer is not None and framer.too_long:
                    reason = CloseReason.LINE_TOO_LONG
            if reason is not None:
                break
        if reason is CloseReason.SHUTDOWN and isinstance(stream, EchoSocketStream):
            reason = await self._drain(stream, framer)
        if framer is not None and reason in (CloseReason.EOF, CloseReason.SHUTDOWN):
            # Go drops a final line without "\n" at EOF; we echo every byte.
            final = framer.flush()
            if final:
                if not await self._send(stream, final):
                    return CloseReason.WRITE_TIMEOUT
                self.bytes_out += len(final)
                self.lines += 1
        # After a read timeout Go's ReadString hands back the unfinished line
        # with the error and the handler returns: the fragment is not echoed.
        return reason

    def _wait_scope(self, deadline: float) -> trio.CancelScope:
        """A scope for one wait for input, cancelled by ``deadline`` or `stop`."""
        scope = self._waiting = trio.CancelScope(deadline=deadline)
        if self._stop_at is not None:
            scope.cancel()
        return scope

    def _cause(self, deadline: float, deadline_reason: CloseReason) -> CloseReason | None:
        """Name what cancelled a wait scope: its deadline or a stop, whichever
        came first (the deadline at a tie); None if neither has happened yet
        (a lagging scope fired early)."""
        stop_at = self._stop_at
        if deadline <= trio.current_time() and (stop_at is None or deadline <= stop_at):
            return deadline_reason
        if stop_at is not None:
            return CloseReason.SHUTDOWN
        return None

    def _count(self, batch: bytes | bytearray, framer: LineFramer | None) -> None:
        self.bytes_out += len(batch)
        if framer is not None:
            self.lines += batch.count(b"\n")

    async def _send_rest(self, stream: trio.abc.Stream, data: bytes | bytearray, sent: int) -> bool:
        """Send ``data[sent:]`` under the write deadline; False if it fired."""
        with trio.move_on_after(self._write_s) as scope:
            await stream.send_all(memoryview(data)[sent:] if sent else data)
        return not scope.cancelled_caught

    async def _send(self, stream: trio.abc.Stream, data: bytes | bytearray) -> bool:
        """One whole echo under the write deadline; False if it fired."""
        sent = stream.send_nowait(data) if isinstance(stream, EchoSocketStream) else 0
        return sent == len(data) or await self._send_rest(stream, data, sent)

    async def _drain(self, stream: EchoSocketStream, framer: LineFramer | None) -> CloseReason:
        """On a stop: echo what the kernel had already received, as if it had
        been read before the stop, and say why to close.

        Bounded by what was queued when the stop was handled, so a client
        sending as fast as we echo cannot keep a stopping connection alive.
        """
        budget = stream.queued_bytes()
        while budget > 0:
            data = stream.receive_nowait(RECEIVE_SIZE)
            if data is None:
                break
            if not data:
                return CloseReason.EOF
            budget -= len(data)
            self.bytes_in += len(data)
            batch = data if framer is None else framer.feed(data)
            if batch:
                if not await self._send(stream, batch):
                    return CloseReason.WRITE_TIMEOUT
                self._count(batch, framer)
            if framer is not None and framer.too_long:
                return CloseReason.LINE_TOO_LONG
        return CloseReason.SHUTDOWN

    # --- closing ----------------------------------------------------------------

    async def _close_politely(self, reason: CloseReason) -> Exception | None:
        """Close after the echo: a lingering close, then ``aclose``, bounded.

        Bounded: a peer may neither read nor stop sending, and a TLS
        close_notify can block on a peer that stopped reading. A peer that
        vanished meanwhile is no error; anything else unexpected is returned,
        to be logged.
        """
        stream = self._stream
        if reason is CloseReason.EOF and isinstance(stream, EchoSocketStream):
            # The peer has sent all it will and every byte was read, so a
            # plain close() sends our FIN, not a RST: nothing to wait for,
            # and no scope or scheduler trip per short connection.
            stream.close()
            return None
        try:
            with trio.move_on_after(min(self._write_s, LINGER_S)):
                if reason is not CloseReason.EOF:
                    await self._linger()
                await self._stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer is gone: the hard close below is all that is left
        except Exception as exc:  # noqa: BLE001 -- returned, and logged with the record
            return exc
        return None

    async def _linger(self) -> None:
        """Close our side, then discard input until the peer closes its own.

        Closing a TCP socket whose receive queue is not empty sends a RST
        instead of a FIN, and the peer's kernel then throws away whatever of
        our last echo it had not yet handed to the application -- bytes the
        log already counts as sent. After ``line_too_long``, ``read_timeout``
        or ``shutdown`` there may well be unread input, so, like Apache's
        lingering close: ``send_eof()`` (the echo, then a FIN), then read and
        drop until EOF, for at most ``LINGER_S``.
        """
        stream = self._stream
        if not isinstance(stream, trio.abc.HalfCloseableStream):
            return
        await stream.send_eof()
        while await stream.receive_some(RECEIVE_SIZE):
            pass

    def _streams(self) -> list[trio.abc.Stream]:
        """The stream to close, and the one it was wrapped around, if a stage did."""
        if self._origin is self._stream:
            return [self._stream]
        return [self._stream, self._origin]

    def _closed(
        self, reason: CloseReason, duration_s: float, error: Exception | None, quiet: bool
    ) -> ConnectionStats:
        # Logged once the stream is closed, not before: whoever reads
        # connection_closed may rely on the socket being gone and on the
        # server no longer counting it.
        stats = self.stats = ConnectionStats(
            conn_id=self.conn_id,
            peer=self.peer,
            reason=reason,
            lines=self.lines,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            duration_s=duration_s,
            extra=self._fields,
        )
        if self._on_closed is not None:
            self._on_closed(self)
        record = {
            "conn_id": stats.conn_id,
            "peer": stats.peer,
            "reason": reason.value,
            "lines": stats.lines,
            "bytes_in": stats.bytes_in,
            "bytes_out": stats.bytes_out,
            "duration_s": duration_s,
            **dict(stats.extra),
        }
        if error is not None:
            _log.error("connection_closed", **record, exc_info=error)
        elif quiet:
            _log.debug("connection_closed", **record)
        else:
            _log.info("connection_closed", **record)
        return stats


async def handle_stream(
    stream: trio.abc.Stream,
    config: Config,
    *,
    conn_id: int | None = None,
    peer: str | None = None,
    stages: Sequence[Stage] = (),
) -> ConnectionStats:
    """Serve the echo protocol on ``stream`` until the connection ends.

    Works on any `trio.abc.Stream`: a `trio.SocketStream`, a
    `trio.SSLStream`, a `trio.testing.memory_stream_pair` end. Behaviour
    follows ``config`` exactly as for connections accepted by `echosvc.serve`:
    mode, read and write deadlines, line limit, end-of-input flush.

    Args:
      stream: the stream to serve. Ownership passes to this function.
      config: an `echosvc.Config`.
      conn_id: optional identifier, logged with the connection's events.
      peer: optional peer address, logged with the connection's events.
      stages: `echosvc.pipeline.Stage` objects to run before the echo.

    Returns:
      `ConnectionStats`: why the connection closed and what it carried.

    Raises:
      trio.Cancelled: if the caller's scope is cancelled.

    Resource handling:
      ``stream`` is closed before this returns or raises; any exception
      other than a cancellation is contained and logged.

    """
    return await Connection(stream, config, conn_id=conn_id, peer=peer, stages=stages).run()
