"""Training state as flat named tensors, its digest, and a safe on-disk/on-wire format.

A :class:`TrainingState` is what peers must agree on (parameters, outer-optimizer
momentum, the outer step) plus optional local extras (the inner optimizer's moments),
as a flat ``name -> tensor`` map with a few scalar ``meta`` values. Its
:meth:`~TrainingState.digest` is a SHA-256 over names, dtypes, shapes and bytes, so two
peers can check they hold bit-identical state.

The serialized form never goes near pickle: ``MAGIC``, a 4-byte big-endian header
length, a strictly decoded msgpack header (step, meta, and for every tensor its name,
dtype from an allow-list, shape, offset and length), then the raw tensor bytes back to
back. Loading checks every offset and length before touching the bytes and recomputes
the digest. Checkpoints are written with :func:`~p2pcompute._fsutil.atomic_write`.

Imports torch, :mod:`p2pcompute.tensors.codecs`, :mod:`p2pcompute.wire`, :mod:`p2pcompute.errors`
and ``_fsutil``.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from p2pcompute._fsutil import atomic_write
from p2pcompute.errors import (
    ConfigError,
    IntegrityError,
    MalformedMessage,
    RemoteProtocolError,
    UnsupportedVersion,
)
from p2pcompute.tensors import codecs
from p2pcompute.wire.codec import decode, encode
from p2pcompute.wire.shards import DTYPE_SIZES

MAGIC = b"P2PCST01"
FORMAT_VERSION = 1
MAX_HEADER = 16 << 20
MAX_TENSORS = 65536
MAX_NAME = 256
MAX_DIMS = 8
MAX_META = 1024

#: The dtypes a state file may hold (a format allow-list); names and torch types come from
#: :mod:`p2pcompute.tensors.codecs`, the one table of dtypes.
DTYPES: dict[str, torch.dtype] = {
    name: codecs.TORCH_DTYPES[name]
    for name in (
        "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"
    )
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_LEN = struct.Struct(">I")

MetaValue = int | float | str | bool


class CheckpointError(ConfigError):
    """A local checkpoint file that is missing, truncated, corrupted or of another format."""


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, contiguous, as a read-only byte view (a copy only if needed).

    Example::

        >>> bytes(tensor_bytes(torch.tensor([1], dtype=torch.int16)))
        b'\\x01\\x00'
    """
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return codecs.byte_memoryview(flat).cast("B")


def dtype_name(dtype: torch.dtype) -> str:
    """Our wire name of a torch dtype; :class:`ConfigError` for one we do not carry."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ConfigError(f"dtype {dtype} cannot be stored") from None


@dataclass
class TrainingState:
    """Named tensors, the outer step and scalar metadata.

    Example::

        state = TrainingState(step=3, tensors={"param/w": torch.zeros(4)}, meta={"inner_steps": 50})
        blob = state.to_bytes(); same = TrainingState.from_bytes(blob)
        assert same.digest() == state.digest()
    """

    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, MetaValue] = field(default_factory=dict)

    def digest(self) -> bytes:
        """SHA-256 over the step, the meta values and every tensor's name, dtype, shape and bytes."""
        h = hashlib.sha256()
        h.update(encode({"step": self.step, "meta": dict(sorted(self.meta.items()))}))
        for name in sorted(self.tensors):
            t = self.tensors[name]
            h.update(encode([name, dtype_name(t.dtype), list(t.shape)]))
            h.update(tensor_bytes(t))
        return h.digest()

    def header(self) -> dict[str, Any]:
        """The msgpack header describing the layout of :meth:`payload`."""
        entries = []
        offset = 0
        for name in sorted(self.tensors):
            t = self.tensors[name]
            nbytes = t.numel() * t.element_size()
            entries.append(
                {"name": name, "dtype": dtype_name(t.dtype), "shape": list(t.shape), "offset": offset,
                 "nbytes": nbytes}
            )
            offset += nbytes
        return {"t": "training-state", "v": FORMAT_VERSION, "step": self.step, "meta": dict(self.meta),
                "tensors": entries, "digest": self.digest(), "size": offset}

    def to_bytes(self) -> bytes:
        """The whole state in the safe format (header, then raw bytes)."""
        head = encode(self.header())
        parts = [MAGIC, _LEN.pack(len(head)), head]
        parts += [bytes(tensor_bytes(self.tensors[name])) for name in sorted(self.tensors)]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, *, peer: str | None = None) -> TrainingState:
        """Parse the safe format strictly; every error (malformed, integrity) names ``peer``."""
        view = memoryview(data).cast("B")
        if len(view) < len(MAGIC) + _LEN.size or bytes(view[: len(MAGIC)]) != MAGIC:
            raise MalformedMessage("not a p2pcompute training state (bad magic)", peer=peer)
        (hlen,) = _LEN.unpack(view[len(MAGIC) : len(MAGIC) + _LEN.size])
        start = len(MAGIC) + _LEN.size
        if hlen > MAX_HEADER or start + hlen > len(view):
            raise MalformedMessage(f"state header of {hlen} bytes is too large or truncated", peer=peer)
        header = parse_header(decode(view[start : start + hlen], max_size=MAX_HEADER, peer=peer), peer=peer)
        body = view[start + hlen :]
        if len(body) != header.size:
            raise IntegrityError(f"state body is {len(body)} bytes, header says {header.size}", peer=peer)
        state = header.assemble(body)
        if state.digest() != header.digest:
            raise IntegrityError("state digest does not match its header", peer=peer)
        return state


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class StateHeader:
    """A validated state header: the layout of the raw bytes that follow it."""

    step: int
    meta: dict[str, MetaValue]
    entries: tuple[TensorEntry, ...]
    digest: bytes
    size: int

    def assemble(self, body: bytes | bytearray | memoryview) -> TrainingState:
        """Build the state from ``body`` (exactly :attr:`size` bytes); tensors own fresh memory."""
        view = memoryview(body).cast("B")
        tensors: dict[str, torch.Tensor] = {}
        for e in self.entries:
            raw = bytearray(view[e.offset : e.offset + e.nbytes])
            dtype = DTYPES[e.dtype]
            if e.nbytes == 0:
                t = torch.empty(e.shape, dtype=dtype)
            else:
                t = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(e.shape)
            tensors[e.name] = t
        return TrainingState(self.step, tensors, dict(self.meta))


