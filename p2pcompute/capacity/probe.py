"""Measure the local machine: GPUs through NVML (nvidia-ml-py), CPU, RAM, torch.

:func:`probe_capacity` never raises for a missing NVML library, driver or GPU:
it returns a CPU-only :class:`~p2pcompute.capacity.model.Capacity`. Each per-GPU
figure NVML cannot give (old GPU, MIG, permissions) is left out on its own.
Tests pass a fake NVML module (``nvml=``) to simulate multi-GPU machines.

Imports :mod:`p2pcompute.capacity.model` only (and pynvml, torch lazily).
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable
from typing import Any, TypeVar

from p2pcompute.capacity.model import MAX_GPUS, Capacity, GpuInfo

log = logging.getLogger(__name__)
T = TypeVar("T")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _try(fn: Callable[..., T], *args: Any) -> T | None:
    try:
        return fn(*args)
    except Exception:  # NVML raises NVMLError subclasses per unsupported query
        return None


def _meminfo() -> tuple[int, int]:
    """(total, available) RAM in bytes from /proc/meminfo, or sysconf where that is missing."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {}
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    info[key] = int(parts[0]) * 1024
        total = info["MemTotal"]
        return total, min(info.get("MemAvailable", info.get("MemFree", 0)), total)
    except (OSError, KeyError, ValueError):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            return total, min(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), total)
        except (OSError, ValueError):
            return 0, 0


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _torch_facts(have_gpus: bool) -> tuple[str | None, bool]:
    """torch's version and whether CUDA is usable, without importing torch when it is not loaded.

    Importing torch costs seconds (8 s on a loaded 2-core machine), too much for a
    peer's start-up. When torch is already imported we ask it; otherwise we read the
    installed version from package metadata and judge CUDA usable when NVML found a
    GPU and the wheel is not a CPU build (``+cpu``).
    """
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            return str(torch.__version__), bool(torch.cuda.is_available())
        except Exception:
            return str(getattr(torch, "__version__", "unknown")), False
    try:
        from importlib.metadata import PackageNotFoundError, version

        ver = version("torch")
    except (PackageNotFoundError, ValueError):
        return None, False
    return ver, have_gpus and not ver.endswith("+cpu")


def _load_nvml() -> Any:
    try:
        import pynvml
    except Exception:
        return None
    return pynvml


def probe_gpus(nvml: Any) -> tuple[list[GpuInfo], str | None, str | None]:
    """GPUs, driver and CUDA driver versions through an NVML module; ``([], None, None)`` on failure."""
    if nvml is None:
        return [], None, None
    try:
        nvml.nvmlInit()
    except Exception as exc:  # no libnvidia-ml.so, no driver, no permission
        log.debug("NVML unavailable: %r", exc)
        return [], None, None
    try:
        raw_driver = _try(nvml.nvmlSystemGetDriverVersion)
        driver = None if raw_driver is None else _text(raw_driver)
        cuda_raw = _try(nvml.nvmlSystemGetCudaDriverVersion)
        cuda = f"{cuda_raw // 1000}.{(cuda_raw % 1000) // 10}" if isinstance(cuda_raw, int) else None
        count = _try(nvml.nvmlDeviceGetCount) or 0
        gpus: list[GpuInfo] = []
        for index in range(min(int(count), MAX_GPUS)):
            handle = _try(nvml.nvmlDeviceGetHandleByIndex, index)
            if handle is None:
                continue
            mem = _try(nvml.nvmlDeviceGetMemoryInfo, handle)
            if mem is None:
                continue
            util = _try(nvml.nvmlDeviceGetUtilizationRates, handle)
            cc = _try(nvml.nvmlDeviceGetCudaComputeCapability, handle)
            name = _try(nvml.nvmlDeviceGetName, handle)
            uuid = _try(nvml.nvmlDeviceGetUUID, handle)
            gen = _try(nvml.nvmlDeviceGetCurrPcieLinkGeneration, handle)
            width = _try(nvml.nvmlDeviceGetCurrPcieLinkWidth, handle)
            total = int(mem.total)
            gpus.append(
                GpuInfo(
                    index=index,
                    name=("unknown" if name is None else _text(name))[:128],
                    uuid=(f"gpu-{index}" if uuid is None else _text(uuid))[:128],
                    memory_total=total,
                    memory_free=max(0, min(int(mem.free), total)),
                    utilization=None if util is None else max(0, min(int(util.gpu), 100)),
                    compute_capability=None if cc is None else f"{int(cc[0])}.{int(cc[1])}",
                    pcie_gen=None if gen is None else int(gen),
                    pcie_width=None if width is None else int(width),
                )
            )
        return gpus, driver, cuda
    finally:
        _try(nvml.nvmlShutdown)


_DEFAULT: Any = object()


def probe_capacity(*, nvml: Any = _DEFAULT, with_torch: bool = True) -> Capacity:
    """Measure this machine. Never raises for missing NVML, driver or GPUs.

    ``nvml``: an NVML module (default: ``pynvml`` when importable; ``None`` skips GPUs).
    ``with_torch``: report torch's version and whether CUDA is usable (torch is
    only asked directly when it is already imported; see :func:`_torch_facts`).

    Example::

        cap = probe_capacity()
        print(len(cap.gpus), cap.gpu_memory_free, cap.cuda_usable)
    """
    module = _load_nvml() if nvml is _DEFAULT else nvml
    gpus, driver, cuda = probe_gpus(module)
    total, available = _meminfo()
    torch_version, cuda_usable = _torch_facts(bool(gpus)) if with_torch else (None, False)
    return Capacity(
        cpu_cores=_cpu_cores(),
        ram_total=total,
        ram_available=available,
        torch_version=torch_version,
        cuda_usable=cuda_usable,
        driver_version=driver,
        cuda_version=cuda,
        platform=f"{platform.system()}-{platform.machine()}"[:128],
        gpus=tuple(gpus),
    )


__all__ = ["probe_capacity", "probe_gpus"]
