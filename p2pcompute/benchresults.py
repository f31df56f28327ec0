"""Benchmark results: samples, summaries, same-run baseline ratios, tables, JSON.

Every suite builds a :class:`SuiteResult` of :class:`ConfigResult` rows, marks its
baselines (raw TCP, plain py-libp2p, gloo ... measured in the same invocation),
calls :meth:`SuiteResult.add_ratios`, then :func:`print_table` and :func:`write_results`.
The JSON schema (``p2pcompute-bench/1``) is documented in docs/benchmarks.md and checked
by :func:`validate_result`; :func:`ratio_of` is what a script uses to check a target.

It lives in the package (not in the checkout's ``benchmarks/``) because ``p2pcompute bench link``
measures a live peer and must work from a pip install; the suites in ``benchmarks/`` import it.
Imports only the standard library, :mod:`p2pcompute.errors` and :mod:`p2pcompute._fsutil`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pcompute._fsutil import atomic_write
from p2pcompute.errors import ConfigError

SCHEMA = "p2pcompute-bench/1"
#: Environment variable through which the runner hands a WAN layout (JSON) to a suite process.
WAN_ENV = "P2PC_BENCH_WAN"
_STAT_KEYS = ("median", "min", "max", "mean", "stdev", "n")


class SchemaError(ConfigError):
    """A results document that does not follow ``p2pcompute-bench/1``; ``problems`` lists every fault."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def default_out_dir(base: str | os.PathLike[str] = "bench-results") -> Path:
    """A fresh, absolute folder named by the UTC time, e.g. ``<cwd>/bench-results/20261129T001500Z``.

    Resolved against the current folder when called, so results land where the user stands, whatever
    folder later runs the suites.

    Example::

        out = default_out_dir()          # not created yet
    """
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    root = Path(base).resolve()
    path = root / stamp
    n = 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{n}"
    return path


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max, mean, stdev and count of a list of samples.

    Example::

        >>> summarize([1.0, 3.0, 2.0])["median"]
        2.0
    """
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0}
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "mean": statistics.fmean(vals),
        "stdev": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


@dataclass
class ConfigResult:
    """One configuration of a suite: its parameters and every sample of every figure."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    baseline: str | None = None  # e.g. "raw_tcp" when this row *is* that baseline
    ratios: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, metric: str, value: float) -> None:
        """Record one sample; NaN and infinities are refused (they are bugs, and not valid JSON).

        Example::

            row.add("gbytes_per_s", 2.7)
        """
        v = float(value)
        if not math.isfinite(v):
            raise ConfigError(f"{self.name}: sample of {metric!r} is not finite: {value!r}")
        self.samples.setdefault(metric, []).append(v)

    def median(self, metric: str) -> float:
        return float(statistics.median(self.samples[metric]))

    @contextlib.contextmanager
    def timed(self, metric: str = "seconds") -> Iterator[None]:
        """Add the wall time of the ``with`` body, in seconds, as one sample of ``metric``.

        Example::

            with row.timed("seconds"):
                await lane.send(peer, "t", tensors)
        """
        start = time.perf_counter()
        yield
        self.add(metric, time.perf_counter() - start)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "params": self.params,
            "baseline": self.baseline,
            "samples": self.samples,
            "stats": {m: summarize(v) for m, v in self.samples.items()},
        }
        for label, value in self.ratios.items():
            out[f"ratio_vs_{label}"] = value
        if self.notes:
            out["notes"] = self.notes
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ConfigResult:
        """Rebuild a row from its JSON form (stats are recomputed from the samples)."""
        ratios = {k[len("ratio_vs_") :]: float(v) for k, v in doc.items() if k.startswith("ratio_vs_")}
        return cls(
            name=str(doc["name"]),
            params=dict(doc.get("params") or {}),
            samples={str(m): [float(x) for x in v] for m, v in (doc.get("samples") or {}).items()},
            baseline=doc.get("baseline"),
            ratios=ratios,
            notes=[str(n) for n in doc.get("notes") or []],
        )