def _bad(msg: str, peer: str | None) -> MalformedMessage:
    return MalformedMessage(f"training state header: {msg}", peer=peer)


def parse_header(obj: Any, *, peer: str | None = None) -> StateHeader:
    """Validate a decoded state header: types, allow-listed dtypes, and a gap-free, in-bounds layout.

    Example::

        header = parse_header(decode(raw, max_size=MAX_HEADER, peer=p), peer=p)
    """
    if not isinstance(obj, Mapping):
        raise _bad("not a map", peer)
    expected = {"t", "v", "step", "meta", "tensors", "digest", "size"}
    if set(obj) != expected:
        raise _bad(f"keys {sorted(map(str, obj))}", peer)
    if obj["t"] != "training-state":
        raise _bad(f"type {obj['t']!r}", peer)
    if obj["v"] != FORMAT_VERSION:
        raise UnsupportedVersion(f"training state version {obj['v']!r}", peer=peer)
    step, meta, entries, digest, size = obj["step"], obj["meta"], obj["tensors"], obj["digest"], obj["size"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _bad("step", peer)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _bad("size", peer)
    if not isinstance(digest, bytes) or len(digest) != 32:
        raise _bad("digest", peer)
    if not isinstance(meta, Mapping) or len(meta) > MAX_META:
        raise _bad("meta", peer)
    for k, v in meta.items():
        if not isinstance(k, str) or len(k) > MAX_NAME or not isinstance(v, int | float | str | bool):
            raise _bad(f"meta entry {k!r}", peer)
        if isinstance(v, str) and len(v) > MAX_NAME:
            raise _bad(f"meta entry {k!r} too long", peer)
    if not isinstance(entries, list) or len(entries) > MAX_TENSORS:
        raise _bad("tensors", peer)
    out: list[TensorEntry] = []
    offset = 0
    names: set[str] = set()
    for i, e in enumerate(entries):
        if not isinstance(e, Mapping) or set(e) != {"name", "dtype", "shape", "offset", "nbytes"}:
            raise _bad(f"tensor entry {i}", peer)
        name, dt, shape, off, nbytes = e["name"], e["dtype"], e["shape"], e["offset"], e["nbytes"]
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or name in names:
            raise _bad(f"tensor {i} name", peer)
        names.add(name)
        if dt not in DTYPES:
            raise _bad(f"tensor {name!r} dtype {dt!r} not allowed", peer)
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)
        ):
            raise _bad(f"tensor {name!r} shape", peer)
        want = math.prod(shape) * DTYPE_SIZES[dt]
        if off != offset or nbytes != want:
            raise _bad(f"tensor {name!r} layout (offset {off!r}, {nbytes!r} bytes)", peer)
        out.append(TensorEntry(name, dt, tuple(shape), off, nbytes))
        offset += want
    if offset != size:
        raise _bad(f"size {size} does not match the tensors ({offset})", peer)
    return StateHeader(step, dict(meta), tuple(out), digest, size)


def save_checkpoint(path: str | os.PathLike[str], state: TrainingState) -> None:
    """Write ``state`` to ``path`` atomically (never torn, never pickle).

    Example::

        save_checkpoint("run/ckpt.p2pc", opt.export_state(local=True))
    """
    atomic_write(path, state.to_bytes())


def load_checkpoint(path: str | os.PathLike[str]) -> TrainingState:
    """Read a checkpoint written by :func:`save_checkpoint`; :class:`CheckpointError` when unusable.

    Example::

        state = load_checkpoint("run/ckpt.p2pc"); opt.load_state(state)
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {os.fspath(path)!r}: {exc}") from None
    try:
        return TrainingState.from_bytes(data)
    except RemoteProtocolError as exc:  # malformed or corrupted: for a local file, a config problem
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} is unusable: {exc}") from None
