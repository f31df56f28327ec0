"""Direct tests of the sans-IO aggregators (p2pcompute/collective/aggregate.py), with hypothesis.

Each property is one stated in the module's docstring, where it is proved.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.collective.aggregate import (
    Aggregator,
    ClipLedger,
    _median_into,
    aggregate,
    capped_weights,
)
from p2pcompute.errors import ConfigError

ROBUST = ("centered_clip", "trimmed_mean")


@st.composite
def stacks(draw: st.DrawFn, min_rows: int = 1, max_rows: int = 9) -> tuple[torch.Tensor, list[float]]:
    n = draw(st.integers(min_rows, max_rows))
    m = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, m, generator=g, dtype=torch.float64) * scale
    weights = draw(st.lists(st.floats(0.5, 2.0), min_size=n, max_size=n))  # within the weight cap
    return rows, weights


def _run(rows: torch.Tensor, weights: list[float], spec: str | Aggregator, **kw: object) -> torch.Tensor:
    out = torch.empty(rows.shape[1], dtype=rows.dtype)
    aggregate(rows, weights, out, spec, **kw)  # type: ignore[arg-type]
    return out


def _mean(rows: torch.Tensor, weights: list[float]) -> torch.Tensor:
    w = torch.tensor(weights, dtype=rows.dtype)
    return (rows * w[:, None]).sum(0) / w.sum()


@given(stacks())
def test_mean_is_the_weighted_mean(data: tuple[torch.Tensor, list[float]]) -> None:
    rows, weights = data
    assert torch.allclose(_run(rows, weights, "mean"), _mean(rows, weights), rtol=1e-9, atol=1e-12)


@given(stacks())
def test_centered_clip_with_a_large_tau_is_the_mean(data: tuple[torch.Tensor, list[float]]) -> None:
    rows, weights = data
    tau = 1e6 * (float(rows.abs().max()) + 1.0)  # larger than every distance: nothing is clipped
    out = torch.empty(rows.shape[1], dtype=rows.dtype)
    res = aggregate(rows, weights, out, Aggregator("centered_clip", tau=tau, iterations=1))
    assert res.clipped == ()
    assert torch.allclose(out, _mean(rows, weights), rtol=1e-9, atol=1e-9 * float(rows.abs().max()))


@given(stacks(), st.sampled_from(ROBUST), st.randoms(use_true_random=False))
def test_robust_aggregators_are_permutation_invariant(
    data: tuple[torch.Tensor, list[float]], kind: str, rnd: object
) -> None:
    rows, weights = data
    order = list(range(rows.shape[0]))
    rnd.shuffle(order)  # type: ignore[attr-defined]
    a = _run(rows, weights, kind)
    b = _run(rows[order], [weights[i] for i in order], kind)
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-9 * (float(rows.abs().max()) + 1e-300))


@given(stacks(), st.sampled_from(ROBUST))
def test_equal_rows_give_that_row_exactly(data: tuple[torch.Tensor, list[float]], kind: str) -> None:
    rows, weights = data
    same = rows[:1].expand_as(rows).contiguous()
    if kind == "centered_clip":  # the median is that row, and nothing moves it
        assert torch.equal(_run(same, weights, kind), rows[0])
    else:  # a mean of equal values, up to its rounding
        assert torch.allclose(_run(same, weights, kind), rows[0], rtol=1e-15, atol=0)


@given(stacks(), st.sampled_from(ROBUST))
def test_result_lies_in_the_coordinatewise_range(data: tuple[torch.Tensor, list[float]], kind: str) -> None:
    rows, weights = data
    out = _run(rows, weights, kind)
    slack = 1e-9 * (float(rows.abs().max()) + 1e-300)
    assert bool((out >= rows.min(0).values - slack).all())
    assert bool((out <= rows.max(0).values + slack).all())


@given(stacks(min_rows=2), st.floats(1e-3, 10.0), st.integers(1, 5), st.data())
def test_each_iteration_moves_at_most_tau(
    data: tuple[torch.Tensor, list[float]], tau: float, iterations: int, more: st.DataObject
) -> None:
    rows, weights = data
    center = rows.median(0).values
    out = _run(rows, weights, Aggregator("centered_clip", tau=tau, iterations=iterations), center=center)
    assert float(torch.linalg.vector_norm(out - center)) <= iterations * tau * (1 + 1e-9)


@given(stacks(min_rows=3), st.floats(1e-2, 10.0), st.integers(1, 4), st.data())
@settings(max_examples=150)
def test_byzantine_rows_move_the_result_at_most_2_L_share_tau(
    data: tuple[torch.Tensor, list[float]], tau: float, iterations: int, more: st.DataObject
) -> None:
    rows, weights = data
    n = rows.shape[0]
    byz = more.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n - 1))
    other = rows.clone()
    for i in byz:
        other[i] = more.draw(st.sampled_from([-1e6, 1e6, 0.0])) * torch.ones_like(rows[i])
    spec = Aggregator("centered_clip", tau=tau, iterations=iterations)
    center = rows.median(0).values
    a = _run(rows, weights, spec, center=center)
    b = _run(other, weights, spec, center=center)
    share = sum(weights[i] for i in byz) / sum(weights)
    assert float(torch.linalg.vector_norm(a - b)) <= 2 * iterations * share * tau * (1 + 1e-9) + 1e-9


@given(stacks(), st.sampled_from([1e-3, 7.0, 1e3]))
def test_centered_clip_with_its_own_tau_is_scale_equivariant(
    data: tuple[torch.Tensor, list[float]], c: float
) -> None:
    rows, weights = data
    a = _run(rows, weights, "centered_clip") * c
    b = _run(rows * c, weights, "centered_clip")
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-9 * c * (float(rows.abs().max()) + 1e-300))


@given(st.integers(1, 40), st.integers(1, 300), st.integers(0, 2**31))
def test_the_median_network_equals_torch_median(n: int, m: int, seed: int) -> None:
    rows = torch.randn(n, m, generator=torch.Generator().manual_seed(seed))
    out = torch.empty(m)
    _median_into(rows, out)
    assert torch.equal(out, rows.median(0).values)


def test_a_thousandfold_outlier_is_clipped_and_barely_moves_the_result() -> None:
    g = torch.Generator().manual_seed(0)
    honest = torch.randn(1, 1000, generator=g) + 0.1 * torch.randn(7, 1000, generator=g)
    rows = torch.cat([honest, -1000 * honest[:1]])
    out = torch.empty(1000)
    res = aggregate(rows, [1.0] * 8, out, "centered_clip")
    assert res.clipped == (7,)
    honest_mean = honest.mean(0)
    spread = float(torch.linalg.vector_norm(honest[0] - honest_mean))
    # bounded by 2 * L * share * tau, and in practice far below it
    assert float(torch.linalg.vector_norm(out - honest_mean)) <= 2 * 3 * (1 / 8) * res.tau
    assert float(torch.linalg.vector_norm(out - honest_mean)) < spread
    plain = torch.empty(1000)
    aggregate(rows, [1.0] * 8, plain, "mean")
    assert float(torch.linalg.vector_norm(plain - honest_mean)) > 100 * spread


def test_a_claimed_huge_weight_is_capped() -> None:
    assert capped_weights([1.0, 2.0, 3.0, 1e12], 4.0) == [1.0, 2.0, 3.0, 8.0]
    rows = torch.tensor([[0.0], [0.0], [0.0], [1e6]])
    out = torch.empty(1)
    aggregate(rows, [1.0, 1.0, 1.0, 1e12], out, "centered_clip")
    assert abs(float(out)) < 1e-6 * 1e6


def test_bad_specs_are_refused() -> None:
    for bad in (dict(kind="median"), dict(tau=0.0), dict(iterations=0), dict(trim=0.5), dict(weight_cap=0.5)):
        with pytest.raises(ConfigError):
            Aggregator(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Aggregator.of(3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        aggregate(torch.zeros(2, 3), [1.0], torch.empty(3))
    with pytest.raises(ConfigError):
        aggregate(torch.zeros(2, 3), [0.0, 0.0], torch.empty(3), "centered_clip")


def test_the_clip_ledger_blames_a_streak_once_per_round() -> None:
    ledger = ClipLedger()
    seen = {"a", "b"}
    assert ledger.record("r1", seen=seen, clipped={"b"}, blame_after=2) == set()
    # a retried attempt of the same round does not count twice
    assert ledger.record("r1", seen=seen, clipped={"b"}, blame_after=2) == set()
    assert ledger.record("r2", seen=seen, clipped={"b"}, blame_after=2) == {"b"}
    assert ledger.record("r3", seen=seen, clipped=set(), blame_after=2) == set()
    assert ledger.streak.get("b") is None
    assert ledger.total == {"b": 2}
    assert ledger.record("r4", seen=seen, clipped={"a"}, blame_after=None) == set()
