"""DiLoCo against per-step gradient averaging at equal samples; compute utilization under churn.

Part 1 (``bytes`` rows), in one process: ``--peers`` simulated peers train on their own
batches through an in-memory :class:`~p2pcompute.testing.LocalGroup` (real
arithmetic, the codecs' real rounding), on each task of ``--tasks``
(:mod:`p2pcompute.testing`): ``lm``, next-token prediction on text from a random Markov
source (cross-entropy, whose floor is the source's entropy), and ``teacher``, the
teacher-student regression of the examples and the demo (MSE, whose floor is the targets'
noise, near zero). Every configuration sees the same number of samples. Bytes are what one
peer sends in a butterfly all-reduce of the averaged tensors (``2 (n-1)/n`` of the payload
per round), summed over the run; the per-step row is the baseline. Final loss is on the
held-out set; the gap to per-step is given as a share of the loss and of per-step's loss
above the task's floor.

``loss_gap_overlapped`` (metric ``gap``, a fraction): the held-out loss of overlapped DiLoCo
(``overlap="delayed"``) against blocking DiLoCo at equal samples on ``lm`` (skip: ``--no-gap``).
Each overlapped round lands ``--land-lag`` of a phase after it starts (a network's round time,
counted in inner steps) and is applied at the next inner step; ``loss_gap_overlapped_at_boundary``
applies it at the next phase boundary (``land_early=False``), a whole phase late.

Part 2 (``utilization`` rows), real processes on 127.0.0.1: a bootstrap node and
``--peers`` processes run ``examples/train.py``; utilization is a surviving peer's time in
local steps divided by its training-loop wall time (the last round's landing included),
blocking (``utilization_blocking``) and overlapped (``utilization_overlapped``), without faults
and with one peer killed (SIGKILL) and replaced every ``--kill-every`` outer steps (``_kill``; a
replacement is killed only once it has averaged with the others, so a slow process start delays
the next kill instead of turning the row into a measure of start-up).
Skipped with ``--no-processes``.

``heterogeneous`` (same processes, no faults): the last of the ``--peers`` processes is 3x slower
per inner step (``examples/train.py --slowdown 3``) and every peer runs with ``--join-early``
(``heterogeneous_overlapped``: and ``--overlap``); ``heterogeneous_off`` is the same without it.
Phases are ``--hetero-inner-steps`` (400) long, so that the slow phase outlasts the fast peers'
``patience`` as a real model's does. Metrics:
``slow_rounds_share``, the share of a fast peer's rounds the slow peer took part in, and
``utilization`` of that fast peer. Skip: ``--no-hetero``; only these rows: ``--only-hetero``.

    python -m benchmarks.training [--quick] [--out results/]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import trio

from p2pcompute.benchresults import SuiteResult, print_table, wan_layout, write_results
from p2pcompute.testing import LocalGroup, MarkovTextTask, TeacherTask, evaluate, make_model
from p2pcompute.training.diloco import DiLoCo

ROOT = Path(__file__).resolve().parents[1]


class _Teacher:
    """The teacher regression of :mod:`p2pcompute.testing` behind the task interface."""

    def __init__(self) -> None:
        self.task = TeacherTask(0)
        self.batch = self.task.batch
        self.make_model = make_model
        self.loss = torch.nn.functional.mse_loss

    def evaluate(self, model: torch.nn.Module) -> float:
        return evaluate(model, self.task.eval_set())

    def floor(self) -> float:
        return self.task.noise**2  # the targets' own noise variance


TASKS: dict[str, Any] = {"teacher": _Teacher, "lm": lambda: MarkovTextTask(0)}


class _Lagged:
    """An averager whose rounds land ``lag`` of its owner's inner steps after they start.

    The in-memory group finishes a round as soon as every member has contributed; a network
    takes time, during which an overlapped peer keeps stepping. ``tick()`` counts the owner's
    steps; a round's result is handed back only once ``lag`` of them have passed since it began.
    """

    def __init__(self, inner: Any, lag: int) -> None:
        self.inner, self.lag, self.steps = inner, lag, 0
        self._waiting: list[tuple[int, trio.Event]] = []
        self._drained = False

    @property
    def peer_id(self) -> str:
        return str(self.inner.peer_id)

    async def average(self, tensors: Any, **kwargs: Any) -> Any:
        due = self.steps + self.lag
        out = await self.inner.average(tensors, **kwargs)
        if self.steps < due and not self._drained:
            event = trio.Event()
            self._waiting.append((due, event))
            await event.wait()
        return out

    def tick(self, steps: int = 1) -> None:
        self.steps += steps
        for due, event in [w for w in self._waiting if w[0] <= self.steps]:
            self._waiting.remove((due, event))
            event.set()

    def drain(self) -> None:
        """No more steps: what is in flight lands after its lag, as the compute waits for it (a
        round whose task starts after this, the last one, is not held back at all)."""
        self._drained = True
        self.tick(self.lag)


async def _simulate(
    peers: int, steps: int, batch: int, *, mode: str, inner_steps: int, compression: str, lr: float,
    task_name: str = "teacher", data_seed: int = 100, overlap: str | None = None, lag: int = 0,
    land_early: bool = True,
) -> tuple[float, int]:
    task = TASKS[task_name]()
    group = LocalGroup()
    models = [task.make_model(0) for _ in range(peers)]
    gens = [torch.Generator().manual_seed(data_seed + i) for i in range(peers)]
    lagged = [_Lagged(group.join(f"p{i}"), lag) for i in range(peers)]

    async with trio.open_nursery() as background:  # overlapped rounds run here
        opts = [
            DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=lr), lagged[i], inner_steps=inner_steps,  # type: ignore[arg-type]
                   mode=mode, compression=compression, overlap=overlap or False,  # type: ignore[arg-type]
                   nursery=background, land_early=land_early)
            for i, m in enumerate(models)
        ]

        async def run(i: int) -> None:
            for _ in range(steps):
                x, y = task.batch(batch, gens[i])
                task.loss(models[i](x), y).backward()
                await opts[i].astep(samples=batch)
                opts[i].zero_grad()
                lagged[i].tick()
                await trio.lowlevel.checkpoint()  # let a round in the background move on
            lagged[i].drain()
            await opts[i].flush()  # the last round lands (overlapped mode)

        async with trio.open_nursery() as nursery:
            for i in range(peers):
                nursery.start_soon(run, i)
    return task.evaluate(models[0]), opts[0].bytes_sent


def _bytes_part(
    result: SuiteResult, *, peers: int, steps: int, batch: int, h: int, repeats: int, tasks: tuple[str, ...]
) -> None:
    configs = [
        ("per-step averaging", "per_step", 1, "none", True),
        (f"diloco H={h}", "diloco", h, "none", False),
        (f"diloco H={h} fp16", "diloco", h, "fp16", False),
        (f"diloco H={h} int8", "diloco", h, "int8", False),
        # the same byte budget as H uncompressed, spent on 4x more frequent outer steps
        (f"diloco H={max(1, h // 4)} int8", "diloco", max(1, h // 4), "int8", False),
    ]
    for task_name in tasks:
        floor = TASKS[task_name]().floor()
        for name, mode, inner, codec, is_base in configs:
            row = result.config(f"{task_name}: {name}", part="bytes", task=task_name, peers=peers,
                                steps=steps, batch=batch, inner_steps=inner, compression=codec,
                                samples=peers * steps * batch, loss_floor=floor)
            if is_base:
                row.baseline = "per_step"
            for r in range(repeats):  # each repeat draws other data (the same task and start)
                t0 = time.perf_counter()
                loss, sent = trio.run(
                    lambda mode=mode, inner=inner, codec=codec, r=r, task_name=task_name: _simulate(
                        peers, steps, batch, mode=mode, inner_steps=inner, compression=codec, lr=3e-3,
                        task_name=task_name, data_seed=100 + 1000 * r,
                    )
                )
                row.add("final_loss", loss)
                row.add("bytes_sent_per_peer", sent)
                row.add("seconds", time.perf_counter() - t0)


def _gap_part(
    result: SuiteResult, *, peers: int, steps: int, batch: int, h: int, repeats: int, lag: float
) -> None:
    """``loss_gap_overlapped``: overlapped against blocking DiLoCo at equal samples on ``lm``.

    Overlapped rounds land ``lag`` x H inner steps after they start (a network's round time in
    steps) and are applied at once, mid-phase; ``loss_gap_overlapped_at_boundary`` applies them
    at the next phase boundary instead (a full phase late, whatever the network).
    """
    lag_steps = min(h - 1, max(0, round(lag * h)))  # a round landing after a whole phase would stall
    rows = {
        True: result.config("loss_gap_overlapped", part="gap", task="lm", peers=peers, steps=steps,
                            batch=batch, inner_steps=h, samples=peers * steps * batch, land="early",
                            lag_steps=lag_steps),
        False: result.config("loss_gap_overlapped_at_boundary", part="gap", task="lm", peers=peers,
                             steps=steps, batch=batch, inner_steps=h, samples=peers * steps * batch,
                             land="boundary"),
    }
    for r in range(repeats):
        blocking = trio.run(
            lambda r=r: _simulate(
                peers, steps, batch, mode="diloco", inner_steps=h, compression="none", lr=3e-3,
                task_name="lm", data_seed=100 + 1000 * r,
            )
        )[0]
        for early, row in rows.items():
            loss = trio.run(
                lambda r=r, early=early: _simulate(
                    peers, steps, batch, mode="diloco", inner_steps=h, compression="none", lr=3e-3,
                    task_name="lm", data_seed=100 + 1000 * r, overlap="delayed", lag=lag_steps,
                    land_early=early,
                )
            )[0]
            row.add("gap", (loss - blocking) / blocking)
            row.add("final_loss_blocking", blocking)
            row.add("final_loss_overlapped", loss)


def _processes_part(
    result: SuiteResult, *, peers: int, outer: int, inner: int, kill_every: int, timeout: float,
    faultless: bool = True, modes: tuple[str, ...] = ("blocking", "overlapped"),
) -> None:
    layout = wan_layout()  # under --wan every process gets its own namespace
    for mode in modes:
        for kills in (False, True) if faultless else (True,):
            name = f"utilization_{mode}" + ("_kill" if kills else "")
            row = result.config(name, part="utilization", peers=peers, outer_steps=outer, inner_steps=inner,
                                kill_every=kill_every if kills else 0, outer_mode=mode)
            if not kills and mode == "blocking":
                row.baseline = "no_faults"
            try:
                done = _run_processes(peers, outer, inner, kill_every if kills else 0, timeout, layout=layout,
                                      extra=["--overlap"] if mode == "overlapped" else [])
            except Exception as exc:  # a failed run is reported, not hidden
                row.notes.append(f"run failed: {type(exc).__name__}: {exc}")
                continue
            row.add("utilization", done["compute_seconds"] / done["loop_seconds"])
            row.add("loop_seconds", done["loop_seconds"])
            row.add("sync_seconds", done["sync_seconds"])
            row.notes.append(f"peer killed {done['kills']} time(s) (a replacement once it averaged with the "
                             f"others; rounds each replacement averaged in {done['replacement_rounds']}); "
                             f"rounds' peers {done['participants']}; "
                             f"compute waited (s) {done['waited']}")


def _hetero_part(
    result: SuiteResult, *, peers: int, outer: int, inner: int, timeout: float, slowdown: float = 3.0,
) -> None:
    layout = wan_layout()
    runs = (("heterogeneous", True, False), ("heterogeneous_overlapped", True, True),
            ("heterogeneous_off", False, False))
    for name, early, overlap in runs:
        row = result.config(name, part="heterogeneous", peers=peers, outer_steps=outer, inner_steps=inner,
                            slowdown=slowdown, join_early=early,
                            outer_mode="overlapped" if overlap else "blocking")
        try:
            done = _run_processes(peers, outer, inner, 0, timeout, layout=layout,
                                  extra=["--join-early"] * early + ["--overlap"] * overlap,
                                  victim_extra=["--slowdown", str(slowdown)])
        except Exception as exc:  # a failed run is reported, not hidden
            row.notes.append(f"run failed: {type(exc).__name__}: {exc}")
            continue
        slow = done.get("victim_peer")
        rounds = done["rounds"]
        joined = sum(1 for members in rounds if slow in members)
        row.add("slow_rounds_share", joined / len(rounds) if rounds else 0.0)
        row.add("utilization", done["compute_seconds"] / done["loop_seconds"])
        row.add("loop_seconds", done["loop_seconds"])
        row.notes.append(f"slow peer in {joined} of {len(rounds)} rounds; its phases' local steps "
                         f"{done.get('victim_local_steps')}; fast peer waited (s) {done['waited']}")


def _env() -> dict[str, str]:
    paths = (str(ROOT), os.environ.get("PYTHONPATH"))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def _run_processes(
    peers: int, outer: int, inner: int, kill_every: int, timeout: float,
    layout: dict[str, Any] | None = None, extra: list[str] | None = None,
    victim_extra: list[str] | None = None,
) -> dict[str, Any]:
    """Bootstrap node and peers as processes; under ``--wan`` the bootstrap node sits in peer 0's
    namespace and training peer ``k`` (1-based; a replacement takes its victim's place) in k's.
    ``victim_extra``: more arguments for the first victim (the last peer), e.g. ``--slowdown``."""
    def placed(slot: int, argv: list[str]) -> list[str]:
        if layout is None:
            return argv
        where = layout["peers"][slot]
        return [*where["exec"], *argv, "--listen", f"/ip4/{where['addr']}/tcp/0"]

    if layout is not None and len(layout["peers"]) < peers + 1:
        raise RuntimeError(f"--wan laid out {len(layout['peers'])} namespaces; {peers + 1} needed")
    boot = subprocess.Popen(
        placed(0, [sys.executable, "-m", "demos.diloco", "--bootstrap-only"]),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(),
    )
    procs: list[subprocess.Popen[str]] = []
    log_files: list[Any] = []
    try:
        assert boot.stdout is not None
        addr = json.loads(boot.stdout.readline())["addrs"][0]

        def spawn(seed: int, steps: int, slot: int, more: list[str] | None = None) -> subprocess.Popen[str]:
            logs = os.environ.get("P2PCOMPUTE_BENCH_LOGS")  # a folder: each peer's stderr (INFO) there
            err: Any = subprocess.DEVNULL
            if logs:
                Path(logs).mkdir(parents=True, exist_ok=True)
                err = open(Path(logs) / f"peer-{seed}.log", "w")  # noqa: SIM115 (closed below)
                log_files.append(err)
            p = subprocess.Popen(
                placed(slot, [sys.executable, str(ROOT / "examples" / "train.py"), "--json",
                              "--bootstrap", addr, "--outer-steps", str(steps), "--inner-steps", str(inner),
                              "--group-size", str(peers), "--data-seed", str(seed), *(extra or []),
                              *(more or [])]),
                stdout=subprocess.PIPE, stderr=err, text=True,
                env={**_env(), "P2PCOMPUTE_LOG": "INFO"} if logs else _env(),
            )
            procs.append(p)
            return p

        watched = spawn(1, outer, 1)
        for i in range(2, peers):
            spawn(i, outer, i)
        victim = spawn(peers, outer, peers, victim_extra) if peers > 1 else None

        def follow(p: subprocess.Popen[str] | None) -> list[str]:
            out: list[str] = []
            if p is not None and p.stdout is not None:
                threading.Thread(target=lambda: out.extend(iter(p.stdout.readline, "")), daemon=True).start()  # type: ignore[union-attr]
            return out

        def joint_rounds(out: list[str]) -> int:  # rounds a peer averaged with others
            return sum(1 for x in list(out) if '"outer"' in x and len(json.loads(x)["participants"]) > 1)

        victim_lines = follow(victim)
        replacements: list[list[str]] = []
        kills = 0
        done: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(watched.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
        reader.start()
        last_kill = 0
        while watched.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            steps = [json.loads(x)["step"] for x in list(lines) if '"outer"' in x]
            step = max(steps, default=0)
            # a replacement is killed only once it has averaged with the others: killing it while
            # its process starts would measure process start-up, not churn
            due = step - last_kill >= kill_every and step < outer - 1
            if kill_every and victim is not None and due and (kills == 0 or joint_rounds(victim_lines)):
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                kills += 1
                last_kill = step
                victim = spawn(100 + kills, outer, peers)
                victim_lines = follow(victim)
                replacements.append(victim_lines)
        if watched.poll() is None:
            raise TimeoutError(f"peer did not finish within {timeout} s")
        reader.join(5)
        for x in lines:
            msg = json.loads(x)
            if msg.get("event") == "done":
                done = msg
        done["kills"] = kills
        done["replacement_rounds"] = [joint_rounds(r) for r in replacements]
        outers = [json.loads(x) for x in lines if '"outer"' in x]
        done["participants"] = [len(o["participants"]) for o in outers]
        done["waited"] = [o.get("waited") for o in outers]
        done["round_seconds"] = [o.get("seconds") for o in outers]
        done["rounds"] = [o["participants"] for o in outers]
        first = [json.loads(x) for x in list(victim_lines)]
        done["victim_peer"] = next((m["peer"] for m in first if m.get("event") == "start"), None)
        done["victim_local_steps"] = [m.get("local_steps") for m in first if m.get("event") == "outer"]
        return done
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in log_files:
            f.close()
        boot.send_signal(signal.SIGINT)
        try:
            boot.wait(10)
        except subprocess.TimeoutExpired:
            boot.kill()
            boot.wait()


def run(quick: bool = False, **options: Any) -> SuiteResult:
    """Run the suite; ``quick`` is a tiny smoke run."""
    torch.set_num_threads(1)  # simulated peers share one thread; keeps the figures steady under load
    peers = int(options.get("peers", 4))
    # H = 512 rather than DiLoCo's 500: the H/4 int8 row then sends 1/511 of per-step averaging's
    # bytes; at H = 500 the int8 block scales leave it at 1/499 (docs/design/training.md)
    h = int(options.get("inner_steps", 50 if quick else 512))
    steps = int(options.get("steps", 2 * h if quick else 4 * h))
    batch = int(options.get("batch", 32))
    repeats = int(options.get("repeats", 1))
    tasks = tuple(options.get("tasks", ("lm", "teacher")))
    if any(t not in TASKS for t in tasks):
        raise ValueError(f"tasks are {sorted(TASKS)}, got {tasks}")
    result = SuiteResult("training", primary_metric="bytes_sent_per_peer", higher_is_better=False,
                         options={"quick": quick, "peers": peers, "inner_steps": h, "steps": steps,
                                  "batch": batch, "tasks": list(tasks), "repeats": repeats,
                                  "loadavg_start": list(os.getloadavg())})
    if options.get("bytes", True):
        _bytes_part(result, peers=peers, steps=steps, batch=batch, h=h, repeats=repeats, tasks=tasks)
    if options.get("gap", True):  # a smoke run compares two peers, not four
        _gap_part(result, peers=2 if quick else peers, steps=steps, batch=batch, h=h, repeats=repeats,
                  lag=float(options.get("land_lag", 0.25)))
    result.add_ratios(
        match=lambda a, b: a.params.get("part") == b.params.get("part") == "bytes"
        and a.params.get("task") == b.params.get("task")
    )
    if options.get("processes", True) and options.get("utilization", True):
        # a smoke run: two peers, three outer steps, the victim killed once (after step 1),
        # without the fault-free comparison run nor the blocking mode
        _processes_part(
            result, peers=int(options.get("proc_peers", 2 if quick else 3)),
            outer=int(options.get("outer_steps", 3 if quick else 12)),
            inner=int(options.get("proc_inner_steps", 20 if quick else 50)),
            kill_every=int(options.get("kill_every", 1 if quick else 3)), faultless=not quick,
            timeout=float(options.get("timeout", 600)),
            # a smoke run takes the overlapped path only (it includes the blocking one's matchmaking
            # and rounds); each mode is a set of processes, about 20 s on two loaded cores
            modes=("overlapped",) if quick else ("blocking", "overlapped"),
        )
    if options.get("processes", True) and options.get("hetero", not quick):
        _hetero_part(
            result, peers=int(options.get("proc_peers", 3)), outer=int(options.get("outer_steps", 12)),
            inner=int(options.get("hetero_inner_steps", 400)), timeout=float(options.get("timeout", 600)),
        )
    for base in (c for c in result.configs if c.baseline == "per_step" and c.samples):
        floor = base.params["loss_floor"]
        for c in result.configs:
            if c.params.get("part") == "bytes" and c.params["task"] == base.params["task"] and c is not base:
                b, v = base.median("final_loss"), c.median("final_loss")
                # the gap as a share of the loss, and of what per-step averaging learned above the
                # task's floor (the source's own entropy, or the targets' noise)
                c.params["final_loss_gap_vs_per_step"] = (v - b) / b
                c.params["excess_loss_gap_vs_per_step"] = (v - b) / (b - floor) if b > floor else None
                c.notes.append(
                    f"final-loss gap vs per-step: {100 * (v - b) / b:+.2f}% "
                    f"({100 * (v - b) / (b - floor):+.1f}% of per-step's loss above the floor {floor:.4g})"
                    if b > floor else f"final-loss gap vs per-step: {100 * (v - b) / b:+.2f}%"
                )
    result.options["loadavg_end"] = list(os.getloadavg())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--out", default=None, help="JSON file or folder")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="inner steps per peer")
    parser.add_argument("--repeats", type=int, default=1, help="runs per row, each on other data")
    parser.add_argument("--tasks", default="lm,teacher",
                        help="comma-separated: lm (next-token cross-entropy), teacher (regression)")
    parser.add_argument("--kill-every", type=int, default=None,
                        help="outer steps between kills (default 3; 1 with --quick)")
    parser.add_argument("--no-processes", action="store_true", help="skip the utilization part")
    parser.add_argument("--no-bytes", action="store_true", help="skip the bytes/loss part")
    parser.add_argument("--outer-steps", type=int, default=None, help="outer steps of the utilization runs")
    parser.add_argument("--no-gap", action="store_true", help="skip the loss_gap_overlapped row")
    parser.add_argument("--land-lag", type=float, default=0.25,
                        help="loss_gap rows: an overlapped round lands this share of an inner phase after "
                             "it starts (default 0.25)")
    parser.add_argument("--no-hetero", action="store_true", help="skip the heterogeneous rows")
    parser.add_argument("--hetero-inner-steps", type=int, default=None,
                        help="inner steps per outer step of the heterogeneous rows (default 400: a fast "
                             "phase of 1-2 s, so the slow one, 3x longer, outlasts the fast peers' patience)")
    parser.add_argument("--only-hetero", action="store_true",
                        help="only the heterogeneous rows (no bytes, gap or utilization rows)")
    parser.add_argument("--proc-inner-steps", type=int, default=None,
                        help="inner steps per outer step of the utilization runs (default 50)")
    args = parser.parse_args(argv)
    opts: dict[str, Any] = {"peers": args.peers, "repeats": args.repeats,
                            "tasks": tuple(t for t in args.tasks.split(",") if t),
                            "processes": not args.no_processes, "bytes": not args.no_bytes,
                            "gap": not args.no_gap, "land_lag": args.land_lag}
    if args.no_hetero:  # otherwise the suite decides (not in a --quick smoke run)
        opts["hetero"] = False
    if args.only_hetero:
        opts.update(bytes=False, gap=False, utilization=False, hetero=True)
    if args.hetero_inner_steps:
        opts["hetero_inner_steps"] = args.hetero_inner_steps
    if args.proc_inner_steps:
        opts["proc_inner_steps"] = args.proc_inner_steps
    if args.kill_every:
        opts["kill_every"] = args.kill_every
    if args.outer_steps:
        opts["outer_steps"] = args.outer_steps
    if args.inner_steps:
        opts["inner_steps"] = args.inner_steps
    if args.steps:
        opts["steps"] = args.steps
    result = run(args.quick, **opts)
    print_table(result)
    for c in result.configs:
        for note in c.notes:
            print(f"  {c.name}: {note}")
    if args.out:
        print(f"wrote {write_results(result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
