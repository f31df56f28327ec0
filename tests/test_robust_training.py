"""DiLoCo among strangers: 3 of 8 peers send sign-flipped pseudo-gradients scaled x1000.

In-memory peers (:class:`~p2pcompute.testing.LocalGroup`, which runs the network's own
aggregator over the network's parts) train the Markov language task. The plain mean diverges;
CenteredClip with its clip accounting (the attackers are blamed after ``blame_after`` rounds)
ends within 10% of honest-only training; CenteredClip alone, without blame, still trains.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
import trio

from p2pcompute.collective.aggregate import Aggregator
from p2pcompute.testing import LocalAverager, LocalGroup, MarkovTextTask
from p2pcompute.training.averager import AveragingOutcome
from p2pcompute.training.diloco import DiLoCo

HONEST, BYZANTINE = 5, 3
ROUNDS, H, BATCH = 20, 10, 64


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core box: torch's thread pool only adds contention (40x here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class SignFlipper:
    """A Byzantine peer: it trains honestly but sends -1000 times its pseudo-gradient."""

    def __init__(self, inner: LocalAverager) -> None:
        self.inner = inner

    @property
    def peer_id(self) -> str:
        return self.inner.peer_id

    async def average(self, tensors: Sequence[torch.Tensor], **kw: Any) -> AveragingOutcome:
        for t in tensors:
            t.mul_(-1000.0)
        return await self.inner.average(tensors, **kw)


async def train(byzantine: int, aggregator: str | Aggregator) -> tuple[float, LocalGroup, list[DiLoCo]]:
    """Final held-out loss of an honest peer, the group, and every peer's optimizer."""
    task = MarkovTextTask(0)
    group = LocalGroup()
    models, opts = [], []
    for i in range(HONEST + byzantine):
        model = task.make_model(0)
        averager: Any = group.join(f"p{i}")
        if i >= HONEST:
            averager = SignFlipper(averager)
        inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
        opts.append(DiLoCo(model, inner, averager, inner_steps=H, aggregator=aggregator))
        models.append(model)

    async def run(i: int) -> None:
        g = torch.Generator().manual_seed(100 + i)
        for _ in range(ROUNDS * H):
            x, y = task.batch(BATCH, g)
            task.loss(models[i](x), y).backward()  # type: ignore[no-untyped-call]
            await opts[i].astep(samples=BATCH)
            opts[i].zero_grad()

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for i in range(len(models)):
                nursery.start_soon(run, i)
    return task.evaluate(models[0]), group, opts


async def test_centered_clip_keeps_training_on_course_while_the_mean_diverges() -> None:
    start = MarkovTextTask(0).evaluate(MarkovTextTask.make_model(0))
    honest, _, _ = await train(0, "mean")
    robust, group, opts = await train(BYZANTINE, "centered_clip")
    alone, _, _ = await train(BYZANTINE, Aggregator("centered_clip", blame_after=None))
    plain, _, _ = await train(BYZANTINE, "mean")
    figures = f"start {start:.4f} honest {honest:.4f} robust {robust:.4f} no blame {alone:.4f} mean {plain}"
    assert honest < 0.75 * start, figures
    assert robust <= 1.10 * honest, figures
    assert alone < start, figures  # the aggregator alone bounds the damage; it does not undo it
    assert not math.isfinite(plain) or plain > 10 * start, figures
    byz = {f"p{i}" for i in range(HONEST, HONEST + BYZANTINE)}
    # every attacker is clipped in every round and, after blame_after=3 rounds, left out
    assert group.clip_counts == {p: ROUNDS for p in byz}
    participants = [set(r.participants) for r in opts[0].history]
    assert all(byz <= p for p in participants[:2])
    assert all(not byz & p for p in participants[2:]), participants
    # honest peers stay bit-identical
    assert len({o.state_digest() for o in opts[:HONEST]}) == 1


async def test_local_group_robust_round_in_half_precision_and_with_a_codec() -> None:
    """LocalGroup's robust path: float16 tensors (aggregated in float32), the int8 codec, one
    outlier clipped and counted, every member holding the same bytes."""
    group = LocalGroup()
    avgs = [group.join(f"p{i}") for i in range(4)]
    g = torch.Generator().manual_seed(3)
    base = torch.randn(300, generator=g)
    tensors = [[(base + 0.05 * torch.randn(300, generator=g)).half(), torch.ones(7, dtype=torch.half)]
               for _ in range(4)]
    tensors[3] = [t * -1000 for t in tensors[3]]
    outcomes: dict[int, AveragingOutcome] = {}

    async def one(i: int) -> None:
        outcomes[i] = await avgs[i].average(tensors[i], weight=1.0, round_id=0, compression="int8",
                                            aggregator="centered_clip")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(one, i)
    assert all(torch.equal(a, b) for t in tensors[1:] for a, b in zip(tensors[0], t, strict=True))
    assert tensors[0][0].dtype == torch.half
    assert float((tensors[0][0].float() - base).abs().max()) < 0.5
    assert group.clip_counts == {"p3": 1}
    assert outcomes[0].clipped == ("p3",)
