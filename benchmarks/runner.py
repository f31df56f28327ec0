"""The benchmark runner: finds the suites, runs each in its own process, collects results and plots.

Owns the results folder (``bench-results/<UTC time>/`` unless ``--out`` says otherwise)::

    <suite>.json        the suite's results (schema p2pcompute-bench/1, validated here)
    <suite>.log         everything the suite printed
    <suite>*.png        plots (benchmarks.plots)
    summary.json        this run: argv, machine, WAN set-up, one outcome per suite
    summary.txt         the tables, as printed

Each suite runs as ``python -m benchmarks.<suite> [--quick] --out <dir>/<suite>.json`` (contract 3)
in a fresh process, so a crash, a hang (per-suite timeout) or a memory peak in one suite cannot
touch the others, and ``peak_rss_mib`` is per suite. A suite module that does not exist yet is
reported as "not available". With ``--wan SPEC`` each suite gets a fresh emulated network
(benchmarks.wan) described in the environment (``benchresults.WAN_ENV``), torn down after the suite;
a suite that does not place its peers with it is reported as having run on loopback.

Imports the standard library and the other benchmarks modules; nothing imports this but
``benchmarks.__main__`` and ``p2pcompute.cli.bench``.
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from benchmarks import plots
from benchmarks.wan import Support, WanEmulation, WanError, parse_spec, probe_support, sweep_stale
from p2pcompute._fsutil import atomic_write
from p2pcompute.benchresults import (
    WAN_ENV,
    SchemaError,
    SuiteResult,
    default_out_dir,
    format_table,
    load_results,
    machine_facts,
)
from p2pcompute.errors import ConfigError

#: Suites in the order ``all`` runs them. ``wan`` measures the emulation itself; ``growth`` is the
#: overlay growth curve (8 -> 256 nodes).
SUITES = ("stream", "allreduce", "overlay", "tasks", "training", "wan", "growth", "attack", "rent")
RUN_SCHEMA = "p2pcompute-bench-run/1"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TIMEOUT = {True: 300.0, False: 3600.0}  # per suite, by quick


@dataclass
class Outcome:
    """What happened to one suite.

    ``status`` is ``ok``, ``not available``, ``failed``, ``timeout``, ``invalid`` or ``interrupted``.
    """

    suite: str
    status: str
    seconds: float = 0.0
    json_path: str | None = None
    log_path: str | None = None
    plots: list[str] = field(default_factory=list)
    detail: str = ""
    wan: str | None = None  # "emulated", "loopback (suite ignored --wan)", "loopback (<reason>)"


def suite_available(name: str, package: str = "benchmarks") -> bool:
    """True when ``benchmarks.<name>`` exists (it is not imported here).

    Example::

        [s for s in SUITES if suite_available(s)]
    """
    try:
        return importlib.util.find_spec(f"{package}.{name}") is not None
    except (ImportError, ValueError):
        return False


class Progress:
    """The progress display: one live line on a terminal, start/finish lines (and suite output) otherwise."""

    def __init__(self, stream: TextIO | None = None, *, echo: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.echo = (not self.tty) if echo is None else echo
        self._width = 0
        self._lock = threading.Lock()  # the output pump thread and the main thread both write

    def write(self, text: str) -> None:
        with self._lock:
            self._clear()
            print(text, file=self.stream, flush=True)

    def start(self, i: int, n: int, suite: str) -> None:
        self.write(f"[{i}/{n}] {suite}: starting")

    def line(self, suite: str, text: str) -> None:
        if self.echo:
            self.write(f"  {suite} | {text}")

    def tick(self, i: int, n: int, suite: str, elapsed: float, last: str) -> None:
        if not self.tty:
            return
        status = f"[{i}/{n}] {suite}  {elapsed:6.1f} s  {last}"[:118]
        with self._lock:
            self.stream.write("\r" + status.ljust(self._width))
            self.stream.flush()
            self._width = len(status)

    def _clear(self) -> None:
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0


def _pump(pipe: TextIO, log: TextIO, lines: collections.deque[str], suite: str, progress: Progress) -> None:
    # Copies the child's output to its log; bounded by the child's lifetime (ends at EOF).
    for raw in pipe:
        log.write(raw)
        log.flush()
        text = raw.rstrip("\n")
        lines.append(text)
        progress.line(suite, text)


def _stop(proc: subprocess.Popen[str]) -> None:
    """Stop the suite's process group (which we created with start_new_session) politely, then firmly."""
    for sig, wait in ((signal.SIGINT, 5.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_suite(
    suite: str,
    out_dir: Path,
    *,
    quick: bool,
    timeout: float,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    progress: Progress | None = None,
    index: tuple[int, int] = (1, 1),
    package: str = "benchmarks",
    pythonpath: Sequence[str] = (),
) -> Outcome:
    """Run one suite in a child process, validate its JSON; never raises for a suite's own failure.

    Example::

        outcome = run_suite("stream", Path("bench-results/x"), quick=True, timeout=120)
    """
    progress = progress or Progress()
    if not suite_available(suite, package):
        return Outcome(suite, "not available", detail=f"{package}.{suite} does not exist yet")
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{suite}.json"
    log_path = out_dir / f"{suite}.log"
    json_path.unlink(missing_ok=True)
    argv = [
        sys.executable,
        "-m",
        f"{package}.{suite}",
        *(["--quick"] if quick else []),
        "--out",
        str(json_path),
        *extra_args,
    ]
    child_env = dict(os.environ if env is None else env)
    paths = [*pythonpath, str(ROOT), *filter(None, [child_env.get("PYTHONPATH")])]
    child_env["PYTHONPATH"] = os.pathsep.join(paths)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    lines: collections.deque[str] = collections.deque(maxlen=40)
    start = time.monotonic()
    status = "failed"
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(argv)}\n")
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        assert proc.stdout is not None
        reader = threading.Thread(target=_pump, args=(proc.stdout, log, lines, suite, progress), daemon=True)
        reader.start()
        try:
            while True:
                try:
                    proc.wait(timeout=0.25)
                    break
                except subprocess.TimeoutExpired:
                    elapsed = time.monotonic() - start
                    if elapsed > timeout:
                        status = "timeout"
                        _stop(proc)
                        break
                    progress.tick(*index, suite, elapsed, lines[-1] if lines else "")
        except BaseException:
            _stop(proc)
            raise
        finally:
            reader.join(timeout=10)
            proc.stdout.close()
    seconds = time.monotonic() - start
    tail = "\n".join(list(lines)[-8:])
    if status == "timeout":
        return Outcome(suite, "timeout", seconds, None, str(log_path), detail=f"over {timeout:.0f} s\n{tail}")
    if proc.returncode != 0:
        return Outcome(
            suite, "failed", seconds, None, str(log_path), detail=f"exit {proc.returncode}\n{tail}"
        )
    try:
        load_results(json_path)
    except SchemaError as exc:
        return Outcome(suite, "invalid", seconds, str(json_path), str(log_path), detail=str(exc))
    return Outcome(suite, "ok", seconds, str(json_path), str(log_path))


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_all(
    suites: Sequence[str],
    *,
    out_dir: Path,
    quick: bool = False,
    timeout: float | None = None,
    wan: str | None = None,
    wan_peers: int = 4,
    make_plots: bool = True,
    progress: Progress | None = None,
    support: Support | None = None,
    package: str = "benchmarks",
    pythonpath: Sequence[str] = (),
    suite_args: Sequence[str] = (),
) -> list[Outcome]:
    """Run ``suites`` one after another into ``out_dir``, write ``summary.json``/``.txt``, return outcomes.

    ``suite_args`` go to every suite's command line as they are (``["--sizes", "64M"]``).

    Example::

        outcomes = run_all(["stream", "allreduce"], out_dir=default_out_dir(), quick=True)
    """
    progress = progress or Progress()
    spec = parse_spec(wan) if wan else None
    timeout = timeout or DEFAULT_TIMEOUT[quick]
    out_dir.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now(_dt.UTC).isoformat()
    wan_info: dict[str, Any] | None = None
    if spec is not None:
        support = support or probe_support()
        wan_info = {"requested": spec.describe(), "peers": wan_peers, "support": support.describe()}
        if support.ok:
            stale = sweep_stale()
            if stale:
                progress.write(f"removed namespaces left by dead runs: {', '.join(stale)}")
        progress.write(support.describe() + ("" if support.ok else "; running on plain loopback"))
    if make_plots and not plots.available():
        progress.write("plots skipped: matplotlib is not installed (pip install matplotlib)")
        make_plots = False
    outcomes: list[Outcome] = []
    tables: list[str] = []
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    try:
        for i, suite in enumerate(suites, 1):
            progress.start(i, len(suites), suite)
            outcome = _one(
                suite,
                out_dir,
                spec_text=wan,
                support=support,
                wan_peers=wan_peers,
                quick=quick,
                timeout=timeout,
                progress=progress,
                index=(i, len(suites)),
                package=package,
                pythonpath=pythonpath,
                extra_args=list(suite_args),
            )
            if outcome.status == "ok" and outcome.json_path:
                doc = json.loads(Path(outcome.json_path).read_text())
                table = f"== {suite} (primary: {doc['primary_metric']}) ==\n"
                table += format_table(SuiteResult.from_json(doc))
                tables.append(table)
                progress.write(table)
                if make_plots:
                    try:
                        outcome.plots = [str(p) for p in plots.plot_suite(doc, out_dir)]
                    except Exception as exc:  # a plotting bug must not lose the figures
                        outcome.detail += f"plots failed: {exc!r}"
            outcomes.append(outcome)
            progress.write(_outcome_line(outcome))
    except KeyboardInterrupt:
        outcomes.append(Outcome(suites[len(outcomes)] if len(outcomes) < len(suites) else "?", "interrupted"))
        progress.write("interrupted: stopped the running suite and tore down any emulated network")
        raise
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        _write_summary(out_dir, started, suites, quick, wan_info, outcomes, tables)
    return outcomes


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _one(
    suite: str,
    out_dir: Path,
    *,
    spec_text: str | None,
    support: Support | None,
    wan_peers: int,
    extra_args: list[str],
    **kw: Any,
) -> Outcome:
    """One suite, under a fresh emulated network when ``--wan`` was given and it is possible here."""
    kw["extra_args"] = extra_args
    if spec_text is None:
        return run_suite(suite, out_dir, **kw)
    assert support is not None
    if suite == "wan":  # the wan suite builds its own namespaces: hand it the spec
        kw["extra_args"] = ["--wan", spec_text, *extra_args]
        outcome = run_suite(suite, out_dir, **kw)
        outcome.wan = "emulated" if support.ok else f"loopback ({support.reason})"
        return outcome
    if not support.ok or not suite_available(suite, kw.get("package", "benchmarks")):
        outcome = run_suite(suite, out_dir, **kw)
        if not support.ok:
            outcome.wan = f"loopback ({support.reason})"
        return outcome
    try:
        with WanEmulation(parse_spec(spec_text), peers=wan_peers, support=support) as net:
            net.shape()
            env = {**os.environ, WAN_ENV: json.dumps(net.layout())}
            outcome = run_suite(suite, out_dir, env=env, **kw)
    except WanError as exc:
        return Outcome(suite, "failed", detail=f"WAN set-up failed: {exc}")
    if outcome.status == "ok" and outcome.json_path:
        doc = json.loads(Path(outcome.json_path).read_text())
        outcome.wan = "emulated" if doc.get("wan") else "loopback (suite ignored --wan)"
    return outcome


def _outcome_line(o: Outcome) -> str:
    where = f" -> {o.json_path}" if o.json_path else ""
    wan = f" [{o.wan}]" if o.wan else ""
    detail = (
        f"\n    {o.detail.strip().replace(chr(10), chr(10) + '    ')}"
        if o.detail.strip() and o.status != "ok"
        else ""
    )
    return f"{o.suite}: {o.status} ({o.seconds:.1f} s){wan}{where}{detail}"


def _write_summary(
    out_dir: Path,
    started: str,
    suites: Sequence[str],
    quick: bool,
    wan_info: dict[str, Any] | None,
    outcomes: list[Outcome],
    tables: list[str],
) -> None:
    doc = {
        "schema": RUN_SCHEMA,
        "started": started,
        "finished": _dt.datetime.now(_dt.UTC).isoformat(),
        "argv": sys.argv,
        "suites": list(suites),
        "quick": quick,
        "wan": wan_info,
        "machine": machine_facts(),
        "outcomes": [asdict(o) for o in outcomes],
    }
    atomic_write(out_dir / "summary.json", json.dumps(doc, indent=2).encode())
    text = "\n\n".join([*tables, "\n".join(_outcome_line(o) for o in outcomes)]) + "\n"
    atomic_write(out_dir / "summary.txt", text.encode())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The runner's options, shared by ``python -m benchmarks`` and ``p2pcompute bench``."""
    parser.add_argument(
        "suite",
        nargs="?",
        default="all",
        choices=[*SUITES, "all"],
        help="which suite to run (default: all that exist)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument("--out", metavar="DIR", help="results folder (default bench-results/<UTC time>)")
    parser.add_argument(
        "--wan",
        metavar="SPEC",
        help="emulate a WAN per peer, e.g. 50ms,200mbit,0.1%%loss "
        "(needs root or CAP_NET_ADMIN; falls back to loopback without)",
    )
    parser.add_argument(
        "--wan-peers", type=int, default=4, metavar="N", help="namespaces per suite (default 4)"
    )
    parser.add_argument(
        "--timeout", type=float, metavar="S", help="per-suite limit (default 300 quick, 3600)"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--suite-args",
        metavar="ARGS",
        help='options for the one suite named, as one string, e.g. --suite-args="--sizes 64M --peers 4"',
    )


def suite_args_from(args: argparse.Namespace) -> list[str]:
    """The ``--suite-args`` string split as a shell would; refused with ``all`` (suites differ)."""
    text = getattr(args, "suite_args", None)
    if not text:
        return []
    if args.suite == "all":
        raise SystemExit("--suite-args needs one suite named (each suite has its own options)")
    return shlex.split(text)


def run_from_args(args: argparse.Namespace, *, stream: TextIO | None = None) -> int:
    """Run what parsed ``args`` ask for; 0 when every suite that ran succeeded (see docs/benchmarks.md)."""
    progress = Progress(stream)
    suite_args = suite_args_from(args)
    if args.suite == "all":
        names = [s for s in SUITES if suite_available(s)]
        missing = [s for s in SUITES if s not in names]
        if missing:
            progress.write(f"not available yet: {', '.join(missing)}")
    else:
        names = [args.suite]
    # absolute: the suites run in the checkout's root, whatever folder the user started us from
    out_dir = Path(args.out).resolve() if args.out else default_out_dir()
    outcomes = run_all(
        names,
        out_dir=out_dir,
        quick=args.quick,
        timeout=args.timeout,
        wan=args.wan,
        wan_peers=args.wan_peers,
        make_plots=not args.no_plots,
        progress=progress,
        suite_args=suite_args,
    )
    progress.write(f"results in {out_dir}")
    bad = [o for o in outcomes if o.status != "ok"]
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks [SUITE|all] [--quick] [--out DIR] [--wan SPEC]``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="Run p2pcompute benchmark suites."
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except KeyboardInterrupt:
        return 130
    except ConfigError as exc:
        print(f"benchmarks: error: {exc}", file=sys.stderr)
        return 2
    except WanError as exc:
        print(f"benchmarks: error: {exc}", file=sys.stderr)
        return 1
