"""benchmarks.wan: the --wan spec, the namespace plan, and real set-up/teardown where permitted.

The real tests run only as root (or with CAP_NET_ADMIN) with iproute2 installed; otherwise they
skip with the reason :func:`probe_support` gives. Every real test checks that no namespace of
ours is left behind, including after an exception, a failed set-up step and SIGINT.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import wan
from benchmarks.wan import WanEmulation, WanError, WanSpec, WanSpecError, parse_spec
from p2pcompute.benchresults import load_results

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = wan.probe_support()
needs_netns = pytest.mark.skipif(not SUPPORT.ok, reason=SUPPORT.describe())


# ------------------------------------------------------------------------------ spec (sans-IO)


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("50ms,200mbit,0.1%loss", WanSpec(50.0, 0.0, 0.1, 200.0)),
        ("delay=50ms, jitter=5ms, rate=1gbit, loss=2%", WanSpec(50.0, 5.0, 2.0, 1000.0)),
        ("0.2s,5msjitter,512kbit,1%", WanSpec(200.0, 5.0, 1.0, 0.512)),
        ("250us", WanSpec(delay_ms=0.25)),
        ("100mbit", WanSpec(rate_mbit=100.0)),
        ("none", WanSpec()),
        ("NONE", WanSpec()),
        ("50ms,9000mtu", WanSpec(delay_ms=50.0, mtu=9000)),
        ("mtu=1280", WanSpec(mtu=1280)),
    ],
)
def test_parse_spec(text: str, spec: WanSpec) -> None:
    got = parse_spec(text)
    assert got == spec
    assert parse_spec(got.describe()) == got


@pytest.mark.parametrize(
    "text",
    [
        "",
        ",",
        "50",
        "50ms,60ms",
        "fast",
        "50ms,5msjitter,5msjitter",
        "10mbps",
        "100%loss",
        "-5ms",
        "2ms,5msjitter",
        "11s",
        "1bit",
        "200gbit",
        "delay=fast",
        "x=1",
        "50ms;200mbit",
        "1" * 300,
        "100mtu",
        "70000mtu",
        "1500.5mtu",
        "mtu=9000,mtu=1500",
    ],
)
def test_parse_spec_refuses(text: str) -> None:
    with pytest.raises(WanSpecError):
        parse_spec(text)


specs = st.builds(
    lambda d, j, loss, r, mtu: WanSpec(d, min(j, d), loss, r, mtu),
    st.floats(0, 10_000).map(lambda x: round(x, 3)),
    st.floats(0, 10_000).map(lambda x: round(x, 3)),
    st.floats(0, 99.9).map(lambda x: round(x, 3)),
    st.one_of(st.none(), st.floats(0.008, 100_000).map(lambda x: round(x, 3))),
    st.one_of(st.none(), st.integers(576, 65_000)),
)


@given(specs)
def test_describe_parse_roundtrip(spec: WanSpec) -> None:
    assert parse_spec(spec.describe()) == spec


@given(st.text(max_size=40))
def test_parse_spec_only_raises_its_own_error(text: str) -> None:
    with contextlib.suppress(WanSpecError):
        parse_spec(text)


# ------------------------------------------------------------------------------ plan (sans-IO)


def _all_commands(p: wan.Plan) -> list[tuple[str, ...]]:
    return [*p.setup, *p.shaping, *p.teardown]


def _assert_confined(p: wan.Plan) -> None:
    """Every command makes or deletes one of the plan's namespaces or runs inside one of them."""
    ours = set(p.namespaces)
    for cmd in _all_commands(p):
        if cmd[:3] in (("ip", "netns", "add"), ("ip", "netns", "del")):
            assert cmd[3] in ours
            continue
        # Every other command runs inside one of our namespaces, never in the host's.
        assert cmd[1] == "-n", cmd
        assert cmd[2] in ours, cmd
        if "netns" in cmd[3:]:
            assert cmd[cmd.index("netns", 3) + 1] in ours


