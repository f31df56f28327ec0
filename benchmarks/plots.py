"""PNG plots of benchmark results (matplotlib, Agg backend, written atomically).

Owns the figures the runner puts next to each suite's JSON:

* ``<suite>.png``: one panel per figure (metric): the median of each configuration as a bar,
  the min-max range of its samples as a whisker, baselines hatched;
* ``<suite>_ratios.png``: every ``ratio_vs_<baseline>``, with the parity line at 1 (above 1 is
  better than the baseline, whatever the metric's direction);
* ``<suite>_sweep.png``: when configurations vary a numeric parameter (``nodes``, ``peers``,
  ``size``, ``world``) over three or more values, the primary metric against it on log axes,
  one line per series (the other parameters), with any fitted curve the suite recorded.

Reads only validated documents (see :func:`p2pcompute.benchresults.validate_result`); imports the
standard library, matplotlib (optional: :func:`available` says whether it is installed) and
:mod:`p2pcompute._fsutil`.
"""

from __future__ import annotations

import importlib.util
import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from p2pcompute._fsutil import atomic_write

SWEEP_PARAMS = ("nodes", "peers", "world", "size")
_MAX_PANELS = 6


def available() -> bool:
    """True when matplotlib can be imported (plots are skipped, with a note, otherwise)."""
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, buf.getvalue())
    return path


def _subtitle(doc: Mapping[str, Any]) -> str:
    m = doc.get("machine") or {}
    load = m.get("loadavg")
    load_s = f", load {load[0]:.2f}" if isinstance(load, list) and load else ""
    wan = doc.get("wan")
    wan_s = ""
    if isinstance(wan, Mapping):
        missing = [str(m).split(" ")[0] for m in wan.get("not_applied") or []]
        wan_s = f", WAN {wan.get('spec')}" + (f" (not applied: {', '.join(missing)})" if missing else "")
    return f"{m.get('cpus', '?')} CPUs{load_s}{wan_s}, {str(doc.get('started', ''))[:19]}"


