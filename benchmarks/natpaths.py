"""Tensor-lane throughput and round trip by path, between peers in the NAT topology of benchmarks/nattopo.py.

    python -m benchmarks.natpaths [--mib 32] [--rate-mbit 0] [--out natpaths.json]

Rows (``path`` names what carried the bytes, :attr:`TransferReport.route`):

* ``direct``: a peer behind NAT (b) sends to the public peer (pub): the lane dials out through
  the NAT, a plain TCP connection;
* ``relay/direct``: the same pair with pub's lane refusing direct TCP (``direct=False``): the
  bytes go on a libp2p stream over b's own (outbound, so direct) libp2p connection;
* pub sends to a, behind NAT: a lane offers no direct address when private, so the bytes take a
  libp2p stream, over the connection a opened to pub (``relay/direct``);
* ``relay/circuit``: b sends to a, both behind NAT, hole punching off: the only way in is the
  circuit relay on the bootstrap node, whose CPU seconds per GB relayed are reported (every row
  reports it);
* ``relay/punched``: the same pair with hole punching on (the default): the sender waits until
  DCUtR has made a direct connection, then the bytes take a libp2p stream over it.

``--rate-mbit R`` shapes every router's and public host's WAN link with ``tbf`` (this kernel has
no ``netem``, so no delay is added; see docs/design/wan-emulation.md). Each row: MB/s of a
``--mib`` MiB transfer (median of 3), the round trip of a 4 KiB transfer (median of 5), the relay
CPU per GB (for the circuit row). Prints a table and writes JSON rows. Needs root, ``ip`` and
``nft`` (:func:`benchmarks.nattopo.unavailable`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, sys, time, statistics, trio, torch
from p2pcompute.identity import Identity
from p2pcompute.overlay import open_node
from p2pcompute.tensors import open_lane
role, key, boot, other = sys.argv[1:5]
mib, direct, punch = int(sys.argv[5]), sys.argv[6] == "1", sys.argv[7]
async def main():
    ident = Identity.load_or_create(key)
    async with open_node(ident, listen=["/ip4/0.0.0.0/tcp/0"], bootstrap=[boot], advert_interval=1.0,
                         advert_ttl=3.0, reach_interval=30.0, hole_punch=punch != "off") as node, \
            open_lane(node, direct=direct) as lane:
        await node.wait_until(lambda: other in node.peers and node.reachability != "unknown", timeout=120)
        def final():  # the other's advert no longer offers its LAN address
            rec = node.peers.get(other)
            return rec is not None and all("/10." not in a.split("/p2p/")[0] for a in rec.addrs)
        await node.wait_until(final, timeout=120)
        print(json.dumps({"event": "ready", "reach": node.reachability}), flush=True)
        big = {"x": torch.ones(mib << 18)}
        small = {"x": torch.ones(1024)}
        if role == "send" and punch == "wait":  # a stream (dialed through the relay), then DCUtR
            await node.exchange_peers(other, timeout=30)
            await node.wait_until(lambda: node.link(other) == "punched", timeout=60)
        if role == "send":
            rtts, rates, routes = [], [], []
            for i in range(5):
                t = time.perf_counter()
                await lane.send(other, f"s{i}", small)
                await lane.receive(other, f"e{i}")
                rtts.append(time.perf_counter() - t)
            for i in range(3):
                input()  # the controller samples the relay's CPU around each big transfer
                r = await lane.send(other, f"b{i}", big)
                await lane.receive(other, f"k{i}")
                rates.append(r.bytes / r.seconds / 1e6)
                routes.append(r.route)
                big_msg = {"event": "big", "mbps": rates[-1], "bytes": r.bytes, "route": r.route}
                print(json.dumps(big_msg), flush=True)
            done = {"event": "done", "rtt_ms": statistics.median(rtts) * 1e3,
                    "mbps": statistics.median(rates), "routes": sorted(set(routes))}
            print(json.dumps(done), flush=True)
        else:
            for i in range(5):
                await lane.receive(other, f"s{i}", timeout=120)
                await lane.send(other, f"e{i}", small)
            for i in range(3):
                await lane.receive(other, f"b{i}", timeout=600)
                await lane.send(other, f"k{i}", small)
            await trio.sleep(1)
trio.run(main)
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_row(topo: Any, boot_addr: str, boot_pid: int, keys: dict[str, str], ids: dict[str, str], *,
            sender: str, receiver: str, direct: bool, mib: int, punch: str) -> dict[str, Any]:  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start(role: str, me: str, other: str, lane_direct: bool) -> subprocess.Popen[str]:
        argv = [*topo.boxes[me].exec(), sys.executable, "-c", WORKER, role, keys[me], boot_addr, ids[other],
                str(mib), "1" if lane_direct else "0", punch]  # fmt: skip
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    recv = start("recv", receiver, sender, direct)
    send = start("send", sender, receiver, True)
    try:
        assert send.stdout is not None
        assert send.stdin is not None
        relay_cpu: list[float] = []  # the relay's CPU seconds per GB, per big transfer
        started = 0.0
        while True:
            line = send.stdout.readline()
            if not line:
                raise RuntimeError(f"sender {sender} exited early")
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            if msg["event"] == "big":
                relay_cpu.append((_cpu_seconds(boot_pid) - started) / (msg["bytes"] / 1e9))
            if msg["event"] in ("ready", "big") and len(relay_cpu) < 3:
                started = _cpu_seconds(boot_pid)
                send.stdin.write("\n")
                send.stdin.flush()
            if msg["event"] == "done":
                done = msg
                break
        return {
            "path": done["routes"][0] if len(done["routes"]) == 1 else "+".join(done["routes"]),
            "sender": sender,
            "receiver": receiver,
            "mib": mib,
            "mbps": round(done["mbps"], 1),
            "rtt_ms": round(done["rtt_ms"], 2),
            "relay_cpu_s_per_gb": round(statistics.median(relay_cpu), 2),
        }
    finally:
        for p in (send, recv):
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    from benchmarks.nattopo import NatTopology, unavailable
    from p2pcompute.identity import Identity

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=32, help="MiB per big transfer (default 32)")
    ap.add_argument("--rate-mbit", type=float, default=0.0, help="tbf rate on every WAN link (0: none)")
    ap.add_argument("--out", default="natpaths.json", help="JSON rows written here")
    args = ap.parse_args(argv)
    why = unavailable()
    if why:
        print(f"natpaths: cannot build the NAT topology: {why}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="natpaths-"))
    keys = {n: str(tmp / f"{n}.key") for n in ("boot", "pub", "a", "b")}
    ids = {n: Identity.load_or_create(k).peer_id for n, k in keys.items()}
    rows: list[dict[str, Any]] = []
    with NatTopology() as topo:
        if args.rate_mbit > 0:
            for name in ("boot", "pub", "nat1", "nat2", "nat3"):
                rate = f"{args.rate_mbit}mbit"
                tbf = ["eth0", "root", "tbf", "rate", rate, "burst", "64kb", "latency", "50ms"]
                subprocess.run([*topo.boxes[name].exec(), "tc", "qdisc", "replace", "dev", *tbf], check=True)
        boot = subprocess.Popen(
            [*topo.boxes["boot"].exec(), sys.executable, "-m", "p2pcompute.cli", "bootstrap", "--listen",
             "/ip4/0.0.0.0/tcp/4001", "--key", keys["boot"], "--advert-interval", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        try:
            assert boot.stdout is not None
            boot.stdout.readline()
            boot_addr = f"/ip4/{topo.boxes['boot'].ip}/tcp/4001/p2p/{ids['boot']}"
            pairs = (
                ("b", "pub", True, "on"),
                ("b", "pub", False, "on"),
                ("pub", "a", True, "on"),
                ("b", "a", True, "off"),  # relay/circuit
                ("b", "a", True, "wait"),  # relay/punched
            )
            for sender, receiver, direct, punch in pairs:
                t = time.perf_counter()
                row = run_row(topo, boot_addr, boot.pid, keys, ids, sender=sender, receiver=receiver,
                              direct=direct, mib=args.mib, punch=punch)  # fmt: skip
                row["rate_mbit"] = args.rate_mbit or None
                row["wall_s"] = round(time.perf_counter() - t, 1)
                rows.append(row)
        finally:
            boot.terminate()
            boot.wait()
    print(f"{'path':<14} {'from':>4} {'to':>4} {'MB/s':>8} {'RTT ms':>8} {'relay CPU s/GB':>15}")
    for r in rows:
        cells = [r.get("mbps"), r.get("rtt_ms"), r.get("relay_cpu_s_per_gb")]
        shown = ["-" if c is None else str(c) for c in cells]
        ends = f"{r.get('sender', '-'):>4} {r.get('receiver', '-'):>4}"
        print(f"{r['path']:<14} {ends} {shown[0]:>8} {shown[1]:>8} {shown[2]:>15}")
    Path(args.out).write_text(json.dumps({"suite": "natpaths", "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
