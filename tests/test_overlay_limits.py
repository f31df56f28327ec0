"""Admission control (sans-IO): token buckets per key on explicit time, occupancy caps."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.overlay.limits import Occupancy, RateLimiter


def test_bucket_allows_a_burst_then_the_rate() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.allow("p", now=0.0) for _ in range(4)] == [True, True, True, False]
    assert not limiter.allow("p", now=0.2)  # 0.4 tokens: not yet
    assert limiter.allow("p", now=0.5)  # one token back after 0.5 s
    assert limiter.allow("other", now=0.5)  # keys are independent
    assert limiter.refused == 2


def test_bucket_memory_is_bounded() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_keys=10)
    for i in range(100):
        limiter.allow(i, now=0.0)
    assert len(limiter) == 10


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.1, 100.0),
    burst=st.integers(1, 50),
    gaps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=200),
)
def test_never_more_than_burst_plus_rate_times_elapsed(rate: float, burst: int, gaps: list[float]) -> None:
    limiter = RateLimiter(rate=rate, burst=burst)
    now = 0.0
    allowed = 0
    for gap in gaps:
        now += gap
        allowed += limiter.allow("k", now=now)
    assert allowed <= burst + rate * now + 1e-6


@given(st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), max_size=100))
def test_occupancy_never_exceeds_its_cap(ops: list[tuple[str, bool]]) -> None:
    occ = Occupancy(cap=2)
    held: dict[str, int] = {}
    for key, take in ops:
        if take:
            if occ.acquire(key):
                held[key] = held.get(key, 0) + 1
        elif held.get(key):
            occ.release(key)
            held[key] -= 1
        assert all(occ.used(k) == n for k, n in held.items())
        assert all(n <= 2 for n in held.values())
    assert len(occ) == sum(1 for n in held.values() if n)
