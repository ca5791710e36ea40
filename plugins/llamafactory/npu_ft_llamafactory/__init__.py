"""npu-ft for LLaMA-Factory: make ``llamafactory-cli train`` run its LoRA / QLoRA on npu-ft's ops.

Liger-Kernel style entry points, with explicit keyword arguments (each patches a class or a model;
none forks LLaMA-Factory, none reads environment variables):

* :func:`apply_npu_ft_to_peft` -- PEFT's LoRA ``Linear`` (+ bitsandbytes ``Linear4bit``) forward runs
  ``npu_ft::lora_linear`` / ``npu_ft::nf4_linear`` (class patch, any model).
* :func:`apply_npu_ft_to_qwen2` / :func:`apply_npu_ft_to_qwen3` / :func:`apply_npu_ft_to_model` --
  the same for one model instance, checking its type, optionally quantizing its base linears to
  npu-ft NF4 (QLoRA) and converting bitsandbytes 4-bit layers.
* :func:`apply_npu_ft_to_llamafactory` ``(fallback=False, fused_loss=True, fused_kernels=True,
  checkpoint_policy="full", counters_path=None)`` -- the PEFT patch plus LLaMA-Factory's quantization,
  adapter and checkpointing hooks, so that ``quantization_bit: 4`` uses npu-ft NF4 instead of
  bitsandbytes and the trained model's decoder blocks run npu-ft's fused RMSNorm / RoPE / SwiGLU.

How users switch it on: ``npu-ft lf-train CONFIG.yaml`` or ``NPU_FT_LLAMAFACTORY=1 llamafactory-cli
train CONFIG.yaml`` after ``npu-ft lf-train --install-hook``; those two read the options from
``NPU_FT_LF_*`` variables (:mod:`.options`; see docs/llamafactory.md). Importing this package is
cheap: the submodules (torch, PEFT) load on first use of a name.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    "ENV_CHECKPOINT_POLICY": "options", "ENV_COUNTERS": "options", "ENV_ENABLE": "options",
    "ENV_FALLBACK": "options", "ENV_FUSED_KERNELS": "options", "ENV_FUSED_LOSS": "options",
    "NpuFtLlamaFactoryError": "options",
    "PluginOptions": "options", "options_from_env": "options",
    "SUPPORTED_LF_VERSIONS": "lf_patch", "SUPPORTED_MODEL_TYPES": "lf_patch",
    "apply_npu_ft_to_llamafactory": "lf_patch", "check_llamafactory": "lf_patch", "counters": "lf_patch",
    "write_counters": "lf_patch",
    "STATS": "peft_patch", "apply_npu_ft_to_peft": "peft_patch", "is_peft_patched": "peft_patch",
    "revert_npu_ft_peft": "peft_patch",
    "convert_bnb_4bit_layers": "qlora", "quantize_base_layers": "qlora",
    "apply_npu_ft_to_model": "model_patch", "apply_npu_ft_to_qwen2": "model_patch",
    "apply_npu_ft_to_qwen3": "model_patch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
