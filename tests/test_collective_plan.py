"""Direct tests of the averaging plan: part splitting, tensor layout, attempt plans."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcompute.collective.plan import AttemptPlan, Layout, layout_digest, split_parts
from p2pcompute.errors import ConfigError

bandwidth = st.one_of(st.just(0.0), st.floats(min_value=1e-3, max_value=1e6))


@given(total=st.integers(0, 10**9), bws=st.lists(bandwidth, min_size=1, max_size=12))
def test_split_parts_covers_exactly_and_is_fair(total: int, bws: list[float]) -> None:
    if sum(bws) <= 0:
        with pytest.raises(ConfigError):
            split_parts(total, bws)
        return
    parts = split_parts(total, bws)
    assert len(parts) == len(bws)
    assert parts[0][0] == 0
    assert parts[-1][1] == total
    whole = sum(bws)
    for (_, e), (s2, _) in itertools.pairwise(parts):
        assert e == s2
    for (s, e), b in zip(parts, bws, strict=True):
        assert e >= s
        if b == 0:
            assert e == s
        assert abs((e - s) - total * b / whole) < 1 + 1e-6 * total


def test_split_parts_examples_and_errors() -> None:
    assert split_parts(10, [1, 1, 2]) == ((0, 3), (3, 5), (5, 10))
    assert split_parts(3, [1, 0, 1]) == ((0, 2), (2, 2), (2, 3))
    assert split_parts(0, [1, 1]) == ((0, 0), (0, 0))
    for bad in ([], [0, 0], [-1, 2], [float("nan")], [float("inf")]):
        with pytest.raises(ConfigError):
            split_parts(5, bad)
    with pytest.raises(ConfigError):
        split_parts(-1, [1])


@given(
    sizes=st.lists(st.integers(0, 50), min_size=1, max_size=8),
    data=st.data(),
)
def test_layout_segments_cover_range(sizes: list[int], data: st.DataObject) -> None:
    lay = Layout(tuple(sizes))
    assert lay.total == sum(sizes)
    start = data.draw(st.integers(0, lay.total))
    end = data.draw(st.integers(start, lay.total))
    segs = lay.segments(start, end)
    covered = [lay.offsets[i] + k for i, lo, hi in segs for k in range(lo, hi)]
    assert covered == list(range(start, end))
    assert all(0 <= lo < hi <= sizes[i] for i, lo, hi in segs)


def test_layout_rejects_bad_ranges() -> None:
    lay = Layout((3, 0, 5))
    assert lay.segments(2, 6) == [(0, 2, 3), (2, 0, 3)]
    with pytest.raises(ValueError, match="outside"):
        lay.segments(4, 9)
    with pytest.raises(ConfigError):
        Layout((-1,))


def test_layout_digest_distinguishes_shapes_and_dtypes() -> None:
    a = layout_digest([(2, 3)], ["float32"])
    assert a == layout_digest([[2, 3]], ["float32"])
    assert a != layout_digest([(3, 2)], ["float32"])
    assert a != layout_digest([(2, 3)], ["float16"])
    assert a != layout_digest([(23,)], ["float32"])


def test_attempt_plan_roles_and_digest() -> None:
    plan = AttemptPlan.build(("a", "b", "c"), weights=(1, 0, 3), bandwidths=(1, 1, 0), total=10)
    assert plan.part_of("a") == (0, 5)
    assert plan.part_of("c") == (10, 10)
    assert plan.contributors == ("a", "c")
    assert plan.reducers == ("a", "b")
    assert plan.weight_total == 4.0
    other = AttemptPlan.build(("a", "b", "c"), weights=(1, 0, 2), bandwidths=(1, 1, 0), total=10)
    assert plan.digest() != other.digest()
    assert plan.digest() == AttemptPlan.build(
        ("a", "b", "c"), weights=(1, 0, 3), bandwidths=(1, 1, 0), total=10
    ).digest()
    with pytest.raises(ConfigError):
        AttemptPlan.build(("a", "a"), weights=(1, 1), bandwidths=(1, 1), total=3)
    with pytest.raises(ConfigError):
        AttemptPlan.build(("a", "b"), weights=(0, 0), bandwidths=(1, 1), total=3)
    with pytest.raises(ConfigError):
        AttemptPlan.build(("a", "b"), weights=(1,), bandwidths=(1, 1), total=3)
