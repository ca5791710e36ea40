from __future__ import annotations

import pytest
import torch

from npu_ft.data.collator import SFTDataCollator, block_diagonal_causal_mask


def test_pad_to_multiple_of_8():
    coll = SFTDataCollator(pad_token_id=151643)
    batch = coll([
        {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [-100, 2, 3]},
        {"input_ids": [4] * 9, "attention_mask": [1] * 9, "labels": [4] * 9},
    ])
    assert batch["input_ids"].shape == (2, 16) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0].tolist() == [1, 2, 3] + [151643] * 13
    assert batch["labels"][0].tolist() == [-100, 2, 3] + [-100] * 13
    assert batch["attention_mask"][0].tolist() == [1, 1, 1] + [0] * 13
    assert "position_ids" not in batch
    assert SFTDataCollator(pad_token_id=0, pad_to_multiple_of=None)([{"input_ids": [1], "labels": [1]}])[
        "input_ids"
    ].shape == (1, 1)


def test_block_diagonal_mask():
    mask = block_diagonal_causal_mask(torch.tensor([[1, 1, 2, 2, 2, 0]]), torch.float32)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0],
    ]
    assert mask.dtype == torch.float32 and mask.min() == torch.finfo(torch.float32).min
    assert block_diagonal_causal_mask(torch.tensor([[1, 2]]), torch.bfloat16).dtype == torch.bfloat16


def test_neat_packing_batches():
    feats = [{"input_ids": [5, 6, 7, 0], "attention_mask": [1, 1, 2, 0], "position_ids": [0, 1, 0, 0],
              "labels": [-100, 6, 7, -100]}]
    batch = SFTDataCollator(pad_token_id=0, neat_packing=True, compute_dtype=torch.bfloat16)(feats)
    assert batch["attention_mask"].shape == (1, 1, 8, 8) and batch["attention_mask"].dtype == torch.bfloat16
    assert batch["position_ids"][0].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    batch = SFTDataCollator(pad_token_id=0, neat_packing=True, neat_mask="position_ids")(feats)
    assert batch["attention_mask"] is None and batch["position_ids"].shape == (1, 8)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mask_blocks_cross_example_attention_in_qwen2(attn):
    """A tiny Qwen2 gives the same logits for an example alone and packed after another one.

    The position_ids route needs ``use_cache=False`` (transformers only derives packed sequences
    from position_ids when there is no cache), which is how training runs."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = attn
    model = Qwen2ForCausalLM(cfg).eval()
    a, b = [3, 4, 5, 6, 7], [10, 11, 12]
    feats = [{"input_ids": a + b + [0], "attention_mask": [1] * 5 + [2] * 3 + [0],
              "position_ids": [0, 1, 2, 3, 4, 0, 1, 2, 0], "labels": a + b + [-100]}]
    alone = model(input_ids=torch.tensor([b])).logits[0]
    for mode in ("4d", "position_ids"):
        batch = SFTDataCollator(pad_token_id=0, neat_packing=True, neat_mask=mode)(feats)
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], use_cache=False).logits[0]
        torch.testing.assert_close(out[5:8], alone, rtol=1e-4, atol=1e-4)
