"""Tensor codecs: every dtype bit-exact under ``none``; documented error bounds of the lossy ones."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.errors import LocalProtocolError
from p2pcompute.tensors import codecs
from p2pcompute.wire.shards import INT8_BLOCK, encoded_size

_F32_3E38 = float(torch.tensor(3e38, dtype=torch.float32))
_F32_1E30 = float(torch.tensor(1e30, dtype=torch.float32))
finite32 = st.floats(-_F32_3E38, _F32_3E38, allow_nan=False, allow_infinity=False, width=32)


def _roundtrip(codec: str, x: torch.Tensor) -> torch.Tensor:
    data = codecs.encode(codec, x)
    assert data.numel() == encoded_size(codec, codecs.dtype_name(x.dtype), x.numel())
    return codecs.decode(codec, data, x.dtype, tuple(x.shape))


@pytest.mark.parametrize("name", sorted(codecs.TORCH_DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5, 7)])
def test_none_is_bit_exact_for_every_dtype(name: str, shape: tuple[int, ...]) -> None:
    dtype = codecs.TORCH_DTYPES[name]
    n = math.prod(shape)
    x = codecs.empty(shape, dtype)
    x.reshape(-1).view(torch.uint8).copy_(torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8))
    y = _roundtrip("none", x)
    assert y.dtype == dtype
    assert y.shape == x.shape
    assert torch.equal(y.reshape(-1).view(torch.uint8), x.reshape(-1).view(torch.uint8))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-65504, 65504, width=32), min_size=1, max_size=300))
def test_fp16_error_bound(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    y = _roundtrip("fp16", x)
    bound = torch.maximum(x.abs() * 2**-11, torch.full_like(x, 2**-25))
    assert bool(((y - x).abs() <= bound).all())


@settings(max_examples=200, deadline=None)
@given(st.lists(finite32, min_size=1, max_size=300))
def test_bf16_error_bound(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    y = _roundtrip("bf16", x)
    err = (y.double() - x.double()).abs()
    normal = x.abs() >= 2**-126
    assert bool((err[normal] <= x.double().abs()[normal] * 2**-8).all())
    assert bool((err[~normal] <= 2**-134).all())


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-_F32_1E30, _F32_1E30, allow_nan=False, width=32), max_size=3 * INT8_BLOCK + 7),
    st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
)
def test_int8_error_bound_per_block(values: list[float], dtype: torch.dtype) -> None:
    x = torch.tensor(values, dtype=torch.float32).to(dtype)
    if not bool(torch.isfinite(x).all()):
        return  # the narrow dtypes overflow to inf; the codec refuses those (tested below)
    y = _roundtrip("int8", x)
    assert y.dtype == dtype
    xf = x.to(torch.float64)
    for start in range(0, x.numel(), INT8_BLOCK):
        block = xf[start : start + INT8_BLOCK]
        scale = max(float(block.abs().max()) / 127, 2.0**-149)
        err = (y[start : start + INT8_BLOCK].to(torch.float64) - block).abs()
        # s/2 from rounding, plus the rounding of the result back to the tensor's own dtype
        own = torch.finfo(dtype).eps * block.abs()
        assert bool((err <= scale / 2 * (1 + 2**-20) + own + 1e-45).all())


def test_nan_and_inf_pass_fp16_bf16_and_are_refused_by_int8() -> None:
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])
    for codec in ("fp16", "bf16"):
        y = _roundtrip(codec, x)
        assert math.isnan(float(y[0]))
        assert y[1] == float("inf")
        assert y[2] == -float("inf")
    with pytest.raises(LocalProtocolError):
        codecs.encode("int8", x)


def test_unaligned_buffers_decode_correctly() -> None:
    x = torch.randn(1000)
    data = codecs.encode("fp16", x)
    shifted = torch.empty(data.numel() + 1, dtype=torch.uint8)[1:]
    shifted.copy_(data)
    out = torch.empty(1000)
    codecs.decode_into("fp16", shifted, out)
    assert torch.equal(out, x.half().float())
    enc = torch.empty(data.numel() + 1, dtype=torch.uint8)[1:]
    codecs.encode_into("bf16", x, enc)
    assert torch.equal(enc, codecs.encode("bf16", x))


def test_int8_of_all_zero_blocks_is_exact() -> None:
    x = torch.zeros(INT8_BLOCK + 3)
    assert torch.equal(_roundtrip("int8", x), x)


def test_unknown_dtype_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        codecs.dtype_name(torch.qint8)
