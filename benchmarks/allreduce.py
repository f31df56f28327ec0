"""All-reduce benchmark: p2pcompute's encrypted, fault-tolerant averaging vs torch.distributed gloo.

Every configuration runs as separate processes (one per peer) on this machine:

* ``gloo``: ``torch.distributed.all_reduce`` (SUM, then divide) of the same float32 tensor with
  the same process count: the same-run baseline (C++, unencrypted).
* ``p2pc-<codec>``: each process runs a py-libp2p node, a tensor lane (AES-256-OCB3) and a
  :class:`~p2pcompute.collective.Collective`; per round the peers form a group (timed apart)
  and ``all_reduce`` the tensor in place. Seconds per round are the all-reduce alone;
  ``bus_GBps`` is the data each peer sends and receives, ``2 (n-1)/n * bytes``, per second.
* ``p2pc-<codec> aggregator=<kind>``: the same with a robust aggregator (every peer honest: what
  robustness costs on the honest path; ``params.aggregator``). Default ``centered_clip``, on the
  first codec only.
* ``death``: 4 peers average; one dies while sending (``os._exit``) or hangs (``SIGSTOP``
  itself); the figure is wall time from its death to the last survivor's result.

``python -m benchmarks.allreduce [--quick] [--out PATH] [--sizes 16M,64M] [--peers 2,4]
[--codecs none,fp16,bf16,int8] [--aggregators centered_clip,trimmed_mean] [--rounds 3]``.
Diagnostics: ``P2PC_BENCH_TRACE=1`` prints each peer's collective timeline on stderr;
``P2PC_BENCH_PROFILE=PATH`` writes a cProfile of peer 0's event loop during the last round;
``cpu_seconds_all_peers`` is a round's CPU time summed over the processes (all threads).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.procs import IP_ENV, worker_env
from p2pcompute.benchresults import SuiteResult, print_table, wan_layout, write_results

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"1M": 1 << 20, "4M": 4 << 20, "16M": 16 << 20, "64M": 64 << 20}


def _parse_size(text: str) -> int:
    return SIZES[text] if text in SIZES else int(text)


_MASTER_ENV = "P2PC_BENCH_MASTER"  # gloo's rendezvous address: worker 0's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(args: list[str], *, peer: dict[str, Any] | None = None) -> subprocess.Popen[str]:
    """A worker process; with ``peer`` (a WAN layout entry) inside that peer's namespace."""
    env = worker_env(peer["addr"] if peer is not None else None)
    env.setdefault("OMP_NUM_THREADS", "1")
    if peer is not None:
        env["GLOO_SOCKET_IFNAME"] = "eth0"  # the namespace's link, not its loopback
    return subprocess.Popen(
        [*(peer["exec"] if peer else []), sys.executable, "-m", "benchmarks.allreduce", *args],
        stdout=subprocess.PIPE,
        stderr=None if os.environ.get("P2PC_BENCH_TRACE") else subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=str(ROOT),
    )


def _collect(
    procs: list[subprocess.Popen[str]], timeout: float, *, kill_after: int | None = None
) -> list[dict[str, Any] | None]:
    """Results of ``procs``; with ``kill_after=k``, the rest are killed once the first k are done."""
    out: list[dict[str, Any] | None] = []
    deadline = time.monotonic() + timeout
    for i, p in enumerate(procs):
        if kill_after is not None and i >= kill_after:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
            p.kill()
        try:
            stdout, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
            p.kill()
            stdout, _ = p.communicate()
        result = None
        for line in stdout.splitlines():
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT ") :])
        out.append(result)
    return out


# ----------------------------------------------------------------------------- gloo worker


