"""The trio driver: runs the negotiation cores on a :class:`~p2pcompute.overlay.Node`.

Transport (docs/protocol/tasks.md):

* requests: GossipSub topic ``tasks/1`` (signed ``task-request`` envelopes);
* offers: provider -> requester, one signed frame on ``/p2pcompute/tasks/offer/1.0.0``;
* a lease: requester -> provider stream ``/p2pcompute/tasks/lease/1.0.0`` carrying
  accept, grant/reject, heartbeats both ways, cancel, result/error and the receipt;
* inputs and outputs: the tensor lane (:mod:`p2pcompute.tensors`) under the tags
  ``task/<lease>/in`` and ``task/<lease>/out`` when a lane is given, else in-stream
  frames (a capped ``task-tensors`` header, then raw chunks of at most 512 KiB).

:func:`open_tasks` gives a :class:`TaskService` (requester always; provider when a
registry is given); :func:`serve_tasks` is the provider form used by ``p2pcompute peer``.
Every background task lives in the service's nursery or in a lease handler whose
cancel scope the service cancels on exit.

Imports :mod:`p2pcompute.tasks` (cores, messages, registry, receipts, ledger),
:mod:`p2pcompute.overlay`, :mod:`p2pcompute.tensors`, :mod:`p2pcompute.wire`, errors.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trio
import trio.lowlevel

from p2pcompute.errors import (
    IntegrityError,
    LocalProtocolError,
    MalformedMessage,
    P2PComputeError,
    PeerGone,
    PeerTimeout,
    ProtocolError,
    RemoteProtocolError,
    TaskFailed,
)
from p2pcompute.overlay import FramedStream, Node
from p2pcompute.tasks import negotiation as core
from p2pcompute.tasks.builtin import builtin_registry
from p2pcompute.tasks.ledger import Ledger
from p2pcompute.tasks.messages import (
    ACCEPT,
    DTYPES,
    MAX_PARAMS,
    TENSORS_HEADER,
    Offer,
    Resources,
    open_offer,
    open_request,
    parse_lease_message,
    seal_offer,
    seal_request,
)
from p2pcompute.tasks.receipts import (
    Receipt,
    ReceiptBody,
    countersign,
    open_receipt,
    params_digest,
    sign_body,
    tensor_digest,
)
from p2pcompute.tasks.registry import TaskError, TaskRegistry, check_params, normalise_output
from p2pcompute.tensors import TensorLane
from p2pcompute.wire.codec import decode

log = logging.getLogger(__name__)

TOPIC = "tasks/1"
OFFER_PROTOCOL = "/p2pcompute/tasks/offer/1.0.0"
LEASE_PROTOCOL = "/p2pcompute/tasks/lease/1.0.0"
CHUNK = 512 * 1024
LEASE_MAX_FRAME = CHUNK + 1024
EMPTY_DIGEST = tensor_digest({})
_DTYPES = {name: getattr(torch, name) for name in DTYPES}

ProgressFn = Callable[[int, int], Any]


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
class _Item:
    tensors: Mapping[str, torch.Tensor]
    params_bytes: bytes
    input_digest: bytes
    input_bytes: int


@dataclass
class _RLeaseIO:
    stream: FramedStream | None = None
    via_lane: bool = False
    granted_at: float = 0.0
    lock: trio.Lock = field(default_factory=trio.Lock)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


# --------------------------------------------------------------------------- tensors in frames


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (no copy)."""
    arr: Any = t.view(torch.uint8).numpy()
    return memoryview(arr).cast("B")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


async def _send_tensors(stream: FramedStream, tensors: Mapping[str, torch.Tensor]) -> None:
    names = sorted(tensors)
    flat = [tensors[n].detach().cpu().contiguous().reshape(-1) for n in names]
    header = TENSORS_HEADER.build(
        names=names,
        dtypes=[str(tensors[n].dtype).removeprefix("torch.") for n in names],
        shapes=[list(tensors[n].shape) for n in names],
        nbytes=sum(_nbytes(t) for t in flat),
    )
    await stream.send_frame(header)
    for t in flat:
        if t.numel() == 0:
            continue
        raw = _bytes_of(t)
        for off in range(0, len(raw), CHUNK):
            await stream.send_frame(raw[off : off + CHUNK])


