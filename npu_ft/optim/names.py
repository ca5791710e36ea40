"""transformers' ``optim`` names that npu-ft serves with its own optimizers, on every device.

``adamw_8bit`` (alias ``adamw_bnb_8bit``), ``paged_adamw_8bit`` and ``paged_adamw_32bit`` map to
:mod:`npu_ft.optim.adamw8bit` classes with the keyword arguments transformers' Trainer would give
bitsandbytes (``optim_bits``, paging). Like the Trainer, :func:`create_optimizer` keeps 32-bit
states for every ``nn.Embedding`` weight of ``model`` when states are 8-bit (turn that off with
``embedding_fp32_states=False``). Other names are not npu-ft's: the trainer builds them as
transformers does (:func:`is_npu_ft_optim` tells which).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .adamw8bit import AdamW8bit, PagedAdamW8bit, PagedAdamW32bit

log = logging.getLogger(__name__)

__all__ = ["NPU_FT_OPTIMS", "create_optimizer", "is_npu_ft_optim", "resolve_optim", "trainer_optimizer"]

#: transformers ``optim`` name -> (optimizer class, the keyword arguments the Trainer adds)
NPU_FT_OPTIMS: dict[str, tuple[type[AdamW8bit], dict[str, Any]]] = {
    "adamw_8bit": (AdamW8bit, {}),
    "adamw_bnb_8bit": (AdamW8bit, {}),
    "paged_adamw_8bit": (PagedAdamW8bit, {}),
    "paged_adamw_32bit": (PagedAdamW32bit, {}),
}


def _key(name: Any) -> str:
    """``"adamw_8bit"`` for the string or for transformers' ``OptimizerNames.ADAMW_8BIT`` (whose str()
    is the member's name, not its value)."""
    return str(getattr(name, "value", name)).strip().lower()


def is_npu_ft_optim(name: Any) -> bool:
    """Whether ``name`` (transformers' ``optim`` value, a string or ``OptimizerNames``) is built by
    :func:`create_optimizer`."""
    return _key(name) in NPU_FT_OPTIMS


def resolve_optim(name: Any) -> tuple[type[AdamW8bit], dict[str, Any]]:
    """``(class, kwargs)`` for ``name``; ValueError naming the ``optim`` key otherwise."""
    key = _key(name)
    if key not in NPU_FT_OPTIMS:
        raise ValueError(f"optim: {name!r} is not an npu-ft optimizer (expected one of {', '.join(NPU_FT_OPTIMS)})")
    cls, kwargs = NPU_FT_OPTIMS[key]
    return cls, dict(kwargs)


def _embedding_weights(model: nn.Module) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            for p in module.parameters(recurse=False):
                seen[id(p)] = p
    return list(seen.values())


def trainer_optimizer(name: str, args: Any, model: nn.Module | None = None,
                      embedding_fp32_states: bool = True) -> tuple[type[AdamW8bit], dict[str, Any]]:
    """``(class, kwargs)`` for ``transformers.Trainer(optimizer_cls_and_kwargs=...)``.

    ``args``: the ``TrainingArguments`` (learning_rate, adam_beta1/2, adam_epsilon, weight_decay, as
    the Trainer passes them to bitsandbytes); the Trainer adds its decay / no-decay groups.
    ``model``: its ``nn.Embedding`` weights keep float32 moments (see :func:`create_optimizer`).
    """
    cls, kwargs = resolve_optim(name)
    kwargs.update(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                  weight_decay=args.weight_decay)
    if model is not None and embedding_fp32_states:
        kwargs["fp32_state_params"] = _embedding_weights(model)
    return cls, kwargs


def create_optimizer(name: str, params: Iterable, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                     eps: float = 1e-8, weight_decay: float = 0.0, model: nn.Module | None = None,
                     embedding_fp32_states: bool = True, min_8bit_size: int = 4096) -> AdamW8bit:
    """The npu-ft optimizer for transformers' ``optim`` name ``name``.

    ``params``: parameters or parameter groups (e.g. the Trainer's decay / no-decay groups).
    ``model``: when given and ``embedding_fp32_states``, its ``nn.Embedding`` weights keep float32
    moments, as transformers' Trainer arranges for bitsandbytes' 8-bit optimizers.
    """
    cls, kwargs = resolve_optim(name)
    fp32 = _embedding_weights(model) if (model is not None and embedding_fp32_states) else []
    optimizer = cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size,
                    fp32_state_params=fp32, **kwargs)
    if fp32 and optimizer.optim_bits == 8:
        kept = sum(p.numel() for p in fp32)
        log.info("%s: embedding weights keep 32-bit optimizer states (%.1fM elements), as transformers does",
                 name, kept / 1e6)
    return optimizer
