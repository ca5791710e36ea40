"""QLoRA base layers: npu-ft NF4 instead of bitsandbytes 4-bit.

Two entry points, both model-level (they run after PEFT has wrapped the model):

* :func:`quantize_base_layers` -- on-the-fly QLoRA (LLaMA-Factory ``quantization_bit: 4``): every
  ``nn.Linear`` bitsandbytes would have quantized (all but the output head and ``skip``) becomes an
  npu-ft :class:`~npu_ft.modules.Nf4Linear`: the base of each PEFT ``lora.Linear`` is swapped in place,
  and plain linears (no LoRA target) are replaced. NF4 codes, absmax and double quantization are
  byte-identical to bitsandbytes' ``quantize_4bit`` (blocksize 64, nested blocksize 256), so the
  model computes what bitsandbytes would, on any device npu-ft supports.
* :func:`convert_bnb_4bit_layers` -- a model that bitsandbytes already quantized (a pre-quantized
  checkpoint, where bitsandbytes imports): each ``bnb.nn.Linear4bit`` becomes an ``Nf4Linear`` holding
  the same bytes (read through ``Nf4QuantState.from_bnb_dict``), under PEFT ``lora.Linear4bit`` too.

Neither touches parameter names of LoRA adapters, so PEFT's adapter files stay the same.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from npu_ft.modules.inject import output_head_modules, set_submodule
from npu_ft.modules.nf4 import Nf4Linear

__all__ = ["convert_bnb_4bit_layers", "is_bnb_linear4bit", "nf4_from_bnb_linear4bit", "quantize_base_layers"]


def _in_modules_to_save(name: str, model: nn.Module) -> bool:
    # PEFT's ModulesToSaveWrapper keeps "original_module" and "modules_to_save.<adapter>" copies
    return ".original_module" in name or ".modules_to_save." in name


@torch.no_grad()
def quantize_base_layers(model: nn.Module, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                         blocksize: int = 64, skip: Iterable[str] = ("lm_head",),
                         device: torch.device | str | None = None) -> list[str]:
    """Quantize every dense base linear layer of ``model`` (a PEFT model or a plain one) to NF4.

    ``skip``: module-name suffixes left dense (bitsandbytes' ``llm_int8_skip_modules``; the output
    head is always skipped, as transformers does). ``compute_dtype``: the NF4 layers' compute dtype
    (default: each weight's dtype). ``device``: where to quantize (default: where the weight is);
    the packed codes stay there. Returns the full names of the quantized layers.
    Peak extra memory: one dense layer.
    """
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        BaseTunerLayer = ()  # type: ignore[assignment]
    skip = tuple(skip)
    heads = {id(m) for m in output_head_modules(model)}
    modules = list(model.named_modules())
    tuners = [n for n, m in modules if n and BaseTunerLayer and isinstance(m, BaseTunerLayer)]

    def to_nf4(linear: nn.Linear) -> Nf4Linear:
        dtype = compute_dtype if compute_dtype is not None else linear.weight.dtype
        return Nf4Linear.from_linear(linear, blocksize=blocksize, double_quant=double_quant, compute_dtype=dtype,
                                     device=device)

    done = []
    for name, module in modules:
        if not name or _in_modules_to_save(name, model):
            continue
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        if name in tuners:
            base = module.get_base_layer()
            if type(base) is not nn.Linear or id(base) in heads:
                continue
            module.base_layer = to_nf4(base)
            done.append(name)
        elif type(module) is nn.Linear and id(module) not in heads:
            if any(name.startswith(t + ".") for t in tuners):
                continue  # lora_A / lora_B / the wrapped base: handled through their tuner layer
            set_submodule(model, name, to_nf4(module))
            done.append(name)
    return done


def is_bnb_linear4bit(module: nn.Module) -> bool:
    """True for ``bitsandbytes.nn.Linear4bit`` (checked without importing bitsandbytes)."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def nf4_from_bnb_linear4bit(module: nn.Module) -> nn.Module:
    """An npu-ft ``Nf4Linear`` holding exactly the bytes of a bitsandbytes NF4 ``Linear4bit``."""
    from npu_ft.ops.nf4 import Nf4QuantState

    qs = getattr(module.weight, "quant_state", None)
    if qs is None:
        raise ValueError(f"{type(module).__name__}: the weight is not quantized yet (no quant_state)")
    if getattr(qs, "quant_type", "nf4") != "nf4":
        raise ValueError(f"bitsandbytes quant_type {qs.quant_type!r}: npu-ft's 4-bit layers support 'nf4' only")
    state = Nf4QuantState.from_bnb_dict(qs.as_dict(packed=False))
    packed = module.weight.data.reshape(-1).view(torch.uint8).reshape(-1, 1)
    numel = state.numel
    packed = packed[: (numel + 1) // 2]
    bias = None if module.bias is None else module.bias.detach()
    out = Nf4Linear(packed.clone(), state, bias, compute_dtype=getattr(module, "compute_dtype", None) or state.dtype)
    out.requires_grad_(False)
    return out


def convert_bnb_4bit_layers(model: nn.Module) -> list[str]:
    """Replace every bitsandbytes ``Linear4bit`` (bare or as a PEFT base layer) with ``Nf4Linear``."""
    done = []
    for name, module in list(model.named_modules()):
        if not name:
            continue
        base = getattr(module, "base_layer", None)
        if base is not None and is_bnb_linear4bit(base) and not is_bnb_linear4bit(module):
            module.base_layer = nf4_from_bnb_linear4bit(base)
            done.append(name)
        elif is_bnb_linear4bit(module) and not name.endswith(".base_layer"):
            set_submodule(model, name, nf4_from_bnb_linear4bit(module))
            done.append(name)
    return done
