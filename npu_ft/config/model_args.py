"""Model keys of a recipe (LLaMA-Factory 0.9.5's ``ModelArguments`` that npu-ft honours)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .schema import NOT_YET, config_field, not_yet

__all__ = ["ModelArguments"]


@dataclass
class ModelArguments:
    """Where the model comes from, how it is loaded and quantized."""

    GROUP = "model"

    model_name_or_path: str | None = config_field(
        None, "Local folder with config.json + *.safetensors (npu-ft never downloads). Required.", nullable=False)
    trust_remote_code: bool = config_field(False, "Allow the model folder's own Python code.")
    cache_dir: str | None = config_field(None, "Passed to from_pretrained (local files only).")
    flash_attn: Literal["auto", "disabled", "sdpa", "fa2", "fa3"] = config_field(
        "auto", "Attention kernel: auto (transformers default), disabled (eager), sdpa, fa2, fa3.")
    disable_gradient_checkpointing: bool = config_field(
        False, "LLaMA-Factory turns gradient checkpointing on by default; true turns it off.")
    use_reentrant_gc: bool = config_field(True, "Reentrant gradient checkpointing.")
    use_fast_tokenizer: bool = config_field(True, "Use the fast (Rust) tokenizer.",
                                            unsupported_values={False: f"slow tokenizers are {NOT_YET}"})
    model_revision: str = config_field("main", "Hub revision; only 'main' (local folders).")
    low_cpu_mem_usage: bool = config_field(True, "Memory-efficient loading.")
    print_param_status: bool = config_field(False, "Print every parameter's dtype/device/grad.")
    quantization_bit: Literal[4] | None = config_field(
        None, "On-the-fly quantization of the base model for QLoRA; only 4 (NF4 like bitsandbytes).",
        unsupported_values={bits: f"{bits}-bit quantization is {NOT_YET}" for bits in (8, 2, 3, 5, 6)})
    quantization_method: Literal["bnb"] = config_field(
        "bnb", "Quantization method; npu-ft implements the bitsandbytes NF4 format itself.",
        unsupported_values=not_yet("quantization_method", "gptq", "awq", "aqlm", "quanto", "eetq", "hqq", "mxfp4",
                                   "fp8"))
    quantization_type: Literal["nf4"] = config_field("nf4", "4-bit data type.",
                                                     unsupported_values=not_yet("quantization_type", "fp4"))
    double_quantization: bool = config_field(True, "Quantize the absmax constants again (bnb nested).")
    shift_attn: bool = config_field(
        False, "LongLoRA's shifted sparse attention (S2-Attn) in training: attention inside groups of a quarter "
               "of the sequence, half of the heads shifted by half a group (Qwen2/Qwen3, eager or sdpa); "
               "evaluation, generation and export use full attention. With LongLoRA's trainable embedding and "
               "norms: additional_target: embed_tokens,norm.")
    enable_liger_kernel: bool = config_field(
        False, "LLaMA-Factory's switch for Liger-Kernel's patched modules (needs liger-kernel installed, else the "
               "recipe is refused); npu-ft's own fused kernels (fused_kernels) are then not applied.")