@pytest.mark.parametrize("peers", [2, 5, wan.MAX_PEERS])
def test_plan_touches_only_its_own_namespaces(peers: int) -> None:
    p = wan.plan(parse_spec("50ms,200mbit,0.1%loss"), peers, tag="123")
    ours = set(p.namespaces)
    assert len(ours) == peers + 1
    assert all(ns.startswith("p2pcb-123-") for ns in ours)
    addrs = [m.addr for m in p.peers]
    assert len(set(addrs)) == peers
    assert all(a.startswith("10.77.0.") for a in addrs)
    _assert_confined(p)
    assert [c[3] for c in p.teardown] == [*(m.netns for m in p.peers), p.hub]
    assert p.peers[0].exec == ["ip", "netns", "exec", p.peers[0].netns]


@pytest.mark.parametrize("peers", [2, 5, wan.MAX_PEERS])
def test_user_plan_makes_tun_devices_and_no_hub(peers: int) -> None:
    spec = parse_spec("50ms,5msjitter,200mbit,0.1%loss,9000mtu")
    p = wan.plan(spec, peers, tag="123", netem=False, tbf=True, backend="user")
    assert p.backend == "user"
    assert p.hub is None
    ours = set(p.namespaces)
    assert len(ours) == peers
    assert p.shaping == ()
    assert p.not_applied == ()
    assert p.applied == {"delay_ms": 50.0, "jitter_ms": 5.0, "loss_pct": 0.1, "rate_mbit": 200.0}
    _assert_confined(p)
    assert not any("veth" in c or "bridge" in c for c in _all_commands(p))
    tuns = [c for c in p.setup if c[3:5] == ("tuntap", "add")]
    assert [c[2] for c in tuns] == [m.netns for m in p.peers]
    ups = [c for c in p.setup if c[3:6] == ("link", "set", "eth0")]
    assert [c[2] for c in ups] == [m.netns for m in p.peers]
    assert all(c[6:9] == ("mtu", "9000", "up") for c in ups)
    argv = list(p.link_argv)
    assert argv[1].endswith("wanlink.py")
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--peer"] == [
        f"{m.netns}={m.addr}" for m in p.peers
    ]
    flags = dict(zip(argv[2::2], argv[3::2], strict=False))
    assert flags["--delay-ms"] == "50"
    assert flags["--jitter-ms"] == "5"
    assert flags["--loss-pct"] == "0.1"
    assert flags["--rate-mbit"] == "200"


def test_kernel_plan_sets_the_mtu_on_both_ends() -> None:
    p = wan.plan(parse_spec("9000mtu"), 2, tag="9")
    veths = [c for c in p.setup if "veth" in c]
    assert len(veths) == 2
    assert all(c[c.index("mtu") + 1] == "9000" for c in veths)
    ups = [c for c in p.setup if c[3:6] == ("link", "set", "eth0")]
    assert len(ups) == 2
    assert all(c[6:9] == ("mtu", "9000", "up") for c in ups)
    assert p.shaping == ()


@pytest.mark.parametrize(
    ("text", "support", "requested", "want"),
    [
        ("50ms", wan.Support(True, netem=True, tbf=True, tun=True), "auto", "kernel"),
        ("50ms", wan.Support(True, tbf=True, tun=True), "auto", "user"),
        ("0.1%loss", wan.Support(True, tbf=True, tun=True), "auto", "user"),
        ("200mbit", wan.Support(True, tbf=True, tun=True), "auto", "kernel"),  # tbf applies it all
        ("none", wan.Support(True, tun=True), "auto", "kernel"),
        ("50ms", wan.Support(True, tbf=True), "auto", "kernel"),  # applies what it can, says the rest
        ("200mbit", wan.Support(True, netem=True, tbf=True, tun=True), "user", "user"),
        ("50ms", wan.Support(True, tbf=True, tun=True), "kernel", "kernel"),
    ],
)
def test_choose_backend(text: str, support: wan.Support, requested: str, want: str) -> None:
    assert wan.choose_backend(parse_spec(text), support, requested) == want


def test_choose_backend_refuses_what_cannot_be() -> None:
    with pytest.raises(WanError, match="TUN"):
        wan.choose_backend(parse_spec("50ms"), wan.Support(True, netem=True), "user")
    with pytest.raises(WanSpecError):
        wan.choose_backend(parse_spec("50ms"), wan.Support(True, netem=True), "fast")


