"""Argument checks of a frozen base weight - dense ``[out, in]``, or NF4 (``packed`` codes +
``Nf4QuantState``) - and of the LoRA tensors around it, shared by the LoRA family's entry points
(``dora_*``, ``lora_fa_*``); messages start with the argument's name."""

from __future__ import annotations

import torch

from . import _checks
from .lora import _check_bias, _check_lora, _check_x


def check_dense_lora_args(x, weight, bias, lora_A, lora_B, x_lora, method: str) -> tuple[int, int]:
    """x ``[..., in]``, frozen weight ``[out, in]`` (x's dtype), bias, lora_A/B, x_lora; returns ``(out, in)``."""
    _check_x(x)
    _checks.check_tensor("weight", weight, (x.dtype,), ndim=2)
    out_features, in_features = weight.shape
    _checks.check_dim("x", x.shape[-1], in_features, "in_features (last dim, must equal weight's dim 1)")
    _check_bias(bias, x, out_features)
    _check_lora(x, lora_A, lora_B, x_lora, in_features, out_features, {"weight": weight, "bias": bias})
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"weight: the base weight is frozen in {method} and gets no gradient; "
                         "call weight.requires_grad_(False)")
    return out_features, in_features


def check_nf4_lora_args(x, packed, state, bias, lora_A, lora_B, x_lora) -> tuple[torch.Tensor, int, list[int]]:
    """As :func:`check_dense_lora_args` for an NF4 base; returns ``(absmax, blocksize, [out, in])``."""
    _check_x(x)
    absmax, blocksize, shape = check_nf4_weight(x, packed, state)
    _check_bias(bias, x, shape[0])
    _check_lora(x, lora_A, lora_B, x_lora, shape[1], shape[0], {"packed": packed, "state.absmax": absmax,
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
