"""LoRA+ (``loraplus_lr_ratio``): lora_B (and every other trainable 1-D tensor: DoRA's magnitude,
trained norms and biases) learns ``ratio`` times faster than lora_A - LLaMA-Factory's
``_create_loraplus_optimizer`` / PEFT's ``create_loraplus_optimizer`` grouping::

    group          parameters                                        lr                     weight decay
    lora_a         every other trainable tensor (lora_A, 2-D extras) learning_rate          weight_decay
    lora_b         lora_B / 1-D tensors that decay                   ratio x learning_rate  weight_decay
    lora_b_nodecay lora_B / 1-D tensors that do not (biases, norms)  ratio x learning_rate  0
    embedding      lora_embedding_B                                  loraplus_lr_embedding  weight_decay

"Decay" is transformers' rule (everything but layer norms and biases). The optimizer class and its
other arguments are the ones ``optim`` selects (``Trainer.get_optimizer_cls_and_kwargs``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["create_loraplus_optimizer", "loraplus_param_groups"]


def _decay_parameter_names(model: nn.Module) -> set[str]:
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    return {n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n}


def loraplus_param_groups(model: nn.Module, learning_rate: float, weight_decay: float, loraplus_lr_ratio: float,
                          loraplus_lr_embedding: float = 1e-6) -> list[dict[str, Any]]:
    """The four optimizer parameter groups (each with ``params``, ``names``, ``lr``, ``weight_decay``)."""
    decay = _decay_parameter_names(model)
    groups: dict[str, list[tuple[str, torch.nn.Parameter]]] = {"lora_a": [], "lora_b": [], "lora_b_nodecay": [],
                                                                "embedding": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_embedding_B" in name:
            groups["embedding"].append((name, param))
        elif "lora_B" in name or param.ndim == 1:
            groups["lora_b" if name in decay else "lora_b_nodecay"].append((name, param))
        else:
            groups["lora_a"].append((name, param))
    settings = {"lora_a": (learning_rate, weight_decay), "lora_b": (learning_rate * loraplus_lr_ratio, weight_decay),
                "lora_b_nodecay": (learning_rate * loraplus_lr_ratio, 0.0),
                "embedding": (loraplus_lr_embedding, weight_decay)}
    return [{"params": [p for _, p in members], "names": [n for n, _ in members], "lr": settings[key][0],
             "weight_decay": settings[key][1]} for key, members in groups.items()]


def create_loraplus_optimizer(model: nn.Module, args: Any, loraplus_lr_ratio: float,
                              loraplus_lr_embedding: float = 1e-6,
                              optimizer_cls_and_kwargs: tuple[type, dict[str, Any]] | None = None
                              ) -> torch.optim.Optimizer:
    """The optimizer ``args.optim`` names, over :func:`loraplus_param_groups` (``args`` are
    ``transformers.TrainingArguments``); ``optimizer_cls_and_kwargs`` overrides transformers' choice
    (npu-ft's own 8-bit AdamW: :func:`npu_ft.optim.trainer_optimizer`)."""
    from transformers import Trainer

    optim_cls, optim_kwargs = optimizer_cls_and_kwargs or Trainer.get_optimizer_cls_and_kwargs(args, model)
    groups = loraplus_param_groups(model, args.learning_rate, args.weight_decay, loraplus_lr_ratio,
                                   loraplus_lr_embedding)
    for group in groups:
        group.pop("names")
    return optim_cls(groups, **optim_kwargs)
