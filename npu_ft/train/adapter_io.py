"""LoRA adapters on disk in PEFT's format, so ``peft.PeftModel.from_pretrained`` loads them.

Files (what LLaMA-Factory writes for ``finetuning_type: lora``):

* ``adapter_config.json`` -- PEFT ``LoraConfig`` fields (r, lora_alpha, lora_dropout,
  target_modules, use_rslora, modules_to_save, base_model_name_or_path, task_type CAUSAL_LM,
  peft_type LORA, ...).
* ``adapter_model.safetensors`` -- PEFT key names without the adapter name:
  ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` for every LoRA layer and
  ``base_model.model.<module>.<param>`` for every ``modules_to_save`` module.

Writes are atomic: a new folder is written under a temporary name and renamed into place; into an
existing folder (a training output_dir) each file is written to a temporary name and renamed, the
weights first, the config last, so a reader never sees a config without its weights. Files and
folders get the modes ``open`` / ``mkdir`` would give them under the process umask (``tempfile``
alone makes them 0600 / 0700, unreadable to a serving pod or a colleague).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from npu_ft.modules.inject import (
    apply_lora,
    get_lora_spec,
    lora_modules,
    merge_adapter,
    modules_to_save,
)

from .outputs import chmod_like_open

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "PEFT_PREFIX",
    "adapter_config_dict",
    "adapter_state_dict",
    "load_adapter",
    "merge_adapter",
    "save_adapter",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's saved key names (CPU, contiguous, own dtype)."""
    if get_lora_spec(model) is None:
        raise ValueError("model has no LoRA adapters (apply_lora / apply_qlora first)")
    out: dict[str, torch.Tensor] = {}
    for name, module in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.weight
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.weight
    for name, module in modules_to_save(model).items():
        for pname, tensor in module.state_dict().items():
            out[f"{PEFT_PREFIX}{name}.{pname}"] = tensor
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def adapter_config_dict(model: nn.Module, cfg: Any = None,
                        base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """PEFT ``LoraConfig`` as JSON-ready dict for the model's adapters."""
    spec = get_lora_spec(model)
    if spec is None:
        raise ValueError("model has no LoRA adapters (apply_lora / apply_qlora first)")
    base = base_model_name_or_path or _get(cfg, "model_name_or_path")
    if base is None:
        base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    alpha = spec.lora_alpha
    if isinstance(alpha, float) and alpha.is_integer():
        alpha = int(alpha)
    try:
        import peft  # noqa: F401

        peft_version = peft.__version__
    except Exception:  # peft is optional for npu-ft itself
        peft_version = None
    config = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": str(base) if base is not None else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_dropout": spec.lora_dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": list(spec.modules_to_save) if spec.modules_to_save else None,
        "peft_type": "LORA",
        "r": spec.r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(spec.target_modules),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": spec.use_rslora,
    }
    if peft_version:
        config["peft_version"] = peft_version
    return config


def _write_files(out_dir: Path, files: dict[str, bytes]) -> None:
    """Write ``{name: bytes}`` atomically into ``out_dir`` (see module docstring)."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            chmod_like_open(tmp)
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            os.replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return
    for name, data in files.items():  # dict order: weights first, config last
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=out_dir)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            chmod_like_open(tmp_name)
            os.replace(tmp_name, out_dir / name)
        except BaseException:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
            raise


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, cfg: Any = None,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT format) to ``out_dir``."""
    from safetensors.torch import save

    weights = save(adapter_state_dict(model), metadata={"format": "pt"})
    config = json.dumps(adapter_config_dict(model, cfg, base_model_name_or_path), indent=2, sort_keys=True) + "\n"
    out = Path(out_dir)
    _write_files(out, {ADAPTER_WEIGHTS_NAME: weights, ADAPTER_CONFIG_NAME: config.encode("utf-8")})
    return out


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(adapter_dir) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_CONFIG_NAME} (not a LoRA adapter folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc}") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if config.get(key) == bad:
            raise ValueError(f"{path}: {key}: {bad} is not supported by npu-ft yet")
    if config.get("bias", "none") != "none" or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{path}: bias / rank_pattern / alpha_pattern are not supported by npu-ft yet")
    return config


@torch.no_grad()
def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a PEFT-format LoRA adapter into ``model`` (ours or PEFT's files).

    A model without adapters gets them first (:func:`~npu_ft.modules.inject.apply_lora` with the
    file's r / alpha / targets / modules_to_save; call :func:`apply_qlora` yourself beforehand for
    a quantized base). ``strict``: every tensor of the file must have a place and vice versa.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_adapter_config(adapter_dir)
    if get_lora_spec(model) is None:
        target = config.get("target_modules")
        if isinstance(target, str):
            raise ValueError(f"{adapter_dir}: regex target_modules ({target!r}) are not supported yet")
        apply_lora(model, list(target), r=int(config["r"]), alpha=config.get("lora_alpha", 8),
                   dropout=float(config.get("lora_dropout", 0.0)), use_rslora=bool(config.get("use_rslora")),
                   additional_target=config.get("modules_to_save"))
    weights_path = Path(adapter_dir) / ADAPTER_WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_WEIGHTS_NAME}")
    try:
        tensors = load_file(str(weights_path))
    except SafetensorError as exc:
        raise ValueError(f"{weights_path}: truncated or corrupt ({exc})") from None
    places: dict[str, torch.Tensor] = {}
    for name, module in lora_modules(model).items():
        places[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.weight
        places[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.weight
    for name, module in modules_to_save(model).items():
        for pname, tensor in module.state_dict(keep_vars=True).items():
            places[f"{PEFT_PREFIX}{name}.{pname}"] = tensor
    # accept PEFT's in-memory names too (".lora_A.default.weight", ".modules_to_save.default.")
    normalised = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
                  .replace(".modules_to_save.default.", "."): v for k, v in tensors.items()}
    missing = sorted(set(places) - set(normalised))
    unexpected = sorted(set(normalised) - set(places))
    if strict and (missing or unexpected):
        raise ValueError(f"{weights_path}: adapter does not fit the model: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for key, dest in places.items():
        if key not in normalised:
            continue
        src = normalised[key]
        if tuple(src.shape) != tuple(dest.shape):
            raise ValueError(f"{weights_path}: {key} has shape {tuple(src.shape)}, model expects {tuple(dest.shape)}")
        dest.data.copy_(src.to(device=dest.device, dtype=dest.dtype))
    return model
