"""Patch a transformers Qwen2/Qwen3/Llama/Mistral model so its decoder blocks run npu-ft's fused ops:
:func:`apply_fused_kernels` (Liger-style explicit switches) and :func:`enable_fused_kernels` (from a
recipe's ``fused_kernels`` / ``enable_liger_kernel`` keys).

What changes, per **instance** (classes and other models in the process are untouched):

* every ``*RMSNorm`` module (the layers' two norms, Qwen3's per-head ``q_norm``/``k_norm``, the final
  norm) runs ``npu_ft::rms_norm``;
* every decoder layer fuses the residual add after attention with its ``post_attention_layernorm``
  (one ``rms_norm`` call with a residual, which also returns the sum: the next residual). transformers
  wraps a decoder layer class's ``forward`` for gradient checkpointing when the class is defined, so
  this one patch swaps the instance's class for a subclass (same name, cached per class) whose
  ``forward`` transformers wraps the same way;
* every attention module applies the rotary embedding with ``npu_ft::rope`` (queries and keys in one
  call). The modeling module's ``apply_rotary_pos_emb`` is replaced by a dispatcher that calls the
  original unless a patched attention module of this kind is running (a context variable set by its
  forward), so unpatched models keep transformers' function;
* every MLP whose activation is SiLU computes ``down_proj(swiglu(gate_proj(x), up_proj(x)))``.

Numerics: the ops compute in float32 with one rounding per output (transformers rounds after each
elementwise op), so fp32 results agree to float32 rounding and bf16 results are at least as
accurate; tests hold loss and gradients over 20 training steps to 1e-5 relative in fp32.
:func:`remove_fused_kernels` undoes the patch.
"""

from __future__ import annotations

import contextvars
import importlib.util
import logging
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "KNOWN_MODEL_TYPES",
    "LigerUnavailableError",
    "apply_fused_kernels",
    "enable_fused_kernels",
    "fused_kernels_applied",
    "liger_unavailable_reason",
    "remove_fused_kernels",
]

#: transformers model families whose decoder layer, attention, MLP and RMSNorm have the layout
#: patched here (the classes ``<Name>DecoderLayer``, ``<Name>Attention``, ``<Name>MLP``, ``<Name>RMSNorm``)
KNOWN_MODEL_TYPES = ("Qwen2", "Qwen3", "Llama", "Mistral")

_ATTR = "_npu_ft_fused_blocks"  # on a patched module: {"kind": ..., "previous_forward": ...}
_ROPE_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("npu_ft_fused_rope", default=False)


class LigerUnavailableError(RuntimeError):
    """``enable_liger_kernel: true`` without Liger-Kernel installed."""


def _family(module: nn.Module, suffix: str) -> bool:
    name = type(module).__name__
    return (
        name.endswith(suffix)
        and name[: -len(suffix)] in KNOWN_MODEL_TYPES
        and type(module).__module__.startswith("transformers.models.")
    )


# --------------------------------------------------------------------------------------------------
# the patched forwards (bound to each instance)
# --------------------------------------------------------------------------------------------------


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """``*RMSNorm.forward`` through ``npu_ft::rms_norm``."""
    from npu_ft.ops.rms_norm import rms_norm

    return rms_norm(hidden_states, self.weight, self.variance_epsilon)[0]


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``*MLP.forward`` with ``silu(gate) * up`` through ``npu_ft::swiglu``."""
    from npu_ft.ops.swiglu import swiglu

    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _attention_forward(self, *args: Any, **kwargs: Any):
    """``*Attention.forward`` with the rotary embedding through ``npu_ft::rope``."""
    token = _ROPE_ACTIVE.set(True)
    try:
        return _previous_forward(self)(*args, **kwargs)
    finally:
        _ROPE_ACTIVE.reset(token)


def _decoder_layer_forward(
    self,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values: Any = None,
    use_cache: bool | None = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' decoder layer with ``residual + attention`` and ``post_attention_layernorm``
    as one ``npu_ft::rms_norm`` call (same values: the sum is rounded as transformers rounds it)."""
    from npu_ft.ops.rms_norm import rms_norm

    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    norm = self.post_attention_layernorm
    hidden_states, residual = rms_norm(hidden_states, norm.weight, norm.variance_epsilon, residual=residual)
    return residual + self.mlp(hidden_states)


