"""Sans-IO aggregators: one reducer's part of every contribution in, one tensor out.

A reducer owns a part of the flat vector and receives every contributor's slice of it. The
default aggregator, ``"mean"``, is the weighted mean; the round driver streams it chunk by
chunk into an accumulator and never calls this module (that path stays as it was). The robust
aggregators need every contribution for the part at once (one row each of a ``[n, m]`` stack;
parts are 1/n of the tensors, so the stack is about one copy of the tensors):

* ``"centered_clip"``: CenteredClip (Karimireddy et al. 2021; BTARD, Gorbunov et al. ICML'22).
  Start from the coordinate-wise median ``v0``; ``tau = tau_scale * median_i ||x_i - v0||``
  (the l2 norms over the whole part), unless ``tau`` is given; then ``iterations`` times
  ``v <- v + sum_i a_i * clip(x_i - v, tau)`` with ``a_i = w_i / sum w``,
  ``clip(d, tau) = d * min(1, tau / ||d||)``.
* ``"trimmed_mean"``: coordinate-wise, drop the ``b = floor(trim * n)`` largest and smallest
  values and average the rest (unweighted). Measured against CenteredClip in
  docs/design/averaging.md.

Weights are claims made by the peers themselves: the robust aggregators cap every weight at
``weight_cap`` times the median weight, so that one peer cannot buy the whole average.

What can be proved (and ``tests/test_collective_aggregate.py`` checks with hypothesis):

* each CenteredClip iteration moves ``v`` by at most ``tau`` (the clipped terms have norm
  ``<= tau`` and ``sum a_i = 1``); the result lies in the coordinate-wise range of the rows
  (every iterate is a convex combination of the previous one and the rows);
* from the same start and ``tau``, replacing the rows of a set ``B`` (of weight share ``a_B``)
  by anything moves the result by at most ``2 * iterations * a_B * tau`` (``v -> v + sum_H a_i
  clip(x_i - v)`` is non-expansive, projections onto a ball being non-expansive);
* with ``tau`` larger than every distance, one iteration returns the weighted mean;
* the result does not depend on the order of the rows (up to float rounding) and equals the
  common row when all rows are equal.

Imports torch and :mod:`p2pcompute.errors` only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from p2pcompute.errors import ConfigError

AGGREGATORS = ("mean", "centered_clip", "trimmed_mean")
_COLUMNS = 1 << 16  # columns per block of the median and the sort: bounds their scratch
_NETWORK_ROWS = 32  # up to this many rows the median is a min/max network (O(n^2) passes)


@dataclass(frozen=True)
class Aggregator:
    """How a reducer combines the contributions of its part.

    ``kind``: ``"mean"`` (default), ``"centered_clip"`` or ``"trimmed_mean"``. CenteredClip:
    ``tau`` (``None``: ``tau_scale`` times the median distance to the coordinate-wise median),
    ``iterations``. Trimmed mean: ``trim`` (the share cut from each side). ``weight_cap``: robust
    kinds cap each weight at this multiple of the median weight. A contribution counts as clipped
    against its sender when its final clip factor is below ``count_below`` (it lay more than
    ``tau / count_below`` from the centre: with ``tau`` the median distance, honest rows rarely
    do); ``blame_after``: a sender counted so in this many consecutive rounds is blamed
    (``None``: never). ``echo``: the reducer keeps every contribution of its part and sends a
    sample of them with the part, so members check it (p2pcompute.collective.verify); ``None``
    means on for the robust kinds (which keep the rows anyway) and off for the mean (about one
    more copy of the tensors on each reducer).

    Example::

        >>> Aggregator.of("centered_clip").iterations
        3
        >>> Aggregator.of(Aggregator("trimmed_mean", trim=0.25)).trim
        0.25
    """

    kind: str = "mean"
    tau: float | None = None
    tau_scale: float = 1.0
    iterations: int = 3
    trim: float = 0.4
    weight_cap: float = 4.0
    count_below: float = 0.5
    blame_after: int | None = 3
    echo: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in AGGREGATORS:
            raise ConfigError(f"unknown aggregator {self.kind!r}; use one of {', '.join(AGGREGATORS)}")
        if self.tau is not None and not (math.isfinite(self.tau) and self.tau > 0):
            raise ConfigError("tau must be finite and > 0")
        if not (math.isfinite(self.tau_scale) and self.tau_scale > 0):
            raise ConfigError("tau_scale must be finite and > 0")
        if not 1 <= self.iterations <= 100:
            raise ConfigError("iterations must be within 1..100")
        if not 0 <= self.trim < 0.5:
            raise ConfigError("trim must be within [0, 0.5)")
        if not (math.isfinite(self.weight_cap) and self.weight_cap >= 1):
            raise ConfigError("weight_cap must be finite and >= 1")
        if not 0 < self.count_below <= 1:
            raise ConfigError("count_below must be within (0, 1]")
        if self.blame_after is not None and self.blame_after < 1:
            raise ConfigError("blame_after must be >= 1 or None")

    @classmethod
    def of(cls, spec: str | Aggregator) -> Aggregator:
        """An :class:`Aggregator` from a name or an instance (returned as is).

        Example::

            >>> Aggregator.of("mean").robust
            False
        """
        if isinstance(spec, Aggregator):
            return spec
        if not isinstance(spec, str):
            raise ConfigError(f"an aggregator is a name or an Aggregator, not {type(spec).__name__}")
        return cls(spec)

    @property
    def robust(self) -> bool:
        """Whether the reducer needs every contribution of its part at once (not ``"mean"``)."""
        return self.kind != "mean"

    @property
    def keeps_rows(self) -> bool:
        """Whether the reducer keeps a row per contribution and echoes a sample (robust, or ``echo``).

        Example::

            >>> Aggregator("mean").keeps_rows, Aggregator("mean", echo=True).keeps_rows
            (False, True)
        """
        return self.robust if self.echo is None else (self.robust or self.echo)


@dataclass(frozen=True)
class Aggregated:
    """What one aggregation did: each row's clip factor at the last iteration.

    ``factors[i]`` is ``min(1, tau / ||x_i - v||)`` at the last iteration (1.0 for every row of
    a mean or a trimmed mean); ``clipped`` lists the rows whose factor is below 1,
    :meth:`counted` those below a threshold (``Aggregator.count_below``). ``norms[t][i]``
    (CenteredClip) is ``||x_i - v||`` at iteration ``t``, over the whole part: with ``tau`` it
    determines the result at any position from the rows there (what a reducer declares so that
    members can recompute its part, p2pcompute.collective.verify).

    Example::

        >>> Aggregated(tau=1.0, factors=(1.0, 0.9, 0.01)).counted(0.5)
        (2,)
    """

    tau: float
    factors: tuple[float, ...]
    norms: tuple[tuple[float, ...], ...] = ()

    @property
    def clipped(self) -> tuple[int, ...]:
        return self.counted(1.0)

    def counted(self, below: float) -> tuple[int, ...]:
        """The rows whose clip factor is below ``below`` (``1.0``: every clipped row).

        Example::

            >>> Aggregated(tau=1.0, factors=(1.0, 0.9)).counted(1.0)
            (1,)
        """
        return tuple(i for i, f in enumerate(self.factors) if f < below)


def capped_weights(weights: Sequence[float], cap: float) -> list[float]:
    """``weights`` with each capped at ``cap`` times their median (a claim cannot buy the average).

    Example::

        >>> capped_weights([1.0, 1.0, 1000.0], 4.0)
        [1.0, 1.0, 4.0]
    """
    ws = [float(w) for w in weights]
    if not ws or any(not math.isfinite(w) or w < 0 for w in ws) or sum(ws) <= 0:
        raise ConfigError("weights must be finite, >= 0, and not all 0")
    positive = sorted(w for w in ws if w > 0)
    median = positive[(len(positive) - 1) // 2]
    return [min(w, cap * median) for w in ws]


def _sorted_blocks(rows: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """``(lo, block)``: each block of columns of ``rows`` sorted along the rows (ascending).

    Up to ``_NETWORK_ROWS`` rows an odd-even transposition network of element-wise
    ``minimum``/``maximum`` on cache-sized blocks: 8x to 17x faster here than ``median``/``sort``
    along dim 0 (4 and 8 rows, 16M elements). The block buffer is reused: use it before the next.
    """
    n, m = rows.shape
    if n > _NETWORK_ROWS:
        for lo in range(0, m, _COLUMNS):
            yield lo, rows[:, lo : min(m, lo + _COLUMNS)].sort(dim=0).values
        return
    buf = torch.empty((n, min(m, _COLUMNS)), dtype=rows.dtype, device=rows.device)
    tmp = torch.empty(min(m, _COLUMNS), dtype=rows.dtype, device=rows.device)
    for lo in range(0, m, _COLUMNS):
        hi = min(m, lo + _COLUMNS)
        block, t = buf[:, : hi - lo], tmp[: hi - lo]
        block.copy_(rows[:, lo:hi])
        for rnd in range(n):
            for i in range(rnd % 2, n - 1, 2):
                a, b = block[i], block[i + 1]
                torch.minimum(a, b, out=t)
                torch.maximum(a, b, out=b)
                a.copy_(t)
        yield lo, block


def _median_into(rows: torch.Tensor, out: torch.Tensor) -> None:
    """Coordinate-wise lower median of ``rows`` into ``out`` (as ``rows.median(dim=0)``)."""
    k = (rows.shape[0] - 1) // 2
    for lo, block in _sorted_blocks(rows):
        out[lo : lo + block.shape[1]].copy_(block[k])


def _centered_clip(
    rows: torch.Tensor, alphas: list[float], out: torch.Tensor, spec: Aggregator, center: torch.Tensor | None
) -> Aggregated:
    n = rows.shape[0]
    v = out
    if center is None:
        _median_into(rows, v)
    else:
        v.copy_(center)
    d = torch.empty_like(v)
    step = torch.empty_like(v)
    tau = spec.tau
    norms: list[tuple[float, ...]] = []
    if tau is None:
        dists = []
        for i in range(n):
            torch.sub(rows[i], v, out=d)
            dists.append(float(torch.linalg.vector_norm(d)))
        tau = spec.tau_scale * sorted(dists)[(n - 1) // 2]
        if not tau > 0:  # at least half the rows sit on the centre: it is the answer
            zeros = (0.0,) * n
            return Aggregated(0.0, (1.0,) * n, (tuple(dists),) + (zeros,) * (spec.iterations - 1))
    factors = [1.0] * n
    for _ in range(spec.iterations):
        step.zero_()
        these = [0.0] * n
        for i in range(n):
            torch.sub(rows[i], v, out=d)
            norm = these[i] = float(torch.linalg.vector_norm(d))
            if alphas[i] == 0:
                continue
            factors[i] = min(1.0, tau / norm) if norm > 0 else 1.0
            step.add_(d, alpha=alphas[i] * factors[i])
        norms.append(tuple(these))
        v.add_(step)
    return Aggregated(tau, tuple(factors), tuple(norms))


def _trimmed_mean(rows: torch.Tensor, out: torch.Tensor, spec: Aggregator) -> Aggregated:
    n = rows.shape[0]
    b = math.floor(spec.trim * n)
    for lo, block in _sorted_blocks(rows):
        torch.mean(block[b : n - b], dim=0, out=out[lo : lo + block.shape[1]])
    return Aggregated(0.0, (1.0,) * n)


def aggregate(
    rows: torch.Tensor,
    weights: Sequence[float],
    out: torch.Tensor,
    spec: str | Aggregator = "mean",
    *,
    center: torch.Tensor | None = None,
) -> Aggregated:
    """Combine ``rows`` (``[n, m]``: one contribution per row) with ``weights`` into ``out`` (``[m]``).

    ``center`` replaces CenteredClip's starting point (the coordinate-wise median); tests use it.
    ``out`` must not overlap ``rows``. Computes in ``rows``' dtype (float32/float64; half types
    should be widened by the caller).

    Example::

        >>> rows = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1000.0, -1000.0]])
        >>> out = torch.empty(2)
        >>> res = aggregate(rows, [1.0, 1.0, 1.0], out, "centered_clip")
        >>> res.clipped
        (2,)
    """
    agg = Aggregator.of(spec)
    if rows.dim() != 2 or out.dim() != 1 or rows.shape[1] != out.shape[0]:
        raise ConfigError(f"rows must be [n, m] and out [m]; got {tuple(rows.shape)} and {tuple(out.shape)}")
    n = rows.shape[0]
    if n != len(weights) or n == 0:
        raise ConfigError("one weight per row, and at least one row")
    ws = capped_weights(weights, agg.weight_cap) if agg.robust else [float(w) for w in weights]
    total = math.fsum(ws)
    if not total > 0:
        raise ConfigError("at least one weight must be positive")
    alphas = [w / total for w in ws]
    if agg.kind == "mean":
        out.zero_()
        for i in range(n):
            out.add_(rows[i], alpha=alphas[i])
        return Aggregated(0.0, (1.0,) * n)
    if agg.kind == "trimmed_mean":
        return _trimmed_mean(rows, out, agg)
    return _centered_clip(rows, alphas, out, agg, center)


class ClipLedger:
    """Per-sender clip counts across rounds, and who has passed the blame threshold.

    A sender is blamed when its contribution was clipped in ``blame_after`` consecutive rounds
    that we reduced (an unclipped round resets its streak; an attempt retried within the same
    round counts once). ``total`` keeps every sender's count of clipped rounds.

    Example::

        >>> ledger = ClipLedger()
        >>> [ledger.record(f"r{k}", seen={"a", "b"}, clipped={"b"}, blame_after=3) for k in range(3)]
        [set(), set(), {'b'}]
        >>> ledger.total["b"]
        3
    """

    _MAX_PEERS = 4096

    def __init__(self) -> None:
        self.streak: dict[str, int] = {}
        self.total: dict[str, int] = {}
        self._last: dict[str, str] = {}  # sender -> the round its streak was last moved in

    def record(
        self, round_id: str, *, seen: set[str], clipped: set[str], blame_after: int | None
    ) -> set[str]:
        """Note one aggregation of round ``round_id``; the senders to blame now.

        ``seen``: the senders whose contributions were aggregated; ``clipped``: those counted
        against them.

        Example::

            >>> ClipLedger().record("r1", seen={"a"}, clipped={"a"}, blame_after=1)
            {'a'}
        """
        blame: set[str] = set()
        for peer in seen:
            if self._last.get(peer) == round_id:
                counted = True
            else:
                counted = False
                self._last[peer] = round_id
            if peer in clipped:
                if not counted:
                    self.streak[peer] = self.streak.get(peer, 0) + 1
                    self.total[peer] = self.total.get(peer, 0) + 1
            elif not counted:
                self.streak.pop(peer, None)
            if blame_after is not None and self.streak.get(peer, 0) >= blame_after:
                blame.add(peer)
        if len(self._last) > self._MAX_PEERS:  # forget the oldest senders
            for peer in list(self._last)[: len(self._last) - self._MAX_PEERS]:
                self._last.pop(peer, None)
                self.streak.pop(peer, None)
                self.total.pop(peer, None)
        return blame


__all__ = ["AGGREGATORS", "Aggregated", "Aggregator", "ClipLedger", "aggregate", "capped_weights"]
