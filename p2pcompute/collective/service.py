"""The collective's facade: :class:`Collective` and :func:`open_collective`.

:func:`open_collective` runs one :class:`Collective` per node. It serves the collective stream
protocol (hellos, readies, statuses) and puts together the pieces that do the work, each with
narrow collaborators and none knowing the facade:

* :mod:`~p2pcompute.collective.matching`: matchmaking (drives the sans-IO
  :class:`~p2pcompute.collective.matchcore.MatchCore`);
* :mod:`~p2pcompute.collective.rounds`: the attempts of an all-reduce over the lane (drives
  :class:`~p2pcompute.collective.roundcore.RoundCore`);
* :mod:`~p2pcompute.collective.links`: requests and the kept control links to peers;
* :mod:`~p2pcompute.collective.faults`: the fault plan, a test seam (empty by default).

All protocol decisions live in the cores; these modules only move bytes and time.
Imports the collective's modules, :mod:`p2pcompute.overlay.streams`, :mod:`p2pcompute.errors`,
torch and trio.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Any

import torch
import trio

from p2pcompute.collective.aggregate import Aggregator
from p2pcompute.collective.faults import FaultPlan
from p2pcompute.collective.links import _LINK_IDLE as _LINK_IDLE  # re-exported: tests import it here
from p2pcompute.collective.links import CONTROL_KINDS, ControlLinks
from p2pcompute.collective.matchcore import Formed, NoGroup
from p2pcompute.collective.matching import Matchmaker, MatchSettings
from p2pcompute.collective.messages import HELLO, MAX_REQUEST, PRESENCE, PROTOCOL, READY
from p2pcompute.collective.plan import layout_digest
from p2pcompute.collective.roundcore import RoundOutcome, RoundStatus, Timeouts
from p2pcompute.collective.rounds import CODECS, Rounds, flat_dtype
from p2pcompute.deadlines import give_up_after
from p2pcompute.errors import ConfigError, RemoteProtocolError
from p2pcompute.overlay.streams import FramedStream

_flat_dtype = flat_dtype  # the old private name


def tensors_layout(tensors: Sequence[torch.Tensor]) -> bytes:
    """The layout digest peers must share to average ``tensors`` together.

    Example::

        digest = tensors_layout(list(model.parameters()))
    """
    return layout_digest([tuple(t.shape) for t in tensors], [str(t.dtype) for t in tensors])


class RoundLog:
    """The rounds of :meth:`Collective.average`: those in progress, the last ``keep`` ended ones and
    totals by outcome (``averaged``, ``failed``, ``no_group``; ``error`` when it raised or was
    cancelled). For metrics and the status page; bounded whatever the number of rounds.

    Example::

        log = coll.round_log
        log.totals["averaged"], log.seconds["averaged"], [r["round"] for r in log.recent]
    """

    def __init__(self, keep: int = 20, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._next = 0
        self.in_progress: dict[int, dict[str, Any]] = {}
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self.totals: collections.Counter[str] = collections.Counter()
        self.seconds: collections.Counter[str] = collections.Counter()
        self.participants: collections.Counter[str] = collections.Counter()

    def begin(self, run: str, round_key: str) -> int:
        """Note a round starting now; returns the token :meth:`end` takes."""
        self._next += 1
        self.in_progress[self._next] = {"run": run, "round": round_key, "started": self._clock()}
        return self._next

    def end(self, token: int, outcome: RoundOutcome | None) -> None:
        """Note how round ``token`` ended (``None``: it raised or was cancelled)."""
        entry = self.in_progress.pop(token, None)
        if entry is None:
            return
        now = self._clock()
        kind = "error" if outcome is None else outcome.status.name.lower()
        seconds = max(0.0, now - entry["started"])
        participants = len(outcome.participants) if outcome is not None else 0
        entry.update(
            outcome=kind,
            seconds=seconds,
            participants=participants,
            reason=outcome.reason if outcome is not None else "",
            ended=now,
        )
        self.recent.append(entry)
        self.totals[kind] += 1
        self.seconds[kind] += seconds
        self.participants[kind] += participants


class Collective:
    """Matchmaking and averaging for one node; create with :func:`open_collective`.

    Example::

        async with open_node(ident) as node, open_lane(node) as lane, \\
                open_collective(node, lane) as coll:
            result = await coll.average("my-run", f"step-{step}", list(model.parameters()),
                                        weight=samples_seen, target=4, min_size=2)
            if not result.ok:
                print("kept local parameters:", result.reason)
    """

    def __init__(
        self,
        node: Any,
        lane: Any,
        *,
        bandwidth: float = 1.0,
        timeouts: Timeouts | None = None,
        settle: float = 0.5,
        hello_timeout: float = 10.0,
        republish_interval: float = 2.0,
        pull_fanout: int = 1,
        silence: float = 3.0,
        leave_timeout: float = 2.0,
        faults: FaultPlan | None = None,
    ) -> None:
        if not (math.isfinite(bandwidth) and bandwidth >= 0):
            raise ConfigError("bandwidth must be finite and >= 0")
        self.node = node
        self.lane = lane
        self.peer_id: str = node.peer_id
        self.bandwidth = float(bandwidth)
        self.timeouts = timeouts or Timeouts()
        self.settle = settle
        self.hello_timeout = hello_timeout
        self.republish_interval = republish_interval
        self.pull_fanout = pull_fanout
        self.leave_timeout = leave_timeout
        self.faults = faults if faults is not None else FaultPlan()  # a test seam; empty: no faults
        self.stats: collections.Counter[str] = collections.Counter()
        self.round_log = RoundLog()
        self._background: trio.Nursery | None = None  # owned by open_collective: readies in flight

        def background() -> trio.Nursery | None:
            return self._background

        self.links = ControlLinks(
            node, timeout=hello_timeout, stats=self.stats, faults=self.faults, background=background
        )
        self.matchmaker = Matchmaker(
            node, self.links, self.stats, bandwidth=self.bandwidth, background=background,
            settings=MatchSettings(settle, hello_timeout, republish_interval, pull_fanout, silence),
        )
        self.rounds = Rounds(
            self.peer_id, lane, self.links.tell, faults=self.faults, stats=self.stats,
            timeouts=self.timeouts, leave_timeout=leave_timeout,
        )
        # inbound first frames, by message type
        self._inbound: dict[str, Callable[[FramedStream, str, dict[str, Any]], Awaitable[None]]] = {
            HELLO.type: self._on_hello,
            READY.type: self._on_ready,
            PRESENCE.type: self._on_presence,
            **{kind: self._on_control for kind in CONTROL_KINDS},
        }

    def release_buffers(self) -> None:
        """Free the scratch buffers kept between rounds (about the averaged tensors' size).

        Every round needs a pristine copy of its tensors and an accumulator for its part;
        they are kept for the next round because fresh pages cost more than the copy.

        Example::

            await coll.average("run", "step-9", params)
            coll.release_buffers()   # training is over; give the memory back
        """
        self.rounds.scratch.clear()

    def clip_counts(self) -> dict[str, int]:
        """Per sender, in how many rounds a robust aggregator here clipped its contribution.

        A sender clipped in ``Aggregator.blame_after`` consecutive rounds is blamed (and so
        excluded from the round); ``statistics()["clip_blamed"]`` counts those blames.

        Example::

            suspicious = {p: n for p, n in coll.clip_counts().items() if n >= 3}
        """
        return dict(self.rounds.ledger.total)

    def blocked_peers(self) -> list[str]:
        """Peers this node blamed itself (bad bytes, a refuted averaged part, contributions
        clipped ``blame_after`` rounds running), kept out of its rounds for an hour: when one
        is in a group with us we blame it at the start of the round, before its data counts.

        Example::

            assert bad_peer in coll.blocked_peers()
        """
        return self.rounds.blocked.peers(trio.current_time())

    def statistics(self) -> dict[str, int]:
        """Counters: rejected adverts and messages, rounds averaged and failed, peers blamed
        (``blamed``), sends refused by a full receiver (``busy_refusals``), contributions
        clipped by a robust aggregator (``clipped_contributions``) and blames for it
        (``clip_blamed``), averaged parts that failed their check (``parts_refuted``), peers
        blamed again at a round's start for an earlier blame of ours (``blocked_blamed``), ...

        Example::

            assert coll.statistics().get("blamed", 0) == 0
        """
        return dict(self.stats)

    # -- inbound
    async def _serve(self, stream: FramedStream) -> None:
        peer = stream.peer
        assert peer is not None
        if self.faults.muted:
            await trio.sleep_forever()
        raw = await stream.recv_msg(max_size=MAX_REQUEST)
        kind = raw.get("t") if isinstance(raw, dict) else None
        handler = self._inbound.get(kind) if isinstance(kind, str) else None
        if handler is None:
            self.stats["bad_messages"] += 1
            raise RemoteProtocolError(f"unknown collective message {kind!r}", peer=peer)
        await handler(stream, peer, raw)

    async def _on_hello(self, stream: FramedStream, peer: str, raw: dict[str, Any]) -> None:
        await stream.send_frame(self.matchmaker.answer_hello(peer, HELLO.validate(raw, peer=peer)))

    async def _on_ready(self, stream: FramedStream, peer: str, raw: dict[str, Any]) -> None:
        await stream.send_frame(self.matchmaker.answer_ready(peer, READY.validate(raw, peer=peer)))

    async def _on_presence(self, stream: FramedStream, peer: str, raw: dict[str, Any]) -> None:
        await stream.send_frame(self.matchmaker.answer_presence(peer, PRESENCE.validate(raw, peer=peer)))

    async def _on_control(self, stream: FramedStream, peer: str, raw: dict[str, Any]) -> None:
        await self.links.serve_link(stream, raw, self.rounds.route)

    # -- public API
    async def form_group(
        self,
        run: str,
        round_key: str,
        *,
        layout: bytes,
        weight: float = 1.0,
        target: int = 4,
        min_size: int = 2,
        timeout: float = 30.0,
        patience: float | None = None,
        expected: int | Collection[str] | None = None,
    ) -> Formed | NoGroup:
        """Find peers averaging ``layout`` under ``run`` in round ``round_key``; never waits past ``timeout``.

        ``expected``: the other peers the caller knows will come (their ids, or their number);
        once all are seen the group forms without waiting out ``patience``. An expected peer
        whose connection closes, or that announced it is leaving (:meth:`announce`), is not
        waited for.

        Returns :class:`Formed` (members in averaging order) or :class:`NoGroup`.

        Example::

            group = await coll.form_group("run", "step-3", layout=tensors_layout(params))
        """
        return await self.matchmaker.form_group(
            run, round_key, layout=layout, weight=weight, target=target, min_size=min_size,
            timeout=timeout, patience=patience, expected=expected,
        )

    async def announce(self, run: str, peers: Sequence[str], state: str, *, timeout: float = 1.0) -> int:
        """Tell ``peers`` we joined ``run`` (``"join"``) or are leaving it (``"leave"``); how many
        took the note. Bounded by ``timeout``; an unreachable peer is skipped, never raised.

        Example::

            await coll.announce("run/abc", partners, "leave")   # partners stop waiting for us
        """
        return await self.matchmaker.announce(run, peers, state, timeout=timeout)

    def noted(self, run: str, state: str) -> dict[str, float]:
        """Peers whose last presence note for ``run`` was ``state`` (``"join"`` or ``"leave"``),
        with the (trio) time each came.

        Example::

            newcomers = coll.noted("run/abc", "join")
        """
        return self.matchmaker.noted(run, state)

    async def all_reduce(
        self,
        group: Formed,
        run: str,
        round_key: str,
        tensors: Sequence[torch.Tensor],
        *,
        codec: str = "none",
        min_size: int = 2,
        max_attempts: int = 3,
        aggregator: str | Aggregator = "mean",
        weight_cap: float | None = None,
    ) -> RoundOutcome:
        """Average ``tensors`` in place with ``group`` (weights and bandwidths from its adverts).

        On success every element is the exact weighted average over ``result.participants``
        (up to the codec's documented bound); otherwise ``tensors`` are left unchanged.
        ``aggregator``: ``"mean"`` (that average), ``"centered_clip"`` or ``"trimmed_mean"``
        (robust to a minority of Byzantine contributions; each reducer aggregates its part, see
        :mod:`p2pcompute.collective.aggregate`), or an :class:`Aggregator` with its settings.
        Every member of a group must name the same kind. ``weight_cap``: each member's weight is
        first capped at this multiple of the group's median weight (weights are the members' own
        claims; every member should pass the same cap).

        Example::

            result = await coll.all_reduce(group, "run", "step-3", params, codec="bf16")
            result = await coll.all_reduce(group, "run", "step-4", params, aggregator="centered_clip")
        """
        return await self.rounds.all_reduce(
            group, run, round_key, tensors, codec=codec, min_size=min_size, max_attempts=max_attempts,
            aggregator=aggregator, weight_cap=weight_cap,
        )

    async def average(
        self,
        run: str,
        round_key: str,
        tensors: Sequence[torch.Tensor],
        *,
        weight: float = 1.0,
        target: int = 4,
        min_size: int = 2,
        matchmaking_timeout: float = 30.0,
        patience: float | None = None,
        codec: str = "none",
        max_attempts: int = 3,
        aggregator: str | Aggregator = "mean",
        expected: int | Collection[str] | None = None,
        weight_cap: float | None = None,
    ) -> RoundOutcome:
        """Form a group under ``run`` for ``round_key`` and average ``tensors`` in place with it.

        Returns a :class:`RoundOutcome`: ``AVERAGED`` (exact weighted average over
        ``participants``, or their robust aggregate with another ``aggregator``, see
        :meth:`all_reduce`), ``FAILED`` or ``NO_GROUP`` (tensors untouched in both).

        Example::

            result = await coll.average("run", "step-3", list(model.parameters()), weight=1024)
        """
        flat_dtype(tensors)
        Aggregator.of(aggregator)
        if codec not in CODECS:
            raise ConfigError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")
        token = self.round_log.begin(run, round_key)
        outcome: RoundOutcome | None = None
        try:
            outcome = await self._average(
                run, round_key, tensors, weight=weight, target=target, min_size=min_size,
                matchmaking_timeout=matchmaking_timeout, patience=patience, codec=codec,
                max_attempts=max_attempts, aggregator=aggregator, expected=expected, weight_cap=weight_cap,
            )
            return outcome
        finally:
            self.round_log.end(token, outcome)

    async def _average(
        self,
        run: str,
        round_key: str,
        tensors: Sequence[torch.Tensor],
        *,
        weight: float,
        target: int,
        min_size: int,
        matchmaking_timeout: float,
        patience: float | None,
        codec: str,
        max_attempts: int,
        aggregator: str | Aggregator,
        expected: int | Collection[str] | None = None,
        weight_cap: float | None = None,
    ) -> RoundOutcome:
        group = await self.form_group(
            run,
            round_key,
            layout=tensors_layout(tensors),
            weight=weight,
            target=target,
            min_size=min_size,
            timeout=matchmaking_timeout,
            patience=patience,
            expected=expected,
        )
        if isinstance(group, NoGroup):
            return RoundOutcome(RoundStatus.NO_GROUP, reason=group.reason)
        return await self.all_reduce(
            group, run, round_key, tensors, codec=codec, min_size=min_size, max_attempts=max_attempts,
            aggregator=aggregator, weight_cap=weight_cap,
        )


@asynccontextmanager
async def open_collective(node: Any, lane: Any, **options: Any) -> AsyncIterator[Collective]:
    """Serve the collective protocol on ``node`` (data over ``lane``) for the ``async with`` block.

    Options: ``bandwidth`` (our share of reduction work, relative to the others'; 0 = only
    contribute and receive), ``timeouts`` (:class:`Timeouts`), ``settle``, ``hello_timeout``,
    ``republish_interval``, ``pull_fanout``, ``silence`` (a member silent this long during
    matchmaking is dropped from the group), ``leave_timeout``, and ``faults``
    (:class:`~p2pcompute.collective.faults.FaultPlan`, a test seam; default: no faults).

    Example::

        async with open_collective(node, lane, bandwidth=1.0) as coll:
            result = await coll.average("run", "step-1", [weights])
    """
    coll = Collective(node, lane, **options)
    node.set_stream_handler(PROTOCOL, coll._serve, max_frame=MAX_REQUEST)
    try:
        async with trio.open_nursery() as background:
            coll._background = background
            try:
                yield coll
            finally:
                background.cancel_scope.cancel()
                coll._background = None
    finally:
        with trio.CancelScope(shield=True), give_up_after(2.0):
            await coll.links.close()


__all__ = ["CODECS", "Collective", "RoundLog", "open_collective", "tensors_layout"]
