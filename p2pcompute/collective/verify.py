"""Sans-IO check of a reducer's averaged part against a sample of the contributions it used.

With a robust aggregator a reducer holds every contribution of its part (one row each). With
its averaged part it sends an *echo*: the rows at ``k`` sampled positions (``[n, k]``, exact:
float32 bits that no codec rounds, :func:`echo_tensor`). The
positions are drawn from a hash of the averaged part itself, as every member lands it, so a
reducer cannot know where it will be checked before it has committed to what it sends; to lie
on a share ``q`` of its part and pass, it must find a part whose hash samples none of the
lies, about ``(1 - q) ** -k`` tries (``k`` = 64: 800 for q = 10 %, 27,000 for q = 15 %).

Every member that lands the part then checks (:func:`check_part`):

* its own row in the echo is what it sent (a reducer that swaps inputs is caught by the
  member whose input it swapped);
* the part at the sampled positions is what the aggregator gives on the echoed rows, exactly
  (within the codec's rounding): the weighted mean (``"mean"`` with ``Aggregator.echo``) and
  ``trimmed_mean`` are coordinate-wise; ``centered_clip``'s clipping depends on distances over
  the whole part, so the reducer also sends its *trace* (:func:`trace_tensor`): ``tau`` and
  each row's distance to the centre at every iteration. From the echoed rows and the trace a
  member recomputes the median start and every iterate at the sampled positions, so a part
  that is not CenteredClip of the rows under the declared distances is refuted, whether or
  not it lies within the rows' range;
* the trace is consistent: ``tau`` is ``tau_scale`` times the median declared distance (when
  ``Aggregator.tau`` is not set), and no declared distance is below the distance over the
  sampled positions alone (a lower bound, exact: a sum over a subset).

A failure is provably the reducer's (its own echo contradicts its part, or our own input) and
is blamed on it. What is left: a reducer may *over*-state distances (clip some rows harder than
CenteredClip would); a sample cannot bound a norm from above without false alarms on
heavy-tailed rows. The codec's rounding is allowed for per position (:func:`codec_error`).
Imports torch, :mod:`p2pcompute.collective.aggregate`, :mod:`p2pcompute.wire.shards` and the
standard library.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence

import torch

from p2pcompute.collective.aggregate import Aggregated, Aggregator, aggregate, capped_weights
from p2pcompute.wire.shards import INT8_BLOCK

SAMPLES = 64  # positions checked per part
# relative error of the reducer's float32 arithmetic (and of echoing float64 rows as float32)
_ARITH = 1e-5
_HALF = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # relative rounding, with a margin


def part_digest(part: torch.Tensor) -> bytes:
    """BLAKE2b of the part's values as float32 (what every member holds bit-identically).

    Example::

        >>> len(part_digest(torch.zeros(3)))
        32
    """
    data = part.detach().to("cpu", torch.float32).contiguous().numpy()  # no copy when it is so already
    return hashlib.blake2b(data.data.cast("B"), digest_size=32, person=b"p2pc-verify").digest()


def sample_positions(digest: bytes, size: int, k: int = SAMPLES) -> torch.Tensor:
    """``min(k, size)`` distinct positions in ``[0, size)``, sorted, drawn from ``digest``.

    Example::

        >>> sample_positions(b"x" * 32, 5, 3).tolist()    # doctest: +SKIP
        [0, 2, 4]
    """
    rng = random.Random(int.from_bytes(digest[:16], "big"))
    return torch.tensor(sorted(rng.sample(range(size), min(k, size))), dtype=torch.int64)


def trace_tensor(done: Aggregated, n: int, iterations: int) -> torch.Tensor:
    """CenteredClip's trace as the reducer sends it: ``[tau, norms[0][0..n), norms[1]...]`` as
    float64 bits in an int64 tensor (the lane's codecs round floating tensors only; the trace
    must arrive exact).

    Example::

        >>> t = trace_tensor(Aggregated(2.0, (1.0, 1.0), ((1.0, 3.0),)), 2, 1)
        >>> t.view(torch.float64).tolist()
        [2.0, 1.0, 3.0]
    """
    values = [done.tau]
    for t in range(iterations):
        values.extend(done.norms[t] if t < len(done.norms) else (0.0,) * n)
    return torch.tensor(values, dtype=torch.float64).view(torch.int64)


def read_trace(trace: torch.Tensor, n: int, iterations: int) -> tuple[float, list[list[float]]] | str:
    """``(tau, norms)`` from a received trace, or why it is malformed.

    Example::

        >>> read_trace(torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64).view(torch.int64), 2, 1)
        (2.0, [[1.0, 3.0]])
    """
    if trace.dtype != torch.int64 or trace.dim() != 1 or trace.numel() != 1 + n * iterations:
        return f"a trace of {trace.numel()} {trace.dtype} values, expected {1 + n * iterations} int64"
    values = trace.contiguous().view(torch.float64).tolist()
    if not all(math.isfinite(x) and x >= 0 for x in values):
        return "a trace with negative or non-finite values"
    return values[0], [values[1 + t * n : 1 + (t + 1) * n] for t in range(iterations)]


def _replay_centered_clip(
    agg: Aggregator, rows: torch.Tensor, weights: Sequence[float], trace: torch.Tensor
) -> torch.Tensor | str:
    """CenteredClip at the sampled positions under the declared trace, or why the trace fails."""
    n, k = rows.shape
    read = read_trace(trace, n, agg.iterations)
    if isinstance(read, str):
        return read
    tau, norms = read
    if agg.tau is None:
        want = agg.tau_scale * sorted(norms[0])[(n - 1) // 2]
        if not math.isclose(tau, want, rel_tol=1e-12, abs_tol=1e-300):
            return f"the declared tau {tau:.6g} is not tau_scale times the median distance {want:.6g}"
    elif tau != agg.tau:
        return f"the declared tau {tau:.6g} is not the configured {agg.tau:.6g}"
    ws = capped_weights(weights, agg.weight_cap)
    total = math.fsum(ws)
    alphas = [w / total for w in ws]
    v = rows.median(dim=0).values if k else rows.new_zeros(0)  # the lower median, as the reducer's
    if not tau > 0:
        return v
    for t in range(agg.iterations):
        step = torch.zeros_like(v)
        for i in range(n):
            d = rows[i] - v
            seen = float(torch.linalg.vector_norm(d))
            declared = norms[t][i]
            if declared < seen * (1 - 1e-4) - 1e-30:  # float32 sums over the whole part
                return (
                    f"row {i}'s declared distance {declared:.6g} at iteration {t} is below its "
                    f"distance over the sampled positions alone ({seen:.6g})"
                )
            if alphas[i] == 0:
                continue
            factor = min(1.0, tau / declared) if declared > 0 else 1.0
            step += alphas[i] * factor * d
        v = v + step
    return v


def echo_tensor(rows: torch.Tensor) -> torch.Tensor:
    """The echo as the reducer sends it: float32 values as int32 bits (the lane's codecs round
    floating tensors only; the echo must arrive exact, or its rounding could hide a lie or fake one).

    Example::

        >>> read_echo(echo_tensor(torch.tensor([[1.5, -2.0]])), 1, 2).tolist()
        [[1.5, -2.0]]
    """
    return rows.to(torch.float32).contiguous().view(torch.int32)


def read_echo(echo: torch.Tensor, n: int, k: int) -> torch.Tensor | str:
    """The echoed rows (``[n, k]`` float32) from what arrived, or why it is malformed.

    Example::

        >>> read_echo(torch.zeros(2, 3), 2, 3)
        'an echo of torch.float32 [2, 3], expected int32 [2, 3]'
    """
    if echo.dtype != torch.int32 or tuple(echo.shape) != (n, k):
        return f"an echo of {echo.dtype} {list(echo.shape)}, expected int32 [{n}, {k}]"
    return echo.contiguous().view(torch.float32)


def codec_error(codec: str, views: Sequence[torch.Tensor], pos: torch.Tensor) -> torch.Tensor:
    """Per sampled position of the vector that ``views`` make up, the most ``codec`` changed (or
    will change) the value there (float64 ``[k]``), from the values on either side of the codec.

    Bounds of p2pcompute.tensors.codecs, with a margin for holding the decoded side: fp16 and
    bf16 are relative to the value; int8 to the largest magnitude of its block (blocks start at
    each view, as each shard is encoded on its own). A spike elsewhere in a block widens the
    bound there (before this, the bound came from the sample alone and an honest int8 part
    whose block maximum lay outside the sample was refuted).

    Example::

        >>> codec_error("none", [torch.ones(4)], torch.tensor([0, 3])).tolist()
        [0.0, 0.0]
    """
    out = torch.zeros(pos.numel(), dtype=torch.float64)
    if codec == "none" and not any(v.dtype in _HALF for v in views):
        return out
    flats = [v.detach().reshape(-1) for v in views]
    starts = [0]
    for f in flats:
        starts.append(starts[-1] + f.numel())
    view = 0
    for j, p in enumerate(pos.tolist()):  # positions are sorted
        while p >= starts[view + 1]:
            view += 1
        flat, off = flats[view], p - starts[view]
        if codec == "none":
            pass
        elif codec == "fp16":
            out[j] = abs(float(flat[off])) * 2.0**-10 + 2.0**-24
        elif codec == "bf16":
            out[j] = abs(float(flat[off])) * 2.0**-7 + 2.0**-133
        else:  # int8 (and anything unknown: the widest bound)
            lo = off - off % INT8_BLOCK
            top = float(flat[lo : lo + INT8_BLOCK].abs().max())
            out[j] = top / 126 * 0.5 * (1 + 2.0**-19) + 2.0**-148
        if flat.dtype in _HALF:  # the part landed in half-precision tensors: rounded once more
            out[j] += abs(float(flat[off])) * _HALF[flat.dtype]
    return out


def check_part(
    agg: Aggregator,
    part_sample: torch.Tensor,
    echo: torch.Tensor,
    weights: Sequence[float],
    *,
    part_error: torch.Tensor | None = None,
    mine: tuple[int, torch.Tensor, torch.Tensor] | None = None,
    trace: torch.Tensor | None = None,
) -> str | None:
    """Why the reducer's part fails the check, or ``None`` when it passes.

    ``part_sample``: the averaged part at the sampled positions (``[k]``); ``echo``: the
    reducer's rows there, exact (``[n, k]``, one per contributor, in plan order: see
    :func:`read_echo`); ``weights``: the contributors' weights; ``part_error``: the most the
    codec changed the part at each position (:func:`codec_error`; ``None``: no codec);
    ``mine``: our index among the contributors, our own values at the positions, and the most
    the codec changed them on their way to the reducer; ``trace``: CenteredClip's declared
    trace (:func:`trace_tensor`; without one only the range of the rows is checked).

    Example::

        >>> rows = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> check_part(Aggregator("trimmed_mean", trim=0.34), torch.tensor([3.0, 4.0]), rows, [1, 1, 1])
        >>> check_part(Aggregator("mean", echo=True), torch.tensor([3.0, 4.5]), rows, [1, 1, 1])
        'the part is not the mean of the contributions at 1 of 2 sampled positions'
    """
    n, k = len(weights), part_sample.numel()
    if echo.dim() != 2 or tuple(echo.shape) != (n, k):
        return f"echo of shape {tuple(echo.shape)}, expected {(n, k)}"
    rows = echo.to(torch.float64)
    got = part_sample.to(torch.float64)
    if not (bool(torch.isfinite(rows).all()) and bool(torch.isfinite(got).all())):
        return "non-finite values in the averaged part or its echo"
    # float32 arithmetic at the reducer, relative to the values at each position
    column = torch.maximum(rows.abs().amax(dim=0), got.abs()) if n else got.abs()
    arith = _ARITH * column + 1e-30
    tol = arith + (part_error.to(torch.float64) if part_error is not None else 0.0)
    if mine is not None:
        index, values, error = mine
        off = (rows[index] - values.to(torch.float64)).abs()
        bad = int((off > arith + error.to(torch.float64)).sum())
        if bad:
            return f"our own contribution is misreported at {bad} of {k} sampled positions"
    if agg.kind in ("mean", "trimmed_mean"):
        want = torch.empty(k, dtype=torch.float64)
        aggregate(rows, list(weights), want, agg)
        bad = int(((got - want).abs() > tol).sum())
        if bad:
            what = agg.kind.replace("_", " ")
            return f"the part is not the {what} of the contributions at {bad} of {k} sampled positions"
    elif agg.kind == "centered_clip":
        lo, hi = rows.min(dim=0).values, rows.max(dim=0).values
        bad = int(((got < lo - tol) | (got > hi + tol)).sum())
        if bad:
            return f"the part leaves the range of the contributions at {bad} of {k} sampled positions"
        if trace is not None:
            replay = _replay_centered_clip(agg, rows, weights, trace)
            if isinstance(replay, str):
                return replay
            bad = int(((got - replay).abs() > tol).sum())
            if bad:
                return (
                    f"the part is not CenteredClip of the contributions under its declared trace "
                    f"at {bad} of {k} sampled positions"
                )
    return None


__all__ = [
    "SAMPLES",
    "check_part",
    "codec_error",
    "echo_tensor",
    "part_digest",
    "read_echo",
    "read_trace",
    "sample_positions",
    "trace_tensor",
]
