"""Tensor codecs for the data lane (sans-IO, torch only): none, fp16, bf16, int8 with per-block scales.

Each codec maps a flat run of elements to bytes and back; runs start at element
boundaries (block boundaries for int8), so the lane can encode and decode one
record at a time with bounded memory. Raw payload bytes are little-endian (torch's
native order on every platform it ships for).

Error bounds (``x`` the input, ``y`` the decoded value; finite inputs):

* ``none``: bit-exact, every dtype.
* ``fp16``: for ``|x| <= 65504``: ``|y - x| <= max(|x| * 2**-11, 2**-25)`` (round to nearest;
  the second term is half the smallest subnormal step). Larger magnitudes become ``±inf``.
  NaN and ±inf pass through.
* ``bf16``: ``|y - x| <= |x| * 2**-8`` for normal float32 values (``|x| >= 2**-126``) and
  ``<= 2**-134`` below that; NaN and ±inf pass through.
* ``int8``: blocks of :data:`~p2pcompute.wire.shards.INT8_BLOCK` elements share one float32
  scale ``s = max(max|x| / 127, 2**-149)``; ``|y - x| <= s / 2 * (1 + 2**-20)`` per element,
  i.e. at most 1/254 of the block's largest magnitude (or half the smallest float32 step,
  for blocks of subnormal values). Non-finite input is refused (LocalProtocolError).

Lossy codecs apply to floating tensors only; others travel as ``none`` (see
:func:`p2pcompute.wire.shards.effective_codec`). Decoding always returns the original dtype.

This module is the one home of codecs, dtypes and byte views: the lane, the all-reduce,
the simulated :class:`~p2pcompute.testing.LocalGroup`, state files and task tensors
all round, size and view tensors through it, so a simulation rounds exactly as the wire does.

Imports :mod:`p2pcompute.errors`, :mod:`p2pcompute.wire.shards` and torch.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from p2pcompute.errors import ConfigError, LocalProtocolError
from p2pcompute.wire.shards import CODECS, DTYPE_SIZES, INT8_BLOCK, effective_codec, encoded_size

__all__ = [
    "CODECS",
    "INT8_BLOCK",
    "TORCH_DTYPES",
    "byte_memoryview",
    "byte_view",
    "check_codec",
    "decode",
    "decode_into",
    "dtype_name",
    "empty",
    "encode",
    "encode_into",
    "roundtrip",
    "roundtrip_",
    "torch_dtype",
    "wire_bytes",
]

#: Elements rounded at a time by :func:`roundtrip_` (a multiple of the int8 block: bounded scratch).
ROUNDTRIP_CHUNK = 1 << 20

_BLOCK_BYTES = 4 + INT8_BLOCK

#: wire name -> torch dtype, for the dtypes this torch has.
TORCH_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in DTYPE_SIZES if isinstance(getattr(torch, name, None), torch.dtype)
}
_NAMES: dict[torch.dtype, str] = {dt: name for name, dt in TORCH_DTYPES.items()}

_SMALLEST_F32 = 2.0**-149  # the smallest positive (subnormal) float32


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype; LocalProtocolError for dtypes the lane does not carry.

    Example::

        >>> dtype_name(torch.bfloat16)
        'bfloat16'
    """
    try:
        return _NAMES[dtype]
    except KeyError:
        raise LocalProtocolError(f"the data lane does not carry {dtype}") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a wire name (only names in the table; never ``getattr`` on peer input)."""
    return TORCH_DTYPES[name]


def empty(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None = None
) -> torch.Tensor:
    """``torch.empty`` that does not warn for complex32 (experimental in torch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.empty(shape, dtype=dtype, device=device)


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's bytes (no copy)."""
    return t.reshape(-1).view(torch.uint8)


def byte_memoryview(t: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous CPU tensor's bytes (no copy)."""
    array: Any = byte_view(t).numpy()
    return memoryview(array)


def _aligned(buf: torch.Tensor, align: int) -> bool:
    return buf.data_ptr() % align == 0


def encode_into(codec: str, src: torch.Tensor, out: torch.Tensor) -> None:
    """Encode the flat tensor ``src`` into the uint8 tensor ``out`` (exactly its encoded size).

    Example::

        x = torch.randn(1000)
        buf = torch.empty(encoded_size("int8", "float32", 1000), dtype=torch.uint8)
        encode_into("int8", x, buf)
    """
    n = src.numel()
    if codec == "none":
        out.copy_(byte_view(src))
        return
    if codec in ("fp16", "bf16"):
        target = torch.float16 if codec == "fp16" else torch.bfloat16
        if _aligned(out, 2):
            out.view(target).copy_(src)
        else:
            out.copy_(src.to(target).view(torch.uint8))
        return
    if codec != "int8":
        raise LocalProtocolError(f"unknown codec {codec!r}")
    x = src.to(torch.float32) if src.dtype != torch.float32 else src
    full, rem = divmod(n, INT8_BLOCK)
    parts = [(0, full, INT8_BLOCK)] if full else []
    if rem:
        parts.append((full * INT8_BLOCK, 1, rem))
    offset = 0
    for start, blocks, width in parts:
        xb = x[start : start + blocks * width].view(blocks, width)
        absmax = xb.abs().amax(dim=1)  # (aminmax over dim=1 measured 10x slower here)
        if not bool(torch.isfinite(absmax).all()):
            raise LocalProtocolError("the int8 codec needs finite values (found inf or NaN)")
        # a block of tiny (subnormal) values would get a scale that underflows to 0 and decode
        # as zeros; the smallest positive float32 keeps them (found by hypothesis)
        scale = (absmax / 127.0).clamp_(min=_SMALLEST_F32)
        q = torch.div(xb, scale[:, None]).round_().clamp_(-127, 127)  # one temporary, in place after
        size = blocks * (4 + width)
        o = out[offset : offset + size].view(blocks, 4 + width)
        o[:, :4] = scale.reshape(-1).view(torch.uint8).view(blocks, 4)
        o[:, 4:].view(torch.int8).copy_(q)  # the float -> int8 conversion happens in the copy
        offset += size


def decode_into(codec: str, src: torch.Tensor, out: torch.Tensor) -> None:
    """Decode the uint8 tensor ``src`` into the flat tensor ``out`` (its dtype is the original one)."""
    n = out.numel()
    if codec == "none":
        byte_view(out).copy_(src)
        return
    if codec in ("fp16", "bf16"):
        target = torch.float16 if codec == "fp16" else torch.bfloat16
        if not _aligned(src, 2):
            src = src.clone()
        out.copy_(src.view(target))
        return
    if codec != "int8":
        raise LocalProtocolError(f"unknown codec {codec!r}")
    full, rem = divmod(n, INT8_BLOCK)
    parts = [(0, full, INT8_BLOCK)] if full else []
    if rem:
        parts.append((full * INT8_BLOCK, 1, rem))
    offset = 0
    for start, blocks, width in parts:
        size = blocks * (4 + width)
        o = src[offset : offset + size].view(blocks, 4 + width)
        scale = o[:, :4].reshape(-1).clone().view(torch.float32).view(blocks, 1)
        dest = out[start : start + blocks * width].view(blocks, width)
        if dest.dtype == torch.float32:  # convert in the copy, scale in place: no temporaries
            dest.copy_(o[:, 4:].view(torch.int8)).mul_(scale)
        else:  # scale in float32, round once into the narrower dtype
            dest.copy_(o[:, 4:].view(torch.int8).to(torch.float32) * scale)
        offset += size


def encode(codec: str, t: torch.Tensor) -> torch.Tensor:
    """Encode a whole tensor; returns a new uint8 tensor (convenience for tests and small data)."""
    flat = t.detach().contiguous().reshape(-1)
    out = torch.empty(encoded_size(codec, dtype_name(t.dtype), flat.numel()), dtype=torch.uint8)
    encode_into(codec, flat, out)
    return out


def decode(codec: str, data: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode a whole tensor of ``dtype`` and ``shape`` from the uint8 tensor ``data``."""
    out = empty(shape, dtype)
    decode_into(codec, data, out.reshape(-1))
    return out


def check_codec(name: str) -> str:
    """Return ``name`` when it is a known codec, else raise :class:`ConfigError`.

    Example::

        >>> check_codec("fp16")
        'fp16'
    """
    if name not in CODECS:
        raise ConfigError(f"unknown compression {name!r}; expected one of {', '.join(CODECS)}")
    return name


def wire_bytes(tensor: torch.Tensor, codec: str) -> int:
    """Payload bytes ``tensor`` costs on the lane under ``codec`` (lossy codecs: floating dtypes only).

    Example::

        >>> wire_bytes(torch.zeros(1000), "fp16")
        2000
    """
    check_codec(codec)
    dtype = dtype_name(tensor.dtype)
    return encoded_size(effective_codec(codec, dtype), dtype, tensor.numel())


def roundtrip_(codec: str, values: torch.Tensor) -> torch.Tensor:
    """Replace the contiguous ``values`` in place by what a receiver decodes under ``codec``; return it.

    Exactly the lane's encode and decode (same int8 blocks and scales), a bounded chunk at a time.

    Example::

        t = torch.randn(10_000)
        roundtrip_("int8", t)        # t now holds what a peer would receive
    """
    check_codec(codec)
    codec = effective_codec(codec, dtype_name(values.dtype))
    if codec == "none":
        return values
    flat = values.reshape(-1)
    if flat.data_ptr() != values.data_ptr() or not values.is_contiguous():
        raise LocalProtocolError("roundtrip_ needs a contiguous tensor")
    for lo in range(0, flat.numel(), ROUNDTRIP_CHUNK):
        piece = flat[lo : lo + ROUNDTRIP_CHUNK]
        decode_into(codec, encode(codec, piece), piece)
    return values


def roundtrip(codec: str, tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor: ``tensor`` as it comes out of the lane's encode-then-decode under ``codec``.

    Example::

        >>> roundtrip("fp16", torch.tensor([1.0, 1e-4])).dtype
        torch.float32
    """
    return roundtrip_(codec, tensor.detach().clone(memory_format=torch.contiguous_format))
