"""Built-in task kinds every provider serves: ``matmul`` and the timed ``matmul-bench``.

``matmul-bench`` lets a requester check a provider's claimed speed: both sides
derive the same matrices from a seed, the provider times ``repeats`` products
and returns a few sampled entries of the product; :func:`verify_matmul_bench`
recomputes those entries locally, so a provider that skipped the work (or ran a
smaller problem) is caught, and the reported time is what the requester paid for.

A bench is a small request for a lot of work, so it is bounded and priced: at most
:data:`MAX_BENCH_FLOPS` (``2 n^3`` per product, warm-up included) and
:data:`MAX_BENCH_BYTES` of matrices per run, for :data:`BENCH_PRICE` per run (an offer is
quoted before the params are known, so the price covers the largest run allowed). The
products are computed in chunks of rows (on a CPU) or one product at a time (on a GPU),
with the run's cancel flag checked in between, so a run whose lease is gone stops
within one short chunk.

Imports :mod:`p2pcompute.tasks.registry` and torch only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from p2pcompute.tasks.messages import Resources
from p2pcompute.tasks.registry import TaskError, TaskRegistry, check_cancelled

MATMUL = "matmul"
MATMUL_BENCH = "matmul-bench"
_BENCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MAX_N = 16384
_MAX_REPEATS = 1000
_MAX_CHECKS = 64
#: Most floating-point operations one ``matmul-bench`` run may ask for (16 products of n=4096).
MAX_BENCH_FLOPS = 2 * 4096**3 * 16
#: Most bytes of matrices one run may hold (the seeded float32 pair, then a, b and c).
MAX_BENCH_BYTES = 512 << 20
#: Price of one ``matmul-bench`` run (of at most MAX_BENCH_FLOPS), like a registered kind's.
BENCH_PRICE = 0.01
#: Largest chunk (flops) computed between two checks of the cancel flag on a CPU.
_CHUNK_FLOPS = 1 << 30


def _device(params: Mapping[str, Any]) -> torch.device:
    want = params.get("device", "auto")
    if want not in ("auto", "cpu", "cuda"):
        raise TaskError(f"device must be auto, cpu or cuda, not {want!r}")
    if want == "cuda" and not torch.cuda.is_available():
        raise TaskError("this provider has no CUDA device", retryable=True)
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(want)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul(tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``c = a @ b`` for 2-D inputs ``a`` and ``b`` (on the provider's GPU when it has one)."""
    a, b = tensors.get("a"), tensors.get("b")
    if a is None or b is None or set(tensors) != {"a", "b"}:
        raise TaskError("matmul takes exactly the tensors 'a' and 'b'")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise TaskError(f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not multiply")
    if a.dtype != b.dtype or not a.dtype.is_floating_point:
        raise TaskError("matmul: a and b must share a floating-point dtype")
    device = _device(params)
    c = a.to(device) @ b.to(device)
    return {"c": c.cpu()}


def bench_problem(
    n: int, dtype: str, seed: int, checks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The seeded matrices and sampled (row, col) positions of a ``matmul-bench`` run."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen).to(_BENCH_DTYPES[dtype])
    b = torch.randn(n, n, generator=gen).to(_BENCH_DTYPES[dtype])
    where = torch.randint(0, n, (checks, 2), generator=gen)
    return a, b, where


def bench_flops(n: int, repeats: int) -> int:
    """Floating-point operations of a ``matmul-bench`` run: ``repeats`` timed products and a warm-up.

    Example::

        >>> bench_flops(1024, 3) == 2 * 1024**3 * 4
        True
    """
    return 2 * n**3 * (repeats + 1)


def bench_memory(n: int, dtype: str) -> int:
    """Bytes of matrices a ``matmul-bench`` run holds: the float32 pair it seeds, then a, b and c.

    Example::

        >>> bench_memory(1024, "float32") == 1024 * 1024 * 20
        True
    """
    size = torch.empty((), dtype=_BENCH_DTYPES.get(dtype, torch.float32)).element_size()
    return n * n * (2 * 4 + 3 * size)


def _bench_memory_of(params: Mapping[str, Any]) -> int:
    n, _, dtype, _, _ = _bench_params(params)
    return bench_memory(n, dtype)


def _bench_params(params: Mapping[str, Any]) -> tuple[int, int, str, int, int]:
    try:
        n = int(params.get("n", 1024))
        repeats = int(params.get("repeats", 3))
        dtype = str(params.get("dtype", "float32"))
        seed = int(params.get("seed", 0))
        checks = int(params.get("checks", 8))
    except (TypeError, ValueError) as exc:
        raise TaskError(f"matmul-bench: bad parameter: {exc}") from None
    if not 1 <= n <= _MAX_N or not 1 <= repeats <= _MAX_REPEATS or not 1 <= checks <= _MAX_CHECKS:
        raise TaskError(f"matmul-bench: n in 1..{_MAX_N}, repeats in 1..{_MAX_REPEATS}, checks 1..64")
    if dtype not in _BENCH_DTYPES:
        raise TaskError(f"matmul-bench: dtype must be one of {sorted(_BENCH_DTYPES)}")
    if bench_flops(n, repeats) > MAX_BENCH_FLOPS:
        raise TaskError(f"matmul-bench: 2 n^3 (repeats + 1) over the cap of {MAX_BENCH_FLOPS:.3g} flops")
    if bench_memory(n, dtype) > MAX_BENCH_BYTES:
        raise TaskError(f"matmul-bench: n={n} needs over {MAX_BENCH_BYTES >> 20} MiB of matrices")
    return n, repeats, dtype, seed, checks


def _product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, device: torch.device) -> None:
    """``out = a @ b``, checking the run's cancel flag between chunks (row blocks on a CPU)."""
    n = a.shape[0]
    rows = n if device.type == "cuda" else max(1, min(n, _CHUNK_FLOPS // max(1, 2 * n * n)))
    for start in range(0, n, rows):
        check_cancelled()
        torch.matmul(a[start : start + rows], b, out=out[start : start + rows])


def matmul_bench(
    tensors: dict[str, torch.Tensor], params: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Time ``repeats`` n x n products of seeded matrices; return sampled entries and the speed.

    Stops (:class:`TaskError`, retryable) at the next chunk once its run is cancelled.
    """
    if tensors:
        raise TaskError("matmul-bench takes no input tensors (the matrices come from the seed)")
    n, repeats, dtype, seed, checks = _bench_params(params)
    device = _device(params)
    a, b, where = bench_problem(n, dtype, seed, checks)
    a, b = a.to(device), b.to(device)
    c = torch.empty_like(a)
    _product(a, b, c, device)  # warm-up (and the product whose entries are checked)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _product(a, b, c, device)
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    best = times[0]
    sample = c[where[:, 0].to(device), where[:, 1].to(device)].float().cpu()
    info = {
        "n": n,
        "dtype": dtype,
        "device": str(device),
        "seconds_best": best,
        "seconds_median": times[len(times) // 2],
        "tflops": 2.0 * n**3 / max(best, 1e-12) / 1e12,
    }
    return {"check": sample}, info


def verify_matmul_bench(
    params: Mapping[str, Any], outputs: Mapping[str, torch.Tensor], *, rtol: float | None = None
) -> bool:
    """Recompute the sampled entries of a ``matmul-bench`` run locally; True when they match.

    Example::

        result = await tasks.run_task("matmul-bench", {}, {"n": 2048, "seed": 7})
        assert verify_matmul_bench({"n": 2048, "seed": 7}, result.outputs)
    """
    n, _, dtype, seed, checks = _bench_params(params)
    got = outputs.get("check")
    if got is None or got.shape != (checks,):
        return False
    a, b, where = bench_problem(n, dtype, seed, checks)
    rows = a[where[:, 0]].double()
    cols = b[:, where[:, 1]].double().T
    want = (rows * cols).sum(dim=1)
    # entries of a product of N(0,1) matrices have scale sqrt(n); low precision accumulates error
    tol = rtol if rtol is not None else (1e-3 if dtype == "float32" else 3e-2)
    return bool(torch.all((got.double() - want).abs() <= tol * (n**0.5) + 1e-6))


def builtin_registry(*, bench_price: float = BENCH_PRICE) -> TaskRegistry:
    """A fresh registry holding the built-in kinds (``matmul``, ``matmul-bench`` at ``bench_price``).

    Example::

        registry = builtin_registry().merged(load_registry("lab.tasks:registry"))
    """
    reg = TaskRegistry()
    reg.register(MATMUL, matmul, needs=Resources(cpus=1), price=0.0, description="c = a @ b")
    reg.register(
        MATMUL_BENCH,
        matmul_bench,
        needs=Resources(cpus=1),
        price=bench_price,
        max_output_bytes=1 << 16,
        description="timed seeded n x n matmul; sampled entries let the requester verify it",
        memory=_bench_memory_of,
    )
    return reg
