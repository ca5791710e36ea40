"""The model a run trains: tokenizer and model from the local folder, the method applied (LoRA,
QLoRA, full), then the training features the recipe asks for (fused loss, LongLoRA shifted
attention, gradient checkpointing policy). Used by :func:`npu_ft.train.run.run_sft`."""

from __future__ import annotations

import logging
from typing import Any

import torch

__all__ = ["SetupError", "enable_fused_loss", "load_run_tokenizer", "prepare_model"]

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
    from npu_ft.modules.inject import apply_lora, apply_qlora

    lora_kwargs = dict(r=int(cfg.lora_rank), alpha=cfg.lora_alpha, dropout=float(cfg.lora_dropout),
                       use_rslora=bool(cfg.use_rslora), additional_target=cfg.additional_target)
    if cfg.method == "lora":
        apply_lora(model, cfg.lora_target, **lora_kwargs)
    elif cfg.method == "qlora":
        model = model.to(device)  # quantize where we train (same NF4 codes on any device)
        apply_qlora(model, cfg.lora_target, double_quant=bool(cfg.double_quantization), compute_dtype=dtype,
                    **lora_kwargs)
    else:  # full: LLaMA-Factory trains fp32 master weights
        model.requires_grad_(True)
        for param in model.parameters():
            if param.dtype != torch.float32:
                param.data = param.data.to(torch.float32)
    return model


def prepare_model(cfg: Any, device: torch.device, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load the model, apply the method (LoRA, QLoRA with an NF4 base, or full fine-tuning) and the
    training features; the model ends on ``device`` in training mode."""
    from npu_ft.model.loading import compute_dtype as _compute_dtype
    from npu_ft.model.loading import load_model

    dtype = compute_dtype or _compute_dtype(cfg)
    model = load_model(cfg, device=None, dtype=dtype)
    try:
        model = _apply_method(cfg, model, device, dtype)
    except ValueError as exc:
        key = next((k for k in ("lora_rank", "lora_target", "additional_target") if str(exc).startswith(k)),
                   "finetuning_type")
        raise SetupError(f"{cfg.source}: key '{key}': {exc}") from exc
    model = model.to(device)
    model.config.use_cache = False
    if cfg.shift_attn:
        from npu_ft.modules.shift_attn import enable_shift_attn

        try:
            enable_shift_attn(model)
        except ValueError as exc:
            raise SetupError(f"{cfg.where('shift_attn')}: key 'shift_attn': {exc}") from None
        logger.info("shift_attn: LongLoRA shifted sparse attention in training (groups of 1/4 of the sequence)")
    if cfg.gradient_checkpointing_enabled:
        from npu_ft.modules.checkpointing import enable_gradient_checkpointing

        use_reentrant = bool(cfg.use_reentrant_gc)
        policy = cfg.gradient_checkpointing_policy
        enable_gradient_checkpointing(model, policy, use_reentrant,
                                      input_require_grads=cfg.method != "full" or use_reentrant)
        logger.info("gradient checkpointing: policy %s", policy)
    return model


def enable_fused_loss(cfg: Any, model: torch.nn.Module) -> bool:
    """``fused_cross_entropy: true`` (the default): patch the model's forward so its training loss is
    the chunked fused linear + cross-entropy (:mod:`npu_ft.modules.fused_loss`). Returns whether the
    model now uses it; what happened is logged once (here or by the patch)."""
    if not bool(cfg.fused_cross_entropy):
        logger.info("fused_cross_entropy: false -> transformers' loss (full [tokens, vocab] logits)")
        return False
    from npu_ft.modules.fused_loss import enable_fused_cross_entropy

    return enable_fused_cross_entropy(model)
