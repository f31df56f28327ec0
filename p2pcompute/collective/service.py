"""Trio drivers: matchmaking and fault-tolerant all-reduce on a Node and a TensorLane.

:func:`open_collective` runs one :class:`Collective` per node. It serves the collective
stream protocol (hellos, readies, statuses), listens to each run's join topic, and drives the
sans-IO cores: :class:`~p2pcompute.collective.matchcore.MatchCore` for forming a group and
:class:`~p2pcompute.collective.roundcore.RoundCore` for averaging with it. All protocol
decisions live in those cores; this module only moves bytes and time.

Data path of one attempt (see docs/design/averaging.md): the caller's tensors are copied once
into a pristine flat input; each contributor sends every reducer its slice with
``lane.send``; a reducer streams contributions with ``lane.receive_chunks`` straight into a
part-sized accumulator (``add_(values, alpha=w/W)``), then sends the average as one shard per
caller tensor it spans, and every peer lands those shards with ``lane.receive(into=...)``
directly in its own tensors. A failed attempt throws its accumulator away and the retry starts
from the pristine input, so no partial contribution ever reaches a result; a failed round puts
the caller's tensors back as they were.

Imports :mod:`p2pcompute.collective` cores, :mod:`p2pcompute.overlay`, :mod:`p2pcompute.tensors`,
:mod:`p2pcompute.wire`, :mod:`p2pcompute.errors`, torch and trio.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import torch
import trio
import trio.lowlevel

from p2pcompute.collective.matchcore import Candidate, Formed, MatchCore, NoGroup, SendHello, SendReady
from p2pcompute.collective.messages import (
    HELLO,
    HELLO_ACK,
    JOIN,
    JOIN_KIND,
    LEFT,
    MAX_REQUEST,
    PROTOCOL,
    READY,
    READY_ACK,
    STATUS,
    open_join,
)
from p2pcompute.collective.plan import Layout, layout_digest
from p2pcompute.collective.roundcore import (
    Action,
    AnnounceLeft,
    AttemptCore,
    Decided,
    Outcome,
    RoundCore,
    RoundOutcome,
    RoundStatus,
    SendAveragedPart,
    SendStatus,
    Status,
    StopTransfers,
    Timeouts,
)
from p2pcompute.errors import (
    ConfigError,
    IntegrityError,
    P2PComputeError,
    PeerGone,
    PeerTimeout,
    PeerUnreachable,
    ProtocolError,
    RemoteProtocolError,
)
from p2pcompute.overlay.streams import FramedStream
from p2pcompute.tensors import codecs
from p2pcompute.wire.signing import seal_signed

log = logging.getLogger(__name__)

CODECS = ("none", "fp16", "bf16", "int8")
_TRANSFER_ERRORS = (PeerGone, PeerTimeout, PeerUnreachable, ProtocolError)
_MAX_BUFFERED_ADVERTS = 4096
_MAX_REMEMBERED = 512
_MAX_ADVERT_TTL = 300.0
_ROUNDTRIP_CHUNK = 1 << 20  # elements; a multiple of the int8 block
_OFFLOAD_BYTES = 1 << 20  # tensor work on at least this many bytes runs in a worker thread
_PROGRESS_EVERY = 0.2  # seconds between progress reports from a contribution's worker thread
_OPEN_TRIES = 3  # a control stream that would not open is tried this often while connected
_READY_GRACE = 1.0  # at most this long a formed peer waits for its readies in flight
_STATUS_FIRST = 1.0  # at most this long a failed attempt's transfers wait for its status to go out
_LINK_IDLE = 300.0  # a control link unused this long is closed and reopened on next use
_LINK_SERVE_IDLE = 900.0  # an inbound control link silent this long is reset


def _flat_dtype(tensors: Sequence[torch.Tensor]) -> tuple[torch.dtype, torch.device]:
    if not tensors:
        raise ConfigError("nothing to average: no tensors")
    dtype, device = tensors[0].dtype, tensors[0].device
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise ConfigError("average() takes torch tensors")
        if t.dtype != dtype or t.device != device:
            raise ConfigError("all tensors of one round must share dtype and device")
        if not t.is_contiguous():
            raise ConfigError("tensors must be contiguous (their memory receives the average)")
    if not dtype.is_floating_point:
        raise ConfigError(f"only floating tensors can be averaged, not {dtype}")
    return dtype, device


def tensors_layout(tensors: Sequence[torch.Tensor]) -> bytes:
    """The layout digest peers must share to average ``tensors`` together.

    Example::

        digest = tensors_layout(list(model.parameters()))
    """
    return layout_digest([tuple(t.shape) for t in tensors], [str(t.dtype) for t in tensors])


class _Match:
    """Drives one MatchCore: republishes our advert, sends hellos and readies, waits."""

    def __init__(self, coll: Collective, core: MatchCore, layout: bytes, advert: bytes, topic: str) -> None:
        self.coll = coll
        self.core = core
        self.layout = layout
        self.advert = advert
        self.topic = topic
        self._kick = trio.Event()
        self._pull_again_at: dict[str, float] = {}  # a failed pull is retried later, never given up
        self._readies = 0  # in flight
        self._readies_done = trio.Event()
        self._readies_done.set()
        self._pulling = 0

    def kick(self) -> None:
        self._kick.set()

    async def run(self) -> Formed | NoGroup:
        core = self.core
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._republish)
            while core.result is None:
                now = trio.current_time()
                for action in core.poll(now):
                    if isinstance(action, SendHello):
                        for peer in action.to:
                            nursery.start_soon(self._hello, peer, action)
                    elif isinstance(action, SendReady):
                        # a ready outlives the match: the others wait for it even once we have
                        # formed (see the end of this method)
                        background = self.coll._background or nursery
                        for peer in action.to:
                            self._readies += 1
                            self._readies_done = trio.Event()
                            background.start_soon(self._ready, peer, action.digest)
                if core.result is not None:
                    break
                deadline = core.next_deadline(now)
                with trio.move_on_at(deadline if deadline is not None else math.inf):
                    await self._kick.wait()
                self._kick = trio.Event()
            # Our readies should reach the others before our round starts: a peer that formed
            # and crashed at once would otherwise leave a member waiting for its ready, unformed.
            # But one to a peer that died hangs until hello_timeout, and a round started that
            # late gets us suspected: wait a little, then let them finish in the background.
            with trio.move_on_after(_READY_GRACE):
                await self._readies_done.wait()
            nursery.cancel_scope.cancel()  # hellos and pulls in flight are moot now
        assert core.result is not None
        return core.result

    async def _republish(self) -> None:
        """Gossip our advert, and pull: hand our view to a few known peers not yet in it.

        GossipSub only reaches peers in the topic's mesh, and a fresh topic's mesh takes a
        heartbeat or two (a bootstrap node does not even subscribe); the pull makes discovery
        independent of it: every answer carries the answering peer's view.
        """
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    await self.coll.node.publish(self.topic, self.advert)
                except Exception as exc:  # a publish with no mesh yet is retried next time
                    log.debug("collective: publish failed: %r", exc)
                now = trio.current_time()
                later = {p for p, t in self._pull_again_at.items() if t > now}
                known = set(self.core.candidates) | self.core.excluded | later
                try:
                    records = self.coll.node.peers.alive()
                except Exception:  # an overlay without a table: gossip only
                    records = []
                unknown = [r.peer_id for r in records if r.peer_id not in known]
                if not self._pulling:  # one batch in flight: never pile work on a slow overlay
                    for peer in random.sample(unknown, min(self.coll.pull_fanout, len(unknown))):
                        self._pulling += 1
                        nursery.start_soon(self._pull, peer)
                await trio.sleep(self.coll.republish_interval)

    async def _pull(self, peer: str) -> None:
        try:
            await self._pull_one(peer)
        finally:
            self._pulling -= 1

    async def _pull_one(self, peer: str) -> None:
        core = self.core
        msg = HELLO.build(
            run=core.run, round=core.round_key, digest="", seq=0, members=[],
            adverts=core.adverts(trio.current_time()),
        )
        try:
            ack = await self.coll._request(peer, msg, HELLO_ACK, self.coll.hello_timeout)
        except (P2PComputeError, trio.TooSlowError) as exc:
            log.debug("collective: pull from %s failed: %r", peer, exc)
            # not reachable, slow, or not speaking the protocol (a bootstrap node): back off
            self._pull_again_at[peer] = trio.current_time() + 4 * self.coll.republish_interval
            return
        self.coll._absorb_many(ack["adverts"], via=peer)
        if ack["state"] == "ok" and ack["digest"]:
            core.on_vote(peer, ack["digest"], ack["seq"], trio.current_time())
        self.kick()

    async def _hello(self, peer: str, action: SendHello) -> None:
        core = self.core
        msg = HELLO.build(
            run=core.run,
            round=core.round_key,
            digest=action.digest,
            seq=action.seq,
            members=list(action.members),
            adverts=core.adverts(trio.current_time()),
        )
        try:
            ack = await self.coll._request(peer, msg, HELLO_ACK, self.coll.hello_timeout)
        except (P2PComputeError, trio.TooSlowError) as exc:
            log.info("collective: hello to %s failed: %r", peer, exc)
            core.exclude(peer, trio.current_time())
            self.kick()
            return
        self.coll._absorb_many(ack["adverts"], via=peer)
        now = trio.current_time()
        if ack["state"] == "busy":
            core.exclude(peer, now)
        elif ack["state"] == "ok":
            core.on_vote(peer, ack["digest"], ack["seq"], now)
        self.kick()

    async def _ready(self, peer: str, digest: str) -> None:
        try:
            await self._ready_one(peer, digest)
        finally:
            self._readies -= 1
            if not self._readies:
                self._readies_done.set()

    async def _ready_one(self, peer: str, digest: str) -> None:
        core = self.core
        msg = READY.build(run=core.run, round=core.round_key, digest=digest)
        try:
            ack = await self.coll._request(peer, msg, READY_ACK, self.coll.hello_timeout)
        except (P2PComputeError, trio.TooSlowError) as exc:
            log.info("collective: ready to %s failed: %r", peer, exc)
            return  # our lock times out and drops it
        if not ack["ok"]:
            core.on_ready_refused(peer, trio.current_time())
        elif ack["committed"]:
            core.on_ready_confirmed(peer, digest, trio.current_time())
        self.kick()


class _Round:
    """Drives one RoundCore over the lane: the attempts of one all-reduce."""

    def __init__(
        self,
        coll: Collective,
        round_id: str,
        rc: RoundCore,
        tensors: Sequence[torch.Tensor],
        codec: str,
    ) -> None:
        self.coll = coll
        self.lane = coll.lane
        self.round_id = round_id
        self.rc = rc
        self.codec = codec
        self.tensors = list(tensors)
        self.dtype, self.device = _flat_dtype(self.tensors)
        self.layout = Layout(tuple(t.numel() for t in self.tensors))
        self.views = [t.view(-1) for t in self.tensors]
        # the pristine input: every attempt starts from it; a failed round restores it. The
        # buffers come from the collective's scratch: fresh pages cost more than the copy
        # (a 256 MB buffer per round was 14% of all CPU time in the 4-peer benchmark)
        self._flat_base = coll._take_scratch("flat", self.layout.total, self.dtype, self.device)
        self.flat = self._flat_base[: self.layout.total]
        self._acc_base: torch.Tensor | None = None
        self.att: AttemptCore | None = None
        self.acc = self.flat[:0]
        self._acc_lock = threading.Lock()
        self._decided = trio.Event()
        self._outcome: Outcome | None = None
        self._kick = trio.Event()
        self._control: trio.Nursery | None = None
        self._transfers: trio.Nursery | None = None
        self._stop = trio.CancelScope()

    # -- control messages
    def on_status(self, peer: str, msg: dict[str, Any]) -> None:
        status = Status(msg["ok"], frozenset(msg["suspects"]), frozenset(msg["blamed"]), msg["leaving"])
        log.debug("collective %s: status from %s for attempt %s: %s",
                  self.round_id, peer, msg["attempt"], status)
        self._apply(self.rc.on_status(msg["attempt"], msg["digest"], peer, status, trio.current_time()))

    def on_left(self, peer: str) -> None:
        self._apply(self.rc.on_left(peer, trio.current_time()))

    def _status_bytes(self, action: SendStatus) -> bytes:
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
        told: trio.Event | None = None
        for action in actions:
            if isinstance(action, SendStatus | AnnounceLeft):
                data = (
                    self._status_bytes(action)
                    if isinstance(action, SendStatus)
                    else LEFT.build(round=self.round_id)
                )
                if self._control is not None:
                    told = trio.Event()
                    self._control.start_soon(self._broadcast, att.others, data, told)
            elif isinstance(action, SendAveragedPart):
                log.debug("collective %s: attempt %d: our part is reduced", self.round_id, self.rc.attempts)
                if self._transfers is not None:
                    self._transfers.start_soon(self._finalize_part, att)
            elif isinstance(action, StopTransfers):
                if told is not None and self._control is not None:
                    # our status must reach the partners before the resets of our streams do:
                    # a partner that sees only the reset suspects us, and may drop us
                    self._control.start_soon(self._stop_after, self._stop, told)
                else:
                    self._stop.cancel()
            elif isinstance(action, Decided):
                log.debug("collective %s: attempt %d decided: %s",
                          self.round_id, self.rc.attempts, action.outcome)
                self._outcome = action.outcome
                self._decided.set()
        if kick:
            self._kick.set()

    async def _broadcast(self, peers: Sequence[str], data: bytes, done: trio.Event) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    nursery.start_soon(self.coll._tell, peer, data)
        finally:
            done.set()

    async def _stop_after(self, stop: trio.CancelScope, told: trio.Event) -> None:
        with trio.move_on_after(_STATUS_FIRST):
            await told.wait()
        stop.cancel()

    # -- the round
    async def run(self) -> RoundOutcome:
        try:
            return await self._run()
        finally:
            self.coll._give_scratch("flat", self._flat_base)
            if self._acc_base is not None:
                self.coll._give_scratch("acc", self._acc_base)

    async def _run(self) -> RoundOutcome:
        rc = self.rc
        try:
            await _offload(self.flat, self._snapshot)
            await self.coll._fault("snapshot")
            async with trio.open_nursery() as control:
                self._control = control
                att = rc.start_attempt(trio.current_time())
                while att is not None:
                    outcome = await self._attempt(att)
                    att = rc.finish_attempt(outcome, trio.current_time())
                self.att = None
        except BaseException:
            if rc.result is None and not self.coll._silent_exit:
                with trio.CancelScope(shield=True), trio.move_on_after(self.coll.leave_timeout):
                    await self._leave()
            self._restore()
            raise
        assert rc.result is not None
        if not rc.result.ok:
            self._restore()
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
                    data = (
                        self._status_bytes(action)
                        if isinstance(action, SendStatus)
                        else LEFT.build(round=self.round_id)
                    )
                    for peer in att.others:
                        nursery.start_soon(self.coll._tell, peer, data)
                    told = True
            if not told:
                # before our first attempt (still copying our input) or between two: no attempt
                # of ours to report on, so a round-level notice, or the others wait out a timeout
                data = LEFT.build(round=self.round_id)
                for peer in self.rc.members:
                    if peer != self.rc.me:
                        nursery.start_soon(self.coll._tell, peer, data)

    async def _attempt(self, att: AttemptCore) -> Outcome:
        self.att = att
        self._decided = trio.Event()
        self._outcome = None
        self._stop = trio.CancelScope()
        plan = att.plan
        start, end = plan.part_of(att.me)
        if self._acc_base is None or self._acc_base.numel() < end - start:
            self._acc_base = self.coll._take_scratch("acc", end - start, self.dtype, self.device)
        acc = self.acc = self._acc_base[: end - start]
        if att.me in plan.contributors:
            alpha = plan.weight_of(att.me) / plan.weight_total
            await _offload(acc, lambda: torch.mul(self.flat[start:end], alpha, out=acc))
        else:
            acc.zero_()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watchdog, att)
            self._transfers = await nursery.start(self._run_transfers, att)
            self._apply(self.rc.kickoff(trio.current_time()))
            await self._decided.wait()
            nursery.cancel_scope.cancel()
        self._transfers = None
        assert self._outcome is not None
        return self._outcome

    async def _run_transfers(self, att: AttemptCore, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        plan = att.plan
        me = att.me
        with self._stop:
            async with trio.open_nursery() as nursery:
                task_status.started(nursery)
                await self.coll._fault("round_start")
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
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                await self._kick.wait()
            self._kick = trio.Event()
            # no kick from here: the loop recomputes the deadline anyway, and a kick would wake
            # this loop at once, spinning it (it did: ~900 wakeups/s, half a core per peer)
            self._apply(att.poll(trio.current_time()), kick=False)

    def _tag(self, att: AttemptCore, kind: str) -> str:
        return f"{self.round_id}/{self.rc.attempts}/{att.plan.digest()}/{kind}"

    def _failed(self, att: AttemptCore, peer: str, exc: BaseException) -> None:
        blame = isinstance(exc, IntegrityError | RemoteProtocolError) and getattr(exc, "peer", None) == peer
        log.debug("collective %s: transfer with %s failed: %r", self.round_id, peer, exc)
        self._apply(att.peer_failed(peer, trio.current_time(), repr(exc), blame=blame))

    async def _send_contribution(self, att: AttemptCore, reducer: str) -> None:
        start, end = att.plan.part_of(reducer)
        await self.coll._fault("contribution_start")
        try:
            await self.lane.send(reducer, self._tag(att, "c"), {"x": self.flat[start:end]}, codec=self.codec)
        except _TRANSFER_ERRORS as exc:
            self._failed(att, reducer, exc)
            return
        await self.coll._fault("contribution_sent")

    async def _receive_contribution(self, att: AttemptCore, sender: str) -> None:
        plan = att.plan
        acc = self.acc
        lock = self._acc_lock
        alpha = plan.weight_of(sender) / plan.weight_total
        expected = acc.numel()
        got = 0
        reported = [time.monotonic()]
        token = trio.lowlevel.current_trio_token()

        def progress() -> None:
            att.progress(sender, trio.current_time())

        def add(name: str, first: int, values: torch.Tensor) -> None:
            # runs in the lane's worker thread, beside the other contributors' threads
            nonlocal got
            count = values.numel()
            if name != "x" or values.dtype != acc.dtype or first != got or got + count > expected:
                where = f"contribution shard {name!r} [{first}:+{count}]"
                raise IntegrityError(f"{where} out of place", peer=sender)
            values = values.to(acc.device, non_blocking=True)
            with lock:  # contributions land in one accumulator
                acc[first : first + count].add_(values, alpha=alpha)
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
        await self.coll._fault("reduce")
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
        for peer in att.others:
            assert self._transfers is not None
            self._transfers.start_soon(self._send_part, att, peer, shards)

    async def _send_part(self, att: AttemptCore, peer: str, shards: dict[str, torch.Tensor]) -> None:
        try:
            await self.lane.send(peer, self._tag(att, "p"), shards, codec=self.codec)
        except _TRANSFER_ERRORS as exc:
            self._failed(att, peer, exc)

    async def _receive_part(self, att: AttemptCore, reducer: str) -> None:
        start, end = att.plan.part_of(reducer)
        into = self._shards(start, end, None)
        try:
            got = await self.lane.receive(reducer, self._tag(att, "p"), into=into)
            if set(got) != set(into):
                raise IntegrityError("averaged part with the wrong shards", peer=reducer)
        except _TRANSFER_ERRORS as exc:
            self._failed(att, reducer, exc)
            return
        self._apply(att.averaged_part_done(reducer, trio.current_time()))


async def _offload(like: torch.Tensor, fn: Callable[[], Any]) -> None:
    """Run ``fn`` (bulk tensor work as large as ``like``) off the event loop when it is large.

    Not abandoned on cancellation: when this returns, ``fn`` has finished with its buffers.
    """
    if like.device.type == "cpu" and like.numel() * like.element_size() >= _OFFLOAD_BYTES:
        await trio.to_thread.run_sync(fn)
    else:
        fn()


def _roundtrip(codec: str, values: torch.Tensor) -> None:
    """Replace ``values`` by what a receiver decodes from it under ``codec`` (bounded scratch)."""
    for lo in range(0, values.numel(), _ROUNDTRIP_CHUNK):
        piece = values[lo : lo + _ROUNDTRIP_CHUNK]
        codecs.decode_into(codec, codecs.encode(codec, piece), piece)


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
        leave_timeout: float = 2.0,
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
        self._runs: set[str] = set()
        self._matches: dict[tuple[str, str], _Match] = {}
        self._finished: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
        self._adverts: collections.OrderedDict[tuple[str, str, str], tuple[Candidate, bytes]] = (
            collections.OrderedDict()
        )
        self._rounds: dict[str, _Round] = {}
        self._closed_rounds: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._early: collections.OrderedDict[str, list[tuple[str, dict[str, Any]]]] = (
            collections.OrderedDict()
        )
        self._links: dict[str, tuple[FramedStream, float]] = {}  # peer -> (control stream, last use)
        self._background: trio.Nursery | None = None  # owned by open_collective: readies in flight
        self._scratch: dict[str, torch.Tensor] = {}  # round buffers kept for the next round
        self._link_locks: dict[str, trio.Lock] = {}
        self._next_prune = 0.0  # trio time of the next sweep of idle links
        self._faults: dict[str, Callable[[], Awaitable[None]]] = {}  # test hooks
        self._silent_exit = False  # test hooks: a "crashed" peer says nothing on its way out,
        self._muted = False  # and a "hung" one neither answers nor tells anything
        self.stats: collections.Counter[str] = collections.Counter()

    def _take_scratch(self, kind: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A buffer of at least ``n`` elements: the one the last round gave back, or a new one."""
        buf = self._scratch.pop(kind, None)
        if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=device)
        return buf

    def _give_scratch(self, kind: str, buf: torch.Tensor) -> None:
        self._scratch[kind] = buf  # one per kind: a round's worth (its tensors' size, plus a part)

    def release_buffers(self) -> None:
        """Free the scratch buffers kept between rounds (about the averaged tensors' size).

        Every round needs a pristine copy of its tensors and an accumulator for its part;
        they are kept for the next round because fresh pages cost more than the copy.

        Example::

            await coll.average("run", "step-9", params)
            coll.release_buffers()   # training is over; give the memory back
        """
        self._scratch.clear()

    def statistics(self) -> dict[str, int]:
        """Counters: rejected adverts and messages, rounds averaged and failed, ..."""
        return dict(self.stats)

    async def _fault(self, point: str) -> None:
        hook = self._faults.get(point)
        if hook is not None:
            await hook()

    # -- transport helpers
    async def _request(self, peer: str, data: bytes, answer: Any, timeout: float) -> dict[str, Any]:
        with trio.fail_after(timeout):
            stream = await self._open(peer, timeout)
            try:
                await stream.send_frame(data)
                reply: dict[str, Any] = await stream.recv_msg(answer)
                return reply
            finally:
                await stream.close()

    async def _open(self, peer: str, timeout: float) -> FramedStream:
        """A stream to ``peer``; one that would not open is retried while the peer stays connected."""
        for attempt in range(_OPEN_TRIES):
            try:
                stream: FramedStream = await self.node.open_stream(
                    peer, PROTOCOL, timeout=timeout, max_frame=MAX_REQUEST
                )
                return stream
            except PeerUnreachable:
                if attempt == _OPEN_TRIES - 1 or peer not in self.node.connected_peers():
                    raise
                await trio.sleep(0.05 * 4**attempt)
        raise AssertionError("unreachable")

    async def _tell(self, peer: str, data: bytes) -> None:
        """One-way control message (a status, a leave) to ``peer``, in order, best effort.

        Messages to one peer share one long-lived stream (opening a libp2p stream costs several
        round trips of multistream-select; a status must beat the stream resets that follow
        it). A stale link is replaced by a fresh one, and a stream that would not open while the
        peer stays connected (py-libp2p refuses one now and then under load) is retried; a
        message that still cannot go is counted and logged, never raised: the round's timeouts
        cover a partner we cannot reach.
        """
        if self._muted:
            return
        self._prune_links()
        lock = self._link_locks.setdefault(peer, trio.Lock())
        try:
            with trio.fail_after(self.hello_timeout):
                async with lock:
                    for _ in range(2):  # a kept link that broke: once more on a fresh one
                        link = self._links.get(peer)
                        now = trio.current_time()
                        if link is not None and now - link[1] > _LINK_IDLE:
                            self._links.pop(peer, None)
                            await link[0].close()
                            link = None
                        fresh = link is None
                        if link is None:
                            link = (await self._open(peer, self.hello_timeout), now)
                        try:
                            await link[0].send_frame(data)
                        except PeerGone:
                            self._links.pop(peer, None)
                            await link[0].reset()
                            if fresh:
                                raise
                            continue
                        self._links[peer] = (link[0], now)
                        log.debug("collective: told %s (fresh link: %s) in %.3f s", peer, fresh,
                                  trio.current_time() - now)
                        return
        except (P2PComputeError, trio.TooSlowError) as exc:
            self.stats["tell_failures"] += 1
            log.info("collective: message to %s not delivered: %r", peer, exc)

    def _prune_links(self) -> None:
        """Close control links idle past ``_LINK_IDLE`` and forget their locks (peers come and go:
        a link to one that left would otherwise stay open for the node's life)."""
        now = trio.current_time()
        if now < self._next_prune:
            return
        self._next_prune = now + _LINK_IDLE / 4
        for peer, (stream, last) in list(self._links.items()):
            lock = self._link_locks.get(peer)
            if now - last > _LINK_IDLE and (lock is None or not lock.locked()):
                del self._links[peer]
                if self._background is not None:
                    self._background.start_soon(stream.close)
        for peer, lock in list(self._link_locks.items()):
            if peer not in self._links and not lock.locked() and not lock.statistics().tasks_waiting:
                del self._link_locks[peer]

    async def _close_links(self) -> None:
        links, self._links = self._links, {}
        for stream, _ in links.values():
            await stream.close()

    # -- inbound
    async def _serve(self, stream: FramedStream) -> None:
        peer = stream.peer
        assert peer is not None
        if self._muted:
            await trio.sleep_forever()
        raw = await stream.recv_msg(max_size=MAX_REQUEST)
        kind = raw.get("t") if isinstance(raw, dict) else None
        if kind == HELLO.type:
            msg = HELLO.validate(raw, peer=peer)
            self._absorb_many(msg["adverts"], via=peer)
            match = self._matches.get((msg["run"], msg["round"]))
            if match is not None:
                if msg["digest"]:  # an empty digest is a pull, not a vote
                    match.core.on_vote(peer, msg["digest"], msg["seq"], trio.current_time())
                core = match.core
                reply = HELLO_ACK.build(
                    state=core.answer_state(),
                    digest=core.digest,
                    seq=core.seq,
                    adverts=core.adverts(trio.current_time()),
                )
                match.kick()
            else:
                state = "busy" if (msg["run"], msg["round"]) in self._finished else "idle"
                reply = HELLO_ACK.build(state=state, digest="", seq=0, adverts=[])
            await stream.send_frame(reply)
        elif kind == READY.type:
            msg = READY.validate(raw, peer=peer)
            match = self._matches.get((msg["run"], msg["round"]))
            if match is not None:
                ok = match.core.on_ready(peer, msg["digest"], trio.current_time())
                committed = ok and match.core.committed(msg["digest"])
                match.kick()
            else:
                ok = committed = self._finished.get((msg["run"], msg["round"])) == msg["digest"]
            await stream.send_frame(READY_ACK.build(ok=ok, committed=committed))
        elif kind in (STATUS.type, LEFT.type):
            # a control link: one-way messages until the sender closes it
            while True:
                if kind not in (STATUS.type, LEFT.type):
                    self.stats["bad_messages"] += 1
                    raise RemoteProtocolError(f"unexpected {kind!r} on a control link", peer=peer)
                if self._muted:
                    await trio.sleep_forever()
                msg = (STATUS if kind == STATUS.type else LEFT).validate(raw, peer=peer)
                self._route(msg["round"], peer, msg)
                try:
                    with trio.fail_after(_LINK_SERVE_IDLE):
                        raw = await stream.recv_msg(max_size=MAX_REQUEST)
                except PeerGone:
                    return  # closed (or gone): the sender reopens when it has more to say
                except trio.TooSlowError:
                    await stream.reset()
                    return
                kind = raw.get("t") if isinstance(raw, dict) else None
        else:
            self.stats["bad_messages"] += 1
            raise RemoteProtocolError(f"unknown collective message {kind!r}", peer=peer)

    def _route(self, round_id: str, peer: str, msg: dict[str, Any]) -> None:
        rnd = self._rounds.get(round_id)
        if rnd is not None:
            if msg["t"] == STATUS.type:
                rnd.on_status(peer, msg)
            else:
                rnd.on_left(peer)
            return
        if round_id in self._closed_rounds:
            return
        # the round has not started here yet (the others formed and began a moment earlier)
        early = self._early.setdefault(round_id, [])
        if len(early) < 4 * 64:
            early.append((peer, msg))
        while len(self._early) > 64:
            self._early.popitem(last=False)

    async def _on_join(self, sender: str, data: bytes) -> None:
        self._absorb(data, via=sender)

    def _absorb_many(self, adverts: list[bytes], *, via: str) -> None:
        for raw in adverts:
            self._absorb(raw, via=via)

    def _absorb(self, raw: bytes, *, via: str) -> None:
        try:
            body = open_join(raw, via=via)
        except ProtocolError as exc:
            self.stats["rejected_adverts"] += 1
            log.info("collective: advert via %s rejected: %s", via, exc)
            return
        peer = body["peer"]
        if peer == self.peer_id:
            return
        now = trio.current_time()
        left = min(body["expires"] - time.time(), _MAX_ADVERT_TTL)
        if left <= 0:
            self.stats["stale_adverts"] += 1
            return
        cand = Candidate(peer, body["weight"], body["bandwidth"], now + left, bytes(raw))
        key = (body["run"], body["round"], peer)
        self._adverts[key] = (cand, body["layout"])
        self._adverts.move_to_end(key)
        while len(self._adverts) > _MAX_BUFFERED_ADVERTS:
            self._adverts.popitem(last=False)
        match = self._matches.get((body["run"], body["round"]))
        if match is not None and body["layout"] == match.layout and match.core.add_candidate(cand, now):
            match.kick()

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
    ) -> Formed | NoGroup:
        """Find peers averaging ``layout`` under ``run`` in round ``round_key``; never waits past ``timeout``.

        Returns :class:`Formed` (members in averaging order) or :class:`NoGroup`.

        Example::

            group = await coll.form_group("run", "step-3", layout=tensors_layout(params))
        """
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError("weight must be finite and >= 0")
        if len(layout) != 32:
            raise ConfigError("layout must be a 32-byte digest (see tensors_layout)")
        key = (run, round_key)
        if key in self._matches:
            raise ConfigError(f"already matching for {run!r} round {round_key!r}")
        topic = f"collective/{run}"
        if run not in self._runs:
            self.node.subscribe(topic, self._on_join)
            self._runs.add(run)
        now = trio.current_time()
        expires_unix = time.time() + timeout + 5.0
        body = JOIN.build(
            run=run,
            round=round_key,
            peer=self.peer_id,
            weight=float(weight),
            bandwidth=self.bandwidth,
            layout=layout,
            expires=expires_unix,
            addrs=list(self.node.addrs[:8]),
        )
        advert = seal_signed(JOIN_KIND, body, self.node.identity)
        me = Candidate(self.peer_id, float(weight), self.bandwidth, now + timeout + 5.0, advert)
        core = MatchCore(
            me,
            run=run,
            round_key=round_key,
            target=target,
            min_size=min_size,
            now=now,
            deadline=now + timeout,
            settle=self.settle,
            patience=patience,
            hello_timeout=self.hello_timeout,
        )
        for (r, k, _), (cand, lay) in list(self._adverts.items()):
            if r == run and k == round_key and lay == layout:
                core.add_candidate(cand, now)
        match = _Match(self, core, layout, advert, topic)
        self._matches[key] = match
        try:
            result = await match.run()
        finally:
            del self._matches[key]
            self._finished[key] = core.digest if core.result is not None else ""
            while len(self._finished) > _MAX_REMEMBERED:
                self._finished.popitem(last=False)
        self.stats["groups_formed" if isinstance(result, Formed) else "no_group"] += 1
        return result

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
    ) -> RoundOutcome:
        """Average ``tensors`` in place with ``group`` (weights and bandwidths from its adverts).

        On success every element is the exact weighted average over ``result.participants``
        (up to the codec's documented bound); otherwise ``tensors`` are left unchanged.

        Example::

            result = await coll.all_reduce(group, "run", "step-3", params, codec="bf16")
        """
        if codec not in CODECS:
            raise ConfigError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")
        members = [c.peer_id for c in group.members]
        round_id = f"{run}|{round_key}|{group.digest}"
        if round_id in self._rounds:
            raise ConfigError(f"round {round_id!r} is already running")
        rc = RoundCore(
            self.peer_id,
            members,
            [c.weight for c in group.members],
            [c.bandwidth for c in group.members],
            total=sum(t.numel() for t in tensors),
            min_size=min_size,
            max_attempts=max_attempts,
            timeouts=self.timeouts,
        )
        rnd = _Round(self, round_id, rc, tensors, codec)
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

    async def _replay_early(self, round_id: str, rnd: _Round) -> None:
        await trio.lowlevel.checkpoint()  # after the first attempt started
        for peer, msg in self._early.pop(round_id, []):
            if msg["t"] == STATUS.type:
                rnd.on_status(peer, msg)
            else:
                rnd.on_left(peer)

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
    ) -> RoundOutcome:
        """Form a group under ``run`` for ``round_key`` and average ``tensors`` in place with it.

        Returns a :class:`RoundOutcome`: ``AVERAGED`` (exact weighted average over
        ``participants``), ``FAILED`` or ``NO_GROUP`` (tensors untouched in both).

        Example::

            result = await coll.average("run", "step-3", list(model.parameters()), weight=1024)
        """
        _flat_dtype(tensors)
        if codec not in CODECS:
            raise ConfigError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")
        group = await self.form_group(
            run,
            round_key,
            layout=tensors_layout(tensors),
            weight=weight,
            target=target,
            min_size=min_size,
            timeout=matchmaking_timeout,
            patience=patience,
        )
        if isinstance(group, NoGroup):
            return RoundOutcome(RoundStatus.NO_GROUP, reason=group.reason)
        return await self.all_reduce(
            group, run, round_key, tensors, codec=codec, min_size=min_size, max_attempts=max_attempts
        )


@asynccontextmanager
async def open_collective(node: Any, lane: Any, **options: Any) -> AsyncIterator[Collective]:
    """Serve the collective protocol on ``node`` (data over ``lane``) for the ``async with`` block.

    Options: ``bandwidth`` (our share of reduction work, relative to the others'; 0 = only
    contribute and receive), ``timeouts`` (:class:`Timeouts`), ``settle``, ``hello_timeout``,
    ``republish_interval``, ``leave_timeout``.

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
        with trio.CancelScope(shield=True), trio.move_on_after(2.0):
            await coll._close_links()


__all__ = ["CODECS", "Collective", "open_collective", "tensors_layout"]
