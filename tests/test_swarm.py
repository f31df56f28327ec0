"""The synchronous Swarm facade: lifecycle, clean shutdown, Ctrl-C, and real averaging between peers.

These tests are synchronous on purpose: the facade is for synchronous training scripts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
import trio

from p2pcompute.errors import LocalProtocolError, PeerTimeout
from p2pcompute.progress import ProgressUpdate
from p2pcompute.training.swarm import Swarm

ROOT = Path(__file__).resolve().parents[1]


def swarm_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("p2pcompute-swarm")]


def tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    # A private generator, not torch.manual_seed: two training threads build their models at
    # once, and the global RNG would hand them different initial weights.
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(4, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_exception_in_training_loop_shuts_down_cleanly() -> None:
    before = threading.active_count()
    model, inner = tiny()
    swarm = Swarm(network=False)
    opts = []

    def training_script() -> None:
        with swarm:
            opt = swarm.diloco(model, inner, inner_steps=2)
            opts.append(opt)
            for step in range(10):
                model(torch.ones(3, 4)).sum().backward()
                opt.step()
                opt.zero_grad()
                if step == 4:
                    raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        training_script()
    opt = opts[0]
    assert not swarm.running
    assert swarm._thread is not None
    assert not swarm._thread.is_alive()  # trio.run returned: no task can be left
    assert swarm_threads() == []
    assert threading.active_count() == before
    assert opt.outer_step == 2
    with pytest.raises(LocalProtocolError):
        swarm.call(trio.lowlevel.checkpoint)
    with pytest.raises(LocalProtocolError):
        swarm.start()


def test_call_timeout_and_errors_cross_the_thread() -> None:
    with Swarm(network=False) as swarm:
        with pytest.raises(PeerTimeout):
            swarm.call(trio.sleep_forever, timeout=0.2)

        async def fail() -> None:
            await trio.lowlevel.checkpoint()
            raise KeyError("inside")

        with pytest.raises(KeyError):
            swarm.call(fail)
        assert swarm.call(lambda: trio.to_thread.run_sync(lambda: 42)) == 42  # trio thread still healthy
    assert swarm_threads() == []


def test_ctrl_c_while_blocked_in_a_call(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys, threading, trio
        from p2pcompute.training.swarm import Swarm
        swarm = Swarm(network=False).start()
        try:
            print("ready", flush=True)
            swarm.call(trio.sleep_forever)
        except KeyboardInterrupt:
            swarm.close()
            left = [t.name for t in threading.enumerate() if t.name.startswith("p2pcompute-swarm")]
            print("interrupted", left, flush=True)
            sys.exit(0)
        sys.exit(3)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "interrupted []" in out


def test_two_peers_average_for_real_and_a_joiner_gets_identical_state(tmp_path: Path) -> None:
    # Real nodes, lanes and the collective, each Swarm in its own background thread; the two
    # training loops run in two user threads. Same seed, so both peers start from one state.
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(1))
    y = x.sum(dim=1, keepdim=True)
    results: dict[str, object] = {}
    opts: dict[str, object] = {}
    with Swarm(network=True, advertise=True, role="bootstrap", advert_interval=1.0) as boot:
        common = {"bootstrap": boot.addrs, "patience": 5.0, "matchmaking_timeout": 20.0,
                  "advert_interval": 1.0}
        with Swarm(**common) as a, Swarm(**common) as b:
            a.wait_for_peers(1, timeout=30)
            b.wait_for_peers(1, timeout=30)
            barrier = threading.Barrier(2, timeout=60)

            def train(name: str, swarm: Swarm, offset: int) -> None:
                try:
                    model, inner = tiny()
                    opt = swarm.diloco(model, inner, inner_steps=5, join=False)
                    opts[name] = opt
                    barrier.wait()
                    for s in range(15):
                        lo = (s * 2 + offset) * 8
                        torch.nn.functional.mse_loss(model(x[lo : lo + 8]), y[lo : lo + 8]).backward()
                        opt.step()
                        opt.zero_grad()
                    results[name] = [r.participants for r in opt.history]
                except BaseException as exc:
                    results[name] = exc

            t = threading.Thread(target=train, args=("b", b, 1))
            t.start()
            train("a", a, 0)
            t.join(120)
            assert not t.is_alive()
            for name in ("a", "b"):
                assert not isinstance(results[name], BaseException), results[name]
            pa, pb = opts["a"], opts["b"]
            assert results["a"] == results["b"]
            assert all(len(p) == 2 for p in results["a"]), results["a"]  # type: ignore[attr-defined]
            assert pa.state_digest() == pb.state_digest()  # type: ignore[attr-defined]
            assert pa.bytes_sent > 0  # type: ignore[attr-defined]

            # A joiner downloads the current state from both and holds bit-identical parameters.
            with Swarm(**common) as c:
                c.wait_for_peers(2, timeout=30)
                model, inner = tiny()
                torch.nn.init.zeros_(model.weight)
                opt_c = c.diloco(model, inner, inner_steps=5, join=False)
                shown: list[ProgressUpdate] = []
                c.progress = shown.append  # the download's progress reaches the script's callback
                assert c.call(lambda: c._download(opt_c), timeout=60)
                assert shown[-1].finished
                assert shown[-1].done == shown[-1].total > 0
                assert opt_c.state_digest() == pa.state_digest()  # type: ignore[attr-defined]
                assert opt_c.outer_step == 3
                assert torch.equal(model.weight, pa.anchor[0])  # type: ignore[attr-defined]
    assert swarm_threads() == []
