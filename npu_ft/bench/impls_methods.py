"""Bench builders of the LoRA-family methods, npu-ft's and PEFT's (LLaMA-Factory's path), for suites.

A builder is ``fn(case, base_model_factory, device) -> impls.Prepared`` (see
:mod:`npu_ft.bench.registry`). A suite's ``adapter`` setting picks them in the ``npu-ft`` and
``reference`` lanes (:mod:`npu_ft.bench.lanes`), with ``method: lora`` (dense base) or
``method: qlora`` (NF4 base: QDoRA, QLoRA-FA, QVeRA); ``custom:npu_ft.bench.impls_methods:<fn>``
names one directly:

=============  =========================  ========================================================
method         npu-ft                     reference
=============  =========================  ========================================================
DoRA           ``npu_ft_dora``            ``peft_dora`` (``LoraConfig(use_dora=True)``)
LoRA-FA        ``npu_ft_lora_fa``         ``peft_lora_fa`` (PEFT LoRA with lora_A frozen)
PiSSA          ``npu_ft_pissa``           ``peft_pissa`` (``init_lora_weights="pissa_niter_16"``)
VeRA           ``npu_ft_vera``            ``peft_vera`` (``VeraConfig``, r = ``case.lora["vera_r"]``,
                                          default 256)
=============  =========================  ========================================================

Both sides start from the same random base weights. DoRA and LoRA-FA then get identical LoRA
weights (:func:`npu_ft.bench.impls.align_lora_init`; DoRA's magnitude is ``||W||`` either way since
B starts at zero); PiSSA and VeRA are seeded identically before injection (PiSSA's fast SVD draws
from the global RNG; VeRA's projections from its PRNG key), so their loss curves agree too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import impls

__all__ = ["BUILDERS", "npu_ft_dora", "npu_ft_lora_fa", "npu_ft_pissa", "npu_ft_vera", "peft_dora", "peft_lora_fa",
           "peft_pissa", "peft_vera"]

PISSA_INIT = "pissa_niter_16"


def _vera_r(case) -> int:
    return int(case.lora.get("vera_r", 256))


def _npu_ft(case, base_model_factory, device: torch.device, *, align: bool, **method: Any) -> impls.Prepared:
    from npu_ft.modules.fused_loss import enable_fused_cross_entropy
    from npu_ft.modules.inject import apply_lora, apply_vera, quantize_linears

    torch.manual_seed(case.seed)
    model = base_model_factory()
    if case.method == "qlora":
        quantize_linears(model, compute_dtype=impls.torch_dtype(case.dtype))
    common = dict(dropout=float(case.lora["dropout"]), additional_target=case.lora.get("additional_target") or None)
    torch.manual_seed(case.seed)
    if method.pop("vera", False):
        apply_vera(model, impls.lora_targets(case), r=_vera_r(case), **common)
    else:
        apply_lora(model, impls.lora_targets(case), r=case.lora["r"], alpha=case.lora["alpha"],
                   use_rslora=bool(case.lora.get("use_rslora", False)), **common, **method)
    model = model.to(device)
    block_features = impls.apply_block_kernels(case, model)
    if case.gradient_checkpointing:
        impls._enable_gradient_checkpointing(model, case.checkpoint_policy)
    if align:
        impls.align_lora_init(model, case.seed)
    features = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("npu_ft.")})
    features += block_features
    if case.gradient_checkpointing and case.checkpoint_policy != "full":
        features.append(f"{case.checkpoint_policy}_checkpointing")
    if enable_fused_cross_entropy(model):
        features.append("fused_cross_entropy")
    return impls.Prepared(model=model, features=features)


def _reference_base(case, base_model_factory, device: torch.device):
    """The base model as LLaMA-Factory loads it: dense, or 4-bit through ``from_pretrained`` with a
    ``BitsAndBytesConfig`` (the random weights go through a temporary folder); ``(model, cleanup)``."""
    if case.method != "qlora":
        return base_model_factory().to(device), None
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .shapes import ATTN_IMPLEMENTATION

    tmp = tempfile.mkdtemp(prefix="npu_ft_bench_")
    base = base_model_factory()
    base.save_pretrained(tmp)
    del base
    dtype = impls.torch_dtype(case.dtype)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=dtype,
                                                 device_map={"": str(device)}, attn_implementation=ATTN_IMPLEMENTATION)
    model.config.use_cache = False
    return model, lambda: shutil.rmtree(tmp, ignore_errors=True)


def _reference(case, base_model_factory, device: torch.device, config, *, align: bool,
               freeze_lora_a: bool = False) -> impls.Prepared:
    from peft import get_peft_model

    torch.manual_seed(case.seed)
    model, cleanup = _reference_base(case, base_model_factory, device)
    if case.gradient_checkpointing:
        impls._enable_gradient_checkpointing(model)
    torch.manual_seed(case.seed)
    model = get_peft_model(model, config)
    if freeze_lora_a:
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    if align:
        impls.align_lora_init(model, case.seed)
    features = ["transformers", "peft", type(config).__name__] + (["bitsandbytes-4bit"] if cleanup else [])
    return impls.Prepared(model=model, features=features, cleanup=cleanup)


def _lora_config(case, **kw):
    from peft import LoraConfig

    return LoraConfig(r=case.lora["r"], lora_alpha=case.lora["alpha"], lora_dropout=float(case.lora["dropout"]),
                      target_modules=impls.lora_targets(case), use_rslora=bool(case.lora.get("use_rslora", False)),
                      modules_to_save=case.lora.get("additional_target") or None, task_type="CAUSAL_LM", **kw)


def npu_ft_dora(case, base_model_factory, device):
    return _npu_ft(case, base_model_factory, device, align=True, use_dora=True)


def peft_dora(case, base_model_factory, device):
    return _reference(case, base_model_factory, device, _lora_config(case, use_dora=True), align=True)


def npu_ft_lora_fa(case, base_model_factory, device):
    prepared = _npu_ft(case, base_model_factory, device, align=True, lora_fa=True)
    for module in prepared.model.modules():  # align_lora_init wrote A in place: it stays frozen
        if hasattr(module, "lora_fa") and module.lora_fa:
            module.lora_A.weight.requires_grad_(False)
    return prepared


def peft_lora_fa(case, base_model_factory, device):
    return _reference(case, base_model_factory, device, _lora_config(case), align=True, freeze_lora_a=True)


def npu_ft_pissa(case, base_model_factory, device):
    return _npu_ft(case, base_model_factory, device, align=False, init_lora_weights=PISSA_INIT)


def peft_pissa(case, base_model_factory, device):
    return _reference(case, base_model_factory, device, _lora_config(case, init_lora_weights=PISSA_INIT),
                      align=False)


def npu_ft_vera(case, base_model_factory, device):
    return _npu_ft(case, base_model_factory, device, align=False, vera=True)


def peft_vera(case, base_model_factory, device):
    from peft import VeraConfig

    config = VeraConfig(r=_vera_r(case), target_modules=impls.lora_targets(case),
                        vera_dropout=float(case.lora["dropout"]),
                        modules_to_save=case.lora.get("additional_target") or None, task_type="CAUSAL_LM")
    return _reference(case, base_model_factory, device, config, align=False)


#: adapter -> (npu-ft builder, reference builder): what a case's ``adapter`` setting runs
BUILDERS: dict[str, tuple[Any, Any]] = {
    "dora": (npu_ft_dora, peft_dora),
    "lora_fa": (npu_ft_lora_fa, peft_lora_fa),
    "pissa": (npu_ft_pissa, peft_pissa),
    "vera": (npu_ft_vera, peft_vera),
}


def trainable_state_bytes(model: nn.Module) -> int:
    """Bytes of the trainable parameters plus AdamW's two fp32 moments for each (what VeRA's
    "< 5 % of LoRA r=16" is about)."""
    return sum(p.numel() * (p.element_size() + 8) for p in model.parameters() if p.requires_grad)
