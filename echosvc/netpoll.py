"""A netpoller of our own: Go's edge-triggered design, inside Trio.

Go registers every socket once, edge-triggered
(``EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET`` in ``netpollopen``,
``runtime/netpoll_epoll.go``), and parks goroutines until the poller says
their socket is ready. Trio re-arms every wait instead: ``wait_readable``
registers the descriptor with ``EPOLLONESHOT`` (one ``epoll_ctl`` per wait;
``trio/_core/_io_epoll.py`` explains why a general-purpose I/O manager must),
and builds an ``EpollWaiters``, an abort closure and a rescheduling per wait.
For a server that owns its sockets from ``accept()`` to ``close()``, the
reasons for ``EPOLLONESHOT`` do not apply, so this module does what Go does,
with only public ``trio.lowlevel`` API:

* **Registered once.** `Netpoller.register` adds an accepted socket to a
  private epoll set with ``EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET`` and returns
  its `Registration`; `Registration.close` takes it out again (before the
  socket is closed) and wakes whoever waits on it with
  `trio.ClosedResourceError`. No ``epoll_ctl`` happens in between.
* **One poller task** (`Netpoller.run`, in the server's nursery) waits for the
  private epoll descriptor through Trio -- the one Trio-level wait it makes
  per wake-up, however many sockets are ready -- then collects up to
  ``max_events`` events in one ``epoll_wait`` (a fixed-size buffer) and
  reschedules the tasks parked on those sockets. A full buffer means there
  may be more: it yields first, so the tasks it just woke run before it takes
  the next batch.
* **Readiness is a flag, used up only when the kernel says so.** Edge
  triggering reports a change once, so a `Registration` remembers it
  (``readable``/``writable``) until a ``recv`` comes back short or with
  ``EAGAIN``, or a ``send`` does not take everything -- exactly as edge
  triggering requires. A new arrival after that is a new edge. Except once
  the peer has closed its side (``EPOLLRDHUP``, ``EPOLLHUP``, ``EPOLLERR``):
  its last data and its FIN can come in one edge, and a short ``recv`` of
  that data leaves the end of input still to be read with no edge to come,
  so from then on the socket stays readable (``hung_up``): every ``recv``
  returns at once, with data, ``b""`` or the error.
* **Parking is direct.** A connection that must wait sets itself as the
  registration's reader (or writer) and calls
  `trio.lowlevel.wait_task_rescheduled` with an abort function made once per
  registration, not per wait.
* **Exactness.** Trio's own run loop hands out I/O before it expires
  deadlines in the same pass, so a task woken by data keeps it even if its
  deadline also passed. With a poller in between, the wake-up would come a
  pass late, after the deadline had already cancelled the wait. So the abort
  functions first collect whatever the private set has ready (`poll_now`):
  if that wakes the task, the cancel stays pending for its next checkpoint
  and the data is not lost -- the same order as Trio's own I/O. Only I/O
  ready when the cancel *lands* wins: a wait that begins with a cancel
  already pending delivers it at once, so data that arrives after a stop or
  a deadline never beats it, and a client that never stops sending cannot
  put a cancellation off.

* **Chosen by measurement.** The poller pays once per wake-up (its own Trio
  wait, one ``epoll_wait``, a task switch); Trio's waits pay once per wait.
  With one busy connection every wake-up carries one event and the poller
  costs more than it saves (rr1: +21 % of server CPU per request, 1.00
  events per wake-up; rr2: +14 %, 1.85); at about three events per wake-up
  (rr4: 3.1) the two cost the same, and from there the poller saves more
  than it costs (rr16: -17 %, 10.4; rr50: -22 %, 31) -- ``bench/RESULTS.md``,
  "The netpoller's crossover". So the poller measures its
  batches: when a one-second window averages fewer than `BATCH_MIN` events
  per wake-up it goes *direct* -- wakes every task parked on it, which then
  wait through Trio's own ``wait_readable`` -- and stops waiting on its
  epoll set. The set keeps collecting edges meanwhile, so a probe four
  times a second counts the sockets that were active; from `ACTIVE_MIN` of
  them it takes over again. Only while at most `DIRECT_MAX` sockets are
  registered, though: a task parked in Trio's own wait holds about 1 KB of
  Trio's bookkeeping (an ``EpollWaiters``, its dict entry, an abort
  closure) that a parked registration does not, so a crowd of idle
  connections stays with the poller, where waiting costs nothing. No flag:
  the load decides.

A failure of the poller task propagates to the nursery that runs it (the
server's), instead of leaving connections parked forever.
"""

from __future__ import annotations

import contextlib
import select
import socket
from collections.abc import Callable

import trio

__all__ = ["Netpoller", "Registration"]

# Go's flags: readable, writable, peer closed its side; edge-triggered.
_FLAGS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_READ_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_HUNG_UP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR

# Events taken per epoll_wait: Go's netpoll takes 128.
MAX_EVENTS = 128

