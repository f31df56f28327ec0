"""A reducer that lies about its averaged part is caught and excluded (issue #14).

The check (p2pcompute/collective/verify.py) is tested on its own with hypothesis: honest
parts pass under every codec's rounding, lies are refuted. Then once end to end: real nodes
and lanes, CenteredClip, one of four reducers shifts its part; every honest member refutes
it, blames it, and the retry without it ends with the honest members' robust average; in the
next round the members that refuted it keep it out from the first attempt.
"""

from __future__ import annotations

import pytest
import torch
import trio
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from p2pcompute.collective import RoundOutcome, Timeouts
from p2pcompute.collective.aggregate import Aggregator, aggregate
from p2pcompute.collective.buffers import roundtrip_part
from p2pcompute.collective.verify import (
    check_part,
    codec_error,
    part_digest,
    sample_positions,
    trace_tensor,
)
from tests.test_allreduce_integration import GUARD, Peer, run_peers, swarm

KINDS = ["centered_clip", "trimmed_mean"]
CODECS = ["none", "fp16", "bf16", "int8"]


def _agg(kind: str) -> Aggregator:
    return Aggregator(kind, echo=True)  # the mean keeps and echoes its rows only when asked


def _honest_traced(
    kind: str, rows: torch.Tensor, weights: list[float], codec: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(part, echo, CenteredClip trace) as members land them from an honest reducer."""
    seen = rows.clone()
    for r in seen:  # each contribution went through the codec on its way to the reducer
        roundtrip_part(codec, r)
    part = torch.empty(rows.shape[1])
    done = aggregate(seen, weights, part, _agg(kind))
    roundtrip_part(codec, part)
    echo = seen.clone()  # exact: sent as float32 bits, which no codec rounds
    return part, echo, trace_tensor(done, rows.shape[0], _agg(kind).iterations)


def _mine(
    codec: str, own: torch.Tensor, pos: torch.Tensor, index: int
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """What a member passes as ``mine``: its index, its values there, their codec error bound."""
    return index, own[pos], codec_error(codec, [own], pos)


def _honest(
    kind: str, rows: torch.Tensor, weights: list[float], codec: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the part as members land it, the echo as members land it) from an honest reducer."""
    part, echo, _ = _honest_traced(kind, rows, weights, codec)
    return part, echo


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 7),
    m=st.integers(1, 300),
    kind=st.sampled_from(KINDS),
    codec=st.sampled_from(CODECS),
    seed=st.integers(0, 2**31),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_an_honest_part_passes_and_a_shifted_one_is_refuted(
    n: int, m: int, kind: str, codec: str, seed: int, scale: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    rows = scale * torch.randn(n, m, generator=gen)
    weights = [float(w) for w in torch.rand(n, generator=gen) + 0.5]
    part, echo = _honest(kind, rows, weights, codec)
    pos = sample_positions(part_digest(part), m)
    mine = _mine(codec, rows[n - 1], pos, n - 1)
    err = codec_error(codec, [part], pos)
    assert check_part(Aggregator(kind), part[pos], echo[:, pos], weights, part_error=err, mine=mine) is None
    # a lie on every position: pushed well outside every contribution
    lie = part + 10 * float(rows.abs().max())
    pos = sample_positions(part_digest(lie), m)
    err = codec_error(codec, [lie], pos)
    assert check_part(Aggregator(kind), lie[pos], echo[:, pos], weights, part_error=err) is not None
    # a reducer that misreports our input is caught by us
    forged = echo.clone()
    forged[n - 1] += 10 * float(rows.abs().max())
    pos = sample_positions(part_digest(part), m)
    mine = _mine(codec, rows[n - 1], pos, n - 1)
    err = codec_error(codec, [part], pos)
    refuted = check_part(Aggregator(kind), part[pos], forged[:, pos], weights, part_error=err, mine=mine)
    assert refuted is not None


def test_a_trimmed_mean_lie_inside_the_range_is_refuted_and_a_bad_echo_shape_too() -> None:
    rows = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [10.0, -10.0]])
    agg = Aggregator("trimmed_mean", trim=0.25)
    assert check_part(agg, torch.tensor([1.5, 0.5]), rows, [1, 1, 1, 1]) is None
    assert check_part(agg, torch.tensor([1.9, 0.5]), rows, [1, 1, 1, 1]) is not None  # in range, wrong
    assert "shape" in str(check_part(agg, torch.tensor([1.5, 0.5]), rows[:3], [1, 1, 1, 1]))
    assert "non-finite" in str(check_part(agg, torch.tensor([float("nan"), 0.5]), rows, [1, 1, 1, 1]))


