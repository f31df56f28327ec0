"""Sans-IO arithmetic of an averaging round: who reduces which slice, and where tensors lie.

A round averages one *flat* vector of ``total`` elements: the concatenation of the
caller's tensors in order (see :class:`Layout`). The vector is cut into one contiguous
*part* per member, sized by the member's advertised bandwidth (largest remainder, so the
sizes sum exactly to ``total``); a member with bandwidth 0 reduces nothing (an
"auxiliary" peer that only contributes and receives). Member ``j`` reduces part ``j``:
every contributor (weight > 0) sends it its slice of part ``j``, ``j`` forms the
weighted average and sends it back to everyone.

Everything here is pure and deterministic: every member computes the same plan from
the same group description. Imports nothing of ours but :mod:`p2pcompute.errors`.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from p2pcompute.errors import ConfigError


def split_parts(total: int, bandwidths: Sequence[float]) -> tuple[tuple[int, int], ...]:
    """Cut ``range(total)`` into contiguous ``(start, end)`` parts proportional to ``bandwidths``.

    Largest-remainder rounding: sizes are within one element of the exact share, they sum to
    ``total``, and a bandwidth of 0 gives an empty part. Ties go to the earlier member.

    Example::

        >>> split_parts(10, [1.0, 1.0, 2.0])
        ((0, 3), (3, 5), (5, 10))
    """
    if total < 0:
        raise ConfigError(f"total must be >= 0, got {total}")
    bws = [float(b) for b in bandwidths]
    if not bws:
        raise ConfigError("at least one member is needed")
    if any(not math.isfinite(b) or b < 0 for b in bws):
        raise ConfigError(f"bandwidths must be finite and >= 0, got {bws}")
    whole = sum(bws)
    if whole <= 0:
        raise ConfigError("at least one member must have a positive bandwidth")
    shares = [total * b / whole for b in bws]
    sizes = [math.floor(s) for s in shares]
    left = total - sum(sizes)
    # hand the remaining elements to the largest fractional parts (never to bandwidth 0)
    order = sorted(
        (i for i in range(len(bws)) if bws[i] > 0), key=lambda i: (-(shares[i] - sizes[i]), i)
    )
    for i in order[:left]:
        sizes[i] += 1
    assert sum(sizes) == total, (sizes, total)
    parts: list[tuple[int, int]] = []
    start = 0
    for size in sizes:
        parts.append((start, start + size))
        start += size
    return tuple(parts)


@dataclass(frozen=True)
class Layout:
    """Where each tensor of the caller lies in the flat vector (by element count).

    Example::

        >>> lay = Layout((3, 5))
        >>> lay.total, lay.segments(2, 6)
        (8, [(0, 2, 3), (1, 0, 3)])
    """

    sizes: tuple[int, ...]
    offsets: tuple[int, ...] = field(init=False)
    total: int = field(init=False)

    def __post_init__(self) -> None:
        if any(s < 0 for s in self.sizes):
            raise ConfigError("tensor sizes must be >= 0")
        offs: list[int] = []
        acc = 0
        for s in self.sizes:
            offs.append(acc)
            acc += s
        object.__setattr__(self, "offsets", tuple(offs))
        object.__setattr__(self, "total", acc)

    def segments(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """The pieces of flat range ``[start, end)`` as ``(tensor index, lo, hi)`` within each tensor.

        Empty tensors are skipped; the pieces cover the range exactly, in order.
        """
        if not 0 <= start <= end <= self.total:
            raise ValueError(f"range [{start}, {end}) outside [0, {self.total})")
        out: list[tuple[int, int, int]] = []
        for i, (off, size) in enumerate(zip(self.offsets, self.sizes, strict=True)):
            lo, hi = max(start, off), min(end, off + size)
            if lo < hi:
                out.append((i, lo - off, hi - off))
        return out


def layout_digest(shapes: Sequence[Sequence[int]], dtypes: Sequence[str]) -> bytes:
    """A 32-byte digest of tensor shapes and dtypes: peers only average identical layouts.

    Example::

        >>> len(layout_digest([(2, 3)], ["float32"]))
        32
    """
    h = hashlib.sha256(b"p2pcompute-layout-v1\x00")
    for shape, dtype in zip(shapes, dtypes, strict=True):
        h.update(("x".join(str(int(d)) for d in shape) + ":" + dtype + ";").encode())
    return h.digest()


@dataclass(frozen=True)
class AttemptPlan:
    """One attempt of a round: its members in order, their weights, and the part each reduces.

    ``members`` order is the group order (the same on every member). ``contributors`` are
    members with weight > 0; ``reducers`` are members with a non-empty part.

    Example::

        plan = AttemptPlan.build(("a", "b"), weights=(1.0, 3.0), bandwidths=(1.0, 1.0), total=10)
        plan.part_of("b")   # (5, 10)
    """

    members: tuple[str, ...]
    weights: tuple[float, ...]
    parts: tuple[tuple[int, int], ...]
    total: int

    @classmethod
    def build(
        cls,
        members: Sequence[str],
        *,
        weights: Sequence[float],
        bandwidths: Sequence[float],
        total: int,
    ) -> AttemptPlan:
        if len(set(members)) != len(members):
            raise ConfigError("members must be distinct")
        if not (len(members) == len(weights) == len(bandwidths)):
            raise ConfigError("members, weights and bandwidths must have the same length")
        ws = tuple(float(w) for w in weights)
        if any(not math.isfinite(w) or w < 0 for w in ws):
            raise ConfigError(f"weights must be finite and >= 0, got {ws}")
        if sum(ws) <= 0:
            raise ConfigError("at least one member must have a positive weight")
        return cls(tuple(members), ws, split_parts(total, bandwidths), total)

    def index(self, peer: str) -> int:
        return self.members.index(peer)

    def part_of(self, peer: str) -> tuple[int, int]:
        return self.parts[self.members.index(peer)]

    def weight_of(self, peer: str) -> float:
        return self.weights[self.members.index(peer)]

    @property
    def weight_total(self) -> float:
        return math.fsum(self.weights)

    @property
    def contributors(self) -> tuple[str, ...]:
        return tuple(m for m, w in zip(self.members, self.weights, strict=True) if w > 0)

    @property
    def reducers(self) -> tuple[str, ...]:
        return tuple(m for m, (s, e) in zip(self.members, self.parts, strict=True) if e > s)

    @functools.cached_property
    def _digest(self) -> str:
        h = hashlib.sha256(b"p2pcompute-attempt-v1\x00")
        for m, w, (s, e) in zip(self.members, self.weights, self.parts, strict=True):
            h.update(f"{m}|{w!r}|{s}|{e};".encode())
        h.update(str(self.total).encode())
        return h.hexdigest()[:24]

    def digest(self) -> str:
        """A short hex digest of the whole plan; every message of an attempt carries it."""
        return self._digest
