"""Tensors in frames on a lease stream: a capped ``task-tensors`` header, then raw chunks.

Tensors of at most :data:`~p2pcompute.tasks.messages.INLINE_TENSORS` bytes in all ride
inside the header (one frame: small tasks pay one write, not one per tensor).

Used when no tensor lane is given (see :mod:`p2pcompute.tasks.driver`). The receiver
checks dtypes, shapes and the total against its cap *before* allocating anything.

Imports :mod:`p2pcompute.tasks.messages`, :mod:`p2pcompute.tasks.receipts`, the overlay's
:class:`~p2pcompute.overlay.FramedStream` (a type only) and errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from p2pcompute.errors import LocalProtocolError, MalformedMessage
from p2pcompute.tasks.messages import DTYPES, INLINE_FRAME, INLINE_TENSORS, TENSORS_HEADER
from p2pcompute.tasks.receipts import tensor_digest

if TYPE_CHECKING:
    from p2pcompute.overlay import FramedStream
    from p2pcompute.tensors import TensorLane

#: Largest raw chunk of a tensor on the lease stream.
CHUNK = 512 * 1024
#: The lease stream's frame cap: a chunk plus room for any lease message.
LEASE_MAX_FRAME = CHUNK + 1024
#: The digest of no tensors (a task without inputs or outputs sends nothing).
EMPTY_DIGEST = tensor_digest({})
_DTYPES = {name: getattr(torch, name) for name in DTYPES}


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (no copy)."""
    arr: Any = t.view(torch.uint8).numpy()
    return memoryview(arr).cast("B")


def nbytes(t: torch.Tensor) -> int:
    """The size of ``t``'s data in bytes.

    Example::

        >>> nbytes(torch.zeros(4, dtype=torch.float32))
        16
    """
    return t.numel() * t.element_size()


def inline_frame(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """``tensors`` as one ``task-tensors`` frame with their bytes inline, if that frame fits
    :data:`~p2pcompute.tasks.messages.INLINE_FRAME`; else ``b""`` (send them with :func:`send_tensors`).

    Example::

        >>> len(inline_frame({"a": torch.ones(2, 2)})) > 16, inline_frame({"a": torch.ones(1 << 20)})
        (True, b'')
    """
    names = sorted(tensors)
    flat = [tensors[n].detach().cpu().contiguous().reshape(-1) for n in names]
    total = sum(nbytes(t) for t in flat)
    if not names or total > INLINE_TENSORS:
        return b""
    frame = TENSORS_HEADER.build(
        names=names,
        dtypes=[str(tensors[n].dtype).removeprefix("torch.") for n in names],
        shapes=[list(tensors[n].shape) for n in names],
        nbytes=total,
        inline=b"".join(bytes(_bytes_of(t)) for t in flat),
    )
    return frame if len(frame) <= INLINE_FRAME else b""


async def send_tensors(stream: FramedStream, tensors: Mapping[str, torch.Tensor]) -> None:
    """Send ``tensors`` as a header and raw chunks (the caller owns the stream's writes).

    Example::

        await send_tensors(stream, {"c": a @ b})
    """
    names = sorted(tensors)
    flat = [tensors[n].detach().cpu().contiguous().reshape(-1) for n in names]
    total = sum(nbytes(t) for t in flat)
    small = total <= INLINE_TENSORS  # small tensors ride in the header: one frame in all
    header = TENSORS_HEADER.build(
        names=names,
        dtypes=[str(tensors[n].dtype).removeprefix("torch.") for n in names],
        shapes=[list(tensors[n].shape) for n in names],
        nbytes=total,
        inline=b"".join(bytes(_bytes_of(t)) for t in flat) if small else b"",
    )
    await stream.send_frame(header)
    if small:
        return
    for t in flat:
        if t.numel() == 0:
            continue
        raw = _bytes_of(t)
        for off in range(0, len(raw), CHUNK):
            await stream.send_frame(raw[off : off + CHUNK])


async def recv_tensors(
    stream: FramedStream, header_bytes: bytes, *, cap: int, touch: Callable[[], None]
) -> dict[str, torch.Tensor]:
    """Read the tensors announced by ``header_bytes``; allocation is checked against ``cap`` first.

    ``touch`` is called after every chunk (the lease is alive while data flows).

    Example::

        header = await stream.recv_frame(TENSORS_HEADER.max_size)
        outputs = await recv_tensors(stream, header, cap=1 << 20, touch=lambda: None)
    """
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
    inline = h["inline"]
    if inline or total == 0:
        if len(inline) != total or total > INLINE_TENSORS:
            raise MalformedMessage(f"{len(inline)} inline bytes for tensors of {total}", peer=peer)
        at = 0
        for name, dtype, shape, size in plan:
            buf = torch.empty(size, dtype=torch.uint8)
            _bytes_of(buf)[:] = inline[at : at + size]
            at += size
            out[name] = buf.view(dtype).reshape(shape) if size else torch.empty(shape, dtype=dtype)
        touch()
        return out
    if total <= INLINE_TENSORS:
        raise MalformedMessage(f"tensors of {total} bytes must travel inline", peer=peer)
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


def need_lane(lane: TensorLane | None) -> TensorLane:
    """``lane``, which a lease that chose the lane must have (:class:`LocalProtocolError` if not).

    Example::

        outputs = await need_lane(lane).receive(peer, f"task/{lease_id.hex()}/out", timeout=600)
    """
    if lane is None:
        raise LocalProtocolError("this lease uses the tensor lane, but the service has none")
    return lane


__all__ = [
    "CHUNK",
    "EMPTY_DIGEST",
    "LEASE_MAX_FRAME",
    "inline_frame",
    "nbytes",
    "need_lane",
    "recv_tensors",
    "send_tensors",
]
