"""The per-source token buckets, sans-IO, on a clock the test moves by hand."""

from __future__ import annotations

import time
from collections.abc import Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echosvc.limits import DEFAULT_SOURCE_CAPACITY, SourceRateLimiter


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def allowed(limiter: SourceRateLimiter, source: object, count: int) -> int:
    return sum(limiter.allow(source) for _ in range(count))


@pytest.mark.parametrize("rate", [1, 2, 7, 100, 1000])
def test_the_burst_is_the_rate_then_one_per_interval(rate: int) -> None:
    clock = Clock()
    limiter = SourceRateLimiter(rate, clock=clock)
    assert allowed(limiter, "a", rate + 5) == rate
    clock.now += 1 / rate
    assert allowed(limiter, "a", 3) == 1
    clock.now += 0.5 / rate
    assert allowed(limiter, "a", 3) == 0
    # A second idle refills the whole burst, and no more.
    clock.now += 1
    assert allowed(limiter, "a", rate + 5) == rate


def test_sources_have_their_own_buckets() -> None:
    clock = Clock()
    limiter = SourceRateLimiter(3, clock=clock)
    assert allowed(limiter, "a", 10) == 3
    assert allowed(limiter, "b", 10) == 3
    assert len(limiter) == 2


def test_refused_datagrams_do_not_push_the_refill_back() -> None:
    clock = Clock()
    limiter = SourceRateLimiter(10, clock=clock)
    assert allowed(limiter, "a", 10) == 10
    for _ in range(9):  # hammering while empty earns nothing, costs nothing
        clock.now += 0.01
        assert allowed(limiter, "a", 50) == 0
    clock.now += 0.0100001
    assert allowed(limiter, "a", 5) == 1


def test_a_full_table_of_busy_sources_sends_new_ones_to_one_shared_bucket() -> None:
    clock = Clock()
    limiter = SourceRateLimiter(5, clock=clock, capacity=4)
    for source in "abcd":
        assert allowed(limiter, source, 1) == 1  # none refilled yet
    # Spoofed newcomers share one bucket of 5, and get no place.
    assert sum(limiter.allow(f"spoof{i}") for i in range(100)) == 5
    assert len(limiter) == 4
    assert limiter.statistics().overflowed == 100
    assert limiter.statistics().evicted == 0


def test_refilled_entries_make_room_for_new_sources() -> None:
    clock = Clock()
    limiter = SourceRateLimiter(5, clock=clock, capacity=3)
    for source in "abc":
        limiter.allow(source)
    clock.now += 0.2  # a, b and c each spent one token: refilled after 0.2 s
    assert limiter.allow("d")
    assert limiter.allow("e")
    assert len(limiter) == 3
    assert limiter.statistics().evicted == 2


def test_a_flood_of_new_sources_cannot_reset_a_limited_source() -> None:
    clock = Clock()
    limiter = SourceRateLimiter(10, clock=clock, capacity=100)
    assert allowed(limiter, "victim", 50) == 10  # empty now; refills in 1 s
    for step in range(9):
        clock.now += 0.1
        # Each tenth of a second: one token back, and thousands of spoofed
        # sources wanting its place.
        for i in range(2000):
            limiter.allow(f"spoof{step}-{i}")
        assert allowed(limiter, "victim", 50) == 1, step
    assert "victim" in limiter._tats
    assert len(limiter) <= 100


def test_the_default_table_stays_bounded_past_its_size_and_stays_fast() -> None:
    clock = Clock()
    limiter = SourceRateLimiter(100, clock=clock)
    assert limiter.capacity == DEFAULT_SOURCE_CAPACITY == 65_536
    started = time.perf_counter()
    for i in range(200_000):
        # 200,000 sources within 4 ms: none of the buckets, one token down,
        # has refilled (that takes 10 ms at 100 a second).
        clock.now += 2e-8
        limiter.allow(i)
    elapsed = time.perf_counter() - started
    assert len(limiter) == 65_536
    assert limiter.statistics().overflowed == 200_000 - 65_536
    # Then time passes: the old entries refilled, and new sources take their
    # places, until the table is full of sources that have not refilled.
    clock.now += 1.0
    for i in range(200_000, 300_000):
        limiter.allow(i)
    stats = limiter.statistics()
    assert (stats.sources, stats.evicted) == (65_536, 65_536)
    assert stats.overflowed == 300_000 - 2 * 65_536
    assert all(i in limiter._tats for i in range(200_000, 200_000 + 65_536))
    # O(1) per call (a scan of the table per call would take minutes).
    assert elapsed < 5, elapsed


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="rate"):
        SourceRateLimiter(0, clock=Clock())
    with pytest.raises(ValueError, match="capacity"):
        SourceRateLimiter(1, clock=Clock(), capacity=0)


class ReferenceBucket:
    """A textbook token bucket: fractional tokens, capped at the burst."""

    def __init__(self, rate: int, now: float) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.last = now

    def allow(self, now: float) -> bool:
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1 - 1e-6:
            self.tokens -= 1
            return True
        return False


@settings(max_examples=200, deadline=None)
@given(
    rate=st.integers(1, 50),
    capacity=st.integers(1, 6),
    steps=st.lists(
        st.tuples(st.integers(0, 9), st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.3, 1.5])),
        max_size=300,
    ),
)
def test_agrees_with_a_token_bucket_and_never_forgets_a_limited_source(
    rate: int, capacity: int, steps: list[tuple[int, float]]
) -> None:
    """Sources that hold a place behave exactly like textbook buckets, and a
    source is only ever forgotten once its bucket is full again."""
    clock = Clock()
    limiter = SourceRateLimiter(rate, clock=clock, capacity=capacity)
    reference: dict[Hashable, ReferenceBucket] = {}
    for source, dt in steps:
        clock.now += dt
        had_place = source in limiter._tats
        before = set(limiter._tats)
        result = limiter.allow(source)
        bucket = reference.get(source)
        if had_place:
            assert bucket is not None
            assert result == bucket.allow(clock.now)
        elif source in limiter._tats:  # a new place: a full bucket
            assert result
            reference[source] = ReferenceBucket(rate, clock.now)
            reference[source].allow(clock.now)
        for gone in before - set(limiter._tats):
            # Forgotten only when full: forgetting it loses nothing.
            ref = reference.pop(gone)
            ref.allow(clock.now)  # refill to now (and spend a token to probe)
            assert ref.tokens >= rate - 1 - 1e-6
        assert len(limiter) <= capacity
