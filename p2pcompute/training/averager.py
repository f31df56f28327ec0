"""The averaging seam between training and the network, and an in-process group for tests.

Training never talks to the network directly: :class:`~p2pcompute.training.diloco.DiLoCo`
calls an :class:`Averager`, which replaces a list of tensors *in place* by the weighted
average over whoever took part in the round, and says who that was. The real one wraps
the fault-tolerant all-reduce of :mod:`p2pcompute.collective`; :class:`LocalGroup` is an
in-process group of simulated peers (real arithmetic, no network) used by tests and the
benchmark to check the optimizer's math; :class:`SoloAverager` is a group of one.

``compression`` names a wire codec ("none", "fp16", "bf16", "int8"). The codecs are those of
:mod:`p2pcompute.tensors.codecs` (re-exported here as ``roundtrip``, ``wire_bytes`` and
``check_codec``), so a simulated group rounds exactly as the lane does, int8 blocks included.

Imports torch, trio, :mod:`p2pcompute.errors` and :mod:`p2pcompute.tensors.codecs`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import trio

from p2pcompute.errors import LocalProtocolError
from p2pcompute.tensors import codecs

CODECS = codecs.CODECS
check_codec = codecs.check_codec
wire_bytes = codecs.wire_bytes


@dataclass(frozen=True)
class AveragingOutcome:
    """What one averaging round did, as seen by one peer.

    ``participants`` are the peer ids whose contributions are in the average (this peer
    included); ``bytes_sent``/``bytes_received`` count payload bytes this peer moved.
    """

    participants: tuple[str, ...]
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    total_weight: float = 0.0
    excluded: tuple[str, ...] = ()


@runtime_checkable
class Averager(Protocol):
    """Replaces tensors in place by their weighted average across the current group.

    ``round_id`` lets peers that are at the same point of training find each other
    (DiLoCo uses its outer step). An implementation must leave the tensors untouched
    and raise when the round fails, and must give every participant bit-identical results.

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
    ) -> AveragingOutcome:
        check_codec(compression)
        await trio.lowlevel.checkpoint()
        if compression != "none":
            for t in tensors:
                t.copy_(roundtrip(t, compression))
        return AveragingOutcome((self._peer_id,), total_weight=weight)


@dataclass
class _Round:
    expected: set[str]
    contributions: dict[str, tuple[float, list[torch.Tensor], Sequence[torch.Tensor]]] = field(
        default_factory=dict
    )
    done: trio.Event = field(default_factory=trio.Event)
    outcome_participants: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    compression: str = "none"


class LocalGroup:
    """Simulated peers in one trio run that average for real (no network).

    A round (one ``round_id``) completes when every current member has contributed, or
    when a member leaves, or when the round's ``timeout`` runs out (the late members are
    excluded, as the fault-tolerant all-reduce does). Every contributor then holds the same
    weighted mean, rounded through the codec as it would be on the wire. Bytes are those of
    a butterfly all-reduce over the participants.

    Example::

        group = LocalGroup()
        a, b = group.join("a"), group.join("b")
        async with trio.open_nursery() as n:
            n.start_soon(a.average, [ta], weight=1.0, round_id=0)   # keyword args via partial
            ...
    """

    def __init__(self) -> None:
        self.members: set[str] = set()
        self._rounds: dict[int, _Round] = {}
        self.history: list[tuple[int, tuple[str, ...]]] = []

    def join(self, peer_id: str) -> LocalAverager:
        """Add a member; it takes part from the next round it contributes to."""
        self.members.add(peer_id)
        return LocalAverager(self, peer_id)

    def leave(self, peer_id: str) -> None:
        """Remove a member (as if it crashed); open rounds stop waiting for it."""
        self.members.discard(peer_id)
        for rid, rnd in list(self._rounds.items()):
            rnd.expected.discard(peer_id)
            self._maybe_finish(rid, rnd)

    def _maybe_finish(self, rid: int, rnd: _Round, *, force: bool = False) -> None:
        if rnd.done.is_set():
            return
        if not force and not rnd.expected <= set(rnd.contributions):
            return
        present = sorted(p for p in rnd.contributions if p in self.members)
        rnd.excluded = tuple(sorted(rnd.expected - set(present)))
        rnd.outcome_participants = tuple(present)
        if present:
            total = sum(rnd.contributions[p][0] for p in present)
            n_tensors = len(rnd.contributions[present[0]][1])
            for i in range(n_tensors):
                acc = torch.zeros_like(rnd.contributions[present[0]][1][i], dtype=torch.float64)
                for p in present:
                    w, sent, _ = rnd.contributions[p]
                    acc += sent[i].to(torch.float64) * (w / total)
                # Every participant receives the same bytes: reduce once, round once, copy out.
                result = roundtrip(acc.to(rnd.contributions[present[0]][1][i].dtype), rnd.compression)
                for p in present:
                    rnd.contributions[p][2][i].copy_(result)
        self.history.append((rid, rnd.outcome_participants))
        del self._rounds[rid]
        rnd.done.set()

    async def _average(
        self,
        peer_id: str,
        tensors: Sequence[torch.Tensor],
        weight: float,
        round_id: int,
        compression: str,
        timeout: float | None,
    ) -> AveragingOutcome:
        check_codec(compression)
        if peer_id not in self.members:
            raise LocalProtocolError(f"{peer_id} is not a member of this group")
        if not weight > 0:
            raise LocalProtocolError("weight must be positive")
        start = time.perf_counter()
        rnd = self._rounds.get(round_id)
        if rnd is None:
            rnd = _Round(expected=set(self.members), compression=compression)
            self._rounds[round_id] = rnd
        rnd.expected.add(peer_id)
        sent = [roundtrip(t, compression) for t in tensors]
        rnd.contributions[peer_id] = (weight, sent, tensors)
        self._maybe_finish(round_id, rnd)
        if not rnd.done.is_set():
            if timeout is None:
                await rnd.done.wait()
            else:
                with trio.move_on_after(timeout):
                    await rnd.done.wait()
                if not rnd.done.is_set():
                    self._maybe_finish(round_id, rnd, force=True)
        else:
            await trio.lowlevel.checkpoint()
        parts = rnd.outcome_participants
        nbytes = allreduce_bytes(tensors, compression, len(parts))
        total = sum(rnd.contributions[p][0] for p in parts)
        return AveragingOutcome(
            parts,
            bytes_sent=nbytes,
            bytes_received=nbytes,
            seconds=time.perf_counter() - start,
            total_weight=total,
            excluded=rnd.excluded,
        )


class LocalAverager:
    """One member's handle on a :class:`LocalGroup` (an :class:`Averager`)."""

    def __init__(self, group: LocalGroup, peer_id: str) -> None:
        self._group = group
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
    ) -> AveragingOutcome:
        return await self._group._average(self._peer_id, tensors, weight, round_id, compression, timeout)
