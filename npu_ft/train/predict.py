"""``do_predict`` with ``predict_with_generate``: generate an answer for every prompt of the eval set,
write ``generated_predictions.jsonl`` (``prompt``, ``predict``, ``label`` per line, as LLaMA-Factory
writes it) and return BLEU-4 / ROUGE (:mod:`npu_ft.train.metrics`) for ``predict_results.json``."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from .metrics import average_similarity

__all__ = ["PREDICTIONS_FILE", "generate_answers", "predict_and_score"]

PREDICTIONS_FILE = "generated_predictions.jsonl"


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[list[int]], generation: dict[str, Any],
                     batch_size: int = 8, stop_token_ids: Sequence[int] = ()) -> list[list[int]]:
    """Token ids generated after each prompt (prompt ids ``[len]`` -> answer ids, stop tokens cut).

    Prompts are left-padded in batches of ``batch_size``; ``generation`` holds ``generate`` keyword
    arguments (``max_new_tokens``, ``do_sample``, ``temperature``, ...).
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = list(dict.fromkeys([*stop_token_ids, tokenizer.eos_token_id]))
    was_training = model.training
    model.eval()
    answers: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, prompt in enumerate(batch):
                ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
                mask[row, width - len(prompt):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), pad_token_id=pad,
                                 eos_token_id=eos, **generation)
            for row in out[:, width:].tolist():
                cut = next((i for i, t in enumerate(row) if t in eos), len(row))
                answers.append(row[:cut])
    finally:
        model.train(was_training)
    return answers


def predict_and_score(model, tokenizer, items: Sequence[dict[str, Any]], output_dir: str,
                      generation: dict[str, Any], batch_size: int = 8, stop_token_ids: Sequence[int] = (),
                      skip_special_tokens: bool = True) -> dict[str, float]:
    """Generate for ``items`` (``input_ids`` = prompt, ``labels`` = expected answer ids), write
    ``output_dir/generated_predictions.jsonl`` (through a temp file) and return the metrics, named as
    LLaMA-Factory names them (``predict_bleu-4``, ``predict_rouge-1``, ...)."""
    started = time.time()
    prompts = [list(item["input_ids"]) for item in items]
    answers = generate_answers(model, tokenizer, prompts, generation, batch_size, stop_token_ids)
    decoded_prompts = tokenizer.batch_decode(prompts, skip_special_tokens=False)
    predicts = tokenizer.batch_decode(answers, skip_special_tokens=skip_special_tokens)
    labels = tokenizer.batch_decode([[t for t in item["labels"] if t >= 0] for item in items],
                                    skip_special_tokens=skip_special_tokens)
    path = os.path.join(output_dir, PREDICTIONS_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for prompt, predict, label in zip(decoded_prompts, predicts, labels, strict=True):
            f.write(json.dumps({"prompt": prompt, "predict": predict, "label": label}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    runtime = time.time() - started
    metrics = {f"predict_{name}": value for name, value in average_similarity(predicts, labels).items()}
    metrics.update(predict_runtime=round(runtime, 4),
                   predict_samples_per_second=round(len(items) / runtime, 3) if runtime > 0 else 0.0)
    return metrics