def plot_suite(doc: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Write the PNGs for one suite's results document into ``out_dir``; returns their paths.

    Example::

        paths = plot_suite(load_results("bench-results/x/stream.json"), "bench-results/x")
    """
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suite = str(doc["suite"])
    configs = [c for c in doc["configs"] if c.get("stats")]
    if not configs:
        return []
    written = [_bars(plt, doc, configs, out / f"{suite}.png")]
    if any(k.startswith("ratio_vs_") for c in configs for k in c):
        written.append(_ratios(plt, doc, configs, out / f"{suite}_ratios.png"))
    sweep = _sweep_param(configs)
    if sweep is not None:
        written.append(_sweep(plt, doc, configs, sweep, out / f"{suite}_sweep.png"))
    return written


def _bars(plt: Any, doc: Mapping[str, Any], configs: list[Mapping[str, Any]], path: Path) -> Path:
    primary = str(doc["primary_metric"])
    metrics = sorted({m for c in configs for m in c["stats"]}, key=lambda m: (m != primary, m))[:_MAX_PANELS]
    cols = min(2, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    height = max(2.5, 0.35 * len(configs) + 1.2)
    fig, axes = plt.subplots(
        rows, cols, figsize=(6.5 * cols, height * rows + 0.6), squeeze=False, layout="constrained"
    )
    names = [str(c["name"]) for c in configs]
    for ax, metric in zip(axes.flat, metrics, strict=False):
        med, lo, hi, colors, hatches = [], [], [], [], []
        for c in configs:
            st = c["stats"].get(metric)
            if st:
                med.append(st["median"])
                lo.append(st["median"] - st["min"])
                hi.append(st["max"] - st["median"])
            else:
                med.append(0.0)
                lo.append(0.0)
                hi.append(0.0)
            colors.append("#9e9e9e" if c.get("baseline") else "#1f77b4")
            hatches.append("//" if c.get("baseline") else "")
        y = list(range(len(configs)))
        bars = ax.barh(y, med, xerr=[lo, hi], color=colors, capsize=3, error_kw={"elinewidth": 1})
        for bar, hatch in zip(bars, hatches, strict=True):
            bar.set_hatch(hatch)
        ax.set_yticks(y, names, fontsize=8)
        positive = [v for v in med if v > 0]
        if positive and max(positive) / min(positive) > 50:
            ax.set_xscale("log")
        ax.invert_yaxis()
        better = "higher" if doc["higher_is_better"] else "lower"
        note = f" (primary, {better} is better)" if metric == primary else ""
        ax.set_title(f"{metric}{note}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_visible(False)
    head = f"{doc['suite']}: median, whiskers min-max, hatched = baseline"
    fig.suptitle(f"{head}\n{_subtitle(doc)}", fontsize=10)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _ratios(plt: Any, doc: Mapping[str, Any], configs: list[Mapping[str, Any]], path: Path) -> Path:
    labels = sorted({k[len("ratio_vs_") :] for c in configs for k in c if k.startswith("ratio_vs_")})
    rows = [c for c in configs if any(f"ratio_vs_{lab}" in c for lab in labels)]
    fig, ax = plt.subplots(
        figsize=(7.5, max(2.5, 0.4 * len(rows) * max(1, len(labels)) + 1.2)), layout="constrained"
    )
    width = 0.8 / len(labels)
    for j, lab in enumerate(labels):
        ys = [i + j * width for i in range(len(rows))]
        vals = [float(c.get(f"ratio_vs_{lab}", 0.0)) for c in rows]
        ax.barh(ys, vals, height=width, label=f"vs {lab}")
        for yv, v in zip(ys, vals, strict=True):
            if v:
                ax.text(v, yv, f" {v:.2f}x", va="center", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--")
    ax.set_yticks([i + 0.4 - width / 2 for i in range(len(rows))], [str(c["name"]) for c in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.legend(fontsize=8)
    ax.set_title(
        f"{doc['suite']}: ratio of {doc['primary_metric']} to same-run baselines (>1 = better)\n"
        f"{_subtitle(doc)}",
        fontsize=9,
    )
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _sweep_param(configs: list[Mapping[str, Any]]) -> str | None:
    for key in SWEEP_PARAMS:
        vals = {c["params"].get(key) for c in configs}
        nums = {v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0}
        if len(nums) >= 3 and len(nums) == len(vals):
            return key
    return None


def _sweep(plt: Any, doc: Mapping[str, Any], configs: list[Mapping[str, Any]], key: str, path: Path) -> Path:
    metric = str(doc["primary_metric"])
    series: dict[str, list[tuple[float, Mapping[str, Any]]]] = {}
    for c in configs:
        st = c["stats"].get(metric)
        if not st:
            continue
        params = sorted(c["params"].items())
        others = [(k, v) for k, v in params if k != key and not isinstance(v, (dict, list))]
        label = ", ".join(f"{k}={v}" for k, v in others) or "all"
        series.setdefault(label, []).append((float(c["params"][key]), st))
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for label, pts in sorted(series.items()):
        pts.sort(key=lambda p: p[0])
        xs = [p[0] for p in pts]
        med = [p[1]["median"] for p in pts]
        err = [[p[1]["median"] - p[1]["min"] for p in pts], [p[1]["max"] - p[1]["median"] for p in pts]]
        ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=label[:60])
    fit = (doc.get("options") or {}).get("fit")
    if isinstance(fit, Mapping) and {"a", "b"} <= set(fit) and fit.get("metric") == metric:
        xs = sorted({float(c["params"][key]) for c in configs})
        grid = [xs[0] * (xs[-1] / xs[0]) ** (i / 50) for i in range(51)]
        a, b = float(fit["a"]), float(fit["b"])
        ax.plot(grid, [a * x**b for x in grid], "k--", linewidth=1, label=f"fit {a:.3g} * {key}^{b:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"{doc['suite']}: {metric} against {key}\n{_subtitle(doc)}", fontsize=9)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