@pytest.mark.parametrize("peers", [0, 1, wan.MAX_PEERS + 1])
def test_plan_bounds_peers(peers: int) -> None:
    with pytest.raises(WanSpecError):
        wan.plan(WanSpec(), peers)


def test_shaping_with_netem_applies_everything() -> None:
    cmds, applied, missing = wan.shaping_commands(
        parse_spec("50ms,5msjitter,200mbit,0.1%"), "ns", netem=True, tbf=True
    )
    assert missing == []
    assert applied == {"delay_ms": 50.0, "jitter_ms": 5.0, "loss_pct": 0.1, "rate_mbit": 200.0}
    (cmd,) = cmds
    assert cmd[:8] == ["tc", "-n", "ns", "qdisc", "add", "dev", "eth0", "root"]
    text = " ".join(cmd)
    assert "netem delay 50ms 5ms distribution normal loss 0.1% rate 200000kbit limit" in text
    assert int(cmd[-1]) >= 1000


def test_shaping_without_netem_says_what_it_cannot_do() -> None:
    cmds, applied, missing = wan.shaping_commands(
        parse_spec("50ms,200mbit,0.1%loss"), "ns", netem=False, tbf=True
    )
    assert applied == {"rate_mbit": 200.0}
    assert [m.split()[0] for m in missing] == ["delay", "loss"]
    assert cmds[0][8:11] == ["tbf", "rate", "200000kbit"]
    _, applied, missing = wan.shaping_commands(parse_spec("50ms"), "ns", netem=False, tbf=False)
    assert applied == {}
    assert missing == ["delay 50 ms (kernel has no sch_netem)"]
    assert wan.shaping_commands(WanSpec(), "ns", netem=True, tbf=True) == ([], {}, [])


