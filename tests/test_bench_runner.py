"""benchmarks.runner: suite discovery, child processes, outcomes, results folder, plots, WAN hand-over.

Also the smoke run `make test` asks for: every suite module present in benchmarks/ runs at tiny
sizes in its own process, and its JSON must follow the schema.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks import plots, runner, wan
from p2pcompute.benchresults import load_results

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
PRESENT = [s for s in runner.SUITES if runner.suite_available(s)]
# Smoke-run every suite but 'attack': tests/test_attack_sybil.py already runs its harness at the
# same quick scale (4 honest nodes, 16 sybils, about 30 s), and the suite test would double it.
# Nor 'rent' (about a minute quick): its parts are the rent jobs of tests/test_rent_integration.py
# and the multi-process small-task run of the 'tasks' suite, both run already.
SMOKED = [s for s in PRESENT if s not in ("attack", "rent")]
SMOKE_TIMEOUT = 420  # generous: guards against hangs on a loaded 2-core machine, measures nothing

GOOD = """
import argparse, sys
from p2pcompute.benchresults import SuiteResult, print_table, write_results, wan_layout
def main(argv=None):
    p = argparse.ArgumentParser(); p.add_argument("--quick", action="store_true"); p.add_argument("--out")
    p.add_argument("--label", default="")
    a = p.parse_args(argv)
    layout = wan_layout() if "{use_wan}" == "yes" else None
    r = SuiteResult("{name}", "mb_per_s", options={{"quick": a.quick, "label": a.label}})
    base = r.config("raw", size=1); base.baseline = "raw"
    for v in (10.0, 12.0, 11.0): base.add("mb_per_s", v)
    ours = r.config("ours", size=1, peers=len(layout["peers"]) if layout else 0)
    for v in (5.0, 6.0): ours.add("mb_per_s", v)
    r.add_ratios(); print_table(r); write_results(r, a.out); return 0
if __name__ == "__main__":
    sys.exit(main())
"""


@pytest.fixture
def fakebench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A throwaway package of suites: good, crash, hang, badjson, wanuser."""
    pkg = tmp_path / "pkgs" / "fakebench"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text(GOOD.format(name="good", use_wan="no"))
    (pkg / "wanuser.py").write_text(GOOD.format(name="wanuser", use_wan="yes"))
    (pkg / "crash.py").write_text("print('about to fail', flush=True)\nraise SystemExit(3)\n")
    (pkg / "hang.py").write_text("import time\nprint('waiting', flush=True)\ntime.sleep(600)\n")
    (pkg / "badjson.py").write_text(
        textwrap.dedent("""
        import json, sys
        out = sys.argv[sys.argv.index("--out") + 1]
        open(out, "w").write(json.dumps({"schema": "p2pcompute-bench/1", "suite": "badjson"}))
    """)
    )
    monkeypatch.syspath_prepend(str(pkg.parent))
    return pkg.parent


def _run(suite: str, out: Path, fake: Path, timeout: float = 120) -> runner.Outcome:
    return runner.run_suite(
        suite, out, quick=True, timeout=timeout, package="fakebench", pythonpath=[str(fake)]
    )


def test_outcomes_of_each_kind(fakebench: Path, tmp_path: Path) -> None:
    out = tmp_path / "res"
    good = _run("good", out, fakebench)
    assert good.status == "ok", good.detail
    assert load_results(good.json_path or "")["configs"][1]["ratio_vs_raw"] == pytest.approx(0.5)
    crash = _run("crash", out, fakebench)
    assert crash.status == "failed"
    assert "exit 3" in crash.detail
    assert "about to fail" in crash.detail
    bad = _run("badjson", out, fakebench)
    assert bad.status == "invalid"
    assert "primary_metric" in bad.detail
    missing = _run("nothere", out, fakebench)
    assert missing.status == "not available"


def test_a_hanging_suite_is_stopped(fakebench: Path, tmp_path: Path) -> None:
    outcome = _run("hang", tmp_path, fakebench, timeout=3)
    assert outcome.status == "timeout"
    assert "waiting" in Path(outcome.log_path or "").read_text()


