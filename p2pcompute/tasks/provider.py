"""The provider half of the task service: offers, the provider clock, and one object per lease.

:class:`ProviderSide` feeds gossiped requests, lease streams and time to a
:class:`~p2pcompute.tasks.negotiation.ProviderCore` and routes the core's actions: offers
go to the ``send_offer`` collaborator, everything about a lease to that lease's
:class:`ProviderLease`, whose :meth:`~ProviderLease.execute` is the one place such an
action is carried out. A lease writes its frames through one writer task, in order.

The clock sleeps until the core's next deadline or a new event; its own tick never
wakes it (an idle provider uses no CPU).

Imports the negotiation cores, messages, registry, receipts, :mod:`p2pcompute.tasks.frames`,
:mod:`p2pcompute.deadlines`, errors; the overlay and the tensor lane as types only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import trio

from p2pcompute.deadlines import give_up_after
from p2pcompute.errors import (
    IntegrityError,
    LocalProtocolError,
    MalformedMessage,
    P2PComputeError,
    PeerGone,
    PeerTimeout,
    ProtocolError,
    RemoteProtocolError,
    StaleMessage,
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
    ERROR,
    GRANT,
    HEARTBEAT,
    MAX_PARAMS,
    REJECT,
    RESULT,
    Offer,
    open_request,
    parse_lease_message,
    reason_text,
)
from p2pcompute.tasks.receipts import (
    Receipt,
    ReceiptBody,
    open_receipt,
    params_digest,
    sign_body,
    tensor_digest,
)
from p2pcompute.tasks.registry import (
    TaskError,
    TaskKind,
    TaskRegistry,
    call_cancellable,
    check_params,
    normalise_output,
    running_for,
)
from p2pcompute.wire.codec import decode
from p2pcompute.wire.signing import Signer

if TYPE_CHECKING:
    from p2pcompute.overlay import FramedStream
    from p2pcompute.tensors import TensorLane

log = logging.getLogger(__name__)

_FROM_REQUESTER = frozenset({"task-heartbeat", "task-cancel", "task-receipt"})
# between a session's leases: the next accept, the end, or a late frame of the lease just over
_SESSION = frozenset({"task-accept", "task-end", "task-heartbeat", "task-cancel"})
_FIRST = frozenset({"task-accept"})  # a new stream starts with an accept
_LEASE_ACTIONS = (
    core.SendGrant,
    core.SendReject,
    core.SendHeartbeat,
    core.StartRun,
    core.AbortRun,
    core.SendResult,
    core.SendError,
)
_Outgoing = bytes | Callable[["FramedStream"], Awaitable[None]]


@dataclass(frozen=True)
class ProviderFaults:
    """A test seam: deliberate misbehaviour of a provider. The default (:data:`NO_FAULTS`) has none.

    Injected at construction (``open_tasks(..., faults=...)`` / ``serve_tasks``), so that the
    production code path carries no test switches. ``receipt_body`` replaces the encoding of
    the receipt body the provider signs: a test plays a provider that claims other terms than
    it offered.

    Example::

        inflate = ProviderFaults(receipt_body=lambda b: replace(b, price=b.price + 100).encode())
        async with serve_tasks(node, faults=inflate) as liar:
            ...
    """

    receipt_body: Callable[[ReceiptBody], bytes] | None = None

    def encode_receipt_body(self, body: ReceiptBody) -> bytes:
        """The bytes this provider signs for ``body`` (honestly: ``body.encode()``)."""
        return body.encode() if self.receipt_body is None else self.receipt_body(body)


NO_FAULTS = ProviderFaults()


def no_blame(peer: str, reason: str) -> None:
    """The default ``blame`` hook: record nothing (the counters still count)."""


@dataclass(frozen=True)
class ProviderContext:
    """What every lease of one provider shares: kinds, key, data lane, fault plan and three sinks.

    ``bump(stat)`` counts an event (``receipts``, ``bad_receipts`` ...); ``record(receipt, role)``
    appends a co-signed receipt to the ledger; ``blame(peer, reason)`` reports a peer's offence
    where no stream handler can raise it (a gossiped request).

    Example::

        ctx = ProviderContext(registry, node.identity, lane, bump=stats.bump, record=append)
    """

    registry: TaskRegistry
    signer: Signer
    lane: TensorLane | None
    bump: Callable[[str], None]
    record: Callable[[Receipt, str], Awaitable[None]]
    faults: ProviderFaults = NO_FAULTS
    blame: Callable[[str, str], None] = no_blame


@dataclass
class _Result:
    outputs: dict[str, torch.Tensor]
    info: bytes
    body: ReceiptBody
    body_bytes: bytes
    sig: bytes


class _Failure(Exception):
    """A run that ended with an error to report (``reason``, ``retryable``); internal only."""

    def __init__(self, reason: str, retryable: bool) -> None:
        super().__init__(reason)
        self.reason, self.retryable = reason, retryable


class ProviderLease:
    """One lease on the provider's side: its stream, its run and the one executor of its actions.

    The :class:`ProviderSide` hands every core action about this lease to :meth:`execute`;
    :meth:`serve` then reads the requester's frames, runs the kind and reports. Frames leave
    in order through one writer task.

    Example::

        lease = ProviderLease(stream, accept, ctx, provider_core, side_do)
        side_do(provider_core.handle_accept(peer, lease.lease_id, accept["offer_id"], now))
        await lease.serve()      # grant (or reject), inputs, run, result, receipt
    """

    def __init__(
        self,
        stream: FramedStream,
        accept: dict[str, Any],
        ctx: ProviderContext,
        provider: core.ProviderCore,
        do: Callable[[list[core.Action]], None],
    ) -> None:
        if stream.peer is None:
            raise MalformedMessage("a lease stream without an authenticated peer")
        self.stream = stream
        self.peer: str = stream.peer
        self.accept = accept
        self.lease_id: bytes = accept["lease_id"]
        self.ctx = ctx
        self.core = provider
        self._do = do
        self.via_lane = bool(accept["lane"]) and ctx.lane is not None
        self.scope = trio.CancelScope()  # the whole lease
        self.run_scope = trio.CancelScope()  # the run; AbortRun cancels it
        self.start: core.StartRun | None = None
        self._out_tx, self._out_rx = trio.open_memory_channel[_Outgoing](math.inf)
        self._drained = trio.Event()
        self._inputs: dict[str, torch.Tensor] | None = None
        self._input_error: P2PComputeError | None = None
        self._inputs_ready = trio.Event()
        self._receipt: bytes | None = None
        self._receipt_ready = trio.Event()
        self._result: _Result | None = None
        self._result_sent = False
        self._fault: RemoteProtocolError | None = None  # the requester's first offence, raised at the end
        self._thread_alive = False  # a sync kind's worker thread is running
        self._abandoned = False  # ... and its slot was handed back before it stopped
        self.memory = 0  # bytes the run holds (accounted while an abandoned thread stops)
        self.session = 0.0  # idle seconds granted to the session on this lease's offer
        self.settled = False  # the co-signed receipt came back and was recorded

    # -- the executor

    def execute(self, action: core.Action) -> None:
        """Carry out one action of the core about this lease (the only place they are acted on).

        A message our own code cannot build (:class:`LocalProtocolError`, a bug) ends this
        lease, not the provider: the error is logged and the lease's scope cancelled.
        """
        try:
            self._execute(action)
        except LocalProtocolError:
            log.exception("lease %s: cannot carry out %s", self.lease_id.hex(), type(action).__name__)
            self.scope.cancel()

    def _execute(self, action: core.Action) -> None:
        lid = self.lease_id
        if isinstance(action, core.SendGrant):
            self._send(
                GRANT.build(
                    lease_id=lid,
                    lane=self.via_lane,
                    lease_ttl=float(action.lease_ttl),
                    heartbeat=float(action.heartbeat),
                    session=float(action.session),
                )
            )
            self.session = float(action.session)
        elif isinstance(action, core.SendReject):
            self._send(
                REJECT.build(lease_id=lid, reason=reason_text(action.reason), retryable=action.retryable)
            )
        elif isinstance(action, core.SendHeartbeat):
            self._send(HEARTBEAT.build(lease_id=lid, seq=action.seq))
        elif isinstance(action, core.SendError):
            self._send(
                ERROR.build(lease_id=lid, reason=reason_text(action.reason), retryable=action.retryable)
            )
        elif isinstance(action, core.StartRun):
            self.start = action
        elif isinstance(action, core.AbortRun):
            self.run_scope.cancel()
        elif isinstance(action, core.SendResult):
            result = self._result
            if result is None:  # pragma: no cover - run_succeeded is only called with a result ready
                return
            inline = b"" if self.via_lane else inline_frame(result.outputs)  # small: in the result
            self._send(
                RESULT.build(
                    lease_id=lid,
                    info=result.info,
                    output_bytes=result.body.output_bytes,
                    output_digest=result.body.output_digest,
                    receipt_body=result.body_bytes,
                    provider_sig=result.sig,
                    outputs=inline,
                )
            )
            if result.outputs and not self.via_lane and not inline:
                outputs = result.outputs
                self._send(lambda stream: send_tensors(stream, outputs))
            self._result_sent = True

    def _send(self, item: _Outgoing) -> None:
        # once the lease is over nothing more goes out
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            self._out_tx.send_nowait(item)

    def _lost(self, reason: str) -> None:
        self._do(self.core.handle_cancel(self.peer, self.lease_id, reason, trio.current_time()))

    def _offence(self, exc: RemoteProtocolError, stat: str = "bad_requests") -> None:
        """Count the requester's offence once; :meth:`serve` raises it when the lease is over."""
        if self._fault is None:
            self._fault = exc
            self.ctx.bump(stat)

    def release(self) -> None:
        """The lease is over: free its run slot, or hand it back while a worker thread still stops.

        A worker thread that is still finishing a chunk (it checks its cancel flag between
        chunks) is accounted by the core as lingering (:meth:`ProviderCore.run_abandoned`)
        until it really stops.
        """
        if self.start is None:
            return
        if self._thread_alive:
            self._abandoned = True
            self.core.run_abandoned(self.lease_id, self.memory)
        else:
            self.core.run_stopped(self.lease_id)

    # -- the lease's life

    async def serve(self) -> None:
        """Serve the lease to its end: grant or reject, inputs, the run, result and receipt.

        Raises the requester's first protocol offence (:class:`RemoteProtocolError` naming it)
        once the lease is over, so that the node's stream handler counts it against that peer.
        """
        config = self.core.config
        with self.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                if self.start is not None:
                    nursery.start_soon(self._reader)
                    await self._run(self.start)
                self._out_tx.close()
                out_bytes = self._result.body.output_bytes if self._result_sent and self._result else 0
                with give_up_after(config.result_seconds(out_bytes)) as drain:
                    await self._drained.wait()
                if drain.cancelled_caught:
                    log.info("lease %s: %s does not read its result", self.lease_id.hex(), self.peer)
                elif self._result_sent:
                    await self._settle()
                nursery.cancel_scope.cancel()
        if self._fault is not None:
            raise self._fault

    async def _writer(self) -> None:
        try:
            async with self._out_rx:
                async for item in self._out_rx:
                    if isinstance(item, bytes):
                        await self.stream.send_frame(item)
                    else:
                        await item(self.stream)
        except P2PComputeError as exc:  # PeerGone, a reset ...: the requester is gone
            self._lost(f"stream lost: {exc}")
        finally:
            self._drained.set()

    async def _reader(self) -> None:
        peer, lid = self.peer, self.lease_id
        try:
            while True:
                raw = await self.stream.recv_frame()
                self.core.handle_heartbeat(peer, lid, trio.current_time())
                obj = decode(raw, max_size=LEASE_MAX_FRAME, peer=peer)
                kind = obj.get("t") if isinstance(obj, dict) else None
                if kind == "task-tensors" and not self.via_lane and not self._inputs_ready.is_set():
                    cap = min(self.accept["input_bytes"], self.core.config.max_input_bytes)
                    self._inputs = await recv_tensors(self.stream, raw, cap=cap, touch=self._touch)
                    self.core.inputs_received(lid)
                    self._inputs_ready.set()
                    continue
                m = parse_lease_message(raw, peer=peer, allowed=_FROM_REQUESTER)
                if m["lease_id"] != lid:
                    raise MalformedMessage("message for another lease on this stream", peer=peer)
                if m["t"] == "task-cancel":
                    self._do(self.core.handle_cancel(peer, lid, m["reason"], trio.current_time()))
                elif m["t"] == "task-receipt":
                    self._receipt = m["receipt"]
                    self._receipt_ready.set()
                    return
        except (PeerGone, RemoteProtocolError) as exc:
            if isinstance(exc, RemoteProtocolError):
                self._offence(exc)
            self._lost(f"stream lost: {exc}")
            self._input_error = exc
            self._inputs_ready.set()
            self._receipt_ready.set()

    def _touch(self) -> None:
        self.core.handle_heartbeat(self.peer, self.lease_id, trio.current_time())

    async def _run(self, start: core.StartRun) -> None:
        kind = self.ctx.registry.get(start.kind)
        outcome: tuple[dict[str, torch.Tensor], dict[str, Any], float] | _Failure | None = None
        with self.run_scope:
            try:
                outcome = await self._compute(kind)
            except _Failure as failure:
                outcome = failure
        if self.run_scope.cancelled_caught or outcome is None:
            return  # aborted: the core already ended the lease
        now = trio.current_time()
        if isinstance(outcome, _Failure):
            self._do(self.core.run_failed(self.lease_id, outcome.reason[:1000], outcome.retryable, now))
            return
        outputs, info, started = outcome
        self._result = self._sign(kind, start, outputs, info, started)
        actions = self.core.run_succeeded(self.lease_id, now)
        self._do(actions)
        if outputs and self.via_lane and any(isinstance(a, core.SendResult) for a in actions):
            tag = f"task/{self.lease_id.hex()}/out"
            wait = self.core.config.result_seconds(sum(nbytes(t) for t in outputs.values()))
            await need_lane(self.ctx.lane).send(self.peer, tag, outputs, timeout=wait)

    async def _compute(self, kind: TaskKind) -> tuple[dict[str, torch.Tensor], dict[str, Any], float]:
        """Receive the inputs and run ``kind``; a failure to report is raised as :class:`_Failure`."""
        acc, peer = self.accept, self.peer
        try:
            params = decode(acc["params"], max_size=MAX_PARAMS, peer=peer)
            if not isinstance(params, dict):
                raise MalformedMessage("task params are not a map", peer=peer)
            self.memory = kind.run_memory(params, acc["input_bytes"])
            if acc["input_digest"] == EMPTY_DIGEST:
                tensors: dict[str, torch.Tensor] = {}
            elif acc["inputs"]:  # small inputs came inside the accept
                cap = min(acc["input_bytes"], self.core.config.max_input_bytes)
                tensors = await recv_tensors(self.stream, acc["inputs"], cap=cap, touch=self._touch)
            elif self.via_lane:
                tag = f"task/{self.lease_id.hex()}/in"
                wait = self.core.config.input_seconds(acc["input_bytes"])
                tensors = await need_lane(self.ctx.lane).receive(peer, tag, timeout=wait)
                self.core.inputs_received(self.lease_id)
            else:
                await self._inputs_ready.wait()
                if self._input_error is not None:
                    raise self._input_error
                assert self._inputs is not None
                tensors = self._inputs
            if tensor_digest(tensors) != acc["input_digest"]:
                raise IntegrityError("inputs do not match the accepted digest", peer=peer)
            started = time.time()
            with running_for(peer):  # (trio.to_thread copies the context into the worker thread)
                if kind.is_async:
                    value = await kind.function(tensors, params)  # type: ignore[misc]
                else:
                    value = await self._in_thread(kind, tensors, params)
            result = normalise_output(kind.name, value)
            if sum(nbytes(t) for t in result.tensors.values()) > kind.max_output_bytes:
                raise TaskError("outputs over the kind's cap")
            return result.tensors, result.info, started
        except TaskError as exc:
            raise _Failure(str(exc), exc.retryable) from None
        except RemoteProtocolError as exc:  # the requester's fault: reported, then counted against it
            self._offence(exc)
            raise _Failure(f"bad inputs: {exc}", False) from None
        except (PeerGone, PeerTimeout, ProtocolError) as exc:
            raise _Failure(f"inputs not received: {exc}", True) from None
        except Exception as exc:  # the operator's task code may raise anything: report, keep serving
            log.info("task %s raised", kind.name, exc_info=True)
            raise _Failure(f"{type(exc).__name__}: {exc}", False) from None

    async def _in_thread(
        self, kind: TaskKind, tensors: dict[str, torch.Tensor], params: dict[str, Any]
    ) -> Any:
        """Run a sync kind in a worker thread that is abandoned (not waited for) when cancelled.

        The thread's cancel flag is set as soon as this returns or is cancelled; a kind that
        checks it (:func:`~p2pcompute.tasks.registry.check_cancelled`) stops at its next chunk.
        When the thread really ends, an abandoned run's lingering slot is released.
        """
        flag = threading.Event()
        token = trio.lowlevel.current_trio_token()

        def stopped() -> None:  # in the trio thread, once the worker has returned
            self._thread_alive = False
            if self._abandoned:
                self.core.run_stopped(self.lease_id)
                self._do([])  # wake the clock: a slot may be free again

        def body() -> Any:
            try:
                return call_cancellable(flag, kind.function, tensors, params)
            finally:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(stopped)

        self._thread_alive = True
        try:
            # (mypy misreads run_sync's keyword-only arguments after *args: Unpack[Ts])
            return await trio.to_thread.run_sync(body, abandon_on_cancel=True)  # type: ignore[call-arg]
        finally:
            flag.set()

    def _sign(
        self,
        kind: TaskKind,
        start: core.StartRun,
        outputs: dict[str, torch.Tensor],
        info: dict[str, Any],
        started: float,
    ) -> _Result:
        acc = self.accept
        body = ReceiptBody(
            lease_id=self.lease_id,
            request_id=acc["request_id"],
            kind=kind.name,
            provider_key=self.ctx.signer.public_key,
            requester_key=public_key_of(self.peer),
            start=started,
            end=max(started, time.time()),
            resources=kind.needs,
            price=start.price,
            params_digest=params_digest(acc["params"]),
            input_digest=acc["input_digest"],
            output_digest=tensor_digest(outputs),
            input_bytes=acc["input_bytes"],
            output_bytes=sum(nbytes(t) for t in outputs.values()),
        )
        body_bytes = self.ctx.faults.encode_receipt_body(body)
        return _Result(outputs, check_params(info), body, body_bytes, sign_body(body_bytes, self.ctx.signer))

    async def _settle(self) -> None:
        """Wait (``receipt_deadline``, 30 s) for the requester's co-signed receipt; check and record it."""
        with give_up_after(self.core.config.receipt_deadline):
            await self._receipt_ready.wait()
        if self._receipt is None or self._result is None:
            log.info("lease %s: no receipt from %s", self.lease_id.hex(), self.peer)
            return
        try:
            receipt = open_receipt(self._receipt, peer=self.peer)
            if receipt.body_bytes != self._result.body_bytes or receipt.provider_sig != self._result.sig:
                raise IntegrityError("receipt differs from the one we signed", peer=self.peer)
        except ProtocolError as exc:
            if isinstance(exc, RemoteProtocolError):
                self._offence(exc, "bad_receipts")
            else:  # pragma: no cover - opening a receipt raises only the peer's errors
                self.ctx.bump("bad_receipts")
            log.info("lease %s: bad receipt: %s", self.lease_id.hex(), exc)
            return
        self.ctx.bump("receipts")
        await self.ctx.record(receipt, "provider")
        self.settled = True

    @property
    def reusable(self) -> bool:
        """Whether the stream may carry the session's next lease: granted a session, settled
        cleanly (the requester's receipt read, so no frame of this lease is left unread)."""
        return self.session > 0 and self.settled and self._fault is None


