"""Peers behind real NATs: network namespaces, nft masquerade, peers as real processes.

One module-scoped topology (benchmarks/nattopo.py): a public bootstrap node that relays, a
public peer, peers ``a`` and ``b`` behind two port-preserving NATs, ``c`` behind a NAT that
picks a new port per connection (symmetric-style), and later a joiner ``j`` behind a's NAT.
Every peer runs tests/nat_agent.py in its namespace. Skipped, with the reason, where
namespaces or nft cannot be made (not root, no nft).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.nattopo import NatTopology, unavailable
from p2pcompute.identity import Identity

# Five Python processes with torch, in namespaces, take one to four minutes on a 2-core machine:
# more than CI's whole budget has left. Opt in with P2PCOMPUTE_NAT_TESTS=1 (docs/design/nat.md).
pytestmark = [
    pytest.mark.slow,
    # one topology (fixed namespace names) per module, and the joiner test reads what the
    # averaging test left: every test of this file runs on one xdist worker (`make test`: loadgroup)
    pytest.mark.xdist_group("nat-topology"),
    pytest.mark.skipif(
        os.environ.get("P2PCOMPUTE_NAT_TESTS") != "1",
        reason="NAT namespace tests take minutes; set P2PCOMPUTE_NAT_TESTS=1 to run them",
    ),
]
ROOT = Path(__file__).resolve().parent.parent
AGENT = str(ROOT / "tests" / "nat_agent.py")
TRAINED: dict[str, Any] = {}  # what the averaging test left behind, for the joiner


class Agent:
    """One peer process: JSON commands in, JSON answers out (read by a thread, so waits time out)."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()
        self.peer_id = ""

    def wait_up(self) -> Agent:
        self.peer_id = self.expect("up", timeout=90)["peer_id"]
        return self

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            del self.stderr[:-400]

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def expect(self, event: str, *, timeout: float) -> dict[str, Any]:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                why = f"{self.name}: no {event!r} in {timeout} s; stderr:\n{''.join(self.stderr)}"
                raise AssertionError(why) from None
            if line is None:
                raise AssertionError(f"{self.name} exited; stderr:\n{''.join(self.stderr)}")
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            if msg.get("event") == "error":
                raise AssertionError(f"{self.name}: {msg['error']}\n{msg.get('trace', '')}")
            if msg.get("event") == event:
                return msg

    def ask(self, event: str, *, timeout: float = 60, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.expect(event, timeout=timeout)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.send(cmd="quit")
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Net:
    def __init__(self, topo: NatTopology, boot_addr: str) -> None:
        self.topo = topo
        self.boot_addr = boot_addr
        self.agents: dict[str, Agent] = {}

    def start(self, name: str, *extra: str) -> Agent:
        box = self.topo.boxes[name]
        argv = [*box.exec(), sys.executable, AGENT, "--name", name, "--bootstrap", self.boot_addr, *extra]
        self.agents[name] = Agent(name, argv)  # started; wait_up() waits for it
        return self.agents[name]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    why = unavailable()
    if why is not None:
        pytest.skip(f"no NAT namespaces here: {why}")
    key = tmp_path_factory.mktemp("nat") / "boot.key"
    boot_id = Identity.load_or_create(key).peer_id
    with NatTopology() as topo:
        boot = topo.boxes["boot"]
        boot_proc = subprocess.Popen(
            [*boot.exec(), sys.executable, "-m", "p2pcompute.cli", "bootstrap",
             "--listen", "/ip4/0.0.0.0/tcp/4001", "--key", str(key), "--advert-interval", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        n = Net(topo, f"/ip4/{boot.ip}/tcp/4001/p2p/{boot_id}")
        try:
            assert boot_proc.stdout is not None
            first = boot_proc.stdout.readline()  # the bootstrap node prints its address once it listens
            assert boot_id in first, first
            threading.Thread(target=boot_proc.stdout.read, daemon=True).start()
            for name in ("pub", "a", "b", "c"):
                n.start(name)
            for agent in n.agents.values():
                agent.wait_up()
            yield n
        finally:
            for agent in n.agents.values():
                agent.stop()
            boot_proc.terminate()
            try:
                boot_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                boot_proc.kill()


def test_peers_behind_nat_learn_it_and_are_reached_through_the_relay(net: Net) -> None:
    four = ["pub", "a", "b", "c"]
    for name in four:
        net.agents[name].send(cmd="wait", n=3, timeout=60)
    for name in four:
        net.agents[name].expect("waited", timeout=90)
    deadline = time.monotonic() + 90
    while True:  # each peer asks for a dial-back once it is connected; give them time under load
        status = {name: net.agents[name].ask("status", cmd="status") for name in four}
        if all(_settled(s) for s in status.values()):
            break
        assert time.monotonic() < deadline, status
        time.sleep(1)
    assert status["pub"]["reach"]["state"] == "public"
    assert status["pub"]["reach"]["observed"] == ["198.51.100.11"]
    for name, router in (("a", "198.51.100.21"), ("b", "198.51.100.22"), ("c", "198.51.100.23")):
        reach = status[name]["reach"]
        assert reach["state"] == "private", (name, reach)
        assert reach["observed"] == [router]
        assert status[name]["addrs"], name
        assert all("/p2p-circuit" in a for a in status[name]["addrs"]), status[name]["addrs"]
    # nobody advertises loopback or a private address that others cannot reach
    for name in four:
        for peer, addrs in status[name]["peers"].items():
            assert not any("/127." in a or "/10." in a.split("/p2p/")[0] for a in addrs), (name, peer, addrs)


def test_a_natted_peer_sells_to_a_public_requester_and_buys_from_another_natted_peer(net: Net) -> None:
    a, b, pub = net.agents["a"], net.agents["b"], net.agents["pub"]
    a.ask("selling", cmd="sell", kind="double-a")
    b.ask("selling", cmd="sell", kind="double-b")
    bought = pub.ask("bought", cmd="buy", kind="double-a", timeout=120)
    assert bought["provider"] == a.peer_id
    assert bought["y"] == [0.0, 2.0, 4.0, 6.0]
    bought = a.ask("bought", cmd="buy", kind="double-b", timeout=120)
    assert bought["provider"] == b.peer_id
    assert bought["y"] == [0.0, 2.0, 4.0, 6.0]


def _settled(status: dict[str, Any]) -> bool:
    """Public, or private and advertising only relayed addresses (its reservation is made)."""
    state, addrs = status["reach"]["state"], status["addrs"]
    if state == "private":
        return bool(addrs) and all("/p2p-circuit" in a for a in addrs)
    return state == "public"


@pytest.mark.xfail(
    strict=False,
    reason="on a loaded 2-core machine, rounds of four peers (three behind NAT, control through the "
    "relay) formed no group or lost a member in every full run so far; open question in docs/design/nat.md",
)
def test_four_peers_average_across_three_nats(net: Net) -> None:
    four = ["pub", "a", "b", "c"]
    for name in four:
        net.agents[name].send(cmd="train", steps=15, min_group=4)
    done = {name: net.agents[name].expect("trained", timeout=180) for name in four}
    digests = {d["digest"] for d in done.values()}
    assert len(digests) == 1, done
    TRAINED["digest"] = digests.pop()
    for name, d in done.items():
        assert d["outer_step"] == 3, (name, d)
        assert all(p == 4 for p in d["participants"]), (name, d["participants"])
    # the NATed peers received over the relay and, being senders to the public peer, dialed it directly
    assert done["a"]["routes"].get("relay/circuit", 0) > 0, done["a"]["routes"]
    assert done["a"]["routes"].get("direct", 0) > 0, done["a"]["routes"]


def test_a_joiner_behind_nat_downloads_the_state(net: Net) -> None:
    if "digest" not in TRAINED:
        pytest.skip("the averaging test did not leave a trained state")
    j = net.start("j").wait_up()
    j.ask("waited", cmd="wait", n=4, timeout=60)
    joined = j.ask("joined", cmd="join", timeout=90)
    assert joined["ok"]
    assert joined["outer_step"] == 3
    assert joined["digest"] == TRAINED["digest"]
    assert j.ask("status", cmd="status")["reach"]["state"] == "private"