class _Recorder:
    """A command runner that records and answers success, failing one chosen command."""

    def __init__(self, fail_at: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_at = fail_at

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        bad = self.fail_at is not None and self.fail_at in " ".join(argv)
        return subprocess.CompletedProcess(list(argv), 1 if bad else 0, "", "boom" if bad else "")


def test_failed_setup_step_rolls_back_what_was_made() -> None:
    rec = _Recorder(fail_at="type veth")
    support = wan.Support(True, netem=True, tbf=True)
    with (
        pytest.raises(WanError, match="boom"),
        WanEmulation(parse_spec("5ms"), peers=3, support=support, run=rec, tag="77"),
    ):
        pytest.fail("the body must not run")
    deleted = [c[3] for c in rec.calls if c[:3] == ["ip", "netns", "del"]]
    # The first veth fails: the hub and peer 0's namespace were made, and both are removed.
    assert deleted == ["p2pcb-77-p0", "p2pcb-77-hub"]


def test_unsupported_host_raises_with_the_reason() -> None:
    with (
        pytest.raises(WanError, match="needs root"),
        WanEmulation(WanSpec(), support=wan.Support(False, "needs root or CAP_NET_ADMIN")),
    ):
        pass


# ------------------------------------------------------------------------------ real namespaces


def _links(netns: str) -> list[int]:
    """Pids of live user-space link processes serving ``netns``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        mine = any(a.startswith(f"{netns}=".encode()) for a in argv)
        if mine and any(a.endswith(b"wanlink.py") for a in argv):
            found.append(int(entry.name))
    return found


def _ours() -> set[str]:
    return {n for n in wan.list_namespaces() if n.startswith(f"{wan.PREFIX}-{os.getpid()}-")}


@needs_netns
def test_real_setup_connects_peers_and_tears_down() -> None:
    assert _ours() == set()
    with WanEmulation(parse_spec("100mbit"), peers=3, support=SUPPORT) as net:
        assert net.plan is not None
        assert _ours() == set(net.plan.namespaces)
        net.shape()
        got = subprocess.run(
            net.exec_argv(
                1,
                [
                    sys.executable,
                    "-c",
                    "import socket,sys; s=socket.socket(); s.settimeout(5); "
                    "s.connect_ex((sys.argv[1], 9)); print(s.getsockname()[0])",
                    net.addr(2),
                ],
            ),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert got.stdout.strip() == net.addr(1)  # the route to peer 2 leaves through our eth0
        layout = net.layout()
        assert [p["addr"] for p in layout["peers"]] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
        json.dumps(layout)
        if SUPPORT.tbf or SUPPORT.netem:
            qd = subprocess.run(
                ["tc", "-n", net.plan.peers[0].netns, "qdisc", "show", "dev", "eth0"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            assert ("netem" if SUPPORT.netem else "tbf") in qd.stdout
    assert _ours() == set()


@needs_netns
def test_real_teardown_after_an_exception() -> None:
    seen: list[int] = []

    def body() -> None:
        with WanEmulation(WanSpec(), peers=2, support=SUPPORT):
            seen.append(len(_ours()))
            raise RuntimeError("mid-benchmark")

    with pytest.raises(RuntimeError, match="mid-benchmark"):
        body()
    assert seen == [3]
    assert _ours() == set()


_CHILD = """
import sys, time
from benchmarks.wan import WanEmulation, parse_spec
with WanEmulation(parse_spec("10mbit,5ms"), peers=2, backend=sys.argv[1]) as net:
    print(net.plan.peers[0].netns, flush=True)
    time.sleep(120)
"""


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("backend", ["kernel", "user"])
def test_real_teardown_on_signal(sig: int, backend: str) -> None:
    if backend == "user" and not SUPPORT.tun:
        pytest.skip("no TUN devices here")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, backend],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        assert first.startswith(f"{wan.PREFIX}-{proc.pid}-"), proc.stderr.read() if proc.stderr else ""
        prefix = first.removesuffix("p0")
        made = [n for n in wan.list_namespaces() if n.startswith(prefix)]
        assert len(made) == (3 if backend == "kernel" else 2)  # the kernel backend has a hub
        links = _links(first)
        assert len(links) == (backend == "user")
        proc.send_signal(sig)
        proc.wait(timeout=60)
        assert [n for n in wan.list_namespaces() if n.startswith(prefix)] == []
        assert _links(first) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


@needs_netns
def test_sweep_removes_only_dead_runs() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"{wan.PREFIX}-{dead.pid}-hub"
    mine = f"{wan.PREFIX}-{os.getpid()}-sweeptest"
    for name in (stale, mine):
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        removed = wan.sweep_stale()
        assert stale in removed
        assert mine not in removed
        assert mine in wan.list_namespaces()
    finally:
        for name in (stale, mine):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30, check=False)


@needs_netns
def test_wan_suite_shows_the_shaping(tmp_path: Path) -> None:
    out = tmp_path / "wan.json"
    got = subprocess.run(
        [sys.executable, "-m", "benchmarks.wan", "--quick", "--wan", "20ms,80mbit", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert got.returncode == 0, got.stderr
    doc = load_results(out)
    rows = {c["name"]: c for c in doc["configs"]}
    assert rows["unshaped"]["baseline"] == "unshaped"
    assert doc["wan"]["spec"] == "delay=20ms,rate=80mbit"
    shaped = rows["shaped"]["stats"]
    if "rate_mbit" in doc["wan"]["applied"]:
        # 80 mbit/s is 10 MB/s: the shaped transfer cannot beat it by much (bucket bursts aside).
        assert shaped["mbytes_per_s"]["median"] < 10 * 1.5
        assert rows["shaped"]["ratio_vs_unshaped"] < 1
    if "delay_ms" in doc["wan"]["applied"]:
        assert shaped["rtt_ms"]["min"] >= 2 * 20 * 0.9
    else:
        assert any("delay" in n for n in rows["shaped"].get("notes", []))
    assert _ours() == set()


@needs_netns
def test_stream_pair_runs_inside_the_namespaces() -> None:
    # the stream suite places its receiver in peer 0's namespace and its sender in peer 1's;
    # the shaped link (not loopback) must carry the bytes
    from benchmarks import stream

    with WanEmulation(parse_spec("80mbit"), peers=2, support=SUPPORT) as net:
        net.shape()
        out = stream._pair("lane", 4 << 20, 1, "none", layout=net.layout(), timeout=120)
    seconds = out["send"]["times"][0]
    assert seconds > 0
    if SUPPORT.tbf or SUPPORT.netem:
        assert (4 << 20) / 1e6 / seconds < 10 * 1.5  # 80 mbit/s = 10 MB/s, bucket bursts aside
    assert _ours() == set()
