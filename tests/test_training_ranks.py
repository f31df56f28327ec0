"""ShardedAverager and ShardedDiLoCo on 2 real gloo ranks: rank 0's group result reaches every rank,
failures reach all, the gathered state is the whole model's, a state rank 0 loads reaches every rank."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import sys, torch, trio, torch.distributed as dist
    from p2pcompute.errors import ConfigError, TaskFailed
    from p2pcompute.training.diloco import DiLoCo
    from p2pcompute.training.ranks import ShardLayout, ShardedDiLoCo
    from p2pcompute.training.state import TrainingState
    from p2pcompute.training.averager import AveragingOutcome
    from p2pcompute.training.ranks import ShardedAverager

    class HalfGroup:
        # stands in for the swarm: another peer contributed zeros, so the mean is half of ours
        peer_id = "me"
        fail = False
        misconfigured = False
        async def average(self, tensors, *, weight, round_id, compression="none", timeout=None):
            await trio.lowlevel.checkpoint()
            if self.fail:
                raise TaskFailed("no group formed")
            if self.misconfigured:
                raise ConfigError("not a failed round")
            self.seen = [t.numel() for t in tensors]
            for t in tensors:
                t.mul_(0.5)
            return AveragingOutcome(("me", "other"), bytes_sent=10)

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = HalfGroup() if rank == 0 else None
    avg = ShardedAverager(group)
    # uneven shards, mixed dtypes, and an empty one on rank 1
    mine = [torch.full((3,), 2.0 + rank), torch.full((2, 2), 4.0, dtype=torch.float64)]
    if rank == 1:
        mine.append(torch.zeros(0))
    out = trio.run(lambda: avg.average(mine, weight=8.0, round_id=0))
    assert torch.equal(mine[0], torch.full((3,), (2.0 + rank) / 2)), mine[0]
    assert torch.equal(mine[1], torch.full((2, 2), 2.0, dtype=torch.float64))
    assert out.participants == ("me", "other"), out.participants
    if rank == 0:
        assert group.seen == [7, 7], group.seen
        group.fail = True
    try:
        trio.run(lambda: avg.average(mine, weight=8.0, round_id=1))
    except TaskFailed as exc:
        assert "no group formed" in str(exc), exc
    else:
        raise AssertionError("a failed round must fail on every rank")
    assert torch.equal(mine[0], torch.full((3,), (2.0 + rank) / 2))  # untouched by the failed round

    # ShardedDiLoCo over rows of two tensors (5 rows: 3 + 2; 4 rows: 2 + 2)
    whole = [torch.linspace(-1, 1, 15).reshape(5, 3), torch.linspace(0, 2, 4)]
    def rows(t, r):
        sizes = [c.shape[0] for c in torch.arange(t.shape[0]).chunk(2)]
        return t[sum(sizes[:r]) : sum(sizes[: r + 1])]
    def grad(i, step):
        return torch.linspace(0.1, 0.5, whole[i].numel()).reshape(whole[i].shape) * (step + 1)
    shards = [(f"w{i}", rows(t, rank).clone(), tuple(t.shape)) for i, t in enumerate(whole)]
    layout = ShardLayout.build(shards)
    group = HalfGroup() if rank == 0 else None
    params = [t for _, t, _ in shards]
    opt = ShardedDiLoCo([(n, t) for n, t, _ in shards], torch.optim.SGD(params, lr=0.1),
                        ShardedAverager(group, layout=layout), inner_steps=1, layout=layout)
    ref_params = [t.clone() for t in whole]
    ref = DiLoCo([(f"w{i}", t) for i, t in enumerate(ref_params)], torch.optim.SGD(ref_params, lr=0.1),
                 HalfGroup(), inner_steps=1)
    for step in range(3):
        for i, p in enumerate(params):
            p.grad = rows(grad(i, step), rank).clone()
            ref_params[i].grad = grad(i, step)
        assert trio.run(opt.astep).participants == ("me", "other")
        trio.run(ref.astep)
    if rank == 0:
        assert group.seen == [15, 4], group.seen  # whole parameters went to the group
        assert opt.state_digest() == ref.state_digest()  # the whole state, bit for bit
        assert opt.model_digest() == ref.model_digest()
    for i, p in enumerate(params):
        assert torch.equal(p, rows(ref_params[i], rank))
    # a state rank 0 loads (a join, a re-sync) reaches every rank's rows
    if rank == 0:
        opt.load_state(TrainingState(9, {"param/w0": whole[0] * 2, "param/w1": whole[1] * 2},
                                     {"mode": "diloco", "inner_steps": 1}))
    opt.distribute()
    assert opt.outer_step == 9
    for i, p in enumerate(params):
        assert torch.equal(p, rows(whole[i] * 2, rank))
    # our own misconfiguration on rank 0 is raised on every rank, not taken as a failed round
    if rank == 0:
        group.misconfigured = True
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        trio.run(opt.astep)
    except ConfigError as exc:
        assert "not a failed round" in str(exc), exc
    else:
        raise AssertionError("a ConfigError on rank 0 must stop every rank")

    # FSDP (fully_shard): sharded inner steps and DiLoCo on the shards equal DiLoCo on the whole
    # model, whose gradient is the mean over the ranks' batches
    import gc
    from torch.distributed.fsdp import fully_shard
    from p2pcompute.testing import TeacherTask, make_model
    from p2pcompute.training.averager import SoloAverager
    from p2pcompute.training.ranks import fsdp_shards
    task = TeacherTask(seed=0)
    model = make_model(seed=0)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    shards = fsdp_shards(model)
    layout = ShardLayout.build(shards)
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
    fopt = ShardedDiLoCo([(n, t) for n, t, _ in shards], inner,
                         ShardedAverager(SoloAverager() if rank == 0 else None, layout=layout),
                         inner_steps=5, outer_momentum=0.5, layout=layout, runner=trio.run)
    g = torch.Generator().manual_seed(1000 + rank)
    while fopt.outer_step < 2:
        x, y = task.batch(32, g)
        torch.nn.functional.mse_loss(model(x), y).backward()  # reduce-scatter
        fopt.step(samples=64)
        fopt.zero_grad()
    full = [p.full_tensor().detach() for p in model.parameters()]
    if rank == 0:
        x_eval, y_eval = task.eval_set()
        plain, ref = make_model(seed=0), make_model(seed=0)
        with torch.no_grad():
            for p, f in zip(plain.parameters(), full):
                p.copy_(f)
        ropt = DiLoCo(ref, torch.optim.AdamW(ref.parameters(), lr=3e-3), SoloAverager(), inner_steps=5,
                      outer_momentum=0.5, runner=trio.run)
        gens = [torch.Generator().manual_seed(1000 + r) for r in range(2)]
        for _ in range(10):
            xs, ys = zip(*(task.batch(32, gg) for gg in gens))
            torch.nn.functional.mse_loss(ref(torch.cat(xs)), torch.cat(ys)).backward()
            ropt.step(samples=64)
            ropt.zero_grad()
        with torch.no_grad():
            got = float(torch.nn.functional.mse_loss(plain(x_eval), y_eval))
            want = float(torch.nn.functional.mse_loss(ref(x_eval), y_eval))
        assert abs(got - want) <= 1e-4 * want, (got, want)
        assert fopt.model_digest() == ropt.model_digest()
    del model, inner, fopt, shards
    gc.collect()
    # one file per rank: two ranks printing to one pipe can interleave ("okok 1")
    open(sys.argv[1] + f"/ok{rank}", "w").write(f"ok {rank}")
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_sharded_averager_moves_the_group_result_to_every_rank(tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.read_text() for p in tmp_path.glob("ok*")) == ["ok 0", "ok 1"]
