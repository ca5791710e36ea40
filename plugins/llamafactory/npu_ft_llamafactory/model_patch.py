"""Model-level entry points: npu-ft's ops for one (PEFT) Qwen model instance, no LLaMA-Factory needed."""

from __future__ import annotations

import torch
from torch import nn

from .lf_patch import SUPPORTED_MODEL_TYPES, NpuFtLlamaFactoryError
from .peft_patch import apply_npu_ft_to_peft
from .qlora import convert_bnb_4bit_layers, quantize_base_layers

__all__ = ["apply_npu_ft_to_model", "apply_npu_ft_to_qwen2", "apply_npu_ft_to_qwen3"]


def _model_type(model: nn.Module) -> str | None:
    for m in (model, getattr(model, "base_model", None), getattr(getattr(model, "base_model", None), "model", None)):
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "model_type", None):
            return cfg.model_type
    return None


def apply_npu_ft_to_model(model: nn.Module, *, quantize_nf4: bool = False, double_quant: bool = True,
                          compute_dtype: torch.dtype | None = None,
                          model_types: tuple[str, ...] | None = SUPPORTED_MODEL_TYPES) -> dict:
    """Make ``model`` (a PEFT LoRA model, or one PEFT will wrap later) compute with npu-ft's ops.

    Patches PEFT's LoRA layer classes, then (``quantize_nf4``) replaces the dense base linears by
    npu-ft NF4 layers (``double_quant``; ``compute_dtype`` default: each weight's dtype), and converts
    any bitsandbytes 4-bit layer. Raises :class:`NpuFtLlamaFactoryError` for a model type outside
    ``model_types`` (None: any). Returns ``{"model_type", "peft_classes", "nf4_layers",
    "bnb_layers_converted"}``.
    """
    mt = _model_type(model)
    if model_types is not None and mt not in model_types:
        raise NpuFtLlamaFactoryError(f"npu-ft LLaMA-Factory plugin: model type {mt!r} is not supported "
                                     f"(supported: {', '.join(model_types)})")
    classes = apply_npu_ft_to_peft()
    nf4 = quantize_base_layers(model, double_quant=double_quant, compute_dtype=compute_dtype) if quantize_nf4 else []
    converted = convert_bnb_4bit_layers(model)
    return {"model_type": mt, "peft_classes": classes, "nf4_layers": nf4, "bnb_layers_converted": converted}


def apply_npu_ft_to_qwen2(model: nn.Module, *, quantize_nf4: bool = False, double_quant: bool = True,
                          compute_dtype: torch.dtype | None = None) -> dict:
    """:func:`apply_npu_ft_to_model` for a Qwen2 / Qwen2.5 model (raises for any other type)."""
    return apply_npu_ft_to_model(model, quantize_nf4=quantize_nf4, double_quant=double_quant,
                                 compute_dtype=compute_dtype, model_types=("qwen2",))


def apply_npu_ft_to_qwen3(model: nn.Module, *, quantize_nf4: bool = False, double_quant: bool = True,
                          compute_dtype: torch.dtype | None = None) -> dict:
    """:func:`apply_npu_ft_to_model` for a Qwen3 model (raises for any other type)."""
    return apply_npu_ft_to_model(model, quantize_nf4=quantize_nf4, double_quant=double_quant,
                                 compute_dtype=compute_dtype, model_types=("qwen3",))
