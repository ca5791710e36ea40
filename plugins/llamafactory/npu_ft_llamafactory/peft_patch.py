"""Class-level patches of PEFT's LoRA linear layers (the Liger-Kernel pattern, applied to PEFT).

:func:`apply_npu_ft_to_peft` replaces ``forward`` of

* ``peft.tuners.lora.layer.Linear`` (LoRA over a dense ``nn.Linear`` -- or over an npu-ft
  :class:`~npu_ft.modules.Nf4Linear` that :mod:`.qlora` put there), and
* ``peft.tuners.lora.bnb.Linear4bit`` (LoRA over bitsandbytes 4-bit, when bitsandbytes imports)

with one call of the fused op for the common case::

    y = npu_ft::lora_linear(x, W, b, A, B, scaling, dropout(x))        dense base
    y = npu_ft::nf4_linear(x, packed, absmax.., b, A, B, scaling, dropout(x))   NF4 base
    y = npu_ft::dora_linear(x, W, b, A, B, m, ||W||^2, scaling, dropout(x))      DoRA (``use_dora``)
    y = npu_ft::dora_nf4_linear(x, packed, absmax.., b, A, B, m, ||W||^2, ...)  DoRA over NF4 (QDoRA)

DoRA layers pass PEFT's ``lora_magnitude_vector[adapter].weight`` as ``m`` and the frozen base's
squared row norms ``||W_i||^2`` (fp32 ``[out]``, computed once per base layer and kept until its
weight changes: :func:`base_weight_sq_norm`); the op's math is PEFT's (norm of ``W + s*B@A``
detached; with dropout the magnitude scales the dropped input's product and the undropped base
output is added). PiSSA needs nothing: PEFT initializes it, then the layers are plain LoRA.

The fused path is taken when the layer is in PEFT's plain single-adapter state: exactly one active
adapter, not merged, adapters enabled, no lora_bias / LoRA variant other than DoRA (aLoRA, ...), no
``adapter_names`` mixed batch, no ``fan_in_fan_out``, base layer without hooks, x in the base weight's
dtype. Anything else runs PEFT's own forward unchanged (counted as a fallback), so correctness never
depends on the patch. Parameters, names, state dicts and therefore the adapter files PEFT / LLaMA-Factory
save are untouched: only the computation changes.

Dropout: PEFT applies ``lora_dropout[a]`` to ``x`` cast to lora_A's dtype; the patch calls the same
module on the same tensor (same RNG draws) and hands the result to the op as ``x_lora``.
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "STATS",
    "apply_npu_ft_to_peft",
    "base_weight_sq_norm",
    "is_peft_patched",
    "revert_npu_ft_peft",
    "set_enabled",
    "is_enabled",
]

#: plugin counters: fused calls per op, PEFT fallbacks per reason (reset with ``STATS.clear()``)
STATS: collections.Counter = collections.Counter()

_LOCK = threading.Lock()
#: class -> its original forward, for the classes patched now
_ORIGINAL: dict[type, Callable] = {}
_ENABLED = [True]


def set_enabled(flag: bool) -> None:
    """Switch the patched forwards between the fused path (True) and PEFT's own forward (False)
    without un-patching (used for the explicit unpatched fallback)."""
    _ENABLED[0] = bool(flag)


def is_enabled() -> bool:
    return _ENABLED[0]


def _nf4_linear_type():
    from npu_ft.modules.nf4 import Nf4Linear

    return Nf4Linear


def _dora_magnitude(layer, adapter: str) -> torch.Tensor | None | str:
    """The DoRA magnitude ``[out]`` of ``adapter`` (None: plain LoRA), or a fallback reason (str)."""
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None and type(variant).__name__ != "DoraLinearVariant":
        return "LoRA variant"
    if variant is None and not getattr(layer, "use_dora", {}).get(adapter, False):
        return None
    dora = getattr(layer, "lora_magnitude_vector", {})
    magnitude = getattr(dora[adapter], "weight", None) if adapter in dora else None
    if not isinstance(magnitude, torch.Tensor) or magnitude.dim() != 1:
        return "DoRA layer without a magnitude vector"
    if isinstance(layer.lora_dropout[adapter], nn.Dropout) and layer.lora_dropout[adapter].training != layer.training:
        return "DoRA dropout and layer in different train/eval modes"
    return magnitude


def _plan(layer, x: torch.Tensor, args: tuple, kwargs: dict) -> tuple | str:
    """Either ``(op, base, lora_A, lora_B, dropout, scaling, bias, magnitude)`` with op one of
    ``lora_linear``, ``nf4_linear``, ``dora_linear``, ``dora_nf4_linear`` (magnitude None for LoRA),
    or a fallback reason (str)."""
    if not _ENABLED[0]:
        return "disabled"
    if args or any(k != "adapter_names" or v is not None for k, v in kwargs.items()):
        return "extra forward arguments"
    if getattr(layer, "disable_adapters", False):
        return "adapters disabled"
    if getattr(layer, "merged", False):
        return "adapter merged"
    active = layer.active_adapters
    if len(active) != 1:
        return "not exactly one active adapter"
    a = active[0]
    if a not in layer.lora_A:
        return "active adapter has no lora_A"
    if getattr(layer, "lora_bias", {}).get(a, False):
        return "lora_bias"
    magnitude = _dora_magnitude(layer, a)
    if isinstance(magnitude, str):
        return magnitude
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    if not getattr(layer, "cast_input_dtype_enabled", True):
        return "input dtype casting disabled"
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        return "input is not a floating tensor"
    base = layer.get_base_layer()
    if base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"):
        return "base layer has hooks"
    lora_A, lora_B = layer.lora_A[a], layer.lora_B[a]
    if (
        type(lora_A) is not nn.Linear
        or type(lora_B) is not nn.Linear
        or lora_A.bias is not None
        or lora_B.bias is not None
    ):
        return "non-standard lora_A/lora_B"
    if lora_A.weight.dtype != lora_B.weight.dtype:
        return "lora_A/lora_B dtypes differ"
    dropout = layer.lora_dropout[a]
    if type(dropout) not in (nn.Identity, nn.Dropout):
        return "non-standard dropout"
    bias = base.bias if isinstance(getattr(base, "bias", None), torch.Tensor) else None
    if bias is not None and bias.dtype != x.dtype:
        return "bias dtype differs from x"
    scaling = float(layer.scaling[a])
    dora = magnitude is not None
    if type(base) is nn.Linear:
        if base.weight.dtype != x.dtype:
            return "x dtype differs from base weight"
        if base.weight.requires_grad and torch.is_grad_enabled():
            return "base weight requires grad"
        return "dora_linear" if dora else "lora_linear", base, lora_A, lora_B, dropout, scaling, bias, magnitude
    if isinstance(base, _nf4_linear_type()):
        return "dora_nf4_linear" if dora else "nf4_linear", base, lora_A, lora_B, dropout, scaling, bias, magnitude
    return f"base layer type {type(base).__name__}"


def _x_lora(x: torch.Tensor, dropout: nn.Module, dtype: torch.dtype):
    if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
        return dropout(x.to(dtype))
    return None


#: frozen base layer -> (weakref to the tensor the norms came from, its data_ptr, _version, dtype, norms)
_WEIGHT_SQ_NORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def base_weight_sq_norm(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``||W_i||^2`` per row, fp32 ``[out]``, of a frozen base layer (an ``nn.Linear``, or an npu-ft
    ``Nf4Linear`` dequantized to ``dtype`` as the DoRA op does). Computed once per layer and kept;
    recomputed when the base weight changes (another tensor, new storage after a move, an in-place
    update bumping its version counter) or ``dtype`` changes."""
    from npu_ft.ops.dora import weight_sq_norm

    source = base.weight if type(base) is nn.Linear else base.packed
    key = (source.data_ptr(), source._version, dtype)
    cached = _WEIGHT_SQ_NORMS.get(base)
    if cached is not None and cached[0]() is source and cached[1:4] == key:
        return cached[4]
    dense = base.weight if type(base) is nn.Linear else base.dequantized_weight(dtype)
    norms = weight_sq_norm(dense)
    _WEIGHT_SQ_NORMS[base] = (weakref.ref(source), *key, norms)
    return norms


