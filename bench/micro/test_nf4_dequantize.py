"""NF4 dequantize of a 4096×4096 weight (double-quantized, blocksize 64), bf16 and fp32 out:
npu-ft's ``dequantize_nf4`` against bitsandbytes' ``dequantize_4bit`` on CPU, same packed bytes.

Target (issue 2): npu-ft ≥ 3× bitsandbytes' throughput.
"""

from __future__ import annotations

import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")

from npu_ft.ops.nf4 import dequantize_nf4, quantize_nf4  # noqa: E402

SHAPE = (4096, 4096)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    w = torch.randn(SHAPE, dtype=torch.float32) * 0.02
    packed, state = quantize_nf4(w, blocksize=64, double_quant=True)
    bnb_packed, bnb_state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(packed.view(-1), bnb_packed.view(-1)), "npu-ft and bitsandbytes must pack the same bytes"
    return packed, state, bnb_packed, bnb_state


@pytest.mark.parametrize("out", list(DTYPES))
def test_nf4_dequantize_npu_ft(benchmark, weights, out):
    packed, state, _, _ = weights
    dtype = DTYPES[out]
    benchmark.group = f"nf4_dequantize 4096x4096 -> {out}"
    benchmark.extra_info.update(target=">= 3x", out_bytes=SHAPE[0] * SHAPE[1] * dtype.itemsize)
    w = benchmark(dequantize_nf4, packed, state, dtype)
    assert w.dtype == dtype and w.shape == SHAPE


@pytest.mark.parametrize("out", list(DTYPES))
def test_nf4_dequantize_baseline_bnb(benchmark, weights, out):
    packed, state, bnb_packed, bnb_state = weights
    dtype = DTYPES[out]
    bnb_state.dtype = dtype  # bitsandbytes dequantizes to quant_state.dtype
    benchmark.group = f"nf4_dequantize 4096x4096 -> {out}"
    benchmark.extra_info.update(out_bytes=SHAPE[0] * SHAPE[1] * dtype.itemsize)
    w = benchmark(bnbf.dequantize_4bit, bnb_packed, bnb_state)
    assert w.dtype == dtype
    torch.testing.assert_close(w, dequantize_nf4(packed, state, dtype), rtol=0, atol=0)