# The measured crossover (bench/RESULTS.md, "The netpoller's crossover"): below about
# three events per wake-up the poller costs more than Trio's own waits; from
# eight connections active within a probe it saves more.
BATCH_MIN = 3.0
ACTIVE_MIN = 8
WINDOW_S = 1.0
PROBE_S = 0.25
# Beyond this many registered sockets the poller never goes direct.
DIRECT_MAX = 256


class Registration:
    """One socket in a `Netpoller`: its readiness and the task waiting on it."""

    __slots__ = (
        "_abort_read",
        "_abort_write",
        "_poller",
        "closed",
        "fd",
        "hung_up",
        "readable",
        "reader",
        "writable",
        "writer",
    )

    def __init__(self, poller: Netpoller, fd: int) -> None:
        self._poller = poller
        self.fd = fd
        # Edge triggering reports the state at registration as a first edge;
        # until it is seen, try the socket: a recv is cheaper than a wait.
        self.readable = True
        self.writable = True
        self.hung_up = False  # the peer closed its side: reads never block again
        self.reader: trio.lowlevel.Task | None = None
        self.writer: trio.lowlevel.Task | None = None
        self.closed = False
        # Made once, not per wait as Trio's wait_readable builds a closure.
        self._abort_read = self._abort_reading
        self._abort_write: Callable[[object], trio.lowlevel.Abort] | None = None

    async def wait_readable(self) -> None:
        """Park until the socket may be readable (data, EOF or an error).

        Raises:
          trio.ClosedResourceError: if the registration is or gets closed.
          trio.BusyResourceError: if another task is already waiting to read.

        """
        # A cancel already pending came first: it is not the abort's to defer.
        await trio.lowlevel.checkpoint_if_cancelled()
        await trio.lowlevel.wait_task_rescheduled(self.park_reader())
        self.check_open()

    def park_reader(self) -> Callable[[object], trio.lowlevel.Abort]:
        """Make the current task the reader; return the abort function for
        `trio.lowlevel.wait_task_rescheduled`.

        For callers that park themselves, one coroutine frame fewer for every
        idle connection than `wait_readable`: first
        ``await trio.lowlevel.checkpoint_if_cancelled()``, then park, then
        `check_open`.

        Raises:
          trio.ClosedResourceError: if the registration is closed.
          trio.BusyResourceError: if another task is already waiting to read.

        """
        if self.closed:
            raise trio.ClosedResourceError("this socket was already closed")
        if self.reader is not None:
            raise trio.BusyResourceError("another task is already reading this socket")
        self.reader = trio.lowlevel.current_task()
        return self._abort_read

    def check_open(self) -> None:
        """Raise `trio.ClosedResourceError` if a wait ended because of `close`."""
        if self.closed:
            raise trio.ClosedResourceError("another task closed this socket")

    async def wait_writable(self) -> None:
        """Park until the socket may take more data. Raises as `wait_readable`."""
        if self.closed:
            raise trio.ClosedResourceError("this socket was already closed")
        if self.writer is not None:
            raise trio.BusyResourceError("another task is already writing this socket")
        await trio.lowlevel.checkpoint_if_cancelled()
        self.writer = trio.lowlevel.current_task()
        if self._abort_write is None:  # made when first needed: most never write-wait
            self._abort_write = self._abort_writing
        await trio.lowlevel.wait_task_rescheduled(self._abort_write)
        self.check_open()

    @property
    def direct(self) -> bool:
        """Whether to wait through Trio's own I/O (the poller went direct)."""
        return self._poller.direct

    def close(self, *, unregister: bool = True) -> None:
        """Leave the poller and wake any waiter (with ClosedResourceError).

        Call before closing the socket: the descriptor number may be reused
        for the next accepted connection the moment it is closed.

        Args:
          unregister: take the descriptor out of the epoll set. A caller that
              closes the socket at once may pass False and save the
              ``epoll_ctl``: closing the last descriptor of an open file
              removes it from every epoll set (epoll(7)).

        """
        if self.closed:
            return
        self.closed = True
        self._poller._forget(self, unregister)
        self._wake_reader()
        self._wake_writer()

    def _ready(self, events: int) -> None:
        if events & _READ_EVENTS:
            self.readable = True
            if events & _HUNG_UP:
                self.hung_up = True
            self._wake_reader()
        if events & _WRITE_EVENTS:
            self.writable = True
            self._wake_writer()

    def _wake_reader(self) -> None:
        task = self.reader
        if task is not None:
            self.reader = None
            trio.lowlevel.reschedule(task)

    def _wake_writer(self) -> None:
        task = self.writer
        if task is not None:
            self.writer = None
            trio.lowlevel.reschedule(task)

    def _abort_reading(self, raise_cancel: object) -> trio.lowlevel.Abort:
        # I/O that is ready now wins over the cancel, as in Trio's own run
        # loop: collect it first; if it woke the reader, the cancel waits.
        self._poller._poll_in_abort()
        if self.reader is None:
            return trio.lowlevel.Abort.FAILED  # rescheduled with its readiness
        self.reader = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _abort_writing(self, raise_cancel: object) -> trio.lowlevel.Abort:
        self._poller._poll_in_abort()
        if self.writer is None:
            return trio.lowlevel.Abort.FAILED
        self.writer = None
        return trio.lowlevel.Abort.SUCCEEDED


