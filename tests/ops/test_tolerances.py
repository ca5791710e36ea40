"""The op registry's tolerance table: one table per op, read by the op tests and npu-ft doctor."""

from __future__ import annotations

import pytest
import torch

import npu_ft.ops  # noqa: F401  (defines the ops and their tables)
from npu_ft.ops import _registry, tolerance

OPS = ("nf4_quantize", "nf4_dequantize", "quantize_blockwise_8bit", "dequantize_blockwise_8bit", "lora_linear",
       "lora_linear_backward", "nf4_linear", "nf4_linear_backward", "linear_cross_entropy",
       "adamw8bit_update")


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_table_for_every_float_dtype(op):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert isinstance(tolerance(op, dtype), _registry.Tolerance)
    assert tolerance(f"npu_ft::{op}", torch.float32) == tolerance(op, torch.float32)


def test_codes_are_exact_and_values_get_a_few_ulps():
    for op in ("nf4_quantize", "quantize_blockwise_8bit"):
        assert tolerance(op, torch.bfloat16).exact
    fp32, bf16 = tolerance("lora_linear", torch.float32), tolerance("lora_linear", torch.bfloat16)
    assert not fp32.exact and fp32.rtol < bf16.rtol and fp32.atol < bf16.atol


def test_tolerance_is_relative_to_the_element_and_the_tensor_scale():
    tol = _registry.Tolerance(rtol=1e-2, atol=1e-3)
    ref = torch.tensor([100.0, 1.0, 0.0])
    # atol scales with max(1, max|ref|) = 100: 0.1 allowed on every element, plus 1 % of the element
    assert tol.passes(ref + torch.tensor([1.0, 0.1, 0.09]), ref)
    assert not tol.passes(ref + torch.tensor([0.0, 0.0, 0.11]), ref)
    assert not tol.passes(ref + torch.tensor([1.2, 0.0, 0.0]), ref)
    small = torch.tensor([0.5, -0.25])  # max|ref| < 1: atol is not scaled down
    assert tol.passes(small + 1e-3, small) and not tol.passes(small + 2e-3 + 1e-2, small)
    assert not tol.passes(torch.tensor([float("nan")]), torch.tensor([1.0]))
    assert not tol.passes(ref[:2], ref)
    assert _registry.EXACT.passes(ref.clone(), ref) and not _registry.EXACT.passes(ref + 1e-6, ref)
    with pytest.raises(AssertionError):
        tol.assert_close(ref + torch.tensor([0.0, 0.0, 0.11]), ref)
    tol.assert_close(ref + torch.tensor([1.0, 0.1, 0.09]), ref)


def test_unknown_op_or_dtype_is_a_clear_error():
    with pytest.raises(KeyError, match="no_such_op: no tolerance table"):
        tolerance("no_such_op", torch.float32)
    with pytest.raises(KeyError, match="lora_linear: no tolerance for torch.float64"):
        tolerance("lora_linear", torch.float64)
