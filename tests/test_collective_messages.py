"""The collective wire rules: strict schemas with caps, and signed join adverts."""

from __future__ import annotations

import time

import pytest

from p2pcompute.collective.messages import (
    HELLO,
    HELLO_ACK,
    JOIN,
    JOIN_KIND,
    MAX_REQUEST,
    STATUS,
    open_join,
)
from p2pcompute.errors import (
    BadSignature,
    LocalProtocolError,
    MalformedMessage,
    MessageTooLarge,
    UnsupportedVersion,
)
from p2pcompute.identity import Identity
from p2pcompute.wire.codec import encode
from p2pcompute.wire.signing import seal_signed


def join_body(peer: str, **over: object) -> bytes:
    fields = {
        "run": "run", "round": "r1", "peer": peer, "weight": 2.0, "bandwidth": 1.0,
        "layout": bytes(32), "expires": time.time() + 30, "addrs": ["/ip4/127.0.0.1/tcp/1"],
    }
    fields.update(over)
    return JOIN.build(**fields)


def test_signed_join_round_trip_and_forgeries() -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    raw = seal_signed(JOIN_KIND, join_body(alice.peer_id), alice)
    body = open_join(raw, via=mallory.peer_id)  # forwarded by anyone: the signature is what counts
    assert body["peer"] == alice.peer_id
    assert body["weight"] == 2.0
    # mallory signs an advert that claims to be alice's
    forged = seal_signed(JOIN_KIND, join_body(alice.peer_id), mallory)
    with pytest.raises(BadSignature) as err:
        open_join(forged, via=mallory.peer_id)
    assert err.value.peer == mallory.peer_id
    # a signature made for another kind of message cannot be replayed as a join
    other = seal_signed("p2pcompute.capacity", join_body(alice.peer_id), alice)
    with pytest.raises(BadSignature):
        open_join(other, via=alice.peer_id)
    # a flipped byte in the body breaks the signature
    tampered = bytearray(raw)
    tampered[raw.index(b"run") + 5] ^= 1
    with pytest.raises((BadSignature, MalformedMessage)):
        open_join(bytes(tampered), via=alice.peer_id)


def test_join_schema_rejects_bad_fields() -> None:
    peer = Identity.generate()
    for bad in ({"weight": -1.0}, {"layout": bytes(31)}, {"addrs": ["x"] * 9}, {"run": "r" * 200}):
        with pytest.raises(LocalProtocolError, match=r"refusing"):
            join_body(peer.peer_id, **bad)
    raw = encode({"t": "coll.join", "v": 2, "run": "r"})
    with pytest.raises(UnsupportedVersion):
        JOIN.parse(raw, peer="p")


def test_control_messages_are_strict_and_capped() -> None:
    ok = STATUS.build(round="r|k|d", attempt=1, digest="ab", ok=False, leaving=False,
                      suspects=["x"], blamed=[])
    assert STATUS.parse(ok, peer="p")["suspects"] == ["x"]
    unknown = encode({"t": "coll.status", "v": 1, "round": "r", "attempt": 1, "digest": "d", "ok": True,
                      "leaving": False, "suspects": [], "blamed": [], "extra": 1})
    with pytest.raises(MalformedMessage, match="unknown keys"):
        STATUS.parse(unknown, peer="p")
    wrong = encode({"t": "coll.status", "v": 1, "round": "r", "attempt": 0, "digest": "d", "ok": True,
                    "leaving": False, "suspects": [], "blamed": []})
    with pytest.raises(MalformedMessage, match="below"):
        STATUS.parse(wrong, peer="p")
    not_str = encode({"t": "coll.hello", "v": 1, "run": "r", "round": "k", "digest": "", "seq": 0,
                      "members": [1], "adverts": []})
    with pytest.raises(MalformedMessage):
        HELLO.parse(not_str, peer="p")
    with pytest.raises(MessageTooLarge) as err:
        HELLO_ACK.parse(b"\x00" * (HELLO_ACK.max_size + 1), peer="p")
    assert err.value.peer == "p"
    assert HELLO.max_size <= MAX_REQUEST
