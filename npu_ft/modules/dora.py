"""``DoraLinear``: weight-decomposed LoRA (DoRA) around a frozen ``nn.Linear`` or :class:`Nf4Linear`.

::

    y = m / ||W + s*B@A||_row * (x @ W.T + s * (x @ A.T) @ B.T) + bias

    lora_A [r, in], lora_B [out, r]   as in LoraLinear (same init, same RNG draws as PEFT)
    lora_magnitude_vector [out]       trainable; initialized to ||W + s*B@A||_row (= ||W||_row for B = 0)
    weight_sq_norm [out]              buffer: ||W_i||^2 in fp32, computed once (dequantized W for NF4)

PEFT's ``lora.Linear`` / ``Linear4bit`` with ``use_dora=True``: parameter names
(``lora_magnitude_vector`` is PEFT's saved key), initialization, the detached norm and the dropout
rule are PEFT's. The forward pass is one op (``npu_ft::dora_linear`` / ``dora_nf4_linear``) whose
kernels compute the norm from ``||W_i||^2``, ``B (A W^T)`` and ``B (A A^T) B^T`` and never form the
``[out, in]`` matrix ``W + s*B@A``. With ``lora_fa=True`` (A frozen) backward keeps h instead of x.
"""

from __future__ import annotations

import torch
from torch import nn

from npu_ft.ops import dora as _dora_ops

from .lora import LoraLinear
from .nf4 import Nf4Linear

__all__ = ["DoraLinear"]


class DoraLinear(LoraLinear):
    """DoRA around a frozen base; arguments as :class:`LoraLinear`.

    Shapes: x ``[..., in]`` -> ``[..., out]`` in x's dtype.
    """

    weight_sq_norm: torch.Tensor  # a registered buffer

    def __init__(self, base: nn.Linear | Nf4Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, autocast_adapter_dtype: bool = True,
                 init_lora_weights: bool | str = True, lora_fa: bool = False) -> None:
        super().__init__(base, r, lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                         autocast_adapter_dtype=False, init_lora_weights=init_lora_weights, lora_fa=lora_fa)
        weight = self._dense_base_weight()
        # PEFT: the magnitude is ||W + s * B@A|| in W's dtype, taken while the adapters are in the base's dtype
        with torch.no_grad():
            a = self.lora_A.weight.to(weight.dtype)
            b = self.lora_B.weight.to(weight.dtype)
            norm = torch.linalg.norm(weight + self.scaling * (b @ a), dim=1).to(weight.dtype)
        self.lora_magnitude_vector = nn.Parameter(norm, requires_grad=True)
        self.register_buffer("weight_sq_norm", _dora_ops.weight_sq_norm(weight), persistent=False)
        dtype = self.lora_A.weight.dtype
        if autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
            for module_param in (self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector):
                module_param.data = module_param.data.to(torch.float32)

    def _dense_base_weight(self) -> torch.Tensor:
        """The base weight ``[out, in]`` (dequantized to its original dtype for an NF4 base)."""
        base = self.base_layer
        return base.dequantized_weight() if isinstance(base, Nf4Linear) else base.weight

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.weight_sq_norm.dtype != torch.float32:  # a model-wide .to(dtype): recompute, never round it
            self.weight_sq_norm = _dora_ops.weight_sq_norm(self._dense_base_weight())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., in]`` -> ``[..., out]``."""
        x_lora = self._x_lora(x)
        base = self.base_layer
        args = (self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector, self.weight_sq_norm,
                self.scaling, x_lora)
        if isinstance(base, Nf4Linear):
            return _dora_ops.dora_nf4_linear(x, base.packed, base.quant_state, base.bias, *args)
        return _dora_ops.dora_linear(x, base.weight, base.bias, *args)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A new frozen ``nn.Linear`` with weight ``m / ||W + s*B@A|| * (W + s*B@A)`` (fp32 math, the
        base weight's dtype); this module is left unchanged."""
        weight = self._dense_base_weight()
        full = weight.to(torch.float32) + self.delta_weight().to(weight.device)
        scale = self.lora_magnitude_vector.to(torch.float32) / torch.linalg.vector_norm(full, dim=1)
        return self._linear_like(weight, (scale[:, None] * full).to(weight.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora"
