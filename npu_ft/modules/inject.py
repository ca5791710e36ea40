"""Putting LoRA / QLoRA into a transformers model, by module names, the way LLaMA-Factory + PEFT do.

* :func:`find_target_linear_names` -- ``lora_target`` -> the module-name suffixes to adapt
  (``"all"`` = every linear layer except the output head, as LLaMA-Factory's
  ``find_all_linear_modules``).
* :func:`apply_lora` -- replace each matching ``nn.Linear`` with :class:`~npu_ft.modules.LoraLinear`
  (:class:`~npu_ft.modules.dora.DoraLinear` with ``use_dora``; PiSSA init and LoRA-FA as options),
  freeze everything else, make ``additional_target`` modules trainable (PEFT ``modules_to_save``).
* :func:`apply_adapter_method` -- a recipe's method (lora / qlora / vera and their variants) on a
  loaded model: what ``run_sft`` calls.
* :func:`apply_qlora` -- quantize the linear layers to :class:`~npu_ft.modules.Nf4Linear` (every one
  but the output head, as bitsandbytes 4-bit loading does), then :func:`apply_lora`.
* :func:`merge_adapter` -- fold the adapters back: a plain transformers model with ``nn.Linear``
  layers (NF4 bases dequantized).

Name matching follows PEFT exactly, so an adapter saved by npu-ft and loaded by PEFT adapts the same
modules: a LoRA target ``t`` matches a module named ``t`` or ending in ``".t"``; a
``modules_to_save`` entry ``m`` matches every module whose name ends with ``m`` (no dot needed:
``"norm"`` also matches ``input_layernorm``), and such modules are never LoRA targets.

The model remembers what was applied in ``model.npu_ft_lora`` (a :class:`LoraSpec`), which
:mod:`npu_ft.train.adapter_io` uses to write PEFT's ``adapter_config.json``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import nn

from .dora import DoraLinear
from .lora import LoraLinear
from .nf4 import Nf4Linear
from .vera import PROJECTIONS_ATTR, VeraLinear, VeraProjections, VeraSpec

__all__ = [
    "LoraSpec",
    "apply_adapter_method",
    "apply_lora",
    "apply_qlora",
    "apply_vera",
    "check_rank",
    "find_target_linear_names",
    "get_lora_spec",
    "lora_modules",
    "merge_adapter",
    "modules_to_save",
    "output_head_modules",
    "output_head_names",
    "quantize_base",
    "quantize_linears",
    "set_submodule",
]

SPEC_ATTR = "npu_ft_lora"
_LINEAR_TYPES = (nn.Linear, Nf4Linear)


@dataclass
class LoraSpec:
    """What :func:`apply_lora` did (PEFT ``LoraConfig`` field names)."""

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    target_modules: list[str]
    modules_to_save: list[str] | None = None
    quantized: bool = False
    #: full module names that were wrapped (LoRA) / made trainable (modules_to_save)
    lora_module_names: list[str] = field(default_factory=list)
    saved_module_names: list[str] = field(default_factory=list)
    use_dora: bool = False
    #: LoRA-FA: lora_A frozen after its initialization
    lora_fa: bool = False
    #: PEFT's init_lora_weights: True, or "pissa" / "pissa_niter_N"
    init_lora_weights: bool | str = True

    def to_dict(self) -> dict:
        return asdict(self)


def get_lora_spec(model: nn.Module) -> LoraSpec | VeraSpec | None:
    """What adapters the model carries: a :class:`LoraSpec`, a :class:`~npu_ft.modules.vera.VeraSpec`, or None."""
    return getattr(model, SPEC_ATTR, None)


def _split(names: str | Iterable[str] | None) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str):
        names = names.split(",")
    out = [n.strip() for n in names if n and n.strip()]
    return out or None


def output_head_modules(model: nn.Module) -> list[nn.Module]:
    """The output projection (``lm_head``) of ``model``, looking through PEFT wrappers
    (``PeftModel.base_model.model``): the head, and the layer it wraps (``base_layer``) if an adapter
    wraps it. Empty when no level has ``get_output_embeddings``."""
    heads: list[nn.Module] = []
    base = getattr(model, "base_model", None)
    for level in (model, base, getattr(base, "model", None)):
        getter = getattr(level, "get_output_embeddings", None)
        if not callable(getter):
            continue
        try:
            head = getter()
        except NotImplementedError:  # some wrappers declare it without implementing it
            head = None
        for module in (head, getattr(head, "base_layer", None)):
            if isinstance(module, nn.Module) and not any(module is h for h in heads):
                heads.append(module)
    return heads


def output_head_names(model: nn.Module) -> set[str]:
    """Full names of the output projection (``lm_head``), which "all" never targets."""
    names = {"lm_head"}
    head = cast(Any, model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        names.update(name for name, module in model.named_modules() if module is head)
    return names


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, _LINEAR_TYPES) and not isinstance(module, (LoraLinear, VeraLinear))


def _matches_target(name: str, targets: Sequence[str]) -> bool:
    """PEFT's target_modules rule: the full name, or a ``.``-separated suffix."""
    return name in targets or any(name.endswith("." + t) for t in targets)


