"""Models: loading from a local folder, the offline Qwen tokenizer, tiny models for tests/demos.

Submodules import lazily so ``import npu_ft.model`` stays cheap.
"""

from __future__ import annotations

from .loading import ModelLoadError, attn_implementation, compute_dtype, load_model, resolve_model_path
from .tiny import PRESETS, QWEN_VOCAB_SIZE, build_tiny_model, model_from_config, preset_config, tiny_config

__all__ = [
    "ModelLoadError",
    "PRESETS",
    "QWEN_VOCAB_SIZE",
    "attn_implementation",
    "build_tiny_model",
    "compute_dtype",
    "load_model",
    "model_from_config",
    "preset_config",
    "resolve_model_path",
    "tiny_config",
]
