"""The builders behind the ``npu-ft`` and ``reference`` implementations: plain LoRA, QLoRA and full
fine-tuning from :mod:`npu_ft.bench.impls`, the rest of the LoRA family (a case's ``adapter``:
dora, pissa, lora_fa, vera) from :mod:`npu_ft.bench.impls_methods`."""

from __future__ import annotations

import torch

from . import impls, impls_methods

__all__ = ["npu_ft_lane", "reference_lane"]


def npu_ft_lane(case, base_model_factory, device: torch.device) -> impls.Prepared:
    """npu-ft's modules for ``case.method`` and ``case.adapter``."""
    adapter = getattr(case, "adapter", "lora")
    if adapter == "lora":
        return impls.build_npu_ft(case, base_model_factory, device)
    return impls_methods.BUILDERS[adapter][0](case, base_model_factory, device)


def reference_lane(case, base_model_factory, device: torch.device) -> impls.Prepared:
    """transformers + PEFT (+ bitsandbytes) for ``case.method`` and ``case.adapter``."""
    adapter = getattr(case, "adapter", "lora")
    if adapter == "lora":
        return impls.build_reference(case, base_model_factory, device)
    return impls_methods.BUILDERS[adapter][1](case, base_model_factory, device)
