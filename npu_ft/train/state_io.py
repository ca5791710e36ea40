"""Optimizer, LR-scheduler, grad-scaler and RNG state in safetensors files instead of pickles.

A state is a nested structure of dicts, lists, tuples, tensors, numpy arrays and JSON scalars --
what ``optimizer.state_dict()``, ``lr_scheduler.state_dict()``, ``GradScaler.state_dict()`` and
the RNG states are. :func:`save_state` writes its tensors into one safetensors file and the
structure, with each tensor replaced by a reference, as JSON in that file's metadata;
:func:`load_state` reads it back. Nothing is unpickled. A value of any other type raises
:class:`UnsupportedStateError`, so the caller can fall back to ``torch.save``.

JSON form: a tensor is ``{"__tensor__": key}``; a numpy array ``{"__ndarray__": key, "dtype": ...,
"shape": [...]}`` (its bytes as a uint8 tensor); a tuple ``{"__tuple__": [...]}``; a dict
``{"__dict__": [[key, value], ...]}`` (keys: str, int, float, bool or None); lists and scalars as
they are (NaN / inf as JSON's common extension).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

__all__ = ["STATE_KEY", "UnsupportedStateError", "decode", "encode", "load_state", "save_state"]

#: safetensors metadata key holding the JSON structure
STATE_KEY = "npu_ft_state"
_KEY_TYPES = (str, int, float, bool, type(None))


class UnsupportedStateError(TypeError):
    """The state holds a value that is neither a tensor, an array nor JSON."""


def encode(obj: Any, tensors: dict[str, torch.Tensor], _ids: dict[int, str] | None = None) -> Any:
    """``obj`` as JSON-ready data; its tensors are added to ``tensors`` (the same tensor once)."""
    ids = {} if _ids is None else _ids
    if isinstance(obj, torch.Tensor):
        if id(obj) not in ids:
            ids[id(obj)] = key = f"t{len(tensors)}"
            tensors[key] = obj
        return {"__tensor__": ids[id(obj)]}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).view(np.uint8).reshape(-1).copy())
        return {"__ndarray__": key, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, ids) for v in obj]}
    if isinstance(obj, list):
        return [encode(v, tensors, ids) for v in obj]
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, _KEY_TYPES)]
        if bad:
            raise UnsupportedStateError(f"dict key {bad[0]!r} ({type(bad[0]).__name__}) cannot be stored")
        return {"__dict__": [[k, encode(v, tensors, ids)] for k, v in obj.items()]}
    raise UnsupportedStateError(f"a {type(obj).__module__}.{type(obj).__name__} value cannot be stored")


def decode(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(data, list):
        return [decode(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if "__tensor__" in data:
        return tensors[data["__tensor__"]]
    if "__ndarray__" in data:
        raw = tensors[data["__ndarray__"]].cpu().numpy().tobytes()
        return np.frombuffer(raw, dtype=np.dtype(data["dtype"])).reshape(data["shape"]).copy()
    if "__tuple__" in data:
        return tuple(decode(v, tensors) for v in data["__tuple__"])
    if "__dict__" in data:
        return {k: decode(v, tensors) for k, v in data["__dict__"]}
    raise ValueError(f"unknown entry {sorted(data)} in a saved state")


def _cpu_unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no two tensors sharing memory (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel():
            ptr = tensor.untyped_storage().data_ptr()
            if ptr in seen:
                tensor = tensor.clone()
            seen.add(ptr)
        out[key] = tensor
    return out


def save_state(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` (safetensors); raises :class:`UnsupportedStateError` before writing."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(encode(obj, tensors), separators=(",", ":"))
    save_file(_cpu_unshared(tensors), os.fspath(path), metadata={STATE_KEY: tree, "format": "pt"})


def load_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """Read a state written by :func:`save_state` (tensors on ``device``)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
        metadata = f.metadata() or {}
        if STATE_KEY not in metadata:
            raise ValueError(f"{path}: not a state file written by npu-ft (no {STATE_KEY!r} metadata)")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return decode(json.loads(metadata[STATE_KEY]), tensors)
