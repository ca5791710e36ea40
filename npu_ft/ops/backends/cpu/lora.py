"""cpu kernels of ``lora_linear`` / ``nf4_linear`` and their backward ops: the fused-addmm kernels
of :mod:`npu_ft.ops._lora_fused` (one ``addmm`` with the bias, the LoRA product added in place, no
full-size temporaries), registered on the CPU key.

``nf4_linear`` / ``nf4_linear_backward`` dequantize W into a **reused per-thread workspace** instead
of a new ``[out, in]`` tensor per call. Why: with glibc malloc, a fresh multi-MiB buffer per call
(17 MiB per Qwen2.5-0.5B MLP weight in fp32) is not given back to the OS once freed — freeing any
large mmap'd block (e.g. the fp32 weights freed while quantizing) raises glibc's dynamic mmap
threshold up to 32 MiB, after which such buffers come from the brk heap, and the heap fragments
around the small tensors allocated in between. Measured with ``bench/qlora_memory_probe.py`` (24
LoraLinear(Nf4Linear) layers 896x4864, fp32): torch's own live tensors peak at ~33 MiB, yet RSS grew
by ~400 MiB — the fp32 size of all 24 weights — while a fixed threshold
(``MALLOC_MMAP_THRESHOLD_=1048576``) or this workspace keeps it flat. A workspace holds the largest
W seen by the thread (one buffer, grown when a larger W comes) for the thread's lifetime: a bounded
cost of one dense weight, which every call needed transiently anyway. W is fully used before the
kernel returns (the outputs never alias it), so reuse is safe; the values, and so the results, are
bit-identical to dequantizing into a new tensor. ``NPU_FT_NF4_WORKSPACE=0`` turns it off;
:func:`release_workspace` frees the calling thread's buffer.
"""

from __future__ import annotations

import math
import os
import threading

import torch

from ... import _checks, _lora_fused, _registry
from . import nf4 as _cpu_nf4

__all__ = ["KERNELS", "release_workspace", "workspace_bytes", "ENV_WORKSPACE"]

ENV_WORKSPACE = "NPU_FT_NF4_WORKSPACE"

_LOCAL = threading.local()


def _workspace_enabled() -> bool:
    return os.environ.get(ENV_WORKSPACE, "1").strip().lower() not in ("0", "false", "no", "off")


def workspace_bytes() -> int:
    """Bytes held by the calling thread's dequantize workspace (0 if none)."""
    buf = getattr(_LOCAL, "buf", None)
    return 0 if buf is None else buf.numel()


def release_workspace() -> None:
    """Free the calling thread's dequantize workspace (the next NF4 linear call allocates a new one)."""
    _LOCAL.buf = None


def _workspace(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous ``[n]`` tensor of ``dtype`` viewing the thread's workspace (grown if too small)."""
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    buf = getattr(_LOCAL, "buf", None)
    if buf is None or buf.numel() < nbytes:
        _LOCAL.buf = None  # free the old one first
        # a normal (non-inference) tensor even under inference_mode, so it may be written anywhere
        with torch.inference_mode(False):
            buf = _cpu_nf4.empty_output((nbytes,), torch.uint8)
        _LOCAL.buf = buf
    return buf[:nbytes].view(dtype)


def _dequantize(packed, absmax, blocksize, weight_shape, dtype):
    """W ``[out, in]`` in ``dtype``; in the thread's workspace when possible (valid until the next call)."""
    if not _workspace_enabled() or packed.device.type != "cpu" or dtype not in _checks.FLOAT_DTYPES:
        return _lora_fused.dequantize_weight(packed, absmax, blocksize, weight_shape, dtype)
    n = math.prod(int(d) for d in weight_shape)
    _registry.KERNEL_CALLS[("nf4_dequantize", "cpu")] += 1  # the cpu dequantize kernel runs, into the workspace
    return _cpu_nf4.nf4_dequantize_into(packed, absmax, blocksize, weight_shape, dtype, _workspace(n, dtype))


def nf4_linear_cpu(x, packed, absmax, blocksize, weight_shape, bias, lora_A, lora_B, scaling, x_lora):
    weight = _dequantize(packed, absmax, blocksize, weight_shape, x.dtype)
    return _lora_fused.forward(x, weight, bias, lora_A, lora_B, scaling, x_lora, cast_branch_first=True)


def nf4_linear_backward_cpu(grad_out, x, packed, absmax, blocksize, weight_shape, lora_A, lora_B, h, scaling,
                            x_lora, output_mask):
    weight = _dequantize(packed, absmax, blocksize, weight_shape, x.dtype) if output_mask[0] else None
    return _lora_fused.backward(grad_out, x, weight, lora_A, lora_B, h, scaling, x_lora, output_mask)


KERNELS: _registry.KernelTable = {
    **_lora_fused.KERNELS,
    "nf4_linear": nf4_linear_cpu,
    "nf4_linear_backward": nf4_linear_backward_cpu,
}

