"""The round driver: the attempts of one all-reduce, moving tensors over the lane.

:class:`RoundDriver` drives one sans-IO :class:`~p2pcompute.collective.roundcore.RoundCore`
(data path in docs/design/averaging.md): the caller's tensors are copied once into a pristine
flat input; each contributor sends every reducer its slice with ``lane.send``; a reducer
streams contributions with ``lane.receive_chunks`` straight into a part-sized accumulator
(``add_(values, alpha=w/W)``), then sends the average as one shard per caller tensor it spans,
and every peer lands those shards with ``lane.receive(into=...)`` directly in its own tensors.
A failed attempt throws its accumulator away and the retry starts from the pristine input; a
failed round puts the caller's tensors back as they were. The core's actions are carried out
through a table (action type -> handler), not a chain of ifs.

:class:`Rounds` keeps the rounds running on one node: it starts them (:meth:`Rounds.all_reduce`),
routes the control messages that arrive for them (:meth:`Rounds.route`, holding early ones
until their round starts) and keeps the round buffers between rounds.

Collaborators: the lane (``send``, ``receive``, ``receive_chunks``), a ``tell(peer, bytes)``
callback (the control links), the fault plan and a counter for statistics. Imports the
collective's cores and messages, :mod:`p2pcompute.errors`, :mod:`p2pcompute.tensors.codecs`,
torch and trio.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import torch
import trio
import trio.lowlevel

from p2pcompute.collective.aggregate import Aggregated, Aggregator, ClipLedger, aggregate, capped_weights
from p2pcompute.collective.buffers import Scratch, flat_dtype
from p2pcompute.collective.buffers import offload as _offload
from p2pcompute.collective.buffers import roundtrip_part as _roundtrip
from p2pcompute.collective.faults import FaultPlan
from p2pcompute.collective.matchcore import Formed
from p2pcompute.collective.messages import LEFT, STATUS
from p2pcompute.collective.plan import Layout
from p2pcompute.collective.roundcore import (
    Action,
    AnnounceLeft,
    AttemptCore,
    Decided,
    Outcome,
    RoundCore,
    RoundOutcome,
    SendAveragedPart,
    SendStatus,
    Status,
    StopTransfers,
    Timeouts,
)
from p2pcompute.collective.verify import (
    check_part,
    codec_error,
    echo_tensor,
    part_digest,
    read_echo,
    sample_positions,
    trace_tensor,
)
from p2pcompute.deadlines import give_up_after
from p2pcompute.errors import (
    ConfigError,
    IntegrityError,
    PeerGone,
    PeerTimeout,
    PeerUnreachable,
    ProtocolError,
    RemoteProtocolError,
    ResourceLimitExceeded,
)

log = logging.getLogger(__name__)

CODECS = ("none", "fp16", "bf16", "int8")
# ResourceLimitExceeded is honest ("I am full"): never blamed; a send refused so is retried first
_TRANSFER_ERRORS = (PeerGone, PeerTimeout, PeerUnreachable, ProtocolError, ResourceLimitExceeded)
_MAX_REMEMBERED = 512
_PROGRESS_EVERY = 0.2  # seconds between progress reports from a contribution's worker thread
_STATUS_FIRST = 1.0  # at most this long a failed attempt's transfers wait for its status to go out
_BUSY_FIRST = 0.05  # first backoff after a receiver refused a send because it is full
_BUSY_MAX = 1.0  # the backoff doubles up to this

Tell = Callable[[str, bytes], Awaitable[None]]


class Blocklist:
    """Peers this node blamed itself (bad bytes, a refuted part, clipped again and again), each
    kept out of our later rounds for ``hold`` seconds; at most ``max_peers``, oldest out first.

    Only our own evidence counts: a blame in another member's status excludes a peer from that
    round's retry but is not recorded here (a Byzantine member could name anyone).

    Example::

        >>> b = Blocklist(hold=10.0)
        >>> b.add("p", now=0.0)
        >>> b.holds("p", now=5.0), b.holds("p", now=11.0)
        (True, False)
    """

    def __init__(self, *, hold: float = 3600.0, max_peers: int = 4096) -> None:
        self.hold = hold
        self.max_peers = max_peers
        self._until: collections.OrderedDict[str, float] = collections.OrderedDict()

    def add(self, peer: str, now: float) -> None:
        """Keep ``peer`` out until ``now + hold``. Example::

        blocklist.add(peer, trio.current_time())
        """
        self._until[peer] = now + self.hold
        self._until.move_to_end(peer)
        while len(self._until) > self.max_peers:
            self._until.popitem(last=False)

    def holds(self, peer: str, now: float) -> bool:
        """Whether ``peer`` is still kept out at ``now``. Example::

        if blocklist.holds(peer, trio.current_time()): ...
        """
        until = self._until.get(peer)
        if until is None:
            return False
        if until <= now:
            del self._until[peer]
            return False
        return True

    def peers(self, now: float) -> list[str]:
        """The peers kept out at ``now``. Example::

        blocklist.peers(trio.current_time())     # ['12D3KooW...']
        """
        return [p for p in list(self._until) if self.holds(p, now)]


class RoundDriver:
    """Drives one RoundCore over the lane: the attempts of one all-reduce.

    Example::

        driver = RoundDriver(round_id, rc, tensors, "none", lane=lane, tell=links.tell,
                             faults=FaultPlan(), scratch=Scratch(), stats=counter)
        outcome = await driver.run()
    """

    def __init__(
        self,
        round_id: str,
        rc: RoundCore,
        tensors: Sequence[torch.Tensor],
        codec: str,
        *,
        lane: Any,
        tell: Tell,
        faults: FaultPlan,
        scratch: Scratch,
        stats: collections.Counter[str],
        leave_timeout: float = 2.0,
        aggregator: Aggregator | None = None,
        ledger: ClipLedger | None = None,
        blocked: Blocklist | None = None,
    ) -> None:
        self.agg = aggregator if aggregator is not None else Aggregator()
        self.ledger = ledger if ledger is not None else ClipLedger()
        self.blocked = blocked if blocked is not None else Blocklist()
        self.lane = lane
        self.tell = tell
        self.faults = faults
        self.scratch = scratch
        self.stats = stats
        self.leave_timeout = leave_timeout
        self.round_id = round_id
        self.rc = rc
        self.codec = codec
        self.tensors = list(tensors)
        self.dtype, self.device = flat_dtype(self.tensors)
        self.layout = Layout(tuple(t.numel() for t in self.tensors))
        self.views = [t.view(-1) for t in self.tensors]
        # the pristine input: every attempt starts from it; a failed round restores it
        self._flat_base = scratch.take("flat", self.layout.total, self.dtype, self.device)
        self.flat = self._flat_base[: self.layout.total]
        self._acc_base: torch.Tensor | None = None
        self.att: AttemptCore | None = None
        self.acc = self.flat[:0]
        # robust aggregators: every contributor's slice of our part, one row each
        self._rows_base: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.aggregated: Aggregated | None = None  # what our last aggregation did (its trace)
        self.clipped: tuple[str, ...] = ()  # senders we clipped in the last aggregation
        self._acc_lock = threading.Lock()
        self._decided = trio.Event()
        self._outcome: Outcome | None = None
        self._kick = trio.Event()
        self._control: trio.Nursery | None = None
        self._transfers: trio.Nursery | None = None
        self._stop = trio.CancelScope()
        self._told: trio.Event | None = None  # our last status in flight (within one _apply)
        # the core's actions, as data: what each one does here
        self._handlers: dict[type, Callable[[AttemptCore, Any], None]] = {
            SendStatus: self._do_tell,
            AnnounceLeft: self._do_tell,
            SendAveragedPart: self._do_send_part,
            StopTransfers: self._do_stop,
            Decided: self._do_decided,
        }

    # -- control messages
    def on_status(self, peer: str, msg: Mapping[str, Any]) -> None:
        """A validated ``coll.status`` from ``peer``.

        Example::

            driver.on_status(peer, STATUS.validate(raw, peer=peer))
        """
        status = Status(msg["ok"], frozenset(msg["suspects"]), frozenset(msg["blamed"]), msg["leaving"])
        log.debug("collective %s: status from %s for attempt %s: %s",
                  self.round_id, peer, msg["attempt"], status)
        self._apply(self.rc.on_status(msg["attempt"], msg["digest"], peer, status, trio.current_time()))

    def on_left(self, peer: str) -> None:
        """``peer`` announced it left the round.

        Example::

            driver.on_left(peer)
        """
        self._apply(self.rc.on_left(peer, trio.current_time()))

    def _message(self, action: SendStatus | AnnounceLeft) -> bytes:
        if isinstance(action, AnnounceLeft):
            return LEFT.build(round=self.round_id)
        assert self.att is not None
        return STATUS.build(
            round=self.round_id,
            attempt=self.rc.attempts,
            digest=self.att.plan.digest(),
            ok=action.ok,
            leaving=action.leaving,
            suspects=sorted(action.suspects),
            blamed=sorted(action.blamed),
        )

    def _apply(self, actions: list[Action], *, kick: bool = True) -> None:
        """Carry out the core's actions; ``kick`` wakes the watchdog (its deadline may have moved)."""
        att = self.att
        if att is None:
            return
        self._told = None
        for action in actions:
            self._handlers[type(action)](att, action)
        if kick:
            self._kick.set()

    def _do_tell(self, att: AttemptCore, action: SendStatus | AnnounceLeft) -> None:
        if self._control is not None:
            self._told = trio.Event()
            self._control.start_soon(self._broadcast, att.others, self._message(action), self._told)

    def _do_send_part(self, att: AttemptCore, action: SendAveragedPart) -> None:
        log.debug("collective %s: attempt %d: our part is reduced", self.round_id, self.rc.attempts)
        if self._transfers is not None:
            self._transfers.start_soon(self._finalize_part, att)

    def _do_stop(self, att: AttemptCore, action: StopTransfers) -> None:
        if self._told is not None and self._control is not None:
            # our status must reach the partners before the resets of our streams do:
            # a partner that sees only the reset suspects us, and may drop us
            self._control.start_soon(self._stop_after, self._stop, self._told)
        else:
            self._stop.cancel()

    def _do_decided(self, att: AttemptCore, action: Decided) -> None:
        log.debug("collective %s: attempt %d decided: %s", self.round_id, self.rc.attempts, action.outcome)
        self._outcome = action.outcome
        self._decided.set()

    async def _broadcast(self, peers: Sequence[str], data: bytes, done: trio.Event) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    nursery.start_soon(self.tell, peer, data)
        finally:
            done.set()

    async def _stop_after(self, stop: trio.CancelScope, told: trio.Event) -> None:
        with give_up_after(_STATUS_FIRST):
            await told.wait()
        stop.cancel()

    # -- the round
    async def run(self) -> RoundOutcome:
        """Run attempts until the core decides; the round's outcome.

        Example::

            outcome = await driver.run()     # the caller's tensors hold the average if outcome.ok
        """
        try:
            return await self._run()
        finally:
            self.scratch.give("flat", self._flat_base)
            if self._acc_base is not None:
                self.scratch.give("acc", self._acc_base)
            if self._rows_base is not None:
                self.scratch.give("rows", self._rows_base)

    async def _run(self) -> RoundOutcome:
        rc = self.rc
        try:
            await _offload(self.flat, self._snapshot)
            await self.faults.at("snapshot")
            async with trio.open_nursery() as control:
                self._control = control
                att = rc.start_attempt(trio.current_time())
                while att is not None:
                    outcome = await self._attempt(att)
                    att = rc.finish_attempt(outcome, trio.current_time())
                self.att = None
        except BaseException:
            if rc.result is None and not self.faults.silent_exit:
                with trio.CancelScope(shield=True), give_up_after(self.leave_timeout):
                    await self._leave()
            self._restore()
            raise
        assert rc.result is not None
        if not rc.result.ok:
            self._restore()
        elif self.agg.robust:
            return dataclasses.replace(rc.result, clipped=self.clipped)
        return rc.result

    def _snapshot(self) -> None:
        for view, off, size in zip(self.views, self.layout.offsets, self.layout.sizes, strict=True):
            self.flat[off : off + size].copy_(view)

    def _restore(self) -> None:
        for view, off, size in zip(self.views, self.layout.offsets, self.layout.sizes, strict=True):
            view.copy_(self.flat[off : off + size])

    async def _leave(self) -> None:
        att = self.att
        actions = att.leave(trio.current_time()) if att is not None else []
        told = False
        async with trio.open_nursery() as nursery:
            for action in actions:
                if isinstance(action, SendStatus | AnnounceLeft):
                    assert att is not None
                    data = self._message(action)
                    for peer in att.others:
                        nursery.start_soon(self.tell, peer, data)
                    told = True
            if not told:
                # before our first attempt (still copying our input) or between two: no attempt
                # of ours to report on, so a round-level notice, or the others wait out a timeout
                data = LEFT.build(round=self.round_id)
                for peer in self.rc.members:
                    if peer != self.rc.me:
                        nursery.start_soon(self.tell, peer, data)

    async def _attempt(self, att: AttemptCore) -> Outcome:
        self.att = att
        self._decided = trio.Event()
        self._outcome = None
        self._stop = trio.CancelScope()
        plan = att.plan
        start, end = plan.part_of(att.me)
        if self._acc_base is None or self._acc_base.numel() < end - start:
            self._acc_base = self.scratch.take("acc", end - start, self.dtype, self.device)
        acc = self.acc = self._acc_base[: end - start]
        self.rows = None
        self.aggregated = None
        self.clipped = ()
        if self.agg.keeps_rows:
            await self._stack_rows(att, start, end)
        elif att.me in plan.contributors:
            alpha = plan.weight_of(att.me) / plan.weight_total
            await _offload(acc, lambda: torch.mul(self.flat[start:end], alpha, out=acc))
        else:
            acc.zero_()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watchdog, att)
            self._transfers = await nursery.start(self._run_transfers, att)
            self._apply(self.rc.kickoff(trio.current_time()))
            now = trio.current_time()
            for peer in att.others:
                if self.blocked.holds(peer, now):
                    # we blamed it ourselves in an earlier round: out before its data counts
                    self.stats["blocked_blamed"] += 1
                    log.info("collective %s: %s was blamed by us before; excluding it", self.round_id, peer)
                    self._apply(att.peer_failed(peer, now, "blamed by us in an earlier round", blame=True))
            await self._decided.wait()
            nursery.cancel_scope.cancel()
        self._transfers = None
        assert self._outcome is not None
        return self._outcome

    async def _stack_rows(self, att: AttemptCore, start: int, end: int) -> None:
        """Robust aggregators: a row per contributor for our part (about one copy of the tensors)."""
        contributors = att.plan.contributors
        n, m = len(contributors), end - start
        work = self.dtype if self.dtype in (torch.float32, torch.float64) else torch.float32
        base = self._rows_base
        if base is None or base.dtype != work or base.numel() < n * m:
            base = self._rows_base = self.scratch.take("rows", n * m, work, self.device)
        rows = self.rows = base[: n * m].view(n, m)
        if att.me in contributors:
            mine = rows[contributors.index(att.me)]
            await _offload(mine, lambda: mine.copy_(self.flat[start:end]))

    async def _run_transfers(self, att: AttemptCore, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        plan = att.plan
        me = att.me
        with self._stop:
            async with trio.open_nursery() as nursery:
                task_status.started(nursery)
                await self.faults.at("round_start")
                if me in plan.contributors:
                    for reducer in plan.reducers:
                        if reducer != me:
                            nursery.start_soon(self._send_contribution, att, reducer)
                if att.is_reducer:
                    for sender in plan.contributors:
                        if sender != me:
                            nursery.start_soon(self._receive_contribution, att, sender)
                for reducer in plan.reducers:
                    if reducer != me:
                        nursery.start_soon(self._receive_part, att, reducer)
                await trio.sleep_forever()

    async def _watchdog(self, att: AttemptCore) -> None:
        while True:
            deadline = att.next_deadline()
            with trio.move_on_at(deadline if deadline is not None else float("inf")):
                await self._kick.wait()
            self._kick = trio.Event()
            # no kick from here: the loop recomputes the deadline anyway, and a kick would wake
            # this loop at once, spinning it (it did: ~900 wakeups/s, half a core per peer)
            self._apply(att.poll(trio.current_time()), kick=False)

    def _tag(self, att: AttemptCore, kind: str) -> str:
        return f"{self.round_id}/{self.rc.attempts}/{att.plan.digest()}/{kind}"

    def _failed(self, att: AttemptCore, peer: str, exc: BaseException) -> None:
        # only provably bad data from that very peer is blamed; a timeout, a broken connection
        # or an honest "I am full" (ResourceLimitExceeded) only makes it a suspect
        blame = isinstance(exc, IntegrityError | RemoteProtocolError) and getattr(exc, "peer", None) == peer
        if blame:
            self.stats["blamed"] += 1
            self.blocked.add(peer, trio.current_time())
        log.debug("collective %s: transfer with %s failed: %r", self.round_id, peer, exc)
        self._apply(att.peer_failed(peer, trio.current_time(), repr(exc), blame=blame))

    async def _send(
        self, att: AttemptCore, peer: str, kind: str, tensors: Mapping[str, torch.Tensor]
    ) -> bool:
        """``lane.send`` to ``peer``; True once it is through, False when it failed (reported).

        A receiver that is full refuses honestly (``ResourceLimitExceeded``): we back off (50 ms,
        doubling to 1 s, jittered) and send again for up to ``sender_timeout`` after the first
        refusal, when a receiver waiting for us would give up on us anyway; only then is the
        peer counted as failed for this attempt, and never blamed.
        """
        give_up_at: float | None = None
        backoff = _BUSY_FIRST
        while True:
            try:
                await self.lane.send(peer, self._tag(att, kind), tensors, codec=self.codec)
                return True
            except ResourceLimitExceeded as exc:
                self.stats["busy_refusals"] += 1
                if not exc.retryable:  # over the receiver's size cap: waiting cannot help
                    self._failed(att, peer, exc)
                    return False
                now = trio.current_time()
                if give_up_at is None:
                    give_up_at = now + att.timeouts.sender_timeout
                await self.faults.at("send_refused")
                pause = backoff * random.uniform(0.5, 1.0)
                if now + pause >= give_up_at:
                    self._failed(att, peer, exc)
                    return False
                log.debug("collective %s: %s is full; sending again in %.2f s", self.round_id, peer, pause)
                await trio.sleep(pause)
                backoff = min(2 * backoff, _BUSY_MAX)
            except _TRANSFER_ERRORS as exc:
                self._failed(att, peer, exc)
                return False

    async def _send_contribution(self, att: AttemptCore, reducer: str) -> None:
        start, end = att.plan.part_of(reducer)
        await self.faults.at("contribution_start")
        if await self._send(att, reducer, "c", {"x": self.flat[start:end]}):
            await self.faults.at("contribution_sent")

    async def _receive_contribution(self, att: AttemptCore, sender: str) -> None:
        plan = att.plan
        acc = self.acc
        lock = self._acc_lock
        alpha = plan.weight_of(sender) / plan.weight_total
        expected = acc.numel()
        got = 0
        reported = [time.monotonic()]
        token = trio.lowlevel.current_trio_token()
        land: Callable[[int, torch.Tensor], None]
        if self.rows is not None:  # a robust aggregator: keep the contribution whole, in its row
            row = self.rows[plan.contributors.index(sender)]

            def land(first: int, values: torch.Tensor) -> None:
                row[first : first + values.numel()].copy_(values)
        else:

            def land(first: int, values: torch.Tensor) -> None:
                with lock:  # contributions land in one accumulator
                    acc[first : first + values.numel()].add_(values, alpha=alpha)

        def progress() -> None:
            att.progress(sender, trio.current_time())

        def add(name: str, first: int, values: torch.Tensor) -> None:
            # runs in the lane's worker thread, beside the other contributors' threads
            nonlocal got
            count = values.numel()
            if name != "x" or values.dtype != acc.dtype or first != got or got + count > expected:
                where = f"contribution shard {name!r} [{first}:+{count}]"
                raise IntegrityError(f"{where} out of place", peer=sender)
            land(first, values.to(acc.device, non_blocking=True))
            got += count
            now = time.monotonic()
            if now - reported[0] >= _PROGRESS_EVERY:  # the sender's inactivity timer, not per record
                reported[0] = now
                # from the lane's thread or the event loop alike, and never waiting: the lane may
                # hold the loop while a cancelled transfer's thread stops
                token.run_sync_soon(progress)

        try:
            await self.lane.receive_chunks(sender, self._tag(att, "c"), add, threaded=True)
            if got != expected:
                raise IntegrityError(f"contribution of {got} elements, expected {expected}", peer=sender)
        except _TRANSFER_ERRORS as exc:
            self._failed(att, sender, exc)
            return
        self._apply(att.contribution_done(sender, trio.current_time()))

    def _shards(self, start: int, end: int, source: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Names -> views for the flat range [start, end): of ``source`` (part-local) or our tensors."""
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for k, (i, lo, hi) in enumerate(self.layout.segments(start, end)):
            if source is None:
                out[f"s{k}"] = self.views[i][lo:hi]
            else:
                out[f"s{k}"] = source[offset : offset + hi - lo]
            offset += hi - lo
        return out

    async def _finalize_part(self, att: AttemptCore) -> None:
        await self.faults.at("reduce")
        if self.rows is not None and not await self._robust_reduce(att, self.rows):
            return
        start, end = att.plan.part_of(att.me)
        shards = self._shards(start, end, self.acc)

        def finalize() -> None:
            if self.codec != "none":
                # what the others decode is what we keep: every member ends bit-identical
                for shard in shards.values():
                    _roundtrip(self.codec, shard)
            for dest, shard in zip(self._shards(start, end, None).values(), shards.values(), strict=True):
                dest.copy_(shard)

        await _offload(self.acc, finalize)
        if self.rows is not None:
            # the echo: the rows we used, at positions drawn from the part we now commit to
            rows = self.rows
            mine = list(self._shards(start, end, None).values())
            echo: list[torch.Tensor] = []

            def sample() -> None:
                pos = sample_positions(part_digest(_joined(mine)), end - start)
                echo.append(echo_tensor(rows[:, pos]))

            await _offload(self.acc, sample)
            shards = {**shards, "v": echo[0]}
            if self.agg.kind == "centered_clip" and self.aggregated is not None:
                # the trace: tau and every distance, so members can replay the clipping there
                shards["w"] = trace_tensor(self.aggregated, len(att.plan.contributors), self.agg.iterations)
        for peer in att.others:
            assert self._transfers is not None
            self._transfers.start_soon(self._send, att, peer, "p", shards)

    async def _robust_reduce(self, att: AttemptCore, rows: torch.Tensor) -> bool:
        """Aggregate our part from its rows into the accumulator; count and blame clipped senders.

        False when a sender passed the blame threshold: the attempt fails, without it next time.
        """
        contributors = att.plan.contributors
        weights = [att.plan.weight_of(c) for c in contributors]
        acc = self.acc
        done: list[Aggregated] = []

        def work() -> None:
            out = acc if acc.dtype == rows.dtype else torch.empty_like(acc, dtype=rows.dtype)
            done.append(aggregate(rows, weights, out, self.agg))
            if out is not acc:
                acc.copy_(out)

        await _offload(rows, work)
        self.aggregated = done[0]
        if self.faults.tamper_part is not None:  # the test seam: a reducer that lies about its part
            self.faults.tamper_part(acc)
        seen = {c for c in contributors if c != att.me}
        clipped = {contributors[i] for i in done[0].counted(self.agg.count_below)} & seen
        self.clipped = tuple(sorted(clipped))
        self.stats["clipped_contributions"] += len(clipped)
        blame = self.ledger.record(
            self.round_id, seen=seen, clipped=clipped, blame_after=self.agg.blame_after
        )
        if not blame:
            return True
        now = trio.current_time()
        for peer in sorted(blame):
            self.stats["blamed"] += 1
            self.stats["clip_blamed"] += 1
            self.blocked.add(peer, now)
            why = f"its contributions were clipped in {self.ledger.streak.get(peer, 0)} consecutive rounds"
            log.info("collective %s: blaming %s: %s", self.round_id, peer, why)
            self._apply(att.peer_failed(peer, now, why, blame=True))
        return False

    async def _receive_part(self, att: AttemptCore, reducer: str) -> None:
        start, end = att.plan.part_of(reducer)
        into = self._shards(start, end, None)
        echoed = self.rows is not None
        extra = ({"v", "w"} if self.agg.kind == "centered_clip" else {"v"}) if echoed else set()
        try:
            got = await self.lane.receive(reducer, self._tag(att, "p"), into=into)
            if set(got) != set(into) | extra:
                raise IntegrityError("averaged part with the wrong shards", peer=reducer)
            if echoed:
                await self._verify_part(att, reducer, start, end, list(into.values()), got["v"], got.get("w"))
        except _TRANSFER_ERRORS as exc:
            self._failed(att, reducer, exc)
            return
        self._apply(att.averaged_part_done(reducer, trio.current_time()))

    async def _verify_part(
        self, att: AttemptCore, reducer: str, start: int, end: int, part: list[torch.Tensor],
        echo: torch.Tensor, trace: torch.Tensor | None = None,
    ) -> None:
        """Check ``reducer``'s part against its echo (p2pcompute.collective.verify); raise
        :class:`IntegrityError` naming it when the part fails."""
        plan = att.plan
        contributors = plan.contributors
        why: list[str | None] = []

        def check() -> None:
            joined = _joined(part)
            pos = sample_positions(part_digest(joined), end - start)
            rows = read_echo(echo, len(contributors), pos.numel())
            if isinstance(rows, str):
                why.append(rows)
                return
            mine = None
            if att.me in contributors:
                own = self.flat[start:end]
                mine = (contributors.index(att.me), own[pos], codec_error(self.codec, [own], pos))
            why.append(check_part(
                self.agg, joined[pos], rows, [plan.weight_of(c) for c in contributors],
                part_error=codec_error(self.codec, part, pos), mine=mine, trace=trace,
            ))

        await _offload(self.flat[start:end], check)
        if why[0] is not None:
            self.stats["parts_refuted"] += 1
            log.info("collective %s: the part of %s fails its check: %s", self.round_id, reducer, why[0])
            raise IntegrityError(f"averaged part refuted: {why[0]}", peer=reducer)


class Rounds:
    """The rounds running on one node: starts them and routes their control messages.

    Example::

        rounds = Rounds(node.peer_id, lane, links.tell, faults=FaultPlan(), stats=counter,
                        timeouts=Timeouts())
        result = await rounds.all_reduce(group, "run", "step-3", params)
        rounds.route(round_id, peer, status_msg)     # from the control links
    """

    def __init__(
        self,
        peer_id: str,
        lane: Any,
        tell: Tell,
        *,
        faults: FaultPlan,
        stats: collections.Counter[str],
        timeouts: Timeouts,
        leave_timeout: float = 2.0,
    ) -> None:
        self.peer_id = peer_id
        self.lane = lane
        self.tell = tell
        self.faults = faults
        self.stats = stats
        self.timeouts = timeouts
        self.leave_timeout = leave_timeout
        self.scratch = Scratch()
        self.ledger = ClipLedger()  # per-sender clip counts across rounds (robust aggregators)
        self.blocked = Blocklist()  # peers we blamed ourselves: out of our later rounds for a while
        self._rounds: dict[str, RoundDriver] = {}
        self._closed_rounds: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._early: collections.OrderedDict[str, list[tuple[str, Mapping[str, Any]]]] = (
            collections.OrderedDict()
        )

    def route(self, round_id: str, peer: str, msg: Mapping[str, Any]) -> None:
        """Hand a validated status or leave from ``peer`` to its round (held if it has not begun).

        Example::

            rounds.route(msg["round"], peer, msg)
        """
        rnd = self._rounds.get(round_id)
        if rnd is not None:
            _deliver(rnd, peer, msg)
            return
        if round_id in self._closed_rounds:
            return
        # the round has not started here yet (the others formed and began a moment earlier)
        early = self._early.setdefault(round_id, [])
        if len(early) < 4 * 64:
            early.append((peer, msg))
        while len(self._early) > 64:
            self._early.popitem(last=False)

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
        """See :meth:`p2pcompute.collective.Collective.all_reduce`.

        Example::

            result = await rounds.all_reduce(group, "run", "step-3", params, codec="bf16")
            result = await rounds.all_reduce(group, "run", "step-4", params, aggregator="centered_clip")
        """
        if codec not in CODECS:
            raise ConfigError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")
        agg = Aggregator.of(aggregator)
        members = [c.peer_id for c in group.members]
        round_id = f"{run}|{round_key}|{group.digest}"
        if agg.keeps_rows:  # members that aggregate differently never mix their transfers
            round_id += f"|{agg.kind}" if agg.robust else f"|{agg.kind}-echo"
        if round_id in self._rounds:
            raise ConfigError(f"round {round_id!r} is already running")
        weights = [c.weight for c in group.members]
        if weight_cap is not None and sum(weights) > 0:  # none positive: the round core says so
            # the same function of the same signed adverts on every member: one set of weights
            weights = capped_weights(weights, weight_cap)
        rc = RoundCore(
            self.peer_id,
            members,
            weights,
            [c.bandwidth for c in group.members],
            total=sum(t.numel() for t in tensors),
            min_size=min_size,
            max_attempts=max_attempts,
            timeouts=self.timeouts,
        )
        rnd = RoundDriver(
            round_id, rc, tensors, codec, lane=self.lane, tell=self.tell, faults=self.faults,
            scratch=self.scratch, stats=self.stats, leave_timeout=self.leave_timeout,
            aggregator=agg, ledger=self.ledger, blocked=self.blocked,
        )
        self._rounds[round_id] = rnd
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._replay_early, round_id, rnd)
                result = await rnd.run()
                nursery.cancel_scope.cancel()
        finally:
            del self._rounds[round_id]
            self._closed_rounds[round_id] = None
            while len(self._closed_rounds) > _MAX_REMEMBERED:
                self._closed_rounds.popitem(last=False)
        self.stats["rounds_averaged" if result.ok else "rounds_failed"] += 1
        return result

    async def _replay_early(self, round_id: str, rnd: RoundDriver) -> None:
        await trio.lowlevel.checkpoint()  # after the first attempt started
        for peer, msg in self._early.pop(round_id, []):
            _deliver(rnd, peer, msg)


def _joined(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """One float32 vector of a part's values (its views may span tensors of several dtypes)."""
    return torch.cat([v.detach().reshape(-1).to(torch.float32) for v in views])


def _deliver(rnd: RoundDriver, peer: str, msg: Mapping[str, Any]) -> None:
    if msg["t"] == STATUS.type:
        rnd.on_status(peer, msg)
    else:
        rnd.on_left(peer)


__all__ = ["CODECS", "Blocklist", "RoundDriver", "Rounds", "Scratch", "flat_dtype"]