async def _recv_tensors(
    stream: FramedStream, header_bytes: bytes, *, cap: int, touch: Callable[[], None]
) -> dict[str, torch.Tensor]:
    """Read the tensors announced by ``header_bytes``; allocation is checked against ``cap`` first."""
    peer = stream.peer
    h = TENSORS_HEADER.parse(header_bytes, peer=peer)
    names, dtypes, shapes = h["names"], h["dtypes"], h["shapes"]
    if not (len(names) == len(dtypes) == len(shapes)) or len(set(names)) != len(names):
        raise MalformedMessage("tensor header lists disagree", peer=peer)
    total = 0
    plan: list[tuple[str, torch.dtype, list[int], int]] = []
    for name, dt, shape in zip(names, dtypes, shapes, strict=True):
        if dt not in _DTYPES or not all(isinstance(d, int) and 0 <= d < 1 << 40 for d in shape):
            raise MalformedMessage(f"tensor {name!r}: bad dtype or shape", peer=peer)
        dtype = _DTYPES[dt]
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        plan.append((name, dtype, shape, size))
        total += size
    if total != h["nbytes"] or total > cap:
        raise MalformedMessage(f"tensors of {h['nbytes']} bytes (cap {cap}, computed {total})", peer=peer)
    out: dict[str, torch.Tensor] = {}
    for name, dtype, shape, size in plan:
        buf = torch.empty(size, dtype=torch.uint8)
        view = _bytes_of(buf)
        filled = 0
        while filled < size:
            chunk = await stream.recv_frame(min(CHUNK, size - filled))
            if not chunk:
                raise MalformedMessage("empty tensor chunk", peer=peer)
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
            touch()
        out[name] = buf.view(dtype).reshape(shape) if size else torch.empty(shape, dtype=dtype)
    return out


# --------------------------------------------------------------------------- the service


