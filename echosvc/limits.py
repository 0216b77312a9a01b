"""Per-source limits: the UDP echo's token buckets, and TCP connections per client.

Both are keyed on a source and bounded in memory whatever the sources do;
the cores are sans-IO.

**Datagrams per second** (``--udp-rate``).
`SourceRateLimiter` answers one question -- may this source have one more
datagram now? -- from a token bucket per source whose burst equals its rate
(``--udp-rate``: 100 a second means 100 at once, then one every 10 ms). No
I/O, and the clock is injected, so tests drive it by hand or with
`trio.testing.MockClock`.

Each bucket is one float, its GCRA "theoretical arrival time" (ITU-T I.371's
generic cell rate algorithm, which is a token bucket stated as a time): a
datagram at ``now`` is allowed if ``max(tat, now) - now`` is at most the
burst tolerance, and then moves ``tat`` on by one emission interval. The
bucket is full again -- it carries no state worth keeping -- once
``tat <= now``.

The table is bounded (65,536 sources by default) so that spoofed sources
cannot grow memory, and an attacker must not be able to *reset* a real
source's bucket by pushing it out either. Sources are kept in last-use order
(an `~collections.OrderedDict`, O(1) to touch and to pop the oldest). A new
source, when the table is full, evicts entries from the old end as long as
their buckets have refilled; if the oldest one has not, the new source goes
to one shared overflow bucket at the same rate instead of getting a place.
Since burst equals rate, any bucket refills within one second of its last
use, so a full table whose oldest entry has not refilled has seen every one
of its sources in the last second; an entry that refilled while a busier one
sits nearer the old end waits its turn, at most that second. Each entry is
inserted and popped once, so the work per datagram is O(1) amortised.

**Connections at once** (``--max-per-source``).
`SourceCounter` is the sans-IO core of ``--max-per-source``: it counts the
open connections of each source and says whether one more is admitted, and
whether a refusal starts a new *episode* (the first refusal since that
source was last below its limit), so the stage logs ``source_limit_reached``
once per episode rather than once per refused connection: a flood cannot
flood the log. A source is a string (`source_of`): an IPv4 address, or the
/64 of an IPv6 one, because one IPv6 host is routinely given a whole /64
and could otherwise take a fresh address for every connection. Memory is
bounded by the connections open: an entry goes when its count drops to 0.

`SourceLimitStage` is the `echosvc.pipeline` stage around it. It runs after
the PROXY header, so behind a load balancer the source is the real client.
It counts a connection once `open` has returned and gives the slot back in
`Stage.close`, which the pipeline calls however the connection ends --
refused by a later stage, closed for any reason, cancelled.
"""

from __future__ import annotations

import collections
import enum
import ipaddress
from collections.abc import Callable, Hashable
from typing import Any

import attrs
import structlog

from .config import CloseReason
from .listeners import address_ip
from .pipeline import Link, Refused, Stage

__all__ = [
    "DEFAULT_SOURCE_CAPACITY",
    "Admission",
    "SourceCounter",
    "SourceLimitStage",
    "SourceRateLimiter",
    "SourceRateStatistics",
    "source_of",
]

DEFAULT_SOURCE_CAPACITY = 65_536


@attrs.frozen
class SourceRateStatistics:
    """A snapshot of a `SourceRateLimiter`.

    Attributes:
      sources: entries in the table now.
      capacity: the most it will hold.
      evicted: refilled entries dropped to make room for a new source.
      overflowed: decisions made by the shared overflow bucket.

    """

    sources: int
    capacity: int
    evicted: int
    overflowed: int


class SourceRateLimiter:
    """Token buckets per source, ``rate`` per second with a burst of ``rate``.

    Args:
      rate: datagrams per second per source; also the burst. At least 1.
      clock: returns the current time in seconds (e.g. `trio.current_time`).
      capacity: the most sources tracked at once; at least 1.

    """

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float],
        capacity: int = DEFAULT_SOURCE_CAPACITY,
    ) -> None:
        if not rate >= 1:
            raise ValueError(f"rate must be at least 1, not {rate!r}")
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity!r}")
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._interval = 1.0 / rate
        # A full bucket takes `rate` datagrams at once: the last of them
        # arrives (rate - 1) intervals ahead of its theoretical time. The
        # thousandth of an interval on top absorbs the rounding of adding
        # the interval up `rate` times, so the burst is `rate`, not one less.
        self._tolerance = (rate - 1 + 1e-3) * self._interval
        self._tats: collections.OrderedDict[Hashable, float] = collections.OrderedDict()
        self._overflow_tat = -float("inf")
        self._evicted = 0
        self._overflowed = 0

    def __len__(self) -> int:
        return len(self._tats)

    def allow(self, source: Hashable) -> bool:
        """Take a token from ``source``'s bucket; ``False`` if it has none now."""
        now = self._clock()
        tats = self._tats
        tat = tats.get(source)
        if tat is None:
            if len(tats) >= self.capacity and not self._make_room(now):
                self._overflowed += 1
                allowed, self._overflow_tat = self._take(self._overflow_tat, now)
                return allowed
            # A new source has a full bucket: its first datagram always passes.
            tats[source] = now + self._interval
            return True
        tats.move_to_end(source)
        allowed, tats[source] = self._take(tat, now)
        return allowed

    def statistics(self) -> SourceRateStatistics:
        """Return a frozen snapshot of the table."""
        return SourceRateStatistics(
            sources=len(self._tats),
            capacity=self.capacity,
            evicted=self._evicted,
            overflowed=self._overflowed,
        )

    def _take(self, tat: float, now: float) -> tuple[bool, float]:
        start = max(tat, now)
        if start - now > self._tolerance:
            return False, tat  # a refused datagram costs nothing
        return True, start + self._interval

    def _make_room(self, now: float) -> bool:
        tats = self._tats
        while len(tats) >= self.capacity:
            # OrderedDict iterates its linked list: the oldest entry, in O(1).
            oldest_tat = tats[next(iter(tats))]
            if oldest_tat > now:
                return False  # still limiting a source: keep it
            tats.popitem(last=False)
            self._evicted += 1
        return True


