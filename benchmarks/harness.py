"""Shared benchmark plumbing: samples, summaries, same-run baseline ratios, tables, JSON.

Every suite builds a :class:`SuiteResult` of :class:`ConfigResult` rows, marks its
baselines (raw TCP, plain py-libp2p, gloo ... measured in the same invocation),
calls :meth:`SuiteResult.add_ratios`, then :func:`print_table` and :func:`write_results`.
The JSON schema (``p2pcompute-bench/1``) is documented in docs/benchmarks.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pcompute._fsutil import atomic_write

SCHEMA = "p2pcompute-bench/1"


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max, mean, stdev and count of a list of samples."""
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
        self.samples.setdefault(metric, []).append(float(value))

    def median(self, metric: str) -> float:
        return float(statistics.median(self.samples[metric]))

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


@dataclass
class SuiteResult:
    suite: str
    primary_metric: str
    higher_is_better: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    configs: list[ConfigResult] = field(default_factory=list)
    started: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat())

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
            "configs": [c.to_json() for c in self.configs],
        }


def machine_facts() -> dict[str, Any]:
    """What the figures depend on: CPU count, load, Python and library versions."""
    facts: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    for mod in ("torch", "trio", "libp2p", "msgpack", "cryptography"):
        try:
            facts[f"{mod}_version"] = __import__(mod).__version__
        except Exception:  # a missing or odd module must not break a benchmark
            facts[f"{mod}_version"] = None
    return facts


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux ``ru_maxrss`` is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_results(result: SuiteResult, out: str | os.PathLike[str]) -> Path:
    """Write the suite's JSON atomically to ``out`` (a file, or a folder to put ``<suite>.json`` in)."""
    path = Path(out)
    if path.is_dir() or not path.suffix:
        path.mkdir(parents=True, exist_ok=True)
        path = path / f"{result.suite}.json"
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(result.to_json(), indent=2, sort_keys=False).encode())
    return path


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
                cells.append(f"{s['median']:.3g} [{s['min']:.3g}-{s['max']:.3g}]")
            else:
                cells.append("-")
        cells += [f"{c.ratios[lab]:.2f}x" if lab in c.ratios else "-" for lab in labels]
        body.append(cells)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def print_table(result: SuiteResult, metrics: Iterable[str] | None = None) -> None:
    print(f"\n== {result.suite} (primary: {result.primary_metric}) ==", flush=True)
    print(format_table(result, metrics), flush=True)
