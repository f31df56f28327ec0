"""Receipts: the record, signed by both sides, that one lease ended with a result.

A receipt body (msgpack, type ``task-receipt-body`` v1) names the lease, request,
kind, both peers' Ed25519 keys, the provider's wall-clock start and end, the
resources and price agreed, and SHA-256 digests of the params, inputs and outputs.
Provider and requester each sign the *same body bytes* as envelope kind
``task-receipt`` (:mod:`p2pcompute.wire.signing`, domain-separated), so neither can
later claim different terms. A receipt that fails either signature is refused
with :class:`~p2pcompute.errors.BadSignature`.

Imports :mod:`p2pcompute.wire`, :mod:`p2pcompute.errors`, :mod:`p2pcompute.tasks.messages`, and torch
only where tensors are digested (verifying a ledger needs no torch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from p2pcompute.errors import BadSignature, IntegrityError
from p2pcompute.tasks.messages import DIGEST_LEN, ID_LEN, Resources
from p2pcompute.wire.codec import Field, Schema, decode
from p2pcompute.wire.signing import ENVELOPE, Signer, peer_id_from_public_key, seal_signed, verify_signature

if TYPE_CHECKING:
    import torch

RECEIPT_KIND = "task-receipt"
RECEIPT_CAP = 3072

BODY = Schema(
    "task-receipt-body",
    1,
    max_size=2048,
    fields=(
        Field("lease_id", bytes, exact_len=ID_LEN),
        Field("request_id", bytes, exact_len=ID_LEN),
        Field("kind", str, max_len=64),
        Field("provider_key", bytes, exact_len=32),
        Field("requester_key", bytes, exact_len=32),
        Field("start", float, min=0),
        Field("end", float, min=0),
        Field("gpus", int, min=0, max=1024),
        Field("gpu_memory", int, min=0, max=1 << 50),
        Field("cpus", float, min=0, max=1 << 16),
        Field("price", float, min=0, max=1e18),
        Field("params_digest", bytes, exact_len=DIGEST_LEN),
        Field("input_digest", bytes, exact_len=DIGEST_LEN),
        Field("output_digest", bytes, exact_len=DIGEST_LEN),
        Field("input_bytes", int, min=0),
        Field("output_bytes", int, min=0),
    ),
)

RECEIPT = Schema(
    "task-receipt",
    1,
    max_size=RECEIPT_CAP,
    fields=(
        Field("body", bytes, max_len=2048),
        Field("provider_sig", bytes, exact_len=64),
        Field("requester_sig", bytes, exact_len=64),
    ),
)


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order.

    Example::

        >>> tensor_digest({"x": torch.zeros(2)}) == tensor_digest({"x": torch.zeros(2)})
        True
    """
    import torch

    h = hashlib.sha256(b"p2pcompute-tensors-v1\x00")
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        header = f"{name}\x00{str(t.dtype).removeprefix('torch.')}\x00{list(t.shape)}\x00"
        h.update(header.encode("utf-8"))
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def params_digest(params_bytes: bytes) -> bytes:
    """SHA-256 of the msgpack-encoded params exactly as they travelled."""
    return hashlib.sha256(b"p2pcompute-params-v1\x00" + params_bytes).digest()


