"""One connection: echo what the peer sends, under deadlines, until a reason to stop.

This is the goroutine of the Go original. Go arms ``conn.SetReadDeadline``
before every ``ReadString('\\n')``; here the handler keeps the read deadline
of the line it is waiting for and a cancel scope enforces it:

* the deadline of the next line is armed when the previous line's echo has
  been handed to the kernel (or at accept), so the whole line must arrive in
  time and a trickling client is cut off;
* an echo runs under its own *write* deadline, so a client that never reads
  cannot pin the handler, and neither the read deadline nor a graceful
  shutdown cuts an echo in half: `Connection.stop` cancels the scope only
  while the handler is waiting for input, and otherwise lets the echo finish.

Arming a deadline per line costs a float: the cancel scope's own deadline
*lags*. Moving ``CancelScope.deadline`` costs a generator context manager
and a heap push in Trio's run loop, several microseconds -- a tenth of the
CPU an echo takes -- so after each echo only the handler's ``_read_deadline``
moves. When the scope's older deadline fires, the handler compares the clock
with the line's real deadline: if that is still ahead, it waits on under a
fresh scope armed at the real deadline (once per ``read_timeout`` at most,
and only for connections that kept sending); otherwise the line is late. A
cancelled wait for input loses nothing (Trio's receive is cancel-safe), so
the early wake-up is invisible and the deadline is exact.

When a scope catches its cancellation, what the handler was doing names the
reason, in one place (`Connection._reason_for_cancel`). Everything the peer
sends is echoed byte-exact; the framer (`echosvc.framing`) decides where lines
end and enforces the line limit, and several lines that arrive together leave
in one send.

The handler only ever uses the `trio.abc.Stream` interface, so it serves TLS
streams, memory streams and anything else as well as TCP sockets; with the
server's own `EchoSocketStream` it hands the echo to the kernel without a
trip through the scheduler.
"""

from __future__ import annotations

import math

import attrs
import structlog
import trio

from .config import CloseReason, Config, Mode, seconds_or_never
from .framing import LineFramer
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


