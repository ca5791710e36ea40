"""Bench implementations ``llamafactory`` and ``llamafactory+npu-ft``: LLaMA-Factory's own trainer.

A case with one of these implementations is not trained by the worker's loop: LLaMA-Factory runs
it (``llamafactory.train.tuner.run_exp``, the function ``llamafactory-cli train`` calls) in a Python
that has ``llamafactory==0.9.5`` -- ``$NPU_FT_LF_PYTHON``, else ``~/.cache/npu_ft/venv-llamafactory/bin/python``
(what ``scripts/ci_llamafactory.sh`` builds). ``llamafactory+npu-ft`` first applies the plugin
(``plugins/llamafactory``: PEFT LoRA -> ``npu_ft::lora_linear``, bitsandbytes 4-bit -> npu-ft NF4).

What is the same as for ``npu-ft`` / ``reference`` (so the rows sit in the same tables and plots and
the loss-parity check applies): the model (built here by the harness's own factory from the case
seed and saved to a temporary folder with the Qwen tokenizer), the rows of every step
(:func:`npu_ft.bench.data.case_rows`: input ids, labels, attention mask, position ids when packed,
handed to LLaMA-Factory as a pre-tokenized dataset with shuffling off and collated by its own
collator, one batch per optimizer step), AdamW at ``case.lr`` with no weight decay, constant
LR, no gradient clipping, the LoRA init (:func:`npu_ft.bench.impls.align_lora_init` right after
LLaMA-Factory builds the PEFT model), gradient checkpointing as the case says (``selective`` for
``llamafactory+npu-ft`` through the plugin's ``NPU_FT_LF_CHECKPOINT_POLICY``), the peak-memory /
step-time meters (the device backend's, read from a TrainerCallback around each optimizer step),
and the MFU fields (the GEMM peak timed in this process after LLaMA-Factory's has exited).
Losses are those LLaMA-Factory writes to ``trainer_log.jsonl`` (``logging_steps: 1``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: implementation names this module runs
LF_IMPLEMENTATIONS = ("llamafactory", "llamafactory+npu-ft")
ENV_PYTHON = "NPU_FT_LF_PYTHON"


def lf_python() -> str:
    """The Python that has LLaMA-Factory; raises RuntimeError with the fix when there is none."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    exe = os.environ.get(ENV_PYTHON) or str(cache / "npu_ft" / "venv-llamafactory" / "bin" / "python")
    if not Path(exe).exists():
        raise RuntimeError(
            f"implementation llamafactory needs a Python with llamafactory==0.9.5: set {ENV_PYTHON} "
            "or build one with scripts/ci_llamafactory.sh --setup-only (~/.cache/npu_ft/venv-llamafactory)"
        )
    return exe


def _check_same_npu_ft(child_location: str | None) -> None:
    """The LLaMA-Factory Python must run this npu-ft, not another checkout's (its venv installs
    npu-ft and the plugin editable from the checkout that built it)."""
    import npu_ft

    here = str(Path(npu_ft.__file__).resolve().parent)
    if child_location != here:
        raise RuntimeError(f"the LLaMA-Factory Python ({lf_python()}) imports npu_ft from {child_location}, this "
                           f"process from {here}: rebuild it from this checkout with "
                           "scripts/ci_llamafactory.sh --setup-only (or pip install -e . -e plugins/llamafactory "
                           "into it)")


