"""LongLoRA's shifted sparse attention (S2-Attn) for Qwen2 / Qwen3, in training only.

:func:`enable_shift_attn` makes every attention layer of a Qwen2/Qwen3 model (eager or sdpa
attention) compute, while ``model.training``, attention inside groups of ``group_size_ratio`` of
the sequence (LongLoRA: 1/4), half of the heads over groups shifted by half a group; in eval mode
(inference, generation, export) the layers compute full attention as before. It registers
npu-ft's attention implementations ``npu_ft_s2_eager`` / ``npu_ft_s2_sdpa`` with transformers
(``model.set_attn_implementation``: the config's attention name is not saved in config.json) and
:func:`disable_shift_attn` restores the original one.

Rules (see docs/methods.md#longlora-s2-attn):

* ``group_size_ratio`` = 1/k for an integer k (k groups). A sequence of length L is padded inside
  the attention to L' = the next multiple of 2k (masked keys, outputs dropped), so the group G =
  L' / k is even and the shift G / 2 exact; L' = L when L is a multiple of 2k (LLaMA-Factory pads
  batches to a multiple of 8, i.e. always for k = 4), which is LongLoRA's rule L % G == 0.
* Heads ``[0, H // 2)`` attend within groups ``[gG, (g+1)G)``; heads ``[H // 2, H)`` within the
  same groups after the sequence is rolled by ``-G / 2`` (the last group wraps around).
* Inside a group, the model's own mask decides (causality by true position, padding, packed
  sequences): a token never attends to a later token, also in the wrapped group. LongLoRA's code
  applies the first group's causal mask in rolled order instead, which lets the first G/2 tokens
  see the last G/2 tokens of the sequence in the shifted heads; with true positions, a group that
  covers the whole sequence is exactly full attention.
* GQA: when the head split falls between key/value heads (``(Hkv // 2) * H / Hkv == H // 2``) the
  key/value heads are split as they are; otherwise they are repeated to H heads first.

:func:`s2_attention` is the fast path (two batched attention calls over ``B * k`` groups, the
base implementation underneath); :func:`s2_attention_reference` is the per-group loop it is
tested against.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "disable_shift_attn",
    "enable_shift_attn",
    "s2_attention",
    "s2_attention_reference",
    "shift_attn_enabled",
]

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3")
BASE_IMPLEMENTATIONS = ("eager", "sdpa")
_PREFIX = "npu_ft_s2_"
#: attribute set on each attention layer: its group size ratio while S2-Attn is enabled
RATIO_ATTR = "npu_ft_group_size_ratio"
#: attribute set on the model: the attention implementation to restore
_BASE_ATTR = "npu_ft_shift_attn_base"


# --------------------------------------------------------------------------------------------------
# geometry and masks
# --------------------------------------------------------------------------------------------------


def num_groups(group_size_ratio: float) -> int:
    """k for ``group_size_ratio`` = 1/k; ValueError naming the key otherwise."""
    if isinstance(group_size_ratio, bool) or not isinstance(group_size_ratio, (int, float)):
        raise TypeError(f"group_size_ratio: expected a number, got {type(group_size_ratio).__name__}")
    if not 0 < group_size_ratio <= 1:
        raise ValueError(f"group_size_ratio: {group_size_ratio} must be in (0, 1]")
    k = Fraction(1 / group_size_ratio).limit_denominator(1000)
    if k.denominator != 1:
        raise ValueError(f"group_size_ratio: {group_size_ratio} is not 1/k for an integer k (LongLoRA uses 0.25)")
    return int(k)


def group_geometry(seq_len: int, groups: int) -> tuple[int, int]:
    """``(padded length, group size)`` for ``seq_len`` tokens in ``groups`` groups (group size even)."""
    padded = math.ceil(seq_len / (2 * groups)) * 2 * groups
    return padded, padded // groups


def _group_masks(mask: torch.Tensor | None, seq_len: int, padded: int, group: int, shift: int, batch: int,
                 device: torch.device, additive: torch.dtype | None) -> torch.Tensor:
    """Masks ``[batch * groups, 1, G, G]`` of the groups of the order rolled by ``-shift``.

    ``mask``: the model's ``[B or 1, 1, L, L]`` mask (bool, True = attend, or additive float), or
    None for causal attention; the result has the mask's form, or for None bool, or additive float
    in dtype ``additive`` when given. Keys in the padding are masked; a query that could attend to
    nothing in its group (a padding token) attends to itself, so no row is empty.
    """
    order = (torch.arange(padded, device=device) + shift) % padded  # position at each rolled index
    idx = order.view(padded // group, group)
    q_pos, k_pos = idx[:, :, None], idx[:, None, :]
    picked = None
    if mask is None:
        allowed = (k_pos <= q_pos).unsqueeze(0)
    else:
        picked = mask[:, 0][:, q_pos.clamp(max=seq_len - 1), k_pos.clamp(max=seq_len - 1)]  # [B or 1, k, G, G]
        allowed = picked if picked.dtype == torch.bool else picked != torch.finfo(picked.dtype).min
    allowed = allowed & (k_pos < seq_len)
    forced = ~allowed.any(dim=-1, keepdim=True) & torch.eye(group, dtype=torch.bool, device=device)
    if picked is not None and picked.dtype != torch.bool:
        masked = torch.finfo(picked.dtype).min
        out = torch.where(forced, 0.0, torch.where(allowed, picked, masked)).to(picked.dtype)
    elif picked is None and additive is not None:
        out = torch.where(allowed | forced, 0.0, torch.finfo(additive).min).to(additive)
    else:
        out = allowed | forced
    out = out.expand(batch, *out.shape[1:])
    return out.reshape(batch * out.shape[1], 1, group, group)


# --------------------------------------------------------------------------------------------------
# the fast path
# --------------------------------------------------------------------------------------------------


class _RepeatedKV(nn.Module):
    """The attention layer as the base implementation sees it after its key/value heads were repeated."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.num_key_value_groups = 1
        self.is_causal = getattr(layer, "is_causal", True)
        self.layer_idx = getattr(layer, "layer_idx", None)
        self.train(layer.training)


