"""The requester half of the task service: one :class:`RequesterJob` per ``map_tasks`` call.

A job drives a :class:`~p2pcompute.tasks.negotiation.RequesterCore`: it publishes the
core's requests, opens a lease stream per accepted offer, sends inputs, checks results
and countersigns receipts. Its clock sleeps until the core's next deadline or an event;
its own tick never wakes it.

Imports the negotiation cores, messages, registry, receipts, :mod:`p2pcompute.tasks.frames`,
:mod:`p2pcompute.deadlines`, errors; the overlay and the tensor lane as types only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import torch
import trio
import trio.lowlevel

from p2pcompute.deadlines import give_up_after
from p2pcompute.errors import (
    IntegrityError,
    MalformedMessage,
    P2PComputeError,
    PeerGone,
    RemoteProtocolError,
)
from p2pcompute.tasks import negotiation as core
from p2pcompute.tasks.frames import (
    EMPTY_DIGEST,
    LEASE_MAX_FRAME,
    inline_frame,
    nbytes,
    need_lane,
    recv_tensors,
    send_tensors,
)
from p2pcompute.tasks.messages import (
    ACCEPT,
    CANCEL,
    HEARTBEAT,
    MAX_PARAMS,
    RECEIPT_MSG,
    TENSORS_HEADER,
    Offer,
    Resources,
    TaskRequest,
    parse_lease_message,
    reason_text,
    seal_request,
)
from p2pcompute.tasks.provider_core import EXPIRED_OFFER
from p2pcompute.tasks.receipts import Receipt, countersign, params_digest, tensor_digest
from p2pcompute.tasks.registry import check_params
from p2pcompute.tasks.sessions import SessionPool
from p2pcompute.wire.codec import decode
from p2pcompute.wire.signing import Signer

if TYPE_CHECKING:
    from p2pcompute.overlay import FramedStream
    from p2pcompute.tensors import TensorLane

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], Any]
_FROM_PROVIDER = frozenset({"task-grant", "task-reject", "task-heartbeat", "task-result", "task-error"})


@dataclass(frozen=True)
class TaskResult:
    """One finished task: outputs, the provider's info dict, who ran it and the dual-signed receipt."""

    outputs: dict[str, torch.Tensor]
    info: dict[str, Any]
    provider: str
    receipt: Receipt
    lease_seconds: float = 0.0  # from the job's first request to the grant of this lease
    seconds: float = 0.0  # from the job's first request to this result


@dataclass
class JobItem:
    """One item of a job, ready to send: tensors, encoded params, digest and size of the inputs."""

    tensors: Mapping[str, torch.Tensor]
    params_bytes: bytes
    input_digest: bytes
    input_bytes: int


def prepare_items(items: Sequence[tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]]) -> list[JobItem]:
    """Encode and digest ``(tensors, params)`` pairs (:class:`LocalProtocolError` for bad params).

    Example::

        (item,) = prepare_items([({"a": a, "b": b}, {})])
    """
    return [
        JobItem(
            tensors, check_params(params), tensor_digest(tensors), sum(nbytes(t) for t in tensors.values())
        )
        for tensors, params in items
    ]


class Network(Protocol):
    """What a job needs of the node: publish a request, open a lease stream."""

    async def publish(self, topic: str, data: bytes) -> None: ...

    async def open_stream(
        self, peer_id: str, protocol: str, *, timeout: float = ..., max_frame: int = ...
    ) -> FramedStream: ...


@dataclass(frozen=True)
class RequesterContext:
    """What every job of one requester shares.

    ``routes`` maps request ids to the job that published them (offers are routed by it);
    ``bump(stat)`` counts an event; ``record(receipt, role)`` appends to the ledger;
    ``blame(peer, reason)`` reports a provider's protocol offence on a lease stream we opened
    (no stream handler of ours sees those).

    Example::

        ctx = RequesterContext(node, node.identity, lane, routes, topic=TOPIC,
                               lease_protocol=LEASE_PROTOCOL, bump=stats.bump, record=append)
    """

    net: Network
    signer: Signer
    lane: TensorLane | None
    routes: dict[bytes, RequesterJob]
    topic: str
    lease_protocol: str
    bump: Callable[[str], None]
    record: Callable[[Receipt, str], Awaitable[None]]
    blame: Callable[[str, str], None] = lambda peer, reason: None
    sessions: SessionPool | None = None  # open sessions to lease on (None: one stream per lease)


