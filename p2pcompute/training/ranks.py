"""Averaging for a peer whose parameters are sharded over local torch.distributed ranks (FSDP).

Under torchrun with FSDP every rank holds a shard of each parameter, and each rank runs its
own :class:`~p2pcompute.training.diloco.DiLoCo` over its local shards (its own anchor shard and
outer-optimizer state: the outer step is taken on sharded parameters, nothing is unsharded).
Only rank 0 talks to the swarm. :class:`ShardedAverager` is the averager every rank gives its
DiLoCo: at an outer step each rank flattens its pseudo-gradient shards (fp32 on this local hop),
rank 0 gathers them, averages the per-rank vectors across peers through the swarm's averager
(the same rank's vector of every peer meets the same one), and scatters the results back; a
failed round fails on every rank alike. The local hop uses torch's own collectives (gloo on
CPU, NCCL on GPUs); nothing here touches the network between peers or pickles anything.

Imports torch (``torch.distributed``), trio, errors and :mod:`.averager`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import trio

from p2pcompute.collective.aggregate import Aggregator
from p2pcompute.errors import ConfigError, P2PComputeError, TaskFailed
from p2pcompute.training.averager import Averager, AveragingOutcome

MAX_REASON = 4096


class ShardedAverager:
    """An :class:`~p2pcompute.training.averager.Averager` for one rank of a multi-rank peer.

    ``inner`` is the swarm's averager on rank 0 (``swarm.averager``) and None on the other
    ranks. Every rank must call :meth:`average` for the same rounds in the same order (DiLoCo
    with the same ``inner_steps`` on every rank does).

    Example::

        avg = ShardedAverager(swarm.averager if rank == 0 else None)
        opt = DiLoCo([(n, p.to_local()) for n, p in model.named_parameters()], inner, avg, ...)
    """

    def __init__(self, inner: Averager | None, *, group: Any = None) -> None:
        if not dist.is_initialized():
            raise ConfigError("ShardedAverager needs torch.distributed initialised (torchrun)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if (self.rank == 0) != (inner is not None):
            raise ConfigError("rank 0, and only rank 0, gives ShardedAverager the swarm's averager")
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
        await trio.to_thread.run_sync(lambda: dist.gather(padded, gather_list, dst=0, group=self.group))

        outcome = AveragingOutcome((self.peer_id,), total_weight=weight)
        status = torch.zeros(2, dtype=torch.int64, device=device)  # ok, length of the message
        message = b""
        failure: P2PComputeError | None = None
        if self.inner is not None:
            views = [p[:n] for p, n in zip(parts, sizes, strict=True) if n > 0]
            try:
                outcome = await self.inner.average(
                    views, weight=weight, round_id=round_id, compression=compression, timeout=timeout,
                    **({"aggregator": aggregator} if Aggregator.of(aggregator).keeps_rows else {}),
                )
                message = "\n".join(outcome.participants).encode()
                status[0] = 1
            except P2PComputeError as exc:
                message = f"{type(exc).__name__}: {exc}".encode()[:MAX_REASON]
                failure = exc
            status[1] = len(message)
        await trio.to_thread.run_sync(lambda: dist.broadcast(status, src=0, group=self.group))
        text = torch.zeros(int(status[1].item()), dtype=torch.uint8, device=device)
        if self.rank == 0 and message:
            text.copy_(torch.frombuffer(bytearray(message), dtype=torch.uint8))
        await trio.to_thread.run_sync(lambda: dist.broadcast(text, src=0, group=self.group))
        words = bytes(text.cpu().tolist()).decode()
        if not status[0]:
            self.last_reason = words
            if failure is not None:
                raise failure
            raise TaskFailed(f"the peer's averaging round failed on rank 0: {words}")

        out = torch.zeros(width, dtype=torch.float32, device=device)
        scatter_list = parts if self.rank == 0 else None
        await trio.to_thread.run_sync(lambda: dist.scatter(out, scatter_list, src=0, group=self.group))
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