def _excluded_by_modules_to_save(name: str, saved: Sequence[str] | None) -> bool:
    """PEFT never puts LoRA on a module (or inside a module) that modules_to_save names."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in saved or ())


def find_target_linear_names(model: nn.Module, lora_target: str | Sequence[str] = "all") -> list[str]:
    """Module-name suffixes that LoRA will adapt.

    ``"all"`` (or ``["all"]``): the last name component of every linear layer except the output
    head, sorted (Qwen2: ``down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj``).
    Otherwise the given names (comma string or list), each of which must match at least one linear
    layer, else ``ValueError`` listing the names that exist.
    """
    targets = _split(lora_target) or ["all"]
    heads = output_head_names(model)
    linear_names = [name for name, module in model.named_modules() if _is_linear(module) and name]
    if targets == ["all"]:
        found = {name.split(".")[-1] for name in linear_names if name not in heads}
        if not found:
            raise ValueError("lora_target: 'all' found no linear layers besides the output head")
        return sorted(found)
    if "all" in targets:
        raise ValueError("lora_target: 'all' cannot be combined with other module names")
    missing = [t for t in targets if not any(_matches_target(name, [t]) for name in linear_names)]
    if missing:
        available = sorted({name.split(".")[-1] for name in linear_names})
        raise ValueError(f"lora_target: no linear layer named {', '.join(repr(m) for m in missing)} in "
                         f"{type(model).__name__}; linear layers here: {', '.join(available)}")
    return targets


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of ``model``'s submodule ``name`` (a full dotted name, e.g.
    ``model.layers.0.mlp.up_proj``)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


_set_submodule = set_submodule  # the name this module's own functions use


def _modules_to_save_names(model: nn.Module, additional_target: Sequence[str] | None) -> list[str]:
    """Full names PEFT would wrap in ModulesToSaveWrapper: names ending with an entry (outermost only)."""
    if not additional_target:
        return []
    chosen: list[str] = []
    for name, _ in model.named_modules():
        if not name or not any(name.endswith(t) for t in additional_target):
            continue
        if any(name.startswith(c + ".") for c in chosen):
            continue
        chosen.append(name)
    missing = [t for t in additional_target if not any(n.endswith(t) for n in chosen)]
    if missing:
        raise ValueError(f"additional_target: no module named {', '.join(repr(m) for m in missing)} in "
                         f"{type(model).__name__}")
    return chosen


def check_rank(model: nn.Module, target_names: Sequence[str], r: int,
               additional_target: Sequence[str] | None = None) -> None:
    """Raise ``ValueError`` (starting with "lora_rank") naming the first targeted layer whose smaller
    side is below ``r``: such an adapter has more parameters than the update it can express."""
    for name, module in model.named_modules():
        if not name or not _is_linear(module) or not _matches_target(name, target_names):
            continue
        if _excluded_by_modules_to_save(name, additional_target):
            continue
        out_f, in_f = int(module.out_features), int(module.in_features)
        if r > min(out_f, in_f):
            raise ValueError(f"lora_rank {r} is larger than the smaller side of layer '{name}' (weight {out_f} x "
                             f"{in_f}, rank at most {min(out_f, in_f)}): lower lora_rank or leave that layer out of "
                             "lora_target")


def apply_lora(model: nn.Module, targets: str | Sequence[str] = "all", r: int = 8, alpha: float | None = None,
               dropout: float = 0.0, use_rslora: bool = False,
               additional_target: str | Sequence[str] | None = None,
               upcast_trainable: bool = True, use_dora: bool = False, lora_fa: bool = False,
               init_lora_weights: bool | str = True) -> nn.Module:
    """Wrap target linear layers in :class:`LoraLinear` (in place); returns ``model``.

    ``use_dora``: :class:`DoraLinear` instead (PEFT ``use_dora``). ``lora_fa``: lora_A is frozen
    after its initialization (LoRA-FA). ``init_lora_weights``: True, or ``"pissa"`` /
    ``"pissa_niter_N"`` (PiSSA; the base weights become the residuals; dense bases only).

    Every parameter is frozen except the LoRA A/B weights and the ``additional_target`` modules,
    which are replaced by trainable copies (PEFT ``modules_to_save``: the copy is what is trained
    and saved, so weights tied to the original, e.g. ``lm_head`` to ``embed_tokens``, stay as they
    were). ``alpha`` None means 2 x r (LLaMA-Factory). ``upcast_trainable`` keeps the trainable
    parameters in fp32 as LLaMA-Factory does for a bf16/fp16 model.
    """
    if get_lora_spec(model) is not None:
        raise ValueError("this model already has LoRA adapters (apply_lora was called before)")
    alpha = 2 * r if alpha is None else alpha
    saved = _split(additional_target)
    target_names = find_target_linear_names(model, targets)
    saved_full = _modules_to_save_names(model, saved)
    check_rank(model, target_names, r, saved)

    model.requires_grad_(False)
    quantized = False
    wrapped: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or not _is_linear(module) or not _matches_target(name, target_names):
            continue
        if _excluded_by_modules_to_save(name, saved):
            continue
        quantized |= isinstance(module, Nf4Linear)
        layer_cls = DoraLinear if use_dora else LoraLinear
        _set_submodule(model, name, layer_cls(module, r=r, lora_alpha=alpha, lora_dropout=dropout,
                                              use_rslora=use_rslora, init_lora_weights=init_lora_weights,
                                              lora_fa=lora_fa))
        wrapped.append(name)
    if not wrapped:
        raise ValueError(f"lora_target {target_names} matched no linear layer")

    _train_modules_to_save(model, saved_full)

    if upcast_trainable:
        _upcast_trainable(model)

    spec = LoraSpec(r=r, lora_alpha=alpha, lora_dropout=float(dropout), use_rslora=bool(use_rslora),
                    target_modules=list(target_names), modules_to_save=saved, quantized=quantized,
                    lora_module_names=wrapped, saved_module_names=saved_full, use_dora=bool(use_dora),
                    lora_fa=bool(lora_fa), init_lora_weights=init_lora_weights)
    object.__setattr__(model, SPEC_ATTR, spec)  # a plain attribute, not a submodule/buffer
    return model


def _train_modules_to_save(model: nn.Module, saved_full: Sequence[str]) -> None:
    """Replace each ``additional_target`` module by a trainable copy (PEFT ``modules_to_save``)."""
    for name in saved_full:
        original = model.get_submodule(name)
        if any(isinstance(m, Nf4Linear) for m in original.modules()):
            raise ValueError(f"additional_target '{name}' is quantized; it cannot be trained")
        trainable = copy.deepcopy(original)
        trainable.requires_grad_(True)
        _set_submodule(model, name, trainable)


def _upcast_trainable(model: nn.Module) -> None:
    """Trainable parameters in fp32 (LLaMA-Factory's rule for a bf16/fp16 model); LoRA-FA's frozen
    lora_A follows its lora_B (PEFT keeps a frozen adapter in the adapters' dtype too)."""
    for module in model.modules():
        if isinstance(module, LoraLinear) and module.lora_fa and module.lora_B.weight.dtype != torch.float32:
            module.lora_A.weight.data = module.lora_A.weight.data.to(torch.float32)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)


def quantize_linears(model: nn.Module, skip: Iterable[str] = (), blocksize: int = 64, double_quant: bool = True,
                     compute_dtype: torch.dtype | None = None) -> list[str]:
    """Replace every ``nn.Linear`` except the output head and ``skip`` (full names, or modules inside
    them) with :class:`Nf4Linear`, one at a time (peak memory: one dense layer). Returns the names."""
    skip = set(skip) | output_head_names(model)
    done = []
    for name, module in list(model.named_modules()):
        if not name or type(module) is not nn.Linear:
            continue
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        dtype = compute_dtype if compute_dtype is not None else module.weight.dtype
        _set_submodule(model, name, Nf4Linear.from_linear(module, blocksize=blocksize, double_quant=double_quant,
                                                          compute_dtype=dtype))
        done.append(name)
    return done


def quantize_base(model: nn.Module, additional_target: str | Sequence[str] | None = None, blocksize: int = 64,
                  double_quant: bool = True, compute_dtype: torch.dtype | None = None) -> list[str]:
    """The NF4 base of a QLoRA-style run: every linear but the output head and the ``additional_target``
    (``modules_to_save``) modules, which train in full, quantized (:func:`quantize_linears`).
    Returns the quantized names."""
    return quantize_linears(model, skip=_modules_to_save_names(model, _split(additional_target)),
                            blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype)


def apply_qlora(model: nn.Module, targets: str | Sequence[str] = "all", r: int = 8, alpha: float | None = None,
                dropout: float = 0.0, use_rslora: bool = False,
                additional_target: str | Sequence[str] | None = None, blocksize: int = 64,
                double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                upcast_trainable: bool = True, use_dora: bool = False, lora_fa: bool = False) -> nn.Module:
    """QLoRA: quantize linear layers to NF4 (all but the output head and ``additional_target``
    modules, like bitsandbytes 4-bit loading), then :func:`apply_lora`. Quantize on the device you
    will train on, or on CPU before moving: the NF4 codes are the same either way."""
    target_names = find_target_linear_names(model, targets)  # before quantizing: same answer, early errors
    saved = _split(additional_target)
    check_rank(model, target_names, r, saved)
    quantize_base(model, saved, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype)
    return apply_lora(model, target_names, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                      additional_target=saved, upcast_trainable=upcast_trainable, use_dora=use_dora,
                      lora_fa=lora_fa)


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """``{full name: LoraLinear}`` in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def modules_to_save(model: nn.Module) -> dict[str, nn.Module]:
    """``{full name: module}`` of the additional (fully trained) modules."""
    spec = get_lora_spec(model)
    if spec is None:
        return {}
    return {name: model.get_submodule(name) for name in spec.saved_module_names}


@torch.no_grad()
def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every :class:`LoraLinear` (DoRA, VeRA too) into a plain ``nn.Linear`` and dequantize every remaining
    :class:`Nf4Linear` (in place); returns ``model``, now an ordinary transformers model that
    ``save_pretrained`` writes as a full checkpoint. ``additional_target`` modules keep their
    trained weights."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (LoraLinear, VeraLinear)):
            merged = module.merge()
            _set_submodule(model, name, merged)
    if hasattr(model, PROJECTIONS_ATTR):
        delattr(model, PROJECTIONS_ATTR)
    for name, module in list(model.named_modules()):
        if isinstance(module, Nf4Linear):
            weight = module.dequantized_weight()
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device=weight.device, dtype=weight.dtype)
            dense.weight.copy_(weight)
            if module.bias is not None:
                dense.bias.copy_(module.bias)
            _set_submodule(model, name, dense)
    if get_lora_spec(model) is not None:
        object.__delattr__(model, SPEC_ATTR)
    model.requires_grad_(True)
    return model


def apply_vera(model: nn.Module, targets: str | Sequence[str] = "all", r: int = 256, d_initial: float = 0.1,
               projection_prng_key: int = 0, save_projection: bool = True, dropout: float = 0.0,
               additional_target: str | Sequence[str] | None = None, upcast_trainable: bool = True) -> nn.Module:
    """Wrap target linear layers in :class:`VeraLinear` (in place), as ``peft.get_peft_model`` with a
    ``VeraConfig`` does; everything else is frozen but the ``additional_target`` modules (trained
    copies, PEFT ``modules_to_save``). Returns ``model``; ``model.npu_ft_lora`` is a :class:`VeraSpec`."""
    if get_lora_spec(model) is not None:
        raise ValueError("this model already has adapters (apply_lora / apply_vera was called before)")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r: must be a positive integer, got {r!r}")
    saved = _split(additional_target)
    target_names = find_target_linear_names(model, targets)
    saved_full = _modules_to_save_names(model, saved)
    chosen = [(name, module) for name, module in model.named_modules()
              if name and _is_linear(module) and _matches_target(name, target_names)
              and not _excluded_by_modules_to_save(name, saved)]
    if not chosen:
        raise ValueError(f"lora_target {target_names} matched no linear layer")
    projections = VeraProjections(r, max(m.in_features for _, m in chosen), max(m.out_features for _, m in chosen),
                                  projection_prng_key)
    first = chosen[0][1]
    projections.to(first.packed.device if isinstance(first, Nf4Linear) else first.weight.device)
    model.requires_grad_(False)
    model.add_module(PROJECTIONS_ATTR, projections)
    for name, module in chosen:
        _set_submodule(model, name, VeraLinear(module, projections, r, d_initial, dropout))
    _train_modules_to_save(model, saved_full)
    if upcast_trainable:
        _upcast_trainable(model)
    spec = VeraSpec(r=r, d_initial=float(d_initial), projection_prng_key=int(projection_prng_key),
                    save_projection=bool(save_projection), vera_dropout=float(dropout),
                    target_modules=list(target_names), modules_to_save=saved,
                    quantized=any(isinstance(m, Nf4Linear) for _, m in chosen),
                    vera_module_names=[n for n, _ in chosen], saved_module_names=saved_full)
    object.__setattr__(model, SPEC_ATTR, spec)
    return model


def _pissa_init_value(pissa_init: bool, pissa_iter: int) -> bool | str:
    """LLaMA-Factory's mapping: pissa_iter -1 -> exact SVD ("pissa"), else "pissa_niter_<iter>"."""
    if not pissa_init:
        return True
    return "pissa" if int(pissa_iter) == -1 else f"pissa_niter_{int(pissa_iter)}"


def apply_adapter_method(model: nn.Module, cfg: Any, device: torch.device | str | None = None,
                         compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Put the recipe's adapter method on a loaded model (in place); returns the model.

    ``finetuning_type: lora`` -> :func:`apply_lora` with ``use_dora``, ``lora_fa``, ``pissa_init`` /
    ``pissa_iter``, ``use_rslora``; ``quantization_bit: 4`` quantizes the linear layers to NF4 first
    (QLoRA / QDoRA; on ``device`` when given: the codes are the same on any device).
    ``finetuning_type: vera`` -> :func:`apply_vera` with the ``vera_*`` keys
    (``lora_target``, ``lora_dropout`` and ``additional_target`` as for LoRA). ``cfg`` is an
    :class:`~npu_ft.config.SftConfig` (or anything with those attributes). Bad values raise
    ``ValueError`` starting with the key's name.
    """
    def get(key: str, default: Any = None) -> Any:
        return getattr(cfg, key, default)

    method = get("finetuning_type", "lora")
    if method not in ("lora", "vera"):
        raise ValueError(f"finetuning_type: {method!r} is not an adapter method (lora or vera)")
    targets, saved = get("lora_target", "all"), _split(get("additional_target"))
    if get("quantization_bit") is not None:
        if get("quantization_bit") != 4 or str(get("quantization_type", "nf4")).lower() != "nf4":
            raise ValueError(f"quantization_type: only 4-bit nf4 is supported, got {get('quantization_bit')}-bit "
                             f"{get('quantization_type', 'nf4')}")
        find_target_linear_names(model, targets)  # before quantizing: the same answer, early errors
        if device is not None:
            model.to(device)
        quantize_base(model, saved, double_quant=bool(get("double_quantization", True)), compute_dtype=compute_dtype)
    dropout = float(get("lora_dropout", 0.0))
    if method == "vera":
        return apply_vera(model, targets, r=int(get("vera_rank", 256)), d_initial=float(get("vera_d_initial", 0.1)),
                          projection_prng_key=int(get("vera_projection_prng_key", 0)),
                          save_projection=bool(get("vera_save_projection", True)), dropout=dropout,
                          additional_target=saved)
    return apply_lora(model, targets, r=int(get("lora_rank", 8)), alpha=get("lora_alpha"), dropout=dropout,
                      use_rslora=bool(get("use_rslora", False)), additional_target=saved,
                      use_dora=bool(get("use_dora", False)), lora_fa=bool(get("lora_fa", False)),
                      init_lora_weights=_pissa_init_value(bool(get("pissa_init", False)), get("pissa_iter", 16)))
