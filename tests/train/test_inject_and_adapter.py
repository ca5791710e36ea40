"""LoRA/QLoRA injection, PEFT-format adapters (PEFT loads ours, we load PEFT's), merge for export."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from npu_ft.config import build_config
from npu_ft.model import model_from_config, tiny_config
from npu_ft.modules import LoraLinear, Nf4Linear
from npu_ft.modules.inject import (
    apply_lora,
    apply_qlora,
    find_target_linear_names,
    get_lora_spec,
    merge_adapter,
)
from npu_ft.train.adapter_io import adapter_state_dict, load_adapter, save_adapter

peft = pytest.importorskip("peft")

VOCAB = 256
QWEN2_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def tiny(arch="qwen2", tie=False, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_from_config(tiny_config(arch, vocab=VOCAB, tie_word_embeddings=tie), seed=seed).eval()


def ids(seed=0):
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    model.eval()
    return model(x).logits


@torch.no_grad()
def perturb_trainable(model, seed=1):
    """Training stand-in: move every trainable tensor (B starts at zero, so LoRA would be a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def peft_logits(base, adapter_dir, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir))
    return logits(pm, x)


# ------------------------------------------------------------------------------- targets
def test_all_targets_every_linear_but_the_output_head():
    for tie in (False, True):
        assert find_target_linear_names(tiny(tie=tie), "all") == QWEN2_LINEARS
    assert find_target_linear_names(tiny("qwen3"), ["all"]) == QWEN2_LINEARS


def test_named_targets_and_errors():
    model = tiny()
    assert find_target_linear_names(model, "q_proj, v_proj") == ["q_proj", "v_proj"]
    assert find_target_linear_names(model, ["self_attn.o_proj"]) == ["self_attn.o_proj"]
    with pytest.raises(ValueError, match="no linear layer named 'qkv_proj'.*q_proj"):
        find_target_linear_names(model, "q_proj,qkv_proj")


def test_apply_lora_wraps_targets_and_freezes_the_rest():
    base = tiny()
    model = apply_lora(copy.deepcopy(base), "q_proj,v_proj", r=4, alpha=None, dropout=0.1)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, LoraLinear) and isinstance(layer.self_attn.v_proj, LoraLinear)
    assert type(layer.self_attn.k_proj) is nn.Linear and type(model.lm_head) is nn.Linear
    assert layer.self_attn.q_proj.scaling == 2.0  # alpha None -> 2r
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    spec = get_lora_spec(model)
    assert spec.target_modules == ["q_proj", "v_proj"] and spec.r == 4 and spec.lora_alpha == 8
    # B = 0: the adapted model computes exactly the base model
    torch.testing.assert_close(logits(model, ids()), logits(base, ids()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, "all")


def test_additional_target_is_trainable_and_kept_separate_from_tied_weights():
    base = tiny(tie=True)
    model = apply_lora(copy.deepcopy(base), "all", r=2, additional_target="embed_tokens")
    assert model.model.embed_tokens.weight.requires_grad
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not model.lm_head.weight.requires_grad
    assert get_lora_spec(model).saved_module_names == ["model.embed_tokens"]


# ------------------------------------------------------------------------------- PEFT format
def test_peft_matches_us_on_tied_embeddings_in_modules_to_save(tmp_path):
    base = tiny(tie=True)
    ours = apply_lora(copy.deepcopy(base), "all", r=2, additional_target="embed_tokens")
    perturb_trainable(ours)
    save_adapter(ours, tmp_path / "a")
    x = ids(4)
    torch.testing.assert_close(peft_logits(base, tmp_path / "a", x), logits(ours, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(targets="all", r=4, alpha=8),
        dict(targets="q_proj,down_proj", r=3, alpha=7, use_rslora=True, dropout=0.05),
        dict(targets="all", r=2, alpha=4, additional_target="norm"),  # PEFT suffix rule: all *norm modules
    ],
)
def test_peft_loads_our_adapter_with_equal_logits(tmp_path, kwargs):
    base = tiny()
    ours = apply_lora(copy.deepcopy(base), **kwargs)
    perturb_trainable(ours)
    out = save_adapter(ours, tmp_path / "adapter", base_model_name_or_path="models/tiny")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == kwargs["r"] and config["lora_alpha"] == kwargs["alpha"]
    assert config["base_model_name_or_path"] == "models/tiny"
    assert config["use_rslora"] == kwargs.get("use_rslora", False)
    assert config["lora_dropout"] == kwargs.get("dropout", 0.0)

    x = ids(3)
    ours_logits = logits(ours, x)
    assert not torch.allclose(ours_logits, logits(base, x))  # the adapter does something
    torch.testing.assert_close(peft_logits(base, out, x), ours_logits, rtol=1e-5, atol=1e-5)

    # the same LoraConfig through PEFT itself saves exactly our key names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=config["r"], lora_alpha=config["lora_alpha"], target_modules=config["target_modules"],
            modules_to_save=config["modules_to_save"], use_rslora=config["use_rslora"], task_type="CAUSAL_LM"))
    peft_keys = set(peft.get_peft_model_state_dict(reference))
    assert set(adapter_state_dict(ours)) == peft_keys


