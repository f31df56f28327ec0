"""Low-precision models: an fp32 master anchor and outer state; buffers averaged by their rule."""

from __future__ import annotations

import pytest
import torch
import trio

from p2pcompute.errors import ConfigError
from p2pcompute.testing import LocalGroup
from p2pcompute.training.averager import SoloAverager
from p2pcompute.training.diloco import DiLoCo


def bf16_ones() -> torch.nn.Linear:
    model = torch.nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    return model


async def outer_steps_of_tiny_updates(master: object, steps: int = 10) -> DiLoCo:
    # Each inner step moves every weight by 2**-6 (exact in bf16); the outer step (lr 0.1, no
    # momentum) then moves the anchor by 0.0015625: less than half a bf16 ulp below 1.0.
    model = bf16_ones()
    inner = torch.optim.SGD(model.parameters(), lr=2.0**-6)
    opt = DiLoCo(model, inner, SoloAverager(), inner_steps=1, outer_lr=0.1, outer_momentum=0.0,
                 master_dtype=master)  # type: ignore[arg-type]
    for _ in range(steps):
        model.weight.grad = torch.ones_like(model.weight)
        await opt.astep()
    return opt


async def test_fp32_master_anchor_keeps_updates_a_bf16_anchor_would_round_away() -> None:
    opt = await outer_steps_of_tiny_updates("auto")
    assert opt.anchor[0].dtype == torch.float32
    # 10 outer steps of 0.1 * 2**-6 each, accumulated in fp32 (the pseudo-gradient excludes the
    # anchor's own rounding into bf16, so every step sees exactly the inner progress)
    torch.testing.assert_close(opt.anchor[0], torch.full((4, 4), 1 - 10 * 0.1 * 2.0**-6), rtol=0, atol=1e-6)
    assert opt.params[0].dtype == torch.bfloat16
    assert float(opt.params[0].detach()[0, 0]) == pytest.approx(0.984375, abs=2.0**-8)

    kept_low = await outer_steps_of_tiny_updates(None)
    assert kept_low.anchor[0].dtype == torch.bfloat16
    assert bool((kept_low.params[0] == 1.0).all())  # every outer step was rounded away


async def test_bf16_peers_average_in_fp32_and_stay_bit_identical() -> None:
    group = LocalGroup()
    models, opts = [], []
    for i in range(2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        model = model.to(torch.bfloat16)
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        models.append(model)
        opts.append(DiLoCo(model, inner, group.join(f"p{i}"), inner_steps=3, outer_momentum=0.5))

    async def peer(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        for _ in range(9):
            x = torch.randn(16, 8, generator=g).to(torch.bfloat16)
            models[i](x).float().pow(2).mean().backward()
            await opts[i].astep(samples=16)
            opts[i].zero_grad()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(peer, i)
    assert opts[0].state_digest() == opts[1].state_digest()
    assert all(a.dtype == torch.float32 for a in opts[0].anchor)
    momentum = [opts[0].outer.state[a]["momentum_buffer"] for a in opts[0].anchor]
    assert all(m.dtype == torch.float32 for m in momentum)
    assert all(r.participants == ("p0", "p1") for r in opts[0].history)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert a.dtype == torch.bfloat16
        assert torch.equal(a, b)
    with pytest.raises(ConfigError):
        DiLoCo(models[0], torch.optim.SGD(models[0].parameters()), SoloAverager(), master_dtype=torch.int8)


def bn_model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))


async def train_bn_pair(buffers: str) -> tuple[list[torch.nn.Module], list[DiLoCo]]:
    group = LocalGroup()
    models = [bn_model(), bn_model()]
    opts = [
        DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.01), group.join(f"p{i}"), inner_steps=4,
               buffers=buffers)  # type: ignore[arg-type]
        for i, m in enumerate(models)
    ]

    async def peer(i: int) -> None:
        g = torch.Generator().manual_seed(10 + i)
        for _ in range(4):
            x = torch.randn(32, 4, generator=g) + 3.0 * i  # the peers see differently shifted data
            models[i](x).pow(2).mean().backward()
            await opts[i].astep(samples=32 if i == 0 else 96)
            opts[i].zero_grad()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(peer, i)
    return models, opts


async def test_batchnorm_running_stats_are_averaged_with_sample_weights() -> None:
    local_models, _ = await train_bn_pair("local")
    bns = [m[1] for m in local_models]
    assert not torch.equal(bns[0].running_mean, bns[1].running_mean)
    # the rule: weighted by the samples each peer trained on since the last outer step (32 vs 96)
    want_mean = (bns[0].running_mean * 32 + bns[1].running_mean * 96) / 128
    want_var = (bns[0].running_var * 32 + bns[1].running_var * 96) / 128

    models, opts = await train_bn_pair("average")
    for m in models:
        bn = m[1]
        torch.testing.assert_close(bn.running_mean, want_mean)
        torch.testing.assert_close(bn.running_var, want_var)
        assert int(bn.num_batches_tracked) == 4  # integer buffers stay local
    assert torch.equal(models[0][1].running_mean, models[1][1].running_mean)
    state = opts[0].export_state()
    assert {"buffer/1.running_mean", "buffer/1.running_var"} <= set(state.tensors)
    assert opts[0].state_digest() == opts[1].state_digest()
