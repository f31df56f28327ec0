"""Task registry, built-in kinds and the signed/strict wire messages of negotiation (sans-IO)."""

from __future__ import annotations

import sys
import time
import types
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.errors import (
    BadSignature,
    ConfigError,
    LocalProtocolError,
    MalformedMessage,
    StaleMessage,
    UnsupportedVersion,
)
from p2pcompute.identity import Identity
from p2pcompute.tasks import (
    TaskRegistry,
    UnknownTaskKind,
    builtin_registry,
    load_registry,
    verify_matmul_bench,
)
from p2pcompute.tasks.builtin import matmul, matmul_bench
from p2pcompute.tasks.messages import (
    Offer,
    Resources,
    TaskRequest,
    open_offer,
    open_request,
    parse_lease_message,
    seal_offer,
    seal_request,
)
from p2pcompute.tasks.registry import TaskError, check_params, normalise_output
from p2pcompute.wire.codec import encode

ALICE = Identity.from_seed(b"a" * 32)
BOB = Identity.from_seed(b"b" * 32)


def request(**kw: Any) -> TaskRequest:
    fields: dict[str, Any] = {
        "request_id": b"\x01" * 16,
        "requester": ALICE.peer_id,
        "kind": "matmul",
        "needs": Resources(gpus=1, gpu_memory=8 << 30, cpus=1),
        "max_price": 2.0,
        "count": 3,
        "deadline_in": 60.0,
        "input_bytes": 1024,
        "issued": time.time(),
    }
    fields.update(kw)
    return TaskRequest(**fields)


def offer(**kw: Any) -> Offer:
    fields: dict[str, Any] = {
        "offer_id": b"\x02" * 16,
        "request_id": b"\x01" * 16,
        "provider": BOB.peer_id,
        "requester": ALICE.peer_id,
        "kind": "matmul",
        "price": 1.0,
        "expected_start": 0.0,
        "slots": 2,
        "free": 2,
        "capacity": 4,
        "resources": Resources(gpus=2, gpu_memory=24 << 30, cpus=8),
        "valid_for": 10.0,
        "heartbeat": 1.0,
        "lease_ttl": 5.0,
    }
    fields.update(kw)
    return Offer(**fields)


