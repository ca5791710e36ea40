"""S2-Attn (LongLoRA's shifted sparse attention) for Qwen2/Qwen3: npu_ft.modules.shift_attn.

PEFT and transformers have no S2-Attn, so the fast path is tested against the per-group loop written
beside it (``s2_attention_reference``) and against full attention where they must agree.
Tolerances: fp32 rtol=atol=1e-5 (the same sums in another order); bf16 inputs rtol=atol=2e-2 (the
base attention runs in bf16, the reference in fp32).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from npu_ft.modules import shift_attn as S

FP32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=2e-2, atol=2e-2)


class _Layer(nn.Module):
    """What transformers' attention functions read from an attention layer."""

    def __init__(self, num_heads, num_kv):
        super().__init__()
        self.num_key_value_groups = num_heads // num_kv
        self.is_causal = True
        self.layer_idx = 0


def _bases():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

    return {"eager": eager_attention_forward, "sdpa": sdpa_attention_forward}


def _qkv(batch, heads, kv_heads, seq, dim=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, generator=gen)
    k = torch.randn(batch, kv_heads, seq, dim, generator=gen)
    v = torch.randn(batch, kv_heads, seq, dim, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _allowed(seq, pad_left=(), pad_right=()):
    """bool [B, 1, L, L]: causal and key padding; row b has pad_left[b] / pad_right[b] padding tokens."""
    rows = []
    for left, right in zip(pad_left, pad_right, strict=True):
        valid = torch.ones(seq, dtype=torch.bool)
        valid[:left] = False
        valid[seq - right:] = False
        rows.append(torch.ones(seq, seq, dtype=torch.bool).tril() & valid[None, :])
    return torch.stack(rows)[:, None]


def _as_base_mask(allowed, base, dtype):
    """The mask in the form transformers gives each base: bool for sdpa, additive (0 / min) for eager."""
    if allowed is None or base == "sdpa":
        return allowed
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)


def _real_rows(allowed, seq, batch):
    """[B, L] bool: query positions that are real tokens (padding rows are never used)."""
    if allowed is None:
        return torch.ones(batch, seq, dtype=torch.bool)
    return allowed[:, 0].diagonal(dim1=-2, dim2=-1).expand(batch, seq)


CASES = [  # heads, kv_heads, seq, pad_left, pad_right
    (4, 2, 16, None, None),  # GQA, L a multiple of 8: LongLoRA's own geometry
    (4, 2, 16, (0, 3), (5, 0)),  # right padding in row 0, left padding in row 1
    (4, 1, 13, (0, 2), (1, 0)),  # MQA (key/value heads repeated), L padded inside to 16
    (6, 3, 21, None, None),  # head split between key/value heads -> repeat; L padded to 24
    (2, 2, 8, (1, 0), (0, 0)),
]


@pytest.mark.parametrize("base_name", ["eager", "sdpa"])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize("heads,kv_heads,seq,pad_left,pad_right", CASES)
def test_fast_path_equals_the_per_group_reference(base_name, ratio, heads, kv_heads, seq, pad_left, pad_right):
    allowed = None if pad_left is None else _allowed(seq, pad_left, pad_right)
    for dtype, tol in ((torch.float32, FP32), (torch.bfloat16, BF16)):
        q, k, v = _qkv(2, heads, kv_heads, seq, dtype=dtype, seed=seq + heads)
        layer = _Layer(heads, kv_heads)
        out = S.s2_attention(_bases()[base_name], layer, q, k, v, _as_base_mask(allowed, base_name, dtype), ratio,
                             scaling=8**-0.5, dropout=0.0)
        ref = S.s2_attention_reference(q, k, v, allowed, ratio, scaling=8**-0.5)
        assert out.shape == (2, seq, heads, 8) and out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, **tol, msg=lambda m: f"{base_name} {dtype} ratio {ratio}: {m}")


@pytest.mark.parametrize("base_name", ["eager", "sdpa"])
@pytest.mark.parametrize("heads,kv_heads,seq,pad_left,pad_right", CASES)
def test_one_group_covering_the_sequence_is_full_attention(base_name, heads, kv_heads, seq, pad_left, pad_right):
    allowed = None if pad_left is None else _allowed(seq, pad_left, pad_right)
    q, k, v = _qkv(2, heads, kv_heads, seq, seed=1)
    layer, base = _Layer(heads, kv_heads), _bases()[base_name]
    mask = _as_base_mask(allowed, base_name, torch.float32)
    if mask is None and base_name == "eager":
        mask = _as_base_mask(_allowed(seq, (0, 0), (0, 0)), "eager", torch.float32)
    out = S.s2_attention(base, layer, q, k, v, mask, 1.0, scaling=8**-0.5, dropout=0.0)
    full, _ = base(layer, q, k, v, mask, scaling=8**-0.5, dropout=0.0)
    real = _real_rows(allowed, seq, 2)
    torch.testing.assert_close(out[real], full[real], **FP32)


