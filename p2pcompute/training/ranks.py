"""A peer whose parameters are sharded over local torch.distributed ranks (FSDP): averaging, join, serving.

Under torchrun with FSDP (``fully_shard``) every rank holds a block of rows of each parameter,
and each rank runs its own :class:`~p2pcompute.training.diloco.DiLoCo` over its local shards (its
own anchor shard and outer-optimizer state: the outer step is taken on sharded parameters,
nothing is unsharded). Only rank 0 talks to the swarm. Every rank calls :func:`sharded_diloco`:

* **Averaging** (:class:`ShardedAverager`): at an outer step each rank's pseudo-gradient shards
  reach rank 0 (a gather over torch's own process group), rank 0 reassembles the whole
  parameters (:class:`ShardLayout`), averages them with the other peers through the swarm, and
  scatters each rank its rows of the result. The swarm sees exactly what a one-process peer of
  the same model sends, so sharded and unsharded peers (any number of ranks) average together.
* **Serving**: after every outer step every rank sends its shards of the shared state (anchor,
  outer momentum) to rank 0, which keeps the whole shared state and publishes it as any peer
  does; its digest equals a one-process peer's after the same rounds. A gather when a joiner
  asks would need every rank to stop at a moment only rank 0 knows; the gather at the outer
  step, where the ranks meet anyway, costs one more local hop of the state's size
  (docs/design/training.md has the memory figures).
* **Joining and re-syncing**: rank 0 downloads the whole state like any peer (at start, or
  after a round it averaged alone while others went on) and scatters each rank its rows; every
  rank loads its slice.

Ranks exchange raw tensor bytes (and, for a state rank 0 hands out, our safe
:class:`~p2pcompute.training.state.TrainingState` format) over torch's collectives (gloo on CPU,
NCCL on GPUs); nothing is pickled.

Imports torch (``torch.distributed``), trio, errors, and :mod:`.averager`, :mod:`.diloco`,
:mod:`.state`, :mod:`.swarm`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import trio

from p2pcompute.collective.aggregate import Aggregator
from p2pcompute.errors import ConfigError, LocalProtocolError, P2PComputeError, TaskFailed
from p2pcompute.training.averager import Averager, AveragingOutcome
from p2pcompute.training.diloco import DiLoCo, StepReport, TrainingAlone
from p2pcompute.training.state import TrainingState
from p2pcompute.training.swarm import JoinFailed, SwarmDiLoCo

if TYPE_CHECKING:
    from p2pcompute.training.swarm import Swarm

MAX_REASON = 4096
_OK, _NEW_STATE, _FAILED = 0, 1, 2


def _device(group: Any) -> torch.device:
    # NCCL moves only CUDA tensors; gloo moves CPU ones
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.cpu().numpy().tobytes())


def _broadcast_status(code: int, message: str, group: Any) -> tuple[int, str]:
    """Rank 0's ``code`` and ``message`` reach every rank (the others' arguments are ignored)."""
    dev = _device(group)
    rank = dist.get_rank(group)
    data = message.encode()[:MAX_REASON] if rank == 0 else b""
    head = torch.tensor([code, len(data)], dtype=torch.int64, device=dev)
    dist.broadcast(head, group=group, group_src=0)
    text = torch.zeros(int(head[1].item()), dtype=torch.uint8, device=dev)
    if text.numel():
        if rank == 0:
            text.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(text, group=group, group_src=0)
    return int(head[0].item()), _to_bytes(text).decode(errors="replace")


def _signature(what: object) -> int:
    """A signed 64-bit fingerprint of ``repr(what)``: the ranks compare it to agree on a layout."""
    return int.from_bytes(hashlib.sha256(repr(what).encode()).digest()[:8], "big", signed=True)


def _gather_raw(flat: torch.Tensor, signature: int, group: Any) -> list[torch.Tensor] | None:
    """Every rank's bytes ``flat`` (uint8, any length) on rank 0, in rank order; None elsewhere.

    ``signature`` says what the bytes hold (names and dtypes): it must be the same on every rank.
    """
    dev = _device(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    heads = [torch.zeros(2, dtype=torch.int64, device=dev) for _ in range(world)]
    mine = torch.tensor([flat.numel(), signature], dtype=torch.int64, device=dev)
    dist.all_gather(heads, mine, group=group)
    if any(int(h[1].item()) != signature for h in heads):
        raise LocalProtocolError("the ranks of this peer hold different state tensors")
    lengths = [int(h[0].item()) for h in heads]
    buf = torch.zeros(max(lengths), dtype=torch.uint8, device=dev)
    buf[: flat.numel()] = flat
    parts = [torch.zeros_like(buf) for _ in range(world)] if rank == 0 else None
    dist.gather(buf, parts, group=group, group_dst=0)
    if parts is None:
        return None
    return [p[:n].cpu() for p, n in zip(parts, lengths, strict=True)]


def _scatter_bytes(parts: Sequence[bytes] | None, group: Any) -> bytes:
    """Rank 0's ``parts[r]`` on rank r (``parts`` is None on the other ranks)."""
    dev = _device(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    lengths = torch.zeros(world, dtype=torch.int64, device=dev)
    if parts is not None:
        lengths.copy_(torch.tensor([len(b) for b in parts], dtype=torch.int64))
    dist.broadcast(lengths, group=group, group_src=0)
    width = int(lengths.max().item())
    out = torch.zeros(width, dtype=torch.uint8, device=dev)
    bufs = None
    if parts is not None:
        bufs = [torch.zeros(width, dtype=torch.uint8, device=dev) for _ in range(world)]
        for b, data in zip(bufs, parts, strict=True):
            if data:
                b[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    dist.scatter(out, bufs, group=group, group_src=0)
    return _to_bytes(out[: int(lengths[rank].item())])


@dataclass(frozen=True)
class ShardLayout:
    """How a peer's parameters are split over its ranks: consecutive blocks of dim-0 rows, rank order.

    ``rows[r][i]`` is how many rows of parameter ``i`` rank ``r`` holds (FSDP's ``Shard(0)``:
    ``torch.chunk`` over the ranks, so the last ranks may hold none). Built collectively by
    :meth:`build`; it reassembles whole tensors from per-rank pieces and splits them again.

    Example::

        layout = ShardLayout.build(fsdp_shards(model))        # every rank calls it
        layout.model_digest() == DiLoCo(plain_model, ...).model_digest()
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    rows: tuple[tuple[int, ...], ...]

    @classmethod
    def build(
        cls, shards: Sequence[tuple[str, torch.Tensor, Sequence[int]]], group: Any = None
    ) -> ShardLayout:
        """Collective: every rank gives its ``(name, local shard, whole shape)`` triples, in one order."""
        names = tuple(str(n) for n, _, _ in shards)
        shapes = tuple(tuple(int(d) for d in full) for _, _, full in shards)
        dtypes = tuple(t.dtype for _, t, _ in shards)
        for (name, t, _), full in zip(shards, shapes, strict=True):
            if not full or t.dim() != len(full) or tuple(t.shape[1:]) != full[1:]:
                raise ConfigError(
                    f"parameter {name!r}: a shard of shape {tuple(t.shape)} is not a block of rows of {full}"
                )
        sig = _signature((names, shapes, [str(d) for d in dtypes]))
        dev = _device(group)
        world = dist.get_world_size(group)
        heads = [torch.zeros(2, dtype=torch.int64, device=dev) for _ in range(world)]
        dist.all_gather(heads, torch.tensor([sig, len(names)], dtype=torch.int64, device=dev), group=group)
        if any(int(x[0].item()) != sig or int(x[1].item()) != len(names) for x in heads):
            raise ConfigError("the ranks of this peer do not hold the same model (names, shapes or dtypes)")
        mine = torch.tensor([t.shape[0] for _, t, _ in shards], dtype=torch.int64, device=dev)
        everyone = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine, group=group)
        rows = tuple(tuple(int(v) for v in x.tolist()) for x in everyone)
        for i, (name, full) in enumerate(zip(names, shapes, strict=True)):
            if sum(r[i] for r in rows) != full[0]:
                raise ConfigError(f"parameter {name!r}: the ranks' rows do not add up to {full[0]}")
        return cls(names, shapes, dtypes, rows)

    @property
    def world(self) -> int:
        return len(self.rows)

    def local_shape(self, rank: int, i: int) -> tuple[int, ...]:
        return (self.rows[rank][i], *self.shapes[i][1:])

    def local_numel(self, rank: int, i: int) -> int:
        return math.prod(self.local_shape(rank, i))

    def _start(self, rank: int, i: int) -> int:
        return sum(self.rows[r][i] for r in range(rank))

    def model_digest(self) -> str:
        """:meth:`DiLoCo.model_digest` of the whole model: sharded and unsharded peers match."""
        h = hashlib.sha256()
        for name, dtype, shape in zip(self.names, self.dtypes, self.shapes, strict=True):
            h.update(f"param:{name}:{dtype}:{shape}\n".encode())
        return h.hexdigest()[:16]

    def assemble(self, flats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Whole parameters from each rank's flat vector (its shards back to back, in order)."""
        pieces: list[list[torch.Tensor]] = [[] for _ in self.names]
        for r, flat in enumerate(flats):
            offset = 0
            for i in range(len(self.names)):
                n = self.local_numel(r, i)
                pieces[i].append(flat[offset : offset + n].reshape(self.local_shape(r, i)))
                offset += n
            if offset != flat.numel():
                raise LocalProtocolError(f"rank {r} sent {flat.numel()} values, its shards hold {offset}")
        return [torch.cat(p, dim=0) for p in pieces]

    def disperse(self, whole: Sequence[torch.Tensor], flats: Sequence[torch.Tensor]) -> None:
        """The inverse of :meth:`assemble`: each rank's rows of ``whole`` into its flat vector."""
        for r, flat in enumerate(flats):
            offset = 0
            for i, t in enumerate(whole):
                n = self.local_numel(r, i)
                flat[offset : offset + n].copy_(t.narrow(0, self._start(r, i), self.rows[r][i]).reshape(-1))
                offset += n

    def assemble_raw(
        self, keys: Sequence[str], dtypes: Sequence[torch.dtype], parts: Sequence[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Whole ``param/`` and ``outer/`` tensors from each rank's raw bytes (its slices of ``keys``,
        in order, back to back)."""
        index = {n: i for i, n in enumerate(self.names)}
        offsets = [0] * self.world
        out: dict[str, torch.Tensor] = {}
        for key, dtype in zip(keys, dtypes, strict=True):
            kind, _, name = key.partition("/")
            i = index.get(name)
            if kind not in ("param", "outer") or i is None:
                raise LocalProtocolError(f"a rank sent {key!r}, not a shared tensor of the layout")
            size = torch.empty(0, dtype=dtype).element_size()
            pieces = []
            for r, raw in enumerate(parts):
                n = self.local_numel(r, i) * size
                # a copy: the offset in the rank's bytes need not be aligned for ``dtype``
                piece = raw[offsets[r] : offsets[r] + n].clone().view(dtype)
                pieces.append(piece.reshape(self.local_shape(r, i)))
                offsets[r] += n
            out[key] = torch.cat(pieces, dim=0)
        for r, raw in enumerate(parts):
            if offsets[r] != raw.numel():
                raise LocalProtocolError(f"rank {r} sent {raw.numel()} bytes of state, not {offsets[r]}")
        return out

    def split_state(self, state: TrainingState) -> list[TrainingState]:
        """Each rank's slice of a whole shared state (``param/`` and ``outer/`` tensors only)."""
        index = {n: i for i, n in enumerate(self.names)}
        per: list[dict[str, torch.Tensor]] = [{} for _ in range(self.world)]
        for key, t in state.tensors.items():
            kind, _, name = key.partition("/")
            i = index.get(name)
            if kind not in ("param", "outer") or i is None:
                raise ConfigError(f"a sharded peer cannot take {key!r} from a state")
            if tuple(t.shape) != self.shapes[i]:
                raise ConfigError(f"state does not match the model at {key!r}")
            for r in range(self.world):
                per[r][key] = t.narrow(0, self._start(r, i), self.rows[r][i]).clone()
        return [TrainingState(state.step, tensors, dict(state.meta)) for tensors in per]

    def join_states(self, states: Sequence[TrainingState]) -> TrainingState:
        """The whole shared state from every rank's slice (step and meta of rank 0's)."""
        keys = sorted(states[0].tensors)
        if any(sorted(s.tensors) != keys for s in states):
            raise LocalProtocolError("the ranks' states hold different tensors")
        return TrainingState(
            states[0].step, {k: torch.cat([s.tensors[k] for s in states], dim=0) for k in keys},
            dict(states[0].meta),
        )


class ShardedAverager:
    """An :class:`~p2pcompute.training.averager.Averager` for one rank of a multi-rank peer.

    ``inner`` is the swarm's averager on rank 0 (``swarm.averager``) and None on the other
    ranks. Every rank must call :meth:`average` for the same rounds in the same order (DiLoCo
    with the same ``inner_steps`` on every rank does). With a ``layout`` rank 0 averages the
    whole parameters (what a one-process peer of the model sends); without one, each rank's
    shards as one vector per rank (only peers with the same number of ranks then line up).

    Example::

        avg = ShardedAverager(swarm.averager if rank == 0 else None, layout=layout)
        opt = DiLoCo([(n, p.to_local()) for n, p in model.named_parameters()], inner, avg, ...)
    """

    def __init__(
        self, inner: Averager | None, *, group: Any = None, layout: ShardLayout | None = None
    ) -> None:
        if not dist.is_initialized():
            raise ConfigError("ShardedAverager needs torch.distributed initialised (torchrun)")
        self.group = group
        self.layout = layout
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if (self.rank == 0) != (inner is not None):
            raise ConfigError("rank 0, and only rank 0, gives ShardedAverager the swarm's averager")
        if layout is not None and layout.world != self.world:
            raise ConfigError(f"the layout is for {layout.world} ranks, the group has {self.world}")
        self.inner = inner
        self.last_reason = ""

    @property
    def peer_id(self) -> str:
        return self.inner.peer_id if self.inner is not None else f"rank{self.rank}"

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
        if self.layout is not None:
            if len(tensors) != len(self.layout.names):
                raise ConfigError(f"{len(tensors)} tensors to average, layout: {len(self.layout.names)}")
            for i, t in enumerate(tensors):
                if tuple(t.shape) != self.layout.local_shape(self.rank, i):
                    raise ConfigError(f"tensor {i} has shape {tuple(t.shape)}, not this rank's shard")
        device = tensors[0].device if tensors else torch.device("cpu")
        flat = (
            torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
            if tensors else torch.zeros(0, device=device)
        )
        sizes_t = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.world)]
        await trio.to_thread.run_sync(
            lambda: dist.all_gather(sizes_t, torch.tensor([flat.numel()], device=device), group=self.group)
        )
        sizes = [int(s.item()) for s in sizes_t]
        width = max(sizes)
        padded = torch.zeros(width, dtype=torch.float32, device=device)
        padded[: flat.numel()] = flat
        parts = [torch.zeros(width, dtype=torch.float32, device=device) for _ in range(self.world)]
        gather_list = parts if self.rank == 0 else None
        await trio.to_thread.run_sync(
            lambda: dist.gather(padded, gather_list, group=self.group, group_dst=0)
        )

        outcome = AveragingOutcome((self.peer_id,), total_weight=weight)
        # 1: averaged; 0: the round failed; 2: our own misconfiguration (every rank raises it)
        status = torch.zeros(2, dtype=torch.int64, device=device)  # outcome, length of the message
        message = b""
        failure: P2PComputeError | None = None
        if self.inner is not None:
            views = [p[:n] for p, n in zip(parts, sizes, strict=True)]
            # the whole parameters (as a one-process peer sends them), or one vector per rank
            group_tensors = (
                self.layout.assemble(views) if self.layout is not None else [v for v in views if v.numel()]
            )
            try:
                outcome = await self.inner.average(
                    group_tensors, weight=weight, round_id=round_id, compression=compression,
                    timeout=timeout,
                    **({"aggregator": aggregator} if Aggregator.of(aggregator).keeps_rows else {}),
                )
                if self.layout is not None:
                    self.layout.disperse(group_tensors, views)
                message = "\n".join(outcome.participants).encode()
                status[0] = 1
            except P2PComputeError as exc:
                message = f"{type(exc).__name__}: {exc}".encode()[:MAX_REASON]
                failure = exc
                status[0] = 2 if isinstance(exc, ConfigError) else 0
            status[1] = len(message)
        await trio.to_thread.run_sync(lambda: dist.broadcast(status, group=self.group, group_src=0))
        text = torch.zeros(int(status[1].item()), dtype=torch.uint8, device=device)
        if self.rank == 0 and message:
            text.copy_(torch.frombuffer(bytearray(message), dtype=torch.uint8))
        await trio.to_thread.run_sync(lambda: dist.broadcast(text, group=self.group, group_src=0))
        words = bytes(text.cpu().tolist()).decode()
        if status[0] != 1:
            self.last_reason = words
            if failure is not None:
                raise failure
            if status[0] == 2:  # not a failed round: DiLoCo re-raises it, so every rank stops alike
                raise ConfigError(f"rank 0 of this peer: {words}")
            raise TaskFailed(f"the peer's averaging round failed on rank 0: {words}")

        out = torch.zeros(width, dtype=torch.float32, device=device)
        scatter_list = parts if self.rank == 0 else None
        await trio.to_thread.run_sync(
            lambda: dist.scatter(out, scatter_list, group=self.group, group_src=0)
        )
        offset = 0
        with torch.no_grad():
            for t in tensors:
                n = t.numel()
                t.copy_(out[offset : offset + n].reshape(t.shape).to(t.dtype))
                offset += n
        self.last_reason = ""
        if self.inner is not None:
            return outcome
        return AveragingOutcome(tuple(words.split("\n")) if words else (self.peer_id,), total_weight=weight)


class ShardedDiLoCo(DiLoCo):
    """DiLoCo for one rank of a sharded peer; rank 0 also holds and serves the whole shared state.

    Built by :func:`sharded_diloco` (every rank). Blocking DiLoCo only (no ``overlap``, no
    per-step mode); no checkpoint options yet (each rank's ``state_dict()`` works as in torch).
    After every outer step all ranks send rank 0 their shards of the shared state
    (:meth:`gather_state`); whatever state rank 0 loads (a join, a re-sync) reaches the other
    ranks in the same step (:meth:`distribute`). :meth:`export_state` and
    :meth:`~DiLoCo.state_digest` on rank 0 are the whole state's.

    Example::

        opt = sharded_diloco(model, torch.optim.AdamW(model.parameters()), swarm if rank == 0 else None)
        assert opt.state_digest() == one_process_peer.state_digest()   # rank 0, same rounds
    """

    def __init__(
        self,
        model: Any,
        inner_optimizer: torch.optim.Optimizer,
        averager: Averager,
        *,
        layout: ShardLayout,
        group: Any = None,
        built: Callable[[ShardedDiLoCo], None] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, inner_optimizer, averager, **options)
        if self.mode != "diloco" or self.overlap is not None:
            raise ConfigError("a sharded peer runs blocking DiLoCo (mode='diloco', overlap=False)")
        if self.checkpoint is not None or self.checkpoint_dir is not None:
            raise ConfigError("checkpoint options are not supported on a sharded peer yet")
        if self.named_buffers:
            raise ConfigError("a sharded peer takes (name, shard) pairs, not a module with buffers")
        self.layout = layout
        self.group = group
        self.rank = dist.get_rank(group)
        if tuple(n for n, _ in self.named) != layout.names:
            raise ConfigError("the parameters given are not the layout's, in its order")
        for i, p in enumerate(self.params):
            if tuple(p.shape) != layout.local_shape(self.rank, i):
                raise ConfigError(f"parameter {layout.names[i]!r}: {tuple(p.shape)} is not this rank's rows")
        #: rank 0: the whole shared state (anchor and outer momentum), as of the last outer step
        self._whole: dict[str, torch.Tensor] | None = None
        #: rank 0: the slices of a state it loaded that the other ranks have not loaded yet
        self._outbox: list[TrainingState] | None = None
        if built is not None:
            built(self)
        self.gather_state()

    def model_digest(self) -> str:
        return self.layout.model_digest()

    def gather_state(self) -> None:
        """Collective: rank 0 assembles the whole shared state from every rank's shards.

        The ranks' raw bytes, not the hashed state format: this hop is between our own
        processes, and two SHA-256 passes over the state doubled its time.
        """
        mine = DiLoCo.export_state(self).tensors
        keys = sorted(mine)
        dtypes = [mine[k].dtype for k in keys]
        sig = _signature((keys, [str(d) for d in dtypes]))
        flat = (
            torch.cat([mine[k].reshape(-1).view(torch.uint8) for k in keys]) if keys
            else torch.zeros(0, dtype=torch.uint8)
        )
        parts = _gather_raw(flat.to(_device(self.group)), sig, self.group)
        if parts is not None:
            self._whole = self.layout.assemble_raw(keys, dtypes, parts)

    def distribute(self) -> None:
        """Collective: a state rank 0 loaded (joined, re-synced) reaches every rank, which loads its rows."""
        if self.rank == 0:
            outbox, self._outbox = self._outbox, None
            _broadcast_status(_NEW_STATE if outbox else _OK, "", self.group)
            if outbox:
                _scatter_bytes([s.to_bytes() for s in outbox], self.group)
            return
        code, message = _broadcast_status(_OK, "", self.group)
        if code == _FAILED:
            raise JoinFailed(f"rank 0 of this peer failed: {message}")
        if code == _NEW_STATE:
            DiLoCo.load_state(self, TrainingState.from_bytes(_scatter_bytes(None, self.group)))

    def export_state(self, *, local: bool = False) -> TrainingState:
        if local:
            raise ConfigError("a sharded peer has no local export (checkpoints are not supported yet)")
        if self._whole is None:
            return super().export_state()
        return TrainingState(self.outer_step, dict(self._whole), self._shared_meta())

    def load_state(self, state: TrainingState) -> None:
        """Rank 0: a whole state (its rows now, the others' at :meth:`distribute`); others: their slice."""
        if self.rank != 0:
            super().load_state(state)
            return
        slices = self.layout.split_state(state)
        super().load_state(slices[0])  # checks mode, tags and dtypes too
        self._whole = dict(state.tensors)
        self._outbox = slices

    async def astep(self, samples: float = 1.0) -> StepReport | None:
        alone: TrainingAlone | None = None
        try:
            report = await super().astep(samples)
        except TrainingAlone as exc:  # applied on every rank alike: finish the step, then raise
            alone, report = exc, exc.report
        if report is not None:
            await trio.to_thread.run_sync(self.gather_state)
            await self._settle(report)  # rank 0: publish, re-sync when left alone
            await trio.to_thread.run_sync(self.distribute)
        if alone is not None:
            raise alone
        return report

    async def _settle(self, report: StepReport) -> None:
        await trio.lowlevel.checkpoint()


class _SwarmShardedDiLoCo(SwarmDiLoCo, ShardedDiLoCo):
    """Rank 0's optimizer: :class:`ShardedDiLoCo` whose state the swarm publishes, joins and re-syncs."""

    joins_with_averager = True

    async def astep(self, samples: float = 1.0) -> StepReport | None:
        # the whole state is gathered before the swarm publishes it (SwarmDiLoCo._settle)
        return await ShardedDiLoCo.astep(self, samples)


def fsdp_shards(model: torch.nn.Module) -> list[tuple[str, torch.Tensor, tuple[int, ...]]]:
    """``(name, local shard, whole shape)`` of every trainable parameter of a ``fully_shard`` model.

    The shards are views of FSDP's own sharded storage: writing them writes the model.

    Example::

        fully_shard(model)
        shards = fsdp_shards(model)      # [("0.weight", <this rank's rows>, (128, 32)), ...]
    """
    from torch.distributed.tensor import DTensor, Shard

    out: list[tuple[str, torch.Tensor, tuple[int, ...]]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),):
            raise ConfigError(f"parameter {name!r} is not sharded by rows on a 1-D mesh (fully_shard)")
        out.append((name, p.to_local(), tuple(p.shape)))
    return out


