"""ShardedAverager on 2 real gloo ranks: rank 0's group result reaches every rank; failures reach all."""

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
    from p2pcompute.errors import TaskFailed
    from p2pcompute.training.averager import AveragingOutcome
    from p2pcompute.training.ranks import ShardedAverager

    class HalfGroup:
        # stands in for the swarm: another peer contributed zeros, so the mean is half of ours
        peer_id = "me"
        fail = False
        async def average(self, tensors, *, weight, round_id, compression="none", timeout=None):
            await trio.lowlevel.checkpoint()
            if self.fail:
                raise TaskFailed("no group formed")
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
