"""The task service: a thin trio facade over the provider and requester halves.

Transport (docs/protocol/tasks.md):

* requests: GossipSub topic ``tasks/1`` (signed ``task-request`` envelopes);
* offers: provider -> requester, one signed frame on ``/p2pcompute/tasks/offer/1.0.0``;
* a lease: requester -> provider stream ``/p2pcompute/tasks/lease/1.0.0`` carrying
  accept, grant/reject, heartbeats both ways, cancel, result/error and the receipt;
* inputs and outputs: the tensor lane (:mod:`p2pcompute.tensors`) under the tags
  ``task/<lease>/in`` and ``task/<lease>/out`` when a lane is given, else in-stream
  frames (:mod:`p2pcompute.tasks.frames`).

:func:`open_tasks` gives a :class:`TaskService` (requester always; provider when a
registry is given); :func:`serve_tasks` is the provider form used by ``p2pcompute peer``.
The provider half lives in :mod:`p2pcompute.tasks.provider` (:class:`ProviderSide`, one
:class:`ProviderLease` per lease), the requester half in :mod:`p2pcompute.tasks.requester`
(one :class:`RequesterJob` per ``map_tasks`` call); this module wires them to a node and
keeps the counters. Every background task lives in the service's nursery or in a lease
handler whose cancel scope the service cancels on exit.

Imports :mod:`p2pcompute.tasks` (cores, messages, registry, receipts, ledger, halves),
:mod:`p2pcompute.overlay`, :mod:`p2pcompute.tensors`, :mod:`p2pcompute.deadlines`, errors.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import trio

from p2pcompute.deadlines import deadline
from p2pcompute.errors import MalformedMessage, P2PComputeError, ProtocolError, TaskFailed
from p2pcompute.overlay import FramedStream, Node
from p2pcompute.progress import Progress, counting, log_progress
from p2pcompute.tasks import negotiation as core
from p2pcompute.tasks.builtin import builtin_registry
from p2pcompute.tasks.frames import CHUNK, EMPTY_DIGEST, LEASE_MAX_FRAME
from p2pcompute.tasks.ledger import Ledger
from p2pcompute.tasks.messages import Offer, Resources, open_offer, seal_offer
from p2pcompute.tasks.provider import NO_FAULTS, ProviderContext, ProviderFaults, ProviderSide
from p2pcompute.tasks.receipts import Receipt
from p2pcompute.tasks.registry import TaskRegistry
from p2pcompute.tasks.requester import (
    CheckFn,
    ProgressFn,
    RequesterContext,
    RequesterJob,
    TaskResult,
    job_spec,
    prepare_items,
)
from p2pcompute.tasks.sessions import SessionPool
from p2pcompute.tensors import TensorLane

log = logging.getLogger(__name__)

TOPIC = "tasks/1"
OFFER_PROTOCOL = "/p2pcompute/tasks/offer/1.0.0"
LEASE_PROTOCOL = "/p2pcompute/tasks/lease/1.0.0"


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
        faults: ProviderFaults = NO_FAULTS,
        session: float = 10.0,
    ) -> None:
        self.node = node
        self.session = session  # idle seconds map_tasks asks providers to keep a session open
        self.sessions = SessionPool(idle=session, connected=node.connected_peers)
        self.identity = node.identity
        self.peer_id = node.peer_id
        self.registry = registry
        self.ledger = ledger
        self.lane = lane
        self._ledger_lock = trio.Lock()
        self._routes: dict[bytes, RequesterJob] = {}
        self.stats: dict[str, int] = {
            "bad_requests": 0,
            "bad_offers": 0,
            "bad_receipts": 0,
            "receipts": 0,
            "blamed": 0,
            "bought": 0,
            "buy_failed": 0,
        }
        self.items_in_flight = 0  # items of map_tasks/run_task calls not yet ended (requester side)
        self._stats_changed = trio.Event()
        self._requester = RequesterContext(
            node,
            self.identity,
            lane,
            self._routes,
            TOPIC,
            LEASE_PROTOCOL,
            self._bump,
            self._append,
            self._blame,
            self.sessions,
        )
        self._side: ProviderSide | None = None
        if registry is not None:
            terms = {k.name: core.KindTerms(k.needs, k.price) for k in registry}
            ctx = ProviderContext(
                registry, self.identity, lane, self._bump, self._append, faults, self._blame
            )
            self._side = ProviderSide(
                core.ProviderCore(self.peer_id, terms, config), ctx, send_offer=self._send_offer
            )

    @property
    def provider(self) -> core.ProviderCore | None:
        """The provider's negotiation core (``None`` without a registry, or once closed)."""
        side = self._side
        return None if side is None or side.closed else side.core

    # -- lifecycle

    async def _start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.sessions.janitor)
        self.node.set_stream_handler(OFFER_PROTOCOL, self._on_offer_stream, max_frame=8192)
        # our requests go straight to every subscribed provider we are connected to, so a
        # mesh of peers that drop them only delays the ones further away (threat-model.md)
        self.node.flood(TOPIC)
        side = self._side
        if side is not None:
            await nursery.start(side.clock)
            self.node.subscribe(TOPIC, side.on_request)
            self.node.set_stream_handler(LEASE_PROTOCOL, side.on_lease_stream, max_frame=LEASE_MAX_FRAME)

    def _close(self) -> None:
        if self._side is not None:
            self._side.close()  # late gossip after exit is ignored

    def statistics(self) -> dict[str, Any]:
        """Counters of both roles (offers, grants, timeouts, receipts, items ``bought`` and
        ``buy_failed`` by ``map_tasks``/``run_task``, ``items_in_flight`` ...).

        Example::

            print(tasks.statistics()["provider"]["granted"])
        """
        out: dict[str, Any] = dict(self.stats)
        out["items_in_flight"] = self.items_in_flight
        if self.provider is not None:
            out["provider"] = self.provider.statistics()
        return out

    def _blame(self, peer: str, reason: str) -> None:
        """Report ``peer``'s protocol offence where no stream handler can raise it.

        Offences on streams that a peer opened to us are raised as :class:`RemoteProtocolError`
        from the handler (the node's handler wrapper counts them). A bad gossiped request, or a
        bad result on a lease stream we opened, is reported here: counted in ``blamed`` and
        passed to :meth:`Node.report_offence`, which feeds the peer's score.
        """
        self._bump("blamed")
        self.node.report_offence(peer, MalformedMessage(reason, peer=peer))

    def _bump(self, stat: str) -> None:
        self.stats[stat] += 1
        self._stats_changed.set()
        self._stats_changed = trio.Event()

    async def wait_for_stat(self, stat: str, at_least: int, *, timeout: float) -> int:
        """Wait until counter ``stat`` (see :attr:`stats`) reaches ``at_least`` (:class:`PeerTimeout`).

        Example::

            await tasks.wait_for_stat("receipts", 10, timeout=60)   # receipts recorded
        """
        with deadline(timeout, f"counter {stat} reaching {at_least} (it is {self.stats[stat]})"):
            while self.stats[stat] < at_least:
                await self._stats_changed.wait()
        return self.stats[stat]

    def providers(self) -> list[str]:
        """Peers known (through GossipSub) to listen for task requests.

        Example::

            print(len(tasks.providers()), "providers")
        """
        return self.node.topic_peers(TOPIC)

    async def wait_for_providers(self, n: int, *, timeout: float) -> list[str]:
        """Wait until at least ``n`` providers listen for requests (:class:`PeerTimeout` otherwise).

        Example::

            await tasks.wait_for_providers(4, timeout=30)
        """
        with deadline(timeout, f"finding {n} task providers"):
            # py-libp2p signals no change of peer_topics: poll it
            while len(found := self.providers()) < n:  # noqa: ASYNC110
                await trio.sleep(0.05)
        return found

    async def _append(self, receipt: Receipt, role: str) -> None:
        if self.ledger is None:
            return
        async with self._ledger_lock:
            if receipt.lease_id not in self.ledger:
                await trio.to_thread.run_sync(self.ledger.append, receipt, role)

    async def _send_offer(self, offer: Offer) -> None:
        raw = seal_offer(offer, self.identity)
        for attempt in range(2):  # py-libp2p sometimes fails a stream racing a fresh connection
            try:
                with deadline(10, "delivering an offer", peer=offer.requester):
                    stream = await self.node.open_stream(offer.requester, OFFER_PROTOCOL, timeout=5)
                    try:
                        await stream.send_frame(raw)
                    finally:
                        await stream.close()
                return
            except P2PComputeError as exc:
                log.info("offer to %s not delivered (attempt %d): %s", offer.requester, attempt + 1, exc)
                await trio.sleep(0.2)

    # -- requester side

    async def _on_offer_stream(self, stream: FramedStream) -> None:
        try:
            with deadline(10, "reading an offer", peer=stream.peer):
                raw = await stream.recv_frame(8192)
            offer = open_offer(raw, peer=stream.peer, expected_requester=self.peer_id)
        except ProtocolError:  # (an oversized frame too) the node's stream handler blames the peer
            self._bump("bad_offers")
            raise
        job = self._routes.get(offer.request_id)
        if job is not None:
            job.on_offer(offer)

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
        session: float | None = None,
        enough_offers: int | None = None,
        lease_ttl: float = 10.0,
        accept_timeout: float = 5.0,
        result_timeout: float | None = None,
        max_output_bytes: int = 1 << 30,
        progress: ProgressFn | None = None,
        return_exceptions: bool = False,
        providers: Collection[str] | None = None,
        check: CheckFn | None = None,
    ) -> list[TaskResult | TaskFailed]:
        """Spread ``items`` (``(tensors, params)`` pairs) over many providers; results in item order.

        At most ``parallel`` leases run at once; offers are reused while valid, so one
        request round can feed many items. ``progress(done, total)`` is called after each
        item (without it, more than one item are reported as plain INFO lines on the
        ``p2pcompute.progress`` logger; :func:`p2pcompute.progress.counting` adapts a
        :class:`~p2pcompute.progress.Progress` and its renderers to this callback).
        ``result_timeout`` (seconds from a grant to the result and its outputs; ``None``:
        only ``deadline``) sets aside a provider that keeps a lease alive without answering.
        ``providers`` keeps only offers from these peers (a pinned worker). ``session``
        (seconds; ``None``: the service's, 0: off) asks each provider to keep its offer open
        that long between leases: later calls of the same kind and terms then lease on the
        open session's stream at once, with no request and no offer window
        (docs/design/sessions.md). ``check(outputs,
        info, provider)`` runs on every result before its receipt is countersigned; raising
        :class:`~p2pcompute.errors.WorkRejected` refuses the work (no receipt, the provider
        set aside and blamed, the item retried elsewhere within ``retries``).
        A failed item raises :class:`TaskFailed` (or, with ``return_exceptions``,
        takes its place in the list). Bad params raise :class:`LocalProtocolError`, bad
        options :class:`ConfigError`.

        Example::

            results = await tasks.map_tasks("matmul", [({"a": a, "b": b}, {}) for a, b in pairs],
                                            parallel=8, progress=lambda d, n: print(f"{d}/{n}"))
            receipts = [r.receipt for r in results]
        """
        if not items:
            return []
        prepared = prepare_items(items)
        shown: Progress | None = None
        if progress is None and len(prepared) > 1:
            shown = Progress(f"{kind} tasks", total=len(prepared), unit="tasks", on_update=log_progress())
            progress = counting(shown)
        spec = job_spec(
            kind,
            prepared,
            needs=needs,
            max_price=max_price,
            parallel=parallel,
            retries=retries,
            deadline=deadline,
            offer_window=offer_window,
            enough_offers=enough_offers,
            accept_timeout=accept_timeout,
            result_timeout=result_timeout,
            lease_ttl=lease_ttl,
            providers=None if providers is None else frozenset(providers),
        )
        job = RequesterJob(
            self._requester,
            core.RequesterCore(self.peer_id, spec),
            prepared,
            max_output_bytes,
            progress,
            check,
            self.session if session is None else session,
        )
        self.items_in_flight += len(prepared)
        try:
            results = await job.run()
        finally:
            self.items_in_flight -= len(prepared)
            if shown is not None:
                shown.finish(ok=shown.done == shown.total)  # a no-op when every item ended
        out: list[TaskResult | TaskFailed] = []
        for index, res in enumerate(results):
            self._bump("bought" if isinstance(res, TaskResult) else "buy_failed")
            if isinstance(res, TaskResult):
                out.append(res)
            else:
                failure = TaskFailed(f"task {kind!r} item {index} failed: {res}")
                if not return_exceptions:
                    raise failure
                out.append(failure)
        return out


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
    max_leases_per_requester: int | None = None,
    input_deadline: float = 30.0,
    input_rate: float = float(1 << 20),
    result_deadline: float = 30.0,
    accept_deadline: float = 30.0,
    receipt_deadline: float = 30.0,
    faults: ProviderFaults = NO_FAULTS,
    session: float = 10.0,
    session_idle: float = 30.0,
) -> AsyncIterator[TaskService]:
    """Run the task service on ``node`` for the ``async with`` block.

    With a ``registry`` the node also sells: it answers requests for those kinds, at
    most ``capacity`` runs at once. ``ledger`` (a path or an open :class:`Ledger`)
    records every dual-signed receipt. ``lane`` (from :func:`p2pcompute.tensors.open_lane`)
    carries inputs and outputs; without it they travel in capped frames on the lease stream.
    ``faults`` is a test seam (:class:`ProviderFaults`): deliberate misbehaviour, none by default.
    ``session`` is how long (idle seconds) this node, buying, asks providers to keep a session
    open (0: none; a :meth:`~TaskService.map_tasks` call may ask otherwise); ``session_idle``
    is the most it grants, selling. ``max_leases_per_requester`` and the deadlines are those of
    :class:`~p2pcompute.tasks.negotiation.ProviderConfig` (docs/tasks.md, "Deadlines and limits").

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
        max_leases_per_requester=max_leases_per_requester,
        input_deadline=input_deadline,
        input_rate=input_rate,
        result_deadline=result_deadline,
        accept_deadline=accept_deadline,
        receipt_deadline=receipt_deadline,
        session_idle=session_idle,
    )
    service = TaskService(node, registry, config, ledger=ledger, lane=lane, faults=faults, session=session)
    try:
        async with trio.open_nursery() as nursery:
            await service._start(nursery)
            try:
                yield service
            finally:
                service._close()
                with trio.CancelScope(shield=True):
                    await service.sessions.aclose()
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
    "CHUNK",
    "EMPTY_DIGEST",
    "LEASE_MAX_FRAME",
    "LEASE_PROTOCOL",
    "NO_FAULTS",
    "OFFER_PROTOCOL",
    "TOPIC",
    "ProviderFaults",
    "TaskResult",
    "TaskService",
    "open_tasks",
    "serve_tasks",
]