@dataclass
class SuiteResult:
    """A suite's whole result: options, machine facts and one :class:`ConfigResult` per configuration."""

    suite: str
    primary_metric: str
    higher_is_better: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    configs: list[ConfigResult] = field(default_factory=list)
    started: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat())
    wan: dict[str, Any] | None = None  # the WAN layout the suite really ran under, if any

    def config(self, name: str, **params: Any) -> ConfigResult:
        row = ConfigResult(name, params)
        self.configs.append(row)
        return row

    def add_ratios(self, match: Callable[[ConfigResult, ConfigResult], bool] | None = None) -> None:
        """Give every row a ``ratio_vs_<baseline>`` for each baseline row it matches.

        The ratio is ``median(row) / median(baseline)`` of the primary metric, inverted
        when lower is better, so that a ratio above 1 always means "better than the baseline".
        ``match(row, baseline_row)`` picks comparable rows (default: same ``size`` param).
        """
        metric = self.primary_metric

        def same_size(a: ConfigResult, b: ConfigResult) -> bool:
            return a.params.get("size") == b.params.get("size")

        pick = match or same_size
        bases = [c for c in self.configs if c.baseline and c.samples.get(metric)]
        for row in self.configs:
            if not row.samples.get(metric):
                continue
            for base in bases:
                if base is row or not pick(row, base):
                    continue
                b, r = base.median(metric), row.median(metric)
                if b <= 0 or r <= 0:
                    continue
                row.ratios[str(base.baseline)] = (r / b) if self.higher_is_better else (b / r)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "suite": self.suite,
            "started": self.started,
            "finished": _dt.datetime.now(_dt.UTC).isoformat(),
            "primary_metric": self.primary_metric,
            "higher_is_better": self.higher_is_better,
            "machine": machine_facts(),
            "options": self.options,
            "wan": self.wan if self.wan is not None else _wan_used,
            "configs": [c.to_json() for c in self.configs],
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SuiteResult:
        """Rebuild a result from a document :func:`validate_result` accepts (for tables and plots)."""
        return cls(
            suite=str(doc["suite"]),
            primary_metric=str(doc["primary_metric"]),
            higher_is_better=bool(doc["higher_is_better"]),
            options=dict(doc.get("options") or {}),
            configs=[ConfigResult.from_json(c) for c in doc["configs"]],
            started=str(doc["started"]),
            wan=doc.get("wan"),
        )


def machine_facts() -> dict[str, Any]:
    """What the figures depend on: CPU model and count, memory, load, Python and library versions.

    Versions come from package metadata, so nothing heavy (torch, libp2p) is imported for them.
    """
    facts: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_total_mib": _mem_total_mib(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    for mod in ("torch", "trio", "libp2p", "msgpack", "cryptography", "numpy"):
        try:
            facts[f"{mod}_version"] = importlib.metadata.version(mod)
        except Exception:  # a missing or odd package must not break a benchmark
            facts[f"{mod}_version"] = None
    return facts


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _mem_total_mib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return None


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux ``ru_maxrss`` is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_results(result: SuiteResult, out: str | os.PathLike[str]) -> Path:
    """Write the suite's JSON atomically to ``out`` (a file, or a folder to put ``<suite>.json`` in).

    Example::

        path = write_results(result, args.out or "bench-results")
    """
    path = Path(out)
    if path.is_dir() or not path.suffix:
        path.mkdir(parents=True, exist_ok=True)
        path = path / f"{result.suite}.json"
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result.to_json(), indent=2, sort_keys=False, allow_nan=False, default=_json_default)
    atomic_write(path, text.encode())
    return path


def _json_default(obj: object) -> object:
    # Params sometimes carry tuples, paths or enums; write them as plain values, never fail late.
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    return str(obj)


