"""The stream the server wraps around the connections it accepts.

`trio.SocketStream` is correct for every use, and pays for it on each call
(trio/_highlevel_socket.py, trio/_socket.py: ``_nonblocking_helper``):

* ``receive_some`` tries ``recv()`` first and only then waits for the socket
  to become readable. In request/response traffic the peer has not answered
  yet when the echo loop reads again, so the first ``recv()`` fails with
  EAGAIN: a wasted syscall and a raised ``BlockingIOError`` per line.
* ``send_all`` yields to the scheduler after every send, even when the kernel
  took every byte at once -- a full trip through the run loop per echo.
* both go through two async context managers and a generator-based one that
  translates ``OSError`` into ``BrokenResourceError``.

`EchoSocketStream` is the same contract with the cheap path taken:
``receive_some`` waits for readability first and then reads once (in
pipelined traffic data is usually there and the wait returns at the next
scheduler pass); `send_nowait` hands the kernel what it will take without
blocking, which for an echo is nearly always everything; errors are mapped
with a plain ``except``. Each call to ``receive_some`` is still a full
checkpoint, so an echo loop that reads after every echo yields once per
iteration, and ``send_all`` still waits (and is cancellable) when the
socket is full. Like `trio.SocketStream` it sets ``TCP_NODELAY`` and
``TCP_NOTSENT_LOWAT`` (16 KiB: a peer that stops reading costs at most that
much unsent data in the kernel before the write deadline is what waits).

Given a `echosvc.netpoll.Netpoller`, the stream registers its socket there
once, edge-triggered, and waits through it instead of Trio's per-wait
``EPOLLONESHOT`` registration (see that module). Readiness is then a flag the
kernel's answers keep honest: a short or ``EAGAIN`` ``recv`` uses it up, as
does a ``send`` that did not take everything. A receive on a socket already
known readable is still a checkpoint (it yields to the scheduler first), so a
client that never stops sending cannot starve the other connections.
"""

from __future__ import annotations

import array
import errno
import fcntl
import socket
import termios
from collections.abc import Awaitable
from contextlib import suppress

import trio

from .netpoll import Netpoller, Registration

__all__ = ["EchoSocketStream", "tune"]

# trio.SocketStream's value (python-trio/trio#72).
NOTSENT_LOWAT = 2**14

_CLOSED_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})


def tune(sock: socket.socket) -> None:
    """Set ``TCP_NODELAY`` and ``TCP_NOTSENT_LOWAT`` as `trio.SocketStream` does.

    On a listener, accepted sockets inherit both (tcp(7)), which saves two
    ``setsockopt`` calls per connection; errors (``AF_UNIX``) are ignored.
    """
    with suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if hasattr(socket, "TCP_NOTSENT_LOWAT"):
        with suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)