@dataclass
class _LeaseIO:
    stream: FramedStream | None = None
    via_lane: bool = False
    granted_at: float = 0.0
    session: float = 0.0  # idle seconds the provider granted to the session (0: none)
    lent: bool = False  # counted by the session pool
    heard: bool = False  # the provider answered on this stream
    settled: bool = False  # the receipt went out: the stream may carry the session's next lease
    handed_back: bool = False  # the stream went back to its session's pool
    inline: bytes = b""  # the inputs, when they went inside the accept
    lock: trio.Lock = field(default_factory=trio.Lock)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


#: ``check(outputs, info, provider)``: raise :class:`~p2pcompute.errors.RemoteProtocolError`
#: (e.g. :class:`~p2pcompute.errors.WorkRejected`) to refuse a result before its receipt is signed.
CheckFn: TypeAlias = Callable[[dict[str, torch.Tensor], dict[str, Any], str], Awaitable[None]]


class RequesterJob:
    """The trio side of one :class:`~p2pcompute.tasks.negotiation.RequesterCore`.

    Example::

        job = RequesterJob(ctx, RequesterCore(me, spec), prepare_items(items), 1 << 30, None)
        results = await job.run()    # TaskResult or a failure reason per item
    """

    def __init__(
        self,
        ctx: RequesterContext,
        requester: core.RequesterCore,
        items: list[JobItem],
        max_output_bytes: int,
        progress: ProgressFn | None,
        check: CheckFn | None = None,
        session: float = 0.0,
    ) -> None:
        self.ctx = ctx
        self.session = session if ctx.sessions is not None else 0.0
        self.check = check
        self.core = requester
        self.items = items
        self.max_output_bytes = max_output_bytes
        self.progress = progress
        self.results: list[TaskResult | str | None] = [None] * len(items)
        self.pending_results: dict[bytes, TaskResult] = {}
        self.leases: dict[bytes, _LeaseIO] = {}
        self.wake = trio.Event()
        self.nursery: trio.Nursery | None = None
        self.finished = 0
        self.in_flight = 0  # receipts being delivered and recorded
        self.t0 = 0.0

    async def run(self) -> list[TaskResult | str | None]:
        """Run the job to its end; per item a :class:`TaskResult` or the reason it failed."""
        routes = self.ctx.routes
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                self.t0 = trio.current_time()
                pool = self.ctx.sessions
                seeds = pool.offers(self.t0) if pool is not None and self.session > 0 else []
                self.do(self.core.start(self.t0, sessions=seeds))
                while not self.core.done or self.in_flight:
                    deadline = self.core.next_deadline()
                    with trio.move_on_at(math.inf if deadline is None else deadline):
                        await self.wake.wait()
                    self.wake = trio.Event()
                    # the clock's own tick must not wake the clock: it would never sleep
                    self.do(self.core.tick(trio.current_time()), wake=False)
            finally:
                for rid in [rid for rid, job in routes.items() if job is self]:
                    del routes[rid]
                if not self.core.done:
                    self.do(self.core.cancel(trio.current_time()))
                nursery.cancel_scope.cancel()
        return self.results

    def on_offer(self, offer: Offer) -> None:
        """A verified offer for one of this job's requests."""
        self.do(self.core.handle_offer(offer, trio.current_time()))

    def do(self, actions: list[core.Action], *, wake: bool = True) -> None:
        """Perform the core's ``actions``; ``wake`` the job's clock unless the clock is the caller."""
        assert self.nursery is not None
        for a in actions:
            if isinstance(a, core.Publish):
                request = core.with_issued(a.request, time.time())
                self.ctx.routes[request.request_id] = self
                self.nursery.start_soon(self._publish, request)
            elif isinstance(a, core.SendAccept):
                io = _LeaseIO()
                self.leases[a.lease_id] = io
                self.nursery.start_soon(self._lease, a, io)
            elif isinstance(a, core.SendHeartbeat):
                self.nursery.start_soon(
                    self._send, a.lease_id, HEARTBEAT.build(lease_id=a.lease_id, seq=a.seq)
                )
            elif isinstance(a, core.SendCancel):
                msg = CANCEL.build(lease_id=a.lease_id, reason=reason_text(a.reason))
                self.nursery.start_soon(self._send, a.lease_id, msg)
            elif isinstance(a, core.SendInputs):
                self.nursery.start_soon(self._send_inputs, a)
            elif isinstance(a, core.CloseLease):
                closing = self.leases.get(a.lease_id)
                if closing is not None:
                    # let a queued cancel go out first, then drop the stream
                    self.nursery.start_soon(self._close_later, a.lease_id, closing)
            elif isinstance(a, core.ItemDone):
                self.results[a.item] = self.pending_results.pop(a.lease_id)
                self._progress()
            elif isinstance(a, core.ItemFailed):
                self.results[a.item] = a.reason
                self._progress()
        if wake:
            self.wake.set()

    def _progress(self) -> None:
        self.finished += 1
        if self.progress is not None:
            try:
                self.progress(self.finished, len(self.items))
            except Exception:
                log.exception("progress callback failed")

    async def _publish(self, request: TaskRequest) -> None:
        try:
            await self.ctx.net.publish(self.ctx.topic, seal_request(request, self.ctx.signer))
        except P2PComputeError as exc:
            log.info("publishing a task request failed: %s", exc)

    async def _close_later(self, lease_id: bytes, io: _LeaseIO) -> None:
        await trio.lowlevel.checkpoint()
        with give_up_after(2):
            async with io.lock:
                pass
        if self.leases.get(lease_id) is io:
            del self.leases[lease_id]
        io.scope.cancel()

    async def _send(self, lease_id: bytes, frame: bytes) -> None:
        """Send on the lease's stream if it still has one (closing the stream also ends the lease)."""
        io = self.leases.get(lease_id)
        if io is None or io.stream is None:
            return
        stream = io.stream
        with contextlib.suppress(P2PComputeError), give_up_after(10):
            async with io.lock:
                if io.stream is stream:  # (a session's stream may have moved on to its next lease)
                    await stream.send_frame(frame)

    def _lost(self, lease_id: bytes, reason: str) -> None:
        if lease_id in self.leases:
            self.do(self.core.lease_lost(lease_id, reason, trio.current_time()))

    async def _lease(self, accept: core.SendAccept, io: _LeaseIO) -> None:
        """One lease: on an open session's idle stream if there is one, else on a new stream.

        A reused stream that turns out dead before the provider said anything (it closed the
        idle session meanwhile) costs no attempt: the accept is sent again on a new stream.
        A lease that settles cleanly with a session granted hands its stream back to the pool.
        """
        lease_id, offer = accept.lease_id, accept.offer
        pool = self.ctx.sessions if self.session > 0 else None
        reused, io.lent = pool.take(offer.offer_id) if pool is not None else (None, False)
        accept_frame = self._accept_frame(accept, io)
        try:
            with io.scope:
                for stream in (reused, None) if reused is not None else (None,):
                    if stream is None:
                        try:
                            stream = await self.ctx.net.open_stream(
                                accept.to,
                                self.ctx.lease_protocol,
                                timeout=self.core.spec.accept_timeout,
                                max_frame=LEASE_MAX_FRAME,
                            )
                        except P2PComputeError as exc:  # PeerUnreachable, PeerTimeout, PeerGone ...
                            self._lost(lease_id, f"cannot reach provider: {exc}")
                            return
                    io.stream = stream
                    try:
                        async with io.lock:
                            await stream.send_frame(accept_frame)
                        await self._read_lease(stream, accept, io)
                        break
                    except (PeerGone, RemoteProtocolError) as exc:
                        if stream is reused and not io.heard and isinstance(exc, PeerGone):
                            if pool is not None:
                                pool.drop(offer.offer_id)
                            io.stream = None
                            await self._close(stream)
                            continue  # the idle session had lapsed: a new stream
                        if isinstance(exc, RemoteProtocolError):
                            self.ctx.blame(accept.to, f"bad lease message: {exc}")
                        self._lost(lease_id, f"lease stream failed: {exc}")
                        break
        finally:
            stream, io.stream = io.stream, None  # late heartbeats of this lease go nowhere
            if io.handed_back:
                pass
            elif pool is not None and stream is not None and io.settled and io.session > 0:
                pool.give_back(offer, stream, io.session, trio.current_time(), lent=io.lent)
            else:
                if pool is not None:
                    pool.returned(offer.offer_id, lent=io.lent)
                if stream is not None:
                    await self._close(stream)

    def _hand_back(self, accept: core.SendAccept, io: _LeaseIO) -> None:
        """Give a settled lease's stream to its session now (synchronous: no frame can slip in)."""
        pool = self.ctx.sessions if self.session > 0 else None
        if pool is None or not io.settled or io.session <= 0 or io.stream is None:
            return
        stream, io.stream = io.stream, None  # late heartbeats of this lease go nowhere
        pool.give_back(accept.offer, stream, io.session, trio.current_time(), lent=io.lent)
        io.handed_back = True

    @staticmethod
    async def _close(stream: FramedStream) -> None:
        with trio.CancelScope(shield=True), give_up_after(1):
            await stream.close()

    def _accept_frame(self, accept: core.SendAccept, io: _LeaseIO) -> bytes:
        item = self.items[accept.item]
        # small inputs ride inside the accept (not on the lane: it is chosen at the grant)
        io.inline = b"" if self.ctx.lane is not None else inline_frame(item.tensors)
        return ACCEPT.build(
            lease_id=accept.lease_id,
            offer_id=accept.offer.offer_id,
            request_id=accept.offer.request_id,
            params=item.params_bytes,
            input_bytes=item.input_bytes,
            input_digest=item.input_digest,
            lane=self.ctx.lane is not None,
            session=float(self.session),
            inputs=io.inline,
        )

    async def _read_lease(self, stream: FramedStream, accept: core.SendAccept, io: _LeaseIO) -> None:
        lease_id, provider = accept.lease_id, accept.to
        while True:
            m = parse_lease_message(await stream.recv_frame(), peer=provider, allowed=_FROM_PROVIDER)
            if m["lease_id"] != lease_id:
                raise MalformedMessage("message for another lease on this stream", peer=provider)
            now = trio.current_time()
            kind = m["t"]
            io.heard = True
            if kind == "task-grant":
                io.via_lane = bool(m["lane"]) and self.ctx.lane is not None
                io.granted_at = now
                io.session = m["session"]
                self.do(self.core.handle_grant(provider, lease_id, now))
            elif kind == "task-reject":
                if self.ctx.sessions is not None and m["reason"] == EXPIRED_OFFER:
                    self.ctx.sessions.drop(accept.offer.offer_id)  # a session it no longer keeps
                self.do(self.core.handle_reject(provider, lease_id, m["reason"], now))
                return
            elif kind == "task-heartbeat":
                self.do(self.core.handle_heartbeat(provider, lease_id, now))
            elif kind == "task-error":
                self.do(self.core.handle_error(provider, lease_id, m["reason"], m["retryable"], now))
                return
            elif kind == "task-result":
                await self._take_result(stream, accept, io, m)
                return

    async def _receive_outputs(
        self, stream: FramedStream, accept: core.SendAccept, io: _LeaseIO, m: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        lease_id, provider = accept.lease_id, accept.to

        def touch() -> None:
            self.core.handle_heartbeat(provider, lease_id, trio.current_time())

        if m["output_bytes"] > self.max_output_bytes:
            raise IntegrityError(f"outputs of {m['output_bytes']} bytes over our cap", peer=provider)
        if m["output_digest"] == EMPTY_DIGEST:
            return {}
        if m["outputs"]:  # small outputs came inside the result
            return await recv_tensors(stream, m["outputs"], cap=m["output_bytes"], touch=touch)
        if not io.via_lane:
            header = await stream.recv_frame(TENSORS_HEADER.max_size)
            return await recv_tensors(stream, header, cap=m["output_bytes"], touch=touch)
        async with trio.open_nursery() as keepalive:

            async def beat() -> None:
                while True:  # the lane gives no progress events: keep the lease alive meanwhile
                    touch()
                    await trio.sleep(1.0)

            keepalive.start_soon(beat)
            outputs = await need_lane(self.ctx.lane).receive(
                provider, f"task/{lease_id.hex()}/out", timeout=600
            )
            keepalive.cancel_scope.cancel()
        return outputs

    async def _take_result(
        self, stream: FramedStream, accept: core.SendAccept, io: _LeaseIO, m: dict[str, Any]
    ) -> None:
        lease_id, provider = accept.lease_id, accept.to
        item = self.items[accept.item]
        try:
            outputs = await self._receive_outputs(stream, accept, io, m)
            digest = tensor_digest(outputs)
            if digest != m["output_digest"]:
                raise IntegrityError("outputs do not match their digest", peer=provider)
            info = decode(m["info"], max_size=MAX_PARAMS, peer=provider)
            if not isinstance(info, dict):
                raise MalformedMessage("result info is not a map", peer=provider)
            if self.check is not None:  # before countersigning: refused work earns no receipt
                await self.check(outputs, info, provider)
            receipt = countersign(
                m["receipt_body"],
                m["provider_sig"],
                self.ctx.signer,
                expect={
                    "lease_id": lease_id,
                    "request_id": accept.offer.request_id,
                    "kind": accept.offer.kind,
                    "provider": provider,
                    "price": accept.offer.price,
                    "params_digest": params_digest(item.params_bytes),
                    "input_digest": item.input_digest,
                    "output_digest": digest,
                    "input_bytes": item.input_bytes,
                    "output_bytes": sum(nbytes(t) for t in outputs.values()),
                },
                peer=provider,
                wall=time.time(),
            )
        except (RemoteProtocolError, PeerGone) as exc:
            self.ctx.bump("bad_receipts")
            if isinstance(exc, RemoteProtocolError):
                self.ctx.blame(provider, f"bad result: {exc}")
            log.info("result of lease %s from %s refused: %s", lease_id.hex(), provider, exc)
            self.do(
                self.core.handle_error(provider, lease_id, f"bad result: {exc}", True, trio.current_time())
            )
            return
        now = trio.current_time()
        self.pending_results[lease_id] = TaskResult(
            outputs, info, provider, receipt, io.granted_at - self.t0, now - self.t0
        )
        actions = self.core.handle_result(provider, lease_id, now)
        if not any(isinstance(a, core.ItemDone) for a in actions):
            self.pending_results.pop(lease_id, None)
            return
        self.in_flight += 1
        try:
            with contextlib.suppress(P2PComputeError), give_up_after(10):
                async with io.lock:
                    await stream.send_frame(RECEIPT_MSG.build(lease_id=lease_id, receipt=receipt.encode()))
                    io.settled = True
            # the stream goes back to its session *before* the item's next accepts are made,
            # so that they find it idle instead of opening a new stream each
            self._hand_back(accept, io)
            self.do(actions)
            self.ctx.bump("receipts")
            await self.ctx.record(receipt, "requester")
        finally:
            self.in_flight -= 1
            self.wake.set()

    async def _send_inputs(self, a: core.SendInputs) -> None:
        io = self.leases.get(a.lease_id)
        item = self.items[a.item]
        if io is None or io.stream is None or not item.tensors or io.inline:
            return
        try:
            if io.via_lane:
                tag = f"task/{a.lease_id.hex()}/in"
                await need_lane(self.ctx.lane).send(a.to, tag, item.tensors, timeout=600)
            else:
                async with io.lock:
                    await send_tensors(io.stream, item.tensors)
        except P2PComputeError as exc:
            self._lost(a.lease_id, f"sending inputs failed: {exc}")


def job_spec(kind: str, items: list[JobItem], *, needs: Resources | None, **options: Any) -> core.JobSpec:
    """The :class:`~p2pcompute.tasks.negotiation.JobSpec` of ``items`` of ``kind`` (ConfigError if bad).

    Example::

        spec = job_spec("matmul", prepare_items(pairs), needs=None, parallel=8, retries=3)
    """
    return core.JobSpec(
        kind,
        items=len(items),
        needs=needs or Resources(cpus=0.0),
        input_bytes=max(i.input_bytes for i in items),
        **options,
    )


__all__ = [
    "CheckFn",
    "JobItem",
    "Network",
    "ProgressFn",
    "RequesterContext",
    "RequesterJob",
    "TaskResult",
    "job_spec",
    "prepare_items",
]