def _make_forward(original: Callable) -> Callable:
    from npu_ft.ops import dora as dora_ops
    from npu_ft.ops import lora as lora_ops

    def forward(self, x, *args, **kwargs):
        plan = _plan(self, x, args, kwargs)
        if isinstance(plan, str):
            STATS["fallback"] += 1
            STATS[f"fallback: {plan}"] += 1
            return original(self, x, *args, **kwargs)
        op, base, lora_A, lora_B, dropout, scaling, bias, magnitude = plan
        STATS[op] += 1
        x_lora = _x_lora(x, dropout, lora_A.weight.dtype)
        A, B = lora_A.weight, lora_B.weight
        if op == "lora_linear":
            return lora_ops.lora_linear(x, base.weight, bias, A, B, scaling, x_lora)
        if op == "nf4_linear":
            return lora_ops.nf4_linear(x, base.packed, base.quant_state, bias, A, B, scaling, x_lora)
        sq_norm = base_weight_sq_norm(base, x.dtype)
        if op == "dora_linear":
            return dora_ops.dora_linear(x, base.weight, bias, A, B, magnitude, sq_norm, scaling, x_lora)
        return dora_ops.dora_nf4_linear(x, base.packed, base.quant_state, bias, A, B, magnitude, sq_norm, scaling,
                                        x_lora)

    forward.__npu_ft_patched__ = True
    forward.__wrapped__ = original
    forward.__doc__ = "npu-ft fused LoRA / DoRA forward (falls back to PEFT's forward outside the plain case)."
    return forward


