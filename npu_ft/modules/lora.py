"""``LoraLinear``: a frozen linear layer plus a trainable low-rank update (LoRA / QLoRA).

::

    y = base(x) + scaling * lora_B(lora_A(dropout(x)))

    x        [..., in]
    base     frozen nn.Linear [out, in] (+ bias [out]) or Nf4Linear (QLoRA)
    lora_A   nn.Linear(in, r, bias=False)   weight [r, in]    kaiming_uniform_(a=sqrt(5))
    lora_B   nn.Linear(r, out, bias=False)  weight [out, r]   zeros
    scaling  lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
    y        [..., out] in x's dtype

Parameter names, initialization (same RNG draws, so the same seed gives the same A), adapter dtype
and numerics are those of PEFT's ``lora.Linear`` / ``lora.Linear4bit`` with one adapter:
``lora_A.weight`` / ``lora_B.weight`` are PEFT's adapter keys without the adapter name. The forward
pass is one fused op (``npu_ft::lora_linear`` or ``npu_ft::nf4_linear``) with its own backward.

Variants: ``init_lora_weights="pissa"`` / ``"pissa_niter_N"`` starts from the weight's principal
components (:mod:`npu_ft.modules.pissa`; the base keeps the residual). With ``lora_A`` frozen
(LoRA-FA, ``lora_fa=True``) the forward runs ``npu_ft::lora_fa_linear`` / ``lora_fa_nf4_linear``,
whose backward keeps ``x @ A.T`` (r values per token) instead of x. DoRA is
:class:`npu_ft.modules.dora.DoraLinear`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from npu_ft.ops import lora as _lora_ops
from npu_ft.ops import lora_fa as _lora_fa_ops

from .nf4 import Nf4Linear
from .pissa import parse_pissa_init, pissa_decompose

__all__ = ["LoraLinear"]

_UPCAST = (torch.float16, torch.bfloat16)


class LoraLinear(nn.Module):
    """LoRA around a frozen ``nn.Linear`` or :class:`Nf4Linear` base.

    Args:
        base: the layer to adapt; its parameters are frozen (``requires_grad_(False)``).
        r: rank (>= 1).
        lora_alpha: scaling numerator.
        lora_dropout: dropout probability applied to the LoRA branch's input (PEFT's ``lora_dropout``).
        use_rslora: scaling = alpha / sqrt(r) instead of alpha / r.
        autocast_adapter_dtype: as PEFT's ``get_peft_model`` default: adapters of a bf16/fp16 base
            are kept in fp32 (after being created in the base's dtype, exactly like PEFT).
        init_lora_weights: True (kaiming A, zero B), or ``"pissa"`` / ``"pissa_niter_N"`` (PiSSA;
            dense base only: the base weight is replaced by the residual ``W - s*B@A``).
        lora_fa: freeze ``lora_A`` after its initialization (LoRA-FA: only B trains).

    Shapes: x ``[..., in]`` -> ``[..., out]`` in x's dtype (x must have the base weight's dtype).
    """

    def __init__(self, base: nn.Linear | Nf4Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, autocast_adapter_dtype: bool = True,
                 init_lora_weights: bool | str = True, lora_fa: bool = False) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, Nf4Linear)):
            raise TypeError(f"base: expected nn.Linear or Nf4Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r: must be a positive integer, got {r!r}")
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
            raise ValueError(f"lora_alpha: must be a finite number, got {lora_alpha!r}")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout: must be in [0, 1), got {lora_dropout!r}")
        base.requires_grad_(False)
        self.base_layer = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        # Same construction order as PEFT's LoraLayer.update_layer, hence the same RNG draws:
        # nn.Linear's own init of A, then of B, then A is re-initialized and B zeroed.
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, self.out_features, bias=False)
        self.init_lora_weights = init_lora_weights
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        elif init_lora_weights is not False:
            self._pissa_init(parse_pissa_init(init_lora_weights))
        device, dtype = self._base_device_and_dtype()
        if dtype is not None:
            self.lora_A.to(device=device, dtype=dtype)
            self.lora_B.to(device=device, dtype=dtype)
            if autocast_adapter_dtype and dtype in _UPCAST:
                self.lora_A.to(torch.float32)
                self.lora_B.to(torch.float32)
        else:
            self.lora_A.to(device)
            self.lora_B.to(device)
        self.lora_fa = bool(lora_fa)
        if self.lora_fa:
            self.lora_A.weight.requires_grad_(False)

    @torch.no_grad()
    def _pissa_init(self, niter: int | None) -> None:
        """PEFT's ``pissa_init``: A, B from the SVD of W; the base weight becomes the residual."""
        base = self.base_layer
        if not isinstance(base, nn.Linear):
            raise ValueError("init_lora_weights: PiSSA needs a dense base layer, not an NF4 one (initialize PiSSA "
                             "on the full-precision model, then quantize the residual)")
        lora_A, lora_B, residual = pissa_decompose(base.weight, self.r, self.scaling, niter)
        self.lora_A.weight.data = lora_A.to(self.lora_A.weight.device)
        self.lora_B.weight.data = lora_B.to(self.lora_B.weight.device)
        base.weight.data = residual.to(base.weight.dtype)

    def _base_device_and_dtype(self):
        base = self.base_layer
        if isinstance(base, Nf4Linear):
            return base.packed.device, base.compute_dtype
        return base.weight.device, base.weight.dtype

    def _x_lora(self, x: torch.Tensor):
        """The LoRA branch input: None (= x) without active dropout, else dropout(x in A's dtype)."""
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            return None
        return self.lora_dropout(x.to(self.lora_A.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., in]`` -> ``[..., out]``."""
        x_lora = self._x_lora(x)
        base = self.base_layer
        if torch.is_grad_enabled() and not self.lora_A.weight.requires_grad:  # LoRA-FA: backward keeps h, not x
            if isinstance(base, Nf4Linear):
                return _lora_fa_ops.lora_fa_nf4_linear(x, base.packed, base.quant_state, base.bias, self.lora_A.weight,
                                                       self.lora_B.weight, self.scaling, x_lora)
            return _lora_fa_ops.lora_fa_linear(x, base.weight, base.bias, self.lora_A.weight, self.lora_B.weight,
                                               self.scaling, x_lora)
        if isinstance(base, Nf4Linear):
            return _lora_ops.nf4_linear(x, base.packed, base.quant_state, base.bias, self.lora_A.weight,
                                        self.lora_B.weight, self.scaling, x_lora)
        return _lora_ops.lora_linear(x, base.weight, base.bias, self.lora_A.weight, self.lora_B.weight,
                                     self.scaling, x_lora)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` ``[out, in]`` in fp32 (or the adapters' dtype if wider)."""
        a = self.lora_A.weight
        b = self.lora_B.weight
        dtype = torch.promote_types(a.dtype, torch.float32)
        return (b.to(dtype) @ a.to(dtype)) * self.scaling

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A new frozen ``nn.Linear`` with weight ``W + scaling * B @ A`` (W dequantized for an NF4
        base), in the base weight's dtype and device; this module is left unchanged."""
        base = self.base_layer
        weight = base.dequantized_weight() if isinstance(base, Nf4Linear) else base.weight
        merged = (weight.to(torch.float32) + self.delta_weight().to(weight.device)).to(weight.dtype)
        return self._linear_like(weight, merged)

    def _linear_like(self, weight: torch.Tensor, new_weight: torch.Tensor) -> nn.Linear:
        """A frozen ``nn.Linear`` holding ``new_weight`` and the base's bias, on ``weight``'s device/dtype."""
        bias = self.base_layer.bias
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device,
                        dtype=weight.dtype)
        out.weight.copy_(new_weight)
        if bias is not None:
            out.bias.copy_(bias)
        out.requires_grad_(False)
        return out

    def extra_repr(self) -> str:
        extra = "".join(f", {k}" for k, on in (("lora_fa", self.lora_fa),
                                                 (f"init={self.init_lora_weights}", self.init_lora_weights is not True))
                        if on)
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, rslora={self.use_rslora}{extra}"
