"""npu-ft's fused decoder-block ops in a model (npu_ft.modules.fused_blocks): loss and gradients equal
unpatched transformers over 20 training steps (fp32, 1e-5 relative) for LoRA, QLoRA and full
fine-tuning on tiny Qwen2 and Qwen3, with and without (neat) packing; the patch is per instance and
undoable; the selective checkpointing policy recomputes the ops; the recipe keys fused_kernels and
enable_liger_kernel; a run_sft run with the patch trains as without it."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from npu_ft.data.collator import SFTDataCollator
from npu_ft.model.tiny import model_from_config, tiny_config
from npu_ft.modules import fused_blocks
from npu_ft.modules.fused_blocks import (
    LigerUnavailableError,
    apply_fused_kernels,
    enable_fused_kernels,
    fused_kernels_applied,
    remove_fused_kernels,
)
from npu_ft.modules.inject import apply_lora, apply_qlora
from npu_ft.ops import kernel_calls, reset_kernel_calls

STEPS = 20
#: fp32, relative: each step's loss, and each step's gradient of every parameter (norm of the
#: difference / norm) and of all of them as one vector. The two models train independently, so
#: rounding differences add up over the steps (measured: <= 2e-6 per tensor after 20 steps).
RTOL = 1e-5
VOCAB = 1000
ALL_PATCHES = ["rms_norm", "residual_rms_norm", "rope", "swiglu"]


def _model(arch: str, method: str, hidden_act: str = "silu"):
    config = tiny_config(arch, hidden_size=48, layers=2, heads=4, kv_heads=2, intermediate=100, vocab=VOCAB)
    config.update(hidden_act=hidden_act, bos_token_id=1, eos_token_id=2)
    model = model_from_config(config, seed=0)
    model.config.use_cache = False
    if method == "lora":
        apply_lora(model, "all", r=4)
    elif method == "qlora":
        apply_qlora(model, "all", r=4)
    else:
        model.requires_grad_(True)
    with torch.no_grad():  # nonzero LoRA B: every gradient path is exercised from the first step
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


def _batches(packing: bool, n: int = STEPS, seed: int = 0) -> list[dict]:
    """Padded rows of random lengths, or rows of 3 packed examples (attention ids + restarted
    position ids, collated into LLaMA-Factory's block-diagonal 4D mask)."""
    gen = torch.Generator().manual_seed(seed)
    collate = SFTDataCollator(pad_token_id=0, neat_packing=packing)

    def randint(lo, hi, size=()):
        return torch.randint(lo, hi, size, generator=gen)

    batches = []
    for _ in range(n):
        features = []
        for _ in range(2):
            if packing:
                lengths = [int(randint(2, 12)) for _ in range(3)]
                ids = randint(3, VOCAB, (sum(lengths),)).tolist()
                features.append({"input_ids": ids, "labels": ids,
                                 "attention_mask": [i + 1 for i, n_ in enumerate(lengths) for _ in range(n_)],
                                 "position_ids": [p for n_ in lengths for p in range(n_)]})
            else:
                ids = randint(3, VOCAB, (int(randint(4, 20)),)).tolist()
                features.append({"input_ids": ids, "labels": ids})
        batches.append(collate(features))
    return batches


def _train(model, batches) -> tuple[list[float], list[dict]]:
    """SGD steps; returns the losses and each step's gradients. (Not Adam: its first step moves every
    parameter by ±lr whatever the gradient's size, so a gradient element of ~1e-12 that rounds to the
    other sign in one run becomes a 2·lr difference in the weights; SGD moves by lr × gradient.)"""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses, grads = [], []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


def _assert_same_training(ref, fused) -> None:
    (ref_losses, ref_grads), (losses, grads) = ref, fused
    for step, (a, b) in enumerate(zip(ref_losses, losses, strict=True)):
        assert abs(a - b) <= RTOL * abs(a), (step, a, b)
    for step, (ga, gb) in enumerate(zip(ref_grads, grads, strict=True)):
        assert ga.keys() == gb.keys() and ga
        total = torch.cat([g.flatten() for g in ga.values()])
        diff = torch.cat([(gb[name] - g).flatten() for name, g in ga.items()])
        assert float(diff.norm()) <= RTOL * float(total.norm()), (step, float(diff.norm() / total.norm()))
        for name, g in ga.items():
            d = float((gb[name] - g).norm())
            assert d <= RTOL * max(float(g.norm()), 1e-30), (step, name, d, float(g.norm()))


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_training_matches_unpatched_transformers(arch, method, packing):
    reference = _model(arch, method)
    fused = copy.deepcopy(reference)
    assert apply_fused_kernels(fused) == ALL_PATCHES
    expected = {"rms_norm": 2 * 2 + 1 + (4 if arch == "qwen3" else 0), "residual_rms_norm": 2, "rope": 2, "swiglu": 2}
    assert fused_kernels_applied(fused) == expected  # qwen3: q_norm and k_norm in each layer too
    batches = _batches(packing)
    reset_kernel_calls()
    ref_run = _train(reference, batches)
    assert not any(kernel_calls(op) for op in ("rms_norm", "rope", "swiglu"))  # the reference stays unpatched
    fused_run = _train(fused, batches)
    for op in ("rms_norm", "rms_norm_backward", "rope", "rope_backward", "swiglu", "swiglu_backward"):
        assert kernel_calls(op).get("cpu", 0) >= STEPS, (op, kernel_calls(op))
    _assert_same_training(ref_run, fused_run)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_llama_and_mistral_layouts(arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, vocab_size=VOCAB, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config).train()
    reference.requires_grad_(True)
    fused = copy.deepcopy(reference)
    assert apply_fused_kernels(fused) == ALL_PATCHES
    batches = _batches(packing=False, n=3)
    _assert_same_training(_train(reference, batches), _train(fused, batches))


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_checkpointing_recomputes_the_fused_ops(policy):
    from npu_ft.modules.checkpointing import RECOMPUTED_OPS, enable_gradient_checkpointing

    plain = _model("qwen2", "lora")
    apply_fused_kernels(plain)
    checkpointed = copy.deepcopy(plain)
    enable_gradient_checkpointing(checkpointed, policy, use_reentrant=False)
    batches = _batches(packing=True, n=3)
    reset_kernel_calls()
    ref_run = _train(plain, batches)
    once = {op: kernel_calls(op).get("cpu", 0) for op in RECOMPUTED_OPS}
    reset_kernel_calls()
    run = _train(checkpointed, batches)
    for op, n in once.items():  # the final norm runs outside the checkpointed layers
        assert kernel_calls(op).get("cpu", 0) > n, (op, kernel_calls(op), n)
    _assert_same_training(ref_run, run)


def test_the_patch_is_per_instance_and_undoable():
    model = _model("qwen2", "lora")
    other = copy.deepcopy(model)
    batch = _batches(packing=False, n=1)[0]
    before = float(model(**batch).loss)
    apply_fused_kernels(model, rope=False)
    assert set(fused_kernels_applied(model)) == {"rms_norm", "residual_rms_norm", "swiglu"}
    assert apply_fused_kernels(model) == ALL_PATCHES and fused_kernels_applied(model)["rms_norm"] == 5  # idempotent
    assert fused_kernels_applied(other) == {}
    reset_kernel_calls()
    float(other(**batch).loss)
    assert not kernel_calls("rope") and not kernel_calls("rms_norm")  # the rope dispatcher is inert there
    assert remove_fused_kernels(model) == 11 and fused_kernels_applied(model) == {}
    reset_kernel_calls()
    assert float(model(**batch).loss) == before and not kernel_calls("rms_norm")


def test_only_what_applies_is_patched():
    model = _model("qwen2", "full", hidden_act="gelu")
    assert apply_fused_kernels(model, rope=False) == ["rms_norm", "residual_rms_norm"]  # no SiLU MLP
    assert apply_fused_kernels(torch.nn.Sequential(torch.nn.Linear(3, 3))) == []


class _Recipe(dict):
    """The config surface enable_fused_kernels reads (``cfg.get(key, default)``)."""


def test_enable_from_the_recipe():
    assert enable_fused_kernels(_Recipe(), _model("qwen2", "lora")) == ALL_PATCHES
    assert enable_fused_kernels(_Recipe(fused_kernels=False), _model("qwen2", "lora")) == []


def test_enable_liger_kernel_means_liger(monkeypatch):
    model = _model("qwen2", "lora")
    if fused_blocks.liger_unavailable_reason() is not None:
        with pytest.raises(LigerUnavailableError, match="pip install liger-kernel"):
            enable_fused_kernels(_Recipe(enable_liger_kernel=True), model)
    calls = []
    liger = types.ModuleType("liger_kernel")
    transformers_mod = types.ModuleType("liger_kernel.transformers")
    transformers_mod._apply_liger_kernel_to_instance = lambda model: calls.append(model)  # type: ignore[attr-defined]
    liger.transformers = transformers_mod  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "liger_kernel", liger)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", transformers_mod)
    monkeypatch.setattr(fused_blocks, "liger_unavailable_reason", lambda: None)
    assert enable_fused_kernels(_Recipe(enable_liger_kernel=True, fused_kernels=True), model) == ["liger"]
    assert calls == [model] and fused_kernels_applied(model) == {}