class TaskService:
    """Buy (and, with a registry, sell) task runs on a node. Create with :func:`open_tasks`.

    Example::

        async with open_node(identity, bootstrap=[boot]) as node, open_tasks(node) as tasks:
            result = await tasks.run_task("matmul", {"a": a, "b": b}, {})
            print(result.provider, result.outputs["c"].shape, result.receipt.body.price)
    """

    def __init__(
        self,
        node: Node,
        registry: TaskRegistry | None,
        config: core.ProviderConfig,
        *,
        ledger: Ledger | None,
        lane: TensorLane | None,
    ) -> None:
        self.node = node
        self.identity = node.identity
        self.peer_id = node.peer_id
        self.registry = registry
        self.ledger = ledger
        self.lane = lane
        self._ledger_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._jobs: dict[bytes, _Job] = {}
        self._scopes: set[trio.CancelScope] = set()
        self.provider: core.ProviderCore | None = None
        if registry is not None:
            terms = {k.name: core.KindTerms(k.needs, k.price) for k in registry}
            self.provider = core.ProviderCore(self.peer_id, terms, config)
        self._p_streams: dict[bytes, tuple[FramedStream, trio.Lock]] = {}
        self._p_runs: dict[bytes, trio.CancelScope] = {}
        self._p_wake = trio.Event()
        self.stats: dict[str, int] = {"bad_requests": 0, "bad_offers": 0, "bad_receipts": 0, "receipts": 0}
        self._stats_changed = trio.Event()

    # -- lifecycle

    async def _start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.node.set_stream_handler(OFFER_PROTOCOL, self._on_offer_stream, max_frame=8192)
        if self.provider is not None:
            self.node.subscribe(TOPIC, self._on_request)
            self.node.set_stream_handler(LEASE_PROTOCOL, self._on_lease_stream, max_frame=LEASE_MAX_FRAME)
            nursery.start_soon(self._provider_clock)

    def _close(self) -> None:
        for scope in list(self._scopes):
            scope.cancel()
        if self.provider is not None:
            self.provider = None  # late gossip after exit is ignored

    def statistics(self) -> dict[str, Any]:
        """Counters of both roles (offers, grants, timeouts, receipts ...)."""
        out: dict[str, Any] = dict(self.stats)
        if self.provider is not None:
            out["provider"] = self.provider.statistics()
        return out

    def _bump(self, stat: str) -> None:
        self.stats[stat] += 1
        self._stats_changed.set()
        self._stats_changed = trio.Event()

    async def wait_for_stat(self, stat: str, at_least: int, *, timeout: float) -> int:
        """Wait until counter ``stat`` (see :attr:`stats`) reaches ``at_least`` (:class:`PeerTimeout`).

        Example::

            await tasks.wait_for_stat("receipts", 10, timeout=60)   # receipts recorded
        """
        try:
            with trio.fail_after(timeout):
                while self.stats[stat] < at_least:
                    await self._stats_changed.wait()
        except trio.TooSlowError:
            raise PeerTimeout(f"{stat} is {self.stats[stat]}, not {at_least}, after {timeout} s") from None
        return self.stats[stat]

    def providers(self) -> list[str]:
        """Peers known (through GossipSub) to listen for task requests."""
        return self.node.topic_peers(TOPIC)

    async def wait_for_providers(self, n: int, *, timeout: float) -> list[str]:
        """Wait until at least ``n`` providers listen for requests (:class:`PeerTimeout` otherwise).

        Example::

            await tasks.wait_for_providers(4, timeout=30)
        """
        try:
            with trio.fail_after(timeout):
                # py-libp2p signals no change of peer_topics: poll it
                while len(found := self.providers()) < n:  # noqa: ASYNC110
                    await trio.sleep(0.05)
        except trio.TooSlowError:
            have = len(self.providers())
            raise PeerTimeout(f"only {have} of {n} task providers after {timeout} s") from None
        return found

    async def _append(self, receipt: Receipt, role: str) -> None:
        if self.ledger is None:
            return
        async with self._ledger_lock:
            if receipt.lease_id not in self.ledger:
                await trio.to_thread.run_sync(self.ledger.append, receipt, role)

    # -- provider side

    def _pdo(self, actions: list[core.Action], *, wake: bool = True) -> None:
        """Perform the provider core's actions; ``wake`` the clock (an event may move its deadline)."""
        assert self._nursery is not None
        for a in actions:
            if isinstance(a, core.SendOffer):
                self._nursery.start_soon(self._send_offer, a.offer)
            elif isinstance(a, core.SendHeartbeat):
                self._nursery.start_soon(
                    self._p_send,
                    a.lease_id,
                    {"t": "task-heartbeat", "v": 1, "lease_id": a.lease_id, "seq": a.seq},
                )
            elif isinstance(a, core.AbortRun):
                scope = self._p_runs.get(a.lease_id)
                if scope is not None:
                    scope.cancel()
            # SendGrant / SendReject / StartRun / SendResult / SendError are handled inline
            # by the lease handler, which owns that stream.
        if wake:
            self._p_wake.set()

    async def _on_request(self, sender: str, data: bytes) -> None:
        if self.provider is None:
            return
        try:
            request = open_request(data, peer=sender, wall=time.time())
        except ProtocolError as exc:
            self._bump("bad_requests")
            log.info("task request refused: %s", exc)
            return
        self._pdo(self.provider.handle_request(request, trio.current_time()))

    async def _send_offer(self, offer: Offer) -> None:
        raw = seal_offer(offer, self.identity)
        for attempt in range(2):  # py-libp2p sometimes fails a stream racing a fresh connection
            try:
                with trio.fail_after(10):
                    stream = await self.node.open_stream(offer.requester, OFFER_PROTOCOL, timeout=5)
                    try:
                        await stream.send_frame(raw)
                    finally:
                        await stream.close()
                return
            except (P2PComputeError, trio.TooSlowError) as exc:
                log.info("offer to %s not delivered (attempt %d): %s", offer.requester, attempt + 1, exc)
                await trio.sleep(0.2)

    async def _p_send(self, lease_id: bytes, msg: dict[str, Any]) -> None:
        entry = self._p_streams.get(lease_id)
        if entry is None:
            return
        stream, lock = entry
        with contextlib.suppress(P2PComputeError, trio.TooSlowError):
            with trio.fail_after(10):
                async with lock:
                    await stream.send_msg(msg)

    async def _provider_clock(self) -> None:
        while self.provider is not None:
            deadline = self.provider.next_deadline()
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                await self._p_wake.wait()
            self._p_wake = trio.Event()
            if self.provider is not None:
                # the clock's own tick must not re-arm the clock: it would never sleep again
                self._pdo(self.provider.tick(trio.current_time()), wake=False)

    async def _on_lease_stream(self, stream: FramedStream) -> None:
        scope = trio.CancelScope()
        self._scopes.add(scope)
        try:
            with scope:
                await self._serve_lease(stream)
        finally:
            self._scopes.discard(scope)

    async def _serve_lease(self, stream: FramedStream) -> None:
        prov, registry = self.provider, self.registry
        peer = stream.peer
        if prov is None or registry is None or peer is None:
            return
        acc: dict[str, Any] | None = None
        with trio.move_on_after(30):
            acc = ACCEPT.parse(await stream.recv_frame(ACCEPT.max_size), peer=peer)
        if acc is None:
            return  # an idle stream: drop it
        lease_id = acc["lease_id"]
        via_lane = bool(acc["lane"]) and self.lane is not None
        actions = prov.handle_accept(peer, lease_id, acc["offer_id"], trio.current_time())
        start_run = next((a for a in actions if isinstance(a, core.StartRun)), None)
        reject = next((a for a in actions if isinstance(a, core.SendReject)), None)
        if reject is not None:
            await stream.send_msg(
                {
                    "t": "task-reject",
                    "v": 1,
                    "lease_id": lease_id,
                    "reason": reject.reason,
                    "retryable": reject.retryable,
                }
            )
            return
        if start_run is None:
            return  # duplicate accept: ignored
        lock = trio.Lock()
        self._p_streams[lease_id] = (stream, lock)
        run_scope = trio.CancelScope()
        self._p_runs[lease_id] = run_scope
        inputs: dict[str, Any] = {}
        inputs_ready = trio.Event()
        receipt_raw: list[bytes] = []
        receipt_ready = trio.Event()
        try:
            async with lock:
                await stream.send_msg(
                    {
                        "t": "task-grant",
                        "v": 1,
                        "lease_id": lease_id,
                        "lane": via_lane,
                        "lease_ttl": prov.config.lease_ttl,
                        "heartbeat": prov.config.heartbeat,
                    }
                )
            self._pdo([a for a in actions if not isinstance(a, core.SendGrant | core.StartRun)])

            def touch() -> None:
                if self.provider is not None:
                    self.provider.handle_heartbeat(peer, lease_id, trio.current_time())

            async def reader() -> None:
                try:
                    while True:
                        raw = await stream.recv_frame()
                        touch()
                        obj = decode(raw, max_size=LEASE_MAX_FRAME, peer=peer)
                        kind = obj.get("t") if isinstance(obj, dict) else None
                        if kind == "task-tensors" and not via_lane and not inputs_ready.is_set():
                            cap = min(acc["input_bytes"], prov.config.max_input_bytes)
                            inputs["tensors"] = await _recv_tensors(stream, raw, cap=cap, touch=touch)
                            inputs_ready.set()
                            continue
                        m = parse_lease_message(
                            raw,
                            peer=peer,
                            allowed=frozenset({"task-heartbeat", "task-cancel", "task-receipt"}),
                        )
                        if m["lease_id"] != lease_id:
                            raise MalformedMessage("message for another lease on this stream", peer=peer)
                        if m["t"] == "task-cancel" and self.provider is not None:
                            self._pdo(
                                self.provider.handle_cancel(peer, lease_id, m["reason"], trio.current_time())
                            )
                        elif m["t"] == "task-receipt":
                            receipt_raw.append(m["receipt"])
                            receipt_ready.set()
                            return
                except (PeerGone, RemoteProtocolError) as exc:
                    if self.provider is not None:
                        self._pdo(
                            self.provider.handle_cancel(
                                peer, lease_id, f"stream lost: {exc}", trio.current_time()
                            )
                        )
                    inputs["error"] = exc
                    inputs_ready.set()
                    receipt_ready.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await self._run_lease(
                    stream,
                    lock,
                    acc,
                    start_run,
                    run_scope,
                    inputs,
                    inputs_ready,
                    receipt_raw,
                    receipt_ready,
                    via_lane,
                )
                nursery.cancel_scope.cancel()
        finally:
            self._p_streams.pop(lease_id, None)
            self._p_runs.pop(lease_id, None)
            if self.provider is not None:
                self.provider.run_stopped(lease_id)
                self._p_wake.set()

    async def _run_lease(
        self,
        stream: FramedStream,
        lock: trio.Lock,
        acc: dict[str, Any],
        run: core.StartRun,
        run_scope: trio.CancelScope,
        inputs: dict[str, Any],
        inputs_ready: trio.Event,
        receipt_raw: list[bytes],
        receipt_ready: trio.Event,
        via_lane: bool,
    ) -> None:
        assert self.registry is not None
        peer = run.requester
        lease_id = run.lease_id
        kind = self.registry.get(run.kind)
        outputs: dict[str, torch.Tensor] = {}
        info: dict[str, Any] = {}
        error: tuple[str, bool] | None = None
        start = time.time()
        with run_scope:
            try:
                params = decode(acc["params"], max_size=MAX_PARAMS, peer=peer)
                if not isinstance(params, dict):
                    raise TaskError("params must be a map")
                if acc["input_digest"] == EMPTY_DIGEST:
                    tensors: dict[str, torch.Tensor] = {}
                elif via_lane:
                    tensors = await _lane(self.lane).receive(peer, f"task/{lease_id.hex()}/in", timeout=600)
                else:
                    await inputs_ready.wait()
                    if "error" in inputs:
                        raise inputs["error"]
                    tensors = inputs["tensors"]
                if tensor_digest(tensors) != acc["input_digest"]:
                    raise TaskError("inputs do not match the accepted digest")
                start = time.time()
                if kind.is_async:
                    value = await kind.function(tensors, params)  # type: ignore[misc]
                else:
                    value = await trio.to_thread.run_sync(kind.function, tensors, params)
                result = normalise_output(kind.name, value)
                outputs, info = result.tensors, result.info
                if sum(_nbytes(t) for t in outputs.values()) > kind.max_output_bytes:
                    raise TaskError("outputs over the kind's cap")
            except TaskError as exc:
                error = (str(exc), exc.retryable)
            except (PeerGone, PeerTimeout, ProtocolError) as exc:
                error = (f"inputs not received: {exc}", True)
            except Exception as exc:  # the operator's task code may raise anything: report, keep serving
                log.info("task %s raised", kind.name, exc_info=True)
                error = (f"{type(exc).__name__}: {exc}", False)
        prov = self.provider
        if prov is None:
            return
        now = trio.current_time()
        if run_scope.cancelled_caught:
            prov.run_stopped(lease_id)
            return
        if error is not None:
            acts = prov.run_failed(lease_id, error[0][:1000], error[1], now)
            self._pdo(acts)
            if any(isinstance(a, core.SendError) for a in acts):
                async with lock:
                    await stream.send_msg(
                        {
                            "t": "task-error",
                            "v": 1,
                            "lease_id": lease_id,
                            "reason": error[0][:1000],
                            "retryable": error[1],
                        }
                    )
            return
        acts = prov.run_succeeded(lease_id, now)
        self._pdo(acts)
        if not any(isinstance(a, core.SendResult) for a in acts):
            return
        out_bytes = sum(_nbytes(t) for t in outputs.values())
        body = ReceiptBody(
            lease_id=lease_id,
            request_id=acc["request_id"],
            kind=kind.name,
            provider_key=self.identity.public_key,
            requester_key=_public_key_of(peer),
            start=start,
            end=max(start, time.time()),
            resources=kind.needs,
            price=run.price,
            params_digest=params_digest(acc["params"]),
            input_digest=acc["input_digest"],
            output_digest=tensor_digest(outputs),
            input_bytes=acc["input_bytes"],
            output_bytes=out_bytes,
        )
        body_bytes = self._receipt_body_bytes(body)
        sig = sign_body(body_bytes, self.identity)
        info_bytes = check_params(info)
        async with lock:
            await stream.send_msg(
                {
                    "t": "task-result",
                    "v": 1,
                    "lease_id": lease_id,
                    "info": info_bytes,
                    "output_bytes": out_bytes,
                    "output_digest": body.output_digest,
                    "receipt_body": body_bytes,
                    "provider_sig": sig,
                }
            )
            if outputs and not via_lane:
                await _send_tensors(stream, outputs)
        if outputs and via_lane:
            await _lane(self.lane).send(peer, f"task/{lease_id.hex()}/out", outputs, timeout=600)
        with trio.move_on_after(30):
            await receipt_ready.wait()
        if not receipt_raw:
            log.info("lease %s: no receipt from %s", lease_id.hex(), peer)
            return
        try:
            receipt = open_receipt(receipt_raw[0], peer=peer)
            if receipt.body_bytes != body_bytes or receipt.provider_sig != sig:
                raise IntegrityError("receipt differs from the one we signed", peer=peer)
        except ProtocolError as exc:
            self._bump("bad_receipts")
            log.info("lease %s: bad receipt: %s", lease_id.hex(), exc)
            return
        self._bump("receipts")
        await self._append(receipt, "provider")

    def _receipt_body_bytes(self, body: ReceiptBody) -> bytes:
        """Encode the receipt body we sign (a seam for tests that play a dishonest provider)."""
        return body.encode()

    # -- requester side

    async def _on_offer_stream(self, stream: FramedStream) -> None:
        with trio.fail_after(10):
            raw = await stream.recv_frame(8192)
        try:
            offer = open_offer(raw, peer=stream.peer, expected_requester=self.peer_id)
        except ProtocolError:
            self._bump("bad_offers")
            raise
        job = self._jobs.get(offer.request_id)
        if job is not None:
            job.do(job.core.handle_offer(offer, trio.current_time()))

    async def run_task(
        self,
        kind: str,
        tensors: Mapping[str, torch.Tensor] | None = None,
        params: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> TaskResult:
        """Run one task of ``kind`` on the best provider that offers; retry elsewhere on failure.

        Options are those of :meth:`map_tasks`. Raises :class:`TaskFailed` when no provider
        completed it within ``retries`` attempts or the ``deadline``.

        Example::

            r = await tasks.run_task("matmul", {"a": a, "b": b}, needs=Resources(gpus=1), max_price=2.0)
            c = r.outputs["c"]
        """
        (result,) = await self.map_tasks(kind, [(tensors or {}, params or {})], **options)
        assert isinstance(result, TaskResult)
        return result

    async def map_tasks(
        self,
        kind: str,
        items: Sequence[tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]],
        *,
        needs: Resources | None = None,
        max_price: float = 1e18,
        parallel: int = 16,
        retries: int = 3,
        deadline: float = 300.0,
        offer_window: float = 0.3,
        enough_offers: int | None = None,
        lease_ttl: float = 10.0,
        accept_timeout: float = 5.0,
        max_output_bytes: int = 1 << 30,
        progress: ProgressFn | None = None,
        return_exceptions: bool = False,
    ) -> list[TaskResult | TaskFailed]:
        """Spread ``items`` (``(tensors, params)`` pairs) over many providers; results in item order.

        At most ``parallel`` leases run at once; offers are reused while valid, so one
        request round can feed many items. ``progress(done, total)`` is called after each
        item. A failed item raises :class:`TaskFailed` (or, with ``return_exceptions``,
        takes its place in the list).

        Example::

            results = await tasks.map_tasks("matmul", [({"a": a, "b": b}, {}) for a, b in pairs],
                                            parallel=8, progress=lambda d, n: print(f"{d}/{n}"))
            receipts = [r.receipt for r in results]
        """
        if not items:
            return []
        prepared = []
        for tensors, params in items:
            pb = check_params(params)
            prepared.append(
                _Item(tensors, pb, tensor_digest(tensors), sum(_nbytes(t) for t in tensors.values()))
            )
        spec = core.JobSpec(
            kind,
            items=len(items),
            needs=needs or Resources(cpus=0.0),
            max_price=max_price,
            parallel=parallel,
            retries=retries,
            deadline=deadline,
            offer_window=offer_window,
            enough_offers=enough_offers,
            accept_timeout=accept_timeout,
            lease_ttl=lease_ttl,
            input_bytes=max(i.input_bytes for i in prepared),
        )
        job = _Job(self, core.RequesterCore(self.peer_id, spec), prepared, max_output_bytes, progress)
        results = await job.run()
        out: list[TaskResult | TaskFailed] = []
        for index, res in enumerate(results):
            if isinstance(res, TaskResult):
                out.append(res)
            else:
                failure = TaskFailed(f"task {kind!r} item {index} failed: {res}")
                if not return_exceptions:
                    raise failure
                out.append(failure)
        return out


