"""The node CLI as real processes: bootstrap, peers, status, signals and exit codes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _env(*extra_path: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *extra_path, env.get("PYTHONPATH", "")])
    return env


class Proc:
    """A CLI process whose stdout lines are collected by a reader thread."""

    def __init__(self, *args: str, extra_path: tuple[str, ...] = ()) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-m", "p2pcompute.cli", *args],
            cwd=ROOT,
            env=_env(*extra_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def line(self, index: int, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.lines) <= index:
                left = deadline - time.monotonic()
                if left <= 0 or (self.p.poll() is not None and len(self.lines) <= index):
                    err = self.p.stderr.read() if self.p.poll() is not None and self.p.stderr else ""
                    raise AssertionError(f"no line {index} from {self.p.args}: {self.lines} {err}")
                self._cond.wait(min(left, 0.5))
            return self.lines[index]

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> tuple[int, str]:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise AssertionError(f"{self.p.args} did not exit on {sig}") from None
        self._t.join(5)
        err = self.p.stderr.read() if self.p.stderr else ""
        if self.p.stderr:
            self.p.stderr.close()
        if self.p.stdout:
            self.p.stdout.close()
        return self.p.returncode, err


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pcompute.cli", *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


OPERATOR_TASKS = """
from p2pcompute.tasks import TaskRegistry

registry = TaskRegistry()


@registry.task("double")
def double(tensors, params):
    return {"y": tensors["x"] * params["factor"]}, {"factor": params["factor"]}
"""


async def _buy_tasks(bootstrap: str, provider: str) -> None:
    """A requester in this process buys the operator's kind and the built-in benchmark kind."""
    import torch
    import trio

    from p2pcompute.overlay import open_node
    from p2pcompute.tasks import open_tasks
    from p2pcompute.tensors import open_lane

    with trio.fail_after(90):
        async with (
            open_node(bootstrap=[bootstrap]) as node,
            open_lane(node) as lane,
            open_tasks(node, lane=lane) as tasks,
        ):
            await tasks.wait_for_providers(1, timeout=60)
            res = await tasks.run_task("double", {"x": torch.arange(6.0)}, {"factor": 3})
            assert res.provider == provider
            assert torch.equal(res.outputs["y"], torch.arange(6.0) * 3)
            assert res.receipt is not None
            bench = await tasks.run_task("matmul-bench", {}, {"n": 32})
            assert bench.info["seconds_best"] > 0


def test_bootstrap_two_peers_status_json(tmp_path: Path) -> None:
    key = tmp_path / "boot.key"
    (tmp_path / "operator_tasks.py").write_text(OPERATOR_TASKS)
    ledger = tmp_path / "provider.ledger"
    boot = Proc("bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", "--key", str(key))
    procs = [boot]
    try:
        addr = boot.line(0)
        assert addr.startswith("/ip4/127.0.0.1/tcp/")
        assert "/p2p/12D3KooW" in addr
        assert (key.stat().st_mode & 0o777) == 0o600
        selling = ("--tasks", "operator_tasks:registry", "--ledger", str(ledger))
        peers = [
            Proc(
                "peer",
                "--bootstrap",
                addr,
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--show-peers",
                "2",
                *(selling if i == 0 else ("--advert-interval", "60")),
                extra_path=(str(tmp_path),),
            )
            for i in range(2)
        ]
        procs += peers
        ids = {p.line(0).rsplit("/p2p/", 1)[1] for p in peers}
        for p in peers:  # each peer's view: a header line then a table that lists the other one
            assert p.line(1).startswith("view of ")
        status = run_cli("status", "--bootstrap", addr, "--json", "--wait", "1")
        assert status.returncode == 0, status.stderr
        listed = json.loads(status.stdout)
        by_id = {entry["peer_id"]: entry for entry in listed}
        assert ids <= set(by_id)
        slow = peers[1].line(0).rsplit("/p2p/", 1)[1]
        ttl = {pid: by_id[pid]["expires"] - by_id[pid]["last_seen"] for pid in ids}
        assert 170 < ttl[slow] <= 180  # --advert-interval 60: valid for 3 intervals
        other = next(iter(ids - {slow}))
        assert ttl[other] <= 30  # the default: 10 s, valid for 30
        for pid in ids:
            assert by_id[pid]["role"] == "peer"
            assert by_id[pid]["addrs"]
            assert by_id[pid]["capacity"]["cpu_cores"] >= 1
        # The first peer sells the operator's kind over the tensor lane and records receipts.
        import trio

        trio.run(_buy_tasks, addr, peers[0].line(0).rsplit("/p2p/", 1)[1])
    finally:
        results = [p.stop() for p in reversed(procs)]
    for code, err in results:
        assert code == 0, err
        assert "Traceback" not in err
    verify = run_cli("ledger", "verify", str(ledger))
    assert verify.returncode == 0, verify.stderr
    # The provider appends a receipt once the requester's countersignature arrives; the last
    # one may still be in flight when SIGINT stops it, so at least the first must be there.
    m = re.search(r"(\d+) receipts", verify.stdout)
    assert m is not None, verify.stdout
    assert int(m.group(1)) >= 1


def test_bootstrap_exits_cleanly_on_sigterm() -> None:
    boot = Proc("bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0")
    boot.line(0)
    code, err = boot.stop(signal.SIGTERM)
    assert code == 0
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["status", "--bootstrap", "/ip4/127.0.0.1/tcp/notaport"], 3, "multiaddr"),
        (["status", "--bootstrap", "/ip4/127.0.0.1/tcp/1"], 3, "/p2p/"),
        (
            [
                "status",
                "--bootstrap",
                "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWMdXMwwcfpkBTSCFouMKZN3Y9BorymzzMCYy7JvBjMS9g",
            ],
            4,
            "bootstrap",
        ),
        (["bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", "--key", "/"], 3, "key file"),
        (["bootstrap", "--listen", "/ip4/999.0.0.1/tcp/0"], 3, "multiaddr"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code(args: list[str], code: int, needle: str) -> None:
    res = run_cli(*args)
    assert res.returncode == code, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("p2pcompute: error:"), res.stderr
    assert needle in lines[0]


def test_group_readable_key_file_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    run_ok = run_cli("status", "--bootstrap", "/ip4/127.0.0.1/tcp/1", "--key", str(key))
    assert run_ok.returncode == 3
    assert key.exists()
    key.chmod(0o644)
    res = run_cli("status", "--bootstrap", "/ip4/127.0.0.1/tcp/1", "--key", str(key))
    assert res.returncode == 3
    assert "chmod 600" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
