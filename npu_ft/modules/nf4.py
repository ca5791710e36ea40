"""``Nf4Linear``: a frozen linear layer whose weight is stored in bitsandbytes' NF4 format (QLoRA base).

Storage (byte-identical to bitsandbytes, see :mod:`npu_ft.ops.nf4`)::

    packed       [(out*in+1)//2, 1] uint8   two 4-bit codes per byte, high nibble first
    quant_state  Nf4QuantState              absmax per block of ``blocksize`` weights (optionally
                                            double-quantized), original shape [out, in] and dtype
    bias         [out] or None              frozen, kept in full precision

Forward runs ``npu_ft::nf4_linear``: W is dequantized to x's dtype inside the op and again in
backward for dx; the dense W is never kept.
"""

from __future__ import annotations

import torch
from torch import nn

from npu_ft.ops import lora as _lora_ops

__all__ = ["Nf4Linear"]


def _nf4():
    from npu_ft.ops import nf4

    return nf4


def _move_state(state, device, depth: int = 0) -> None:
    """Move every tensor attribute of ``state`` (and of nested state objects) to ``device``."""
    for name, value in list(vars(state).items()):
        if isinstance(value, torch.Tensor):
            if value.device != device:
                setattr(state, name, value.to(device))
        elif depth < 2 and hasattr(value, "__dict__") and type(value).__module__.startswith("npu_ft"):
            _move_state(value, device, depth + 1)


class Nf4Linear(nn.Module):
    """Frozen NF4 linear layer: ``y = x @ dequantize(packed).T + bias``.

    Args:
        packed: ``[(out*in+1)//2, 1]`` uint8 NF4 codes of a weight ``[out, in]``.
        state: the weight's ``Nf4QuantState`` (shape ``[out, in]``, blocksize, absmax).
        bias: ``[out]`` or None (stored as a frozen parameter).
        compute_dtype: dtype the LoRA adapters are created in when this layer is wrapped by
            :class:`~npu_ft.modules.LoraLinear` (bitsandbytes' ``compute_dtype``); None = fp32.

    Shapes: x ``[..., in]`` -> y ``[..., out]`` in x's dtype.
    """

    packed: torch.Tensor  # a registered buffer

    def __init__(self, packed: torch.Tensor, state, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        shape = tuple(int(s) for s in state.shape)
        if len(shape) != 2:
            raise ValueError(f"state: Nf4Linear needs a 2-D weight [out, in], got shape {shape}")
        self.out_features, self.in_features = shape
        self.register_buffer("packed", packed)
        self.quant_state = state
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias: expected shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Nf4Linear:
        """Quantize ``linear.weight`` ``[out, in]`` to NF4 (bitsandbytes layout); the bias is copied.

        ``device``: where to quantize and keep the layer (default: where the weight is); the NF4
        bytes do not depend on it."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if device is not None:
            weight = weight.to(device)
        packed, state = _nf4().quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant)
        bias = None if linear.bias is None else linear.bias.detach().to(weight.device)
        return cls(packed, state, bias, compute_dtype=compute_dtype)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the original (dequantized) weight."""
        return self.quant_state.dtype

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight ``[out, in]`` (a new tensor) in ``dtype`` (default: the original dtype)."""
        return _nf4().dequantize_nf4(self.packed, self.quant_state, dtype)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        # keep the quant state's tensors next to the packed codes; never cast their dtype
        device = self.packed.device
        to = getattr(self.quant_state, "to", None)
        if callable(to):
            self.quant_state = to(device)
        else:
            _move_state(self.quant_state, device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., in]`` -> ``[..., out]`` (x's dtype)."""
        return _lora_ops.nf4_linear(x, self.packed, self.quant_state, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={self.quant_state.blocksize}")
