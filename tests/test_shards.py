"""Sans-IO shard framing: manifests, record plans, record headers (no I/O, no torch)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.errors import LocalProtocolError, MalformedMessage, MessageTooLarge, UnsupportedVersion
from p2pcompute.wire.codec import encode
from p2pcompute.wire.shards import (
    CODECS,
    DTYPE_SIZES,
    HEADER,
    INT8_BLOCK,
    KIND_DATA,
    KIND_END,
    MIN_RECORD_SIZE,
    Manifest,
    ShardSpec,
    effective_codec,
    encoded_size,
    parse_header,
    parse_manifest,
    plan_records,
)

shapes = st.lists(st.integers(0, 40), min_size=0, max_size=4).map(tuple)
specs = st.builds(
    lambda dtype, shape, codec: ShardSpec("x", dtype, shape, effective_codec(codec, dtype)),
    st.sampled_from(sorted(DTYPE_SIZES)),
    shapes,
    st.sampled_from(CODECS),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(specs, max_size=8), st.integers(MIN_RECORD_SIZE, 3 * MIN_RECORD_SIZE))
def test_plan_covers_every_element_once_in_order_within_the_record_size(
    shards: list[ShardSpec], record_size: int
) -> None:
    shards = [ShardSpec(f"s{i}", s.dtype, s.shape, s.codec) for i, s in enumerate(shards)]
    cursor = [0] * len(shards)
    last_shard = 0
    for plan in plan_records(shards, record_size):
        assert 0 < plan.nbytes <= record_size
        assert plan.nbytes == sum(p.nbytes for p in plan.pieces)
        for piece in plan.pieces:
            spec = shards[piece.shard]
            assert piece.shard >= last_shard
            last_shard = piece.shard
            assert piece.start == cursor[piece.shard]
            assert piece.nbytes == encoded_size(spec.codec, spec.dtype, piece.count)
            if spec.codec == "int8":
                assert piece.start % INT8_BLOCK == 0
            cursor[piece.shard] += piece.count
    assert cursor == [s.numel for s in shards]


def test_small_shards_are_packed_into_one_record() -> None:
    shards = [ShardSpec(f"b{i}", "float32", (10,), "none") for i in range(100)]
    plans = list(plan_records(shards, 1 << 20))
    assert len(plans) == 1
    assert len(plans[0].pieces) == 100


def test_effective_codec_and_sizes() -> None:
    assert effective_codec("int8", "int32") == "none"
    assert effective_codec("bf16", "bfloat16") == "none"
    assert effective_codec("bf16", "float16") == "bf16"
    assert effective_codec("fp16", "complex64") == "none"
    with pytest.raises(LocalProtocolError):
        effective_codec("zstd", "float32")
    assert encoded_size("int8", "float32", INT8_BLOCK * 2 + 1) == 2 * (INT8_BLOCK + 4) + 5
    assert encoded_size("fp16", "float64", 3) == 6


def _manifest(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "t": "lane-open",
        "v": 1,
        "tag": "g",
        "shards": [["w", "float32", [2, 3], "none"]],
        "record_size": 1 << 20,
        "digest": "none",
        "total": 24,
    }
    base.update(over)
    return base


def test_manifest_round_trip() -> None:
    m = Manifest("grads/1", (ShardSpec("w", "float32", (2, 3), "bf16"), ShardSpec("i", "int64", (), "none")))
    back = parse_manifest(m.build(), peer="P", max_bytes=1 << 30)
    assert back == m


@pytest.mark.parametrize(
    "over",
    [
        {"shards": [["w", "float99", [2, 3], "none"]]},
        {"shards": [["w", "float32", [2, -3], "none"]]},
        {"shards": [["w", "float32", [2, True], "none"]]},
        {"shards": [["w", "int32", [2, 3], "int8"], ["v", "int32", [1], "none"]]},
        {"shards": [["w", "float32", [2, 3], "none"], ["w", "float32", [2, 3], "none"]]},
        {"shards": [["w", "float32", [2, 3]]]},
        {"shards": [["", "float32", [2, 3], "none"]]},
        {"total": 25},
        {"digest": "md5"},
        {"record_size": 10},
        {"extra": 1},
    ],
)
def test_bad_manifests_are_rejected_naming_the_peer(over: dict[str, object]) -> None:
    with pytest.raises(MalformedMessage) as err:
        parse_manifest(encode(_manifest(**over)), peer="P", max_bytes=1 << 30)
    assert err.value.peer == "P"


def test_manifest_caps() -> None:
    with pytest.raises(MalformedMessage, match="cap"):
        parse_manifest(encode(_manifest()), peer="P", max_bytes=23)
    huge = [["w", "float32", [1 << 40, 1 << 40], "none"]]
    with pytest.raises(MalformedMessage):
        parse_manifest(encode(_manifest(shards=huge)), peer="P", max_bytes=1 << 40)
    with pytest.raises(UnsupportedVersion):
        parse_manifest(encode(_manifest(v=2)), peer="P", max_bytes=1 << 30)
    with pytest.raises(MessageTooLarge):
        parse_manifest(b"\x00" * (9 << 20), peer="P", max_bytes=1 << 30)


def test_header_checks_kind_and_length_before_allocating() -> None:
    assert parse_header(HEADER.pack(KIND_END, 100), expect=KIND_END, max_body=100, peer=None) == 100
    with pytest.raises(MalformedMessage):
        parse_header(HEADER.pack(KIND_DATA, 100), expect=KIND_END, max_body=100, peer=None)
    with pytest.raises(MalformedMessage):
        parse_header(HEADER.pack(KIND_END, 101), expect=KIND_END, max_body=100, peer=None)
    with pytest.raises(MalformedMessage):
        parse_header(HEADER.pack(KIND_END, 3), expect=KIND_END, max_body=100, peer=None)
