"""The shared wire layer: strict decoding (fuzzed), schemas and signed envelopes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.errors import (
    BadSignature,
    LocalProtocolError,
    MalformedMessage,
    MessageTooLarge,
    UnsupportedVersion,
)
from p2pcompute.identity import Identity
from p2pcompute.wire.codec import Field, Schema, decode, encode
from p2pcompute.wire.signing import open_signed, peer_id_from_public_key, seal_signed

PING = Schema(
    "ping", 1, max_size=256, fields=(Field("n", int, min=0, max=10), Field("s", str, optional=True))
)

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)


def _undecodable(data: bytes) -> bool:
    try:
        msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_no_ext)
    except Exception:
        return True
    return False


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError("ext")


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_decode_arbitrary_bytes_only_raises_malformed(data: bytes) -> None:
    with pytest.raises(MalformedMessage) if _undecodable(data) else _nothing():
        decode(data, max_size=256, peer="p")


@settings(max_examples=300, deadline=None)
@given(msgpack_values)
def test_schema_on_arbitrary_msgpack_only_raises_malformed(obj: Any) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    try:
        PING.parse(data, peer="p")
    except MalformedMessage as exc:
        blamed = exc.peer
    else:
        blamed = "p"
    assert blamed == "p"


@given(st.integers(0, 10))
def test_schema_roundtrip(n: int) -> None:
    assert PING.parse(PING.build(n=n)) == {"t": "ping", "v": 1, "n": n, "s": None}


def test_schema_rejections() -> None:
    with pytest.raises(UnsupportedVersion):
        PING.parse(encode({"t": "ping", "v": 2, "n": 1}))
    with pytest.raises(MalformedMessage):
        PING.parse(encode({"t": "ping", "v": 1, "n": 11}))
    with pytest.raises(MalformedMessage):
        PING.parse(encode({"t": "ping", "v": 1, "n": True}))
    with pytest.raises(MalformedMessage):
        PING.parse(encode({"t": "ping", "v": 1, "n": 1, "x": 0}))
    with pytest.raises(MessageTooLarge):
        PING.parse(b"\x00" * 257)
    with pytest.raises(MalformedMessage):
        decode(b"\xd4\x01\x00", max_size=16)  # ext type
    with pytest.raises(MalformedMessage):
        decode(b"\x81\x01\x02", max_size=16)  # non-string map key
    with pytest.raises(LocalProtocolError):
        PING.build(n=99)


def test_signed_envelope_domain_separation_and_signer() -> None:
    alice, bob = Identity.from_seed(b"a" * 32), Identity.from_seed(b"b" * 32)
    raw = seal_signed("advert", encode({"x": 1}), alice)
    msg = open_signed(raw, kind="advert", max_size=1024, peer="net", expected_signer=alice.peer_id)
    assert msg.signer == alice.peer_id == peer_id_from_public_key(alice.public_key)
    assert msg.body == {"x": 1}
    with pytest.raises(BadSignature):
        open_signed(raw, kind="receipt", max_size=1024)
    with pytest.raises(BadSignature):
        open_signed(raw, kind="advert", max_size=1024, expected_signer=bob.peer_id)
    env = msgpack.unpackb(raw, raw=False)
    env["key"] = bob.public_key
    with pytest.raises(BadSignature):
        open_signed(msgpack.packb(env, use_bin_type=True), kind="advert", max_size=1024)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_open_signed_on_arbitrary_bytes(data: bytes) -> None:
    with pytest.raises((MalformedMessage, BadSignature)):
        open_signed(data, kind="advert", max_size=256)


@settings(deadline=None)  # the first example imports py-libp2p
@given(st.binary(min_size=32, max_size=32))
def test_peer_id_matches_py_libp2p(key: bytes) -> None:
    from libp2p.peer.id import ID

    prefix = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
    assert peer_id_from_public_key(key) == ID(prefix + key).to_base58()


def test_a_short_public_key_is_a_typed_local_error() -> None:
    from p2pcompute.errors import LocalProtocolError
    from p2pcompute.wire.signing import peer_id_from_public_key

    with pytest.raises(LocalProtocolError):
        peer_id_from_public_key(b"\x01" * 31)
