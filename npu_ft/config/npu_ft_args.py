"""npu-ft's own keys (not in LLaMA-Factory): the device and npu-ft's training features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .schema import config_field

__all__ = ["CHECKPOINT_POLICIES", "NpuFtArguments"]

#: gradient-checkpointing policies (npu_ft.modules.checkpointing.POLICIES, plus "auto", which the run
#: resolves to one of them with npu_ft.launch.budget.choose_checkpoint_policy; kept here so that
#: reading a config never imports torch; a test pins the two together)
CHECKPOINT_POLICIES = ("full", "selective", "auto")


@dataclass
class NpuFtArguments:
    """Keys LLaMA-Factory does not have."""

    GROUP = "npu_ft"

    device: Literal["auto", "cpu", "cuda", "npu"] = config_field(
        "auto", "npu-ft: device kind: auto (npu > cuda > cpu, or $NPU_FT_DEVICE), cpu, cuda, npu.", own=True)
    fused_cross_entropy: bool = config_field(
        True, "npu-ft: compute the loss with the chunked fused linear + cross-entropy: only the positions with "
              "a label go through the output head, in chunks, so the [tokens, vocab] fp32 logits, log-softmax "
              "and their gradient are never materialised (same loss and gradients). Qwen2/Qwen3 with a plain "
              "lm_head; otherwise (or false) transformers' loss.", own=True)
    gradient_checkpointing_policy: Literal["full", "selective", "auto"] = config_field(
        "full", "npu-ft: what a checkpointed decoder layer keeps for its backward pass. full (transformers' "
                "behaviour): only its inputs, and its whole forward is rerun. selective: also the outputs of its "
                "GEMMs and attention, so only norms, RoPE and activations are rerun (LoRA on Qwen2.5-0.5B: ~1.3x "
                "faster steps; +53 KiB per token per layer in fp32 for that shape; same numerics). Needs "
                "non-reentrant checkpointing, which it then uses whatever use_reentrant_gc says. auto: selective "
                "when the memory estimate with the kept GEMM outputs fits 90 % of the device, else full; the "
                "choice and its reason are logged (docs/recipes.md).", own=True)
    fused_kernels: bool = config_field(
        True, "npu-ft: run the decoder blocks of Qwen2/Qwen3 (and Llama/Mistral) models on npu-ft's fused ops: "
              "RMSNorm (with the residual add before it), RoPE on q and k in one call, SwiGLU; native CPU kernels, "
              "Triton on CUDA, torch_npu's npu_rms_norm / npu_rotary_mul / npu_swiglu on Ascend. Same loss and "
              "gradients (fp32: 1e-5 relative), less kept for backward, fewer passes over memory. false: "
              "transformers' modules. Ignored with enable_liger_kernel: true.", own=True)
    cpu_malloc_tuning: bool = config_field(
        True, "npu-ft: on CPU (glibc), raise malloc's mmap/trim thresholds before training so the large "
              "per-step buffers (embedding/head gradients, activations) are reused instead of being "
              "page-faulted in and zeroed again every step (~1.5x faster steps on small models; same peak). "
              "No effect on other devices or C libraries.", own=True)
