"""A 2-rank FSDP peer (torchrun, gloo) joins a one-process peer's run mid-way and averages with it.

The one-process peer trains here, through a real Swarm; the sharded peer is
examples/torchrun_fsdp.py with other initial weights, so it holds the run's state only if its
rank 0 downloaded it and gave each rank its rows. After the rounds they average together, the
sharded peer's whole state (gathered on rank 0) must be bit-identical to the one-process peer's,
and what it serves to joiners too.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from p2pcompute.testing import TeacherTask, make_model
from p2pcompute.training.diloco import StepReport
from p2pcompute.training.state import TrainingState
from p2pcompute.training.statesync import download_state, fetch_manifest
from p2pcompute.training.swarm import Swarm

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

H = 5
JOINT_ROUNDS = 3


async def published(swarm: Swarm, peer: str, step: int) -> TrainingState:
    """The state ``peer`` serves once it has published outer ``step`` (remote progress: polled)."""
    with trio.fail_after(30):
        while True:
            manifest = await fetch_manifest(swarm.node, peer, timeout=10)
            if manifest is not None and manifest.step >= step:
                break
            await trio.sleep(0.05)
    state, _ = await download_state(swarm.node, [peer], timeout=30)
    return state


def test_fsdp_peer_joins_mid_run_and_averages_bit_identically(tmp_path: Path) -> None:
    task = TeacherTask(seed=0)
    model = make_model(seed=0)
    g = torch.Generator().manual_seed(7)
    with Swarm(run="toy-fsdp", patience=2.0, matchmaking_timeout=20.0, advert_interval=1.0) as a:
        opt = a.diloco(model, torch.optim.AdamW(model.parameters(), lr=3e-3), inner_steps=H,
                       outer_momentum=0.5, join=False)

        def phase() -> StepReport:
            while True:
                x, y = task.batch(32, g)
                torch.nn.functional.mse_loss(model(x), y).backward()
                report = opt.step(samples=32)
                opt.zero_grad()
                if report is not None:
                    return report

        phase()
        phase()  # the run is at outer step 2 before the sharded peer starts
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "examples" / "torchrun_fsdp.py"), "--bootstrap", a.addrs[0],
               "--inner-steps", str(H), "--outer-steps", str(JOINT_ROUNDS), "--seed", "1",
               "--patience", "2", "--report", str(tmp_path)]
        events: queue.Queue[dict[str, Any]] = queue.Queue()
        err = (tmp_path / "stderr.txt").open("w")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})

        def read() -> None:  # only rank 0 prints, one JSON line per write
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("{"):
                    events.put(json.loads(line))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            # The sharded peer looks at our state (outer step 2), then waits for our next outer
            # step to download the state right after it. Take that step once it has looked, and
            # no other until it has joined (else it would join a step behind us).
            server = a.server
            assert server is not None
            deadline = time.monotonic() + 120
            while server.served_manifests == 0:  # a remote process's progress: polled
                assert time.monotonic() < deadline, "the sharded peer never asked for our state"
                assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
                time.sleep(0.05)
            phase()
            joined = events.get(timeout=max(1.0, deadline - time.monotonic()))
            assert joined["event"] == "start"
            assert joined["outer_step"] == opt.outer_step == 3  # the run's state, not its own weights
            target = joined["outer_step"] + JOINT_ROUNDS
            reports = []
            served: TrainingState | None = None
            while opt.outer_step < target:
                reports.append(phase())
                if len(reports) == 2:
                    # the sharded peer serves the whole state (gathered on its rank 0) to joiners:
                    # download it from that peer alone, as a joiner would (it waits for us in the
                    # next round, so its snapshot holds still once it has published this step)
                    other = next(p for p in reports[-1].participants if p != a.peer_id)
                    served = a.call(functools.partial(published, a, other, opt.outer_step), timeout=60)
                    assert served.digest() == opt.state_digest()
            assert served is not None
            assert proc.wait(timeout=120) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            err.close()
        reader.join(10)
        theirs = []
        while not events.empty():
            theirs.append(events.get())
        (done,) = [e for e in theirs if e["event"] == "done"]
        outer = [e for e in theirs if e["event"] == "outer"]
        assert done["outer_step"] == opt.outer_step == target
        assert [len(r.participants) for r in reports] == [2] * JOINT_ROUNDS, reports
        assert [len(e["participants"]) for e in outer] == [2] * JOINT_ROUNDS, outer
        assert done["state_digest"] == opt.state_digest().hex()
        # the collective's round log names a round by the outer step it produced
        assert a.collective.round_log.recent[-1]["round"] == f"outer-{target}"
        # both ranks finished the same steps (each wrote its own file)
        ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert [r["outer_step"] for r in ranks] == [target, target]
