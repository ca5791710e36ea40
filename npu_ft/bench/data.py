"""What a bench case trains on: the rows of every step, the same for every implementation.

Two modes (the suite's ``data:`` mapping, :class:`npu_ft.bench.suite.DataSettings`):

* ``random``: a pool of ``data_pool`` random sequences of ``seq_len`` token ids, cycled; every
  position is labelled (so the loss falls).
* ``sft``: examples of a ``dataset_info.json`` dataset through npu-ft's own data pipeline
  (:func:`npu_ft.data.build_sft_dataset`: qwen template, prompt tokens masked with -100, cut at
  ``seq_len``), packed into ``seq_len``-token rows or one example per row. ``alpaca-synth`` is a
  generated alpaca-style set (:func:`write_alpaca_synth`), ``demo`` npu-ft's shipped demo data.

Rows are plain lists (``input_ids``, ``labels``, ``attention_mask``, and ``position_ids`` when
packed), handed as they are to LLaMA-Factory's own collator; :func:`make_batches` collates them for
the bench's own loop with npu-ft's collator (right padding to a multiple of 8 in ``sft`` mode).
A model whose vocabulary is smaller than the tokenizer's (the ``tiny`` preset) gets the token ids
folded modulo its vocabulary size: the structure (lengths, padding, masks) stays, the text does not.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["Batch", "case_rows", "collate", "make_batches", "write_alpaca_synth"]

IGNORE_INDEX = -100
#: Qwen's <|endoftext|>, the pad token of its tokenizer
QWEN_PAD_ID = 151643


@dataclasses.dataclass
class Batch:
    """One step's tensors (``[batch, seq]`` int64) and its token counts."""

    input_ids: Any
    labels: Any
    attention_mask: Any = None
    position_ids: Any = None
    #: positions that hold a token of an example (not padding)
    tokens: int = 0
    #: positions whose next token is a loss target (labels[:, 1:] != -100)
    labelled: int = 0

    @property
    def positions(self) -> int:
        """Every position the model runs on, padding included."""
        return int(self.input_ids.numel())

    def model_inputs(self, device) -> dict[str, Any]:
        out = {"input_ids": self.input_ids.to(device), "labels": self.labels.to(device)}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask.to(device)
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids.to(device)
        return out


def _settings(case: Any) -> dict[str, Any]:
    from .suite import DATA_DEFAULTS

    return {**DATA_DEFAULTS, **(getattr(case, "data", None) or {})}


def _random_rows(case: Any, vocab_size: int) -> list[dict[str, list[int]]]:
    import torch

    g = torch.Generator().manual_seed(1_000_003 + case.seed)
    pool = torch.randint(0, min(vocab_size, 32000), (case.data_pool, case.seq_len), generator=g).tolist()
    rows = []
    for step in range(case.warmup + case.steps):
        for i in range(case.batch_size):
            ids = pool[(step * case.batch_size + i) % case.data_pool]
            # position 0 is never a target (a causal LM predicts position t + 1 from t)
            rows.append({"input_ids": list(ids), "labels": [IGNORE_INDEX] + ids[1:], "attention_mask": [1] * len(ids)})
    return rows


# ---------------------------------------------------------------------------------------------
# alpaca-synth: an alpaca-style dataset with realistic prompt / response lengths
# ---------------------------------------------------------------------------------------------
_WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an have not which can "
    "their more has were all one been they when there also would its about into some than other these "
    "time only two may over such first after most used many where then them new between how each "
    "because both system water people world model data example answer question write explain list "
    "describe summary reason step value number result change small large group process simple "
    "important different following provide create generate identify compare suggest"
).split()


def _lognormal_len(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, round(math.exp(rng.gauss(math.log(median), sigma)))))


def _text(rng: random.Random, words: int) -> str:
    out = []
    for i in range(words):
        w = rng.choice(_WORDS)
        out.append(w.capitalize() if i == 0 or out[-1].endswith(".") else w)
        if i % 12 == 11:
            out[-1] += "."
    return " ".join(out) + "."


def write_alpaca_synth(folder: str | Path, examples: int = 512, seed: int = 0) -> str:
    """Write ``alpaca_synth.json`` + ``dataset_info.json`` into ``folder``; returns the dataset name.

    Lengths follow the shape of the Stanford Alpaca set (a short instruction, an input in 40 % of
    the examples, a long-tailed response), in words: instruction lognormal(median 14, sigma 0.45),
    input lognormal(median 18, sigma 0.8), output lognormal(median 60, sigma 0.9) up to 600 words.
    With Qwen's tokenizer that is ~25 prompt tokens (plus ~20 of template) and ~70 response tokens
    at the median, and a few responses of several hundred tokens.
    """
    rng = random.Random(4242 + seed)
    records = []
    for _ in range(examples):
        records.append({
            "instruction": _text(rng, _lognormal_len(rng, 14, 0.45, 3, 80)),
            "input": _text(rng, _lognormal_len(rng, 18, 0.8, 3, 200)) if rng.random() < 0.4 else "",
            "output": _text(rng, _lognormal_len(rng, 60, 0.9, 1, 600)),
        })
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "alpaca_synth.json").write_text(json.dumps(records))
    (folder / "dataset_info.json").write_text(json.dumps({"alpaca_synth": {"file_name": "alpaca_synth.json"}}))
    return "alpaca_synth"