def test_groups_are_sparse_and_the_shift_moves_them():
    """A key outside a query's group does not reach it in the unshifted heads; the shifted heads see
    across the unshifted groups' boundary."""
    q, k, v = _qkv(1, 2, 2, 16, seed=2)
    layer, base = _Layer(2, 2), _bases()["sdpa"]
    out = S.s2_attention(base, layer, q, k, v, None, 0.25, scaling=1.0, dropout=0.0)
    v2 = v.clone()
    v2[:, :, 3] += 10.0  # position 3: group 0 (positions 0..3) for head 0; shifted group 2..5 for head 1
    out2 = S.s2_attention(base, layer, q, k, v2, None, 0.25, scaling=1.0, dropout=0.0)
    changed = (out2 - out).abs().amax(dim=-1)[0] > 1e-6  # [L, H]
    assert changed[:, 0].nonzero().flatten().tolist() == [3]  # head 0: only position 3 itself (causal)
    assert changed[:, 1].nonzero().flatten().tolist() == [3, 4, 5]  # head 1: 3, 4, 5 (group 2..5)


def test_bad_group_size_ratio_names_the_key():
    with pytest.raises(ValueError, match="group_size_ratio: 0.3 is not 1/k"):
        S.num_groups(0.3)
    with pytest.raises(ValueError, match="group_size_ratio"):
        S.num_groups(1.5)


# -- on tiny Qwen2 / Qwen3 models ------------------------------------------------------------------


def _model(arch, attn, seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM

    from npu_ft.model.tiny import tiny_config

    cfg = tiny_config(arch, vocab=512, heads=4, kv_heads=2)
    cfg.update(bos_token_id=1, eos_token_id=2)
    cfg.pop("architectures")
    torch.manual_seed(seed)
    hf_cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn)


def _batch(seq=16):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 512, (2, seq), generator=gen)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, -5:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_model_training_uses_s2_and_eval_uses_full_attention(arch, attn):
    ids, mask = _batch()
    plain, patched = _model(arch, attn), _model(arch, attn)
    S.enable_shift_attn(patched)
    assert S.shift_attn_enabled(patched) and patched.config._attn_implementation == f"npu_ft_s2_{attn}"
    real = mask.bool()
    plain.eval(), patched.eval()
    with torch.no_grad():
        assert torch.equal(patched(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)
    plain.train(), patched.train()
    with torch.no_grad():
        full = plain(ids, attention_mask=mask).logits
        sparse = patched(ids, attention_mask=mask).logits
    assert not torch.allclose(sparse[real], full[real], atol=1e-3), "training must use the sparse groups"
    # a group covering the whole sequence is full attention again
    S.enable_shift_attn(patched, group_size_ratio=1.0)
    with torch.no_grad():
        torch.testing.assert_close(patched(ids, attention_mask=mask).logits[real], full[real], **FP32)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_eager_and_sdpa_give_the_same_training_forward_and_gradients(arch):
    ids, mask = _batch(seq=13)  # not a multiple of 8: padded inside the attention
    labels = ids.masked_fill(mask == 0, -100)
    losses, grads = {}, {}
    for attn in ("eager", "sdpa"):
        model = S.enable_shift_attn(_model(arch, attn))
        model.train()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses[attn] = loss.detach()
        grads[attn] = {n: p.grad for n, p in model.named_parameters()}
        assert all(g is not None and torch.isfinite(g).all() for g in grads[attn].values())
    torch.testing.assert_close(losses["eager"], losses["sdpa"], **FP32)
    for name, g in grads["eager"].items():
        torch.testing.assert_close(g, grads["sdpa"][name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_longlora_recipe_lora_plus_trainable_embedding_and_norms(tmp_path):
    """LongLoRA trains LoRA plus the embedding and the norms (``additional_target``): with S2-Attn on,
    gradients reach all of them; saving writes no S2 attention name into config.json."""
    from npu_ft.modules.inject import apply_lora

    model = _model("qwen3", "sdpa")
    apply_lora(model, targets="all", r=4, additional_target="embed_tokens,norm")
    S.enable_shift_attn(model)
    model.train()
    ids, mask = _batch()
    model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trained) and any("embed_tokens" in n for n in trained)
    assert any(n.endswith("input_layernorm.weight") for n in trained) and "model.norm.weight" in trained
    assert any(n.endswith("q_norm.weight") for n in trained)  # Qwen3's per-head norms end with "norm" too
    for name, p in model.named_parameters():
        if p.requires_grad:  # lora_A's first gradient is 0 (lora_B starts at 0), but it is computed
            assert p.grad is not None and ("lora_A" in name or p.grad.abs().sum() > 0), name
    model.config.save_pretrained(tmp_path)
    assert "npu_ft" not in (tmp_path / "config.json").read_text()
    S.disable_shift_attn(model)
    assert model.config._attn_implementation == "sdpa" and not S.shift_attn_enabled(model)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen3"


def test_unsupported_models_and_attention_are_refused():
    from transformers import AutoModelForCausalLM, LlamaConfig

    llama = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="shift_attn: model type 'llama' not supported"):
        S.enable_shift_attn(llama)
    model = _model("qwen2", "sdpa")
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="shift_attn: attn_implementation 'flash_attention_2' not supported"):
        S.enable_shift_attn(model)
    assert "npu_ft.modules.shift_attn" in sys.modules


def test_gradient_checkpointing_recomputes_the_same_sparse_attention():
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for checkpointing in (False, True):
        model = S.enable_shift_attn(_model("qwen2", "sdpa"))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, **FP32, msg=lambda m: f"{name}: {m}")