def test_positions_depend_on_the_part() -> None:
    a = sample_positions(part_digest(torch.zeros(10_000)), 10_000)
    b = sample_positions(part_digest(torch.ones(10_000)), 10_000)
    assert a.numel() == b.numel() == 64
    assert not torch.equal(a, b)
    assert torch.equal(a, sample_positions(part_digest(torch.zeros(10_000)), 10_000))
    assert sample_positions(b"\0" * 32, 5).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.slow
async def test_a_lying_reducer_is_refuted_blamed_excluded_and_kept_out_of_the_next_round() -> None:
    n, liar = 4, 1
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(20_001, generator=gen)
    xs = [[base + 0.1 * torch.randn(20_001, generator=gen)] for _ in range(n)]
    spec = Aggregator("centered_clip", blame_after=None)
    second: dict[int, RoundOutcome] = {}
    with trio.fail_after(GUARD):
        async with swarm(n) as (boot, peers):
            peers[liar].faults.tamper_part = lambda part: part.add_(100.0)

            async def body(p: Peer) -> RoundOutcome:
                p.tensors = [t.clone() for t in xs[p.index]]
                assert p.coll is not None
                first = await p.coll.average("verify", "r1", p.tensors, target=n, min_size=2,
                                             matchmaking_timeout=60, aggregator=spec)
                again = [t.clone() for t in xs[p.index]]
                second[p.index] = await p.coll.average("verify", "r2", again, target=n, min_size=2,
                                                       matchmaking_timeout=60, aggregator=spec)
                return first

            await run_peers(boot, peers, body, timeouts=Timeouts())
    honest = [p for p in peers if p.index != liar]
    liar_id = peers[liar].node.peer_id  # type: ignore[union-attr]
    honest_mean = torch.stack([xs[p.index][0] for p in honest]).mean(0)
    spread = max(float(torch.linalg.vector_norm(xs[p.index][0] - honest_mean)) for p in honest)
    for p in honest:
        r = p.result
        assert r is not None
        assert r.ok, r
        assert liar_id in r.excluded
        assert liar_id not in r.participants
        assert r.attempts == 2
        assert torch.equal(p.tensors[0], honest[0].tensors[0])
        assert float(torch.linalg.vector_norm(p.tensors[0] - honest_mean)) < spread
        assert p.coll is not None
        stats = p.coll.statistics()
        assert stats.get("parts_refuted", 0) >= 1
        # round 2: the group forms with the liar (matchmaking views stay the same everywhere),
        # and every honest member that refuted it blames it again before its data counts
        r2 = second[p.index]
        assert r2.ok, r2
        assert liar_id in r2.excluded
        assert liar_id not in r2.participants
        assert stats.get("blocked_blamed", 0) >= 1
        assert liar_id in p.coll.blocked_peers()


