"""Argument checks shared by the ops' Python entry points.

Each check raises ``TypeError`` (wrong dtype / not a tensor) or ``ValueError`` (wrong shape, value
or device) whose message starts with the argument's name, before any kernel runs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(
    name: str, value, dtypes: Iterable[torch.dtype] | None = None, ndim: int | None = None
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(
                f"{name}: dtype {str(value.dtype).replace('torch.', '')} not supported (expected {allowed})"
            )
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def check_same_device(reference_name: str, reference: torch.Tensor, **others) -> None:
    """Every tensor in ``others`` (None allowed) must sit on ``reference``'s device."""
    for name, tensor in others.items():
        if tensor is not None and tensor.device != reference.device:
            raise ValueError(f"{name}: on device {tensor.device}, but {reference_name} is on {reference.device}")


def check_dim(name: str, actual: int, expected: int, what: str) -> None:
    if actual != expected:
        raise ValueError(f"{name}: {what} is {actual}, expected {expected}")
