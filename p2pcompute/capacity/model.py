"""What a machine offers: GPUs, CPU, memory, software versions (sans-IO data model).

:class:`Capacity` is the body of a capacity advert. It converts to and from a
plain msgpack-able dict (:meth:`Capacity.to_wire` / :func:`capacity_from_wire`);
the decoder checks every field's type, range and length and raises
:class:`~p2pcompute.errors.MalformedMessage` naming the peer.

Imports :mod:`p2pcompute.errors` and :mod:`p2pcompute.wire` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from p2pcompute.errors import MalformedMessage
from p2pcompute.wire.codec import Field

MAX_GPUS = 16
_TB = float(1 << 50)  # a generous bound on any memory figure (1 PiB)


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML reports it. Memory figures are bytes; missing figures are ``None``."""

    index: int
    name: str
    uuid: str
    memory_total: int
    memory_free: int
    utilization: int | None = None  # percent, 0-100
    compute_capability: str | None = None  # "8.0"
    pcie_gen: int | None = None
    pcie_width: int | None = None


@dataclass(frozen=True)
class Capacity:
    """The capacity of one machine.

    Example::

        cap = Capacity(cpu_cores=8, ram_total=32 << 30, ram_available=20 << 30, torch_version="2.13.0")
        cap.gpu_memory_total          # 0 on a CPU-only machine
        capacity_from_wire(cap.to_wire()) == cap   # True
    """

    cpu_cores: int
    ram_total: int
    ram_available: int
    torch_version: str | None = None
    cuda_usable: bool = False
    driver_version: str | None = None
    cuda_version: str | None = None
    platform: str = ""
    gpus: tuple[GpuInfo, ...] = field(default_factory=tuple)

    @property
    def gpu_memory_total(self) -> int:
        return sum(g.memory_total for g in self.gpus)

    @property
    def gpu_memory_free(self) -> int:
        return sum(g.memory_free for g in self.gpus)

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-able dict (``None`` fields are left out)."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if key == "gpus":
                out["gpus"] = [{k: v for k, v in g.items() if v is not None} for g in value]
            elif value is not None:
                out[key] = value
        return out

    def roughly_equals(self, other: Capacity, *, free_tolerance: float = 0.05) -> bool:
        """True when nothing but free memory / utilization moved, and free memory by < ``free_tolerance``."""

        def shape(c: Capacity) -> tuple[Any, ...]:
            return (
                c.cpu_cores,
                c.ram_total,
                c.torch_version,
                c.cuda_usable,
                c.driver_version,
                c.cuda_version,
                tuple((g.uuid, g.memory_total) for g in c.gpus),
            )

        if shape(self) != shape(other):
            return False
        pairs = [
            (a.memory_free, b.memory_free, a.memory_total) for a, b in zip(self.gpus, other.gpus, strict=True)
        ]
        pairs.append((self.ram_available, other.ram_available, max(self.ram_total, 1)))
        return all(abs(a - b) <= free_tolerance * max(total, 1) for a, b, total in pairs)


_GPU_FIELDS = (
    Field("index", int, min=0, max=1023),
    Field("name", str, max_len=128),
    Field("uuid", str, max_len=128),
    Field("memory_total", int, min=0, max=_TB),
    Field("memory_free", int, min=0, max=_TB),
    Field("utilization", int, optional=True, min=0, max=100),
    Field("compute_capability", str, optional=True, max_len=16),
    Field("pcie_gen", int, optional=True, min=0, max=64),
    Field("pcie_width", int, optional=True, min=0, max=64),
)

_CAP_FIELDS = (
    Field("cpu_cores", int, min=0, max=1 << 20),
    Field("ram_total", int, min=0, max=_TB),
    Field("ram_available", int, min=0, max=_TB),
    Field("torch_version", str, optional=True, max_len=64),
    Field("cuda_usable", bool),
    Field("driver_version", str, optional=True, max_len=64),
    Field("cuda_version", str, optional=True, max_len=64),
    Field("platform", str, max_len=128),
    Field("gpus", list, max_len=MAX_GPUS),
)


