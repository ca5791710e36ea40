"""npu-ft for LLaMA-Factory: make ``llamafactory-cli train`` run its LoRA / QLoRA on npu-ft's ops.

Liger-Kernel style entry points (each patches a class or a model; none forks LLaMA-Factory):

* :func:`apply_npu_ft_to_peft` -- PEFT's LoRA ``Linear`` (+ bitsandbytes ``Linear4bit``) forward runs
  ``npu_ft::lora_linear`` / ``npu_ft::nf4_linear`` (class patch, any model).
* :func:`apply_npu_ft_to_qwen2` / :func:`apply_npu_ft_to_qwen3` / :func:`apply_npu_ft_to_model` --
  the same for one model instance, checking its type, optionally quantizing its base linears to
  npu-ft NF4 (QLoRA) and converting bitsandbytes 4-bit layers.
* :func:`apply_npu_ft_to_llamafactory` -- the PEFT patch plus LLaMA-Factory's quantization and
  adapter hooks, so that ``quantization_bit: 4`` uses npu-ft NF4 instead of bitsandbytes.

How users switch it on: ``npu-ft lf-train CONFIG.yaml`` or ``NPU_FT_LLAMAFACTORY=1 llamafactory-cli
train CONFIG.yaml`` after ``npu-ft lf-train --install-hook`` (see docs/llamafactory.md).
"""

from __future__ import annotations

from torch import nn

from .lf_patch import (
    ENV_COUNTERS,
    ENV_ENABLE,
    ENV_FALLBACK,
    SUPPORTED_LF_VERSIONS,
    SUPPORTED_MODEL_TYPES,
    NpuFtLlamaFactoryError,
    apply_npu_ft_to_llamafactory,
    check_llamafactory,
    counters,
    write_counters,
)
from .peft_patch import STATS, apply_npu_ft_to_peft, is_peft_patched, revert_npu_ft_peft
from .qlora import convert_bnb_4bit_layers, quantize_base_layers

__version__ = "0.1.0"

__all__ = [
    "ENV_COUNTERS", "ENV_ENABLE", "ENV_FALLBACK", "STATS", "SUPPORTED_LF_VERSIONS", "SUPPORTED_MODEL_TYPES",
    "NpuFtLlamaFactoryError", "apply_npu_ft_to_llamafactory", "apply_npu_ft_to_model", "apply_npu_ft_to_peft",
    "apply_npu_ft_to_qwen2", "apply_npu_ft_to_qwen3", "check_llamafactory", "convert_bnb_4bit_layers", "counters",
    "is_peft_patched", "quantize_base_layers", "revert_npu_ft_peft", "write_counters",
]


def _model_type(model: nn.Module):
    for m in (model, getattr(model, "base_model", None), getattr(getattr(model, "base_model", None), "model", None)):
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "model_type", None):
            return cfg.model_type
    return None


def apply_npu_ft_to_model(model: nn.Module, quantize_nf4: bool = False, double_quant: bool = True,
                          compute_dtype=None, model_types=SUPPORTED_MODEL_TYPES) -> dict:
    """Make ``model`` (a PEFT LoRA model, or one PEFT will wrap later) compute with npu-ft's ops.

    Patches PEFT's LoRA layer classes, then (``quantize_nf4``) replaces the dense base linears by
    npu-ft NF4 layers, and converts any bitsandbytes 4-bit layer. Raises
    :class:`NpuFtLlamaFactoryError` for a model type outside ``model_types``.
    Returns ``{"model_type", "peft_classes", "nf4_layers", "bnb_layers_converted"}``.
    """
    mt = _model_type(model)
    if model_types is not None and mt not in model_types:
        raise NpuFtLlamaFactoryError(f"npu-ft LLaMA-Factory plugin: model type {mt!r} is not supported "
                                     f"(supported: {', '.join(model_types)})")
    classes = apply_npu_ft_to_peft()
    nf4 = quantize_base_layers(model, double_quant=double_quant, compute_dtype=compute_dtype) if quantize_nf4 else []
    converted = convert_bnb_4bit_layers(model)
    return {"model_type": mt, "peft_classes": classes, "nf4_layers": nf4, "bnb_layers_converted": converted}


def apply_npu_ft_to_qwen2(model: nn.Module, **kwargs) -> dict:
    """:func:`apply_npu_ft_to_model` for a Qwen2 / Qwen2.5 model (raises for any other type)."""
    return apply_npu_ft_to_model(model, model_types=("qwen2",), **kwargs)


def apply_npu_ft_to_qwen3(model: nn.Module, **kwargs) -> dict:
    """:func:`apply_npu_ft_to_model` for a Qwen3 model (raises for any other type)."""
    return apply_npu_ft_to_model(model, model_types=("qwen3",), **kwargs)
