"""Attention on Ascend (npu_ft.modules.npu_attention): flash_attn auto|fa2 on npu selects transformers'
flash_attention_2 (its torch_npu integration), and neat-packed batches are flattened for its varlen
path; on CPU/CUDA nothing changes.

The varlen call is checked on the fake npu device with transformers' own NPU flash-attention code and
a stand-in ``torch_npu.npu_fusion_attention`` (plain torch, per-sequence causal attention): that the
call happens with the "TND" layout and the packed boundaries, and that the loss equals the 4D-mask
path's. It checks the call, not the NPU's kernel; no Ascend run has been recorded.
"""

from __future__ import annotations

import pytest
import torch

from npu_ft.data.collator import SFTDataCollator
from npu_ft.model.tiny import model_from_config, tiny_config
from npu_ft.modules.npu_attention import AttentionPlan, VarlenPackedCollator, attention_plan, flatten_packed_batch
from tests.fake_npu.fixtures import fake_npu  # noqa: F401  (module-scoped fixture)

LENGTHS = [[5, 3, 4], [6, 2]]  # two rows of packed examples


@pytest.mark.parametrize(
    "flash_attn,device,plan",
    [("auto", "npu", AttentionPlan("flash_attention_2", True)),
     ("fa2", "npu", AttentionPlan("flash_attention_2", True)), ("sdpa", "npu", AttentionPlan("sdpa", False)),
     ("disabled", "npu", AttentionPlan("eager", False)),
     ("auto", "cpu", AttentionPlan(None, False)), ("fa2", "cuda", AttentionPlan("flash_attention_2", False)),
     (None, "cuda", AttentionPlan(None, False))],
)
def test_attention_plan(flash_attn, device, plan):
    assert attention_plan(flash_attn, device) == plan


def _features(seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in LENGTHS:
        ids = torch.randint(3, 500, (sum(lengths),), generator=gen).tolist()
        labels = [t if i % 3 else -100 for i, t in enumerate(ids)]
        rows.append({"input_ids": ids, "labels": labels,
                     "attention_mask": [n + 1 for n, length in enumerate(lengths) for _ in range(length)],
                     "position_ids": [p for length in lengths for p in range(length)]})
    return rows


def _model(dtype=torch.float32):
    config = tiny_config("qwen2", hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate=96, vocab=500)
    config.update(bos_token_id=1, eos_token_id=2, use_cache=False)
    return model_from_config(config, dtype=dtype, seed=0)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_a_flattened_batch_trains_as_the_4d_mask_rows():
    rows = SFTDataCollator(pad_token_id=0, neat_packing=True)(_features())
    flat = VarlenPackedCollator(SFTDataCollator(pad_token_id=0))(_features())
    assert flat["input_ids"].shape == (1, sum(map(sum, LENGTHS))) and flat["attention_mask"] is None
    assert flat["position_ids"].tolist() == [[p for lengths in LENGTHS for n in lengths for p in range(n)]]
    assert flat["labels"][0, sum(LENGTHS[0])] == -100  # the first label of the second row: no token predicts it
    model = _model()
    ref_loss, ref_grads = _loss_and_grads(model, rows)
    loss, grads = _loss_and_grads(model, flat)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_flattening_needs_the_attention_ids():
    with pytest.raises(ValueError, match="^base: collate with neat_packing=False"):
        VarlenPackedCollator(SFTDataCollator(pad_token_id=0, neat_packing=True))
    with pytest.raises(ValueError, match="^features: packed features with position_ids"):
        VarlenPackedCollator(SFTDataCollator(pad_token_id=0))([{"input_ids": [3, 4], "labels": [3, 4]}])
    batch = flatten_packed_batch({"input_ids": torch.tensor([[5, 6, 0]]), "labels": torch.tensor([[5, 6, -100]]),
                                  "attention_mask": torch.tensor([[1, 1, 0]]),
                                  "position_ids": torch.tensor([[0, 1, 0]])})
    assert batch["input_ids"].tolist() == [[5, 6]] and batch["position_ids"].tolist() == [[0, 1]]


def _npu_fusion_attention(calls):
    """torch_npu.npu_fusion_attention's signature (the arguments transformers passes), plain torch:
    per-sequence causal attention over the "TND" layout."""

    def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                             atten_mask=None, scale=1.0, keep_prob=1.0, actual_seq_qlen=None, actual_seq_kvlen=None,
                             sparse_mode=0, **kwargs):
        calls.append({"layout": input_layout, "head_num": head_num, "qlen": actual_seq_qlen,
                      "kvlen": actual_seq_kvlen, "sparse_mode": sparse_mode, "device": query.device.type})
        assert input_layout == "TND" and query.shape[1] == head_num and keep_prob == 1.0
        repeat = head_num // key.shape[1]
        parts, start = [], 0
        for end in actual_seq_qlen:
            q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
            k, v = k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)
            parts.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))
            start = end
        return (torch.cat(parts, dim=1).transpose(0, 1),)

    return npu_fusion_attention


def test_fa2_on_npu_takes_the_varlen_path(fake_npu, monkeypatch):  # noqa: F811
    import transformers.integrations.npu_flash_attention as npu_fa
    import transformers.modeling_flash_attention_utils as fa_utils

    calls: list = []
    monkeypatch.setattr(fa_utils, "is_torch_npu_available", lambda *a, **k: True)
    monkeypatch.setattr(npu_fa, "npu_fusion_attention", _npu_fusion_attention(calls), raising=False)
    model = _model(torch.bfloat16)
    ref_loss, _ = _loss_and_grads(model, SFTDataCollator(pad_token_id=0, neat_packing=True,
                                                         compute_dtype=torch.bfloat16)(_features()))
    plan = attention_plan("auto", fake_npu.type)
    model = model.to(fake_npu)
    model.config._attn_implementation = plan.attn_implementation  # what from_pretrained(attn_implementation=) sets
    flat = VarlenPackedCollator(SFTDataCollator(pad_token_id=0))(_features())
    loss, grads = _loss_and_grads(model, {k: v.to(fake_npu) if v is not None else None for k, v in flat.items()})
    ends = torch.tensor([n for lengths in LENGTHS for n in lengths]).cumsum(0).tolist()
    assert len(calls) == 2 and all(c["layout"] == "TND" and c["device"] == "npu" for c in calls)  # one per layer
    assert list(calls[0]["qlen"]) == ends and list(calls[0]["kvlen"]) == ends
    assert calls[0]["head_num"] == 4 and calls[0]["sparse_mode"] == npu_fa.SPARSE_MODE
    torch.testing.assert_close(loss.float().cpu(), ref_loss.float(), rtol=2e-2, atol=0)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_the_collator_follows_the_models_attention_plan():
    """One decision: the plan prepare_model loaded the model with also picks the collator."""
    from types import SimpleNamespace

    from npu_ft.train.run import _collator

    tokenizer = SimpleNamespace(pad_token_id=0)
    on_npu = SimpleNamespace(npu_ft_attention_plan=attention_plan("auto", "npu"))
    on_cpu = SimpleNamespace(npu_ft_attention_plan=attention_plan("auto", "cpu"))
    packed, unpacked = SimpleNamespace(neat_packing=True), SimpleNamespace(neat_packing=False)
    assert isinstance(_collator(packed, tokenizer, torch.float32, on_npu), VarlenPackedCollator)
    for cfg, model in ((packed, on_cpu), (unpacked, on_npu), (packed, object())):
        assert not isinstance(_collator(cfg, tokenizer, torch.float32, model), VarlenPackedCollator)