def _lane(lane: TensorLane | None) -> TensorLane:
    if lane is None:
        raise LocalProtocolError("no tensor lane")  # unreachable: via_lane implies a lane
    return lane


def _public_key_of(peer_id: str) -> bytes:
    """The Ed25519 public key inside an Ed25519 peer id (identity multihash)."""
    from libp2p.peer.id import ID

    raw = ID.from_base58(peer_id).to_bytes()
    if len(raw) != 38 or raw[:6] != bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20]):
        raise IntegrityError("peer id does not embed an Ed25519 key", peer=peer_id)
    return bytes(raw[6:])


class _Job:
    """The trio side of one :class:`~p2pcompute.tasks.negotiation.RequesterCore`."""

    def __init__(
        self,
        service: TaskService,
        requester: core.RequesterCore,
        items: list[_Item],
        max_output_bytes: int,
        progress: ProgressFn | None,
    ) -> None:
        self.service = service
        self.core = requester
        self.items = items
        self.max_output_bytes = max_output_bytes
        self.progress = progress
        self.results: list[TaskResult | str | None] = [None] * len(items)
        self.pending_results: dict[bytes, TaskResult] = {}
        self.leases: dict[bytes, _RLeaseIO] = {}
        self.wake = trio.Event()
        self.nursery: trio.Nursery | None = None
        self.finished = 0
        self.in_flight = 0  # receipts being delivered and recorded
        self.t0 = 0.0

    async def run(self) -> list[TaskResult | str | None]:
        svc = self.service
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                self.t0 = trio.current_time()
                self.do(self.core.start(self.t0))
                while not self.core.done or self.in_flight:
                    deadline = self.core.next_deadline()
                    with trio.move_on_at(deadline if deadline is not None else math.inf):
                        await self.wake.wait()
                    self.wake = trio.Event()
                    self.do(self.core.tick(trio.current_time()), wake=False)
            finally:
                for rid in list(svc._jobs):
                    if svc._jobs[rid] is self:
                        del svc._jobs[rid]
                if not self.core.done:
                    self.do(self.core.cancel(trio.current_time()))
                nursery.cancel_scope.cancel()
        return self.results

    def do(self, actions: list[core.Action], *, wake: bool = True) -> None:
        """Perform the requester core's actions; ``wake`` the job's clock unless it is the caller."""
        assert self.nursery is not None
        svc = self.service
        for a in actions:
            if isinstance(a, core.Publish):
                request = core.with_issued(a.request, time.time())
                svc._jobs[request.request_id] = self
                self.nursery.start_soon(self._publish, request)
            elif isinstance(a, core.SendAccept):
                io = _RLeaseIO()
                self.leases[a.lease_id] = io
                self.nursery.start_soon(self._lease, a, io)
            elif isinstance(a, core.SendHeartbeat):
                self.nursery.start_soon(
                    self._send,
                    a.lease_id,
                    {"t": "task-heartbeat", "v": 1, "lease_id": a.lease_id, "seq": a.seq},
                )
            elif isinstance(a, core.SendCancel):
                msg = {"t": "task-cancel", "v": 1, "lease_id": a.lease_id, "reason": a.reason[:1000]}
                self.nursery.start_soon(self._send, a.lease_id, msg)
            elif isinstance(a, core.SendInputs):
                self.nursery.start_soon(self._send_inputs, a)
            elif isinstance(a, core.CloseLease):
                closing = self.leases.get(a.lease_id)
                if closing is not None:
                    # let a queued cancel go out first, then drop the stream
                    self.nursery.start_soon(self._close_later, a.lease_id, closing)
            elif isinstance(a, core.ItemDone):
                result = self.pending_results.pop(a.lease_id)
                self.results[a.item] = result
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

    async def _publish(self, request: Any) -> None:
        try:
            await self.service.node.publish(TOPIC, seal_request(request, self.service.identity))
        except P2PComputeError as exc:
            log.info("publishing a task request failed: %s", exc)

    async def _close_later(self, lease_id: bytes, io: _RLeaseIO) -> None:
        await trio.lowlevel.checkpoint()
        with trio.move_on_after(2):
            async with io.lock:
                pass
        if self.leases.get(lease_id) is io:
            del self.leases[lease_id]
        io.scope.cancel()

    async def _send(self, lease_id: bytes, msg: dict[str, Any]) -> None:
        """Send on the lease's stream if it still has one (closing the stream also ends the lease)."""
        io = self.leases.get(lease_id)
        if io is None or io.stream is None:
            return
        stream = io.stream
        with contextlib.suppress(P2PComputeError), trio.move_on_after(10):
            async with io.lock:
                await stream.send_msg(msg)

    def _lost(self, lease_id: bytes, reason: str) -> None:
        if lease_id in self.leases:
            self.do(self.core.lease_lost(lease_id, reason, trio.current_time()))

    async def _lease(self, accept: core.SendAccept, io: _RLeaseIO) -> None:
        lease_id = accept.lease_id
        item = self.items[accept.item]
        with io.scope:
            try:
                stream = await self.service.node.open_stream(
                    accept.to,
                    LEASE_PROTOCOL,
                    timeout=self.core.spec.accept_timeout,
                    max_frame=LEASE_MAX_FRAME,
                )
            except P2PComputeError as exc:  # PeerUnreachable, PeerTimeout, PeerGone ...
                self._lost(lease_id, f"cannot reach provider: {exc}")
                return
            io.stream = stream
            try:
                async with io.lock:
                    await stream.send_frame(
                        ACCEPT.build(
                            lease_id=lease_id,
                            offer_id=accept.offer.offer_id,
                            request_id=accept.offer.request_id,
                            params=item.params_bytes,
                            input_bytes=item.input_bytes,
                            input_digest=item.input_digest,
                            lane=self.service.lane is not None,
                        )
                    )
                await self._read_lease(stream, accept, io)
            except (PeerGone, RemoteProtocolError) as exc:
                self._lost(lease_id, f"lease stream failed: {exc}")
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await stream.close()

    async def _read_lease(self, stream: FramedStream, accept: core.SendAccept, io: _RLeaseIO) -> None:
        lease_id, provider = accept.lease_id, accept.to
        allowed = frozenset({"task-grant", "task-reject", "task-heartbeat", "task-result", "task-error"})
        while True:
            m = parse_lease_message(await stream.recv_frame(), peer=provider, allowed=allowed)
            if m["lease_id"] != lease_id:
                raise MalformedMessage("message for another lease on this stream", peer=provider)
            now = trio.current_time()
            kind = m["t"]
            if kind == "task-grant":
                io.via_lane = bool(m["lane"]) and self.service.lane is not None
                io.granted_at = now
                self.do(self.core.handle_grant(provider, lease_id, now))
            elif kind == "task-reject":
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

    async def _take_result(
        self, stream: FramedStream, accept: core.SendAccept, io: _RLeaseIO, m: dict[str, Any]
    ) -> None:
        lease_id, provider = accept.lease_id, accept.to
        item = self.items[accept.item]
        svc = self.service

        def touch() -> None:
            self.core.handle_heartbeat(provider, lease_id, trio.current_time())

        try:
            if m["output_bytes"] > self.max_output_bytes:
                raise IntegrityError(f"outputs of {m['output_bytes']} bytes over our cap", peer=provider)
            if m["output_digest"] == EMPTY_DIGEST:
                outputs: dict[str, torch.Tensor] = {}
            elif io.via_lane:
                async with trio.open_nursery() as keepalive:

                    async def beat() -> None:
                        while True:
                            touch()
                            await trio.sleep(1.0)

                    keepalive.start_soon(beat)
                    outputs = await _lane(svc.lane).receive(
                        provider, f"task/{lease_id.hex()}/out", timeout=600
                    )
                    keepalive.cancel_scope.cancel()
            else:
                header = await stream.recv_frame(TENSORS_HEADER.max_size)
                outputs = await _recv_tensors(stream, header, cap=m["output_bytes"], touch=touch)
            digest = tensor_digest(outputs)
            if digest != m["output_digest"]:
                raise IntegrityError("outputs do not match their digest", peer=provider)
            info = decode(m["info"], max_size=MAX_PARAMS, peer=provider)
            if not isinstance(info, dict):
                raise MalformedMessage("result info is not a map", peer=provider)
            receipt = countersign(
                m["receipt_body"],
                m["provider_sig"],
                svc.identity,
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
                    "output_bytes": sum(_nbytes(t) for t in outputs.values()),
                },
                peer=provider,
                wall=time.time(),
            )
        except (RemoteProtocolError, PeerGone) as exc:
            svc._bump("bad_receipts")
            log.info("result of lease %s from %s refused: %s", lease_id.hex(), provider, exc)
            self.do(
                self.core.handle_error(provider, lease_id, f"bad result: {exc}", True, trio.current_time())
            )
            return
        now = trio.current_time()
        self.pending_results[lease_id] = TaskResult(
            outputs, info, provider, receipt, io.granted_at - self.t0, now - self.t0
        )
        actions = self.core.handle_result(provider, lease_id, trio.current_time())
        if not any(isinstance(a, core.ItemDone) for a in actions):
            self.pending_results.pop(lease_id, None)
            return
        self.in_flight += 1
        try:
            self.do(actions)
            with contextlib.suppress(P2PComputeError), trio.move_on_after(10):
                async with io.lock:
                    await stream.send_msg(
                        {"t": "task-receipt", "v": 1, "lease_id": lease_id, "receipt": receipt.encode()}
                    )
            svc._bump("receipts")
            await svc._append(receipt, "requester")
        finally:
            self.in_flight -= 1
            self.wake.set()

    async def _send_inputs(self, a: core.SendInputs) -> None:
        io = self.leases.get(a.lease_id)
        item = self.items[a.item]
        if io is None or io.stream is None or not item.tensors:
            return
        try:
            if io.via_lane:
                await _lane(self.service.lane).send(
                    a.to, f"task/{a.lease_id.hex()}/in", item.tensors, timeout=600
                )
            else:
                async with io.lock:
                    await _send_tensors(io.stream, item.tensors)
        except (P2PComputeError, trio.TooSlowError) as exc:
            self._lost(a.lease_id, f"sending inputs failed: {exc}")


