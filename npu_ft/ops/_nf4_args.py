"""Argument checks of an NF4 base weight (``packed`` codes + ``Nf4QuantState``) for the ops that
take one (``dora_nf4_linear``, ``lora_fa_nf4_linear``); messages start with the argument's name."""

from __future__ import annotations

import torch

from . import _checks


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
