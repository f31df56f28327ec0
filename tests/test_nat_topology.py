"""Peers behind real NATs: network namespaces, nft masquerade, peers as real processes.

One module-scoped topology (benchmarks/nattopo.py): a public bootstrap node that relays, a
public peer, peers ``a`` and ``b`` behind two port-preserving NATs, ``c`` behind a NAT that
picks a new port per connection (symmetric-style), and a joiner ``j`` behind a's NAT. Every
peer runs tests/nat_agent.py in its namespace; all start at once. Skipped, with the reason,
only where namespaces or nft cannot be made (not root, no ``ip``/``nft``: CI's .ci/run installs
nftables). About a minute of wall time on two cores when everything passes, up to three
while the relay stall of docs/design/nat.md ("Status") makes the xfailed tests wait out their
timeouts; each test stands alone (any one may run by itself with ``-k``).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.nattopo import NatTopology, unavailable
from p2pcompute.identity import Identity

pytestmark = [
    pytest.mark.slow,
    # one topology (fixed namespace names) per module: every test of this file runs on one
    # xdist worker (`make test` runs with --dist loadgroup)
    pytest.mark.xdist_group("nat-topology"),
]
ROOT = Path(__file__).resolve().parent.parent
AGENT = str(ROOT / "tests" / "nat_agent.py")


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
        while not self.lines.empty():  # answers an earlier (failed) test left unread are not ours
            if self.lines.get_nowait() is None:
                self.lines.put(None)
                break
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
    logdir = os.environ.get("NAT_AGENT_LOGDIR")  # debugging: every process logs into this directory
    boot_id = Identity.load_or_create(key).peer_id
    with NatTopology() as topo, contextlib.ExitStack() as files:
        boot = topo.boxes["boot"]
        boot_log: Any = subprocess.DEVNULL
        if logdir:
            boot_log = files.enter_context(open(os.path.join(logdir, "boot.log"), "a"))
        boot_proc = subprocess.Popen(
            [*boot.exec(), sys.executable, "-m", "p2pcompute.cli", "bootstrap",
             "--listen", "/ip4/0.0.0.0/tcp/4001", "--key", str(key), "--advert-interval", "1",
             *(["-v"] if logdir else [])],
            stdout=subprocess.PIPE, stderr=boot_log, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        n = Net(topo, f"/ip4/{boot.ip}/tcp/4001/p2p/{boot_id}")
        try:
            assert boot_proc.stdout is not None
            first = boot_proc.stdout.readline()  # the bootstrap node prints its address once it listens
            assert boot_id in first, first
            threading.Thread(target=boot_proc.stdout.read, daemon=True).start()
            for name in ("pub", "a", "b", "c", "j"):  # all at once: their imports overlap
                n.start(name)
            for agent in n.agents.values():
                agent.wait_up()
            yield n
        finally:
            for agent in n.agents.values():  # all told at once: they shut down in parallel
                with contextlib.suppress(Exception):
                    agent.send(cmd="quit")
            for agent in n.agents.values():
                agent.stop()
            boot_proc.terminate()
            try:
                boot_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                boot_proc.kill()


def test_peers_behind_nat_learn_it_and_are_reached_through_the_relay(net: Net) -> None:
    five = ["pub", "a", "b", "c", "j"]
    for name in five:
        net.agents[name].send(cmd="wait", n=4, timeout=60)
    for name in five:
        net.agents[name].expect("waited", timeout=70)
    for name in five:  # each peer asks for a dial-back once it is connected (an event, no polling)
        net.agents[name].send(cmd="settle", timeout=60)
    status = {name: net.agents[name].expect("status", timeout=70) for name in five}
    assert status["pub"]["reach"]["state"] == "public"
    assert status["pub"]["reach"]["observed"] == ["198.51.100.11"]
    for name, router in (("a", "198.51.100.21"), ("b", "198.51.100.22"), ("c", "198.51.100.23")):
        reach = status[name]["reach"]
        assert reach["state"] == "private", (name, reach)
        assert reach["observed"] == [router]
        assert status[name]["addrs"], name
        assert all("/p2p-circuit" in a for a in status[name]["addrs"]), status[name]["addrs"]
    # nobody advertises loopback or a private address that others cannot reach
    for name in five:
        for peer, addrs in status[name]["peers"].items():
            assert not any("/127." in a or "/10." in a.split("/p2p/")[0] for a in addrs), (name, peer, addrs)


def test_hole_punching_makes_a_direct_connection_where_both_nats_keep_ports(net: Net) -> None:
    a, b, c, j = (net.agents[n] for n in ("a", "b", "c", "j"))
    a.send(cmd="punch", peer=b.peer_id)  # two port-preserving NATs: DCUtR succeeds
    j.send(cmd="punch", peer=c.peer_id)  # c's NAT picks a new port per connection: it cannot
    ab, jc = a.expect("punched", timeout=70), j.expect("punched", timeout=70)
    assert (ab["ok"], ab["link"]) == (True, "punched"), ab
    assert (jc["ok"], jc["link"]) == (False, "circuit"), jc  # the relayed connection stays, and works
    assert j.ask("status", cmd="status")["links"].get(c.peer_id) == "circuit"


def test_a_natted_peer_sells_to_a_public_requester(net: Net) -> None:
    a, pub = net.agents["a"], net.agents["pub"]
    a.ask("selling", cmd="sell", kind="double-a")
    bought = pub.ask("bought", cmd="buy", kind="double-a", timeout=90)
    assert bought["provider"] == a.peer_id
    assert bought["y"] == [0.0, 2.0, 4.0, 6.0]


# Everything between two NATed peers runs through the bootstrap node's relay (no hole punching
# yet). In about half of the full runs here, connections to the relay stalled some 30 s after
# the peers started (docs/design/nat.md, "Status": the relay's receive queues grow while it sits
# idle in epoll), and whatever went NATed-to-NATed after that timed out.
RELAY_STALL = pytest.mark.xfail(
    strict=False,
    reason="py-libp2p connections to the circuit relay stall ~30 s into a run (docs/design/nat.md, Status)",
)


@RELAY_STALL
def test_a_natted_peer_buys_from_another_natted_peer(net: Net) -> None:
    a, b = net.agents["a"], net.agents["b"]
    b.ask("selling", cmd="sell", kind="double-b")
    bought = a.ask("bought", cmd="buy", kind="double-b", timeout=90)
    assert bought["provider"] == b.peer_id
    assert bought["y"] == [0.0, 2.0, 4.0, 6.0]


@RELAY_STALL
def test_four_peers_average_across_three_nats(net: Net) -> None:
    four = ["pub", "a", "b", "c"]
    for name in four:  # two outer steps (5 inner steps each): round 2 must keep all four
        net.agents[name].send(cmd="train", steps=10, min_group=4)
    done: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for name in four:  # every peer's outcome (so none is still busy when the next test starts)
        try:
            done[name] = net.agents[name].expect("trained", timeout=60)
        except AssertionError as exc:
            failed[name] = str(exc)[:300]
    assert not failed, failed
    digests = {d["digest"] for d in done.values()}
    assert len(digests) == 1, done
    ids = sorted(net.agents[name].peer_id for name in four)
    for name, d in done.items():
        assert d["outer_step"] == 2, (name, d)
        assert [sorted(p) for p in d["participants"]] == [ids, ids], (name, d["participants"])
    # the NATed peers received over the relay and, being senders to the public peer, dialed it directly
    assert done["a"]["routes"].get("relay/circuit", 0) > 0, done["a"]["routes"]
    assert done["a"]["routes"].get("direct", 0) > 0, done["a"]["routes"]


def test_a_joiner_behind_nat_downloads_the_state(net: Net) -> None:
    # the public peer serves a state (the averaged one when that test ran, else a fresh one);
    # the joiner behind a's NAT dials out to it and must end up with exactly that state
    served = net.agents["pub"].ask("serving", cmd="serve")
    j = net.agents["j"]
    joined = j.ask("joined", cmd="join", timeout=90)
    assert joined["ok"]
    assert (joined["digest"], joined["outer_step"]) == (served["digest"], served["outer_step"])
    assert j.ask("status", cmd="status")["reach"]["state"] == "private"
