"""Tiny random Qwen2/Qwen3 models for tests and demos, and the real model shapes for benchmarks.

:func:`build_tiny_model` writes an ordinary Hugging Face model folder (config.json,
model.safetensors, generation_config.json and the offline Qwen tokenizer files) that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load:

>>> from npu_ft.model.tiny import build_tiny_model  # doctest: +SKIP
>>> path = build_tiny_model("out/tiny-qwen2")       # doctest: +SKIP

:func:`preset_config` gives the architecture of Qwen2.5-0.5B / 1.5B and Qwen3-0.6B (random init via
:func:`model_from_config`), so benchmarks run the real shapes without the real weights.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PRESETS",
    "QWEN_VOCAB_SIZE",
    "build_tiny_model",
    "model_from_config",
    "preset_config",
    "tiny_config",
]

#: embedding rows of every Qwen2 / Qwen2.5 / Qwen3 checkpoint (the tokenizer has 151,665 /
#: 151,669 tokens; the matrix is padded to a multiple of 128)
QWEN_VOCAB_SIZE = 151936
BOS_ID = 151643  # <|endoftext|>
EOS_ID = 151645  # <|im_end|>
PAD_ID = 151643

_COMMON = {
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "attention_dropout": 0.0,
    "use_cache": True,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "vocab_size": QWEN_VOCAB_SIZE,
}

#: architecture of the released models (from their config.json files); random init only
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {**_COMMON, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                     "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                     "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 32768,
                     "max_window_layers": 21},
    "qwen2.5-1.5b": {**_COMMON, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                     "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                     "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 32768,
                     "max_window_layers": 21},
    "qwen3-0.6b": {**_COMMON, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                   "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 40960, "tie_word_embeddings": True, "attention_bias": False,
                   "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28},
}
_ALIASES = {"qwen2.5-0.5b-instruct": "qwen2.5-0.5b", "qwen2.5-1.5b-instruct": "qwen2.5-1.5b",
            "0.5b": "qwen2.5-0.5b", "1.5b": "qwen2.5-1.5b", "0.6b": "qwen3-0.6b"}


def preset_config(name: str) -> dict[str, Any]:
    """Config dict of a released model's architecture: ``qwen2.5-0.5b``, ``qwen2.5-1.5b``, ``qwen3-0.6b``."""
    key = name.strip().lower().replace("_", "-").split("/")[-1]
    key = _ALIASES.get(key, key)
    if key not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}: expected one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[key])


def tiny_config(arch: str = "qwen2", hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 128, vocab: int = QWEN_VOCAB_SIZE, tie_word_embeddings: bool = True,
                max_position_embeddings: int = 4096) -> dict[str, Any]:
    """Config dict of a tiny Qwen2 (``arch="qwen2"``) or Qwen3 (``"qwen3"``) model."""
    if arch not in ("qwen2", "qwen3"):
        raise ValueError(f"arch: expected 'qwen2' or 'qwen3', got {arch!r}")
    if hidden_size % heads or heads % kv_heads:
        raise ValueError("hidden_size must be divisible by heads, and heads by kv_heads")
    cfg = {**_COMMON, "model_type": arch, "hidden_size": hidden_size, "intermediate_size": intermediate,
           "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
           "vocab_size": vocab, "tie_word_embeddings": tie_word_embeddings,
           "max_position_embeddings": max_position_embeddings, "use_sliding_window": False,
           "max_window_layers": layers}
    if arch == "qwen2":
        cfg.update(architectures=["Qwen2ForCausalLM"], sliding_window=max_position_embeddings)
    else:
        cfg.update(architectures=["Qwen3ForCausalLM"], head_dim=hidden_size // heads, attention_bias=False,
                   sliding_window=None)
    return cfg


def model_from_config(config: dict[str, Any], dtype: torch.dtype = torch.float32, seed: int | None = 0,
                      device: Any = None):
    """A randomly initialised ``*ForCausalLM`` for a config dict (no weights needed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    cfg.pop("architectures", None)
    hf_config = AutoConfig.for_model(model_type, **cfg)
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    if device is not None:
        model = model.to(device)
    return model


def build_tiny_model(out_dir: str | os.PathLike, arch: str = "qwen2", hidden_size: int = 64, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, intermediate: int = 128, vocab: int | None = None,
                     seed: int = 0, tokenizer: bool = True, tie_word_embeddings: bool = True,
                     dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny random Qwen2/Qwen3 model folder and return its path.

    ``vocab`` defaults to Qwen's 151,936 embedding rows so the real (offline) Qwen tokenizer fits;
    a smaller vocab (fast unit tests) needs ``tokenizer=False``. The weights are a deterministic
    function of the arguments (``seed``).
    """
    from transformers import GenerationConfig

    vocab = QWEN_VOCAB_SIZE if vocab is None else int(vocab)
    tok = None
    if tokenizer:
        from npu_ft.model.tokenizer import load_qwen_tokenizer

        tok = load_qwen_tokenizer(None, variant="qwen3" if arch == "qwen3" else "qwen2.5")
        if len(tok) > vocab:
            raise ValueError(f"vocab={vocab} is smaller than the Qwen tokenizer ({len(tok)} tokens); "
                             "use a larger vocab or tokenizer=False")
    config = tiny_config(arch, hidden_size, layers, heads, kv_heads, intermediate, vocab, tie_word_embeddings)
    model = model_from_config(config, dtype=dtype, seed=seed)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=[EOS_ID, BOS_ID],
                                               pad_token_id=PAD_ID, do_sample=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    if tok is not None:
        tok.save_pretrained(str(out))
    (out / "npu_ft_tiny.json").write_text(json.dumps(
        {"builder": "npu_ft.model.tiny", "arch": arch, "seed": seed, "vocab": vocab}, indent=2) + "\n")
    return out
