"""The CPU kernels of this checkout against those of an older git revision, in one process.

    python bench/micro/compare_cpu_kernels.py --old-rev e78f003 --rounds 15 [--threads 1] --out /tmp/cmp.json

Written for issue 12 (the NF4 C code moved from a ctypes library in a Python string, threaded from
Python, to the ``npu_ft/csrc`` torch extension threaded with ``at::parallel_for``). The old kernel
modules (``ops/backends/cpu/nf4.py``, ``cpu/lora.py``, ``backends/_fused_lora.py``) are read with
``git show OLD_REV:...`` into a temporary package, so both generations run on the same tensors in
the same process. Each round times every case once per side, old and new interleaved; the table
gives per-case medians and old / new (> 1 = the new kernel is faster).

Rows: the kernels called directly (like for like): allocating their output as the op does, and
writing into a reused buffer as ``nf4_linear``'s workspace does; on a large and on a tiny weight.
At the end, what the Python layer of the op costs per call (``torch.ops.npu_ft.nf4_dequantize``
against the native primitive with its output given). On a shared machine read the minima too: a
parallel region waits for every thread to get a core, so medians there measure the scheduler.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
OLD_FILES = {  # module name in the temporary package -> path in the old revision
    "_fused_lora": "npu_ft/ops/backends/_fused_lora.py",
    "cpu_nf4": "npu_ft/ops/backends/cpu/nf4.py",
    "cpu_lora": "npu_ft/ops/backends/cpu/lora.py",
}
# the old modules' relative imports, pointed at this checkout's ops (unchanged where they use them)
OLD_IMPORTS = {
    "from ... import _registry": "from npu_ft.ops import _registry",
    "from ... import nf4 as _nf4": "from npu_ft.ops import nf4 as _nf4",
    "from .. import _fused_lora": "from . import _fused_lora",
    "from . import nf4 as _cpu_nf4": "from . import cpu_nf4 as _cpu_nf4",
}


def load_old_kernels(rev: str, folder: Path):
    """Import the old revision's CPU kernel modules as package ``old_kernels``; returns it."""
    package = folder / "old_kernels"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, path in OLD_FILES.items():
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], check=True,
                                capture_output=True, text=True).stdout
        for old, new in OLD_IMPORTS.items():
            source = source.replace(old, new)
        (package / f"{name}.py").write_text(source)
    spec = importlib.util.spec_from_file_location("old_kernels", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_kernels"] = module
    spec.loader.exec_module(module)
    for name in OLD_FILES:
        importlib.import_module(f"old_kernels.{name}")
    return module


def _lora_step(kernels, x, w, b, a, bb, grad):
    """lora_linear forward + backward kernels, as autograd calls them for a trainable LoRA."""
    y, h = kernels.lora_linear_fused(x, w, b, a, bb, 2.0, None)
    return kernels.lora_linear_backward_fused(grad, x, w, a, bb, h, 2.0, None, [True, False, True, True, False])


def _nf4_linear_step(kernels, x, packed, absmax, shape, a, bb, grad):
    """nf4_linear forward + backward cpu kernels (dequantize into the thread's workspace, GEMMs)."""
    y, h = kernels.nf4_linear_cpu(x, packed, absmax, 64, shape, None, a, bb, 2.0, None)
    return kernels.nf4_linear_backward_cpu(grad, x, packed, absmax, 64, shape, a, bb, h, 2.0, None,
                                           [True, False, True, True, False])


def build_cases(old) -> dict[str, dict[str, Callable[[], object]]]:
    from npu_ft.ops import _lora_fused, nf4
    from npu_ft.ops.backends.cpu import lora as new_lora
    from npu_ft.ops.backends.cpu import nf4 as new_nf4

    gen = torch.Generator().manual_seed(0)
    cases: dict[str, dict[str, Callable[[], object]]] = {}
    for label, shape in (("4096x4096", (4096, 4096)), ("64x64", (64, 64))):
        w = torch.randn(shape, generator=gen) * 0.02
        packed, state = nf4.quantize_nf4(w, blocksize=64, double_quant=True)
        absmax = state.absmax_fp32()
        for dtype in (torch.bfloat16, torch.float32):
            name = str(dtype).replace("torch.", "")
            cases[f"nf4_dequantize {label} -> {name} (kernel)"] = {
                "old": lambda p=packed, am=absmax, s=shape, d=dtype: old.cpu_nf4.nf4_dequantize_cpu(p, am, 64, s, d),
                "new": lambda p=packed, am=absmax, s=shape, d=dtype: new_nf4.nf4_dequantize_cpu(p, am, 64, s, d),
            }
            out = torch.zeros(shape, dtype=dtype)  # a reused, already touched buffer: nf4_linear's workspace
            cases[f"nf4_dequantize {label} -> {name} (kernel, into a reused buffer)"] = {
                "old": lambda p=packed, am=absmax, s=shape, d=dtype, o=out: old.cpu_nf4.nf4_dequantize_into(
                    p, am, 64, s, d, o),
                "new": lambda p=packed, am=absmax, s=shape, d=dtype, o=out: new_nf4.nf4_dequantize_into(
                    p, am, 64, s, d, o),
            }
        cases[f"nf4_quantize {label} fp32 (kernel)"] = {
            "old": lambda w=w: old.cpu_nf4.nf4_quantize_cpu(w, 64),
            "new": lambda w=w: new_nf4.nf4_quantize_cpu(w, 64),
        }
    values = torch.rand(4096 * 4096 // 64, generator=gen)  # the absmax of a 4096x4096 weight
    code = nf4.dynamic_code_8bit()
    q, qabs = nf4.quantize_blockwise_8bit(values - values.mean(), code, 256)
    cases["quantize_blockwise_8bit 262144 (kernel)"] = {
        "old": lambda v=values: old.cpu_nf4.quantize_blockwise_8bit_cpu(v, code, 256),
        "new": lambda v=values: new_nf4.quantize_blockwise_8bit_cpu(v, code, 256),
    }
    cases["dequantize_blockwise_8bit 262144 (kernel)"] = {
        "old": lambda q=q, qabs=qabs: old.cpu_nf4.dequantize_blockwise_8bit_cpu(q, qabs, code, 256, torch.float32),
        "new": lambda q=q, qabs=qabs: new_nf4.dequantize_blockwise_8bit_cpu(q, qabs, code, 256, torch.float32),
    }
    for label, (n_in, n_out) in (("896->4864", (896, 4864)), ("896->896", (896, 896))):
        x, grad = torch.randn(1024, n_in, generator=gen), torch.randn(1024, n_out, generator=gen)
        w, b = torch.randn(n_out, n_in, generator=gen) * 0.02, torch.randn(n_out, generator=gen)
        a, bb = torch.randn(16, n_in, generator=gen) * 0.02, torch.randn(n_out, 16, generator=gen) * 0.02
        cases[f"lora_linear fwd+bwd {label} x1024 fp32 (kernels)"] = {
            "old": lambda k=old._fused_lora, t=(x, w, b, a, bb, grad): _lora_step(k, *t),
            "new": lambda k=_lora_fused, t=(x, w, b, a, bb, grad): _lora_step(k, *t),
        }
        packed, state = nf4.quantize_nf4(w, blocksize=64, double_quant=True)
        absmax = state.absmax_fp32()
        cases[f"nf4_linear fwd+bwd {label} x1024 fp32 (kernels)"] = {
            "old": lambda t=(x, packed, absmax, [n_out, n_in], a, bb, grad): _nf4_linear_step(old.cpu_lora, *t),
            "new": lambda t=(x, packed, absmax, [n_out, n_in], a, bb, grad): _nf4_linear_step(new_lora, *t),
        }
    return cases


def _check_same_results(cases) -> None:
    for name, sides in cases.items():
        old = sides["old"]()
        old = tuple(t.clone() for t in old) if isinstance(old, tuple) else (old.clone(),)  # before new overwrites
        new = sides["new"]()
        new = new if isinstance(new, tuple) else (new,)
        for a, b in zip(old, new, strict=True):
            assert torch.equal(a, b), f"{name}: old and new kernels differ"


def run(cases, rounds: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    times: dict[str, dict[str, list[float]]] = {name: {"old": [], "new": []} for name in cases}
    for r in range(warmup + rounds):
        for name, sides in cases.items():
            for side in (("old", "new") if r % 2 == 0 else ("new", "old")):  # alternate who goes first
                start = time.perf_counter()
                sides[side]()
                elapsed = time.perf_counter() - start
                if r >= warmup:
                    times[name][side].append(elapsed)
    return times


def wrapper_overhead_us(repeats: int = 2000) -> dict[str, float]:
    """Median µs per call, tiny weight: the op (registry wrapper -> Python kernel -> native op) vs the
    native op called directly with a preallocated output."""
    from npu_ft.ops import nf4
    from npu_ft.ops.backends.cpu import _native

    ops = _native.native_ops()
    packed, absmax = nf4.nf4_quantize_reference(torch.randn(64, 64), 64)
    code, out = nf4.nf4_code(), torch.empty(64, 64, dtype=torch.bfloat16)
    calls = {
        "torch.ops.npu_ft.nf4_dequantize (op)": lambda: torch.ops.npu_ft.nf4_dequantize(
            packed, absmax, 64, [64, 64], torch.bfloat16),
        "torch.ops.npu_ft_cpu.nf4_dequantize (native op, out given)": lambda: ops.nf4_dequantize(
            packed, absmax, code, 64, out),
    }
    result = {}
    for name, fn in calls.items():
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        result[name] = statistics.median(samples) * 1e6
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-rev", required=True, help="git revision whose CPU kernels are the 'old' side")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", help="also write the raw times as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    import npu_ft.ops  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        old = load_old_kernels(args.old_rev, Path(tmp))
        cases = build_cases(old)
        _check_same_results(cases)
        times = run(cases, args.rounds, args.warmup)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds, old = {args.old_rev}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs at the end")
    print("| case | old median ms | new median ms | old / new (medians) | old / new (minima) |")
    print("|---|---|---|---|---|")
    for name, sides in times.items():
        old_ms, new_ms = (statistics.median(sides[s]) * 1e3 for s in ("old", "new"))
        ratio_min = min(sides["old"]) / min(sides["new"])
        print(f"| {name} | {old_ms:.3f} | {new_ms:.3f} | {old_ms / new_ms:.2f}× | {ratio_min:.2f}× |")
    overhead = wrapper_overhead_us()
    print("\nper call, 64x64 -> bf16 (median of 2000):")
    for name, us in overhead.items():
        print(f"  {name}: {us:.1f} µs")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"old_rev": args.old_rev, "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "times_s": times, "per_call_us": overhead}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