class ProviderSide:
    """The provider half of a task service: offers, leases and the clock around a :class:`ProviderCore`.

    ``send_offer(offer)`` delivers one offer (signing and the stream are the caller's).

    Example::

        side = ProviderSide(provider_core, ctx, send_offer=deliver)
        nursery.start_soon(side.clock)
        node.subscribe(TOPIC, side.on_request)
        node.set_stream_handler(LEASE_PROTOCOL, side.on_lease_stream, max_frame=LEASE_MAX_FRAME)
    """

    def __init__(
        self,
        provider: core.ProviderCore,
        ctx: ProviderContext,
        *,
        send_offer: Callable[[Offer], Awaitable[None]],
    ) -> None:
        self.core = provider
        self.ctx = ctx
        self._send_offer = send_offer
        self._leases: dict[bytes, ProviderLease] = {}
        self._scopes: set[trio.CancelScope] = set()
        self._streams: dict[str, int] = {}  # open lease streams per peer
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.closed = False

    def do(self, actions: list[core.Action], *, wake: bool = True) -> None:
        """Route the core's ``actions``: offers out, lease actions to their lease; ``wake`` the clock."""
        for a in actions:
            if isinstance(a, core.SendOffer):
                if self._nursery is not None and not self.closed:
                    self._nursery.start_soon(self._send_offer, a.offer)
            elif isinstance(a, _LEASE_ACTIONS):
                lease = self._leases.get(a.lease_id)
                if lease is not None:
                    lease.execute(a)
        if wake:  # an event may have moved the core's next deadline
            self._wake.set()

    async def clock(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Tick the core at its deadlines; sleep in between (offers are sent from here)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while not self.closed:
                deadline = self.core.next_deadline()
                with trio.move_on_at(math.inf if deadline is None else deadline):
                    await self._wake.wait()
                self._wake = trio.Event()
                # the clock's own tick must not wake the clock: it would never sleep again
                self.do(self.core.tick(trio.current_time()), wake=False)
            nursery.cancel_scope.cancel()

    async def on_request(self, sender: str, data: bytes) -> None:
        """A gossiped ``task-request`` from ``sender``: offer if the core wants to."""
        if self.closed:
            return
        try:
            request = open_request(data, peer=sender, wall=time.time())
        except ProtocolError as exc:
            self.ctx.bump("bad_requests")
            log.info("task request refused: %s", exc)
            # stale gossip may be replayed by anyone: not blamed on its signer
            if isinstance(exc, RemoteProtocolError) and not isinstance(exc, StaleMessage):
                self.ctx.blame(sender, f"bad task request: {exc}")
            return
        self.do(self.core.handle_request(request, trio.current_time()))

    async def on_lease_stream(self, stream: FramedStream) -> None:
        """A requester opened a lease stream: read its accept and serve the lease.

        A peer with ``config.streams_per_requester`` lease streams open already gets this
        one closed at once, unread (an honest requester needs one per lease).
        """
        peer = stream.peer or ""
        if self._streams.get(peer, 0) >= self.core.config.streams_per_requester:
            self.core.stats["busy_refusals"] += 1
            return  # the node closes the stream
        self._streams[peer] = self._streams.get(peer, 0) + 1
        scope = trio.CancelScope()
        self._scopes.add(scope)
        try:
            with scope:
                await self._lease(stream)
        finally:
            self._scopes.discard(scope)
            self._streams[peer] -= 1
            if not self._streams[peer]:
                del self._streams[peer]

    async def _lease(self, stream: FramedStream) -> None:
        """Serve the leases of one stream: one, or, in a session, one after another.

        A lease granted a session whose receipt came back leaves the stream open: the
        requester's next ``task-accept`` (or its ``task-end``) is awaited for the idle time
        granted, plus ``lease_ttl`` of slack. Frames of the lease just ended that cross
        (a late heartbeat or cancel) are skipped.
        """
        peer = stream.peer
        if self.closed or peer is None:
            return
        wait, allowed = self.core.config.accept_deadline, _FIRST
        while not self.closed:
            acc = await self._next_accept(stream, peer, wait, allowed)
            if acc is None:
                return  # an idle stream, or the session ended: drop it
            lease = await self._serve_one(stream, peer, acc)
            if lease is None or not lease.reusable:
                return
            wait, allowed = lease.session + self.core.config.lease_ttl, _SESSION

    async def _next_accept(
        self, stream: FramedStream, peer: str, wait: float, allowed: frozenset[str]
    ) -> dict[str, Any] | None:
        """The stream's next ``task-accept`` within ``wait`` s (``None``: none came, or ``task-end``)."""
        with give_up_after(wait):
            try:
                while True:
                    raw = await stream.recv_frame(ACCEPT.max_size)
                    m = parse_lease_message(raw, peer=peer, allowed=allowed)
                    if m["t"] == "task-accept":
                        return m
                    if m["t"] == "task-end":
                        self.core.end_session(peer, m["offer_id"])
                        self._wake.set()
                        return None
                    if m["lease_id"] in self._leases:  # only frames of a lease already over may cross
                        raise MalformedMessage(f"{m['t']} for a live lease between leases", peer=peer)
            except PeerGone:
                return None  # the requester closed the session's stream
            except RemoteProtocolError:
                self.ctx.bump("bad_requests")
                raise  # the node's stream handler counts it against the peer
        return None

    async def _serve_one(self, stream: FramedStream, peer: str, acc: dict[str, Any]) -> ProviderLease | None:
        lease_id = acc["lease_id"]
        # (inputs inside the accept have arrived: no input deadline for them)
        inputs = None if acc["input_digest"] == EMPTY_DIGEST or acc["inputs"] else acc["input_bytes"]
        if lease_id in self._leases:  # the same accept on a second stream: never a second run
            self.do(self.core.handle_accept(peer, lease_id, acc["offer_id"], trio.current_time()))
            return None
        lease = ProviderLease(stream, acc, self.ctx, self.core, self.do)
        self._leases[lease_id] = lease
        try:
            now = trio.current_time()
            self.do(
                self.core.handle_accept(
                    peer, lease_id, acc["offer_id"], now, inputs=inputs, session=acc["session"]
                )
            )
            await lease.serve()
        finally:
            if self._leases.get(lease_id) is lease:
                del self._leases[lease_id]
            lease.release()
            self._wake.set()
        return lease

    def close(self) -> None:
        """Stop serving: cancel every lease; later gossip and streams are ignored."""
        self.closed = True
        for scope in list(self._scopes):
            scope.cancel()
        self._wake.set()


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_ED25519_PEER_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])


def public_key_of(peer_id: str) -> bytes:
    """The Ed25519 public key inside an Ed25519 peer id (an identity multihash, base58).

    Raises :class:`IntegrityError` naming the peer when the id embeds no Ed25519 key.

    Example::

        assert public_key_of(identity.peer_id) == identity.public_key
    """
    n = 0
    for ch in peer_id:
        digit = _B58.find(ch)
        if digit < 0:
            raise IntegrityError("peer id is not base58", peer=peer_id)
        n = n * 58 + digit
    zeros = len(peer_id) - len(peer_id.lstrip("1"))
    raw = b"\x00" * zeros + n.to_bytes((n.bit_length() + 7) // 8, "big")
    if len(raw) != 38 or raw[:6] != _ED25519_PEER_PREFIX:
        raise IntegrityError("peer id does not embed an Ed25519 key", peer=peer_id)
    return raw[6:]


__all__ = [
    "NO_FAULTS",
    "ProviderContext",
    "ProviderFaults",
    "ProviderLease",
    "ProviderSide",
    "no_blame",
    "public_key_of",
]