def _rope_dispatcher(original: Callable) -> Callable:
    """A stand-in for a modeling module's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``:
    ``npu_ft::rope`` inside a patched attention module, ``original`` everywhere else."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[-1] if args else 1)
        plain = len(args) + len(kwargs) <= 1 and unsqueeze_dim == 1 and q.dim() == 4 and cos.dim() == 3
        if _ROPE_ACTIVE.get() and plain and cos.dtype == q.dtype == k.dtype:
            from npu_ft.ops.rope import rope

            return rope(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.npu_ft_original = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def _install_rope_dispatcher(attention: nn.Module) -> bool:
    module = sys.modules.get(type(attention).__module__)
    original = getattr(module, "apply_rotary_pos_emb", None)
    if original is None:
        return False
    if not hasattr(original, "npu_ft_original"):
        module.apply_rotary_pos_emb = _rope_dispatcher(original)  # type: ignore[union-attr]
    return True


# --------------------------------------------------------------------------------------------------
# patching
# --------------------------------------------------------------------------------------------------


def _previous_forward(module: nn.Module) -> Callable:
    state = vars(module)[_ATTR]
    previous = state["previous_forward"]
    return previous if previous is not None else types.MethodType(type(module).forward, module)


def _patch(module: nn.Module, kind: str, forward: Callable) -> None:
    if _ATTR in vars(module):
        return
    object.__setattr__(module, _ATTR, {"kind": kind, "previous_forward": vars(module).get("forward")})
    object.__setattr__(module, "forward", types.MethodType(forward, module))


#: decoder layer class -> its subclass with the fused forward
_FUSED_LAYER_CLASSES: dict[type, type] = {}


def _patch_layer_class(module: nn.Module) -> None:
    """Give ``module`` a subclass of its class whose ``forward`` is :func:`_decoder_layer_forward`
    (transformers' ``GradientCheckpointingLayer.__init_subclass__`` wraps it for checkpointing; same
    ``__name__``, so name-based lookups such as ``_no_split_modules`` / FSDP auto-wrap still match)."""
    if _ATTR in vars(module):
        return
    cls = type(module)
    fused = _FUSED_LAYER_CLASSES.get(cls)
    if fused is None:
        namespace = {"forward": _decoder_layer_forward, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
        fused = _FUSED_LAYER_CLASSES[cls] = type(cls.__name__, (cls,), namespace)
    object.__setattr__(module, _ATTR, {"kind": "residual_rms_norm", "previous_class": cls})
    module.__class__ = fused


def _child(module: nn.Module, name: str) -> nn.Module:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Module) else nn.Identity()


def _is_silu(act: Any) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def apply_fused_kernels(model: nn.Module, rms_norm: bool = True, rope: bool = True, swiglu: bool = True) -> list[str]:
    """Patch ``model``'s Qwen2/Qwen3/Llama/Mistral decoder blocks with npu-ft's fused ops (see the
    module docstring). Works on any module containing them (a ``*ForCausalLM``, a PEFT model, a bare
    ``*Model``). Returns the patches applied, e.g. ``["rms_norm", "residual_rms_norm", "rope",
    "swiglu"]`` (empty when the model has none of these modules). Idempotent."""
    applied: set[str] = set()
    for module in model.modules():
        if rms_norm and _family(module, "RMSNorm") and hasattr(module, "variance_epsilon"):
            _patch(module, "rms_norm", _rms_norm_forward)
            applied.add("rms_norm")
        elif swiglu and _family(module, "MLP") and _is_silu(getattr(module, "act_fn", None)):
            _patch(module, "swiglu", _mlp_forward)
            applied.add("swiglu")
        elif rope and _family(module, "Attention") and _install_rope_dispatcher(module):
            _patch(module, "rope", _attention_forward)
            applied.add("rope")
        elif rms_norm and _family(module, "DecoderLayer") and _family(_child(module, "post_attention_layernorm"),
                                                                      "RMSNorm"):
            _patch_layer_class(module)
            applied.add("residual_rms_norm")
    order = ["rms_norm", "residual_rms_norm", "rope", "swiglu"]
    result = [name for name in order if name in applied]
    if result:
        logger.info("fused decoder-block kernels on %s: %s", type(model).__name__, ", ".join(result))
    return result


def fused_kernels_applied(model: nn.Module) -> dict[str, int]:
    """Patched modules of ``model`` per kind, e.g. ``{"rms_norm": 49, "rope": 24, ...}``."""
    counts: dict[str, int] = {}
    for module in model.modules():
        state = vars(module).get(_ATTR)
        if state is not None:
            counts[state["kind"]] = counts.get(state["kind"], 0) + 1
    return counts


def remove_fused_kernels(model: nn.Module) -> int:
    """Undo :func:`apply_fused_kernels` on ``model``; returns the number of modules restored."""
    restored = 0
    for module in model.modules():
        state = vars(module).pop(_ATTR, None)
        if state is None:
            continue
        if "previous_class" in state:
            module.__class__ = state["previous_class"]
        elif state["previous_forward"] is not None:
            object.__setattr__(module, "forward", state["previous_forward"])
        else:
            module.__dict__.pop("forward", None)
        restored += 1
    return restored


# --------------------------------------------------------------------------------------------------
# from a recipe
# --------------------------------------------------------------------------------------------------


def _cfg(cfg: Any, key: str, default: Any) -> Any:
    getter = getattr(cfg, "get", None)
    return getter(key, default) if callable(getter) else getattr(cfg, key, default)


def liger_unavailable_reason() -> str | None:
    """Why ``enable_liger_kernel: true`` cannot be honoured here (None: Liger-Kernel is importable)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return ("enable_liger_kernel: true needs Liger-Kernel, which is not installed (pip install liger-kernel), "
                "or remove it: npu-ft's own fused kernels (fused_kernels: true, the default) cover the same ops")
    return None


def enable_fused_kernels(cfg: Any, model: nn.Module) -> list[str]:
    """Patch ``model`` as the recipe says; returns what was applied (``[]``: nothing).

    * ``enable_liger_kernel: true`` (LLaMA-Factory's key) keeps its meaning: Liger-Kernel's own
      patches (``liger_kernel.transformers._apply_liger_kernel_to_instance``), returned as
      ``["liger"]``; npu-ft's fused kernels are then not applied. Without Liger-Kernel installed it
      raises :class:`LigerUnavailableError` (the config check refuses such a recipe earlier).
    * else ``fused_kernels: true`` (the default): :func:`apply_fused_kernels` with every op.
    """
    if bool(_cfg(cfg, "enable_liger_kernel", False)):
        reason = liger_unavailable_reason()
        if reason is not None:
            raise LigerUnavailableError(reason)
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
        logger.info("enable_liger_kernel: Liger-Kernel's patches applied (npu-ft's fused kernels are not)")
        return ["liger"]
    if not bool(_cfg(cfg, "fused_kernels", True)):
        logger.info("fused_kernels: false -> transformers' RMSNorm, RoPE and SiLU*up modules")
        return []
    return apply_fused_kernels(model)
