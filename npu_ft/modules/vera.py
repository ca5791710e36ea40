"""VeRA (vector-based random matrix adaptation): frozen random ``A``/``B`` shared by every adapted
layer, and two trainable vectors per layer (PEFT ``VeraConfig``, same files)::

    y = base(x) + lambda_b * ((lambda_d * (dropout(x) @ A[:, :in].T)) @ B[:out, :].T)

    A  [r, in_max]   B  [out_max, r]   one pair for the model (largest in/out of the targets),
                                      kaiming-uniform from torch.Generator().manual_seed(projection_prng_key)
    lambda_b [out]   zeros             trainable
    lambda_d [r]     d_initial         trainable

PEFT's construction order and RNG draws (``lambda_d`` is first drawn from the global RNG, then
filled), parameter names (``vera_lambda_b`` / ``vera_lambda_d``) and dtypes. The branch runs as
``npu_ft::lora_fa_linear`` (``lora_fa_nf4_linear`` over an NF4 base) with ``B_eff = lambda_b * B *
lambda_d``: A is frozen, so backward keeps ``x @ A.T`` and never x, and the gradients of the two
vectors come from ``dB_eff`` (``[out, r]`` work).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from npu_ft.ops import lora_fa as _lora_fa_ops

from .nf4 import Nf4Linear

__all__ = ["PROJECTIONS_ATTR", "VeraLinear", "VeraProjections", "VeraSpec", "vera_modules"]

PROJECTIONS_ATTR = "npu_ft_vera_projections"


@dataclass
class VeraSpec:
    """What :func:`apply_vera` did (PEFT ``VeraConfig`` field names)."""

    r: int
    d_initial: float
    projection_prng_key: int
    save_projection: bool
    vera_dropout: float
    target_modules: list[str]
    modules_to_save: list[str] | None = None
    quantized: bool = False
    vera_module_names: list[str] = field(default_factory=list)
    saved_module_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Uniform(-b, b) with ``b = sqrt(6 / fan_in)`` (kaiming, gain sqrt(2)); fan_in = ``shape[1]``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The shared frozen ``vera_A [r, in_max]`` and ``vera_B [out_max, r]`` (fp32 buffers)."""

    vera_A: torch.Tensor
    vera_B: torch.Tensor

    def __init__(self, r: int, in_max: int, out_max: int, prng_key: int) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(int(prng_key))
        self.register_buffer("vera_A", _kaiming_uniform((r, in_max), generator), persistent=False)
        self.register_buffer("vera_B", _kaiming_uniform((out_max, r), generator), persistent=False)


class VeraLinear(nn.Module):
    """VeRA around a frozen ``nn.Linear`` or :class:`Nf4Linear`.

    Args:
        base: the layer to adapt (frozen here).
        projections: the model's shared :class:`VeraProjections` (held by reference, not as a submodule).
        r: rank (rows of vera_A). d_initial: initial value of ``lambda_d``. vera_dropout: as lora_dropout.

    Shapes: x ``[..., in]`` -> ``[..., out]`` in x's dtype.
    """

    def __init__(self, base: nn.Linear | Nf4Linear, projections: VeraProjections, r: int, d_initial: float = 0.1,
                 vera_dropout: float = 0.0, autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, Nf4Linear)):
            raise TypeError(f"base: expected nn.Linear or Nf4Linear, got {type(base).__name__}")
        if not 0.0 <= float(vera_dropout) < 1.0:
            raise ValueError(f"vera_dropout: must be in [0, 1), got {vera_dropout!r}")
        base.requires_grad_(False)
        self.base_layer = base
        self.in_features, self.out_features, self.r = base.in_features, base.out_features, int(r)
        if projections.vera_A.shape[0] != self.r or projections.vera_A.shape[1] < self.in_features or \
                projections.vera_B.shape[0] < self.out_features:
            raise ValueError(f"projections: vera_A {tuple(projections.vera_A.shape)} / vera_B "
                             f"{tuple(projections.vera_B.shape)} do not cover r={r}, in={self.in_features}, "
                             f"out={self.out_features}")
        object.__setattr__(self, "_projections", projections)  # shared: not a submodule of each layer
        self.vera_dropout = nn.Dropout(p=vera_dropout) if vera_dropout > 0.0 else nn.Identity()
        # PEFT's order: ones / randn (a global RNG draw), then reset to zeros / d_initial
        self.vera_lambda_b = nn.Parameter(torch.ones(self.out_features))
        self.vera_lambda_d = nn.Parameter(torch.randn(self.r))
        with torch.no_grad():
            self.vera_lambda_b.zero_()
            self.vera_lambda_d.fill_(d_initial)
        device, dtype = (base.packed.device, base.compute_dtype) if isinstance(base, Nf4Linear) else (
            base.weight.device, base.weight.dtype)
        for p in (self.vera_lambda_b, self.vera_lambda_d):
            p.data = p.data.to(device=device, dtype=dtype if dtype is not None else torch.float32)
            if autocast_adapter_dtype and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.to(torch.float32)

    @property
    def projections(self) -> VeraProjections:
        return self._projections  # type: ignore[return-value]

    def _sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in], B [out, r])`` views of the shared projections in the vectors' dtype."""
        dtype = self.vera_lambda_d.dtype
        a = self.projections.vera_A[:, :self.in_features]
        b = self.projections.vera_B[:self.out_features, :]
        return a.to(dtype), b.to(dtype)

    def effective_b(self, b: torch.Tensor) -> torch.Tensor:
        """``lambda_b[:, None] * B * lambda_d[None, :]`` ``[out, r]`` (differentiable in both vectors)."""
        return self.vera_lambda_b[:, None] * b * self.vera_lambda_d[None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., in]`` -> ``[..., out]``."""
        a, b = self._sliced()
        b_eff = self.effective_b(b)
        x_lora = None
        if self.training and not isinstance(self.vera_dropout, nn.Identity):
            x_lora = self.vera_dropout(x.to(a.dtype))
        base = self.base_layer
        if isinstance(base, Nf4Linear):
            return _lora_fa_ops.lora_fa_nf4_linear(x, base.packed, base.quant_state, base.bias, a, b_eff, 1.0, x_lora)
        return _lora_fa_ops.lora_fa_linear(x, base.weight, base.bias, a, b_eff, 1.0, x_lora)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A new frozen ``nn.Linear`` with ``W + (lambda_b * B) @ (lambda_d * A)`` (fp32 math)."""
        base = self.base_layer
        weight = base.dequantized_weight() if isinstance(base, Nf4Linear) else base.weight
        a, b = self._sliced()
        delta = self.effective_b(b).float() @ a.float()
        out = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device=weight.device,
                        dtype=weight.dtype)
        out.weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
        if base.bias is not None:
            out.bias.copy_(base.bias)
        out.requires_grad_(False)
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, vera"


def vera_modules(model: nn.Module) -> dict[str, VeraLinear]:
    """``{full name: VeraLinear}`` in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, VeraLinear)}