@dataclass(frozen=True)
class ReceiptBody:
    """The terms both sides sign."""

    lease_id: bytes
    request_id: bytes
    kind: str
    provider_key: bytes
    requester_key: bytes
    start: float
    end: float
    resources: Resources
    price: float
    params_digest: bytes
    input_digest: bytes
    output_digest: bytes
    input_bytes: int
    output_bytes: int

    @property
    def provider(self) -> str:
        return peer_id_from_public_key(self.provider_key)

    @property
    def requester(self) -> str:
        return peer_id_from_public_key(self.requester_key)

    def encode(self) -> bytes:
        return BODY.build(
            lease_id=self.lease_id,
            request_id=self.request_id,
            kind=self.kind,
            provider_key=self.provider_key,
            requester_key=self.requester_key,
            start=float(self.start),
            end=float(self.end),
            **self.resources.to_wire(),
            price=float(self.price),
            params_digest=self.params_digest,
            input_digest=self.input_digest,
            output_digest=self.output_digest,
            input_bytes=self.input_bytes,
            output_bytes=self.output_bytes,
        )

    @classmethod
    def decode(cls, data: bytes, *, peer: str | None = None) -> ReceiptBody:
        m = BODY.parse(data, peer=peer)
        if m["end"] < m["start"]:
            raise IntegrityError("receipt ends before it starts", peer=peer)
        return cls(
            lease_id=m["lease_id"],
            request_id=m["request_id"],
            kind=m["kind"],
            provider_key=m["provider_key"],
            requester_key=m["requester_key"],
            start=m["start"],
            end=m["end"],
            resources=Resources(m["gpus"], m["gpu_memory"], m["cpus"]),
            price=m["price"],
            params_digest=m["params_digest"],
            input_digest=m["input_digest"],
            output_digest=m["output_digest"],
            input_bytes=m["input_bytes"],
            output_bytes=m["output_bytes"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "lease_id": self.lease_id.hex(),
            "request_id": self.request_id.hex(),
            "kind": self.kind,
            "provider": self.provider,
            "requester": self.requester,
            "start": self.start,
            "end": self.end,
            "seconds": self.end - self.start,
            "gpus": self.resources.gpus,
            "gpu_memory": self.resources.gpu_memory,
            "cpus": self.resources.cpus,
            "price": self.price,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "params_digest": self.params_digest.hex(),
            "input_digest": self.input_digest.hex(),
            "output_digest": self.output_digest.hex(),
        }


def sign_body(body_bytes: bytes, signer: Signer) -> bytes:
    """``signer``'s Ed25519 signature of receipt body bytes (envelope kind ``task-receipt``)."""
    return bytes(ENVELOPE.parse(seal_signed(RECEIPT_KIND, body_bytes, signer))["sig"])


def check_body_signature(body_bytes: bytes, public_key: bytes, sig: bytes, *, peer: str | None) -> None:
    if not verify_signature(public_key, sig, RECEIPT_KIND, body_bytes):
        raise BadSignature(
            f"receipt signature of {peer_id_from_public_key(public_key)} does not verify", peer=peer
        )


@dataclass(frozen=True)
class Receipt:
    """A receipt signed by both provider and requester.

    Example::

        receipt = open_receipt(raw)              # both signatures checked
        print(receipt.body.provider, receipt.body.price)
    """

    body: ReceiptBody
    body_bytes: bytes
    provider_sig: bytes
    requester_sig: bytes

    def encode(self) -> bytes:
        return RECEIPT.build(
            body=self.body_bytes, provider_sig=self.provider_sig, requester_sig=self.requester_sig
        )

    @property
    def lease_id(self) -> bytes:
        return self.body.lease_id


def open_receipt(data: bytes | bytearray | memoryview, *, peer: str | None = None) -> Receipt:
    """Decode a dual-signed receipt and verify both signatures (:class:`BadSignature` otherwise)."""
    m = RECEIPT.validate(decode(data, max_size=RECEIPT_CAP, peer=peer), peer=peer)
    body = ReceiptBody.decode(m["body"], peer=peer)
    check_body_signature(m["body"], body.provider_key, m["provider_sig"], peer=peer)
    check_body_signature(m["body"], body.requester_key, m["requester_sig"], peer=peer)
    return Receipt(body, m["body"], m["provider_sig"], m["requester_sig"])


def countersign(
    body_bytes: bytes,
    provider_sig: bytes,
    signer: Signer,
    *,
    expect: Mapping[str, Any],
    peer: str | None,
    max_skew: float = 3600.0,
    wall: float | None = None,
) -> Receipt:
    """Requester side: check the provider's receipt against what we know, then co-sign it.

    ``expect`` holds the fields the requester can vouch for (``lease_id``,
    ``request_id``, ``kind``, ``provider_key``, ``price``, ``params_digest``,
    ``input_digest``, ``output_digest``, ``resources`` ...); any difference is an
    :class:`IntegrityError` naming the provider, and the receipt is not signed.
    """
    body = ReceiptBody.decode(body_bytes, peer=peer)
    check_body_signature(body_bytes, body.provider_key, provider_sig, peer=peer)
    if body.requester_key != signer.public_key:
        raise IntegrityError("receipt names another requester", peer=peer)
    for key, want in expect.items():
        got = getattr(body, key)
        if got != want:
            raise IntegrityError(f"receipt field {key} is {got!r}, expected {want!r}", peer=peer)
    if wall is not None and not (body.start - max_skew <= wall and body.end <= wall + max_skew):
        raise IntegrityError("receipt times are implausible", peer=peer)
    return Receipt(body, body_bytes, provider_sig, sign_body(body_bytes, signer))
