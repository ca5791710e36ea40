"""``npu-ft demo``: fine-tune a tiny random-init Qwen2 on CPU and show that it learned.

1. builds a tiny Qwen2 (random weights, hidden 128, 4 layers, Qwen's full 151,936-token
   vocabulary) and the real Qwen2 tokenizer, offline;
2. measures held-out loss and exact-match of greedy answers (before);
3. fine-tunes with ``npu-ft``'s own trainer (``run_sft``, the same path as ``npu-ft train``) on
   the question-answering set shipped in ``npu_ft/assets/demo`` (which animal / what colour /
   good or bad mood, asked about short made-up sentences; every held-out sentence is a word
   combination that never occurs in training), with a progress bar;
4. measures again (after) and prints the table.

Nothing is downloaded. Default method: full fine-tuning, because on a *random-init* model LoRA has
no useful features to adapt (``--method lora`` runs it anyway). See docs/training.md for what the
default run reaches and how long it takes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent / "assets" / "demo"
TRAIN_SET, TEST_SET = "npu_ft_demo", "npu_ft_demo_test"
IM_END = 151645
HIDDEN, LAYERS = 128, 4
STEPS = 1000


def _recipe(args: argparse.Namespace, model_dir: Path, out_dir: Path) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "model_name_or_path": str(model_dir),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": args.method,
        "dataset": TRAIN_SET,
        "dataset_dir": str(ASSETS),
        "template": "qwen",
        "cutoff_len": 64,
        "output_dir": str(out_dir),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": args.learning_rate or (3e-3 if args.method == "full" else 5e-3),
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.05,
        "optim": "adamw_torch_fused" if args.device == "cpu" else "adamw_torch",
        "max_steps": args.steps,
        "logging_steps": 50,
        "save_strategy": "no",
        "seed": 42,
        "device": args.device,
        "report_to": "none",
        # LLaMA-Factory turns gradient checkpointing on by default; it saves activation memory by
        # recomputing the forward pass, which for a tiny model is pure cost (~4x slower steps)
        "disable_gradient_checkpointing": True,
        "plot_loss": True,
        "disable_tqdm": False,
    }
    if args.method == "lora":
        recipe.update(lora_target="all", lora_rank=args.lora_rank)
    return recipe


def _held_out(model_dir: Path):
    """Held-out items through the same data pipeline as training: (prompt ids, target ids, item, task)."""
    import json

    from transformers import AutoTokenizer

    from npu_ft.data import DataArguments, build_sft_dataset

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    items = build_sft_dataset(DataArguments(dataset=TEST_SET, dataset_dir=str(ASSETS), template="qwen",
                                            cutoff_len=64), tokenizer)
    records = json.loads((ASSETS / "demo_test.json").read_text(encoding="utf-8"))
    out = []
    for item, rec in zip(items, records, strict=False):
        first = next(i for i, label in enumerate(item["labels"]) if label != -100)
        target = [t for t in item["labels"][first:] if t != -100]
        answer = target[: target.index(IM_END)] if IM_END in target else target
        out.append({"prompt": item["input_ids"][:first], "answer": answer, "item": item,
                    "task": rec["instruction"], "input": rec["input"], "output": rec["output"]})
    return tokenizer, out


def _greedy(model, prompt: list[int], max_new: int, device) -> list[int]:
    """Greedy decoding up to ``<|im_end|>`` (or ``max_new`` tokens): the same tokens as
    ``generate(do_sample=False)``, without its per-call overhead (answers are 1-3 tokens)."""
    import torch

    ids = list(prompt)
    for _ in range(max_new):
        hidden = model.model(input_ids=torch.tensor([ids], device=device)).last_hidden_state[:, -1]
        nxt = int(model.get_output_embeddings()(hidden).argmax(-1))
        if nxt == IM_END:
            break
        ids.append(nxt)
    return ids[len(prompt):]


def evaluate(model, tokenizer, examples, device) -> dict[str, Any]:
    """Mean target-token loss and exact match of greedy answers (up to <|im_end|>)."""
    import torch

    model.eval()
    head = model.get_output_embeddings()
    total_loss, total_tokens, correct, per_task, samples = 0.0, 0, 0, {}, []
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["item"]["input_ids"]], device=device)
            shift = torch.tensor([ex["item"]["labels"]], device=device)[:, 1:]
            keep = shift != -100
            hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
            logits = head(hidden[keep]).float()  # the head only where there are labels, as in training
            total_loss += float(torch.nn.functional.cross_entropy(logits, shift[keep], reduction="sum"))
            total_tokens += int(keep.sum())
            new = _greedy(model, ex["prompt"], len(ex["answer"]) + 2, device)
            ok = new == ex["answer"]
            correct += ok
            hit, seen = per_task.get(ex["task"], (0, 0))
            per_task[ex["task"]] = (hit + ok, seen + 1)
            samples.append((ex["task"], ex["input"], ex["output"], tokenizer.decode(new), ok))
    model.train()
    return {"loss": total_loss / max(total_tokens, 1), "correct": correct, "total": len(examples),
            "per_task": per_task, "samples": samples}


def _table(before: dict[str, Any], after: dict[str, Any]) -> str:
    def pct(hit: int, n: int) -> str:
        return f"{hit}/{n} ({100.0 * hit / max(n, 1):.0f}%)"

    rows = [("held-out loss (target tokens)", f"{before['loss']:.3f}", f"{after['loss']:.3f}"),
            ("exact match, all tasks", pct(before["correct"], before["total"]), pct(after["correct"], after["total"]))]
    for task, (hit, n) in after["per_task"].items():
        b_hit, b_n = before["per_task"][task]
        rows.append((f"  {task}", pct(b_hit, b_n), pct(hit, n)))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'held-out examples':<{width}}  {'before':>14}  {'after':>14}", "-" * (width + 34)]
    lines += [f"{name:<{width}}  {b:>14}  {a:>14}" for name, b, a in rows]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from npu_ft.cli_common import DEVICE_CHOICES, non_negative_int, positive_float, positive_int

    parser = argparse.ArgumentParser(prog="npu-ft demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="saves/npu-ft-demo", help="where the model and run go")
    parser.add_argument("--steps", type=positive_int, default=STEPS, help=f"optimizer steps (default {STEPS})")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="examples per step (default 16)")
    parser.add_argument("--device", default="cpu", choices=DEVICE_CHOICES,
                        help="default cpu; auto = $NPU_FT_DEVICE or npu > cuda > cpu")
    parser.add_argument("--method", default="full", choices=("full", "lora"), help="default: full")
    parser.add_argument("--lora-rank", type=positive_int, default=64)
    parser.add_argument("--learning-rate", type=positive_float, default=None)
    parser.add_argument("--hidden-size", type=positive_int, default=HIDDEN,
                        help=f"tiny model width (default {HIDDEN})")
    parser.add_argument("--layers", type=positive_int, default=LAYERS, help=f"tiny model depth (default {LAYERS})")
    parser.add_argument("--threads", type=non_negative_int, default=2,
                        help="torch CPU threads (default 2, what the demo is sized for; 0 = torch's default)")
    return parser


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Build, score, fine-tune, score again; returns ``{"before", "after", "train_s", "total_s",
    "cpu_s", "device", "threads", "run_dir"}`` (``before``/``after`` as from :func:`evaluate`).
    Raises ``DeviceUnavailableError`` when ``args.device`` is absent."""
    started, cpu_started = time.time(), time.process_time()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from npu_ft.device import select_device

    _, device = select_device(None if args.device == "auto" else args.device)  # before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from npu_ft.config import build_config
    from npu_ft.model.loading import load_model
    from npu_ft.model.tiny import build_tiny_model
    from npu_ft.train.run import run_sft

    out = Path(args.output_dir)
    heads = max(1, args.hidden_size // 16)
    print(f"[1/4] building a tiny random-init Qwen2 (hidden {args.hidden_size}, {args.layers} layers, "
          f"151,936-token vocabulary) + the Qwen2 tokenizer in {out / 'model'}")
    model_dir = build_tiny_model(out / "model", arch="qwen2", hidden_size=args.hidden_size, layers=args.layers,
                                 heads=heads, kv_heads=heads // 2 if heads % 2 == 0 else heads,
                                 intermediate=2 * args.hidden_size, seed=0)
    tokenizer, examples = _held_out(model_dir)

    print(f"[2/4] before: scoring {len(examples)} held-out examples (sentences never seen in training)")
    base = load_model(str(model_dir), device=device, dtype="float32")
    before = evaluate(base, tokenizer, examples, device)
    del base

    print(f"[3/4] fine-tuning ({args.method}, {args.steps} steps, batch {args.batch_size}, gradient checkpointing "
          f"off: a tiny model needs no activation memory saving) on {ASSETS / 'demo_train.json'}")
    cfg = build_config(_recipe(args, model_dir, out / "run"), source="npu-ft demo")
    t0 = time.time()
    result = run_sft(cfg)
    train_s = time.time() - t0

    print("[4/4] after: scoring the same held-out examples")
    after = evaluate(result.model, tokenizer, examples, device)
    return {"before": before, "after": after, "train_s": train_s, "total_s": time.time() - started,
            "cpu_s": time.process_time() - cpu_started, "device": device,
            "threads": torch.get_num_threads(), "run_dir": out / "run"}


def demo_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from npu_ft.cli_common import is_input_error, report

    try:
        res = run_demo(args)
    except Exception as exc:
        if not is_input_error(exc):
            raise
        return report("npu-ft demo", exc)
    print()
    print(_table(res["before"], res["after"]))
    print()
    print("some held-out answers after training (task | input | expected | generated):")
    for task, inp, expected, got, ok in res["after"]["samples"][:6]:
        print(f"  {'ok ' if ok else 'BAD'} {task:<26} {inp:<42} {expected:<8} {got!r}")
    print()
    print(f"training: {res['train_s']:.0f} s; whole demo: {res['total_s']:.0f} s wall, {res['cpu_s']:.0f} s CPU on "
          f"{res['device']} ({res['threads']} threads). Run folder: {res['run_dir']} ({_run_files(res['run_dir'])})")
    return 0


#: what a reader looks for in the run folder, in this order (only those the run wrote are named)
_NOTABLE = ("trainer_log.jsonl", "running_log.txt", "training_loss.png", "model.safetensors",
            "adapter_model.safetensors", "README.md")


def _run_files(run_dir: Path) -> str:
    """The notable files the run wrote into ``run_dir``, e.g. ``"trainer_log.jsonl, model.safetensors"``."""
    present = [name for name in _NOTABLE if (Path(run_dir) / name).is_file()]
    return ", ".join(present) or "no files"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(demo_main())