def _rows(gen: torch.Generator, n: int, m: int, scale: float, tail: str) -> torch.Tensor:
    """Contributions: Gaussian, heavy-tailed (a few huge coordinates), or with one x1000 outlier."""
    rows = scale * torch.randn(n, m, generator=gen)
    if tail == "spiky":
        spikes = torch.rand(n, m, generator=gen) < 0.02
        rows[spikes] *= 1000.0
    elif tail == "outlier":
        rows[0] = -1000.0 * rows[0]
    return rows


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 7),
    m=st.integers(1, 400),
    kind=st.sampled_from(["mean", *KINDS]),
    codec=st.sampled_from(CODECS),
    seed=st.integers(0, 2**31),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    tail=st.sampled_from(["gauss", "spiky", "outlier"]),
    mix=st.floats(0.05, 0.95),
)
def test_lies_inside_the_range_are_refuted_and_honest_parts_never(
    n: int, m: int, kind: str, codec: str, seed: int, scale: float, tail: str, mix: float
) -> None:
    """Every aggregator, traced: honest parts pass (any codec, heavy tails, outliers); a part
    moved towards one of the rows (so still inside the rows' range) is refuted wherever it
    differs beyond the codec's rounding at a sampled position. Without the trace, the
    CenteredClip check (the range) lets such a lie through: the case issue #14 left open."""
    gen = torch.Generator().manual_seed(seed)
    rows = _rows(gen, n, m, scale, tail)
    assume(codec != "fp16" or float(rows.abs().max()) < 6e4)  # fp16 itself overflows past 65504
    weights = [float(w) for w in torch.rand(n, generator=gen) + 0.5]
    agg = _agg(kind)
    part, echo, trace = _honest_traced(kind, rows, weights, codec)
    pos = sample_positions(part_digest(part), m)
    mine = _mine(codec, rows[n - 1], pos, n - 1)
    err = codec_error(codec, [part], pos)
    honest = check_part(agg, part[pos], echo[:, pos], weights, part_error=err, mine=mine, trace=trace)
    assert honest is None, honest
    # the lie: a convex mix of the honest part and one row, inside the range of the rows
    j = int(torch.randint(n, (1,), generator=gen))
    lie = part + mix * (echo[j] - part)
    lpos = sample_positions(part_digest(lie), m)
    lerr = codec_error(codec, [lie], lpos)
    refuted = check_part(agg, lie[lpos], echo[:, lpos], weights, part_error=lerr, trace=trace)
    slack = 2 * lerr + 1e-4 * echo[:, lpos].abs().amax(dim=0).double()
    if bool(((lie[lpos] - part[lpos]).abs().double() > slack).any()):  # beyond the codec's rounding
        assert refuted is not None
        if kind == "centered_clip":  # the range alone (no trace) lets it through
            assert check_part(agg, lie[lpos], echo[:, lpos], weights, part_error=lerr) is None


def test_a_reducer_that_understates_an_outliers_distance_is_refuted() -> None:
    """A CenteredClip reducer that declares a far row close (so it is not clipped) and sends
    the part that trace gives: the part agrees with the trace, but the declared distance is
    below the row's distance over the sampled positions alone."""
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(5, 200, generator=gen)
    rows[0] *= -1000.0  # a sign-flipped, scaled contribution
    weights = [1.0] * 5
    agg = Aggregator("centered_clip")
    part = torch.empty(200)
    done = aggregate(rows, weights, part, agg)
    assert 0 in done.clipped
    # the forged trace: row 0 as close as tau at every iteration (factor 1: not clipped)
    forged = type(done)(done.tau, done.factors, tuple((done.tau, *it[1:]) for it in done.norms))
    v = rows.median(dim=0).values.double()
    for it in forged.norms:  # the part under the forged trace, everywhere
        step = torch.zeros_like(v)
        for i, declared in enumerate(it):
            step += 0.2 * min(1.0, forged.tau / declared) * (rows[i].double() - v)
        v = v + step
    lie = v.float()
    pos = sample_positions(part_digest(lie), 200)
    why = check_part(agg, lie[pos], rows[:, pos], weights, trace=trace_tensor(forged, 5, agg.iterations))
    assert "declared distance" in str(why)
    # a forged tau, and a malformed trace, are refuted too
    bad_tau = type(done)(done.tau * 2, done.factors, done.norms)
    pos = sample_positions(part_digest(part), 200)
    why = check_part(agg, part[pos], rows[:, pos], weights, trace=trace_tensor(bad_tau, 5, agg.iterations))
    assert "tau" in str(why)
    short = trace_tensor(done, 5, agg.iterations)[:-1]
    assert "trace" in str(check_part(agg, part[pos], rows[:, pos], weights, trace=short))
