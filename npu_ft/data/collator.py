"""Batch collation for SFT: right padding to a multiple of 8, labels padded with -100.

Packed features (with ``position_ids``) keep their restarted position ids. For neat packing the
attention mask holds attention ids (1, 2, ... per packed example, 0 on padding) and is turned into
attention that never crosses examples, in one of two ways:

* ``neat_mask="4d"`` (default, what LLaMA-Factory does for eager/sdpa attention): a
  ``(batch, 1, seq, seq)`` additive float mask in ``compute_dtype`` -- 0 where a token may attend
  (same example, not in the future, not padding) and the dtype's minimum elsewhere. transformers
  passes a 4D mask through to the attention unchanged.
* ``neat_mask="position_ids"``: ``attention_mask`` is set to None and the model derives the
  packed sequence boundaries from the restarted ``position_ids`` (transformers >= 5 for
  eager/sdpa, and flash-attention-2 varlen). Uses no O(seq^2) memory. transformers only does this
  when no KV cache is passed, so the forward must run with ``use_cache=False`` (as in training).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .constants import IGNORE_INDEX

__all__ = ["SFTDataCollator", "block_diagonal_causal_mask"]


def block_diagonal_causal_mask(attention_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(b, s)`` attention ids -> ``(b, 1, s, s)`` additive mask.

    Query ``i`` may attend key ``j`` iff ``j <= i``, both carry the same id, and the id is not 0.
    """
    ids = attention_ids
    seq = ids.size(-1)
    same = ids[:, None, :, None] == ids[:, None, None, :]
    keep = same & (ids != 0)[:, None, None, :]
    keep = keep & torch.ones(seq, seq, dtype=torch.bool, device=ids.device).tril()
    zero = torch.zeros((), dtype=dtype, device=ids.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=ids.device)
    return torch.where(keep, zero, neg)


def _pad(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    return torch.tensor([list(r) + [value] * (length - len(r)) for r in rows], dtype=torch.long)


@dataclass
class SFTDataCollator:
    """Collate ``build_sft_dataset`` items into tensors.

    pad_token_id: the tokenizer's pad id (``<|endoftext|>`` = 151643 for Qwen).
    pad_to_multiple_of: 8 as LF uses for training; None for no rounding.
    neat_packing: the features come from neat packing (attention ids in ``attention_mask``).
    neat_mask: "4d" or "position_ids" (see module docs).
    compute_dtype: dtype of the 4D mask (the model's compute dtype).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = 8
    label_pad_token_id: int = IGNORE_INDEX
    neat_packing: bool = False
    neat_mask: str = "4d"
    compute_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.neat_mask not in ("4d", "position_ids"):
            raise ValueError(f"neat_mask must be '4d' or 'position_ids', got {self.neat_mask!r}")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor | None]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        longest = max(len(f["input_ids"]) for f in features)
        length = longest
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (longest + m - 1) // m * m
        batch: dict[str, torch.Tensor | None] = {
            "input_ids": _pad([f["input_ids"] for f in features], length, self.pad_token_id),
            "attention_mask": _pad(
                [f.get("attention_mask") or [1] * len(f["input_ids"]) for f in features], length, 0
            ),
            "labels": _pad([f["labels"] for f in features], length, self.label_pad_token_id),
        }
        if any("position_ids" in f for f in features):
            batch["position_ids"] = _pad(
                [f.get("position_ids") or list(range(len(f["input_ids"]))) for f in features], length, 0
            )
        if self.neat_packing:
            if self.neat_mask == "4d":
                batch["attention_mask"] = block_diagonal_causal_mask(batch["attention_mask"], self.compute_dtype)
            else:
                if "position_ids" not in batch:
                    raise ValueError("neat_mask='position_ids' needs packed features with position_ids")
                batch["attention_mask"] = None
        return batch
