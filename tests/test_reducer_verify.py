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
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.collective import RoundOutcome, Timeouts
from p2pcompute.collective.aggregate import Aggregator, aggregate
from p2pcompute.collective.buffers import roundtrip_part
from p2pcompute.collective.verify import check_part, part_digest, sample_positions
from tests.test_allreduce_integration import GUARD, Peer, run_peers, swarm

KINDS = ["centered_clip", "trimmed_mean"]
CODECS = ["none", "fp16", "bf16", "int8"]


def _honest(
    kind: str, rows: torch.Tensor, weights: list[float], codec: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the part as members land it, the echo as members land it) from an honest reducer."""
    seen = rows.clone()
    for r in seen:  # each contribution went through the codec on its way to the reducer
        roundtrip_part(codec, r)
    part = torch.empty(rows.shape[1])
    aggregate(seen, weights, part, Aggregator(kind))
    roundtrip_part(codec, part)
    echo = seen.clone()
    roundtrip_part(codec, echo.view(-1))
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
    mine = (n - 1, rows[n - 1][pos])
    assert check_part(Aggregator(kind), part[pos], echo[:, pos], weights, codec=codec, mine=mine) is None
    # a lie on every position: pushed well outside every contribution
    lie = part + 10 * float(rows.abs().max())
    pos = sample_positions(part_digest(lie), m)
    assert check_part(Aggregator(kind), lie[pos], echo[:, pos], weights, codec=codec) is not None
    # a reducer that misreports our input is caught by us
    forged = echo.clone()
    forged[n - 1] += 10 * float(rows.abs().max())
    pos = sample_positions(part_digest(part), m)
    mine = (n - 1, rows[n - 1][pos])
    refuted = check_part(Aggregator(kind), part[pos], forged[:, pos], weights, codec=codec, mine=mine)
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
