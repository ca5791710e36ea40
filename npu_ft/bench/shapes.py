"""Model shapes for benchmarks: Qwen configs with random weights (no download needed).

The shape is what matters for memory and speed; the weights are random from a seed, so the same
seed gives the same model in every process (npu-ft and reference side by side).

The presets follow the published ``config.json`` of each Qwen model (``tiny`` is a 2-layer Qwen2
for CI). A suite can shrink a preset with ``model_overrides`` (e.g. fewer layers).
"""

from __future__ import annotations

import copy

import torch

#: name -> (model_type, config kwargs)
PRESETS: dict[str, tuple[str, dict]] = {
    "tiny": ("qwen2", dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                           tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6)),
    "qwen2.5-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                   num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                   max_position_embeddings=32768, tie_word_embeddings=True,
                                   rope_theta=1000000.0, rms_norm_eps=1e-6)),
    "qwen2.5-1.5b": ("qwen2", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                   num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                   max_position_embeddings=32768, tie_word_embeddings=True,
                                   rope_theta=1000000.0, rms_norm_eps=1e-6)),
    "qwen2.5-7b": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                 max_position_embeddings=32768, tie_word_embeddings=False,
                                 rope_theta=1000000.0, rms_norm_eps=1e-6)),
    "qwen3-0.6b": ("qwen3", dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                 num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                 head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True,
                                 rope_theta=1000000.0, rms_norm_eps=1e-6)),
}


ATTN_IMPLEMENTATION = "sdpa"


def known_models() -> list[str]:
    return list(PRESETS)


def model_config(name: str, overrides: dict | None = None):
    """A transformers config for preset ``name`` with ``overrides`` applied."""
    from transformers import Qwen2Config, Qwen3Config

    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(PRESETS)}")
    model_type, kwargs = PRESETS[name]
    kwargs = copy.deepcopy(kwargs)
    kwargs.update(overrides or {})
    cls = Qwen3Config if model_type == "qwen3" else Qwen2Config
    cfg = cls(**kwargs)
    # the same attention kernel on both implementations and on every device
    cfg._attn_implementation = ATTN_IMPLEMENTATION
    return cfg


def build_model(name: str, seed: int, dtype: torch.dtype = torch.float32, overrides: dict | None = None):
    """Random-init causal LM of shape ``name``; the same ``seed`` gives the same weights."""
    from transformers import AutoModelForCausalLM

    cfg = model_config(name, overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if dtype != torch.float32:
        model = model.to(dtype)
    model.config.use_cache = False
    return model
