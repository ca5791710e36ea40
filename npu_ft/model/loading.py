"""Loading a Qwen2 / Qwen3 causal LM from a local folder (config.json + *.safetensors).

npu-ft never downloads: ``model_name_or_path`` must be a local folder. Anything else fails up front
with :class:`ModelLoadError` saying what is missing and how to fix it.

>>> from npu_ft.model import load_model  # doctest: +SKIP
>>> model = load_model("out/tiny-qwen2", device="cpu", dtype="float32")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ModelLoadError",
    "attn_implementation",
    "check_safetensors",
    "compute_dtype",
    "load_model",
    "TOKENIZER_FILES",
    "has_tokenizer_files",
    "load_tokenizer",
    "resolve_dtype",
    "resolve_model_path",
]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

#: LLaMA-Factory ``flash_attn`` -> transformers ``attn_implementation`` (None: transformers' choice)
_ATTN = {"auto": None, "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2",
         "fa3": "flash_attention_3"}


class ModelLoadError(FileNotFoundError):
    """The model folder is missing, not local, or has no safetensors weights."""


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """Check that ``path`` is a local model folder with config.json and safetensors weights."""
    if path is None or str(path).strip() == "":
        raise ModelLoadError("model_name_or_path is not set: give the path of a local model folder")
    folder = Path(os.path.expanduser(str(path)))
    if not folder.exists():
        raise ModelLoadError(f"model_name_or_path '{path}' does not exist (not a local folder).{_download_hint(path)}")
    if not folder.is_dir():
        raise ModelLoadError(f"model_name_or_path '{path}' is a file; expected a model folder")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model folder '{path}' has no config.json")
    has_weights = any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()
    if not has_weights:
        other = sorted(p.name for p in folder.glob("*.bin"))
        extra = (f" (found {', '.join(other[:3])}: convert pickle checkpoints to safetensors first)"
                 if other else "")
        raise ModelLoadError(f"model folder '{path}' has no *.safetensors weights{extra}")
    for weights in sorted(folder.glob("*.safetensors")):
        problem = check_safetensors(weights)
        if problem:
            raise ModelLoadError(f"model folder '{path}': {weights.name} is truncated or corrupt ({problem})")
    return folder


def _download_hint(path: str | os.PathLike) -> str:
    """How to fetch the model into ``path``: a hub id as given, or Qwen/<folder name> for a Qwen folder."""
    text = str(path).rstrip("/")
    name = Path(text).name
    is_hub_id = (not Path(text).is_absolute() and text.count("/") == 1 and not text.startswith(".")
                 and text.split("/")[0] not in ("models", "saves", "data", "output", "outputs"))
    repo = text if is_hub_id else (f"Qwen/{name}" if name.lower().startswith("qwen") else None)
    if repo is None:
        return ""
    target = f"models/{name}" if is_hub_id else text
    return (f" npu-ft does not download models: fetch it first with `hf download {repo} --local-dir {target}` "
            f"(or `modelscope download --model {repo} --local_dir {target}`) and point model_name_or_path at "
            f"'{target}'.")


#: files of which a model folder needs one for its tokenizer to load (without them transformers
#: builds an empty tokenizer, and training would run on nothing)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "*.tiktoken")


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    return any(any(Path(folder).glob(pattern)) for pattern in TOKENIZER_FILES)


def load_tokenizer(folder: str | os.PathLike, trust_remote_code: bool = False, use_fast: bool = True,
                   **init_kwargs: Any):
    """The tokenizer saved in a local model folder; :class:`ModelLoadError` naming the folder when it
    has no tokenizer files or they do not load. ``init_kwargs`` are kept by transformers and saved
    into tokenizer_config.json."""
    from transformers import AutoTokenizer

    if not has_tokenizer_files(folder):
        raise ModelLoadError(f"model folder '{folder}' has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
                             "put the tokenizer next to the weights")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code,
                                             use_fast=use_fast, **init_kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"model folder '{folder}': cannot load its tokenizer ({exc}); put the tokenizer files "
                             "next to the weights") from None


#: the safetensors format's limit on the JSON header
_MAX_HEADER = 100 << 20


def check_safetensors(path: str | os.PathLike) -> str | None:
    """Check a safetensors file's framing without reading the tensors: the 8-byte header length,
    the JSON header, and that the file ends exactly where the last tensor does. Returns what is
    wrong, or None."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than the 8-byte header length"
        length = int.from_bytes(head, "little")
        if length > min(size - 8, _MAX_HEADER):
            return f"header length {length} but the file has {size} bytes"
        try:
            header = json.loads(f.read(length))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            return f"unreadable header: {exc}"
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        return f"{size} bytes, its header describes {expected}"
    return None


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(sorted(_DTYPES))}") from None


def compute_dtype(cfg: Any) -> torch.dtype:
    """LLaMA-Factory's compute dtype: bf16 -> bfloat16, fp16 -> float16, else float32."""
    if _get(cfg, "bf16", False):
        return torch.bfloat16
    if _get(cfg, "fp16", False):
        return torch.float16
    return torch.float32


def attn_implementation(flash_attn: str | None) -> str | None:
    """``flash_attn`` (auto | disabled | sdpa | fa2 | fa3) -> transformers' attn_implementation."""
    key = (flash_attn or "auto").lower()
    if key not in _ATTN:
        raise ValueError(f"flash_attn: expected one of {', '.join(_ATTN)}, got {flash_attn!r}")
    return _ATTN[key]


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def load_model(cfg_or_args: Any, device: Any = None, dtype: torch.dtype | str | None = None, **kwargs: Any):
    """Load ``AutoModelForCausalLM`` from a local folder, safetensors only, no network.

    Args:
        cfg_or_args: an :class:`~npu_ft.config.SftConfig`, a mapping with the same keys, or
            the model folder path itself.
        device: where to put the model: a name ("cpu", "cuda:0", "npu"), a ``torch.device``, a
            :class:`~npu_ft.device.DeviceBackend`, or None to leave it on CPU (e.g. to quantize
            before moving).
        dtype: weight dtype; None = the compute dtype of the config (bf16/fp16/fp32).
        kwargs: extra ``from_pretrained`` arguments.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(cfg_or_args, (str, os.PathLike)):
        cfg: Any = {"model_name_or_path": os.fspath(cfg_or_args)}
    else:
        cfg = cfg_or_args
    folder = resolve_model_path(_get(cfg, "model_name_or_path"))
    torch_dtype = resolve_dtype(dtype) if dtype is not None else compute_dtype(cfg)
    load_kwargs: dict[str, Any] = {
        "trust_remote_code": bool(_get(cfg, "trust_remote_code", False)),
        "dtype": torch_dtype,
        "use_safetensors": True,
        "local_files_only": True,
    }
    if _get(cfg, "cache_dir") is not None:
        load_kwargs["cache_dir"] = _get(cfg, "cache_dir")
    attn = attn_implementation(_get(cfg, "flash_attn", "auto"))
    if attn is not None:
        load_kwargs["attn_implementation"] = attn
    load_kwargs.update(kwargs)
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **load_kwargs)
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelLoadError(f"could not load the model from '{folder}': {exc}") from exc
    target = _torch_device(device)
    if target is not None:
        model = model.to(target)
    return model


def _torch_device(device: Any) -> torch.device | None:
    if device is None:
        return None
    if isinstance(device, torch.device):
        return device
    if hasattr(device, "torch_device"):
        return device.torch_device()
    return torch.device(str(device))
