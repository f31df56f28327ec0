"""The averaging seam between training and the network, and a group of one.

Training never talks to the network directly: :class:`~p2pcompute.training.diloco.DiLoCo`
calls an :class:`Averager`, which replaces a list of tensors *in place* by the weighted
average over whoever took part in the round, and says who that was. The real one wraps
the fault-tolerant all-reduce of :mod:`p2pcompute.collective`; :class:`SoloAverager` is a group
of one. An in-process group of simulated peers (real arithmetic, no network) for tests and the
training benchmark is :class:`p2pcompute.testing.LocalGroup`.

``aggregator`` names how each reducer combines the contributions (``"mean"``, the weighted
mean; ``"centered_clip"`` or ``"trimmed_mean"``, robust to a minority of Byzantine peers; or an
:class:`~p2pcompute.collective.aggregate.Aggregator`); the network and the in-memory group share
one implementation, :func:`p2pcompute.collective.aggregate.aggregate`.

``compression`` names a wire codec ("none", "fp16", "bf16", "int8"). The codecs are those of
:mod:`p2pcompute.tensors.codecs` (re-exported here as ``roundtrip``, ``wire_bytes`` and
``check_codec``), so a simulated group rounds exactly as the lane does, int8 blocks included.

Imports torch, trio, :mod:`p2pcompute.errors`, :mod:`p2pcompute.tensors.codecs` and
:mod:`p2pcompute.collective.aggregate` (sans-IO).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import trio

from p2pcompute.collective.aggregate import Aggregator
from p2pcompute.tensors import codecs

CODECS = codecs.CODECS
check_codec = codecs.check_codec
wire_bytes = codecs.wire_bytes


@dataclass(frozen=True)
class AveragingOutcome:
    """What one averaging round did, as seen by one peer.

    ``participants`` are the peer ids whose contributions are in the average (this peer
    included); ``bytes_sent``/``bytes_received`` count payload bytes this peer moved;
    ``clipped``: the senders a robust aggregator clipped in this round (as far as this peer
    saw: on the network, in the part it reduced).
    """

    participants: tuple[str, ...]
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    total_weight: float = 0.0
    excluded: tuple[str, ...] = ()
    clipped: tuple[str, ...] = ()


@runtime_checkable
class Averager(Protocol):
    """Replaces tensors in place by their weighted average across the current group.

    ``round_id`` lets peers that are at the same point of training find each other
    (DiLoCo uses its outer step). An implementation must leave the tensors untouched
    and raise when the round fails, and must give every participant bit-identical results.
    The library's averagers also take ``weight_cap`` (each member's weight capped at that multiple
    of the group's median; DiLoCo passes it only when set).

    Example::

        outcome = await averager.average([delta], weight=256.0, round_id=12, compression="fp16")
        print(outcome.participants)
    """

    @property
    def peer_id(self) -> str: ...

    async def average(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        weight: float,
        round_id: int,
        compression: str = "none",
        timeout: float | None = None,
        aggregator: str | Aggregator = "mean",
    ) -> AveragingOutcome: ...


def roundtrip(tensor: torch.Tensor, compression: str) -> torch.Tensor:
    """``tensor`` as it comes out of the lane under ``compression`` (:func:`.codecs.roundtrip`).

    Kept for callers of this module; the codec is defined once, in :mod:`p2pcompute.tensors.codecs`.

    Example::

        >>> roundtrip(torch.tensor([1.0, 1e-4]), "fp16").dtype
        torch.float32
    """
    return codecs.roundtrip(compression, tensor)


def allreduce_bytes(tensors: Sequence[torch.Tensor], compression: str, group_size: int) -> int:
    """Bytes one peer sends in a butterfly (reduce-scatter + all-gather) all-reduce of ``tensors``.

    Each peer sends ``(n-1)/n`` of its payload to reducers and ``(n-1)/n`` of the reduced
    result back out: ``2 (n-1)/n`` times the payload; nothing for a group of one.

    Example::

        >>> allreduce_bytes([torch.zeros(1000)], "none", 2)
        4000
    """
    if group_size <= 1:
        return 0
    payload = sum(wire_bytes(t, compression) for t in tensors)
    return int(2 * payload * (group_size - 1) / group_size)


class SoloAverager:
    """A group of one: averaging is the identity; nothing goes on the wire.

    Example::

        avg = SoloAverager("me")
        outcome = await avg.average([t], weight=1.0, round_id=0)   # t unchanged
    """

    def __init__(self, peer_id: str = "solo") -> None:
        self._peer_id = peer_id

    @property
    def peer_id(self) -> str:
        return self._peer_id

    async def average(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        weight: float,
        round_id: int,
        compression: str = "none",
        timeout: float | None = None,
        aggregator: str | Aggregator = "mean",
    ) -> AveragingOutcome:
        check_codec(compression)
        Aggregator.of(aggregator)  # any aggregator of one contribution is that contribution
        await trio.lowlevel.checkpoint()
        if compression != "none":
            for t in tensors:
                t.copy_(roundtrip(t, compression))
        return AveragingOutcome((self._peer_id,), total_weight=weight)
