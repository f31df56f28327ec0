"""Where record payloads come from (sender) and land (receiver): zero-copy views, codecs, CUDA staging.

Sender (:class:`Stager`): a record that is one run of a contiguous CPU tensor under
codec ``none`` is sealed straight from the tensor's memory; anything else (packed
small shards, lossy codecs, CUDA tensors) is encoded into one of two record-sized
buffers first. For CUDA sources the buffers are pinned, GPU-side encoding and the
device-to-host copy run on a side stream, and the lane stages record ``i+1`` in a
worker thread while the event loop sends record ``i``, so copies overlap sending.

Receiver (:class:`Lander`): a record that is one run of a contiguous CPU
destination is opened straight into the destination's memory; otherwise it is
opened into one of two record buffers (pinned for CUDA destinations) and decoded
or copied host-to-device from there, in a worker thread, while the event loop
receives the next record into the other buffer.

``force_staging=True`` runs the staged path for CPU tensors too (the same code the
CUDA path runs, minus the device), so it is tested on machines without a GPU.

Imports :mod:`p2pcompute.errors`, :mod:`p2pcompute.wire.shards`,
:mod:`p2pcompute.tensors.codecs` and torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from p2pcompute.errors import MalformedMessage
from p2pcompute.tensors import codecs
from p2pcompute.wire.shards import DTYPE_SIZES, RecordPlan, ShardSpec


def _new_stream() -> Any:
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())  # sources were written on the current stream
    return stream


def _new_event() -> Any:
    return torch.cuda.Event()  # type: ignore[no-untyped-call]


def _is_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def _host_buffer(size: int, pinned: bool) -> torch.Tensor:
    return torch.empty(size, dtype=torch.uint8, pin_memory=pinned)


class Stager:
    """Yields each record's plaintext payload (a memoryview valid until the next record).

    Example::

        stager = Stager(flat_tensors, manifest.shards, 1 << 20)
        for i, plan in enumerate(plan_records(manifest.shards, 1 << 20)):
            seal_and_send(stager.payload(plan, i % 2))
    """

    def __init__(
        self,
        sources: Sequence[torch.Tensor],
        shards: Sequence[ShardSpec],
        record_size: int,
        *,
        force_staging: bool = False,
        slots: int = 2,
    ) -> None:
        self.sources = sources
        self.shards = shards
        self.record_size = record_size
        self.force_staging = force_staging
        self._cuda = any(_is_cuda(s) for s in sources) and torch.cuda.is_available()
        self._buffers = [_host_buffer(record_size, self._cuda) for _ in range(slots)]
        self._views = [codecs.byte_memoryview(b) for b in self._buffers]
        self._direct: dict[int, memoryview] = {}
        self._stream: Any = _new_stream() if self._cuda else None
        self._gpu_scratch: torch.Tensor | None = None

    def _direct_view(self, plan: RecordPlan) -> memoryview | None:
        if self.force_staging or len(plan.pieces) != 1:
            return None
        piece = plan.pieces[0]
        spec = self.shards[piece.shard]
        source = self.sources[piece.shard]
        if spec.codec != "none" or source.device.type != "cpu":
            return None
        view = self._direct.get(piece.shard)
        if view is None:
            view = self._direct[piece.shard] = codecs.byte_memoryview(source)
        size = DTYPE_SIZES[spec.dtype]
        return view[piece.start * size : piece.start * size + piece.nbytes]

    def is_direct(self, plan: RecordPlan) -> bool:
        """Whether ``plan`` is sealed straight from tensor memory (no staging or codec work)."""
        return self._direct_view(plan) is not None

    @property
    def host_only(self) -> bool:
        """Every source is in CPU memory and staging is not forced: no copy waits on a device, so
        records may be staged, sealed and sent in one blocking loop."""
        return not self.force_staging and all(s.device.type == "cpu" for s in self.sources)

    def _stage(self, plan: RecordPlan, slot: int) -> Any:
        """Fill buffer ``slot`` with ``plan``'s encoded bytes; return a CUDA event (or None)."""
        buffer = self._buffers[slot]
        offset = 0
        event = None
        for piece in plan.pieces:
            spec = self.shards[piece.shard]
            src = self.sources[piece.shard][piece.start : piece.start + piece.count]
            dst = buffer[offset : offset + piece.nbytes]
            if _is_cuda(src) and self._cuda:
                with torch.cuda.stream(self._stream):
                    if spec.codec == "none":
                        dst.copy_(codecs.byte_view(src), non_blocking=True)
                    else:
                        if self._gpu_scratch is None:
                            self._gpu_scratch = torch.empty(
                                self.record_size, dtype=torch.uint8, device=src.device
                            )
                        tmp = self._gpu_scratch[: piece.nbytes]
                        codecs.encode_into(spec.codec, src, tmp)
                        dst.copy_(tmp, non_blocking=True)
                    event = _new_event()
                    event.record(self._stream)
            else:
                codecs.encode_into(spec.codec, src, dst)
            offset += piece.nbytes
        return event

    def payload(self, plan: RecordPlan, slot: int) -> memoryview:
        """The plaintext of ``plan``: a view of tensor memory, or buffer ``slot`` filled and synced.

        Blocking (it waits for CUDA copies); the lane calls it from a worker thread so
        that staging record ``i+1`` overlaps sending record ``i``.
        """
        direct = self._direct_view(plan)
        if direct is not None:
            return direct
        event = self._stage(plan, slot)
        if event is not None:
            event.synchronize()
        return self._views[slot][: plan.nbytes]


