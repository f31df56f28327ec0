"""Sans-IO check of a reducer's averaged part against a sample of the contributions it used.

With a robust aggregator a reducer holds every contribution of its part (one row each). With
its averaged part it sends an *echo*: the rows at ``k`` sampled positions (``[n, k]``). The
positions are drawn from a hash of the averaged part itself, as every member lands it, so a
reducer cannot know where it will be checked before it has committed to what it sends; to lie
on a share ``q`` of its part and pass, it must find a part whose hash samples none of the
lies, about ``(1 - q) ** -k`` tries (``k`` = 64: 800 for q = 10 %, 27,000 for q = 15 %).

Every member that lands the part then checks (:func:`check_part`):

* its own row in the echo is what it sent (a reducer that swaps inputs is caught by the
  member whose input it swapped);
* the part at the sampled positions is what the aggregator gives on the echoed rows: exactly
  (within the codec's rounding) for ``trimmed_mean``, which is coordinate-wise; for
  ``centered_clip``, whose clipping depends on distances over the whole part, that the part
  lies within the coordinate-wise range of the echoed rows (every CenteredClip iterate does).

A failure is provably the reducer's (its own echo contradicts its part, or our own input) and
is blamed on it. Imports torch, :mod:`p2pcompute.collective.aggregate` and the standard library.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import torch

from p2pcompute.collective.aggregate import Aggregator, aggregate

SAMPLES = 64  # positions checked per part
# relative error a codec may add to one value (with the echo's own rounding on top)
_RTOL = {"none": 1e-5, "fp16": 2.0**-9, "bf16": 2.0**-6, "int8": 2.0 / 127}


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


def check_part(
    agg: Aggregator,
    part_sample: torch.Tensor,
    echo: torch.Tensor,
    weights: Sequence[float],
    *,
    codec: str = "none",
    mine: tuple[int, torch.Tensor] | None = None,
) -> str | None:
    """Why the reducer's part fails the check, or ``None`` when it passes.

    ``part_sample``: the averaged part at the sampled positions (``[k]``); ``echo``: the
    reducer's rows there (``[n, k]``, one per contributor, in plan order); ``weights``: the
    contributors' weights; ``mine``: our index among the contributors and our own values at
    the positions.

    Example::

        >>> rows = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> check_part(Aggregator("trimmed_mean", trim=0.34), torch.tensor([3.0, 4.0]), rows, [1, 1, 1])
        >>> check_part(Aggregator("centered_clip"), torch.tensor([9.0, 4.0]), rows, [1, 1, 1])
        'the part leaves the range of the contributions at 1 of 2 sampled positions'
    """
    n, k = len(weights), part_sample.numel()
    if echo.dim() != 2 or tuple(echo.shape) != (n, k):
        return f"echo of shape {tuple(echo.shape)}, expected {(n, k)}"
    rows = echo.to(torch.float64)
    got = part_sample.to(torch.float64)
    if not (bool(torch.isfinite(rows).all()) and bool(torch.isfinite(got).all())):
        return "non-finite values in the averaged part or its echo"
    rtol = _RTOL.get(codec, _RTOL["int8"])
    scale = max(float(rows.abs().max()) if rows.numel() else 0.0, float(got.abs().max()) if k else 0.0)
    tol = 2 * rtol * scale + 1e-12  # the part and the echo each went through the codec once
    if mine is not None:
        index, values = mine
        off = (rows[index] - values.to(torch.float64)).abs()
        if bool((off > tol).any()):
            return f"our own contribution is misreported at {int((off > tol).sum())} of {k} sampled positions"
    if agg.kind == "trimmed_mean":
        want = torch.empty(k, dtype=torch.float64)
        aggregate(rows, list(weights), want, agg)
        bad = int(((got - want).abs() > tol).sum())
        if bad:
            return f"the part is not the trimmed mean of the contributions at {bad} of {k} sampled positions"
    elif agg.kind == "centered_clip":
        lo, hi = rows.min(dim=0).values, rows.max(dim=0).values
        bad = int(((got < lo - tol) | (got > hi + tol)).sum())
        if bad:
            return f"the part leaves the range of the contributions at {bad} of {k} sampled positions"
    return None


__all__ = ["SAMPLES", "check_part", "part_digest", "sample_positions"]