def test_run_all_writes_folder_summary_and_plots(fakebench: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    outcomes = runner.run_all(
        ["good", "crash", "nothere"],
        out_dir=out,
        quick=True,
        timeout=120,
        package="fakebench",
        pythonpath=[str(fakebench)],
    )
    assert [o.status for o in outcomes] == ["ok", "failed", "not available"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["schema"] == runner.RUN_SCHEMA
    assert [o["status"] for o in summary["outcomes"]] == ["ok", "failed", "not available"]
    text = (out / "summary.txt").read_text()
    assert "== good (primary: mb_per_s) ==" in text
    assert "0.50x" in text
    if plots.available():
        assert sorted(Path(p).name for p in outcomes[0].plots) == ["good.png", "good_ratios.png"]
        assert (out / "good.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wan_is_reported_when_not_possible(fakebench: Path, tmp_path: Path) -> None:
    no = wan.Support(False, "needs root or CAP_NET_ADMIN to create network namespaces")
    (o,) = runner.run_all(
        ["good"],
        out_dir=tmp_path,
        quick=True,
        wan="50ms,200mbit",
        support=no,
        make_plots=False,
        package="fakebench",
        pythonpath=[str(fakebench)],
    )
    assert o.status == "ok"
    assert o.wan == f"loopback ({no.reason})"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["wan"]["requested"] == "delay=50ms,rate=200mbit"
    assert "unavailable" in summary["wan"]["support"]


@pytest.mark.skipif(not wan.probe_support().ok, reason=wan.probe_support().describe())
def test_wan_layout_reaches_the_suite_and_is_torn_down(fakebench: Path, tmp_path: Path) -> None:
    before = set(wan.list_namespaces())
    outcomes = runner.run_all(
        ["wanuser", "good"],
        out_dir=tmp_path,
        quick=True,
        wan="10mbit",
        wan_peers=3,
        make_plots=False,
        package="fakebench",
        pythonpath=[str(fakebench)],
    )
    assert [o.status for o in outcomes] == ["ok", "ok"]
    assert outcomes[0].wan == "emulated"
    assert outcomes[1].wan == "loopback (suite ignored --wan)"
    doc = load_results(tmp_path / "wanuser.json")
    assert [p["addr"] for p in doc["wan"]["peers"]] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
    assert doc["configs"][1]["params"]["peers"] == 3
    assert set(wan.list_namespaces()) == before


def test_entry_point_reports_missing_suites_and_runs_the_rest(tmp_path: Path) -> None:
    # `python -m benchmarks wan --quick` end to end, in a real process.
    got = subprocess.run(
        [sys.executable, "-m", "benchmarks", "wan", "--quick", "--out", str(tmp_path), "--no-plots"],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
        cwd=ROOT,
        env=ENV,
        check=False,
    )
    assert got.returncode == 0, got.stdout + got.stderr
    assert "wan: ok" in got.stdout
    load_results(tmp_path / "wan.json")
    bad = subprocess.run(
        [sys.executable, "-m", "benchmarks", "wan", "--wan", "fast"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=ENV,
        check=False,
    )
    assert bad.returncode == 2
    assert "cannot read --wan item" in bad.stderr


@pytest.mark.slow
def test_every_issue_suite_is_present() -> None:
    assert {"stream", "allreduce", "overlay", "tasks", "training"} <= set(PRESENT)


@pytest.mark.parametrize("suite", SMOKED)
def test_smoke_every_present_suite(suite: str, tmp_path: Path) -> None:
    """Each suite in benchmarks/ runs at tiny sizes in its own process and writes schema-valid JSON."""
    out = tmp_path / f"{suite}.json"
    got = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{suite}", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
        cwd=ROOT,
        env=ENV,
        check=False,
    )
    assert got.returncode == 0, (got.stdout + got.stderr)[-3000:]
    doc = load_results(out)
    assert doc["suite"] == suite
    assert doc["configs"], "a smoke run must measure at least one configuration"
    assert any(c.get("baseline") for c in doc["configs"]), (
        "every suite runs a baseline in the same invocation"
    )


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_is_one_live_line() -> None:
    tty = _Tty()
    p = runner.Progress(tty)
    assert p.tty
    assert not p.echo
    p.tick(1, 2, "stream", 3.5, "sending 256 MiB")
    p.tick(1, 2, "stream", 4.0, "done")
    p.line("stream", "not echoed on a terminal")
    p.write("stream: ok")
    text = tty.getvalue()
    assert text.count("\r[1/2] stream") == 2
    assert "not echoed" not in text
    assert text.endswith("stream: ok\n")
    log = io.StringIO()
    q = runner.Progress(log)
    q.tick(1, 1, "x", 1.0, "hidden")
    q.line("x", "shown")
    assert log.getvalue() == "  x | shown\n"


def test_suite_args_reach_the_suite(fakebench: Path, tmp_path: Path) -> None:
    outcomes = runner.run_all(
        ["good"], out_dir=tmp_path, quick=True, make_plots=False, package="fakebench",
        pythonpath=[str(fakebench)], suite_args=["--label", "two words"],
    )
    assert [o.status for o in outcomes] == ["ok"]
    assert load_results(tmp_path / "good.json")["options"]["label"] == "two words"


def test_suite_args_need_one_suite() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    one = parser.parse_args(["allreduce", "--suite-args", "--sizes 64M --peers '2,4'"])
    assert runner.suite_args_from(one) == ["--sizes", "64M", "--peers", "2,4"]
    with pytest.raises(SystemExit):
        runner.suite_args_from(parser.parse_args(["--suite-args", "--sizes 64M"]))
