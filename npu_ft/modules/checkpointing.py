"""Gradient-checkpointing policies for the decoder layers: what a checkpointed layer keeps from its
forward pass and what it recomputes in the backward pass.

* ``full`` (transformers' and LLaMA-Factory's behaviour): a layer keeps only its inputs
  (``[batch, seq, hidden]``) and reruns its whole forward in the backward pass — every GEMM twice.
* ``selective``: PyTorch's selective activation checkpointing. A layer also keeps the *outputs* of its
  GEMMs (``npu_ft::lora_linear``, ``npu_ft::nf4_linear``, ``aten.mm/addmm``) and of its attention
  kernel; the backward pass recomputes only the cheap parts (RMSNorm, RoPE, SiLU·mul, residual adds)
  and reads the GEMM outputs back. With a frozen base (LoRA/QLoRA) that removes the frozen GEMMs
  (and QLoRA's dequantisation) from the recomputation: about a third of a step's GEMM FLOPs.

  npu-ft's fused decoder-block ops (``npu_ft::rms_norm``, ``npu_ft::rope``, ``npu_ft::swiglu``, see
  :mod:`npu_ft.modules.fused_blocks`) are always recomputed: what their backward needs is their
  inputs (GEMM outputs the policy keeps anyway, or the layer input) plus one float32 per row
  (rms_norm's 1/rms) and the shared cos/sin (rope), and rerunning them costs one pass over those
  tensors.

  Cost: per token and layer the saved floats of every linear output plus the attention output, e.g.
  Qwen2.5-0.5B (q 896 + k 128 + v 128 + o 896 + gate 4864 + up 4864 + down 896 + attention 896)
  ≈ 13.6k values = 53 KiB in fp32 per token per layer, against 3.5 KiB for ``full`` — 1.3 GiB for
  1024 tokens over 24 layers. The numerics are unchanged: the same kernels produce the same values.

The policy needs non-reentrant checkpointing (``torch.utils.checkpoint(..., use_reentrant=False)``).
An attention kernel not in :data:`_ATTENTION_OPS` (e.g. torch_npu's ``npu_fusion_attention``, or
an eager ``matmul``/``softmax`` attention) is simply recomputed: the same values, less speed-up.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

POLICIES = ("full", "selective")

#: attention kernels whose outputs ``selective`` keeps (those this torch build has)
_ATTENTION_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                  "_flash_attention_forward", "_efficient_attention_forward")


#: npu-ft ops the ``selective`` policy reruns in the backward pass (cheap, memory-bound)
RECOMPUTED_OPS = ("rms_norm", "rope", "swiglu")


def saved_ops() -> list:
    """The op overloads whose outputs the ``selective`` policy keeps for the backward pass."""
    import npu_ft.ops  # noqa: F401  (registers npu_ft::lora_linear / nf4_linear)

    ops = [torch.ops.npu_ft.lora_linear.default, torch.ops.npu_ft.nf4_linear.default,
           torch.ops.aten.mm.default, torch.ops.aten.addmm.default]
    # the LoRA family's GEMM ops (DoRA, LoRA-FA, VeRA), and DoRA's weight norm (an [out, in] x [in, r] GEMM)
    ops += [getattr(torch.ops.npu_ft, name).default for name in (
        "dora_linear", "dora_nf4_linear", "dora_weight_norm", "lora_fa_linear", "lora_fa_nf4_linear")]
    for name in _ATTENTION_OPS:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None and hasattr(packet, "default"):
            ops.append(packet.default)
    return ops


def recomputed_ops() -> list:
    """The op overloads ``selective`` always recomputes: npu-ft's fused decoder-block ops."""
    import npu_ft.ops  # noqa: F401  (registers npu_ft::rms_norm / rope / swiglu)

    return [getattr(torch.ops.npu_ft, name).default for name in RECOMPUTED_OPS]


def _selective_policy(saved: frozenset, recomputed: frozenset):
    from torch.utils.checkpoint import CheckpointPolicy

    def policy(ctx, op, *args, **kwargs):
        if op in saved:
            return CheckpointPolicy.MUST_SAVE
        if op in recomputed:
            return CheckpointPolicy.MUST_RECOMPUTE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def selective_context_fn():
    """``context_fn`` for :func:`torch.utils.checkpoint.checkpoint` implementing ``selective``."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    policy = _selective_policy(frozenset(saved_ops()), frozenset(recomputed_ops()))
    return functools.partial(create_selective_checkpoint_contexts, policy)


def checkpointing_kwargs(policy: str, use_reentrant: bool = False) -> dict[str, Any]:
    """``gradient_checkpointing_kwargs`` for ``model.gradient_checkpointing_enable`` under ``policy``.

    ``selective`` always checkpoints non-reentrantly (what it requires), whatever ``use_reentrant``."""
    if policy not in POLICIES:
        raise ValueError(f"unknown gradient checkpointing policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if policy == "full":
        return {"use_reentrant": bool(use_reentrant)}
    return {"use_reentrant": False, "context_fn": selective_context_fn()}


def enable_gradient_checkpointing(model: torch.nn.Module, policy: str = "full", use_reentrant: bool = False,
                                  input_require_grads: bool = True) -> None:
    """Checkpoint every decoder layer of a transformers ``model`` under ``policy`` (see module doc).

    ``input_require_grads``: make the embedding output require grad, which reentrant checkpointing
    needs when the embeddings are frozen (LoRA/QLoRA); harmless otherwise."""
    hf_model: Any = model  # a transformers PreTrainedModel
    hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs(policy, use_reentrant))
    if input_require_grads and hasattr(model, "enable_input_require_grads"):
        hf_model.enable_input_require_grads()