def _to_groups(x: torch.Tensor, shift: int, groups: int) -> torch.Tensor:
    """``[B, h, L', D]`` -> ``[B * groups, h, G, D]`` after rolling the sequence by ``-shift``."""
    b, h, length, d = x.shape
    if shift:
        x = x.roll(-shift, dims=2)
    return x.view(b, h, groups, length // groups, d).transpose(1, 2).reshape(b * groups, h, length // groups, d)


def _from_groups(out: torch.Tensor, shift: int, batch: int) -> torch.Tensor:
    """Base output ``[B * groups, G, h, D]`` -> ``[B, L', h, D]``, rolled back by ``+shift``."""
    _, g, h, d = out.shape
    out = out.reshape(batch, -1, h, d)
    return out.roll(shift, dims=1) if shift else out


def _head_split(num_heads: int, num_kv: int) -> tuple[int, int | None]:
    """Query heads of the unshifted half, and the key/value heads of that half (None: repeat kv)."""
    half = num_heads // 2
    rep = num_heads // num_kv
    kv_half = num_kv // 2
    return half, (kv_half if kv_half * rep == half else None)


def s2_attention(base: Callable, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, group_size_ratio: float, **kwargs) -> torch.Tensor:
    """S2-Attn through ``base`` (transformers' eager or sdpa attention function).

    ``query`` [B, H, L, D], ``key``/``value`` [B, Hkv, L, D] (rotary embedding applied),
    ``attention_mask`` the model's [B or 1, 1, L, L] mask or None (causal). Returns [B, L, H, D] like
    ``base``'s first output.
    """
    batch, num_heads, seq_len, _ = query.shape
    groups = num_groups(group_size_ratio)
    padded, group = group_geometry(seq_len, groups)
    if padded != seq_len:
        pad = (0, 0, 0, padded - seq_len)
        query, key, value = (nn.functional.pad(t, pad) for t in (query, key, value))
    half, kv_half = _head_split(num_heads, key.shape[1])
    layer: nn.Module = module
    if kv_half is None:
        from transformers.integrations.sdpa_attention import repeat_kv

        key, value = (repeat_kv(t, num_heads // key.shape[1]) for t in (key, value))
        kv_half, layer = half, _RepeatedKV(module)
    outputs = []
    for heads, kv_heads, shift in (
        (slice(0, half), slice(0, kv_half), 0),
        (slice(half, num_heads), slice(kv_half, key.shape[1]), group // 2),
    ):
        if heads.start == heads.stop:
            continue
        fast_causal = attention_mask is None and shift == 0 and padded == seq_len and _is_sdpa(base)
        mask = None if fast_causal else _group_masks(attention_mask, seq_len, padded, group, shift, batch,
                                                     query.device, None if _is_sdpa(base) else query.dtype)
        out, _ = base(layer, _to_groups(query[:, heads], shift, groups), _to_groups(key[:, kv_heads], shift, groups),
                      _to_groups(value[:, kv_heads], shift, groups), mask, **kwargs)
        outputs.append(_from_groups(out, shift, batch))
    return torch.cat(outputs, dim=2)[:, :seq_len].contiguous()


def _is_sdpa(base: Callable) -> bool:
    return getattr(base, "__name__", "") == "sdpa_attention_forward"


def s2_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           allowed: torch.Tensor | None, group_size_ratio: float, scaling: float) -> torch.Tensor:
    """S2-Attn written out group by group, in float32 (the test reference of :func:`s2_attention`).

    ``allowed``: bool [B or 1, 1, L, L] (True = may attend) or None (causal). Returns [B, L, H, D].
    For each head (the second half shifted by half a group) and each group, the group's positions
    are listed, padding positions (>= L) dropped, and softmax attention runs over the group's keys
    that ``allowed`` permits for each query.
    """
    batch, num_heads, seq_len, dim = query.shape
    rep = num_heads // key.shape[1]
    groups = num_groups(group_size_ratio)
    padded, group = group_geometry(seq_len, groups)
    if allowed is None:
        allowed = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()[None, None]
    out = torch.zeros(batch, seq_len, num_heads, dim, dtype=torch.float32)
    for b in range(batch):
        mask = allowed[b if allowed.shape[0] > 1 else 0, 0].cpu()
        for h in range(num_heads):
            shift = group // 2 if h >= num_heads // 2 else 0
            for g in range(groups):
                members = [(g * group + r + shift) % padded for r in range(group)]
                members = [pos for pos in members if pos < seq_len]
                if not members:
                    continue
                q = query[b, h, members].float()
                k = key[b, h // rep, members].float()
                v = value[b, h // rep, members].float()
                scores = (q @ k.T) * scaling
                keep = mask[members][:, members]
                scores = scores.masked_fill(~keep, float("-inf"))
                weights = torch.softmax(scores, dim=-1)
                for row, pos in enumerate(members):
                    if keep[row].any():
                        out[b, pos, h] = weights[row] @ v
                    else:  # a query with nothing to attend to in its group attends to itself
                        out[b, pos, h] = v[row]
    return out


# --------------------------------------------------------------------------------------------------
# the attention implementations registered with transformers
# --------------------------------------------------------------------------------------------------


def _base_function(name: str, module: nn.Module) -> Callable:
    if name == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    return sys.modules[type(module).__module__].eager_attention_forward


def _make_attention(base_name: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        base = _base_function(base_name, module)
        ratio = getattr(module, RATIO_ATTR, None)
        seq_len = query.shape[2]
        if (ratio is None or not module.training or seq_len < 2 or key.shape[2] != seq_len
                or (attention_mask is not None and tuple(attention_mask.shape[-2:]) != (seq_len, seq_len))):
            return base(module, query, key, value, attention_mask, **kwargs)
        return s2_attention(base, module, query, key, value, attention_mask, ratio, **kwargs), None

    attention.__name__ = f"{_PREFIX}{base_name}_attention_forward"
    return attention


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    for base_name, mask_fn in (("eager", eager_mask), ("sdpa", sdpa_mask)):
        AttentionInterface.register(_PREFIX + base_name, _make_attention(base_name))
        AttentionMaskInterface.register(_PREFIX + base_name, mask_fn)
    _REGISTERED = True


# --------------------------------------------------------------------------------------------------
# public switch
# --------------------------------------------------------------------------------------------------


def _attention_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in ("Qwen2Attention", "Qwen3Attention")]


def _pretrained(model: nn.Module) -> Any:  # a transformers PreTrainedModel
    for module in model.modules():  # a PEFT wrapper holds the transformers model inside
        if hasattr(module, "set_attn_implementation") and hasattr(module, "config"):
            return module
    raise ValueError("shift_attn: the model is not a transformers model (no set_attn_implementation)")


def shift_attn_enabled(model: nn.Module) -> bool:
    return getattr(_pretrained(model), _BASE_ATTR, None) is not None


def enable_shift_attn(model: nn.Module, group_size_ratio: float = 0.25) -> nn.Module:
    """Turn S2-Attn on for a Qwen2/Qwen3 model (eager or sdpa attention); returns ``model``.

    Takes effect while the model is in training mode; eval mode computes full attention.
    ValueError (one line naming ``shift_attn``) for other model types or attention implementations.
    """
    num_groups(group_size_ratio)
    hf_model = _pretrained(model)
    model_type = getattr(hf_model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"shift_attn: model type {model_type!r} not supported (expected one of "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)})")
    current = hf_model.config._attn_implementation
    base = getattr(hf_model, _BASE_ATTR, None) or current
    if base not in BASE_IMPLEMENTATIONS:
        raise ValueError(f"shift_attn: attn_implementation {current!r} not supported (use one of "
                         f"{', '.join(BASE_IMPLEMENTATIONS)})")
    layers = _attention_layers(hf_model)
    if not layers:
        raise ValueError(f"shift_attn: no Qwen2/Qwen3 attention layers found in the {model_type} model")
    _register()
    for layer in layers:
        setattr(layer, RATIO_ATTR, float(group_size_ratio))
    setattr(hf_model, _BASE_ATTR, base)
    hf_model.set_attn_implementation(_PREFIX + base)
    log.info("shift_attn: S2-Attn on %d %s attention layers (group_size_ratio=%g, %s underneath), in training only",
             len(layers), model_type, group_size_ratio, base)
    return model


def disable_shift_attn(model: nn.Module) -> nn.Module:
    """Restore the model's own attention implementation (no-op if S2-Attn is off); returns ``model``."""
    hf_model = _pretrained(model)
    base = getattr(hf_model, _BASE_ATTR, None)
    if base is None:
        return model
    hf_model.set_attn_implementation(base)
    for layer in _attention_layers(hf_model):
        if hasattr(layer, RATIO_ATTR):
            delattr(layer, RATIO_ATTR)
    delattr(hf_model, _BASE_ATTR)
    return model