def test_key_names_are_pefts(tmp_path):
    from safetensors.torch import load_file

    model = apply_lora(tiny(), "all", r=2)
    save_adapter(model, tmp_path / "a")
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 7 * 2


def test_we_load_pefts_adapter_and_our_own(tmp_path):
    base = tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=4, lora_alpha=16, target_modules=["q_proj", "up_proj"], modules_to_save=["norm"], task_type="CAUSAL_LM"))
    perturb_trainable(pm)
    pm.save_pretrained(str(tmp_path / "peft"))
    x = ids(5)
    expected = logits(pm, x)
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(ours, x), expected, rtol=1e-5, atol=1e-5)
    # our own round trip
    save_adapter(ours, tmp_path / "ours")
    again = load_adapter(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(again, x), expected, rtol=0, atol=0)
    # wrong model shape -> clear error
    other = apply_lora(tiny(), "q_proj", r=8)
    with pytest.raises(ValueError, match="does not fit the model"):
        load_adapter(other, tmp_path / "ours")


def test_save_is_atomic_and_keeps_other_files(tmp_path):
    model = apply_lora(tiny(), "all", r=2)
    cfg = build_config({"model_name_or_path": "models/tiny-qwen2"})
    out = tmp_path / "output_dir"
    out.mkdir()
    (out / "trainer_log.jsonl").write_text("{}\n")
    save_adapter(model, out, cfg)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "trainer_log.jsonl"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "models/tiny-qwen2"
    fresh = tmp_path / "new" / "adapter"
    save_adapter(model, fresh)
    assert sorted(p.name for p in fresh.parent.iterdir()) == ["adapter"]  # no temp folders left


# ------------------------------------------------------------------------------- merge / QLoRA
def test_merge_gives_a_plain_transformers_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = apply_lora(tiny(), "all", r=4, additional_target="norm")
    perturb_trainable(model)
    x = ids(7)
    expected = logits(model, x)
    merged = merge_adapter(model)
    assert not any(isinstance(m, (LoraLinear, Nf4Linear)) for m in merged.modules())
    assert get_lora_spec(merged) is None
    torch.testing.assert_close(logits(merged, x), expected, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "full")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32)
    torch.testing.assert_close(logits(reloaded, x), expected, rtol=1e-5, atol=1e-5)


def test_qlora_quantizes_all_linears_but_the_head_and_merges_dequantized(tmp_path):
    base = tiny()
    model = apply_qlora(copy.deepcopy(base), "q_proj,v_proj", r=4, alpha=8)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, LoraLinear) and isinstance(layer.self_attn.q_proj.base_layer, Nf4Linear)
    assert isinstance(layer.mlp.down_proj, Nf4Linear)  # not a target, still quantized (bnb 4-bit loading)
    assert type(model.lm_head) is nn.Linear
    assert get_lora_spec(model).quantized
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)

    # gradients reach the adapters through the NF4 base
    x = ids(9)
    model.train()
    model(x, labels=x).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.grad is not None

    perturb_trainable(model)
    expected = logits(model, x)
    # NF4 is lossy but close: same ballpark as the dense model
    assert (expected - logits(base, x)).abs().max() < 1.0
    save_adapter(model, tmp_path / "qlora")
    saved = json.loads((tmp_path / "qlora" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["q_proj", "v_proj"]
    merged = merge_adapter(model)
    assert not any(isinstance(m, (LoraLinear, Nf4Linear)) for m in merged.modules())
    torch.testing.assert_close(logits(merged, x), expected, rtol=1e-4, atol=1e-4)