@contextlib.asynccontextmanager
async def open_tasks(
    node: Node,
    registry: TaskRegistry | None = None,
    *,
    ledger: Ledger | str | Path | None = None,
    lane: TensorLane | None = None,
    capacity: int = 1,
    resources: Resources | None = None,
    heartbeat: float = 1.0,
    lease_ttl: float = 5.0,
    offer_valid_for: float = 10.0,
    max_input_bytes: int = 1 << 30,
) -> AsyncIterator[TaskService]:
    """Run the task service on ``node`` for the ``async with`` block.

    With a ``registry`` the node also sells: it answers requests for those kinds, at
    most ``capacity`` runs at once. ``ledger`` (a path or an open :class:`Ledger`)
    records every dual-signed receipt. ``lane`` (from :func:`p2pcompute.tensors.open_lane`)
    carries inputs and outputs; without it they travel in capped frames on the lease stream.

    Example::

        async with open_node(ident) as node, open_tasks(node, ledger="ledger.jsonl") as tasks:
            result = await tasks.run_task("matmul-bench", {}, {"n": 1024, "seed": 1})
    """
    own_ledger = None
    if isinstance(ledger, str | Path):
        own_ledger = ledger = Ledger.open(ledger, owner=node.peer_id)
    config = core.ProviderConfig(
        capacity=capacity,
        resources=resources or Resources(cpus=float(capacity)),
        heartbeat=heartbeat,
        lease_ttl=lease_ttl,
        offer_valid_for=offer_valid_for,
        max_input_bytes=max_input_bytes,
    )
    service = TaskService(node, registry, config, ledger=ledger, lane=lane)
    try:
        async with trio.open_nursery() as nursery:
            await service._start(nursery)
            try:
                yield service
            finally:
                service._close()
                nursery.cancel_scope.cancel()
    finally:
        if own_ledger is not None:
            own_ledger.close()


@contextlib.asynccontextmanager
async def serve_tasks(
    node: Node, registry: TaskRegistry | None = None, **options: Any
) -> AsyncIterator[TaskService]:
    """Sell the built-in kinds plus ``registry``'s on ``node`` (what ``p2pcompute peer --tasks`` runs).

    Example::

        async with open_node(ident, bootstrap=boot) as node:
            async with serve_tasks(node, load_registry("lab.tasks:registry"), capacity=2):
                await trio.sleep_forever()
    """
    full = builtin_registry() if registry is None else builtin_registry().merged(registry)
    async with open_tasks(node, full, **options) as service:
        yield service


__all__ = [
    "LEASE_PROTOCOL",
    "OFFER_PROTOCOL",
    "TOPIC",
    "TaskResult",
    "TaskService",
    "open_tasks",
    "serve_tasks",
]