def test_config_keys(tmp_path, monkeypatch):
    import importlib.util

    from npu_ft.config import ConfigError, build_config

    assert build_config({"model_name_or_path": "m"}).fused_kernels is True
    assert build_config({"model_name_or_path": "m", "fused_kernels": "false"}).fused_kernels is False
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"^r\.yaml: key 'enable_liger_kernel': true needs Liger-Kernel"):
        build_config({"model_name_or_path": "m", "enable_liger_kernel": True}, source="r.yaml")
    assert build_config({"model_name_or_path": "m", "enable_liger_kernel": False}).enable_liger_kernel is False


def test_run_sft_with_the_fused_kernels_trains_as_without(tmp_path):
    """run_sft on a tiny Qwen2 (LoRA, packing, selective checkpointing): fused_kernels true (the
    default) patches every decoder layer and gives the same losses as fused_kernels false."""
    from npu_ft.config import build_config
    from npu_ft.modules.fused_blocks import fused_kernels_applied
    from npu_ft.train.run import run_sft
    from tests.train._sft_helpers import base_recipe, step_losses, tiny_model_dir, write_dataset

    model_dir, data_dir = tiny_model_dir(tmp_path), write_dataset(tmp_path / "data")
    losses, patched = {}, {}
    for name, fused in (("plain", False), ("fused", True)):
        recipe = base_recipe(model_dir, data_dir, tmp_path / name, neat_packing=True, max_steps=4,
                             disable_gradient_checkpointing=False, gradient_checkpointing_policy="selective",
                             use_reentrant_gc=False, fused_kernels=fused)
        cfg = build_config(recipe, source=f"{name}.yaml")
        reset_kernel_calls()
        result = run_sft(cfg)
        losses[name] = step_losses(tmp_path / name)
        patched[name] = fused_kernels_applied(result.model)
        assert bool(kernel_calls("swiglu")) == fused and bool(kernel_calls("rms_norm")) == fused
    assert patched["plain"] == {} and set(patched["fused"]) == set(ALL_PATCHES)
    assert losses["plain"].keys() == losses["fused"].keys() == {1, 2, 3, 4}
    for step, loss in losses["plain"].items():
        assert abs(losses["fused"][step] - loss) <= RTOL * abs(loss), (step, loss, losses["fused"][step])



@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_fused_kernels_compose_with_longlora_shifted_attention(arch):
    """shift_attn (S2-Attn through transformers' attention interface) and the fused RoPE / norms /
    SwiGLU patch different places: together they give S2-Attn's loss and gradients, and the fused
    ops run."""
    from npu_ft.modules.shift_attn import enable_shift_attn

    plain = _model(arch, "lora")
    fused = copy.deepcopy(plain)
    enable_shift_attn(plain)
    enable_shift_attn(fused)
    assert apply_fused_kernels(fused) == ALL_PATCHES
    ids = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    losses = {}
    for name, model in (("plain", plain), ("fused", fused)):
        reset_kernel_calls()
        losses[name] = model(input_ids=ids, labels=ids).loss
        losses[name].backward()
        assert bool(kernel_calls("rope")) == (name == "fused")
    torch.testing.assert_close(losses["fused"], losses["plain"], rtol=RTOL, atol=0)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    for n, p in fused.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)