def _sft_items(case: Any, data: dict[str, Any]) -> tuple[list[dict[str, list[int]]], int]:
    """The pipeline's training items and the tokenizer's pad id."""
    from npu_ft.data import DataArguments, build_sft_dataset
    from npu_ft.model.tokenizer import load_qwen_tokenizer

    tokenizer = load_qwen_tokenizer(None, variant="qwen3" if "qwen3" in case.model else "qwen2.5")
    with tempfile.TemporaryDirectory(prefix="npu_ft_bench_data_") as tmp:
        if data["dataset"] == "alpaca-synth":
            name, folder = write_alpaca_synth(tmp, data["examples"], case.seed), tmp
        elif data["dataset"] == "demo":
            from npu_ft.demo import ASSETS

            name, folder = "npu_ft_demo", str(ASSETS)
        else:
            if not data.get("dataset_dir"):
                raise ValueError(f"data.dataset {data['dataset']!r} needs data.dataset_dir (its dataset_info.json)")
            name, folder = data["dataset"], data["dataset_dir"]
        args = DataArguments(dataset=[name], dataset_dir=folder, template=data["template"], cutoff_len=case.seq_len,
                             packing=bool(data["packing"]))
        items = build_sft_dataset(args, tokenizer, seed=case.seed)
    return items, int(tokenizer.pad_token_id)


def case_rows(case: Any, vocab_size: int) -> list[dict[str, list[int]]]:
    """Every row the case trains on, in order: ``(warmup + steps) * batch_size`` dicts of lists (sft:
    rows spread evenly over the processed dataset, so the steps see long and short examples)."""
    data = _settings(case)
    if data["mode"] == "random":
        return _random_rows(case, vocab_size)
    items, pad_id = _sft_items(case, data)
    need = (case.warmup + case.steps) * case.batch_size
    rows = []
    for k in range(need):
        # spread over the dataset: packing puts the longest examples first, an epoch sees them all
        item = items[(k * len(items)) // need if need <= len(items) else k % len(items)]
        row = {key: list(item[key]) for key in ("input_ids", "labels", "attention_mask", "position_ids") if key in item}
        if vocab_size <= max(pad_id, max(row["input_ids"])):  # a shrunk model: fold the ids
            row["input_ids"] = [t % vocab_size for t in row["input_ids"]]
            row["labels"] = [t if t == IGNORE_INDEX else t % vocab_size for t in row["labels"]]
        rows.append(row)
    return rows


def collate(rows: list[dict[str, list[int]]], pad_id: int, pad_to_multiple_of: int | None) -> Batch:
    """npu-ft's collator over ``rows`` (right padding, labels padded with -100), with the counts."""
    from npu_ft.data import SFTDataCollator

    batch = SFTDataCollator(pad_token_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)(rows)
    labels = batch["labels"]
    # packed rows keep their padding inside attention_mask (all ones, as LLaMA-Factory); count it from
    # the position ids (padding restarts at 0 after the last example) or the attention mask
    tokens = sum(_example_tokens(r) for r in rows)
    return Batch(input_ids=batch["input_ids"], labels=labels, attention_mask=batch["attention_mask"],
                 position_ids=batch.get("position_ids"), tokens=tokens,
                 labelled=int((labels[:, 1:] != IGNORE_INDEX).sum()))


def _example_tokens(row: dict[str, list[int]]) -> int:
    """Tokens of ``row`` that belong to examples (packing pads with position id 0 and label -100)."""
    if "position_ids" not in row:
        return sum(1 for m in row["attention_mask"] if m)
    pos, labels = row["position_ids"], row["labels"]
    end = len(pos)
    while end > 1 and pos[end - 1] == 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    return end


def make_batches(case: Any, vocab_size: int, pad_to_multiple_of: int | None | str = "auto") -> list[Batch]:
    """One :class:`Batch` per warmup + timed step; rows padded to a multiple of 8 in ``sft`` mode
    (``pad_to_multiple_of="auto"``, as LLaMA-Factory pads), not in ``random`` mode."""
    rows = case_rows(case, vocab_size)
    multiple = pad_to_multiple_of
    if multiple == "auto":
        multiple = None if _settings(case)["mode"] == "random" else 8
    pad = QWEN_PAD_ID % vocab_size
    b = case.batch_size
    return [collate(rows[i:i + b], pad, multiple) for i in range(0, len(rows), b)]  # type: ignore[arg-type]