def test_registry_sync_async_unknown_and_bad_names() -> None:
    reg = TaskRegistry()

    @reg.task("scale", needs=Resources(cpus=2), price=0.5)
    def scale(tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Multiply x by a factor."""
        return {"y": tensors["x"] * params["factor"]}

    @reg.task("ascale")
    async def ascale(tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"y": tensors["x"]}

    kind = reg.get("scale")
    assert kind.needs == Resources(cpus=2)
    assert kind.price == 0.5
    assert not kind.is_async
    assert kind.description == "Multiply x by a factor."
    assert reg.get("ascale").is_async
    assert reg.names() == ["ascale", "scale"]
    with pytest.raises(UnknownTaskKind, match="nope"):
        reg.get("nope")
    with pytest.raises(ConfigError, match="already"):
        reg.register("scale", scale)
    for bad in ("", "has space", "x" * 65, "semi;colon"):
        with pytest.raises(ConfigError, match="bad task kind"):
            reg.register(bad, scale)
    with pytest.raises(ConfigError, match="callable"):
        reg.register("notfn", 3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="price"):
        reg.register("neg", scale, price=-1)
    merged = builtin_registry().merged(reg)
    assert {"matmul", "matmul-bench", "scale", "ascale"} <= set(merged.names())


def test_load_registry_from_operator_module(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = types.ModuleType("lab_tasks_for_test")
    reg = TaskRegistry()
    reg.register("t", lambda tensors, params: {})
    mod.registry = reg  # type: ignore[attr-defined]
    mod.make = lambda: reg  # type: ignore[attr-defined]
    mod.other = 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lab_tasks_for_test", mod)
    assert load_registry("lab_tasks_for_test:registry") is reg
    assert load_registry("lab_tasks_for_test:make") is reg
    for spec in (
        "lab_tasks_for_test",
        "lab_tasks_for_test:missing",
        "lab_tasks_for_test:other",
        "no_such_mod:x",
    ):
        with pytest.raises(ConfigError):
            load_registry(spec)


def test_params_and_outputs_are_checked() -> None:
    assert check_params({"n": 1, "s": "x", "l": [1.5]})
    with pytest.raises(LocalProtocolError):
        check_params({"f": object()})
    with pytest.raises(LocalProtocolError, match="mapping"):
        check_params([1, 2])  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="cap"):
        check_params({"b": b"x" * 70000})
    out = normalise_output("k", ({"y": torch.ones(1)}, {"seconds": 1.0}))
    assert out.info == {"seconds": 1.0}
    for bad in ({"y": 3}, ({"y": torch.ones(1)}, {"o": object()}), [torch.ones(1)], ({}, {}, {})):
        with pytest.raises(TaskError):
            normalise_output("k", bad)


def test_builtin_matmul_and_bench_verification() -> None:
    a, b = torch.randn(8, 4), torch.randn(4, 3)
    assert torch.allclose(matmul({"a": a, "b": b}, {"device": "cpu"})["c"], a @ b)
    with pytest.raises(TaskError):
        matmul({"a": a, "b": a}, {})
    params = {"n": 64, "seed": 5, "repeats": 2, "checks": 4, "device": "cpu"}
    outputs, info = matmul_bench({}, params)
    assert info["n"] == 64
    assert info["tflops"] > 0
    assert outputs["check"].shape == (4,)
    assert verify_matmul_bench(params, outputs)
    assert not verify_matmul_bench({**params, "seed": 6}, outputs)  # a different problem
    with pytest.raises(TaskError):
        matmul_bench({}, {"n": 10**9})


def test_signed_request_roundtrip_and_refusals() -> None:
    raw = seal_request(request(), ALICE)
    got = open_request(raw, peer=ALICE.peer_id, wall=time.time())
    assert got == request(issued=got.issued)
    with pytest.raises(BadSignature):
        open_request(raw, peer=BOB.peer_id)  # relayed under someone else's name
    with pytest.raises(StaleMessage):
        open_request(
            seal_request(request(issued=time.time() - 3600), ALICE), peer=ALICE.peer_id, wall=time.time()
        )
    flipped = bytearray(raw)
    flipped[30] ^= 1
    with pytest.raises((BadSignature, MalformedMessage)):
        open_request(bytes(flipped), peer=ALICE.peer_id)


def test_signed_offer_roundtrip_and_forgeries() -> None:
    raw = seal_offer(offer(), BOB)
    assert open_offer(raw, peer=BOB.peer_id, expected_requester=ALICE.peer_id) == offer()
    with pytest.raises(BadSignature):
        open_offer(raw, peer=ALICE.peer_id)  # signer is not the sender
    with pytest.raises(BadSignature, match="another requester"):
        open_offer(raw, peer=BOB.peer_id, expected_requester=BOB.peer_id)
    with pytest.raises(LocalProtocolError, match="signed by its provider"):
        seal_offer(offer(), ALICE)  # only the provider signs its offer
    mallory = Identity.generate()
    with pytest.raises(BadSignature):
        open_offer(seal_offer(offer(provider=mallory.peer_id), mallory), peer=BOB.peer_id)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_crash_the_decoders(data: bytes) -> None:
    for fn in (
        lambda: open_offer(data, peer="x"),
        lambda: open_request(data, peer="x"),
        lambda: parse_lease_message(data, peer="x"),
    ):
        with pytest.raises((MalformedMessage, BadSignature)):
            fn()


def test_lease_messages_are_strict() -> None:
    hb = {"t": "task-heartbeat", "v": 1, "lease_id": b"\x00" * 16, "seq": 1}
    assert parse_lease_message(encode(hb), peer="p")["seq"] == 1
    with pytest.raises(MalformedMessage, match="unexpected"):
        parse_lease_message(encode(hb), peer="p", allowed=frozenset({"task-grant"}))
    with pytest.raises(UnsupportedVersion):
        parse_lease_message(encode({**hb, "v": 2}), peer="p")
    with pytest.raises(MalformedMessage):
        parse_lease_message(encode({**hb, "extra": 1}), peer="p")
    with pytest.raises(MalformedMessage):
        parse_lease_message(encode({**hb, "lease_id": b"short"}), peer="p")
