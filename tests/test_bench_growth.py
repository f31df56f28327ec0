"""benchmarks.growth: the power-law fit, and how the worker treats failures before and after its figures."""

from __future__ import annotations

from typing import Any

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


def test_failures_after_the_figures_are_reported_and_before_them_fatal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    race = RuntimeError("Nursery is closed to new arrivals")
    group = BaseExceptionGroup("x", [ExceptionGroup("y", [race, race])])
    assert growth._leaves(group) == [race, race]

    async def measured_then_teardown_fails(n: int, timeout: float, out: dict[str, Any]) -> None:
        out.update(nodes=n, startup_s=1.0, cpu_s=2.0)
        raise ExceptionGroup("teardown", [race, ValueError("protobuf DecodeError at shutdown")])

    monkeypatch.setattr(growth, "_worker", measured_then_teardown_fails)
    out = growth._run_worker(8, 10.0)
    assert out["startup_s"] == 1.0
    assert "2 error(s)" in out["teardown_error"]
    assert "ValueError" in out["teardown_error"]

    async def fails_while_measuring(n: int, timeout: float, out: dict[str, Any]) -> None:
        out.update(nodes=n, startup_s=1.0)
        raise ExceptionGroup("run", [ValueError("real failure")])

    monkeypatch.setattr(growth, "_worker", fails_while_measuring)
    with pytest.raises(ExceptionGroup):
        growth._run_worker(8, 10.0)
    err = capsys.readouterr().err
    assert "growth worker: ValueError: real failure" in err
    assert '"startup_s": 1.0' in err  # what was measured before the failure is not lost
