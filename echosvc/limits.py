"""Per-source limits, sans-IO: the UDP echo's token buckets.

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
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable

import attrs

__all__ = ["DEFAULT_SOURCE_CAPACITY", "SourceRateLimiter", "SourceRateStatistics"]

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
