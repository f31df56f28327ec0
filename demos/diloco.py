"""The training demo: a bootstrap node and three peers train one model; one dies, one joins.

    python -m demos.diloco            # the whole show, a minute or two on 2 cores
    python -m demos.diloco --bootstrap-only --listen /ip4/0.0.0.0/tcp/4001
    sudo python -m demos.diloco --nat     # peer1 behind a NAT (network namespaces, nft masquerade)

Every peer is a separate process running ``examples/train.py`` unchanged (the same script
that trains alone). Midway the third peer is killed with SIGKILL and a fourth one starts; it
downloads the state from the survivors and joins at their next outer step. Per outer step
the demo prints the loss on a held-out set, who took part, the bytes the peers sent, the
bytes per-step gradient averaging would have sent for the same samples, the round's duration
and how long compute waited for it (``--overlap``: rounds run during the next inner phase); at the end, the
final loss beside the same model trained alone on as many samples. Exit status 0 when the
survivors finished with bit-identical state and the joiner took part.

With ``--nat`` (root, ``ip`` and ``nft``) every process runs in a network namespace of
benchmarks/nattopo.py: the bootstrap node (a relay) on a public address, peer1 behind a home-router
NAT (it cannot be dialed; others reach it through the bootstrap node's relay, it sends directly),
peers 2-4 on a public address.

Lives outside the package, in the checkout's ``demos/`` (``make demo``); uses :mod:`p2pcompute.overlay`
(the bootstrap node) and :mod:`p2pcompute.testing` (the synthetic task).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train.py"


@dataclass
class Peer:
    label: str
    proc: trio.Process
    peer_id: str = ""
    outer: dict[int, dict[str, Any]] = field(default_factory=dict)
    done: dict[str, Any] | None = None
    started: trio.Event = field(default_factory=trio.Event)


@dataclass
class Show:
    args: argparse.Namespace
    peers: list[Peer] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    killed: str = ""
    kill_now: trio.Event = field(default_factory=trio.Event)
    log: list[str] = field(default_factory=list)
    topo: Any = None  # benchmarks.nattopo.NatTopology with --nat


def _where(show: Show, label: str) -> list[str]:
    """The argv prefix that runs ``label``'s process in its namespace (--nat), else nothing."""
    if show.topo is None:
        return []
    box = {"bootstrap": "boot", "peer1": "a"}.get(label, "pub")
    prefix: list[str] = show.topo.boxes[box].exec()
    return prefix


async def _bootstrap_only(listen: str) -> None:
    from p2pcompute.overlay import open_node

    async with open_node(listen=[listen], role="bootstrap", relay=True) as node:
        print(json.dumps({"event": "bootstrap", "addrs": node.addrs}), flush=True)
        await trio.sleep_forever()


async def _read_lines(stream: trio.abc.ReceiveStream) -> Any:
    buf = b""
    async for chunk in stream:
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode(errors="replace")
    if buf:
        yield buf.decode(errors="replace")


def _spawn_args(show: Show, boot: str, seed: int) -> list[str]:
    a = show.args
    return [
        str(EXAMPLE), "--json", "--bootstrap", boot, "--outer-steps", str(a.outer_steps),
        "--inner-steps", str(a.inner_steps), "--batch", str(a.batch), "--group-size", "3",
        "--patience", str(a.patience), "--data-seed", str(seed), "--compression", a.compression,
        "--matchmaking-timeout", str(a.matchmaking_timeout), *(["--overlap"] if a.overlap else []),
        *(["--listen", "/ip4/0.0.0.0/tcp/0"] if a.nat else []),
    ]


