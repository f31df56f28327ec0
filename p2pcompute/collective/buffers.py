"""Round buffers and bulk tensor work off the event loop (used by the round driver).

:class:`Scratch` keeps a round's buffers for the next round; :func:`flat_dtype` checks that a
round's tensors can be averaged together; :func:`offload` runs bulk tensor work in a worker
thread when it is large; :func:`roundtrip_part` replaces a part by what receivers decode under a
codec. Moved out of :mod:`p2pcompute.collective.rounds` (which re-exports the public names).

Imports torch, trio, :mod:`p2pcompute.errors` and :mod:`p2pcompute.tensors.codecs`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import trio

from p2pcompute.errors import ConfigError
from p2pcompute.tensors import codecs

_ROUNDTRIP_CHUNK = 1 << 20  # elements; a multiple of the int8 block
_OFFLOAD_BYTES = 1 << 20  # tensor work on at least this many bytes runs in a worker thread


def flat_dtype(tensors: Sequence[torch.Tensor]) -> tuple[torch.dtype, torch.device]:
    """The one dtype and device of a round's tensors; :class:`ConfigError` if they cannot average.

    Example::

        dtype, device = flat_dtype(list(model.parameters()))
    """
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


class Scratch:
    """Round buffers kept for the next round: fresh pages cost more than the copy (a 256 MB
    buffer per round was 14% of all CPU time in the 4-peer benchmark).

    Example::

        buf = scratch.take("flat", n, torch.float32, torch.device("cpu"))
        ...
        scratch.give("flat", buf)
    """

    def __init__(self) -> None:
        self._kept: dict[str, torch.Tensor] = {}

    def take(self, kind: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A buffer of at least ``n`` elements: the one the last round gave back, or a new one.

        Example::

            acc = scratch.take("acc", 1024, torch.float32, torch.device("cpu"))[:1024]
        """
        buf = self._kept.pop(kind, None)
        if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=device)
        return buf

    def give(self, kind: str, buf: torch.Tensor) -> None:
        """Keep ``buf`` for the next round (one per kind: a round's worth, its tensors plus a part).

        Example::

            scratch.give("acc", buf)
        """
        self._kept[kind] = buf

    def clear(self) -> None:
        """Free every kept buffer.

        Example::

            scratch.clear()
        """
        self._kept.clear()


async def offload(like: torch.Tensor, fn: Callable[[], Any]) -> None:
    """Run ``fn`` (bulk tensor work as large as ``like``) off the event loop when it is large.

    Example::

        await offload(acc, lambda: acc.mul_(0.5))

    Not abandoned on cancellation: when this returns, ``fn`` has finished with its buffers.
    """
    if like.device.type == "cpu" and like.numel() * like.element_size() >= _OFFLOAD_BYTES:
        await trio.to_thread.run_sync(fn)
    else:
        fn()


def roundtrip_part(codec: str, values: torch.Tensor) -> None:
    """Replace ``values`` by what a receiver decodes from it under ``codec`` (bounded scratch).

    Example::

        roundtrip_part("bf16", part)     # part now holds exactly what every receiver decodes
    """
    for lo in range(0, values.numel(), _ROUNDTRIP_CHUNK):
        piece = values[lo : lo + _ROUNDTRIP_CHUNK]
        codecs.decode_into(codec, codecs.encode(codec, piece), piece)


__all__ = ["Scratch", "flat_dtype", "offload", "roundtrip_part"]
