"""enable_fused_cross_entropy on tiny random Qwen2 / Qwen3 models: the patched forward gives the
same loss and the same gradient on every trainable parameter as transformers' own forward (fp32,
rtol 1e-5, atol 1e-5 x max|grad|: the head GEMM and the softmax sums are chunked), with tied and
untied embeddings, LoRA and full fine-tuning, num_items_in_batch / shift_labels / ignore_index
kwargs, gradient checkpointing and a DDP wrapper; calls without labels and generate() are unchanged;
models it does not know are left alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from npu_ft.model.tiny import model_from_config, tiny_config
from npu_ft.modules.fused_loss import (
    disable_fused_cross_entropy,
    enable_fused_cross_entropy,
    fused_cross_entropy_enabled,
)
from npu_ft.modules.inject import apply_lora

VOCAB = 503  # odd, small: fast; the op's own tests cover awkward shapes


def _model(arch="qwen2", tied=True, method="full", vocab=VOCAB, dtype=torch.float32, **lora):
    cfg = tiny_config(arch, hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=vocab,
                      tie_word_embeddings=tied)
    cfg.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = model_from_config(cfg, dtype=dtype, seed=0)
    if method == "lora":
        apply_lora(model, lora.pop("targets", "all"), r=4, alpha=8, **lora)
        with torch.no_grad():  # B = 0 at init would make the LoRA grads of A trivially zero
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    else:
        model.requires_grad_(True)
    model.train()
    return model


def _batch(batch=3, seq=19, vocab=VOCAB, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :7] = -100          # prompt
    mask[1, -5:] = 0              # right padding
    labels[1, -5:] = -100
    labels[2, :] = -100           # a row without any target
    return ids, mask, labels


def _loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _assert_same(ours, ref, rtol=1e-5):
    (out_ours, g_ours), (out_ref, g_ref) = ours, ref
    torch.testing.assert_close(out_ours.loss, out_ref.loss, rtol=rtol, atol=1e-6)
    assert set(g_ours) == set(g_ref) and g_ref
    for name in g_ref:
        assert g_ours[name] is not None, name
        atol = rtol * max(1e-3, float(g_ref[name].abs().max()))
        torch.testing.assert_close(g_ours[name], g_ref[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _pair(**kw):
    ref = _model(**kw)
    ours = copy.deepcopy(ref)
    assert enable_fused_cross_entropy(ours, chunk_rows=kw.pop("chunk_rows", 5)) is True
    assert fused_cross_entropy_enabled(ours) and not fused_cross_entropy_enabled(ref)
    return ours, ref


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_loss_and_grads_match_transformers(arch, tied, method):
    ours, ref = _pair(arch=arch, tied=tied, method=method)
    ids, mask, labels = _batch()
    a = _loss_and_grads(ours, input_ids=ids, attention_mask=mask, labels=labels)
    b = _loss_and_grads(ref, input_ids=ids, attention_mask=mask, labels=labels)
    assert a[0].logits is None and b[0].logits is not None
    if method == "full":
        assert "lm_head.weight" in a[1] or tied  # the head (or the tied embedding) trains
    _assert_same(a, b)


def test_lora_with_trainable_head_copy():
    """additional_target: lm_head -> a trainable nn.Linear copy (PEFT modules_to_save): still fused,
    and the head gets its gradient."""
    ours, ref = _pair(method="lora", additional_target=["lm_head"])
    ids, mask, labels = _batch()
    a = _loss_and_grads(ours, input_ids=ids, attention_mask=mask, labels=labels)
    b = _loss_and_grads(ref, input_ids=ids, attention_mask=mask, labels=labels)
    assert "lm_head.weight" in a[1]
    _assert_same(a, b)


@pytest.mark.parametrize("num_items", [13, "tensor"])
def test_num_items_in_batch(num_items):
    ours, ref = _pair(tied=False)
    ids, mask, labels = _batch()
    items = torch.tensor(29) if num_items == "tensor" else num_items
    a = _loss_and_grads(ours, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=items)
    b = _loss_and_grads(ref, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=items)
    _assert_same(a, b)
    mean = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(float(a[0].loss.detach()) - float(mean.detach())) > 1e-3  # the sum / num_items reduction really applied


def test_shift_labels_and_ignore_index_kwargs():
    ours, ref = _pair(arch="qwen3")
    ids, mask, labels = _batch()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].clone()
    shift[0, 9:12] = -100
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shift)
    _assert_same(_loss_and_grads(ours, **kw), _loss_and_grads(ref, **kw))
    other = labels.masked_fill(labels == -100, -1)
    kw = dict(input_ids=ids, attention_mask=mask, labels=other, ignore_index=-1)
    _assert_same(_loss_and_grads(ours, **kw), _loss_and_grads(ref, **kw))


def test_gradient_checkpointing():
    ours, ref = _pair(method="lora")
    for m in (ours, ref):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()
    ids, mask, labels = _batch()
    _assert_same(_loss_and_grads(ours, input_ids=ids, attention_mask=mask, labels=labels),
                 _loss_and_grads(ref, input_ids=ids, attention_mask=mask, labels=labels))


def test_bf16_model():
    """bf16 weights: same bf16 head GEMM, fp32 softmax; loss rtol 1e-3, grads bf16 tolerance."""
    ours, ref = _pair(tied=False, dtype=torch.bfloat16)
    ids, mask, labels = _batch()
    a = _loss_and_grads(ours, input_ids=ids, attention_mask=mask, labels=labels)
    b = _loss_and_grads(ref, input_ids=ids, attention_mask=mask, labels=labels)
    assert a[0].loss.dtype == torch.float32
    torch.testing.assert_close(a[0].loss, b[0].loss, rtol=1e-3, atol=1e-4)
    for name, g in b[1].items():
        assert a[1][name].dtype == torch.bfloat16
        atol = 2e-2 * max(1e-3, float(g.float().abs().max()))
        torch.testing.assert_close(a[1][name].float(), g.float(), rtol=2e-2, atol=atol)


def test_return_dict_false_and_dict_access():
    ours, ref = _pair()
    ids, mask, labels = _batch()
    out = ours(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(out, tuple)
    expected = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert out["loss"] is out.loss and out[0] is out.loss and "logits" not in out  # what Trainer reads


def test_no_labels_and_generate_unchanged():
    ours, ref = _pair(tied=False)
    ours.eval(), ref.eval()
    ids, mask, _ = _batch()
    with torch.no_grad():
        a, b = ours(input_ids=ids, attention_mask=mask), ref(input_ids=ids, attention_mask=mask)
        assert a.loss is None and torch.equal(a.logits, b.logits)
        a = ours(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        b = ref(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        assert a.logits.shape[1] == 1 and torch.equal(a.logits, b.logits)
        prompt = ids[:1, :6]
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(prompt, **kw), ref.generate(prompt, **kw))


def test_ddp_goes_through_the_patch(tmp_path):
    """DDP (gloo, one process) calls module.forward: the instance patch is what runs."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    ours, ref = _pair(tied=True)
    ids, mask, labels = _batch()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(ours)
        out = ddp(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.logits is None
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    finally:
        dist.destroy_process_group()
    _assert_same((out, grads), _loss_and_grads(ref, input_ids=ids, attention_mask=mask, labels=labels))


def test_enable_is_idempotent_and_disable_restores():
    model = _model()
    assert enable_fused_cross_entropy(model) and enable_fused_cross_entropy(model)
    ids, mask, labels = _batch()
    assert model(input_ids=ids, labels=labels).logits is None
    assert disable_fused_cross_entropy(model) and not disable_fused_cross_entropy(model)
    assert "forward" not in vars(model)
    assert model(input_ids=ids, labels=labels).logits is not None


def test_not_applicable_leaves_model_untouched(caplog):
    from transformers import Qwen2ForCausalLM

    # a LoRA on the output head: lm_head is no longer a plain nn.Linear
    model = _model(method="lora", targets=["q_proj", "lm_head"])
    with caplog.at_level("WARNING", logger="npu_ft.modules.fused_loss"):
        assert enable_fused_cross_entropy(model) is False
    assert "not a plain nn.Linear" in caplog.text
    assert "forward" not in vars(model) and not fused_cross_entropy_enabled(model)

    # not a causal LM class it knows: the base model, a subclass with its own forward, a PEFT wrapper
    base = _model().model
    assert enable_fused_cross_entropy(base) is False and "forward" not in vars(base)

    class Custom(Qwen2ForCausalLM):
        def forward(self, *args, **kwargs):  # pragma: no cover - never called
            return super().forward(*args, **kwargs)

    full = _model()
    full.__class__ = type("Qwen2ForCausalLM", (Custom,), {})
    assert enable_fused_cross_entropy(full) is False and "forward" not in vars(full)

    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(_model(), peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert enable_fused_cross_entropy(wrapped) is False and "forward" not in vars(wrapped)

    # a custom loss function
    model = _model()
    model.loss_function = lambda *a, **k: None
    assert enable_fused_cross_entropy(model) is False and "forward" not in vars(model)


def test_run_sft_uses_it_by_default_and_the_key_turns_it_off(tmp_path):
    """run_sft: fused_cross_entropy true (default) -> the trained model's forward is the fused one and
    the loss really goes through it; false -> transformers' loss. Same per-step losses (gradient
    accumulation 2: the num_items_in_batch path) within 1e-5."""
    import npu_ft.ops.linear_cross_entropy as lce
    from npu_ft.config import load_config
    from npu_ft.train.run import run_sft

    from ._sft_helpers import base_recipe, step_losses, tiny_model_dir, write_dataset, write_recipe

    model_dir, data = tiny_model_dir(tmp_path), write_dataset(tmp_path / "data", n=8)
    calls = []
    original = lce._LinearCrossEntropySum.apply

    def counting(*args):
        calls.append(args[3].numel())  # labelled rows
        return original(*args)

    losses = {}
    for fused in (None, False):  # None: the key left out (default true)
        recipe = base_recipe(
            model_dir,
            data,
            tmp_path / f"out-{fused}",
            max_steps=2,
            save_steps=2,
            gradient_accumulation_steps=2,
            fused_cross_entropy=fused,
        )
        cfg = load_config(write_recipe(tmp_path / f"r-{fused}.yaml", recipe))
        calls.clear()
        lce._LinearCrossEntropySum.apply = counting
        try:
            result = run_sft(cfg)
        finally:
            lce._LinearCrossEntropySum.apply = original
        assert fused_cross_entropy_enabled(result.model) is (fused is None)
        assert (len(calls) == 4 and all(calls)) if fused is None else not calls
        losses[fused] = step_losses(tmp_path / f"out-{fused}")
    assert sorted(losses[None]) == [1, 2]
    for step, ref in losses[False].items():
        assert abs(losses[None][step] - ref) <= 1e-5 * abs(ref), losses