def _translate(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    broken = trio.BrokenResourceError(f"socket connection broken: {exc}")
    broken.__cause__ = exc
    return broken


class EchoSocketStream(trio.abc.HalfCloseableStream):
    """A connected TCP socket as a Trio stream, tuned for an echo loop.

    Args:
      sock: a connected stream socket; the stream takes ownership and makes
          it non-blocking.
      poller: wait through this `Netpoller` rather than Trio's own I/O.
      tuned: the socket already has the options `tune` sets (it inherited
          them from a tuned listener).

    """

    __slots__ = ("_did_send_eof", "_poll", "_sock", "_trio_waited")

    def __init__(
        self, sock: socket.socket, poller: Netpoller | None = None, *, tuned: bool = False
    ) -> None:
        sock.setblocking(False)
        if not tuned:
            tune(sock)
        self._sock = sock
        self._did_send_eof = False
        self._poll: Registration | None = None if poller is None else poller.register(sock)
        # Whether Trio's I/O manager may know this descriptor: only then does
        # closing need notify_closing, which costs an EPOLL_CTL_DEL even for
        # a descriptor Trio never saw.
        self._trio_waited = poller is None

    @classmethod
    def from_trio_socket(
        cls, sock: trio.socket.SocketType, poller: Netpoller | None = None
    ) -> EchoSocketStream:
        """Take over a socket that `trio.socket` accepted."""
        plain = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        try:
            return cls(plain, poller)
        except BaseException:
            plain.close()
            raise

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Send what the kernel takes without blocking; return how many bytes.

        Not a checkpoint: the caller's next ``receive_some`` is.
        """
        if self._did_send_eof:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise _translate(exc) from None
        if sent < len(data) and self._poll is not None:
            self._poll.writable = False  # the buffer is full: wait for the next edge
        return sent

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        sent = self.send_nowait(data)
        if sent == len(data):
            return
        with memoryview(data) as view:
            while sent < len(view):
                await self.wait_send_all_might_not_block()
                sent += self.send_nowait(view[sent:])

    async def wait_send_all_might_not_block(self) -> None:
        poll = self._poll
        if poll is None:
            try:
                await trio.lowlevel.wait_writable(self._sock)
            except OSError as exc:  # pragma: no cover -- epoll refused the fd
                raise _translate(exc) from None
        elif poll.writable:
            await trio.lowlevel.checkpoint()
        elif poll.direct:
            self._trio_waited = True
            await trio.lowlevel.wait_writable(self._sock)
        else:
            await poll.wait_writable()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._did_send_eof:
            return
        self._did_send_eof = True
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise _translate(exc) from None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = 65536 if max_bytes is None else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        poll = self._poll
        if poll is None:
            while True:
                try:
                    await trio.lowlevel.wait_readable(self._sock)
                    return self._sock.recv(size)
                except BlockingIOError:
                    continue  # readable, then not: another reader raced us
                except OSError as exc:
                    raise _translate(exc) from None
        while True:
            if poll.readable:
                await trio.lowlevel.checkpoint()  # a schedule point, for fairness
            elif poll.direct:  # few connections are busy: Trio's own wait is cheaper
                self._trio_waited = True
                await trio.lowlevel.wait_readable(self._sock)
            else:
                # poll.wait_readable(), inlined: one coroutine frame fewer
                # held by every idle connection.
                await trio.lowlevel.checkpoint_if_cancelled()
                await trio.lowlevel.wait_task_rescheduled(poll.park_reader())
                poll.check_open()
            try:
                data = self._sock.recv(size)
            except BlockingIOError:
                poll.readable = False
                continue
            except OSError as exc:
                raise _translate(exc) from None
            if len(data) < size and not poll.hung_up:
                poll.readable = False  # drained: the next arrival is a new edge
            return data

    # --- the same receive, taken apart, for a caller that waits itself -------
    #
    # receive_some, as three steps, so that an echo loop parked waiting for
    # input holds no coroutine frame of this stream's (every idle connection
    # would): if `known_readable`, yield (a receive is a checkpoint); else
    # await `wait_readable()`; then `receive_nowait`, and if that says None,
    # start again.

    @property
    def known_readable(self) -> bool:
        """Whether the netpoller says the socket may have input (not used up).

        True for a new connection, so its first line is read before any wait,
        as Go reads before it parks; a stale True costs one ``EAGAIN``.
        """
        poll = self._poll
        return poll is not None and poll.readable

    def wait_readable(self) -> Awaitable[None]:
        """An awaitable that parks until the socket may be readable.

        Returned, not awaited here: the caller awaits it directly, with no
        frame of this method in between. Call
        ``await trio.lowlevel.checkpoint_if_cancelled()`` first.
        """
        # Returned for the caller to await at once: no frame of ours in between.
        poll = self._poll
        if poll is None or poll.direct:
            self._trio_waited = True
            return trio.lowlevel.wait_readable(self._sock)  # noqa: ASYNC105
        return trio.lowlevel.wait_task_rescheduled(poll.park_reader())  # noqa: ASYNC105

    def receive_nowait(self, max_bytes: int = 65536) -> bytes | None:
        """What the kernel has already received, without waiting; None if nothing.

        ``b""`` means end of input, as for `receive_some`. Not a checkpoint.
        Keeps the netpoller's readiness honest, as `receive_some` does.
        """
        poll = self._poll
        try:
            data = self._sock.recv(max_bytes)
        except BlockingIOError:
            if poll is not None:
                poll.readable = False
            return None
        except OSError as exc:
            raise _translate(exc) from None
        if poll is not None and len(data) < max_bytes and not poll.hung_up:
            poll.readable = False  # drained: the next arrival is a new edge
        return data

    def queued_bytes(self) -> int:
        """How many received bytes wait to be read (``FIONREAD``, tcp(7) SIOCINQ)."""
        count = array.array("i", [0])
        try:
            fcntl.ioctl(self._sock.fileno(), termios.FIONREAD, count, True)
        except OSError:
            return 0  # closed, or not a socket that can say: nothing to drain
        return count[0]

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Close at once, without a checkpoint (for ``finally`` blocks)."""
        if self._sock.fileno() != -1:
            if self._poll is not None:
                # Before the descriptor number can be reused; the close just
                # below takes the descriptor out of the epoll set itself.
                self._poll.close(unregister=False)
            if self._trio_waited:
                trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
