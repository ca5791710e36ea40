"""The builders behind the ``npu-ft`` and ``reference`` implementations: plain LoRA, QLoRA and full
fine-tuning from :mod:`npu_ft.bench.impls`, the rest of the LoRA family (a case's ``adapter``:
dora, pissa, lora_fa, vera) from :mod:`npu_ft.bench.impls_methods`."""

from __future__ import annotations

import torch

from . import impls, impls_methods

__all__ = ["npu_ft_lane", "reference_lane"]


def _lane(case, base_model_factory, device: torch.device, plain, which: int) -> impls.Prepared:
    """``plain`` (an :mod:`~npu_ft.bench.impls` builder) for plain LoRA / QLoRA / full, else the
    ``which`` side (0 npu-ft, 1 reference) of ``impls_methods.BUILDERS[case.adapter]``."""
    adapter = getattr(case, "adapter", "lora")
    build = plain if adapter == "lora" else impls_methods.BUILDERS[adapter][which]
    return build(case, base_model_factory, device)


def npu_ft_lane(case, base_model_factory, device: torch.device) -> impls.Prepared:
    """npu-ft's modules for ``case.method`` and ``case.adapter``."""
    return _lane(case, base_model_factory, device, impls.build_npu_ft, 0)


def reference_lane(case, base_model_factory, device: torch.device) -> impls.Prepared:
    """transformers + PEFT (+ bitsandbytes) for ``case.method`` and ``case.adapter``."""
    return _lane(case, base_model_factory, device, impls.build_reference, 1)
