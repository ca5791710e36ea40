"""The model a run trains: tokenizer and model from the local folder, the method applied (the LoRA
family, VeRA, full), then the training features the recipe asks for (fused loss, fused decoder-block
kernels, LongLoRA shifted attention, gradient checkpointing policy). Used by
:func:`npu_ft.train.run.run_sft`."""

from __future__ import annotations

import logging
from typing import Any

import torch

__all__ = ["SetupError", "enable_block_kernels", "enable_fused_loss", "load_run_tokenizer", "prepare_model"]

logger = logging.getLogger("npu_ft.train")


class SetupError(ValueError):
    """The model cannot be set up as the recipe says (the message names the file and key)."""


def load_run_tokenizer(cfg: Any):
    """The model folder's tokenizer, loaded as LLaMA-Factory loads it (right padding; its
    ``split_special_tokens`` and ``padding_side`` are saved into tokenizer_config.json)."""
    from npu_ft.model.loading import load_tokenizer, resolve_model_path

    folder = resolve_model_path(cfg.model_name_or_path)
    tokenizer = load_tokenizer(folder, trust_remote_code=bool(cfg.trust_remote_code),
                               use_fast=bool(cfg.use_fast_tokenizer), padding_side="right",
                               split_special_tokens=bool(cfg.split_special_tokens))
    tokenizer.padding_side = "right"
    return tokenizer


def _apply_method(cfg: Any, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """LoRA and its family (QLoRA's NF4 base, DoRA, PiSSA, LoRA-FA, rsLoRA) or VeRA through
    :func:`npu_ft.modules.inject.apply_adapter_method`; full fine-tuning trains every weight."""
    if cfg.method != "full":
        from npu_ft.modules.inject import apply_adapter_method

        # an NF4 base is quantized where it trains (the codes are the same on any device)
        return apply_adapter_method(model, cfg, device=device, compute_dtype=dtype)
    model.requires_grad_(True)  # full: LLaMA-Factory trains fp32 master weights
    for param in model.parameters():
        if param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)
    return model


#: the recipe key a method's ValueError is about, by the first word of its message (colon dropped)
_ERROR_KEYS = {"lora_rank": "lora_rank", "lora_target": "lora_target", "additional_target": "additional_target",
               "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "vera_dropout": "lora_dropout",
               "quantization_type": "quantization_type", "init_lora_weights": "pissa_iter"}


def _method_error_key(cfg: Any, message: str) -> str:
    first = message.split(" ", 1)[0].rstrip(":")
    if first == "r":  # VeRA's shared rank, or PiSSA's rank against a weight's smallest side
        return "vera_rank" if cfg.method == "vera" else "lora_rank"
    return _ERROR_KEYS.get(first, "finetuning_type")


def prepare_model(cfg: Any, device: torch.device, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load the model, apply the method (LoRA family, VeRA, or full fine-tuning) and the training
    features (LongLoRA attention, npu-ft's fused decoder-block kernels, checkpointing policy); the
    model ends on ``device`` in training mode. On an NPU, ``flash_attn: auto|fa2`` loads transformers'
    torch_npu fused attention (:func:`npu_ft.modules.npu_attention.attention_plan`)."""
    from npu_ft.model.loading import compute_dtype as _compute_dtype
    from npu_ft.model.loading import load_model
    from npu_ft.modules.npu_attention import attention_plan

    dtype = compute_dtype or _compute_dtype(cfg)
    plan = attention_plan(cfg.flash_attn, device.type)
    extra = {"attn_implementation": plan.attn_implementation} if plan.attn_implementation else {}
    model = load_model(cfg, device=None, dtype=dtype, **extra)
    try:
        model = _apply_method(cfg, model, device, dtype)
    except ValueError as exc:
        raise SetupError(f"{cfg.source}: key '{_method_error_key(cfg, str(exc))}': {exc}") from exc
    model = model.to(device)
    model.config.use_cache = False
    model.npu_ft_attention_plan = plan  # the collator follows the same decision (train.run._collator)
    if cfg.shift_attn:
        from npu_ft.modules.shift_attn import enable_shift_attn

        try:
            enable_shift_attn(model)
        except ValueError as exc:
            raise SetupError(f"{cfg.where('shift_attn')}: key 'shift_attn': {exc}") from None
        logger.info("shift_attn: LongLoRA shifted sparse attention in training (groups of 1/4 of the sequence)")
    enable_block_kernels(cfg, model)
    if cfg.gradient_checkpointing_enabled:
        from npu_ft.modules.checkpointing import enable_gradient_checkpointing

        use_reentrant = bool(cfg.use_reentrant_gc)
        policy = cfg.gradient_checkpointing_policy
        enable_gradient_checkpointing(model, policy, use_reentrant,
                                      input_require_grads=cfg.method != "full" or use_reentrant)
        logger.info("gradient checkpointing: policy %s", policy)
    return model


def enable_block_kernels(cfg: Any, model: torch.nn.Module) -> list[str]:
    """``fused_kernels: true`` (the default): npu-ft's fused RMSNorm (+ residual add), RoPE and
    SwiGLU ops in every decoder layer; ``enable_liger_kernel: true``: Liger-Kernel's patches
    instead. Returns what was applied (logged)."""
    from npu_ft.modules.fused_blocks import LigerUnavailableError, enable_fused_kernels

    try:
        applied = enable_fused_kernels(cfg, model)
    except LigerUnavailableError as exc:
        raise SetupError(f"{cfg.where('enable_liger_kernel')}: key 'enable_liger_kernel': {exc}") from None
    if applied and applied != ["liger"]:
        logger.info("fused_kernels: %s", ", ".join(applied))
    return applied


def enable_fused_loss(cfg: Any, model: torch.nn.Module) -> bool:
    """``fused_cross_entropy: true`` (the default): patch the model's forward so its training loss is
    the chunked fused linear + cross-entropy (:mod:`npu_ft.modules.fused_loss`). Returns whether the
    model now uses it; what happened is logged once (here or by the patch)."""
    if not bool(cfg.fused_cross_entropy):
        logger.info("fused_cross_entropy: false -> transformers' loss (full [tokens, vocab] logits)")
        return False
    from npu_ft.modules.fused_loss import enable_fused_cross_entropy

    return enable_fused_cross_entropy(model)