def _lf_args(case, model_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    args = {
        "model_name_or_path": str(model_dir),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        # LLaMA-Factory wants a dataset name even when it loads the pre-tokenized one (tokenized_path)
        "dataset": "npu_ft_bench",
        "dataset_dir": str(data_dir.parent),
        "tokenized_path": str(data_dir),
        "template": "qwen",
        "cutoff_len": case.seq_len,
        "output_dir": str(out_dir),
        "overwrite_output_dir": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "plot_loss": False,
        "report_to": "none",
        "per_device_train_batch_size": case.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": case.lr,
        "max_steps": case.warmup + case.steps,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 0.0,
        "optim": "adamw_torch",
        "seed": case.seed,
        "disable_shuffling": True,
        "dataloader_num_workers": 0,
        "disable_gradient_checkpointing": not case.gradient_checkpointing,
    }
    if case.method == "full":
        args["finetuning_type"] = "full"
    else:
        lora = case.lora
        targets = lora.get("targets", "all")
        args.update(
            lora_rank=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=float(lora["dropout"]),
            lora_target=targets if isinstance(targets, str) else ",".join(targets),
            use_rslora=bool(lora.get("use_rslora", False)),
        )
        if lora.get("additional_target"):
            args["additional_target"] = ",".join(lora["additional_target"])
    if case.method == "qlora":
        args.update(quantization_bit=4, quantization_type="nf4", double_quantization=True)
    if case.dtype == "bfloat16":
        args["bf16"] = True
    elif case.dtype == "float16":
        args["fp16"] = True
    from npu_ft.device import get_backend

    args.update(get_backend(case.device).training_arguments())  # CPU: use_cpu
    return args


def run_case(case) -> dict:
    """Run ``case`` with LLaMA-Factory in its own Python; the result dict of :mod:`npu_ft.bench.worker`."""
    from npu_ft.device import get_backend

    from . import impls
    from .data import case_rows, make_batches
    from .measure import step_counts, timing_fields, versions
    from .shapes import build_model, model_config
    from .worker import mfu_fields

    if case.implementation not in LF_IMPLEMENTATIONS:
        raise ValueError(f"impl_llamafactory: unknown implementation {case.implementation!r}")
    python = lf_python()
    tmp = Path(tempfile.mkdtemp(prefix="npu_ft_lf_bench_"))
    try:
        # the same random model as the other implementations, saved with the Qwen tokenizer
        model = build_model(case.model, case.seed, impls.torch_dtype(case.dtype), case.model_overrides)
        model.save_pretrained(str(tmp / "model"))
        vocab = model.config.vocab_size
        del model
        from npu_ft.model.tokenizer import load_qwen_tokenizer

        load_qwen_tokenizer(None, variant="qwen3" if "qwen3" in case.model else "qwen2.5").save_pretrained(
            str(tmp / "model")
        )
        rows = case_rows(case, vocab)
        (tmp / "rows.json").write_text(json.dumps(rows))
        (tmp / "dataset_info.json").write_text(json.dumps({"npu_ft_bench": {"file_name": "rows.json"}}))
        job = {
            "case": case.to_dict(),
            "args": _lf_args(case, tmp / "model", tmp / "data", tmp / "out"),
            "rows": str(tmp / "rows.json"),
            "plugin": case.implementation == "llamafactory+npu-ft",
            "counters": str(tmp / "counters.json"),
        }
        (tmp / "job.json").write_text(json.dumps(job))
        env = dict(os.environ)  # PYTHONPATH holds project folders only (see runner._project_paths)
        env.pop("NPU_FT_LLAMAFACTORY", None)  # the child patches (or not) explicitly
        env["NPU_FT_LF_CHECKPOINT_POLICY"] = case.checkpoint_policy if case.gradient_checkpointing else "full"
        # the plugin's fused decoder-block ops (a plugin without the option ignores the variable)
        env["NPU_FT_LF_FUSED_KERNELS"] = "1" if case.fused_kernels else "0"
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")
        t0 = time.perf_counter()
        proc = subprocess.run(
            [python, "-m", "npu_ft.bench.impl_llamafactory", str(tmp / "job.json"), str(tmp / "result.json")],
            env=env,
            capture_output=True,
            text=True,
            timeout=case.timeout_s,
        )
        (Path(tempfile.gettempdir()) / "npu_ft_lf_bench_last.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0 or not (tmp / "result.json").exists():
            tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
            raise RuntimeError(f"llamafactory run failed (exit {proc.returncode}): {tail}")
        child = json.loads((tmp / "result.json").read_text())
        log = tmp / "out" / "trainer_log.jsonl"
        losses = [json.loads(line)["loss"] for line in log.read_text().splitlines() if '"loss"' in line]
        step_s = child["step_s"]
        if len(losses) != len(step_s) or len(step_s) != case.warmup + case.steps:
            raise RuntimeError(
                f"llamafactory logged {len(losses)} losses / {len(step_s)} steps, expected {case.warmup + case.steps}"
            )
        _check_same_npu_ft(child.get("npu_ft_location"))
        # the token counts of the batches LLaMA-Factory's collator made (it pads to a multiple of 8)
        batches = make_batches(case, vocab, pad_to_multiple_of=8)
        backend = get_backend(case.device)
        device = backend.torch_device(0)
        result = {
            "case": case.to_dict(),
            "device_name": child["device_name"],
            **versions(),
            "features": child["features"],
            "trainable_params": child["trainable_params"],
            "total_params": child["total_params"],
            "weight_bytes": child["weight_bytes"],
            "build_s": child["build_s"],
            "peak_mem_bytes": child["peak_mem_bytes"],
            "mem_kind": child["mem_kind"],
            "baseline_mem_bytes": child["baseline_mem_bytes"],
            "wall_s": time.perf_counter() - t0,
            "llamafactory_versions": child["versions"],
            "kernel_calls": child.get("kernel_calls"),
            **timing_fields(case, losses, step_s, step_counts(batches)),
            **mfu_fields(case, model_config(case.model, case.model_overrides), batches, step_s,
                         impls.torch_dtype(case.dtype), device, backend),
        }
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# child: runs inside the LLaMA-Factory Python
# --------------------------------------------------------------------------------------------------


def _child(job_path: str, out_path: str) -> int:
    import torch
    from datasets import Dataset, DatasetDict
    from transformers import TrainerCallback

    from npu_ft.device import get_backend

    from . import impls
    from .measure import trim_heap
    from .suite import BenchCase

    job = json.loads(Path(job_path).read_text())
    case = BenchCase.from_dict(job["case"])
    rows = json.loads(Path(job["rows"]).read_text())
    # the rows as the worker trains on them (npu_ft.bench.data.case_rows): random rows have label -100
    # at position 0 (never a target), so the Trainer's num_items_in_batch (labels != -100 before the
    # shift) is the number of predicted tokens, as the worker's mean uses
    columns = {key: [r[key] for r in rows] for key in rows[0]}
    DatasetDict({"train": Dataset.from_dict(columns)}).save_to_disk(job["args"]["tokenized_path"])
    backend = get_backend(case.device)
    info: dict = {"device_name": backend.device_name(), "step_s": []}
    features = ["llamafactory", "transformers", "peft"]
    if job["plugin"]:
        from npu_ft_llamafactory import apply_npu_ft_to_llamafactory

        apply_npu_ft_to_llamafactory(fallback=False)
        features.append("npu-ft-plugin")
    elif case.method == "qlora":
        features.append("bitsandbytes-4bit")

    from llamafactory.model import loader

    lf_init_adapter = loader.init_adapter
    t_build = time.perf_counter()

    def init_adapter(config, model, model_args, finetuning_args, is_trainable):
        model = lf_init_adapter(config, model, model_args, finetuning_args, is_trainable)
        if case.method in ("lora", "qlora") and impls.align_lora_init(model, case.seed) == 0:
            raise RuntimeError("no LoRA parameters after LLaMA-Factory built the adapter")
        trainable, total = impls.count_params(model)
        info.update(trainable_params=trainable, total_params=total, weight_bytes=impls.weight_bytes(model))
        return model

    loader.init_adapter = init_adapter

    class Meter(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            info["build_s"] = time.perf_counter() - t_build
            trim_heap()
            backend.synchronize()
            backend.reset_peak_memory()
            info["baseline_mem_bytes"] = int(backend.memory().current_bytes)

        def on_step_begin(self, args, state, control, **kw):
            backend.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            backend.synchronize()
            info["step_s"].append(time.perf_counter() - self.t)

        def on_train_end(self, args, state, control, **kw):
            mem = backend.memory()
            info.update(peak_mem_bytes=int(mem.peak_bytes), mem_kind=mem.kind)

    torch.manual_seed(case.seed)
    from llamafactory.train.tuner import run_exp

    run_exp(args=job["args"], callbacks=[Meter()])
    from npu_ft.env_info import package_versions
    from npu_ft.ops import kernel_calls

    info["versions"] = package_versions(("llamafactory", "transformers", "peft", "bitsandbytes"))
    info["kernel_calls"] = {op: kernel_calls(op) for op in ("lora_linear", "nf4_linear")}
    info["features"] = features
    import npu_ft

    info["npu_ft_location"] = str(Path(npu_ft.__file__).resolve().parent)
    Path(out_path).write_text(json.dumps(info))
    return 0


if __name__ == "__main__":  # pragma: no cover - the child process
    sys.exit(_child(sys.argv[1], sys.argv[2]))
