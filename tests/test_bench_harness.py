"""benchmarks.harness: statistics, same-run ratios, the JSON schema and its validator, target checks."""

from __future__ import annotations

import copy
import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcompute import benchresults as harness
from p2pcompute.benchresults import ConfigResult, SchemaError, SuiteResult
from p2pcompute.errors import ConfigError

finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)


@given(st.lists(finite, min_size=1, max_size=50))
def test_summarize_orders_and_counts(values: list[float]) -> None:
    s = harness.summarize(values)
    assert s["min"] <= s["median"] <= s["max"]
    assert s["min"] == min(values)
    assert s["max"] == max(values)
    assert s["n"] == len(values)
    assert s["stdev"] >= 0
    assert s["min"] - 1e-6 * abs(s["min"]) <= s["mean"] <= s["max"] + 1e-6 * abs(s["max"])


def test_summarize_known_values() -> None:
    s = harness.summarize([3.0, 1.0, 2.0, 10.0])
    assert s == {
        "median": 2.5,
        "min": 1.0,
        "max": 10.0,
        "mean": 4.0,
        "stdev": statistics.stdev([3, 1, 2, 10]),
        "n": 4,
    }
    assert harness.summarize([]) == {"n": 0}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_samples_are_refused(bad: float) -> None:
    row = ConfigResult("x")
    with pytest.raises(ConfigError, match="not finite"):
        row.add("seconds", bad)
    assert row.samples == {}


def _suite(higher: bool = True) -> SuiteResult:
    r = SuiteResult(
        "demo", "gbytes_per_s" if higher else "seconds", higher_is_better=higher, options={"quick": True}
    )
    metric = r.primary_metric
    base = r.config("raw_tcp", size=1024)
    base.baseline = "raw_tcp"
    for v in (2.0, 2.0, 4.0):
        base.add(metric, v)
    ours = r.config("lane", size=1024)
    for v in (1.0, 1.0, 3.0):
        ours.add(metric, v)
    other = r.config("lane_big", size=4096)
    other.add(metric, 5.0)
    return r


def test_ratios_higher_is_better() -> None:
    r = _suite(True)
    r.add_ratios()
    lane = r.configs[1]
    assert lane.ratios == {"raw_tcp": pytest.approx(0.5)}
    assert r.configs[2].ratios == {}  # different size: no comparable baseline
    assert r.configs[0].ratios == {}  # a baseline is not compared with itself


def test_ratios_lower_is_better_inverted() -> None:
    r = _suite(False)
    r.add_ratios()
    assert r.configs[1].ratios == {"raw_tcp": pytest.approx(2.0)}  # half the time: twice as good


def test_custom_match() -> None:
    r = _suite(True)
    r.add_ratios(match=lambda a, b: True)
    assert r.configs[2].ratios == {"raw_tcp": pytest.approx(2.5)}


def test_json_roundtrip_validates(tmp_path: Path) -> None:
    r = _suite()
    r.add_ratios()
    path = harness.write_results(r, tmp_path)
    assert path == tmp_path / "demo.json"
    doc = harness.load_results(path)
    assert doc["schema"] == harness.SCHEMA
    assert doc["wan"] is None
    assert doc["machine"]["cpus"] >= 1
    lane = doc["configs"][1]
    assert lane["ratio_vs_raw_tcp"] == pytest.approx(0.5)
    assert lane["stats"]["gbytes_per_s"]["median"] == 1.0
    assert harness.ratio_of(doc, "lane", "raw_tcp") == pytest.approx(0.5)
    with pytest.raises(ConfigError):
        harness.ratio_of(doc, "nope", "raw_tcp")
    back = SuiteResult.from_json(doc)
    assert [c.name for c in back.configs] == ["raw_tcp", "lane", "lane_big"]
    assert back.configs[1].ratios == {"raw_tcp": pytest.approx(0.5)}
    assert harness.format_table(back) == harness.format_table(r)


