"""Checks that run before anything is launched: a bad combination fails here, in one process,
with one message, instead of in every rank after minutes of model loading.

>>> from npu_ft.launch.checks import zero_stage
>>> zero_stage({"zero_optimization": {"stage": 3}})
3
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .plan import LaunchError, LaunchPlan

__all__ = ["check_launch", "load_deepspeed_config", "zero_stage", "zero_offload"]


def load_deepspeed_config(value: Any, source: str = "recipe") -> dict | None:
    """The ``deepspeed:`` value as a dict (a path is read as JSON, relative to the working dir
    like LLaMA-Factory); None when not set."""
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        return value
    path = Path(str(value))
    if not path.is_file():
        raise LaunchError(f"{source}: deepspeed config {str(value)!r} not found (paths are relative to the "
                          f"working directory {os.getcwd()})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LaunchError(f"{source}: deepspeed config {str(value)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise LaunchError(f"{source}: deepspeed config {str(value)!r} must be a JSON object")
    return data


def zero_stage(ds: dict | None) -> int:
    """ZeRO stage of a DeepSpeed config (0 when none)."""
    if not ds:
        return 0
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    try:
        return int(stage)
    except (TypeError, ValueError):
        raise LaunchError(f"deepspeed zero_optimization.stage must be 0..3, got {stage!r}") from None


def zero_offload(ds: dict | None) -> tuple[bool, bool]:
    """``(optimizer offloaded, parameters offloaded)`` to the host."""
    zo = (ds or {}).get("zero_optimization") or {}

    def on(key: str) -> bool:
        dev = (zo.get(key) or {}).get("device", "none")
        return str(dev).lower() not in ("none", "")

    return on("offload_optimizer"), on("offload_param")


def _explicit(ds: dict, *keys: str) -> Any:
    node: Any = ds
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return "auto"
        node = node[key]
    return node


def check_launch(cfg, plan: LaunchPlan | None = None) -> dict | None:
    """Raise :class:`LaunchError` for a recipe that cannot run as launched; return the DeepSpeed
    config dict (or None)."""
    src = cfg.source
    ds = load_deepspeed_config(cfg.deepspeed, src)
    if ds is None:
        return None
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise LaunchError(f"{src}: deepspeed is configured but the deepspeed package is not installed "
                          "(pip install deepspeed, or remove the deepspeed key)")
    stage = zero_stage(ds)
    if stage not in (0, 1, 2, 3):
        raise LaunchError(f"{src}: deepspeed zero_optimization.stage must be 0..3, got {stage}")
    if cfg.is_qlora and stage == 3:
        raise LaunchError(
            f"{src}: QLoRA (quantization_bit: 4) with DeepSpeed ZeRO-3 is not supported: npu-ft's NF4 base "
            "weights are packed uint8 tensors with separate quantization state that ZeRO-3 cannot "
            "partition and gather. Use ZeRO-2 (recipes/deepspeed/ds_z2_config.json: the frozen 4-bit base "
            "is small and replicated) or LoRA (bf16 base) with ZeRO-3.")
    if cfg.fp16 and cfg.bf16:  # pragma: no cover - the config refuses this already
        raise LaunchError(f"{src}: bf16 and fp16 cannot both be true")
    for key, want in (("bf16", bool(cfg.bf16)), ("fp16", bool(cfg.fp16))):
        got = _explicit(ds, key, "enabled")
        if got != "auto" and bool(got) != want:
            raise LaunchError(f"{src}: deepspeed config has {key}.enabled={got} but the recipe has {key}: "
                              f"{str(want).lower()}; use \"auto\" in the DeepSpeed config")
    for ds_key, cfg_key in (("train_micro_batch_size_per_gpu", "per_device_train_batch_size"),
                            ("gradient_accumulation_steps", "gradient_accumulation_steps")):
        got = ds.get(ds_key, "auto")
        if got != "auto" and got != getattr(cfg, cfg_key):
            raise LaunchError(f"{src}: deepspeed config has {ds_key}={got} but the recipe has {cfg_key}: "
                              f"{getattr(cfg, cfg_key)}; use \"auto\" in the DeepSpeed config")
    if plan is not None and plan.device == "cpu" and stage == 3 and zero_offload(ds)[1]:
        raise LaunchError(f"{src}: ZeRO-3 parameter offload moves parameters to the host, which is "
                          "the device already on CPU; use recipes/deepspeed/ds_z3_config.json")
    return ds