def gloo_worker(rank: int, world: int, size: int, rounds: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    master = os.environ.get(_MASTER_ENV, "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=world)
    t = torch.randn(size) * (rank + 1)
    times, cpu = [], []
    for _ in range(rounds + 1):  # the first round warms up
        dist.barrier()
        start, c0 = time.perf_counter(), time.process_time()
        dist.all_reduce(t)
        t.div_(world)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - c0)
    dist.destroy_process_group()
    print("RESULT " + json.dumps({"rank": rank, "seconds": times[1:], "cpu_seconds": cpu[1:]}), flush=True)


# ----------------------------------------------------------------------------- p2pcompute worker


def p2pc_worker(index: int, n: int, size: int, codecs: list[str], rounds: int, rendezvous: str,
                fault: str) -> None:
    import torch
    import trio

    torch.set_num_threads(1)
    if os.environ.get("P2PC_BENCH_TRACE"):  # the collective's per-event timeline, on stderr
        import logging

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format=f"%(relativeCreated)8.0f ms peer{index} %(message)s")
        logging.getLogger("p2pcompute.collective").setLevel(logging.DEBUG)
    trio.run(_p2pc_main, index, n, size, codecs, rounds, Path(rendezvous), fault)


async def _p2pc_main(index: int, n: int, size: int, codecs: list[str], rounds: int, rendezvous: Path,
                     fault: str) -> None:
    import torch
    import trio

    from p2pcompute.capacity.model import Capacity
    from p2pcompute.collective import Formed, Timeouts, open_collective
    from p2pcompute.collective.faults import FaultPlan
    from p2pcompute.overlay import open_node
    from p2pcompute.tensors import open_lane

    cap = Capacity(cpu_cores=2, ram_total=8 << 30, ram_available=4 << 30, platform="bench")
    timeouts = Timeouts(sender_timeout=5.0, reducer_timeout=10.0, status_timeout=15.0, suspect_grace=0.5)
    async with contextlib.AsyncExitStack() as stack:
        boot_file = rendezvous / "boot"
        listen = [f"/ip4/{os.environ.get(IP_ENV, '127.0.0.1')}/tcp/0"]
        if index == 0:
            boot = await stack.enter_async_context(open_node(role="bootstrap", capacity=cap, listen=listen))
            boot_file.with_suffix(".tmp").write_text(boot.addrs[0])
            boot_file.with_suffix(".tmp").rename(boot_file)
        else:
            with trio.fail_after(60):
                while not boot_file.exists():
                    await trio.sleep(0.05)
        node = await stack.enter_async_context(
            open_node(bootstrap=[boot_file.read_text()], capacity=cap, listen=listen)
        )
        lane = await stack.enter_async_context(open_lane(node))
        faults = FaultPlan()
        coll = await stack.enter_async_context(
            open_collective(node, lane, timeouts=timeouts, faults=faults)
        )
        (rendezvous / f"peer{index}").write_text(node.addrs[0])
        with trio.fail_after(60):
            while len(list(rendezvous.glob("peer*"))) < n:
                await trio.sleep(0.05)
        for other in sorted(rendezvous.glob("peer*")):
            addr = other.read_text()
            if not addr.endswith(node.peer_id):
                with contextlib.suppress(Exception):
                    await node.connect(addr)
        await node.wait_for_peers(n - 1, timeout=60)
        gen = torch.Generator().manual_seed(index)
        base = torch.randn(size, generator=gen)
        t = base.clone()
        report: dict[str, Any] = {"index": index, "codecs": {}}
        death: dict[str, float] = {}
        if fault and index == n - 1:
            async def die() -> None:
                report["died_at"] = time.time()
                print("RESULT " + json.dumps(report), flush=True)
                if fault == "crash":
                    os._exit(1)
                os.kill(os.getpid(), signal.SIGSTOP)
            faults.on("contribution_sent", die)
        for variant in codecs:  # "codec" (the mean) or "codec:aggregator"
            codec, _, aggregator = variant.partition(":")
            key = f"{codec}-{aggregator}" if aggregator else codec
            rows: dict[str, list[float]] = {"seconds": [], "match_seconds": [], "cpu_seconds": []}
            for r in range(rounds + (0 if fault else 1)):  # one warm-up round unless measuring a death
                t.copy_(base)
                m0 = time.perf_counter()
                group = await coll.form_group("bench", f"{key}-{r}", layout=_layout(t), target=n,
                                              min_size=2, timeout=120)
                if not isinstance(group, Formed):
                    report["error"] = f"no group: {group}"
                    break
                a0, c0 = time.perf_counter(), time.process_time()
                # P2PC_BENCH_PROFILE=path: cProfile of peer 0's event loop in the last round
                profile_to = os.environ.get("P2PC_BENCH_PROFILE") if index == 0 and r == rounds else None
                prof = cProfile.Profile() if profile_to else None
                if prof is not None:
                    prof.enable()
                res = await coll.all_reduce(group, "bench", f"{key}-{r}", [t], codec=codec,
                                            aggregator=aggregator or "mean")
                if prof is not None:
                    prof.disable()
                    prof.dump_stats(profile_to)
                a1, c1 = time.perf_counter(), time.process_time()
                if fault:
                    death = {"result_at": time.time(), "ok": float(res.ok),
                             "participants": float(len(res.participants))}
                    continue
                if not res.ok:
                    report["error"] = res.reason
                    break
                if r > 0 or rounds == 0:
                    rows["seconds"].append(a1 - a0)
                    rows["match_seconds"].append(a0 - m0)
                    rows["cpu_seconds"].append(c1 - c0)  # this process, all its threads
            report["codecs"][variant] = rows
        report.update(death)
        print("RESULT " + json.dumps(report), flush=True)
        await trio.sleep(1.0)  # let the others finish talking to us


