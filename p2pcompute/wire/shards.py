"""Sans-IO shard framing for the tensor data plane: dtypes, codecs' sizes, manifests, record plans.

A transfer moves a named group of tensors ("shards"). The sender first sends a
*manifest* (one msgpack map, sealed like every other record) naming each shard's
dtype, shape and codec; both sides then derive the same *record plan* from it:
the concatenated encoded payload is cut into records of at most ``record_size``
bytes, a record never splits an element range it cannot decode on its own, and
small shards are packed together so that a state dict of many tiny tensors does
not cost one record each. The receiver never trusts a sender-supplied layout: it
recomputes the plan, so a record's bytes always land where the manifest says.

Record header on the wire (authenticated as AAD, never trusted before that)::

    kind: u8 | body length: u32 big-endian      then ``body length`` bytes of AEAD ciphertext+tag

This module imports only :mod:`p2pcompute.errors` and :mod:`p2pcompute.wire.codec`;
it knows nothing of torch (dtypes are plain names with byte sizes).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from p2pcompute.errors import LocalProtocolError, MalformedMessage
from p2pcompute.wire.codec import Field, Schema

# --- dtypes -----------------------------------------------------------------------------------------

#: Every dtype the lane moves, by wire name, with its element size in bytes. Names are torch's
#: (``torch.<name>``); the tensors layer drops the ones the installed torch lacks.
DTYPE_SIZES: dict[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex32": 4,
    "complex64": 8,
    "complex128": 16,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
}

#: Dtypes a lossy codec may apply to; every other dtype always travels with codec ``"none"``.
LOSSY_OK: frozenset[str] = frozenset({"float32", "float64", "float16", "bfloat16"})

CODECS: tuple[str, ...] = ("none", "fp16", "bf16", "int8")

#: Elements per int8 block; each block is a float32 scale followed by up to this many int8 values.
INT8_BLOCK = 256
_INT8_BLOCK_BYTES = 4 + INT8_BLOCK

DEFAULT_RECORD_SIZE = 1 << 20
MIN_RECORD_SIZE = 4096
MAX_RECORD_SIZE = 16 << 20
MAX_SHARDS = 1 << 16
MAX_NAME_LEN = 512
MAX_TAG_LEN = 256
MAX_NDIM = 32


def effective_codec(codec: str, dtype: str) -> str:
    """The codec a shard of ``dtype`` really uses when the transfer asks for ``codec``.

    Lossy codecs apply to floating tensors only; a codec that would not shrink the
    data (fp16 of a float16 tensor) degrades to ``"none"``.

    Example::

        >>> effective_codec("int8", "int64"), effective_codec("fp16", "float32")
        ('none', 'fp16')
    """
    if codec not in CODECS:
        raise LocalProtocolError(f"unknown codec {codec!r}; choose one of {CODECS}")
    if codec == "none" or dtype not in LOSSY_OK:
        return "none"
    if (codec, dtype) in {("fp16", "float16"), ("bf16", "bfloat16")}:
        return "none"
    return codec


def encoded_size(codec: str, dtype: str, numel: int) -> int:
    """Bytes that ``numel`` elements of ``dtype`` take under ``codec``.

    Example::

        >>> encoded_size("int8", "float32", 300)    # two blocks: 2 scales + 300 values
        308
    """
    if codec == "none":
        return numel * DTYPE_SIZES[dtype]
    if codec in ("fp16", "bf16"):
        return 2 * numel
    if codec == "int8":
        return numel + 4 * math.ceil(numel / INT8_BLOCK)
    raise LocalProtocolError(f"unknown codec {codec!r}")


def elements_per_record(codec: str, dtype: str, record_size: int) -> int:
    """Largest element count whose encoding fits one record (block aligned for int8)."""
    if codec == "none":
        return max(1, record_size // DTYPE_SIZES[dtype])
    if codec in ("fp16", "bf16"):
        return record_size // 2
    return (record_size // _INT8_BLOCK_BYTES) * INT8_BLOCK


# --- shards and manifests -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSpec:
    """One tensor of a transfer as the manifest describes it.

    Example::

        >>> ShardSpec("w", "float32", (2, 3), "none").nbytes
        24
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    codec: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Encoded payload bytes of this shard."""
        return encoded_size(self.codec, self.dtype, self.numel)

    def to_wire(self) -> list[Any]:
        return [self.name, self.dtype, list(self.shape), self.codec]


@dataclass(frozen=True)
class Manifest:
    """What a transfer carries: its tag, shards, record size and digest mode."""

    tag: str
    shards: tuple[ShardSpec, ...]
    record_size: int = DEFAULT_RECORD_SIZE
    digest: str = "none"

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def build(self) -> bytes:
        """Encode as a ``lane-open`` message (validated first)."""
        return OPEN.build(
            tag=self.tag,
            shards=[s.to_wire() for s in self.shards],
            record_size=self.record_size,
            digest=self.digest,
            total=self.total_bytes,
        )


DIGESTS = ("none", "sha256")

OPEN = Schema(
    "lane-open",
    1,
    max_size=8 << 20,
    fields=(
        Field("tag", str, max_len=MAX_TAG_LEN),
        Field("shards", list, max_len=MAX_SHARDS, item=list),
        Field("record_size", int, min=MIN_RECORD_SIZE, max=MAX_RECORD_SIZE),
        Field("digest", str, max_len=16),
        Field("total", int, min=0),
    ),
)

END = Schema(
    "lane-end",
    1,
    max_size=4 << 20,
    fields=(
        Field("records", int, min=0),
        Field("total", int, min=0),
        Field("digests", list, max_len=MAX_SHARDS, item=bytes),
    ),
)

ACK = Schema(
    "lane-ack",
    1,
    max_size=4096,
    fields=(
        Field("ok", bool),
        Field("error", str, optional=True, max_len=1024),
        # a refusal for want of room (parked transfers, memory): honest, retry later, blame no one
        Field("busy", bool, optional=True),
        # with busy: the transfer is over the receiver's size cap, so a retry cannot succeed
        Field("too_large", bool, optional=True),
    ),
)

GO = Schema("lane-go", 1, max_size=256, fields=())


def parse_manifest(data: bytes | bytearray | memoryview, *, peer: str | None, max_bytes: int) -> Manifest:
    """Decode and check a ``lane-open`` message; refuse transfers over ``max_bytes``.

    Raises :class:`MalformedMessage` naming ``peer`` for unknown dtypes or codecs,
    bad shapes, duplicate names, a codec a dtype may not use, or a total that
    does not match the shards.
    """
    msg = OPEN.parse(data, peer=peer)
    if msg["digest"] not in DIGESTS:
        raise MalformedMessage(f"lane-open: unknown digest {msg['digest']!r}", peer=peer)
    shards: list[ShardSpec] = []
    seen: set[str] = set()
    total = 0
    for i, raw in enumerate(msg["shards"]):
        where = f"lane-open.shards[{i}]"
        if len(raw) != 4:
            raise MalformedMessage(f"{where}: expected [name, dtype, shape, codec]", peer=peer)
        name, dtype, shape, codec = raw
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
            raise MalformedMessage(f"{where}: bad name", peer=peer)
        if name in seen:
            raise MalformedMessage(f"{where}: duplicate name {name!r}", peer=peer)
        seen.add(name)
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise MalformedMessage(f"{where}: unknown dtype {dtype!r}", peer=peer)
        if not isinstance(codec, str) or codec not in CODECS:
            raise MalformedMessage(f"{where}: unknown codec {codec!r}", peer=peer)
        if codec != "none" and effective_codec(codec, dtype) != codec:
            raise MalformedMessage(f"{where}: codec {codec} is not allowed for {dtype}", peer=peer)
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 48 for d in shape)
        ):
            raise MalformedMessage(f"{where}: bad shape", peer=peer)
        spec = ShardSpec(name, dtype, tuple(shape), codec)
        total += spec.nbytes
        if total > max_bytes:
            raise MalformedMessage(f"lane-open: transfer larger than the cap of {max_bytes} bytes", peer=peer)
        shards.append(spec)
    if total != msg["total"]:
        raise MalformedMessage(f"lane-open: total {msg['total']} does not match shards ({total})", peer=peer)
    return Manifest(msg["tag"], tuple(shards), msg["record_size"], msg["digest"])


# --- record plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """A run of elements ``[start, start + count)`` of shard ``shard``, ``nbytes`` encoded bytes."""

    shard: int
    start: int
    count: int
    nbytes: int


@dataclass(frozen=True)
class RecordPlan:
    """The pieces one DATA record carries, in order, and its plaintext length."""

    pieces: tuple[Piece, ...]
    nbytes: int


def plan_records(shards: Sequence[ShardSpec], record_size: int) -> Iterator[RecordPlan]:
    """Cut the shards' encoded payload into records (a generator: O(1) memory per record).

    Large shards are cut at element boundaries (block boundaries for int8); small
    shards are packed together up to ``record_size``. Both ends call this on the
    same manifest, so they agree byte for byte.

    Example::

        >>> specs = [ShardSpec("a", "float32", (3,), "none"), ShardSpec("b", "int64", (2,), "none")]
        >>> [(p.nbytes, len(p.pieces)) for p in plan_records(specs, 4096)]
        [(28, 2)]
    """
    current: list[Piece] = []
    used = 0
    for index, spec in enumerate(shards):
        numel = spec.numel
        step = elements_per_record(spec.codec, spec.dtype, record_size)
        start = 0
        while start < numel:
            count = min(step, numel - start)
            nbytes = encoded_size(spec.codec, spec.dtype, count)
            if current and used + nbytes > record_size:
                yield RecordPlan(tuple(current), used)
                current, used = [], 0
            current.append(Piece(index, start, count, nbytes))
            used += nbytes
            start += count
    if current:
        yield RecordPlan(tuple(current), used)


def count_records(shards: Sequence[ShardSpec], record_size: int) -> int:
    """How many DATA records :func:`plan_records` yields."""
    return sum(1 for _ in plan_records(shards, record_size))


# --- record header ---------------------------------------------------------------------------------

HEADER = struct.Struct(">BI")
HEADER_SIZE = HEADER.size
TAG_SIZE = 16

KIND_OPEN = 1
KIND_DATA = 2
KIND_END = 3
KIND_GO = 4
KIND_ACK = 5
KINDS = frozenset({KIND_OPEN, KIND_DATA, KIND_END, KIND_GO, KIND_ACK})

#: Largest sealed body of a control record (OPEN/END/ACK/GO).
MAX_CONTROL_BODY = OPEN.max_size + TAG_SIZE


def parse_header(
    data: bytes | bytearray | memoryview, *, expect: int, max_body: int, peer: str | None
) -> int:
    """Check a 5-byte record header; return the body length.

    The header is not yet authenticated (it is AAD of the record that follows), so
    this only refuses what could make us allocate or wait wrongly: another kind
    than ``expect`` or a body larger than ``max_body``.
    """
    kind, length = HEADER.unpack(data)
    if kind != expect:
        raise MalformedMessage(f"lane record of kind {kind}, expected {expect}", peer=peer)
    if length < TAG_SIZE or length > max_body:
        raise MalformedMessage(f"lane record body of {length} bytes (cap {max_body})", peer=peer)
    return int(length)
