"""What every bench implementation shares when it measures a case: the heap trim before the peak is
reset, the versions it records, and the timing/throughput fields of its result (the batches are
:mod:`npu_ft.bench.data`'s). One module, so the in-process worker and the LLaMA-Factory runner
cannot drift apart."""

from __future__ import annotations

import ctypes
import gc
import math
import statistics
from typing import Any

__all__ = ["PROBE_ENV", "file_rss_bytes", "step_counts", "tensor_increment", "timing_fields", "trim_heap", "versions"]

#: the environment of a memory probe (npu_ft.bench.runner): glibc's mmap threshold fixed at its initial
#: 128 KiB (M_MMAP_THRESHOLD; glibc then never raises it, so freed tensors leave the resident set)
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def trim_heap() -> None:
    """Give freed heap pages back to the OS so the training-phase peak starts from live memory
    (glibc keeps freed blocks otherwise, e.g. the fp32 weights QLoRA quantized away)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def file_rss_bytes() -> int | None:
    """Resident pages of mapped files (``RssFile`` in /proc/self/status: the code of torch's
    libraries, first touched by the kernels a phase runs), or None where there is no such file.

    How many pages a first call maps depends on the page cache (a library pip has just written sits
    in large folios, mapped whole: a fresh install measured ~17 MiB more for the same training step),
    so memory checks that want the tensors subtract its growth."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssFile:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def tensor_increment(result: dict) -> int:
    """A memory probe's training increment without the library pages it mapped, in bytes."""
    return int(result["peak_mem_bytes"] - result["baseline_mem_bytes"] - result["file_rss_growth_bytes"])


def versions() -> dict[str, Any]:
    """Package versions and the git commit, for the report."""
    from npu_ft.env_info import git_commit, package_versions

    v = package_versions(("torch", "torch_npu", "transformers", "peft", "bitsandbytes", "npu-ft"))
    return {"versions": {k: (val or "not installed") for k, val in v.items()}, "git_commit": git_commit() or "unknown"}


def step_counts(batches: list) -> dict[str, list[int]]:
    """Per step: example tokens (no padding), labelled tokens, and positions (padding included)."""
    return {"step_tokens": [b.tokens for b in batches], "step_labelled": [b.labelled for b in batches],
            "step_positions": [b.positions for b in batches]}


def rates(counts: list[int], seconds: list[float]) -> list[float]:
    """Per-step rates ``counts[i] / seconds[i]``."""
    return [c / s for c, s in zip(counts, seconds, strict=True)]


def timing_fields(case: Any, losses: list[float], step_s: list[float], counts: dict[str, list[int]]) -> dict[str, Any]:
    """The result fields that follow from per-step losses, times and token counts (the warmup steps
    are not timed): medians and min/max of the per-step rates (tokens/s counts example tokens, not
    padding; labelled_tokens_per_s the loss targets; positions_per_s every position the model ran);
    ``status`` failed on a non-finite loss."""
    w = case.warmup
    timed = step_s[w:]
    tok = rates(counts["step_tokens"][w:], timed)
    out: dict[str, Any] = dict(
        status="ok", error="",
        s_per_step_median=statistics.median(timed), s_per_step_min=min(timed), s_per_step_max=max(timed),
        tokens_per_s=statistics.median(tok), tokens_per_s_min=min(tok), tokens_per_s_max=max(tok),
        labelled_tokens_per_s=statistics.median(rates(counts["step_labelled"][w:], timed)),
        positions_per_s=statistics.median(rates(counts["step_positions"][w:], timed)),
        losses=losses, step_s=step_s, **counts,
    )
    if not all(math.isfinite(loss) for loss in losses):
        out.update(status="failed", error=f"non-finite loss: {losses}")
    return out