class Lander:
    """Decides where each received record lands and builds the result tensors.

    Example::

        lander = Lander(manifest.shards, into=None, device=None, peer=peer)
        target = lander.direct_target(plan)          # open straight into tensor memory, or
        lander.scatter(plan, record_buffer)          # or decode from a record buffer
        tensors = lander.finish()
    """

    def __init__(
        self,
        shards: Sequence[ShardSpec],
        into: Mapping[str, torch.Tensor] | None,
        device: torch.device | str | None,
        on_chunk: Callable[..., Any] | None = None,
        *,
        peer: str | None,
        force_staging: bool = False,
    ) -> None:
        self.shards = shards
        self.peer = peer
        self.force_staging = force_staging
        names = {s.name for s in shards}
        if into is not None:
            missing = sorted(set(into) - names)
            if missing:
                raise MalformedMessage(f"transfer lacks expected tensors {missing[:5]}", peer=peer)
        self.finals: list[torch.Tensor] = []
        self.lands: list[torch.Tensor] = []
        self._views: dict[int, memoryview] = {}
        for spec in shards:
            dtype = codecs.torch_dtype(spec.dtype)
            final = into.get(spec.name) if into is not None else None
            if final is not None:
                if tuple(final.shape) != spec.shape or final.dtype != dtype:
                    raise MalformedMessage(
                        f"tensor {spec.name!r}: sender has {spec.dtype}{list(spec.shape)}, "
                        f"receiver expects {codecs.dtype_name(final.dtype)}{list(final.shape)}",
                        peer=peer,
                    )
            else:
                final = codecs.empty(spec.shape, dtype, device)
            land = final if final.is_contiguous() else codecs.empty(spec.shape, dtype, final.device)
            self.finals.append(final)
            self.lands.append(land.reshape(-1))
        self._cuda = any(_is_cuda(t) for t in self.lands) and torch.cuda.is_available()
        self._gpu_scratch: torch.Tensor | None = None

    def direct_target(self, plan: RecordPlan) -> memoryview | None:
        """The destination bytes of a one-piece codec-``none`` record landing in CPU memory, else None."""
        if self.force_staging or len(plan.pieces) != 1:
            return None
        piece = plan.pieces[0]
        spec = self.shards[piece.shard]
        land = self.lands[piece.shard]
        if spec.codec != "none" or land.device.type != "cpu":
            return None
        view = self._views.get(piece.shard)
        if view is None:
            view = self._views[piece.shard] = codecs.byte_memoryview(land)
        size = DTYPE_SIZES[spec.dtype]
        return view[piece.start * size : piece.start * size + piece.nbytes]

    @property
    def host_only(self) -> bool:
        """Every destination is in CPU memory and staging is not forced: records may be received,
        opened and decoded in one blocking loop."""
        return not self.force_staging and all(t.device.type == "cpu" for t in self.lands)

    def buffers(self, record_size: int, count: int = 2) -> list[torch.Tensor]:
        """``count`` record buffers (pinned when landing on CUDA) for records not opened in place."""
        return [_host_buffer(record_size, self._cuda) for _ in range(count)]

    def scatter(self, plan: RecordPlan, plain: torch.Tensor) -> None:
        """Decode the record in ``plain`` into its destinations; returns once ``plain`` may be reused.

        Blocking (it waits for CUDA copies); the lane calls it from a worker thread so
        that landing record ``i`` overlaps receiving record ``i+1``.
        """
        event = None
        offset = 0
        for piece in plan.pieces:
            spec = self.shards[piece.shard]
            raw = plain[offset : offset + piece.nbytes]
            dst = self.lands[piece.shard][piece.start : piece.start + piece.count]
            offset += piece.nbytes
            if _is_cuda(dst) and self._cuda:
                if self._gpu_scratch is None:
                    self._gpu_scratch = torch.empty(plain.numel(), dtype=torch.uint8, device=dst.device)
                tmp = self._gpu_scratch[: piece.nbytes]
                tmp.copy_(raw, non_blocking=True)
                codecs.decode_into(spec.codec, tmp, dst)
                event = _new_event()
                event.record()
            else:
                codecs.decode_into(spec.codec, raw, dst)
        if event is not None:
            event.synchronize()

    def finish(self) -> dict[str, torch.Tensor]:
        """Wait for outstanding copies, fill non-contiguous destinations, return tensors by name."""
        if self._cuda:
            torch.cuda.synchronize()
        out: dict[str, torch.Tensor] = {}
        for spec, final, land in zip(self.shards, self.finals, self.lands, strict=True):
            if not final.is_contiguous():
                final.copy_(land.view(spec.shape))
            out[spec.name] = final
        return out


__all__ = ["Lander", "Stager"]
