"""The synchronous facade: a training script stays synchronous, trio runs in a background thread.

:class:`Swarm` starts one thread that runs ``trio.run``; inside it a node
(:func:`~p2pcompute.overlay.open_node`), a tensor lane, the collective and a state server
live in one nursery. The user's thread never runs an event loop: it hands coroutines over
with :meth:`Swarm.call` (``trio.from_thread.run`` with a timeout) and blocks until they end.
Closing the swarm (end of ``with``, an exception in the training loop, Ctrl-C, or
interpreter exit) cancels that nursery, waits for ``trio.run`` to return and joins the
thread, so nothing is left behind. No fork, no second loop in the user's thread.

:meth:`Swarm.diloco` builds a :class:`~p2pcompute.training.diloco.DiLoCo` wired to the
swarm: averaging through :class:`CollectiveAverager`, the shared state published after every
outer step for joiners, elastic join (download from peers at their next outer step, or
resume from our own checkpoint, whichever is newer) and a re-sync when a round left us alone
while others went on.

Uses :mod:`p2pcompute.overlay`, :mod:`p2pcompute.tensors`, :mod:`p2pcompute.collective`,
:mod:`p2pcompute.identity` and the rest of :mod:`p2pcompute.training`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Collection, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import torch
import trio

from p2pcompute.collective.aggregate import Aggregator
from p2pcompute.deadlines import deadline
from p2pcompute.errors import (
    ConfigError,
    LocalProtocolError,
    P2PComputeError,
    PeerTimeout,
    PeerUnreachable,
    TaskFailed,
)
from p2pcompute.identity import Identity
from p2pcompute.progress import ProgressFn
from p2pcompute.training import checkpoint as ckpt
from p2pcompute.training.averager import Averager, AveragingOutcome, SoloAverager, check_codec
from p2pcompute.training.diloco import DiLoCo, StepReport, TrainingAlone
from p2pcompute.training.state import TrainingState, load_checkpoint
from p2pcompute.training.statesync import StateServer, download_state, fetch_manifest

log = logging.getLogger(__name__)
T = TypeVar("T")
_RUN_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
OVERLAP_SWITCH_INTERVAL = 0.0005  # seconds; see Swarm.diloco
#: join_early's default cap on a member's weight, as a multiple of its group's median weight
JOIN_EARLY_WEIGHT_CAP = 4.0
PARTNER_TTL = 600.0  # seconds a peer seen in our run (its state, or a round with us) counts as a partner


class JoinFailed(P2PComputeError):
    """Peers of this run hold a newer state but it could not be downloaded (``require_join``)."""


class DuplicateIdentity(ConfigError):
    """Another process uses this peer's key file: the swarm keeps one of the two, the other never averages.

    Raised by :meth:`Swarm.diloco` and at the next outer step of the process that notices (the
    one hidden from the swarm). Give each process its own key file.
    """


class CollectiveAverager:
    """An :class:`~p2pcompute.training.averager.Averager` over :class:`p2pcompute.collective.Collective`.

    Each round is matched under ``run`` with the key ``outer-<n>``, ``n`` the outer step the round
    produces (``round_id + 1``, the :attr:`StepReport.outer_step` the caller will see, so the
    collective's log lines and round log name the same number); bytes are the
    lane's bytes sent during the round. ``partners`` (async, optional) names (or counts) the
    peers known to train the same run and model and ready for this round: with none, the round
    is solo at once, without matchmaking; otherwise matchmaking stops waiting once they are all
    there. A round that finds no group or fails leaves the tensors untouched and raises
    :class:`TaskFailed` with the collective's reason (DiLoCo then steps on its own
    pseudo-gradient and the swarm re-syncs it from peers).

    Example::

        avg = CollectiveAverager(coll, lane, "my-run", target=8, min_size=2)
        outcome = await avg.average([delta], weight=64.0, round_id=3)
    """

    def __init__(
        self,
        collective: Any,
        lane: Any,
        run: str,
        *,
        target: int = 8,
        min_size: int = 2,
        matchmaking_timeout: float = 30.0,
        patience: float | None = 3.0,
        max_attempts: int = 3,
        others: Callable[[], int] | None = None,
        partners: Callable[[], Awaitable[int | Collection[str]]] | None = None,
        forget: Callable[[Sequence[str]], None] | None = None,
        identity: Callable[[], None] | None = None,
    ) -> None:
        #: raises :class:`DuplicateIdentity` before a round when another process uses our key
        self.identity = identity
        #: told the peers a round left out (dead or silent), so they stop counting as partners
        self.forget = forget
        self.collective = collective
        self.others = others
        self.partners = partners
        self.lane = lane
        self.run = run
        self.target = target
        self.min_size = min_size
        self.matchmaking_timeout = matchmaking_timeout
        self.patience = patience
        self.max_attempts = max_attempts
        self.last_reason = ""

    @property
    def peer_id(self) -> str:
        return str(self.collective.peer_id)

    async def average(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        weight: float,
        round_id: int,
        compression: str = "none",
        timeout: float | None = None,
        aggregator: str | Aggregator = "mean",
        weight_cap: float | None = None,
    ) -> AveragingOutcome:
        check_codec(compression)
        if self.identity is not None:
            self.identity()
        if self.others is not None and self.others() == 0:
            # Nobody to average with: do not sit through matchmaking.
            await trio.lowlevel.checkpoint()
            self.last_reason = "no other peer known"
            return AveragingOutcome((self.peer_id,), total_weight=weight)
        expected: int | Collection[str] | None = None
        if self.partners is not None:
            expected = await self.partners()
            if not expected:
                # Peers there may be (providers, other runs), but none trains this run and model.
                self.last_reason = "no other peer of this run known"
                return AveragingOutcome((self.peer_id,), total_weight=weight)
        start = time.perf_counter()
        before = self.lane.statistics()
        result = await self.collective.average(
            self.run,
            f"outer-{round_id + 1}",  # the outer step this round produces
            list(tensors),
            weight=weight,
            target=self.target,
            min_size=self.min_size,
            matchmaking_timeout=timeout or self.matchmaking_timeout,
            patience=self.patience,
            codec=compression,
            max_attempts=self.max_attempts,
            aggregator=aggregator,
            expected=expected,  # every known partner here: no need to wait out patience
            weight_cap=weight_cap,
        )
        if self.forget is not None and result.excluded:
            self.forget(tuple(result.excluded))
        if self.forget is not None and result.ok and expected is not None and not isinstance(expected, int):
            # an expected partner that did not come (slow, paused, still catching up) costs one
            # patience, not one per round: it is expected again once it averages with us or
            # says it joined
            missing = set(expected) - set(result.participants)
            if missing:
                self.forget(tuple(sorted(missing)))
        after = self.lane.statistics()
        sent = after.bytes_sent - before.bytes_sent
        received = after.bytes_received - before.bytes_received
        seconds = time.perf_counter() - start
        if not result.ok:
            # Tensors are untouched; DiLoCo steps on its own pseudo-gradient and reports why.
            self.last_reason = f"{result.status.name}: {result.reason}"
            # numbered as the outer step it produces (StepReport.outer_step), not the match key
            raise TaskFailed(
                f"averaging for outer step {round_id + 1} ended {self.last_reason} after {seconds:.1f} s"
            )
        self.last_reason = ""
        return AveragingOutcome(
            tuple(result.participants), sent, received, seconds, result.weight_total, tuple(result.excluded),
            tuple(result.clipped),
        )


class SwarmDiLoCo(DiLoCo):
    """DiLoCo bound to a :class:`Swarm`: publishes its state and re-syncs when left behind."""

    #: whether joining and re-syncing work with an averager passed to :meth:`Swarm.diloco`
    #: (a sharded peer's rank 0 hands the state to its other ranks; see training/ranks.py)
    joins_with_averager = False

    def __init__(self, swarm: Swarm, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.swarm = swarm
        self.resyncs = 0
        #: re-sync from peers after a solo round (off for a sharded rank: one rank cannot re-sync alone)
        self.elastic = True

    async def astep(self, samples: float = 1.0) -> StepReport | None:
        return await self._after(super().astep(samples))

    async def flush(self) -> StepReport | None:
        return await self._after(super().flush())

    async def _after(self, step: Awaitable[StepReport | None]) -> StepReport | None:
        alone: TrainingAlone | None = None
        try:
            report = await step
        except TrainingAlone as exc:  # the step was applied: publish and re-sync, then tell the caller
            alone, report = exc, exc.report
        if report is not None:
            await self._settle(report)
        if alone is not None:
            raise alone
        return report

    async def _settle(self, report: StepReport) -> None:
        """After an outer step: note the partners, publish the state, re-sync after a solo round."""
        if self.mode == "diloco":
            now = time.monotonic()
            for peer in report.participants:  # whoever averaged with us trains this run
                if peer != self.averager.peer_id:
                    self.swarm._partners[peer] = now
            await self.swarm._apublish(self)
            if report.participants == (self.averager.peer_id,) and self.swarm._network and self.elastic:
                await self.swarm._resync(self)


class Swarm:
    """A p2pcompute peer for synchronous training scripts.

    ``bootstrap``: multiaddrs of nodes to join through (none: the first peer of a swarm, or a
    swarm of one with ``network=False``). ``key``: path of the identity key file (created on
    first use) or an :class:`Identity`. ``run`` names the training run: peers average only
    with peers of the same run (and model). ``group_size``/``min_group``/``patience``: matchmaking.
    ``listen``: multiaddrs to listen on (default every interface, a port the OS picks; loopback
    is advertised only when it is all there is, and a peer behind NAT advertises its relayed
    address instead, docs/design/nat.md).

    Attributes: ``peer_id`` (this peer's id, fixed by its key), ``addrs`` (the multiaddrs it
    listens on, ending in ``/p2p/<peer_id>``: what others pass as ``bootstrap``; empty until
    started or without network), ``run_name``, ``averager`` (the swarm's averager),
    ``running``; :meth:`peers` lists the other live peers of any run; :meth:`identity_clones`
    says where another process with this key was seen (:class:`DuplicateIdentity`). ``progress``: a callback
    for the progress of a state download (:mod:`p2pcompute.progress`; it runs on the swarm's
    thread), e.g. ``swarm.progress = progress_renderer()``; by default INFO log lines.

    Example::

        with Swarm(bootstrap=["/ip4/10.0.0.1/tcp/4001/p2p/12D3KooW..."], key="peer.key") as swarm:
            opt = swarm.diloco(model, torch.optim.AdamW(model.parameters()), inner_steps=50)
            for x, y in batches:
                loss_fn(model(x), y).backward()
                opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        bootstrap: Sequence[str] = (),
        *,
        key: str | os.PathLike[str] | Identity | None = None,
        listen: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",),
        run: str = "default",
        swarm: str = "default",
        network: bool = True,
        group_size: int = 8,
        min_group: int = 2,
        patience: float = 3.0,
        matchmaking_timeout: float = 30.0,
        start_timeout: float = 60.0,
        collective_options: dict[str, Any] | None = None,
        **node_options: Any,
    ) -> None:
        if not 2 <= min_group <= group_size:
            raise ConfigError("need 2 <= min_group <= group_size")
        if not _RUN_NAME.match(run):
            raise ConfigError(f"run name {run!r}: 1 to 100 of A-Z a-z 0-9 _ . - (it names a gossip topic)")
        if isinstance(key, Identity):
            self.identity = key
        elif key is not None:
            self.identity = Identity.load_or_create(Path(key).expanduser())
        else:
            self.identity = Identity.generate()
        self.peer_id = self.identity.peer_id
        self.bootstrap = list(bootstrap)
        self.listen = list(listen)
        self.run_name = run
        self.swarm_name = swarm
        self._network = network
        self.group_size = group_size
        self.min_group = min_group
        self.patience = patience
        self.matchmaking_timeout = matchmaking_timeout
        self.start_timeout = start_timeout
        self.collective_options = dict(collective_options or {})
        self.node_options = node_options
        self.node: Any = None
        self.lane: Any = None
        self.collective: Any = None
        self.server: StateServer | None = None
        self.averager: Averager = SoloAverager(self.peer_id)
        self.addrs: list[str] = []
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._closed = False
        self._tags: dict[str, str] = {}
        self._partners: dict[str, float] = {}  # peer id -> when it last served our run's state
        self._joins_taken: dict[str, float] = {}  # peer id -> its join note taken into _partners
        self._obs: tuple[Any, Any] | None = None  # (Observer, its registry), made on first use
        self.progress: ProgressFn | None = None
        self._nursery: trio.Nursery | None = None  # background rounds of overlapped DiLoCo
        self._unwatch: Callable[[], None] | None = None  # stops join_early's advert listener

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Swarm:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> Swarm:
        """Start the background thread and wait until the peer is up (or raise why it is not)."""
        if self._closed:
            raise LocalProtocolError("this Swarm was closed; make a new one")
        if self._thread is not None:
            return self
        name = f"p2pcompute-swarm-{self.peer_id[-6:]}"
        self._thread = threading.Thread(target=self._thread_main, name=name)
        self._thread.daemon = True  # interpreter exit must not hang on it; atexit closes it first
        self._thread.start()
        _live.add(self)
        if not self._ready.wait(self.start_timeout) or self._token is None:
            self.close()
            if self._error is not None:
                raise self._error
            raise PeerTimeout(f"the swarm did not start within {self.start_timeout} s")
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop everything (idempotent): cancels the trio side and joins its thread."""
        self._closed = True
        _live.discard(self)
        thread = self._thread
        if thread is None:
            return
        token, stop = self._token, self._stop
        if token is not None and stop is not None and thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(stop.set, trio_token=token)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("swarm thread did not stop within %s s", timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def _thread_main(self) -> None:
        # Ctrl-C belongs to the user's thread: block SIGINT here so the kernel delivers it there
        # (threads trio starts from this one inherit the mask).
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            trio.run(self._main)
        except BaseException as exc:  # handed to the user's thread by start()
            self._error = _unwrap(exc)
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._stop = trio.Event()
        async with contextlib.AsyncExitStack() as stack:
            if self._network:
                from p2pcompute.collective import Timeouts, open_collective
                from p2pcompute.overlay import open_node
                from p2pcompute.tensors import open_lane

                self.node = await stack.enter_async_context(
                    open_node(self.identity, listen=self.listen, bootstrap=self.bootstrap,
                              swarm=self.swarm_name, **self.node_options)
                )
                self.addrs = list(self.node.addrs)
                self.lane = await stack.enter_async_context(open_lane(self.node))
                options = {"timeouts": Timeouts(), **self.collective_options}
                self.collective = await stack.enter_async_context(
                    open_collective(self.node, self.lane, **options)
                )
                self.server = StateServer(self.node, self.identity)
                self.averager = CollectiveAverager(
                    self.collective, self.lane, self.run_name, target=self.group_size,
                    min_size=self.min_group, matchmaking_timeout=self.matchmaking_timeout,
                    patience=self.patience, others=self._count_others, partners=self._count_partners,
                    forget=self._forget_partners, identity=self._check_identity,
                )
            # overlapped DiLoCo's background rounds: cancelled first when the swarm closes
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(self._nursery.cancel_scope.cancel)
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()
            await self._announce("leave")  # partners stop expecting us now, not at a timeout

    async def _announce(self, state: str) -> None:
        """Tell our run's partners we joined (we hold the state) or are leaving; at most 2 s."""
        if not isinstance(self.averager, CollectiveAverager) or self.node is None:
            return
        run = self.averager.run
        connected = set(self.node.connected_peers())
        peers = [p for p in {*self._partners, *self.collective.noted(run, "join")} if p in connected]
        if not peers:
            return
        with trio.CancelScope(shield=True):  # a close is a cancellation: the note goes out first
            took = await self.collective.announce(run, peers, state, timeout=2.0)
        log.info("told %d of %d partner(s) we %s run %r", took, len(peers),
                 "are leaving" if state == "leave" else "joined", self.run_name)

    # -- calls from the user's thread -------------------------------------------------------

    def call(self, fn: Callable[[], Awaitable[T]], *, timeout: float | None = None) -> T:
        """Run ``await fn()`` on the swarm's trio thread and return its result (blocking).

        ``timeout`` raises :class:`PeerTimeout` when exceeded; exceptions of ``fn`` propagate.

        Example::

            peers = swarm.call(lambda: swarm.node.wait_for_peers(2, timeout=30))
        """
        if not self.running or self._token is None:
            raise LocalProtocolError("the swarm is not running (use `with Swarm(...)` or start())")

        async def bounded() -> T:
            with deadline(timeout, "the call"):
                return await fn()
            raise AssertionError("unreachable: deadline() raises when it cancels the body")

        try:
            return trio.from_thread.run(bounded, trio_token=self._token)
        except trio.RunFinishedError:
            raise LocalProtocolError("the swarm stopped") from None

    def wait_for_peers(self, n: int, *, timeout: float) -> list[str]:
        """Block until ``n`` other peers are known; their ids. :class:`PeerTimeout` after ``timeout``."""
        if not self._network:
            return []
        records = self.call(lambda: self.node.wait_for_peers(n, timeout=timeout, role="peer"))
        return [r.peer_id for r in records]

    def peers(self) -> list[str]:
        """Ids of the other live peers (not bootstrap nodes) this node knows now."""
        if not self._network or self.node is None:
            return []
        return self.call(self._peer_ids)

    def metrics(self) -> dict[str, Any]:
        """This node's figures, the same the ``/metrics`` of ``p2pcompute peer`` shows, as a dict:
        peers, adverts, offences, bytes by protocol, lane, averaging rounds by outcome (with
        participants and seconds), process RSS ... (see docs/operations.md).

        Example::

            figures = swarm.metrics()
            print(figures["rounds"]["by_outcome"], figures["lane"]["bytes_sent"])
        """
        return self.call(self._afigures)

    def metrics_text(self) -> str:
        """The same figures as Prometheus text (what a scraper of ``/metrics`` would read).

        Example::

            Path("node.prom").write_text(swarm.metrics_text())   # for node_exporter's textfile
        """
        return self.call(self._atext)

    def _observer(self) -> Any:
        if not self._network or self.node is None:
            raise LocalProtocolError("a swarm without network (network=False) has no metrics")
        if self._obs is None:
            from p2pcompute.observe import Observer, node_registry

            obs = Observer(self.node, role="trainer", lane=self.lane, collective=self.collective)
            self._obs = (obs, node_registry(obs))
        return self._obs

    async def _afigures(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        figures: dict[str, Any] = self._observer()[0].figures()
        return figures

    async def _atext(self) -> str:
        await trio.lowlevel.checkpoint()
        from p2pcompute.observe import metrics_text

        return metrics_text(self._observer()[1]).decode()

    def identity_clones(self) -> list[str]:
        """Addresses at which another process with this peer's key was seen, newest first ([]: none).

        Two processes with one key file share a peer id and the swarm keeps only one of them;
        the hidden one notices when the other's advert reaches it, and its next outer step (or
        :meth:`diloco`) raises :class:`DuplicateIdentity`.

        Example::

            if swarm.identity_clones():
                print("another process uses our key at", swarm.identity_clones()[0])
        """
        if not self._network or self.node is None:
            return []
        return list(self.node.identity_clones())

    def _check_identity(self) -> None:
        clones = self.identity_clones()
        if clones:
            raise DuplicateIdentity(
                f"another process uses this peer's key (peer id {self.peer_id}) at {clones[0]}: the swarm "
                f"keeps only one of them, so this one would never average; give each process its own key file"
            )

    def _count_others(self) -> int:
        return sum(1 for r in self.node.peers.alive() if r.role == "peer" and r.peer_id != self.peer_id)

    async def _count_partners(self) -> int | set[str]:
        """The partners to expect in the next round: peers known to train our run and model that
        are connected (a killed one's connection is closed), did not say they are leaving and are
        ready (a joiner counts once it said it holds the state). Asks the peers again when none is
        fresh."""
        if not self._tags:
            return self._count_others()

        def fresh() -> set[str]:
            now = time.monotonic()
            run = getattr(self.averager, "run", "")
            for p, noted_at in self.collective.noted(run, "join").items():
                if self._joins_taken.get(p) != noted_at:  # a joiner that has the state (each note
                    self._joins_taken[p] = noted_at  # once: a round may drop it again, below)
                    self._partners[p] = now
            left = set(self.collective.noted(run, "leave"))
            return {
                p for p, seen in self._partners.items()
                if now - seen < PARTNER_TTL and p in alive and p in connected and p not in left
            }

        alive = set(await self._peer_ids())  # a partner that left drops out of the peer table
        connected = set(self.node.connected_peers())
        found = fresh()
        if not found:
            await self._offers(timeout=2.0)
            alive, connected = set(await self._peer_ids()), set(self.node.connected_peers())
            found = fresh()
        return found

    def _forget_partners(self, peers: Sequence[str]) -> None:
        # a partner a round left out (killed, paused) is not waited for in the next matchmaking;
        # it counts again once it serves our run's state or averages with us
        for p in peers:
            self._partners.pop(p, None)

    async def _peer_ids(self) -> list[str]:
        """The other live peers, less those that told us they left our run (not asked for state)."""
        await trio.lowlevel.checkpoint()
        if self.node is None:
            return []
        left = self.collective.noted(getattr(self.averager, "run", ""), "leave") if self.collective else {}
        return [
            r.peer_id for r in self.node.peers.alive()
            if r.role == "peer" and r.peer_id != self.peer_id and r.peer_id not in left
        ]

    # -- training ---------------------------------------------------------------------------

    def diloco(
        self,
        model: torch.nn.Module | Sequence[tuple[str, torch.Tensor]],
        inner_optimizer: torch.optim.Optimizer,
        *,
        inner_steps: int = 100,
        checkpoint: str | os.PathLike[str] | None = None,
        join: bool = True,
        join_timeout: float = 120.0,
        require_join: bool = True,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        averager: Averager | None = None,
        _cls: type[SwarmDiLoCo] = SwarmDiLoCo,
        **options: Any,
    ) -> SwarmDiLoCo:
        """A DiLoCo optimizer averaging through this swarm, with elastic join and resume.

        With ``join``, the newest of (our checkpoint, the state peers of this run serve) is
        loaded first; when peers have a newer state, we wait for their next outer step and
        download the state right after it, so our first inner phase runs alongside theirs.
        With ``require_join`` (the default) a failed download raises :class:`JoinFailed`
        instead of training alone from our own weights.

        Averaging partners are the peers training the same ``run`` (of the Swarm) and the same
        model (:meth:`DiLoCo.model_digest`): the round's match key is ``<run>/<digest>``, and a
        peer no other trainer of the run is known to skips matchmaking (its report says so).
        ``checkpoint_dir`` writes safetensors checkpoints (:mod:`p2pcompute.training.checkpoint`)
        and resumes from the newest one. ``averager`` replaces the swarm's own averager for this
        optimizer (``join`` must then be False; an FSDP peer uses
        :func:`p2pcompute.training.ranks.sharded_diloco` on every rank, which joins and re-syncs
        through this method). Other ``options`` go to :class:`DiLoCo`
        (``min_participants``, ``keep_checkpoints``, ``compression``, ``overlap``, ``join_early``...).
        With ``join_early=True`` a slower peer ends its phase when another peer of the run starts
        the round (it hears the matchmaking advert) and averages its partial progress, weighted
        by its samples, instead of missing the round; every weight is then capped at
        ``weight_cap`` (default 4) times its group's median (a claim cannot buy the average).
        With ``overlap=True`` the averaging runs in the swarm's background while the next inner
        phase computes; call ``opt.finish()`` after the last step to land the last round.

        Example::

            opt = swarm.diloco(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                               inner_steps=50, checkpoint_dir="ckpt", compression="fp16")
        """
        if averager is not None and join and self._network and not _cls.joins_with_averager:
            raise ConfigError("joining (downloading state) with your own averager: pass join=False "
                              "(a sharded peer joins through p2pcompute.training.ranks.sharded_diloco)")
        if options.get("join_early") and averager is None:
            # weights are claims, and join_early makes them differ: no claim above 4x the median counts
            options.setdefault("weight_cap", JOIN_EARLY_WEIGHT_CAP)
        opt = _cls(
            self, model, inner_optimizer, averager or self.averager, inner_steps=inner_steps,
            runner=self.call, checkpoint=checkpoint, checkpoint_dir=checkpoint_dir, nursery=self._nursery,
            **options,
        )
        opt.elastic = averager is None or _cls.joins_with_averager
        opt.catch_up = self._catch_up
        if opt.overlap is not None:
            # the background round runs on our trio thread while the training thread holds the GIL
            # between torch calls: with the default 5 ms switch interval every handoff to the
            # network costs up to 5 ms and a round took 5x longer (docs/design/training.md)
            sys.setswitchinterval(min(sys.getswitchinterval(), OVERLAP_SWITCH_INTERVAL))
        opt.tags = {"run": self.run_name, "model": opt.model_digest()}
        self._tags = dict(opt.tags)
        if isinstance(self.averager, CollectiveAverager):
            run = self.averager.run = f"{self.run_name}/{opt.tags['model']}"
            if opt.join_early:
                self.call(lambda: self._watch_rounds(opt, run))
        if checkpoint is not None and Path(checkpoint).exists():
            opt.load_state(load_checkpoint(checkpoint))
        if checkpoint_dir is not None:
            found = opt.resumed = ckpt.resume(opt, checkpoint_dir)
            if found is not None:
                log.info("resumed from %s at outer step %d", found.path, opt.outer_step)
        if join and self._network:
            self.call(lambda: self._join(opt, join_timeout, require_join))
        self._check_identity()
        self.call(lambda: self._apublish(opt))
        return opt

    async def _watch_rounds(self, opt: DiLoCo, run: str) -> None:
        """``join_early``: every advert of a round of our run and model reaches ``opt.note_round``."""
        await trio.lowlevel.checkpoint()

        def heard(round_key: str, peer: str) -> None:
            prefix, _, index = round_key.partition("-")
            if prefix == "outer" and index.isdigit() and len(index) <= 18:
                opt.note_round(int(index) - 1)  # the key names the outer step the round produces

        if self._unwatch is not None:
            self._unwatch()  # one optimizer per swarm hears the rounds: the newest
        self._unwatch = self.collective.matchmaker.watch(run, heard)

    async def _apublish(self, opt: DiLoCo) -> None:
        if self.server is not None:
            await self.server.apublish(opt.export_state())

    async def _offers(self, timeout: float = 5.0) -> dict[str, tuple[int, bytes]]:
        """(step, digest) of the state each peer of our run and model serves; refreshes partners."""
        peers = await self._peer_ids()
        offers: dict[str, tuple[int, bytes]] = {}
        tags = {f"tag/{k}": v for k, v in self._tags.items()}

        async def ask(peer: str) -> None:
            try:
                m = await fetch_manifest(self.node, peer, timeout=timeout)
            except P2PComputeError:
                return
            if m is None:
                return
            if any(m.header.meta.get(k) != v for k, v in tags.items()):
                self._partners.pop(peer, None)  # another run or another model
                return
            offers[peer] = (m.step, m.digest)
            self._partners[peer] = time.monotonic()

        async with trio.open_nursery() as nursery:
            for p in peers:
                nursery.start_soon(ask, p)
        return offers

    async def _join(self, opt: DiLoCo, timeout: float, required: bool = False) -> None:
        if not await self._peer_ids():
            # Just started: the peer table fills from the bootstrap's peer exchange and adverts.
            with contextlib.suppress(PeerTimeout):
                await self.node.wait_for_peers(1, timeout=min(timeout, 15.0), role="peer")
        offers = await self._offers()
        log.info(
            "join: %d peer(s) known, %d train run %r with this model",
            len(await self._peer_ids()), len(offers), self.run_name,
        )
        if not offers:
            return
        newest = max(step for step, _ in offers.values())
        mine = opt.state_digest()
        same = all(d == mine for _, d in offers.values())
        if newest < opt.outer_step or (newest == opt.outer_step and same):
            # we are as new as anyone (peers starting together from one seed, or a resume): say
            # so, which also undoes a "leave" of ours they remember (a restart with the same key)
            await self._announce("join")
            return
        # Wait for the swarm's next outer step, then take the state it publishes right after.
        # (Polling peers: their progress is remote state, there is no local event to wait on.)
        with trio.move_on_after(timeout):
            while True:
                offers = await self._offers()
                if max((s for s, _ in offers.values()), default=newest) > newest:
                    break
                await trio.sleep(0.2)
        if not await self._download(opt) and required:
            raise JoinFailed(
                f"peers of run {self.run_name!r} are at outer step {newest} but their state could not be "
                f"downloaded (see the warning above); pass require_join=False to train on alone"
            )

    async def _catch_up(self, step: int) -> TrainingState | None:
        """The shared state of outer ``step`` or newer, once a peer of our run serves it (overlap)."""
        with trio.move_on_after(self.matchmaking_timeout):
            while not any(s >= step for s, _ in (await self._offers()).values()):  # noqa: ASYNC110
                await trio.sleep(0.2)  # remote progress: polled, as in _join (no local event)
        try:
            state, _ = await download_state(self.node, await self._peer_ids(), timeout=60.0)
        except P2PComputeError as exc:
            log.warning("state download failed: %s", exc)
            return None
        return _shared_only(state)

    async def _download(self, opt: DiLoCo) -> bool:
        peers = await self._peer_ids()
        try:
            state, report = await download_state(self.node, peers, timeout=60.0, progress=self.progress)
        except (PeerUnreachable, PeerTimeout, P2PComputeError) as exc:
            log.warning("state download failed: %s", exc)
            return False
        if state.step < opt.outer_step:
            return False
        try:
            opt.load_state(_shared_only(state))
        except ConfigError as exc:
            log.warning("downloaded state does not fit: %s", exc)
            return False
        await self._apublish(opt)
        log.info("downloaded state of outer step %d from %s", state.step, sorted(report.sources))
        for p in report.sources:  # they serve our run's state: partners
            self._partners[p] = time.monotonic()
        await self._announce("join")  # we hold the state: partners expect us in their next round
        return True

    async def _resync(self, opt: SwarmDiLoCo) -> None:
        """After a round we averaged alone: adopt the swarm's state if others went on together."""
        offers = await self._offers()
        mine = opt.state_digest()
        others = [(s, d) for s, d in offers.values() if d != mine and s >= opt.outer_step]
        if others and await self._download(opt):
            opt.resyncs += 1


def _shared_only(state: TrainingState) -> TrainingState:
    tensors = {k: v for k, v in state.tensors.items() if k.startswith(("param/", "outer/", "buffer/"))}
    meta = {k: v for k, v in state.meta.items() if not k.startswith("inner/")}
    meta.pop("local_steps", None)
    meta.pop("total_inner_steps", None)
    return TrainingState(state.step, tensors, meta)


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


_live: weakref.WeakSet[Swarm] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for swarm in list(_live):
        with contextlib.suppress(Exception):
            swarm.close(timeout=10.0)