# --- connections at once per source: --max-per-source -------------------------

_log = structlog.get_logger("echosvc")

# An IPv6 source is its /64: the prefix one subscriber, one LAN, one VM is
# given (RFC 6177, RFC 7934), inside which it may pick any address it likes.
_IPV6_SOURCE_PREFIX = 64


def source_of(address: tuple[Any, ...] | str | None) -> str | None:
    """The source a socket address counts against, as logged: ``"192.0.2.7"``,
    ``"2001:db8::/64"`` (IPv4-mapped IPv6 counts as IPv4); ``None`` for an
    address with no IP (``AF_UNIX``, or none known), which is not limited.
    """
    ip = address_ip(address)
    if ip is None:
        return None
    if ip.version == 4:
        return str(ip)
    network = ipaddress.IPv6Network((int(ip) >> 64 << 64, _IPV6_SOURCE_PREFIX))
    return str(network)


class Admission(enum.Enum):
    """What `SourceCounter.acquire` decided."""

    #: Counted: the connection holds one of its source's slots until released.
    ADMITTED = "admitted"
    #: Over the limit, and the first refusal of this episode: worth a log record.
    REFUSED_FIRST = "refused_first"
    #: Over the limit, in an episode already reported.
    REFUSED = "refused"


class SourceCounter:
    """Open connections per source, at most ``limit`` each. No I/O, no clock.

    Args:
      limit: connections one source may hold at once (at least 1).

    """

    __slots__ = ("_counts", "_episodes", "limit")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit!r}")
        self.limit = limit
        self._counts: dict[str, int] = {}
        # Sources refused since they were last below their limit; always a
        # subset of the sources at their limit, so bounded like _counts.
        self._episodes: set[str] = set()

    def acquire(self, source: str) -> Admission:
        """Count one more connection from ``source``, if it is under its limit."""
        count = self._counts.get(source, 0)
        if count < self.limit:
            self._counts[source] = count + 1
            return Admission.ADMITTED
        if source in self._episodes:
            return Admission.REFUSED
        self._episodes.add(source)
        return Admission.REFUSED_FIRST

    def release(self, source: str) -> None:
        """One connection `acquire` admitted from ``source`` has ended.

        Raises:
          KeyError: ``source`` holds no slot (a release without an acquire).

        """
        count = self._counts[source] - 1
        if count:
            self._counts[source] = count
        else:
            del self._counts[source]
        # Below the limit again: the episode is over, the next refusal is news.
        self._episodes.discard(source)

    def count(self, source: str) -> int:
        """Connections ``source`` holds now."""
        return self._counts.get(source, 0)

    def __len__(self) -> int:
        """Sources holding at least one connection (the entries kept)."""
        return len(self._counts)


class SourceLimitStage(Stage):
    """``--max-per-source``: at most ``limit`` connections at once per source.

    One over the limit is refused at once, without a reply: reason
    ``source_limit``, its ``connection_closed`` at ``debug`` (`Refused`'s
    ``quiet``), and ``source_limit_reached`` (warning: ``source``,
    ``limit``) once per episode per source. Connections with no IP source
    (`source_of` gives ``None``) are not limited. One instance serves all
    the connections it limits together: `echosvc.pipeline.stages_for` makes
    one per server, and each worker process has its own server.

    Attributes:
      counter: the `SourceCounter`.

    """

    def __init__(self, limit: int) -> None:
        self.counter = SourceCounter(limit)

    async def open(self, link: Link) -> Link:
        # No checkpoint anywhere in here, by design: between the slot being
        # taken and this returning, no cancellation can land, so a connection
        # that holds a slot is always one whose close() the pipeline calls.
        source = source_of(link.address)
        if source is None:
            return link
        admission = self.counter.acquire(source)
        if admission is Admission.ADMITTED:
            return link
        if admission is Admission.REFUSED_FIRST:
            _log.warning("source_limit_reached", source=source, limit=self.counter.limit)
        raise Refused(CloseReason.SOURCE_LIMIT, quiet=True)

    def close(self, link: Link) -> None:
        source = source_of(link.address)
        if source is not None:
            self.counter.release(source)