def _peft_classes() -> list[type]:
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError as exc:  # pragma: no cover - peft is an npu-ft dependency
        raise ImportError(f"npu-ft LLaMA-Factory plugin: PEFT is not importable ({exc})") from exc
    classes = [lora_layer.Linear]
    try:  # bitsandbytes-backed LoRA layers exist only when bitsandbytes imports
        from peft.import_utils import is_bnb_4bit_available

        if is_bnb_4bit_available():
            from peft.tuners.lora.bnb import Linear4bit

            classes.append(Linear4bit)
    except Exception:  # noqa: BLE001 - a broken bitsandbytes simply means nothing to patch there
        pass
    return classes


def apply_npu_ft_to_peft() -> list[str]:
    """Patch PEFT's LoRA ``Linear`` (and ``Linear4bit`` when bitsandbytes imports) ``forward``.

    Idempotent; returns the qualified names of the patched classes. Raises ``RuntimeError`` if the
    installed PEFT's layer class lacks what the patch relies on (a PEFT too different to patch).
    """
    patched = []
    with _LOCK:
        for cls in _peft_classes():
            name = f"{cls.__module__}.{cls.__qualname__}"
            if cls in _ORIGINAL:
                patched.append(name)
                continue
            missing = [a for a in ("get_base_layer", "forward", "update_layer") if not hasattr(cls, a)]
            if missing:
                import peft

                raise RuntimeError(
                    f"npu-ft LLaMA-Factory plugin: PEFT {peft.__version__} {name} lacks {missing}; "
                    "this PEFT version cannot be patched"
                )
            original = cls.forward
            _ORIGINAL[cls] = original
            cls.forward = _make_forward(original)
            patched.append(name)
    return patched


def revert_npu_ft_peft() -> None:
    """Undo :func:`apply_npu_ft_to_peft` (restores PEFT's forwards)."""
    with _LOCK:
        for cls, original in list(_ORIGINAL.items()):
            cls.forward = original
            del _ORIGINAL[cls]


def is_peft_patched() -> bool:
    from peft.tuners.lora import layer as lora_layer

    return getattr(lora_layer.Linear.forward, "__npu_ft_patched__", False)
