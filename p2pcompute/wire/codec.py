"""Strict msgpack encoding and schema validation (sans-IO).

Rules every message type follows:

* the encoded size is checked against the type's cap before decoding;
* msgpack is decoded with ``raw=False``, ``strict_map_key=True`` and no ext types,
  and with per-container limits derived from the cap;
* the top level is a map with a string ``"t"`` (type) and an integer ``"v"`` (version);
* unknown keys, missing keys, wrong types and out-of-range values are errors.

Any failure raises :class:`~p2pcompute.errors.MalformedMessage` (or a subclass)
naming the peer that sent the bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from p2pcompute.errors import (
    LocalProtocolError,
    MalformedMessage,
    MessageTooLarge,
    UnsupportedVersion,
)


def encode(obj: Any) -> bytes:
    """Encode ``obj`` as msgpack (bin type for bytes, str for text).

    Example::

        >>> decode(encode({"t": "x", "v": 1}), max_size=64)
        {'t': 'x', 'v': 1}
    """
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not allowed")


def decode(data: bytes | bytearray | memoryview, *, max_size: int, peer: str | None = None) -> Any:
    """Decode msgpack ``data`` of at most ``max_size`` bytes, strictly.

    Raises :class:`MessageTooLarge` before touching the bytes when they exceed
    the cap, and :class:`MalformedMessage` for anything msgpack rejects
    (truncation, trailing bytes, ext types, non-string map keys, bad UTF-8).

    Example::

        >>> decode(b"\\x81\\xa1a\\x01", max_size=16)
        {'a': 1}
    """
    size = len(data)
    if size > max_size:
        raise MessageTooLarge(f"message of {size} bytes exceeds the cap of {max_size}", peer=peer)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
            max_str_len=max_size,
            max_bin_len=max_size,
            max_array_len=max_size,
            max_map_len=max_size // 2 + 1,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types; translate all of them
        raise MalformedMessage(f"undecodable msgpack: {exc.__class__.__name__}: {exc}", peer=peer) from None


_MISSING = object()


@dataclass(frozen=True)
class Field:
    """One key of a message map.

    ``kind`` is the Python type msgpack decodes to (``int``, ``float``, ``str``,
    ``bytes``, ``bool``, ``list``, ``dict``); ``float`` also accepts ints.
    ``min``/``max`` bound numbers, ``max_len`` bounds str/bytes/list/dict sizes,
    ``exact_len`` pins a bytes length (keys, signatures, digests).
    """

    name: str
    kind: type
    optional: bool = False
    min: float | None = None
    max: float | None = None
    max_len: int | None = None
    exact_len: int | None = None
    item: type | None = None

    def check(self, value: Any, peer: str | None, where: str) -> Any:
        kind = self.kind
        label = f"{where}.{self.name}"
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, bool):
            raise MalformedMessage(f"{label}: expected int, got bool", peer=peer)
        if not isinstance(value, kind):
            raise MalformedMessage(
                f"{label}: expected {kind.__name__}, got {type(value).__name__}", peer=peer
            )
        if isinstance(value, int | float) and not isinstance(value, bool):
            if value != value:  # NaN
                raise MalformedMessage(f"{label}: NaN", peer=peer)
            if self.min is not None and value < self.min:
                raise MalformedMessage(f"{label}: {value} below minimum {self.min}", peer=peer)
            if self.max is not None and value > self.max:
                raise MalformedMessage(f"{label}: {value} above maximum {self.max}", peer=peer)
        if isinstance(value, str | bytes | list | dict):
            if self.max_len is not None and len(value) > self.max_len:
                raise MalformedMessage(f"{label}: length {len(value)} over {self.max_len}", peer=peer)
            if self.exact_len is not None and len(value) != self.exact_len:
                raise MalformedMessage(f"{label}: length {len(value)}, expected {self.exact_len}", peer=peer)
        if self.item is not None and isinstance(value, list):
            for i, element in enumerate(value):
                if not isinstance(element, self.item) or (self.item is int and isinstance(element, bool)):
                    raise MalformedMessage(f"{label}[{i}]: expected {self.item.__name__}", peer=peer)
        return value


@dataclass(frozen=True)
class Schema:
    """A message type: its name (the ``"t"`` key), version (``"v"``), cap and fields.

    Example::

        PING = Schema("ping", 1, max_size=256, fields=(Field("nonce", int, min=0),))
        msg = PING.parse(raw_bytes, peer=sender)      # dict, validated
        raw = PING.build(nonce=7)                      # bytes
    """

    type: str
    version: int
    max_size: int
    fields: tuple[Field, ...]

    def validate(self, obj: Any, *, peer: str | None = None) -> dict[str, Any]:
        """Check an already decoded object against this schema; return a clean dict."""
        if not isinstance(obj, Mapping):
            raise MalformedMessage(f"{self.type}: expected a map, got {type(obj).__name__}", peer=peer)
        if obj.get("t") != self.type:
            raise MalformedMessage(f"expected message type {self.type!r}, got {obj.get('t')!r}", peer=peer)
        version = obj.get("v")
        if version != self.version:
            raise UnsupportedVersion(
                f"{self.type}: version {version!r} not supported (we speak {self.version})", peer=peer
            )
        known = {f.name for f in self.fields} | {"t", "v"}
        unknown = [k for k in obj if k not in known]
        if unknown:
            raise MalformedMessage(f"{self.type}: unknown keys {sorted(map(str, unknown))}", peer=peer)
        out: dict[str, Any] = {"t": self.type, "v": self.version}
        for f in self.fields:
            value = obj.get(f.name, _MISSING)
            if value is _MISSING or value is None:
                if f.optional:
                    out[f.name] = None
                    continue
                raise MalformedMessage(f"{self.type}: missing key {f.name!r}", peer=peer)
            out[f.name] = f.check(value, peer, self.type)
        return out

    def parse(self, data: bytes | bytearray | memoryview, *, peer: str | None = None) -> dict[str, Any]:
        """Decode and validate bytes received from ``peer``."""
        return self.validate(decode(data, max_size=self.max_size, peer=peer), peer=peer)

    def build(self, **values: Any) -> bytes:
        """Encode a message of this type; validates locally first so we never send junk."""
        obj = {"t": self.type, "v": self.version, **{k: v for k, v in values.items() if v is not None}}
        data = encode(obj)
        if len(data) > self.max_size:
            raise LocalProtocolError(f"{self.type}: {len(data)} bytes over the cap of {self.max_size}")
        try:
            self.validate(obj)
        except MalformedMessage as exc:
            raise LocalProtocolError(f"refusing to send an invalid message: {exc}") from None
        return data
