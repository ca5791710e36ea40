"""Runs ONE benchmark case in this process and writes its result as JSON.

    python -m npu_ft.bench.worker CASE.json RESULT.json

The runner starts a fresh process per case, so the peak memory it reports is this case's alone.
Phases: build (model + adapters; not measured) → reset the peak → train (warmup + timed steps) →
read the peak → time the device's GEMMs at the model's shapes (for MFU). The training loop is the
same for every implementation: AdamW (``case.optim``: torch's, or 8-bit, :mod:`npu_ft.bench.optimizers`)
over the trainable parameters, one optimizer step per batch, the same batches
(:mod:`npu_ft.bench.data`) from the same seed.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch

from .data import make_batches
from .measure import file_rss_bytes, step_counts, timing_fields, trim_heap, versions
from .optimizers import build_optimizer, state_bytes


def run_case(case) -> dict:
    """Run ``case`` (a :class:`~npu_ft.bench.suite.BenchCase`) here; returns the result dict."""
    from npu_ft.device import get_backend

    from . import impls, registry
    from .shapes import build_model, model_config

    runner = registry.case_runner(case.implementation)
    if runner is not None:  # an implementation that runs the whole case itself (e.g. LLaMA-Factory)
        return runner(case)
    t_start = time.perf_counter()
    backend = get_backend(case.device)
    device = backend.torch_device(0)
    backend.set_device(device)
    dtype = impls.torch_dtype(case.dtype)
    cfg = model_config(case.model, case.model_overrides)
    result: dict = {"case": case.to_dict(), "device_name": backend.device_name(), **versions()}

    def factory():
        return build_model(case.model, case.seed, dtype, case.model_overrides)

    build = registry.builder(case.implementation)
    assert build is not None
    t0 = time.perf_counter()
    prepared = build(case, factory, device)
    model = prepared.model
    model.train()
    trainable, total = impls.count_params(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters")
    result.update(trainable_params=trainable, total_params=total, weight_bytes=impls.weight_bytes(model),
                  features=prepared.features, build_s=time.perf_counter() - t0)
    opt = build_optimizer(case, model, params)
    batches = make_batches(case, cfg.vocab_size)

    loss_fn = prepared.loss_fn or (lambda m, inputs: m(**inputs).loss)
    if device.type == "cpu":  # the kernel library's one-time load belongs to the build, not to training
        from npu_ft.ops.backends.cpu import load_native

        load_native()

    trim_heap()
    backend.synchronize()
    backend.reset_peak_memory()
    baseline = backend.memory().current_bytes
    file_baseline = file_rss_bytes()
    losses, step_s = [], []
    torch.manual_seed(case.seed)  # dropout masks
    for batch in batches:
        backend.synchronize()
        t = time.perf_counter()
        loss = loss_fn(model, batch.model_inputs(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        backend.synchronize()
        step_s.append(time.perf_counter() - t)
        losses.append(float(loss.detach().float().item()))
    mem = backend.memory()
    file_end = file_rss_bytes()
    if device.type == "cpu" and file_baseline is not None and file_end is not None:
        result["file_rss_growth_bytes"] = file_end - file_baseline  # library code first run in training
    result["optimizer_state_bytes"] = state_bytes(opt)
    if prepared.cleanup:
        prepared.cleanup()
    del model, prepared, opt, params, loss  # before the GEMM timing
    result.update(peak_mem_bytes=int(mem.peak_bytes), mem_kind=mem.kind, baseline_mem_bytes=int(baseline),
                  **timing_fields(case, losses, step_s, step_counts(batches)),
                  **mfu_fields(case, cfg, batches, step_s, dtype, device, backend))
    result["wall_s"] = time.perf_counter() - t_start
    return result


def mfu_fields(case, cfg, batches, step_s: list[float], dtype, device, backend) -> dict:
    """Model FLOPs per token, achieved FLOP/s, the GEMM peak measured here and MFU (npu_ft.bench.flops)."""
    import statistics

    from npu_ft.launch.estimate import ModelShape

    from .flops import gemm_peak_flops, spec_tflops, step_flops
    from .impls import lora_targets

    shape = ModelShape.from_config(cfg, case.model)
    per_step = [step_flops(shape, case.method, b.positions, b.input_ids.shape[1], b.labelled,
                           case.lora["r"] if case.method != "full" else 0, lora_targets(case))["total"]
                for b in batches]
    w = case.warmup
    achieved = statistics.median(f / t for f, t in zip(per_step[w:], step_s[w:], strict=True))
    peak = gemm_peak_flops(shape, batches[0].positions, dtype, device, backend.synchronize)
    spec = spec_tflops(backend.device_name(), case.dtype)
    return {"model_flops_per_token": sum(per_step[w:]) / max(1, sum(b.tokens for b in batches[w:])),
            "achieved_flops": achieved, "gemm_peak_flops": peak, "mfu": achieved / peak,
            "spec_peak_flops": spec * 1e12 if spec else None}


def main(argv=None) -> int:
    from .suite import BenchCase

    argv = list(sys.argv[1:] if argv is None else argv)
    case_path, out_path = argv
    with open(case_path) as f:
        case = BenchCase.from_dict(json.load(f))
    threads = os.environ.get("NPU_FT_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    try:
        result = run_case(case)
        rc = 0
    except BaseException as exc:  # noqa: BLE001 - recorded, then the suite goes on
        tb = traceback.format_exc()
        kind = "out of memory" if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower() else "error"
        result = {"case": case.to_dict(), "status": "failed",
                  "error": f"{kind}: {type(exc).__name__}: {exc}".strip(), "traceback": tb[-8000:]}
        try:
            result.update(versions())
        except Exception:  # pragma: no cover
            pass
        print(tb, file=sys.stderr)
        rc = 1
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, out_path)
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
