"""What every bench implementation shares when it measures a case: the batches it trains on, the
heap trim before the peak is reset, the versions it records, and the timing/throughput fields of
its result. (One module, so the in-process worker and the LLaMA-Factory runner cannot drift apart.)"""

from __future__ import annotations

import ctypes
import gc
import math
import statistics
from typing import Any

__all__ = ["make_batches", "timing_fields", "trim_heap", "versions"]


def trim_heap() -> None:
    """Give freed heap pages back to the OS so the training-phase peak starts from live memory
    (glibc keeps freed blocks otherwise, e.g. the fp32 weights QLoRA quantized away)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def make_batches(case: Any, vocab_size: int) -> list:
    """Deterministic token batches ``[batch_size, seq_len]`` (int64): a small pool of random sequences,
    cycled (so the loss falls), one batch per warmup + timed step."""
    import torch

    g = torch.Generator().manual_seed(1_000_003 + case.seed)
    hi = min(vocab_size, 32000)
    pool = torch.randint(0, hi, (case.data_pool, case.seq_len), generator=g)
    batches = []
    for step in range(case.warmup + case.steps):
        idx = [(step * case.batch_size + i) % case.data_pool for i in range(case.batch_size)]
        batches.append(pool[idx].clone())
    return batches


def versions() -> dict[str, Any]:
    """Package versions and the git commit, for the report."""
    from npu_ft.env_info import git_commit, package_versions

    v = package_versions(("torch", "torch_npu", "transformers", "peft", "bitsandbytes", "npu-ft"))
    return {"versions": {k: (val or "not installed") for k, val in v.items()}, "git_commit": git_commit() or "unknown"}


def timing_fields(case: Any, losses: list[float], step_s: list[float]) -> dict[str, Any]:
    """The result fields that follow from per-step losses and times (the warmup steps are not timed):
    medians, min/max, tokens per second; ``status`` failed on a non-finite loss."""
    timed = step_s[case.warmup:]
    tokens = case.batch_size * case.seq_len
    med = statistics.median(timed)
    out: dict[str, Any] = dict(
        status="ok", error="",
        s_per_step_median=med, s_per_step_min=min(timed), s_per_step_max=max(timed),
        tokens_per_s=tokens / med, tokens_per_s_min=tokens / max(timed), tokens_per_s_max=tokens / min(timed),
        losses=losses, step_s=step_s,
    )
    if not all(math.isfinite(loss) for loss in losses):
        out.update(status="failed", error=f"non-finite loss: {losses}")
    return out