def _layout(t: Any) -> bytes:
    from p2pcompute.collective import tensors_layout

    return tensors_layout([t])


# ----------------------------------------------------------------------------- the suite


def run(quick: bool = False, **options: Any) -> SuiteResult:
    """Measure gloo and p2pcompute all-reduce (and a peer's death) as separate processes."""
    sizes = [_parse_size(s) for s in options.get("sizes") or (["1M"] if quick else ["16M", "64M"])]
    peers = [int(p) for p in options.get("peers") or ([2] if quick else [2, 4])]
    codecs = list(options.get("codecs") or (["none"] if quick else ["none", "fp16", "bf16", "int8"]))
    aggregators = [a for a in options.get("aggregators") or ["centered_clip"] if a != "mean"]
    rounds = int(options.get("rounds") or (1 if quick else 3))
    deaths = not quick and not options.get("no_deaths")
    suite = SuiteResult("allreduce", primary_metric="seconds", higher_is_better=False,
                        options={"sizes": sizes, "peers": peers, "codecs": codecs, "rounds": rounds,
                                 "aggregators": aggregators})
    # under `--wan` worker i runs in peer i's namespace (gloo's and ours alike)
    layout = wan_layout()
    places: list[dict[str, Any]] | None = layout["peers"] if layout else None
    if places is not None:
        too_many = [n for n in peers if n > len(places)]
        if too_many:
            raise SystemExit(f"--wan laid out {len(places)} peers; asked for {max(too_many)}")

    def at(i: int) -> dict[str, Any] | None:
        return places[i] if places is not None else None

    for n in peers:
        for size in sizes:
            label = f"{size >> 20}M"
            gloo = suite.config(f"gloo n={n} {label}", peers=n, size=size, codec="gloo")
            gloo.baseline = "gloo"
            port = _free_port()
            if places is not None:
                os.environ[_MASTER_ENV] = places[0]["addr"]
            procs = [_spawn(["--gloo-worker", str(r), str(n), str(size), str(rounds), str(port)], peer=at(r))
                     for r in range(n)]
            results = _collect(procs, timeout=600)
            if results[0] is None:
                gloo.notes.append("gloo run failed")
            else:
                for s in results[0]["seconds"]:
                    gloo.add("seconds", s)
                    gloo.add("bus_GBps", 2 * (n - 1) / n * size * 4 / s / 1e9)
                if all(r is not None for r in results):
                    for k in range(len(results[0]["cpu_seconds"])):
                        gloo.add("cpu_seconds_all_peers", sum(r["cpu_seconds"][k] for r in results if r))
            rows = {c: suite.config(f"p2pc-{c} n={n} {label}", peers=n, size=size, codec=c) for c in codecs}
            for a in aggregators:  # robust rows: the first codec, every peer honest
                rows[f"{codecs[0]}:{a}"] = suite.config(
                    f"p2pc-{codecs[0]} aggregator={a} n={n} {label}", peers=n, size=size, codec=codecs[0],
                    aggregator=a,
                )
            with tempfile.TemporaryDirectory() as tmp:
                procs = [_spawn(["--p2pc-worker", str(i), str(n), str(size), ",".join(rows), str(rounds),
                                 tmp, ""], peer=at(i)) for i in range(n)]
                results = _collect(procs, timeout=1800)
            for res in results:
                if res is None or "error" in res:
                    for row in rows.values():
                        row.notes.append(f"a peer failed: {res and res.get('error')}")
                    break
            first = results[0]
            if first is not None:
                for c, row in rows.items():
                    for s in first["codecs"].get(c, {}).get("seconds", []):
                        row.add("seconds", s)
                        row.add("bus_GBps", 2 * (n - 1) / n * size * 4 / s / 1e9)
                    for s in first["codecs"].get(c, {}).get("match_seconds", []):
                        row.add("match_seconds", s)
                    # CPU seconds of one round summed over every peer's process: what the round costs
                    per_peer = [res["codecs"].get(c, {}).get("cpu_seconds", []) for res in results if res]
                    for k in range(min((len(x) for x in per_peer), default=0)):
                        row.add("cpu_seconds_all_peers", sum(x[k] for x in per_peer))
    if deaths:
        n, size = 4, sizes[0]
        for fault in ("crash", "hang"):
            row = suite.config(f"death-{fault} n={n} {size >> 20}M", peers=n, size=size, codec="none",
                               fault=fault)
            with tempfile.TemporaryDirectory() as tmp:
                procs = [_spawn(["--p2pc-worker", str(i), str(n), str(size), "none", "1", tmp, fault],
                                peer=at(i)) for i in range(n)]
                results = _collect(procs, timeout=300, kill_after=n - 1)
            died = results[-1]
            survivors = [r for r in results[:-1] if r is not None and "result_at" in r]
            if died is None or "died_at" not in died or len(survivors) < n - 1:
                row.notes.append("death run incomplete")
                continue
            row.add("death_to_result_s", max(r["result_at"] for r in survivors) - died["died_at"])
            row.add("survivors_ok", min(r["ok"] for r in survivors))
            row.notes.append(f"participants reported: {sorted({int(r['participants']) for r in survivors})}")
    suite.add_ratios(lambda a, b: a.params.get("size") == b.params.get("size")
                     and a.params.get("peers") == b.params.get("peers"))
    return suite


