"""Capacity model, probe (CPU path and a fake multi-GPU NVML), signed adverts and their rejection."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.capacity import (
    Capacity,
    CapacityQuery,
    GpuInfo,
    capacity_from_wire,
    make_advert,
    probe_capacity,
)
from p2pcompute.capacity.adverts import ADVERT, MAX_ADVERT_SIZE, open_advert
from p2pcompute.errors import (
    BadSignature,
    MalformedMessage,
    MessageTooLarge,
    RemoteProtocolError,
    StaleMessage,
)
from p2pcompute.identity import Identity
from p2pcompute.wire.codec import encode
from p2pcompute.wire.signing import seal_signed

GIB = 1 << 30
NOW = 1_800_000_000.0


class FakeNVML:
    """Just enough of pynvml to look like a machine with ``gpus`` (name, total GiB, free GiB)."""

    def __init__(
        self, gpus: list[tuple[str, int, int]], *, fail_init: bool = False, broken: set[str] = frozenset()
    ):  # type: ignore[assignment]
        self.gpus = gpus
        self.fail_init = fail_init
        self.broken = broken
        self.shutdowns = 0

    def _maybe(self, name: str) -> None:
        if name in self.broken:
            raise RuntimeError(f"NVML_ERROR_NOT_SUPPORTED: {name}")

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> str:
        return self.gpus[h][0]

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-{h:08d}"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(total=self.gpus[h][1] * GIB, free=self.gpus[h][2] * GIB, used=0)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        self._maybe("util")
        return SimpleNamespace(gpu=37, memory=5)

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        return (9, 0) if "H100" in self.gpus[h][0] else (8, 6)

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h: int) -> int:
        self._maybe("pcie")
        return 5

    def nvmlDeviceGetCurrPcieLinkWidth(self, h: int) -> int:
        self._maybe("pcie")
        return 16


def test_cpu_only_probe_never_raises() -> None:
    cap = probe_capacity()  # this machine: no NVML library or no GPU
    assert cap.cpu_cores >= 1
    assert cap.ram_total > 0
    assert 0 <= cap.ram_available <= cap.ram_total
    assert capacity_from_wire(cap.to_wire()) == cap
    assert probe_capacity(nvml=None).gpus == ()
    failing = FakeNVML([("X", 1, 1)], fail_init=True)
    assert probe_capacity(nvml=failing).gpus == ()


def test_fake_multi_gpu_machine() -> None:
    nvml = FakeNVML([("NVIDIA H100 80GB HBM3", 80, 70), ("NVIDIA H100 80GB HBM3", 80, 10)], broken={"pcie"})
    cap = probe_capacity(nvml=nvml)
    assert nvml.shutdowns == 1
    assert [g.name for g in cap.gpus] == ["NVIDIA H100 80GB HBM3"] * 2
    assert cap.gpus[0].memory_total == 80 * GIB
    assert cap.gpus[1].memory_free == 10 * GIB
    assert cap.gpus[0].compute_capability == "9.0"
    assert cap.gpus[0].utilization == 37
    assert cap.gpus[0].pcie_gen is None  # one unsupported query leaves only that field out
    assert cap.driver_version == "550.54.15"
    assert cap.cuda_version == "12.4"
    assert capacity_from_wire(cap.to_wire()) == cap


def _cap(*gpus: tuple[str, int, int, str]) -> Capacity:
    return Capacity(
        cpu_cores=8,
        ram_total=64 * GIB,
        ram_available=32 * GIB,
        platform="Linux-x86_64",
        cuda_usable=bool(gpus),
        gpus=tuple(
            GpuInfo(
                index=i,
                name=n,
                uuid=f"GPU-{i}",
                memory_total=t * GIB,
                memory_free=f * GIB,
                compute_capability=cc,
            )
            for i, (n, t, f, cc) in enumerate(gpus)
        ),
    )


def test_capacity_query_ranks_best_first() -> None:
    small = _cap(("RTX 3090", 24, 20, "8.6"))
    big = _cap(("H100", 80, 60, "9.0"), ("H100", 80, 70, "9.0"))
    cpu = _cap()
    assert CapacityQuery().score(cpu) is not None
    assert CapacityQuery(gpus=1).score(cpu) is None
    assert CapacityQuery(min_gpu_memory=40 * GIB).score(small) is None
    assert CapacityQuery(min_gpu_memory=40 * GIB, gpus=2).score(big) is not None
    assert CapacityQuery(min_compute_capability="9.0").score(small) is None
    assert CapacityQuery(gpu_name="h100").score(big) is not None
    assert CapacityQuery(cuda=True).score(cpu) is None
    assert CapacityQuery(min_ram=100 * GIB).score(big) is None
    scores = {name: CapacityQuery(gpus=1).score(c) for name, c in [("small", small), ("big", big)]}
    assert scores["big"] > scores["small"]  # type: ignore[operator]


@given(st.builds(dict))
def test_capacity_decoder_rejects_garbage(obj: dict[str, Any]) -> None:
    with pytest.raises(MalformedMessage):
        capacity_from_wire(obj)


def test_capacity_decoder_rejects_inconsistent_numbers() -> None:
    wire = _cap(("A", 10, 5, "8.0")).to_wire()
    wire["gpus"][0]["memory_free"] = 11 * GIB
    with pytest.raises(MalformedMessage):
        capacity_from_wire(wire)
    wire = _cap().to_wire()
    wire["gpus"] = [wire] * 17
    with pytest.raises(MalformedMessage):
        capacity_from_wire(wire)


# -- adverts -----------------------------------------------------------------------------------------

ALICE = Identity.from_seed(b"a" * 32)
MALLORY = Identity.from_seed(b"m" * 32)
CAP = _cap(("H100", 80, 60, "9.0"))


def advert(ident: Identity = ALICE, **over: Any) -> bytes:
    kw: dict[str, Any] = {
        "peer_id": ident.peer_id,
        "swarm": "s",
        "seq": 5,
        "capacity": CAP,
        "addrs": ["/ip4/127.0.0.1/tcp/4001"],
        "ttl": 30.0,
        "issued": NOW,
    }
    kw.update(over)
    return make_advert(ident, **kw)


def test_good_advert_opens() -> None:
    a = open_advert(advert(), swarm="s", now=NOW + 1, sender=ALICE.peer_id)
    assert a.peer_id == ALICE.peer_id
    assert a.seq == 5
    assert a.capacity == CAP
    assert a.addrs == ("/ip4/127.0.0.1/tcp/4001",)


def test_forged_advert_signed_by_someone_else() -> None:
    # Mallory signs an advert that claims to be Alice's
    body = ADVERT.build(
        peer=ALICE.peer_id, swarm="s", seq=9, issued=NOW, ttl=30.0, role="peer", addrs=[], cap=CAP.to_wire()
    )
    forged = seal_signed("advert", body, MALLORY)
    with pytest.raises(BadSignature):
        open_advert(forged, swarm="s", now=NOW, sender=None, blame=MALLORY.peer_id)
    # Mallory relays Alice's genuine advert as if it were his own message
    with pytest.raises(BadSignature):
        open_advert(advert(), swarm="s", now=NOW, sender=MALLORY.peer_id)


def test_tampered_advert_fails_signature() -> None:
    raw = bytearray(advert())
    i = raw.index(b"H100")
    raw[i : i + 4] = b"B200"
    with pytest.raises(BadSignature):
        open_advert(bytes(raw), swarm="s", now=NOW, sender=ALICE.peer_id)


def test_expired_future_oversized_wrong_swarm() -> None:
    with pytest.raises(StaleMessage):
        open_advert(advert(issued=NOW - 3600), swarm="s", now=NOW, sender=ALICE.peer_id)
    with pytest.raises(StaleMessage):
        open_advert(advert(issued=NOW + 3600), swarm="s", now=NOW, sender=ALICE.peer_id)
    with pytest.raises(MessageTooLarge):
        open_advert(b"\x00" * (MAX_ADVERT_SIZE + 1), swarm="s", now=NOW, sender=ALICE.peer_id)
    with pytest.raises(MalformedMessage):
        open_advert(advert(), swarm="other", now=NOW, sender=ALICE.peer_id)


def test_advert_fields_are_checked_after_signature() -> None:
    body = encode({"t": "advert", "v": 1, "peer": ALICE.peer_id, "extra": 1})
    with pytest.raises(MalformedMessage):
        open_advert(seal_signed("advert", body, ALICE), swarm="s", now=NOW, sender=ALICE.peer_id)
    body = ADVERT.build(
        peer=ALICE.peer_id, swarm="s", seq=1, issued=NOW, ttl=30.0, role="king", addrs=[], cap=CAP.to_wire()
    )
    with pytest.raises(MalformedMessage):
        open_advert(seal_signed("advert", body, ALICE), swarm="s", now=NOW, sender=ALICE.peer_id)
    wrong_kind = seal_signed(
        "receipt",
        ADVERT.build(
            peer=ALICE.peer_id,
            swarm="s",
            seq=1,
            issued=NOW,
            ttl=30.0,
            role="peer",
            addrs=[],
            cap=CAP.to_wire(),
        ),
        ALICE,
    )
    with pytest.raises(BadSignature):
        open_advert(wrong_kind, swarm="s", now=NOW, sender=ALICE.peer_id)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096))
def test_open_advert_on_arbitrary_bytes_only_raises_typed_errors(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        open_advert(data, swarm="s", now=NOW, sender=ALICE.peer_id)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=2000), st.integers(min_value=0, max_value=255))
def test_any_single_byte_change_is_rejected(pos: int, value: int) -> None:
    raw = bytearray(advert())
    pos %= len(raw)
    if raw[pos] == value:
        return
    raw[pos] = value
    try:
        a = open_advert(bytes(raw), swarm="s", now=NOW, sender=ALICE.peer_id)
    except RemoteProtocolError:
        return
    # msgpack may re-encode the same envelope differently only if the signed body is intact
    assert replace(a, raw=b"") == replace(
        open_advert(advert(), swarm="s", now=NOW, sender=ALICE.peer_id), raw=b""
    )


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA device")
def test_real_nvml_probe_on_a_gpu_machine() -> None:
    cap = probe_capacity()
    assert cap.gpus, "NVML should report the GPU torch sees"
    g = cap.gpus[0]
    assert 0 <= g.memory_free <= g.memory_total
    assert g.memory_total > 0
    assert g.uuid.startswith("GPU-")
    assert g.compute_capability is not None
    assert cap.driver_version
    assert cap.cuda_version
    assert cap.cuda_usable


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats()
    | st.text(max_size=16)
    | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)


@settings(max_examples=100, deadline=None)
@given(_values, st.sampled_from(["peer", "swarm", "seq", "issued", "ttl", "role", "addrs", "cap"]))
def test_signed_advert_with_arbitrary_field_values(value: Any, key: str) -> None:
    """A correctly signed advert whose fields hold arbitrary msgpack only ever raises typed errors."""
    body: dict[str, Any] = {
        "t": "advert",
        "v": 1,
        "peer": ALICE.peer_id,
        "swarm": "s",
        "seq": 1,
        "issued": NOW,
        "ttl": 30.0,
        "role": "peer",
        "addrs": [],
        "cap": CAP.to_wire(),
    }
    body[key] = value
    raw = seal_signed("advert", encode(body), ALICE)
    with contextlib.suppress(RemoteProtocolError):
        open_advert(raw, swarm="s", now=NOW, sender=ALICE.peer_id)
