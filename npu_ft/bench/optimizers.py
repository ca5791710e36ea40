"""The optimizer a bench case trains with (``case.optim``), and the bytes its states take.

=================  ==========================================  =========================================
``optim``          npu-ft lanes (and custom ones)               reference lane
=================  ==========================================  =========================================
adamw_torch        ``torch.optim.AdamW``                        the same
adamw_8bit         ``npu_ft.optim.AdamW8bit``, nn.Embedding     ``bitsandbytes.optim.AdamW8bit`` with
                   weights on 32-bit states (npu-ft train's     transformers' override of nn.Embedding
                   and transformers' rule)                      weights to 32 bits
adamw_8bit_all     every parameter of 4096+ elements in 8 bits  ``bitsandbytes.optim.AdamW8bit`` as is
=================  ==========================================  =========================================

All use betas (0.9, 0.999), eps 1e-8, no weight decay and the case's learning rate.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["build_optimizer", "state_bytes"]


def build_optimizer(case, model: nn.Module, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The optimizer of ``case`` over ``params`` (the trainable parameters of ``model``)."""
    optim = getattr(case, "optim", "adamw_torch")
    if optim == "adamw_torch":
        return torch.optim.AdamW(params, lr=case.lr, weight_decay=0.0)
    embeddings_32bit = optim == "adamw_8bit"
    if case.implementation == "reference":
        return _bitsandbytes_adamw8bit(case, model, params, embeddings_32bit)
    from npu_ft.optim import create_optimizer

    return create_optimizer("adamw_8bit", params, lr=case.lr, weight_decay=0.0, model=model,
                            embedding_fp32_states=embeddings_32bit)


def _bitsandbytes_adamw8bit(case, model: nn.Module, params: list[torch.Tensor],
                            embeddings_32bit: bool) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    optimizer = bnb.optim.AdamW8bit(params, lr=case.lr, weight_decay=0.0)
    if embeddings_32bit:  # what transformers' Trainer.create_optimizer does for bitsandbytes' optimizers
        manager = bnb.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (moments, 8-bit codes, absmax, code maps; a
    tensor shared by several parameters counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                key = (value.data_ptr(), value.nbytes)
                if key not in seen:
                    seen.add(key)
                    total += value.nbytes
    return total