class Netpoller:
    """A private, edge-triggered epoll set for the server's own sockets.

    Args:
      max_events: events taken per ``epoll_wait``, the fixed-size buffer.
      adapt: go direct and back as the load says; ``False`` always polls
          (for tests of the polling path itself).

    Attributes:
      direct: True while the connections wait through Trio's own I/O.

    Resource handling:
      `run` owns the epoll descriptor and closes it when it returns or is
      cancelled; register sockets only while it runs.

    """

    def __init__(self, *, max_events: int = MAX_EVENTS, adapt: bool = True) -> None:
        self._epoll = select.epoll()
        self._max_events = max_events
        self._adapt = adapt
        self._registered: dict[int, Registration] = {}
        self.direct = False
        self.wakeups = 0
        self.events = 0
        # An error met while an abort function polled: an abort must not
        # raise (Trio would crash the run), so it is kept for run() to raise.
        self._failure: BaseException | None = None

    def register(self, sock: socket.socket) -> Registration:
        """Add a connected, non-blocking socket, once, edge-triggered.

        Raises:
          trio.ClosedResourceError: if the poller has stopped.

        """
        if self._epoll.closed:
            raise trio.ClosedResourceError("the netpoller has stopped")
        fd = sock.fileno()
        registration = Registration(self, fd)
        self._epoll.register(fd, _FLAGS)
        self._registered[fd] = registration
        return registration

    @property
    def registered(self) -> int:
        """How many sockets are in the set."""
        return len(self._registered)

    def poll_now(self) -> int:
        """Collect what is ready without waiting; return how many events."""
        if self._epoll.closed:
            return 0
        events = self._epoll.poll(0, self._max_events)
        registered = self._registered
        for fd, mask in events:
            registration = registered.get(fd)
            if registration is not None:
                registration._ready(mask)
        self.events += len(events)
        return len(events)

    def _poll_in_abort(self) -> None:
        try:
            self.poll_now()
        except Exception as exc:  # noqa: BLE001 -- kept, and raised by run()
            if self._failure is None:
                self._failure = exc

    async def run(self) -> None:
        """The poller task: wake the tasks whose sockets are ready, until cancelled."""
        try:
            fd = self._epoll.fileno()
            window_end = 0.0
            window_wakeups = window_events = 0
            while True:
                if self._failure is not None:
                    raise self._failure
                if self.direct:
                    await trio.sleep(PROBE_S)
                    registered = len(self._registered)
                    # With no socket left there is nothing to probe for: an
                    # idle server sleeps in epoll_wait instead of waking 4x/s.
                    if not registered or registered > DIRECT_MAX or self.poll_now() >= ACTIVE_MIN:
                        self.direct = False
                        window_wakeups = window_events = 0
                    continue
                await trio.lowlevel.wait_readable(fd)
                if self._failure is not None:
                    raise self._failure
                self.wakeups += 1
                if not window_wakeups:
                    # A window starts at its first wake-up, not when the
                    # last one ended: an idle spell before it (start-up,
                    # a quiet night) is no evidence of small batches.
                    window_end = trio.current_time() + WINDOW_S
                window_wakeups += 1
                while (events := self.poll_now()) == self._max_events:
                    # A full buffer: more may be ready. Let the tasks just
                    # woken run before taking the next batch.
                    window_events += events
                    await trio.lowlevel.checkpoint()
                window_events += events
                if self._adapt and trio.current_time() >= window_end:
                    few = len(self._registered) <= DIRECT_MAX
                    if few and window_events < BATCH_MIN * window_wakeups:
                        self._go_direct()
                    window_wakeups = window_events = 0
        except trio.Cancelled:
            # A failure an abort met while this task was being cancelled is
            # still the server's error, not something a shutdown hides.
            if self._failure is not None:
                raise self._failure from None  # noqa: ASYNC104 -- the error outranks the cancel
            raise
        finally:
            self._close()

    def _go_direct(self) -> None:
        """Hand every parked task back to Trio's own waits."""
        self.direct = True
        for registration in self._registered.values():
            registration._wake_reader()
            registration._wake_writer()

    def _forget(self, registration: Registration, unregister: bool) -> None:
        if self._registered.get(registration.fd) is registration:
            del self._registered[registration.fd]
            if unregister and not self._epoll.closed:
                with contextlib.suppress(OSError):  # already closed behind our back
                    self._epoll.unregister(registration.fd)

    def _close(self) -> None:
        registrations = list(self._registered.values())
        trio.lowlevel.notify_closing(self._epoll.fileno())
        self._epoll.close()
        for registration in registrations:
            registration.close()