def format_table(result: SuiteResult, metrics: Iterable[str] | None = None) -> str:
    """A plain-text table: one row per configuration, medians [min-max], then ratios."""
    rows = result.configs
    mets = list(metrics) if metrics is not None else sorted({m for c in rows for m in c.samples})
    labels = sorted({k for c in rows for k in c.ratios})
    header = ["config", *mets, *(f"vs {lab}" for lab in labels)]
    body: list[list[str]] = []
    for c in rows:
        cells = [c.name]
        for m in mets:
            if c.samples.get(m):
                s = summarize(c.samples[m])
                cells.append(f"{_fmt(s['median'])} [{_fmt(s['min'])}-{_fmt(s['max'])}]")
            else:
                cells.append("-")
        cells += [_ratio(c.ratios[lab]) if lab in c.ratios else "-" for lab in labels]
        body.append(cells)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def _fmt(x: float) -> str:
    # Three significant digits, but never an exponent for the figures benchmarks print (1280, not 1.28e+03).
    return f"{x:.0f}" if 1e3 <= abs(x) < 1e9 else f"{x:.3g}"


def _ratio(r: float) -> str:
    return f"{r:.2f}x" if r >= 0.095 else f"{r:.2g}x"  # 0.0096x, not 0.00x


def print_table(result: SuiteResult, metrics: Iterable[str] | None = None) -> None:
    print(f"\n== {result.suite} (primary: {result.primary_metric}) ==", flush=True)
    print(format_table(result, metrics), flush=True)


# ---------------------------------------------------------------------------------------------
# WAN layout hand-over (the runner sets it up, a suite that spawns peer processes uses it)

_wan_used: dict[str, Any] | None = None


def wan_layout() -> dict[str, Any] | None:
    """The WAN layout the runner set up for this suite process, or ``None`` (plain loopback).

    Calling it marks the result as run under that layout (``"wan"`` in the JSON), so only
    call it from a suite that really places its peers with it: peer ``i`` runs its command
    as ``layout["peers"][i]["exec"] + argv`` and listens on ``layout["peers"][i]["addr"]``.

    Example::

        layout = wan_layout()
        argv = [sys.executable, "-m", "benchmarks.stream", "--serve"]
        cmd = layout["peers"][0]["exec"] + argv if layout else argv
    """
    global _wan_used
    raw = os.environ.get(WAN_ENV)
    if not raw:
        return None
    layout = json.loads(raw)
    if not isinstance(layout, dict) or not isinstance(layout.get("peers"), list):
        raise SchemaError([f"{WAN_ENV} does not hold a WAN layout"])
    _wan_used = layout
    return layout


