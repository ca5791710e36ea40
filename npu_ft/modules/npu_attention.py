"""Attention on Ascend: which attention kernel a run uses and how packed sequences reach it.

On an ``npu`` device, ``flash_attn: auto`` (the default) or ``fa2`` selects transformers'
``flash_attention_2``, which transformers routes on Ascend to its torch_npu integration
(``transformers.integrations.npu_flash_attention``: torch_npu's ``npu_fusion_attention``, no
flash-attn package needed). Packed sequences (``neat_packing``) then take its **varlen** path
("TND" layout, cumulative sequence lengths) instead of a dense ``[batch, 1, seq, seq]`` mask,
which needs the batch flattened into one row with restarted position ids
(:class:`VarlenPackedCollator`; transformers only reads packed boundaries from ``position_ids``
for a batch of one row). On CPU and CUDA nothing changes (:func:`attention_plan`).

The losses are LLaMA-Factory's neat-packing losses: a flattened batch predicts the same tokens as
the rows it came from (the first label of each row is masked, as the row's own shift would drop it).
Verified on the test suite's fake npu device with a stand-in ``npu_fusion_attention`` (the call and
its arguments); not yet run on Ascend hardware.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from npu_ft.data.constants import IGNORE_INDEX

__all__ = ["AttentionPlan", "VarlenPackedCollator", "attention_plan", "flatten_packed_batch"]


@dataclass(frozen=True)
class AttentionPlan:
    """``attn_implementation`` for ``from_pretrained`` (None: transformers' default) and whether
    packed batches go through the varlen path (:class:`VarlenPackedCollator`) instead of a 4D mask."""

    attn_implementation: str | None
    varlen_packing: bool


def attention_plan(flash_attn: str | None, device_type: str) -> AttentionPlan:
    """The attention of a run on ``device_type`` ("cpu", "cuda", "npu") for LLaMA-Factory's
    ``flash_attn`` (auto | disabled | sdpa | fa2 | fa3)."""
    from npu_ft.model.loading import attn_implementation

    key = (flash_attn or "auto").lower()
    if device_type == "npu" and key in ("auto", "fa2"):
        return AttentionPlan("flash_attention_2", varlen_packing=True)
    return AttentionPlan(attn_implementation(key), varlen_packing=False)


def flatten_packed_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """A collated neat-packing batch (``attention_mask`` = attention ids, 0 on padding;
    ``position_ids`` restarting per packed example) as one row without padding:
    ``input_ids``/``labels``/``position_ids`` ``[1, tokens]`` and ``attention_mask`` None.

    The first label of every row after the first is set to ``IGNORE_INDEX``: in the row-wise batch
    no token predicts it (the causal shift drops each row's first label), and flattened the last
    token of the previous row would."""
    ids = batch["attention_mask"]
    keep = ids != 0
    labels = batch["labels"].clone()
    labels[1:, 0] = IGNORE_INDEX
    out = dict(batch)
    out["input_ids"] = batch["input_ids"][keep].unsqueeze(0)
    out["labels"] = labels[keep].unsqueeze(0)
    out["position_ids"] = batch["position_ids"][keep].unsqueeze(0)
    out["attention_mask"] = None
    return out


@dataclass
class VarlenPackedCollator:
    """Collates neat-packing features with ``base`` (an :class:`~npu_ft.data.collator.SFTDataCollator`
    with ``neat_packing=False``, so the attention ids stay in ``attention_mask``), then returns
    :func:`flatten_packed_batch` of the result: one row for transformers' varlen attention path."""

    base: Any

    def __post_init__(self) -> None:
        if getattr(self.base, "neat_packing", False):
            raise ValueError("base: collate with neat_packing=False (this collator needs the attention ids)")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(features)
        if "position_ids" not in batch:
            raise ValueError("features: packed features with position_ids expected (neat_packing)")
        return flatten_packed_batch(batch)

