"""LoRA-family adapters on disk in PEFT's format, so ``peft.PeftModel.from_pretrained`` loads them.

Files (what LLaMA-Factory writes for ``finetuning_type: lora``):

* ``adapter_config.json`` -- PEFT ``LoraConfig`` fields (r, lora_alpha, lora_dropout,
  target_modules, use_rslora, use_dora, init_lora_weights, modules_to_save,
  base_model_name_or_path, task_type CAUSAL_LM, peft_type LORA, ...), or ``VeraConfig`` fields
  (peft_type VERA: r, projection_prng_key, save_projection, d_initial, vera_dropout, ...).
* ``adapter_model.safetensors`` -- PEFT key names without the adapter name:
  ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` for every LoRA layer (plus
  ``.lora_magnitude_vector`` with DoRA), ``.vera_lambda_b`` / ``.vera_lambda_d`` for every VeRA
  layer (plus the shared ``base_model.vera_A`` / ``base_model.vera_B`` with save_projection), and
  ``base_model.model.<module>.<param>`` for every ``modules_to_save`` module.

PiSSA: the trained adapter is saved with PEFT's ``init_lora_weights: pissa_niter_<N>`` (its base is
the residual); :func:`save_pissa_converted` writes the equivalent plain LoRA of the original weights
(rank 2r, PEFT's conversion), as LLaMA-Factory's ``pissa_convert`` does.

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

from npu_ft.modules.dora import DoraLinear
from npu_ft.modules.inject import (
    apply_lora,
    apply_vera,
    get_lora_spec,
    lora_modules,
    merge_adapter,
    modules_to_save,
)
from npu_ft.modules.pissa import parse_pissa_init, pissa_to_lora
from npu_ft.modules.vera import PROJECTIONS_ATTR, VeraSpec, vera_modules

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
    "save_pissa_converted",
    "save_pissa_init",
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


def _adapter_places(model: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """``{PEFT saved key: the model's tensor}`` for every adapter tensor of the model."""
    spec = get_lora_spec(model)
    if spec is None:
        raise ValueError("model has no adapters (apply_lora / apply_qlora / apply_vera first)")
    out: dict[str, torch.Tensor] = {}
    if isinstance(spec, VeraSpec):
        for name, module in vera_modules(model).items():
            out[f"{PEFT_PREFIX}{name}.vera_lambda_b"] = module.vera_lambda_b
            out[f"{PEFT_PREFIX}{name}.vera_lambda_d"] = module.vera_lambda_d
        if spec.save_projection:
            projections = getattr(model, PROJECTIONS_ATTR)
            out["base_model.vera_A"], out["base_model.vera_B"] = projections.vera_A, projections.vera_B
    else:
        for name, module in lora_modules(model).items():
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.weight
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.weight
            if isinstance(module, DoraLinear):
                out[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = module.lora_magnitude_vector
    for name, module in modules_to_save(model).items():
        for pname, tensor in module.state_dict(keep_vars=keep_vars).items():
            out[f"{PEFT_PREFIX}{name}.{pname}"] = tensor
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's saved key names (CPU, contiguous, own dtype)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in _adapter_places(model).items()}


def adapter_config_dict(model: nn.Module, cfg: Any = None,
                        base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """PEFT ``LoraConfig`` (``VeraConfig`` for VeRA) as JSON-ready dict for the model's adapters."""
    spec = get_lora_spec(model)
    if spec is None:
        raise ValueError("model has no adapters (apply_lora / apply_qlora / apply_vera first)")
    base = base_model_name_or_path or _get(cfg, "model_name_or_path")
    if base is None:
        base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    try:
        import peft  # noqa: F401

        peft_version = peft.__version__
    except Exception:  # peft is optional for npu-ft itself
        peft_version = None
    config = _vera_config(spec) if isinstance(spec, VeraSpec) else _lora_config(spec)
    config["base_model_name_or_path"] = str(base) if base is not None else None
    if peft_version:
        config["peft_version"] = peft_version
    return config


def _vera_config(spec: VeraSpec) -> dict[str, Any]:
    return {
        "auto_mapping": None,
        "bias": "none",
        "d_initial": spec.d_initial,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "modules_to_save": list(spec.modules_to_save) if spec.modules_to_save else None,
        "peft_type": "VERA",
        "projection_prng_key": spec.projection_prng_key,
        "r": spec.r,
        "revision": None,
        "save_projection": spec.save_projection,
        "target_modules": sorted(spec.target_modules),
        "task_type": "CAUSAL_LM",
        "vera_dropout": spec.vera_dropout,
    }


def _lora_config(spec) -> dict[str, Any]:
    alpha = spec.lora_alpha
    if isinstance(alpha, float) and alpha.is_integer():
        alpha = int(alpha)
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": spec.init_lora_weights,
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
        "use_dora": spec.use_dora,
        "use_rslora": spec.use_rslora,
    }


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
    return _save_files(out_dir, adapter_state_dict(model), adapter_config_dict(model, cfg, base_model_name_or_path))


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The adapter folder's ``adapter_config.json``, checked for what npu-ft can load (LORA incl. DoRA and
    PiSSA, or VERA); anything else is a ``ValueError`` naming the file and the key."""
    path = Path(adapter_dir) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_CONFIG_NAME} (not a LoRA adapter folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc}") from exc
    peft_type = config.get("peft_type", "LORA")
    if peft_type not in ("LORA", "VERA"):
        raise ValueError(f"{path}: peft_type {peft_type!r} is not supported (LORA or VERA)")
    if config.get("fan_in_fan_out"):
        raise ValueError(f"{path}: fan_in_fan_out: true is not supported by npu-ft yet")
    if config.get("bias", "none") != "none" or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{path}: bias / rank_pattern / alpha_pattern are not supported by npu-ft yet")
    init = config.get("init_lora_weights", True)
    if peft_type == "LORA" and not isinstance(init, bool):
        try:
            parse_pissa_init(init)
        except ValueError:
            raise ValueError(f"{path}: init_lora_weights {init!r} is not supported by npu-ft (true, false, pissa or "
                             "pissa_niter_<N>)") from None
    return config


def _inject_from_config(model: nn.Module, config: dict[str, Any], adapter_dir) -> None:
    """Put the adapters a config describes on a model that has none."""
    target = config.get("target_modules")
    if isinstance(target, str):
        raise ValueError(f"{adapter_dir}: regex target_modules ({target!r}) are not supported yet")
    if config.get("peft_type") == "VERA":
        apply_vera(model, list(target), r=int(config["r"]), d_initial=float(config.get("d_initial", 0.1)),
                   projection_prng_key=int(config.get("projection_prng_key", 0)),
                   save_projection=bool(config.get("save_projection", True)),
                   dropout=float(config.get("vera_dropout", 0.0)), additional_target=config.get("modules_to_save"))
        return
    apply_lora(model, list(target), r=int(config["r"]), alpha=config.get("lora_alpha", 8),
               dropout=float(config.get("lora_dropout", 0.0)), use_rslora=bool(config.get("use_rslora")),
               additional_target=config.get("modules_to_save"), use_dora=bool(config.get("use_dora")),
               init_lora_weights=config.get("init_lora_weights", True))


#: PEFT's in-memory key spellings (adapter name inside) -> its saved ones
_IN_MEMORY_NAMES = ((".lora_A.default.", ".lora_A."), (".lora_B.default.", ".lora_B."),
                    (".lora_magnitude_vector.default.weight", ".lora_magnitude_vector"),
                    (".vera_lambda_b.default", ".vera_lambda_b"), (".vera_lambda_d.default", ".vera_lambda_d"),
                    ("base_model.vera_A.default", "base_model.vera_A"),
                    ("base_model.vera_B.default", "base_model.vera_B"), (".modules_to_save.default.", "."))


def _saved_name(key: str) -> str:
    for old, new in _IN_MEMORY_NAMES:
        key = key.replace(old, new)
    return key


@torch.no_grad()
def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a PEFT-format LoRA / DoRA / PiSSA / VeRA adapter into ``model`` (ours or PEFT's files).

    A model without adapters gets them first (:func:`~npu_ft.modules.inject.apply_lora` or
    :func:`~npu_ft.modules.inject.apply_vera` with the file's settings; call :func:`apply_qlora`
    yourself beforehand for a quantized base). ``strict``: every tensor of the file must have a
    place and vice versa.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_adapter_config(adapter_dir)
    if get_lora_spec(model) is None:
        _inject_from_config(model, config, adapter_dir)
    weights_path = Path(adapter_dir) / ADAPTER_WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_WEIGHTS_NAME}")
    try:
        tensors = load_file(str(weights_path))
    except SafetensorError as exc:
        raise ValueError(f"{weights_path}: truncated or corrupt ({exc})") from None
    normalised = {_saved_name(k): v for k, v in tensors.items()}
    places = _adapter_places(model, keep_vars=True)
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


# ---------------------------------------------------------------------------------------------
# PiSSA: the trained adapter as a plain LoRA of the original weights
# ---------------------------------------------------------------------------------------------
def save_pissa_init(model: nn.Module, out_dir: str | os.PathLike, cfg: Any = None,
                    base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapter as it is now (call it before training) with ``init_lora_weights: true``:
    the ``pissa_init`` folder that :func:`save_pissa_converted` needs (LLaMA-Factory's layout)."""
    spec = get_lora_spec(model)
    if spec is None or isinstance(spec, VeraSpec) or spec.init_lora_weights is True:
        raise ValueError("pissa_convert: the model's adapter was not initialized with PiSSA (pissa_init: true)")
    config = adapter_config_dict(model, cfg, base_model_name_or_path)
    config["init_lora_weights"] = True
    return _save_files(out_dir, adapter_state_dict(model), config)


def _save_files(out_dir, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    from safetensors.torch import save

    weights = save(tensors, metadata={"format": "pt"})
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _write_files(Path(out_dir), {ADAPTER_WEIGHTS_NAME: weights, ADAPTER_CONFIG_NAME: text.encode("utf-8")})
    return Path(out_dir)


def save_pissa_converted(model: nn.Module, out_dir: str | os.PathLike, init_dir: str | os.PathLike, cfg: Any = None,
                         base_model_name_or_path: str | None = None) -> Path:
    """Write the trained PiSSA adapter as a LoRA of the *original* weights (PEFT's
    ``save_pretrained(path_initial_model_for_weight_conversion=init_dir)``): ``A' = [A ; A0]``,
    ``B' = [B | -B0]``, rank 2r, ``lora_alpha`` x2 (x sqrt(2) with rsLoRA), ``init_lora_weights: true``.
    ``modules_to_save`` tensors are written too (PEFT's conversion drops them)."""
    from safetensors.torch import load_file

    spec = get_lora_spec(model)
    if spec is None or isinstance(spec, VeraSpec):
        raise ValueError("pissa_convert: the model has no LoRA adapter")
    if spec.use_dora:
        raise ValueError("pissa_convert: a DoRA adapter cannot be converted (its magnitude depends on the base)")
    init = {_saved_name(k): v for k, v in load_file(str(Path(init_dir) / ADAPTER_WEIGHTS_NAME)).items()}
    tensors = adapter_state_dict(model)
    alpha = spec.lora_alpha
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        key_b = key[: -len(".lora_A.weight")] + ".lora_B.weight"
        if key not in init or key_b not in init:
            raise ValueError(f"{init_dir}: no initial tensors for {key} (not this model's pissa_init adapter)")
        tensors[key], tensors[key_b], alpha = pissa_to_lora(tensors[key], tensors[key_b], init[key].to(tensors[key]),
                                                            init[key_b].to(tensors[key_b]), spec.lora_alpha,
                                                            spec.use_rslora)
    config = adapter_config_dict(model, cfg, base_model_name_or_path)
    config.update(init_lora_weights=True, r=2 * spec.r, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha)
    return _save_files(out_dir, tensors, config)
