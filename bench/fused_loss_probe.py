"""Memory and time of one fwd+bwd with npu-ft's fused linear cross-entropy against transformers'
loss (the table in docs/training.md, "Fused linear cross-entropy").

    python bench/fused_loss_probe.py --all                    # every case in a fresh process, a table
    THREADS=2 python bench/fused_loss_probe.py --all          # the same with 2 torch threads
    python bench/fused_loss_probe.py fused half lora          # one case (VARIANT LABELS METHOD), JSON

Model: Qwen2, vocab 151,936, hidden 256, 2 layers, intermediate 512, tied embeddings, fp32, random
init; batch 4 x seq 256 of random tokens. ``VARIANT``: ``fused`` (``enable_fused_cross_entropy``)
or ``unfused`` (transformers' forward + ``ForCausalLMLoss``); ``LABELS``: ``all`` positions or
``half`` (the first 128 of each row -100, like an SFT prompt); ``METHOD``: ``full`` or ``lora``
(r=8 on every linear of every block). One warm-up step, then 3 steps: peak = CPU resident-set
high-water mark above the pre-step RSS (``npu_ft.device``'s VmHWM reset), median; time = median.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS, LABELS, METHODS = ("unfused", "fused"), ("all", "half"), ("full", "lora")


def measure(variant: str, labels_kind: str, method: str) -> dict:
    import torch

    from npu_ft.device import get_backend
    from npu_ft.model.tiny import model_from_config, tiny_config
    from npu_ft.modules.fused_loss import enable_fused_cross_entropy
    from npu_ft.modules.inject import apply_lora

    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    config = tiny_config("qwen2", hidden_size=256, layers=2, heads=4, kv_heads=2, intermediate=512,
                         vocab=151936, tie_word_embeddings=True)
    model = model_from_config(config, seed=0)
    if method == "lora":
        apply_lora(model, "all", r=8)
    else:
        model.requires_grad_(True)
    model.config.use_cache = False
    model.train()
    if variant == "fused" and not enable_fused_cross_entropy(model):
        raise SystemExit("fused cross-entropy is not applicable to the probe model")
    ids = torch.randint(0, 151936, (4, 256), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    if labels_kind == "half":
        labels[:, :128] = -100

    def step() -> float:
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    backend, libc = get_backend("cpu"), ctypes.CDLL("libc.so.6")
    loss = step()  # warm-up
    peaks, times = [], []
    for _ in range(3):
        gc.collect()
        libc.malloc_trim(0)
        backend.reset_peak_memory()
        base = backend.memory().current_bytes
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
        peaks.append(backend.memory().peak_bytes - base)
    return {"variant": variant, "labels": labels_kind, "method": method, "loss": loss,
            "peak_mib": statistics.median(peaks) / 2**20, "time_s": statistics.median(times)}


def run_all() -> None:
    print(f"threads: {os.environ.get('THREADS', '1')}")
    print(f"{'method':<6} {'labels':<6} {'variant':<8} {'peak MiB':>9} {'time s':>7} {'loss':>10}")
    for method in METHODS:
        for labels_kind in LABELS:
            for variant in VARIANTS:
                out = subprocess.run([sys.executable, __file__, variant, labels_kind, method],
                                     capture_output=True, text=True, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(f"{method:<6} {labels_kind:<6} {variant:<8} {r['peak_mib']:>9.0f} {r['time_s']:>7.2f} "
                      f"{r['loss']:>10.6f}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--all"]:
        run_all()
    elif len(sys.argv) == 4 and sys.argv[1] in VARIANTS and sys.argv[2] in LABELS and sys.argv[3] in METHODS:
        print(json.dumps(measure(*sys.argv[1:])))
    else:
        raise SystemExit(__doc__)