def test_write_results_to_a_file_path(tmp_path: Path) -> None:
    path = harness.write_results(_suite(), tmp_path / "deep" / "x.json")
    assert path == tmp_path / "deep" / "x.json"
    harness.load_results(path)
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temp file left behind


def _doc() -> dict[str, Any]:
    r = _suite()
    r.add_ratios()
    doc: dict[str, Any] = json.loads(json.dumps(r.to_json()))
    return doc


def _break(fn: Any) -> dict[str, Any]:
    doc = copy.deepcopy(_doc())
    fn(doc)
    return doc


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda d: d.update(schema="other/1"), "schema"),
        (lambda d: d.pop("suite"), "suite"),
        (lambda d: d.update(started="yesterday"), "ISO 8601"),
        (lambda d: d.update(higher_is_better="yes"), "higher_is_better"),
        (lambda d: d["machine"].pop("loadavg"), "machine.loadavg"),
        (lambda d: d.update(configs={}), "configs must be a list"),
        (lambda d: d["configs"][1].update(name="raw_tcp"), "not unique"),
        (lambda d: d["configs"][1]["samples"]["gbytes_per_s"].append(9.0), "disagree"),
        (lambda d: d["configs"][1]["samples"].update(x=[1.0]), "stats cover"),
        (lambda d: d["configs"][1]["samples"].update(gbytes_per_s=[]), "non-empty list"),
        (lambda d: d["configs"][1]["samples"].update(gbytes_per_s=["1"]), "finite numbers"),
        (lambda d: d["configs"][1].update(ratio_vs_gloo=1.5), "names no baseline"),
        (lambda d: d["configs"][1].update(ratio_vs_raw_tcp=-1), "positive"),
        (lambda d: d["configs"][1].update(notes="hi"), "notes"),
        (lambda d: d.update(primary_metric="latency"), "no samples"),
        (lambda d: d.update(wan="yes"), "wan"),
    ],
)
def test_validator_names_each_fault(mutate: Any, expect: str) -> None:
    harness.validate_result(_doc())
    with pytest.raises(SchemaError, match=expect) as info:
        harness.validate_result(_break(mutate))
    assert info.value.problems


def test_validator_rejects_non_objects_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(SchemaError):
        harness.validate_result([1, 2])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SchemaError, match="cannot read"):
        harness.load_results(bad)


def test_table_has_no_exponents_for_big_figures() -> None:
    r = SuiteResult("t", "mb_per_s")
    r.config("a").add("mb_per_s", 1280.4)
    text = harness.format_table(r)
    assert "1280 [1280-1280]" in text
    assert "e+" not in text


def test_timed_adds_a_sample() -> None:
    row = ConfigResult("x")
    with row.timed("seconds"):
        pass
    assert len(row.samples["seconds"]) == 1
    assert row.samples["seconds"][0] >= 0


def test_wan_layout_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "_wan_used", None)
    monkeypatch.delenv(harness.WAN_ENV, raising=False)
    assert harness.wan_layout() is None
    assert SuiteResult("s", "m").to_json()["wan"] is None
    layout = {"spec": "delay=5ms", "peers": [{"index": 0, "addr": "10.77.0.1", "exec": ["ip"]}]}
    monkeypatch.setenv(harness.WAN_ENV, json.dumps(layout))
    assert SuiteResult("s", "m").to_json()["wan"] is None  # not used yet: the suite ran on loopback
    assert harness.wan_layout() == layout
    assert SuiteResult("s", "m").to_json()["wan"] == layout
    monkeypatch.setenv(harness.WAN_ENV, "[]")
    with pytest.raises(SchemaError):
        harness.wan_layout()


def test_machine_facts_do_not_import_heavy_modules() -> None:
    facts = harness.machine_facts()
    for key in ("python", "cpus", "loadavg", "torch_version", "libp2p_version"):
        assert key in facts
    json.dumps(facts, allow_nan=False)
