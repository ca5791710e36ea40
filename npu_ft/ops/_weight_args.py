"""Argument checks of a frozen base weight - dense ``[out, in]``, or NF4 (``packed`` codes +
``Nf4QuantState``) - and of the LoRA tensors around it, shared by the LoRA family's entry points
(``lora_*``, ``nf4_linear``, ``dora_*``, ``lora_fa_*``); messages start with the argument's name."""

from __future__ import annotations

import math

import torch

from . import _checks


def check_scaling(scaling) -> float:
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling: expected a float, got {type(scaling).__name__}")
    scaling = float(scaling)
    if not math.isfinite(scaling):
        raise ValueError(f"scaling: must be finite, got {scaling}")
    return scaling


def check_lora(x, lora_A, lora_B, x_lora, in_features: int, out_features: int, extra_devices: dict) -> None:
    _checks.check_tensor("lora_A", lora_A, _checks.FLOAT_DTYPES, ndim=2)
    _checks.check_tensor("lora_B", lora_B, _checks.FLOAT_DTYPES, ndim=2)
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B: dtype {lora_B.dtype} differs from lora_A's {lora_A.dtype}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A: rank (dim 0) must be >= 1, got shape {tuple(lora_A.shape)}")
    _checks.check_dim("lora_A", lora_A.shape[1], in_features, "in_features (dim 1)")
    _checks.check_dim("lora_B", lora_B.shape[0], out_features, "out_features (dim 0)")
    _checks.check_dim("lora_B", lora_B.shape[1], r, "rank (dim 1, must equal lora_A's dim 0)")
    if x_lora is not None:
        _checks.check_tensor("x_lora", x_lora, (lora_A.dtype,))
        if x_lora.shape != x.shape:
            raise ValueError(f"x_lora: shape {tuple(x_lora.shape)} differs from x's {tuple(x.shape)}")
    _checks.check_same_device("x", x, lora_A=lora_A, lora_B=lora_B, x_lora=x_lora, **extra_devices)


def check_x(x) -> None:
    _checks.check_tensor("x", x, _checks.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dimension [..., in_features], got shape {tuple(x.shape)}")


def check_bias(bias, x, out_features: int) -> None:
    if bias is None:
        return
    _checks.check_tensor("bias", bias, (x.dtype,), ndim=1)
    _checks.check_dim("bias", bias.shape[0], out_features, "length")


def check_dense_lora_args(x, weight, bias, lora_A, lora_B, x_lora, method: str) -> tuple[int, int]:
    """x ``[..., in]``, frozen weight ``[out, in]`` (x's dtype), bias, lora_A/B, x_lora; returns ``(out, in)``."""
    check_x(x)
    _checks.check_tensor("weight", weight, (x.dtype,), ndim=2)
    out_features, in_features = weight.shape
    _checks.check_dim("x", x.shape[-1], in_features, "in_features (last dim, must equal weight's dim 1)")
    check_bias(bias, x, out_features)
    check_lora(x, lora_A, lora_B, x_lora, in_features, out_features, {"weight": weight, "bias": bias})
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"weight: the base weight is frozen in {method} and gets no gradient; "
                         "call weight.requires_grad_(False)")
    return out_features, in_features


def check_nf4_lora_args(x, packed, state, bias, lora_A, lora_B, x_lora) -> tuple[torch.Tensor, int, list[int]]:
    """As :func:`check_dense_lora_args` for an NF4 base; returns ``(absmax, blocksize, [out, in])``."""
    check_x(x)
    absmax, blocksize, shape = check_nf4_weight(x, packed, state)
    check_bias(bias, x, shape[0])
    check_lora(x, lora_A, lora_B, x_lora, shape[1], shape[0], {"packed": packed, "state.absmax": absmax,
                                                                  "bias": bias})
    return absmax, blocksize, shape


def check_nf4_weight(x: torch.Tensor, packed: torch.Tensor, state) -> tuple[torch.Tensor, int, list[int]]:
    """Check ``packed`` ``[(out*in+1)//2, 1]`` uint8 and ``state`` against x ``[..., in]``.

    Returns ``(absmax fp32 [blocks], blocksize, [out, in])``.
    """
    _checks.check_tensor("packed", packed, (torch.uint8,), ndim=2)
    shape = getattr(state, "shape", None)
    if shape is None or not hasattr(state, "absmax_fp32") or not hasattr(state, "blocksize"):
        raise TypeError(f"state: expected an Nf4QuantState, got {type(state).__name__}")
    shape = [int(s) for s in shape]
    if len(shape) != 2:
        raise ValueError(f"state: needs a 2-D weight [out, in], got shape {tuple(shape)}")
    numel = shape[0] * shape[1]
    _checks.check_dim("packed", packed.shape[0], (numel + 1) // 2, "number of bytes (dim 0)")
    _checks.check_dim("packed", packed.shape[1], 1, "dim 1")
    blocksize = int(state.blocksize)
    absmax = state.absmax_fp32()
    _checks.check_tensor("state.absmax", absmax, (torch.float32,), ndim=1)
    _checks.check_dim("state.absmax", absmax.shape[0], -(-numel // blocksize), "number of blocks")
    _checks.check_dim("x", x.shape[-1], shape[1], "in_features (last dim, must equal the weight's dim 1)")
    return absmax, blocksize, shape
