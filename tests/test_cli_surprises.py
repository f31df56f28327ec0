"""The command line as a new user meets it (issue #19, point 4): real processes, exit codes, one line.

Every case here runs ``python -m p2pcompute.cli`` (or ``examples/train.py``) as a process and
checks the documented exit code (0 ok, 1 runtime failure, 2 usage, 3 bad local configuration,
4 unreachable) and that stderr says what went wrong in one line, never with a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from p2pcompute.cli import build_parser
from p2pcompute.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
# -P: like the installed console script, the current folder is not on sys.path
CLI = [sys.executable, "-P", "-m", "p2pcompute.cli"]
GUARD = 90.0  # against hangs on a loaded machine; measures nothing
NOBODY = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWMdXMwwcfpkBTSCFouMKZN3Y9BorymzzMCYy7JvBjMS9g"
LOCAL = ("--listen", "/ip4/127.0.0.1/tcp/0")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("P2PCOMPUTE_DEBUG", None)
    return env


def cli(*args: str, cwd: Path = ROOT, timeout: float = GUARD) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def one_error_line(res: subprocess.CompletedProcess[str], code: int, needle: str) -> str:
    """Assert exit ``code`` and exactly one stderr line, mentioning ``needle``, without a traceback.

    Progress lines of long work (the ``p2pcompute.progress`` logger) may come before it."""
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if " p2pcompute.progress: " not in line]
    assert len(lines) == 1, res.stderr
    assert "error:" in lines[0], lines[0]
    assert needle in lines[0], lines[0]
    return lines[0]


class Running:
    """A process whose stdout and stderr lines are collected by reader threads."""

    def __init__(self, argv: list[str], *, cwd: Path = ROOT) -> None:
        self.p = subprocess.Popen(
            argv, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._read, args=(self.p.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.p.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read(self, pipe: object, into: list[str]) -> None:
        for line in pipe:  # type: ignore[attr-defined]
            with self._cond:
                into.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, into: list[str], pred: object, timeout: float = GUARD) -> str:
        """The first line of ``into`` (self.out or self.err) for which ``pred(line)`` holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in into:
                    if pred(line):  # type: ignore[operator]
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self.p.poll() is not None:
                    raise AssertionError(f"no such line from {self.p.args}: out={self.out} err={self.err}")
                self._cond.wait(min(left, 0.5))

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            code = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise AssertionError(f"{self.p.args} did not exit on {sig}") from None
        for t in self._threads:
            t.join(5)
        return code


def node(*args: str, cwd: Path = ROOT) -> Running:
    return Running([*CLI, *args], cwd=cwd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------ --version


def test_version_on_the_command_and_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    res = cli("--version")
    assert res.returncode == 0, res
    version = res.stdout.strip()
    assert version.startswith("p2pcompute "), res
    for argv in (["task", "run", "--version"], ["ledger", "show", "--version"]):
        res = cli(*argv)
        assert res.returncode == 0, res
        assert res.stdout.strip() == version
    # every subcommand, however deep, in-process
    paths: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    paths.append([*prefix, name])
                    walk(child, [*prefix, name])

    walk(build_parser(), [])
    assert {"bootstrap", "peer", "status", "bench", "ledger", "task"} <= {p[0] for p in paths}
    for path in paths:
        with pytest.raises(SystemExit) as info:
            cli_main([*path, "--version"])
        assert info.value.code == 0, path
        assert capsys.readouterr().out.startswith("p2pcompute "), path


# ------------------------------------------------------------------------------ usage errors: exit 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["status", "--bootstrap", NOBODY, "--wait", "-5"], "--wait"),
        (["peer", "--bootstrap", NOBODY, "--task-slots", "0"], "--task-slots"),
        (["peer", "--bootstrap", NOBODY, "--timeout", "0"], "--timeout"),
        (["bench", "link", "--peer", "/ip4/127.0.0.1/tcp/1", "--wan", "garbage"], "--wan"),
        (["task", "run"], "kind"),
    ],
)
def test_bad_option_values_are_usage_errors(args: list[str], needle: str) -> None:
    one_error_line(cli(*args), 2, needle)


