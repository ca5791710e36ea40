"""Inputs and tolerances shared by the tests of the LoRA-family ops (dora_*, lora_fa_*) on every backend.

Tolerances (relative to each output tensor's largest entry, like ``npu-ft doctor``): fp32 2e-5 (the
kernels sum in another order than the reference, and DoRA's norm comes from the decomposed
formula); bf16 / fp16 3e-2 (a few ulps of 8 mantissa bits: the kernels round ``z`` once before the
epilogue where the reference does not, and compute ``W @ A.T`` in the weight's dtype).
"""

from __future__ import annotations

import torch

from npu_ft.ops import dora as dora_ops
from npu_ft.ops import nf4 as nf4_ops

REL_TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 3e-2}

#: (lead dims of x, in, out, r): odd sizes, not multiples of any block, rank 1, 3-D activations
SHAPES = [
    ((5,), 13, 7, 3),
    ((2, 9), 33, 17, 1),
    ((3, 1, 4), 100, 3, 5),
    ((37,), 64, 67, 8),
]
#: (x dtype, adapter dtype)
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
]


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "",
          rel: float | None = None) -> None:
    """``max|a - e| <= rel * max(|e|.max(), 1e-6)`` (``rel`` default ``REL_TOL[dtype]``), equal shape/dtype."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    if not expected.numel():
        return
    scale = max(expected.float().abs().max().item(), 1e-6)
    err = (actual.float() - expected.float()).abs().max().item()
    rel = REL_TOL[dtype] if rel is None else rel
    assert err <= rel * scale, f"{what}: max error {err:.3e} > {rel:g} x {scale:.3e}"


def tol_dtype(x_dtype: torch.dtype, lora_dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if torch.bfloat16 in (x_dtype, lora_dtype) else torch.float32


def method_args(lead, in_f, out_f, r, x_dtype, lora_dtype, *, bias=True, dropout=False, seed=0, device="cpu"):
    """Random ``dict`` of x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, x_lora, grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=g)
    weight = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    out = {
        "x": x.to(x_dtype),
        "weight": weight.to(x_dtype),
        "bias": (torch.randn(out_f, generator=g) / 4).to(x_dtype) if bias else None,
        "lora_A": (torch.randn(r, in_f, generator=g) / in_f**0.5).to(lora_dtype),
        "lora_B": (torch.randn(out_f, r, generator=g) / 2).to(lora_dtype),
        "magnitude": (torch.rand(out_f, generator=g) + 0.5).to(lora_dtype),
        "grad": torch.randn(*lead, out_f, generator=g).to(x_dtype),
    }
    keep = (torch.rand(x.shape, generator=g) > 0.3).to(lora_dtype) / 0.7
    out["x_lora"] = out["x"].to(lora_dtype) * keep if dropout else None
    out["weight_sq_norm"] = dora_ops.weight_sq_norm(out["weight"])
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


def nf4_args(args: dict, blocksize: int = 64):
    """``(packed, state, dequantized weight)`` of ``args["weight"]``, with ``weight_sq_norm`` of the
    dequantized weight put into ``args``."""
    packed, state = nf4_ops.quantize_nf4(args["weight"].float(), blocksize=blocksize, double_quant=True)
    packed, state = packed.to(args["x"].device), state.to(args["x"].device)
    dense = nf4_ops.dequantize_nf4(packed, state, torch.float32)
    args["weight_sq_norm"] = dora_ops.weight_sq_norm(dense)
    return packed, state, dense.to(args["x"].dtype)


def saved_z(forward_out) -> tuple[torch.Tensor, bool]:
    """What DoRA's autograd keeps from a forward ``(y, h, z, norm)``: ``(z, False)``, or ``(y, True)``
    when z came back empty (no bias, no dropout)."""
    y, _, z, _ = forward_out
    return (z, False) if z.numel() else (y, True)