# A worker imports torch and p2pcompute first, then waits for a line on stdin before running
# examples/train.py unchanged (as __main__, with its own argv): a joiner is ready the moment
# it is told to start, instead of spending half a minute importing on a loaded machine.
_LAUNCHER = """
import runpy, sys
import torch, trio, libp2p, p2pcompute.training.swarm
sys.stdin.readline()
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


async def _watch(show: Show, peer: Peer) -> None:
    assert peer.proc.stdout is not None
    async for line in _read_lines(peer.proc.stdout):
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("event") == "start":
            peer.peer_id = msg["peer"]
            show.labels[peer.peer_id] = peer.label
            peer.started.set()
            where = f"at outer step {msg['outer_step']}" if msg["outer_step"] else "from the initial weights"
            print(f"  [{peer.label}] up as {peer.peer_id[-8:]}, starting {where}", flush=True)
        elif msg.get("event") == "outer":
            peer.outer[msg["step"]] = msg
            if peer.label == "peer3" and msg["step"] >= show.args.kill_at:
                show.kill_now.set()
        elif msg.get("event") == "done":
            peer.done = msg


async def _stderr_sink(peer: Peer) -> None:
    assert peer.proc.stderr is not None
    tail: list[str] = []
    async for line in _read_lines(peer.proc.stderr):
        tail = [*tail[-20:], line]
    if peer.proc.returncode not in (0, None, -signal.SIGKILL) and tail:
        print(f"  [{peer.label}] stderr tail:\n    " + "\n    ".join(tail), flush=True)


async def _start_peer(show: Show, nursery: trio.Nursery, label: str, boot: str, seed: int) -> Peer:
    proc = await trio.lowlevel.open_process(
        [*_where(show, label), sys.executable, "-c", _LAUNCHER, *_spawn_args(show, boot, seed)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
    )
    peer = Peer(label, proc)
    show.peers.append(peer)
    nursery.start_soon(_watch, show, peer)
    nursery.start_soon(_stderr_sink, peer)
    return peer


async def _go(peer: Peer) -> None:
    assert peer.proc.stdin is not None
    await peer.proc.stdin.send_all(b"go\n")


def _env() -> dict[str, str]:
    paths = [str(EXAMPLE.parents[1]), os.environ.get("PYTHONPATH", "")]
    # One compute thread per peer process: several peers share this machine's cores.
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1"}


def _short(show: Show, peers: list[str]) -> str:
    return ",".join(sorted(show.labels.get(p, p[-6:]) for p in peers))


def _report(show: Show) -> tuple[int, float]:
    steps = sorted({s for p in show.peers for s in p.outer})
    print("\nouter step | eval loss | participants        | bytes sent | per-step avg would send | round  "
          "| compute waited")
    print("-----------+-----------+---------------------+------------+-------------------------+--------"
          "+---------------")
    samples = 0
    for s in steps:
        rows = [p.outer[s] for p in show.peers if s in p.outer]
        # A round is what the peers that averaged together report; a peer still catching up
        # (a joiner's solo step) is not part of it.
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault(tuple(sorted(r["participants"])), []).append(r)
        parts, members = max(groups.items(), key=lambda kv: len(kv[0]))
        sent = sum(r["bytes"] for r in members)
        per_step = sum(r["per_step_bytes"] for r in members)
        ratio = f"({per_step / sent:.0f}x)" if sent else ""
        who = _short(show, list(parts))
        seconds = max(r["seconds"] for r in members)
        # how long the inner steps stood still for this round (the longest wait among its peers);
        # overlapped, the round runs during the next inner phase and this is what it overran
        waited = max(r.get("waited", r["seconds"]) for r in members)
        print(f"{s:10d} | {members[0]['loss']:9.5f} | {who:19s} | {sent / 1e3:7.1f} kB | "
              f"{per_step / 1e6:9.2f} MB {ratio:10s} | {seconds:4.1f} s | {waited:5.2f} s")
        samples += len(members) * show.args.inner_steps * show.args.batch
    final = math.nan
    if steps:
        final = next(p.outer[steps[-1]]["loss"] for p in show.peers if steps[-1] in p.outer)
    joiner = next((p for p in show.peers if p.label == "peer4"), None)
    if joiner is not None and joiner.outer:
        solo = [s for s, r in sorted(joiner.outer.items()) if len(r["participants"]) == 1]
        if solo:
            print(f"(peer4 stepped alone at outer step(s) {solo} while catching up, then re-synced)")
    return samples, final


async def _demo(args: argparse.Namespace) -> int:
    if not EXAMPLE.exists():
        print(f"demo: {EXAMPLE} not found (run the demo from a source checkout)", file=sys.stderr)
        return 1
    show = Show(args)
    if args.nat:
        from benchmarks.nattopo import NatTopology, unavailable

        why = unavailable()
        if why is not None:
            print(f"demo: --nat needs network namespaces with NAT: {why}", file=sys.stderr)
            return 2
        with NatTopology() as topo:
            show.topo = topo
            a, router = topo.boxes["a"], topo.boxes["nat1"]
            print(f"  --nat: peer1 at {a.ip} behind a NAT ({router.ip}); the others public", flush=True)
            return await _run_show(show)
    return await _run_show(show)


async def _run_show(show: Show) -> int:
    args = show.args
    t0 = time.monotonic()
    print(f"p2pcompute training demo: bootstrap + 3 peers, {args.outer_steps} outer steps of "
          f"{args.inner_steps} inner steps; peer3 is killed after outer step {args.kill_at} and peer4 joins.",
          flush=True)
    with trio.fail_after(args.timeout):
        boot_proc = await trio.lowlevel.open_process(
            [*_where(show, "bootstrap"), sys.executable, "-m", "demos.diloco", "--bootstrap-only",
             "--listen", "/ip4/0.0.0.0/tcp/4001" if args.nat else args.listen], stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=_env(),
        )
        try:
            assert boot_proc.stdout is not None
            lines = _read_lines(boot_proc.stdout)
            boot = json.loads(await lines.__anext__())["addrs"][0]
            print(f"  [bootstrap] {boot}", flush=True)
            async with trio.open_nursery() as nursery:
                for i in (1, 2, 3):
                    await _go(await _start_peer(show, nursery, f"peer{i}", boot, i))
                joiner = await _start_peer(show, nursery, "peer4", boot, 4)  # imports now, starts later
                await show.kill_now.wait()
                victim = next(p for p in show.peers if p.label == "peer3")
                victim.proc.kill()
                show.killed = victim.peer_id
                print(f"  [peer3] killed (SIGKILL) after outer step {args.kill_at}; starting peer4",
                      flush=True)
                await _go(joiner)
                for p in show.peers:
                    await p.proc.wait()
        finally:
            boot_proc.send_signal(signal.SIGINT)
            with trio.move_on_after(10):
                await boot_proc.wait()
            if boot_proc.returncode is None:
                boot_proc.kill()
                await boot_proc.wait()

    samples, diloco_loss = _report(show)
    from p2pcompute.testing import train_alone

    alone_steps = samples // args.batch
    _, alone_loss = await trio.to_thread.run_sync(lambda: train_alone(alone_steps, args.batch))
    survivors = [p for p in show.peers if p.label != "peer3"]
    finals = {p.label: p.done for p in survivors}
    print(f"\nfinal eval loss, DiLoCo swarm:           {diloco_loss:.5f}")
    print(f"final eval loss, alone on {samples} samples: {alone_loss:.5f} "
          f"({alone_steps} AdamW steps of {args.batch})")
    total_sent = sum(r["bytes"] for p in show.peers for r in p.outer.values())
    total_per_step = sum(r["per_step_bytes"] for p in show.peers for r in p.outer.values())
    if total_sent:
        print(f"bytes sent: {total_sent / 1e6:.2f} MB; per-step averaging: {total_per_step / 1e6:.1f} MB "
              f"({total_per_step / total_sent:.0f}x more)")
    print(f"wall time {time.monotonic() - t0:.0f} s")

    problems = []
    for p in survivors:
        if p.proc.returncode != 0 or finals.get(p.label) is None:
            problems.append(f"{p.label} exited with {p.proc.returncode}")
    joiner = next(p for p in show.peers if p.label == "peer4")
    if not any(len(r["participants"]) > 1 for r in joiner.outer.values()):
        problems.append("peer4 never averaged with the others")
    last = args.outer_steps
    digests = {p.outer[last]["digest"] for p in survivors if last in p.outer}
    if len(digests) != 1:
        problems.append(f"survivors disagree on the final state: {digests}")
    if problems:
        print("demo FAILED: " + "; ".join(problems), flush=True)
        return 1
    print("demo OK: the survivors hold bit-identical state; peer4 joined and took part.", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the demo (or only a bootstrap node); returns the exit status.

    Example::

        $ python -m demos.diloco --outer-steps 8
    """
    parser = argparse.ArgumentParser(prog="python -m demos.diloco", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap-only", action="store_true", help="only run a bootstrap node")
    parser.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    parser.add_argument("--outer-steps", type=int, default=14)
    parser.add_argument("--inner-steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--kill-at", type=int, default=3, help="kill peer3 after this outer step")
    parser.add_argument("--patience", type=float, default=5.0, help="how long a round waits for late peers")
    parser.add_argument("--matchmaking-timeout", type=float, default=12.0)
    parser.add_argument("--compression", default="fp16", choices=["none", "fp16", "bf16", "int8"])
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--overlap", action="store_true",
                        help="average each outer step in the background during the next inner phase")
    parser.add_argument(
        "--nat",
        action="store_true",
        help="run each process in a network namespace, peer1 behind a NAT (needs root, ip, nft)",
    )
    args = parser.parse_args(argv)
    try:
        if args.bootstrap_only:
            trio.run(_bootstrap_only, args.listen)
            return 0
        return trio.run(_demo, args)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