# ------------------------------------------------------------------------------ listen addresses: exit 3


def test_a_second_node_on_a_taken_port_is_refused() -> None:
    port = free_port()
    first = node("bootstrap", "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    try:
        first.wait_line(first.out, lambda line: "/p2p/" in line)
        t0 = time.monotonic()
        res = cli("bootstrap", "--listen", f"/ip4/127.0.0.1/tcp/{port}")
        one_error_line(res, 3, "already in use")
        assert time.monotonic() - t0 < 30
        one_error_line(cli("bootstrap", "--listen", f"/ip4/0.0.0.0/tcp/{port}"), 3, "already in use")
    finally:
        assert first.stop() == 0


@pytest.mark.parametrize(
    ("listen", "needle"),
    [
        ("/ip4/127.0.0.1/udp/4001", "only TCP"),
        ("/ip4/10.255.255.1/tcp/0", "no address 10.255.255.1"),
    ],
)
@pytest.mark.parametrize("command", ["bootstrap", "peer"])
def test_a_listen_address_that_cannot_be_served_fails_fast(command: str, listen: str, needle: str) -> None:
    extra = ["--bootstrap", NOBODY] if command == "peer" else []
    t0 = time.monotonic()
    one_error_line(cli(command, "--listen", listen, *extra, timeout=60), 3, needle)
    assert time.monotonic() - t0 < 30


# ------------------------------------------------------------------------------ --tasks modules: exit 3


@pytest.mark.parametrize(
    ("source", "spec", "needle"),
    [
        (None, "json:dumps", "needs arguments"),
        ("def broken(:\n", "lab_broken:registry", "syntax error"),
        ("raise RuntimeError('no GPU here')\n", "lab_raises:registry", "no GPU here"),
        ("x = 1\n", "lab_noattr:registry", "no attribute"),
        ("registry = 42\n", "lab_int:registry", "not a TaskRegistry"),
    ],
)
def test_broken_task_modules_give_one_line(
    tmp_path: Path, source: str | None, spec: str, needle: str
) -> None:
    if source is not None:
        (tmp_path / f"{spec.split(':')[0]}.py").write_text(source)
    res = cli("peer", *LOCAL, "--bootstrap", NOBODY, "--tasks", spec, cwd=tmp_path)
    one_error_line(res, 3, needle)


LAB_TASKS = """
from p2pcompute.tasks import TaskRegistry

registry = TaskRegistry()


@registry.task("triple", price=0.25)
def triple(tensors, params):
    \"\"\"Multiply x by three.\"\"\"
    return {"y": tensors["x"] * 3}
"""


def test_tasks_module_in_the_current_folder_is_found(tmp_path: Path) -> None:
    (tmp_path / "lab_tasks.py").write_text(LAB_TASKS)
    boot = node("bootstrap", *LOCAL)
    procs = [boot]
    try:
        addr = boot.wait_line(boot.out, lambda line: "/p2p/" in line)
        peer = node("peer", *LOCAL, "--bootstrap", addr, "--tasks", "lab_tasks:registry", cwd=tmp_path)
        procs.append(peer)
        joined = peer.wait_line(peer.err, lambda line: "selling task kinds" in line)
        assert "triple" in joined
        assert "matmul" in joined
    finally:
        codes = [p.stop() for p in reversed(procs)]
    assert codes == [0, 0], (codes, procs[-1].err)
    assert not any("Traceback" in line for p in procs for line in p.err)


# ------------------------------------------------------------------------------ a lost bootstrap node


def test_a_peer_says_when_its_bootstrap_node_is_gone_and_keeps_trying() -> None:
    boot = node("bootstrap", *LOCAL)
    addr = boot.wait_line(boot.out, lambda line: "/p2p/" in line)
    peer = node("peer", *LOCAL, "--bootstrap", addr)
    try:
        peer.wait_line(peer.out, lambda line: "/p2p/" in line)
        boot.stop(signal.SIGKILL)
        warning = peer.wait_line(peer.err, lambda line: "cannot reach bootstrap node" in line, timeout=60)
        assert warning.startswith("p2pcompute: warning:")
        assert "retrying in 5 s" in warning
        assert peer.p.poll() is None  # still running, still trying
    finally:
        code = peer.stop()
    assert code == 0, peer.err
    assert not any("Traceback" in line for line in peer.err)
    assert len([line for line in peer.err if "cannot reach" in line]) <= 3  # backs off, no flood


# ------------------------------------------------------------------------------ key folders


def test_missing_key_folders_are_created_0700(tmp_path: Path) -> None:
    key = tmp_path / "a" / "b" / "peer.key"
    res = cli("status", "--bootstrap", "/ip4/127.0.0.1/tcp/1", "--key", str(key))
    assert res.returncode == 3  # the bootstrap address lacks /p2p/; the key was made first
    assert (key.stat().st_mode & 0o777) == 0o600
    assert (key.parent.stat().st_mode & 0o777) == 0o700
    assert ((tmp_path / "a").stat().st_mode & 0o777) == 0o700


# ------------------------------------------------------------------------------ examples/train.py


def test_train_example_stops_on_ctrl_c_with_130_and_no_traceback() -> None:
    run = Running([sys.executable, "examples/train.py", "--json", "--outer-steps", "100000"])
    try:
        first = run.wait_line(run.out, lambda line: True)
        assert json.loads(first)["event"] == "start"
    finally:
        code = run.stop(signal.SIGINT, timeout=60)
    assert code == 130, run.err
    assert not any("Traceback" in line for line in run.err), run.err
    assert run.err[-1] == "train.py: stopped by Ctrl-C"


# ------------------------------------------------------------------------------ bench link over the cap


def test_bench_link_over_the_peer_cap_is_a_refusal() -> None:
    bind = ("--bind", "127.0.0.1", *LOCAL)
    server = node("bench", "link", "--serve", "--max-mib", "1", *bind)
    try:
        addr = server.wait_line(server.out, lambda line: "/p2p/" in line)
        res = cli("bench", "link", "--peer", addr, "--sizes", "4MiB", "--reps", "1", "--pings", "1", *bind)
        one_error_line(res, 3, "refused")
    finally:
        assert server.stop() == 0


# ------------------------------------------------------------------------------ task run / task list


def test_task_run_and_list_against_a_real_peer(tmp_path: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((8, 5)).astype(np.float32), rng.standard_normal((5, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    boot = node("bootstrap", *LOCAL)
    procs = [boot]
    try:
        addr = boot.wait_line(boot.out, lambda line: "/p2p/" in line)
        provider = node(
            "peer",
            *LOCAL,
            "--bootstrap",
            addr,
            "--ledger",
            str(tmp_path / "provider.ledger"),
            "--log-format",
            "json",
        )
        procs.append(provider)
        provider_id = provider.wait_line(provider.out, lambda line: "/p2p/" in line).rsplit("/p2p/", 1)[1]
        provider.wait_line(provider.err, lambda line: "selling task kinds" in line)

        listed = cli("task", "list", "--bootstrap", addr, *LOCAL, "--wait", "2", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = {row["peer"]: row for row in json.loads(listed.stdout)}
        kinds = {k["kind"]: k for k in rows[provider_id]["kinds"]}
        assert {"matmul", "matmul-bench"} <= set(kinds)
        assert isinstance(kinds["matmul"]["price"], float)

        ledger = tmp_path / "requester.ledger"
        res = cli(
            "task",
            "run",
            "matmul",
            "--bootstrap",
            addr,
            *LOCAL,
            "--input",
            f"a={tmp_path / 'a.npy'}",
            "--input",
            f"b={tmp_path / 'b.npy'}",
            "--out",
            str(tmp_path / "c.npy"),
            "--ledger",
            str(ledger),
            "--json",
        )
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["provider"] == provider_id
        np.testing.assert_allclose(np.load(tmp_path / "c.npy"), a @ b, rtol=1e-5, atol=1e-5)

        shown = cli("ledger", "show", str(ledger), "--json")
        assert shown.returncode == 0, shown.stderr
        peers = {p["peer"]: p for p in json.loads(shown.stdout)["peers"]}
        assert peers[provider_id]["bought"] == 1

        missing = cli("task", "run", "matmul", "--bootstrap", addr, *LOCAL, "--input", "a=/nonexistent.npy")
        one_error_line(missing, 3, "/nonexistent.npy")

        # a kind nobody sells is refused at once (it waited out the whole --deadline, 300 s)
        a_npy = f"a={tmp_path / 'a.npy'}"
        unsold = cli("task", "run", "matmull", "--bootstrap", addr, *LOCAL, "--input", a_npy)
        one_error_line(unsold, 3, "sells task kind 'matmull' (on offer: matmul, matmul-bench")
    finally:
        codes = [p.stop() for p in reversed(procs)]
    assert codes == [0, 0]
    # --log-format json: every line the provider wrote on stderr is one JSON object
    assert provider.err
    for line in provider.err:
        entry = json.loads(line)
        assert {"time", "level", "message"} <= set(entry)


def test_task_run_with_safetensors_files(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.torch")
    import torch

    a, b = torch.randn(4, 6), torch.randn(6, 2)
    st.save_file({"a": a, "b": b}, str(tmp_path / "in.safetensors"))
    boot = node("bootstrap", *LOCAL)
    procs = [boot]
    try:
        addr = boot.wait_line(boot.out, lambda line: "/p2p/" in line)
        procs.append(node("peer", *LOCAL, "--bootstrap", addr))
        procs[-1].wait_line(procs[-1].err, lambda line: "selling task kinds" in line)
        out = tmp_path / "out.safetensors"
        res = cli(
            "task",
            "run",
            "matmul",
            "--bootstrap",
            addr,
            *LOCAL,
            "--input",
            str(tmp_path / "in.safetensors"),
            "--out",
            str(out),
        )
        assert res.returncode == 0, res.stderr
        assert "wrote" in res.stdout
        assert torch.allclose(st.load_file(str(out))["c"], a @ b, atol=1e-5)
    finally:
        codes = [p.stop() for p in reversed(procs)]
    assert codes == [0, 0]


# ------------------------------------------------------------------------------ one key, two processes


def test_two_processes_with_one_key_are_not_silently_merged(tmp_path: Path) -> None:
    key = str(tmp_path / "shared.key")
    fast = ("--advert-interval", "1")  # the identity check runs once per advert lifetime (3 s here)
    boot = node("bootstrap", *LOCAL)
    procs = [boot]
    try:
        addr = boot.wait_line(boot.out, lambda line: "/p2p/" in line)
        first = node("peer", *LOCAL, "--bootstrap", addr, "--key", key, *fast)
        procs.append(first)
        first.wait_line(first.err, lambda line: "selling task kinds" in line)
        second = node("peer", *LOCAL, "--bootstrap", addr, "--key", key, *fast)
        procs.append(second)
        second.wait_line(second.err, lambda line: "selling task kinds" in line)
        # the older process finds the newer one's advert under its own peer id and stops
        first.wait_line(first.err, lambda line: "another process" in line, timeout=60)
        assert first.p.wait(30) == 3
        errors = [line for line in first.err if "error:" in line]
        assert len(errors) == 1
        assert "another process uses this node's key" in errors[0]
        assert second.p.poll() is None  # the other one carries on
    finally:
        codes = [p.stop() for p in reversed(procs)]
    assert codes[0] == 0  # the second peer
    assert not any("Traceback" in line for p in procs for line in p.err)


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    from p2pcompute.cli.watch import Backoff

    b = Backoff(5, 60)
    assert [b.failed() for _ in range(6)] == [5, 10, 20, 40, 60, 60]
    b.reset()
    assert b.failed() == 5