def _check_map(obj: Any, fields: tuple[Field, ...], where: str, peer: str | None) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        raise MalformedMessage(f"{where}: expected a map, got {type(obj).__name__}", peer=peer)
    known = {f.name for f in fields}
    unknown = [k for k in obj if k not in known]
    if unknown:
        raise MalformedMessage(f"{where}: unknown keys {sorted(map(str, unknown))}", peer=peer)
    out: dict[str, Any] = {}
    for f in fields:
        value = obj.get(f.name)
        if value is None:
            if not f.optional:
                raise MalformedMessage(f"{where}: missing key {f.name!r}", peer=peer)
            out[f.name] = None
            continue
        out[f.name] = f.check(value, peer, where)
    return out


def capacity_from_wire(obj: Any, *, peer: str | None = None) -> Capacity:
    """Validate a decoded capacity map and build a :class:`Capacity`.

    Example::

        cap = capacity_from_wire({"cpu_cores": 4, "ram_total": 1, "ram_available": 1,
                                  "cuda_usable": False, "platform": "linux", "gpus": []})
    """
    body = _check_map(obj, _CAP_FIELDS, "capacity", peer)
    gpus = []
    for i, raw in enumerate(body.pop("gpus")):
        g = _check_map(raw, _GPU_FIELDS, f"capacity.gpus[{i}]", peer)
        if g["memory_free"] > g["memory_total"]:
            raise MalformedMessage(f"capacity.gpus[{i}]: free memory above total", peer=peer)
        gpus.append(GpuInfo(**g))
    if body["ram_available"] > body["ram_total"]:
        raise MalformedMessage("capacity: available RAM above total", peer=peer)
    return Capacity(gpus=tuple(gpus), **body)


def _cc_tuple(cc: str | None) -> tuple[int, int]:
    try:
        major, _, minor = (cc or "").partition(".")
        return int(major), int(minor or 0)
    except ValueError:
        return (0, 0)


@dataclass(frozen=True)
class CapacityQuery:
    """What a caller needs; :meth:`score` ranks a :class:`Capacity` (``None`` = does not match).

    A GPU *qualifies* when it has at least ``min_gpu_memory`` bytes in total,
    ``min_free_memory`` bytes free, compute capability ``min_compute_capability``
    or newer, and ``gpu_name`` (case-insensitive substring) in its name. A machine
    matches when at least ``gpus`` GPUs qualify (at least one if any GPU criterion
    is set), it has ``min_ram`` bytes of RAM available and, if ``cuda`` is set,
    ``cuda_usable`` equals it. Higher scores are better: more free memory on
    qualifying GPUs, then more qualifying GPUs, then more free RAM.

    Example::

        q = CapacityQuery(min_gpu_memory=40 << 30, gpus=2)
        q.score(cap) is not None     # has two 40 GiB GPUs
    """

    gpus: int = 0
    min_gpu_memory: int = 0
    min_free_memory: int = 0
    min_compute_capability: str | None = None
    gpu_name: str | None = None
    min_ram: int = 0
    cuda: bool | None = None

    def qualifying(self, cap: Capacity) -> list[GpuInfo]:
        want_cc = _cc_tuple(self.min_compute_capability) if self.min_compute_capability else None
        name = self.gpu_name.lower() if self.gpu_name else None
        return [
            g
            for g in cap.gpus
            if g.memory_total >= self.min_gpu_memory
            and g.memory_free >= self.min_free_memory
            and (want_cc is None or _cc_tuple(g.compute_capability) >= want_cc)
            and (name is None or name in g.name.lower())
        ]

    def score(self, cap: Capacity) -> tuple[int, int, int] | None:
        gpu_criteria = bool(
            self.min_gpu_memory or self.min_free_memory or self.min_compute_capability or self.gpu_name
        )
        need = max(self.gpus, 1 if gpu_criteria else 0)
        good = self.qualifying(cap)
        if len(good) < need:
            return None
        if cap.ram_available < self.min_ram:
            return None
        if self.cuda is not None and cap.cuda_usable != self.cuda:
            return None
        return (sum(g.memory_free for g in good), len(good), cap.ram_available)


__all__ = ["MAX_GPUS", "Capacity", "CapacityQuery", "GpuInfo", "capacity_from_wire"]