# ---------------------------------------------------------------------------------------------
# Schema validation and target checks


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def validate_result(doc: object) -> None:
    """Check a results document against ``p2pcompute-bench/1``; raise :class:`SchemaError` listing faults.

    Beyond the shape it checks consistency: every ``stats`` entry matches its samples,
    config names are unique, and every ``ratio_vs_<label>`` names a baseline row of the suite.

    Example::

        validate_result(json.loads(Path("bench-results/stream.json").read_text()))
    """
    p: list[str] = []
    if not isinstance(doc, Mapping):
        raise SchemaError(["document is not a JSON object"])
    if doc.get("schema") != SCHEMA:
        p.append(f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("suite", "started", "finished", "primary_metric"):
        if not isinstance(doc.get(key), str) or not doc.get(key):
            p.append(f"{key} must be a non-empty string")
    for key in ("started", "finished"):
        if isinstance(doc.get(key), str):
            try:
                _dt.datetime.fromisoformat(doc[key])
            except ValueError:
                p.append(f"{key} is not an ISO 8601 time: {doc[key]!r}")
    if not isinstance(doc.get("higher_is_better"), bool):
        p.append("higher_is_better must be a boolean")
    for key in ("machine", "options"):
        if not isinstance(doc.get(key), Mapping):
            p.append(f"{key} must be an object")
    if isinstance(doc.get("machine"), Mapping):
        for key in ("python", "cpus", "loadavg"):
            if key not in doc["machine"]:
                p.append(f"machine.{key} is missing")
    if doc.get("wan") is not None and not isinstance(doc.get("wan"), Mapping):
        p.append("wan must be an object or null")
    configs = doc.get("configs")
    if not isinstance(configs, list):
        p.append("configs must be a list")
        raise SchemaError(p)
    names: set[str] = set()
    baselines: set[str] = set()
    metrics_seen: set[str] = set()
    for i, c in enumerate(configs):
        where = f"configs[{i}]"
        if not isinstance(c, Mapping):
            p.append(f"{where} is not an object")
            continue
        name = c.get("name")
        if not isinstance(name, str) or not name:
            p.append(f"{where}.name must be a non-empty string")
        elif name in names:
            p.append(f"{where}.name {name!r} is not unique")
        else:
            names.add(name)
            where = f"config {name!r}"
        if not isinstance(c.get("params"), Mapping):
            p.append(f"{where}.params must be an object")
        base = c.get("baseline")
        if base is not None and not (isinstance(base, str) and base):
            p.append(f"{where}.baseline must be null or a non-empty string")
        elif isinstance(base, str):
            baselines.add(base)
        samples, stats = c.get("samples"), c.get("stats")
        if not isinstance(samples, Mapping) or not isinstance(stats, Mapping):
            p.append(f"{where}.samples and .stats must be objects")
            continue
        if set(samples) != set(stats):
            p.append(f"{where}: stats cover {sorted(stats)} but samples cover {sorted(samples)}")
        for metric, vals in samples.items():
            metrics_seen.add(metric)
            if not isinstance(vals, list) or not vals or not all(_is_num(v) for v in vals):
                p.append(f"{where}.samples[{metric!r}] must be a non-empty list of finite numbers")
                continue
            st = stats.get(metric)
            if not isinstance(st, Mapping) or any(not _is_num(st.get(k)) for k in _STAT_KEYS):
                p.append(f"{where}.stats[{metric!r}] needs numeric {', '.join(_STAT_KEYS)}")
                continue
            want = summarize(vals)
            bad = [k for k in _STAT_KEYS if not _close(float(st[k]), float(want[k]))]
            if bad:
                p.append(f"{where}.stats[{metric!r}] disagree with the samples on {bad}")
        for key, value in c.items():
            if key.startswith("ratio_vs_"):
                if not key[len("ratio_vs_") :]:
                    p.append(f"{where}: empty ratio label")
                if not _is_num(value) or value <= 0:
                    p.append(f"{where}.{key} must be a positive finite number")
        notes = c.get("notes", [])
        if not (isinstance(notes, list) and all(isinstance(n, str) for n in notes)):
            p.append(f"{where}.notes must be a list of strings")
    for i, c in enumerate(configs):
        if isinstance(c, Mapping):
            for key in c:
                label = key[len("ratio_vs_") :]
                if key.startswith("ratio_vs_") and label and label not in baselines:
                    p.append(f"configs[{i}].{key} names no baseline row of this suite")
    if configs and isinstance(doc.get("primary_metric"), str) and doc["primary_metric"] not in metrics_seen:
        p.append(f"primary metric {doc['primary_metric']!r} has no samples in any config")
    if p:
        raise SchemaError(p)


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate one suite's JSON; raise :class:`SchemaError` if it does not follow the schema.

    Example::

        doc = load_results("bench-results/2026-11-29T00-10-00Z/stream.json")
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SchemaError([f"{path}: cannot read JSON: {exc}"]) from exc
    validate_result(doc)
    return dict(doc)


def ratio_of(doc: Mapping[str, Any], config: str, baseline: str) -> float:
    """The ``ratio_vs_<baseline>`` of config ``config`` (above 1 means better than the baseline).

    Raises :class:`~p2pcompute.errors.ConfigError` when the suite has no such config or ratio.
    A target check is one line::

        assert ratio_of(load_results("stream.json"), "lane_256MiB", "raw_tcp") >= 0.5
    """
    for c in doc["configs"]:
        if c["name"] == config:
            key = f"ratio_vs_{baseline}"
            if key not in c:
                raise ConfigError(f"config {config!r} has no {key}")
            return float(c[key])
    raise ConfigError(f"no config {config!r} in suite {doc.get('suite')!r}")