def main(argv: list[str] | None = None) -> int:
    doc = (__doc__ or "").split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.allreduce", description=doc)
    parser.add_argument("--quick", action="store_true", help="1M elements, 2 peers, codec none, 1 round")
    parser.add_argument("--out", default="bench-results", help="JSON file or folder")
    parser.add_argument("--sizes", help="comma-separated element counts (16M, 64M or integers)")
    parser.add_argument("--peers", help="comma-separated peer counts (default 2,4)")
    parser.add_argument("--codecs", help="comma-separated codecs (default none,fp16,bf16,int8)")
    parser.add_argument("--aggregators", help="robust aggregators measured besides the mean, on the first "
                        "codec (default centered_clip; also trimmed_mean)")
    parser.add_argument("--rounds", type=int, help="measured rounds per configuration (default 3)")
    parser.add_argument("--no-deaths", action="store_true", help="skip the peer-death measurement")
    parser.add_argument("--gloo-worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--p2pc-worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gloo_worker:
        rank, world, size, rounds, port = (int(x) for x in args.gloo_worker)
        gloo_worker(rank, world, size, rounds, port)
        return 0
    if args.p2pc_worker:
        i, n, size, codecs, rounds, tmp, fault = args.p2pc_worker
        p2pc_worker(int(i), int(n), int(size), codecs.split(","), int(rounds), tmp, fault)
        return 0
    def split(text: str | None) -> list[str] | None:
        return text.split(",") if text else None

    result = run(args.quick, sizes=split(args.sizes), peers=split(args.peers), codecs=split(args.codecs),
                 aggregators=split(args.aggregators), rounds=args.rounds, no_deaths=args.no_deaths)
    print(f"load average at the end: {os.getloadavg()}", flush=True)
    print_table(result, ["seconds", "bus_GBps", "match_seconds", "death_to_result_s"])
    write_results(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
