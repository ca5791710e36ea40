"""CUDA backend (NVIDIA, and ROCm builds of torch, which answer to the same API)."""

from __future__ import annotations

from types import ModuleType

import torch

from ._accelerator import AcceleratorBackend


class CudaBackend(AcceleratorBackend):
    name = "cuda"
    dist_backend = "nccl"

    def runtime(self) -> ModuleType:
        return torch.cuda

    def unavailable_reason(self) -> str | None:
        if not torch.backends.cuda.is_built():
            return "this torch build has no CUDA support"
        if not torch.cuda.is_available():
            return "no CUDA device visible (check the driver and CUDA_VISIBLE_DEVICES)"
        return None
