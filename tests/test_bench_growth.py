"""benchmarks.growth: the power-law fit and the worker's narrow tolerance of a teardown race."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import growth


@given(
    st.floats(min_value=1e-3, max_value=1e3),
    st.floats(min_value=-2.0, max_value=3.0),
    st.lists(st.integers(min_value=2, max_value=1024), min_size=2, max_size=8, unique=True),
)
def test_fit_recovers_an_exact_power_law(a: float, b: float, xs: list[int]) -> None:
    fit = growth.fit_power_law([(float(x), a * x**b) for x in xs])
    assert fit is not None
    assert fit["b"] == pytest.approx(b, abs=1e-6)
    assert fit["a"] == pytest.approx(a, rel=1e-6)
    if abs(b) > 1e-3:  # r2 is only meaningful when y varies at all
        assert fit["r2"] == pytest.approx(1.0, abs=1e-9)


def test_fit_needs_two_distinct_sizes() -> None:
    assert growth.fit_power_law([(8.0, 1.0)]) is None
    assert growth.fit_power_law([(8.0, 1.0), (8.0, 2.0)]) is None
    assert growth.fit_power_law([(8.0, 0.0), (16.0, 1.0)]) is None  # a zero cannot be on a log axis


def test_only_the_known_teardown_race_is_tolerated() -> None:
    race = RuntimeError("Nursery is closed to new arrivals")
    group = BaseExceptionGroup("x", [ExceptionGroup("y", [race, race])])
    assert growth._leaves(group) == [race, race]
    other = ExceptionGroup("z", [race, ValueError("real failure")])
    assert [type(e) for e in growth._leaves(other)] == [RuntimeError, ValueError]