def sharded_diloco(
    model: torch.nn.Module | Sequence[tuple[str, torch.Tensor, Sequence[int]]],
    inner_optimizer: torch.optim.Optimizer,
    swarm: Swarm | None,
    *,
    group: Any = None,
    inner_steps: int = 100,
    join: bool = True,
    join_timeout: float = 120.0,
    require_join: bool = True,
    **options: Any,
) -> ShardedDiLoCo:
    """DiLoCo for every rank of an FSDP peer; rank 0 passes its :class:`Swarm`, the others None.

    ``model`` is the ``fully_shard`` model (or ``(name, local shard, whole shape)`` triples,
    :func:`fsdp_shards`). Collective: every rank calls it, with the same options. On rank 0 it
    is :meth:`Swarm.diloco` (join, ``require_join``, partners by run and model digest, state
    served to joiners); a state rank 0 downloads reaches every rank before this returns. The
    peer averages with one-process peers of the same model and with sharded peers of any rank
    count. Other ``options`` go to :class:`DiLoCo` (``min_participants``, ``compression``...).

    Example::

        fully_shard(model)
        swarm = Swarm(bootstrap, run="my-run").start() if rank == 0 else None
        opt = sharded_diloco(model, torch.optim.AdamW(model.parameters()), swarm, inner_steps=50)
        for x, y in batches:
            loss_fn(model(x), y).backward()
            opt.step(samples=len(x) * world)
            opt.zero_grad()
    """
    if not dist.is_initialized():
        raise ConfigError("sharded_diloco needs torch.distributed initialised (torchrun)")
    rank = dist.get_rank(group)
    if (rank == 0) != (swarm is not None):
        raise ConfigError("rank 0, and only rank 0, passes its Swarm to sharded_diloco")
    shards = fsdp_shards(model) if isinstance(model, torch.nn.Module) else [
        (str(n), t, tuple(int(d) for d in full)) for n, t, full in model
    ]
    layout = ShardLayout.build(shards, group)
    named = [(n, t) for n, t, _ in shards]
    built: list[ShardedDiLoCo] = []
    if swarm is None:
        opt = ShardedDiLoCo(
            named, inner_optimizer, ShardedAverager(None, group=group, layout=layout),
            inner_steps=inner_steps, runner=trio.run, layout=layout, group=group, **options,
        )
    else:
        try:
            made = swarm.diloco(
                named, inner_optimizer, inner_steps=inner_steps, join=join, join_timeout=join_timeout,
                require_join=require_join,
                averager=ShardedAverager(swarm.averager, group=group, layout=layout),
                _cls=_SwarmShardedDiLoCo, layout=layout, group=group, built=built.append, **options,
            )
        except P2PComputeError as exc:
            if built:  # the other ranks wait in distribute(): tell them, so they fail too
                _broadcast_status(_FAILED, f"{type(exc).__name__}: {exc}", group)
            raise
        assert isinstance(made, ShardedDiLoCo)
        opt = made
    opt.distribute()
    return opt
