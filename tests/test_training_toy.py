"""The generated tasks of p2pcompute.testing: the language-modelling source, its floor, and
that a model learns it (no network: these are the data the benchmark and examples train on)."""

from __future__ import annotations

import math

import torch

from p2pcompute.testing import CONTEXT, VOCAB, MarkovTextTask


def test_markov_batches_are_reproducible_and_in_range() -> None:
    task = MarkovTextTask(seed=3)
    x1, y1 = task.batch(256, torch.Generator().manual_seed(9))
    x2, y2 = task.batch(256, torch.Generator().manual_seed(9))
    assert torch.equal(x1, x2)
    assert torch.equal(y1, y2)
    assert x1.shape == (256, CONTEXT)
    assert y1.shape == (256,)
    assert int(x1.min()) >= 0
    assert int(max(x1.max(), y1.max())) < VOCAB
    other, _ = task.batch(256, torch.Generator().manual_seed(10))
    assert not torch.equal(x1, other)  # each peer's own generator gives it its own data
    assert torch.equal(task.eval_set()[1], MarkovTextTask(seed=3).eval_set()[1])  # the same for all


def test_markov_floor_is_the_sources_own_cross_entropy() -> None:
    task = MarkovTextTask(seed=0)
    floor = task.floor()
    # sparse next-token distributions: far below uniform, far above zero
    assert 0.3 < floor < 0.8 * math.log(VOCAB)

    class Source(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return task.probs[task._index(x)].log()  # logits = the source's own log-probabilities

    assert abs(task.evaluate(Source()) - floor) < 1e-5
    fresh = task.make_model(0)
    assert task.evaluate(fresh) > floor + 0.5  # an untrained model is far from it


def test_a_model_learns_the_markov_source() -> None:
    task = MarkovTextTask(seed=0)
    model = task.make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    start = task.evaluate(model)
    for _ in range(400):
        x, y = task.batch(128, g)
        task.loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    end = task.evaluate(model)
    floor = task.floor()
    assert end < floor + 0.5 * (start - floor)  # more than half the way to the floor
    assert end > floor - 0.05  # and not below it by more than the held-out set's noise