@attrs.frozen
class ConnectionStats:
    """What one connection did: the fields of the ``connection_closed`` event."""

    conn_id: int | None
    peer: str | None
    reason: CloseReason
    lines: int
    bytes_in: int
    bytes_out: int
    duration_s: float


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

    """

    # Ten thousand idle connections are ten thousand of these.
    __slots__ = (
        "_config",
        "_read_deadline",
        "_read_s",
        "_scope",
        "_send_nowait",
        "_stopping",
        "_stream",
        "_write_s",
        "_writing",
        "bytes_in",
        "bytes_out",
        "conn_id",
        "lines",
        "peer",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        config: Config,
        *,
        conn_id: int | None = None,
        peer: str | None = None,
    ) -> None:
        self._stream = stream
        self._config = config
        self.conn_id = conn_id
        self.peer = peer
        self.lines = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._read_s = seconds_or_never(config.read_timeout)
        self._write_s = seconds_or_never(config.write_timeout)
        self._read_deadline = math.inf
        # The server's own sockets can take an echo without a trip through
        # the scheduler or a deadline: see echosvc.socketstream.
        self._send_nowait = stream.send_nowait if isinstance(stream, EchoSocketStream) else None
        # The scope exists before run() so that stop() works at any time.
        self._scope = trio.CancelScope()
        self._writing = False
        self._stopping = False

    def stop(self) -> None:
        """Close gracefully: finish the echo under way, echo every byte already
        received (the unfinished line included), then close with reason
        ``shutdown``. Idempotent, and safe to call before `run` starts.
        """
        self._stopping = True
        if not self._writing:
            self._scope.cancel()

    async def run(self) -> ConnectionStats:
        """Echo until the peer leaves, a deadline or limit fires, or `stop`.

        Returns:
          The connection's `ConnectionStats`, also logged as
          ``connection_closed``.

        Raises:
          trio.Cancelled: if the surrounding scope was cancelled (the server's
              shutdown grace ran out); logged with reason ``shutdown``.

        An unexpected exception is logged with its traceback (reason
        ``error``) and not re-raised: one connection's failure must not take
        down whoever runs the others.

        Resource handling:
          The stream is always closed before this returns or raises.

        """
        # Not kept in a local: a logger held for the life of every idle
        # connection is memory spent on nothing.
        structlog.get_logger("echosvc").debug(
            "connection_opened", conn_id=self.conn_id, peer=self.peer
        )
        started = ended = trio.current_time()
        reason = CloseReason.ERROR
        error: Exception | None = None
        try:
            try:
                reason = await self._echo()
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
            if reason in _GRACEFUL:
                # Bounded: a peer may neither read nor stop sending, and a TLS
                # close_notify can block on a peer that stopped reading.
                with trio.move_on_after(min(self._write_s, LINGER_S)):
                    if reason is not CloseReason.EOF:
                        await self._linger()
                    await self._stream.aclose()
        finally:
            # A no-op if closed politely. It closes the socket before its
            # checkpoint, which re-raises a cancellation from outside: the
            # record is written either way.
            try:
                await trio.aclose_forcefully(self._stream)
            finally:
                stats = self._closed(reason, round(ended - started, 6), error)
        return stats

    def _closed(
        self, reason: CloseReason, duration_s: float, error: Exception | None
    ) -> ConnectionStats:
        # Logged once the stream is closed, not before: whoever reads
        # connection_closed may rely on the socket being gone and on the
        # server no longer counting it.
        stats = ConnectionStats(
            conn_id=self.conn_id,
            peer=self.peer,
            reason=reason,
            lines=self.lines,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            duration_s=duration_s,
        )
        log = structlog.get_logger("echosvc")
        if error is None:
            log.info("connection_closed", **attrs.asdict(stats))
        else:
            log.error("connection_closed", **attrs.asdict(stats), exc_info=error)
        return stats

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
        try:
            await stream.send_eof()
            while await stream.receive_some(RECEIVE_SIZE):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer is gone: nothing left to protect

    async def _echo(self) -> CloseReason:
        stream, send_nowait = self._stream, self._send_nowait
        framer = LineFramer(self._config.max_line_bytes) if self._config.mode is Mode.LINE else None
        read_s = self._read_s
        reason: CloseReason | None = None
        self._read_deadline = trio.current_time() + read_s
        while reason is None:
            scope = self._scope
            scope.deadline = self._read_deadline
            with scope:
                while True:
                    data = await stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        reason = CloseReason.EOF
                        break
                    self.bytes_in += len(data)
                    batch = data if framer is None else framer.feed(data)
                    if batch:
                        sent = send_nowait(batch) if send_nowait else 0
                        if sent < len(batch):
                            await self._send_rest(batch, sent)
                        self.bytes_out += len(batch)
                        if framer is not None:
                            self.lines += batch.count(b"\n")
                        if self._stopping:
                            reason = CloseReason.SHUTDOWN
                            break
                        # SetReadDeadline for the next line (stream mode: an
                        # idle timeout). The scope catches up lazily.
                        self._read_deadline = trio.current_time() + read_s
                    if framer is not None and framer.too_long:
                        reason = CloseReason.LINE_TOO_LONG
                        break
            if scope.cancelled_caught:
                reason = self._reason_for_cancel()
                if reason is None:  # the scope's deadline lagged behind the line's
                    self._scope = trio.CancelScope()
        if framer is not None and reason in (CloseReason.EOF, CloseReason.SHUTDOWN):
            return await self._finish(framer.flush(), reason)
        # After a read timeout Go's ReadString hands back the unfinished line
        # with the error and the handler returns: the fragment is not echoed.
        return reason

    async def _send_rest(self, data: bytes | bytearray, sent: int) -> None:
        """Send ``data[sent:]``, waiting as needed, under the write deadline."""
        self._writing = True
        self._scope.deadline = trio.current_time() + self._write_s
        await self._stream.send_all(memoryview(data)[sent:] if sent else data)
        self._writing = False
        if self._write_s > self._read_s:
            # The scope may lag behind the next line's deadline, never pass it.
            self._scope.deadline = trio.current_time() + self._read_s

    def _reason_for_cancel(self) -> CloseReason | None:
        """Name what cancelled the connection's scope; None if nothing did yet."""
        if self._writing:
            return CloseReason.WRITE_TIMEOUT
        if self._stopping:
            return CloseReason.SHUTDOWN
        if trio.current_time() < self._read_deadline:
            return None
        return CloseReason.READ_TIMEOUT

    async def _finish(self, rest: bytes, reason: CloseReason) -> CloseReason:
        """Echo the final unterminated line, if any, under the write deadline."""
        if not rest:
            return reason
        self._writing = True
        with trio.move_on_after(self._write_s) as scope:
            await self._stream.send_all(rest)
        if scope.cancelled_caught:
            return CloseReason.WRITE_TIMEOUT
        self.bytes_out += len(rest)
        self.lines += 1
        return reason


async def handle_stream(
    stream: trio.abc.Stream,
    config: Config,
    *,
    conn_id: int | None = None,
    peer: str | None = None,
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

    Returns:
      `ConnectionStats`: why the connection closed and what it carried.

    Raises:
      trio.Cancelled: if the caller's scope is cancelled.

    Resource handling:
      ``stream`` is closed before this returns or raises.

    """
    return await Connection(stream, config, conn_id=conn_id, peer=peer).run()
