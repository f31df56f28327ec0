"""DiLoCo on CUDA models: a CPU anchor fed through pinned buffers, results as on the CPU. Needs a GPU."""

from __future__ import annotations

import pytest
import torch
import trio

from p2pcompute.testing import LocalGroup
from p2pcompute.training.diloco import DiLoCo

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = [pytest.mark.cuda, cuda]


async def train_pair(device: str, dtype: torch.dtype, overlap: bool = False) -> list[DiLoCo]:
    group = LocalGroup()
    models, opts = [], []
    with trio.fail_after(60):
        async with trio.open_nursery() as background:
            for i in range(2):
                torch.manual_seed(0)
                model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
                model = model.to(device, dtype)
                models.append(model)
                opts.append(DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.05), group.join(f"p{i}"),
                                   inner_steps=4, outer_momentum=0.5, overlap=overlap, nursery=background))

            async def peer(i: int) -> None:
                g = torch.Generator().manual_seed(i)
                for _ in range(12):
                    x = torch.randn(8, 16, generator=g).to(device, dtype)
                    models[i](x).float().pow(2).mean().backward()
                    await opts[i].astep(samples=8)
                    opts[i].zero_grad()
                await opts[i].flush()

            async with trio.open_nursery() as nursery:
                for i in range(2):
                    nursery.start_soon(peer, i)
    return opts


async def test_cuda_model_with_cpu_anchor_matches_the_cpu_run() -> None:
    gpu = await train_pair("cuda", torch.float32)
    cpu = await train_pair("cpu", torch.float32)
    assert gpu[0].anchor[0].device.type == "cpu"
    assert gpu[0]._pinned is not None
    assert all(b.is_pinned() for b in gpu[0]._pinned)
    assert gpu[0].state_digest() == gpu[1].state_digest()
    for a, b in zip(gpu[0].params, cpu[0].params, strict=True):
        assert a.device.type == "cuda"
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)


async def test_bf16_cuda_model_keeps_an_fp32_master_on_the_cpu() -> None:
    opts = await train_pair("cuda", torch.bfloat16)
    assert all(a.dtype == torch.float32 and a.device.type == "cpu" for a in opts[0].anchor)
    assert opts[0].state_digest() == opts[1].state_digest()
    for p, a in zip(opts[0].params, opts[0].anchor, strict=True):
        torch.cuda.synchronize()
        assert torch.equal(p.cpu(), a.to(torch.bfloat16))  # the upload after the last outer step landed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
async def test_overlapped_cuda_model_uploads_on_a_side_stream_and_matches_the_cpu_run(
    dtype: torch.dtype,
) -> None:
    gpu = await train_pair("cuda", dtype, overlap=True)
    assert gpu[0].history[-1].overlapped
    assert gpu[0].state_digest() == gpu[1].state_digest()
    assert gpu[0]._side_streams  # type: ignore[attr-defined]
    torch.cuda.synchronize()
    for p, a in zip(gpu[0].params, gpu[0].anchor, strict=True):
        assert torch.equal(p.cpu(), a.to(dtype))  # after flush: the model is the shared anchor
    if dtype == torch.float32:
        cpu = await train_pair("cpu", dtype, overlap=True)
        for a, b in zip(gpu[0].params, cpu[0].params, strict=True):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)
