"""Adapter files of the LoRA-family methods: what npu-ft saves, ``peft.PeftModel.from_pretrained``
loads with equal logits (and the other way round); PiSSA's conversion to a plain LoRA of the original
weights; merging for export; and the injection switches (apply_adapter_method)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from npu_ft.config import build_config
from npu_ft.modules.dora import DoraLinear
from npu_ft.modules.inject import (
    apply_adapter_method,
    apply_lora,
    apply_vera,
    get_lora_spec,
    merge_adapter,
    quantize_linears,
)
from npu_ft.modules.vera import VeraLinear, VeraSpec
from npu_ft.train.adapter_io import (
    adapter_state_dict,
    load_adapter,
    save_adapter,
    save_pissa_converted,
    save_pissa_init,
)

from .test_inject_and_adapter import ids, logits, peft, peft_logits, perturb_trainable, tiny

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_dora_adapter_loads_in_peft_with_equal_logits(tmp_path, arch):
    base = tiny(arch)
    model = apply_lora(copy.deepcopy(base), "all", r=4, alpha=8, use_dora=True, additional_target="norm")
    assert all(isinstance(m, DoraLinear) for n, m in model.named_modules() if n.endswith("q_proj"))
    perturb_trainable(model)
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    keys = adapter_state_dict(model)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    x = ids()
    torch.testing.assert_close(peft_logits(base, tmp_path / "a", x), logits(model, x), **TOL)
    # and back: PEFT's own DoRA files into a fresh model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                      target_modules=["q_proj", "v_proj"]))
    perturb_trainable(pm, seed=3)
    pm.save_pretrained(str(tmp_path / "p"))
    ours = load_adapter(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(logits(ours, x), logits(pm, x), **TOL)


def test_dora_merge_equals_the_adapted_model():
    base = tiny()
    model = apply_lora(copy.deepcopy(base), "all", r=4, alpha=8, use_dora=True)
    perturb_trainable(model)
    x = ids()
    want = logits(model, x)
    merged = merge_adapter(model)
    assert not any(isinstance(m, DoraLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, x), want, **TOL)


@pytest.mark.parametrize("save_projection", [True, False])
def test_vera_adapter_loads_in_peft_with_equal_logits(tmp_path, save_projection):
    base = tiny()
    model = apply_vera(copy.deepcopy(base), "all", r=16, projection_prng_key=7, save_projection=save_projection)
    assert isinstance(get_lora_spec(model), VeraSpec)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("vera_lambda_b", "vera_lambda_d")) for n in trainable)
    perturb_trainable(model)
    save_adapter(model, tmp_path / "v")
    config = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["projection_prng_key"]) == ("VERA", 16, 7)
    assert ("base_model.vera_A" in adapter_state_dict(model)) == save_projection
    x = ids()
    torch.testing.assert_close(peft_logits(base, tmp_path / "v", x), logits(model, x), **TOL)
    reloaded = load_adapter(copy.deepcopy(base), tmp_path / "v")
    torch.testing.assert_close(logits(reloaded, x), logits(model, x), **TOL)
    torch.testing.assert_close(logits(merge_adapter(reloaded), x), logits(model, x), **TOL)


def test_vera_projections_are_peft_s_and_shared():
    base = tiny()
    model = apply_vera(copy.deepcopy(base), "q_proj,up_proj", r=8, projection_prng_key=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=8, target_modules=["q_proj", "up_proj"],
                                                                      projection_prng_key=3))
    layers = [m for m in model.modules() if isinstance(m, VeraLinear)]
    assert len({id(m.projections) for m in layers}) == 1
    proj = layers[0].projections
    assert torch.equal(proj.vera_A, pm.base_model.vera_A["default"])
    assert torch.equal(proj.vera_B, pm.base_model.vera_B["default"])


def test_pissa_converted_adapter_is_the_trained_model_on_the_original_base(tmp_path):
    base = tiny()
    torch.manual_seed(0)
    model = apply_lora(copy.deepcopy(base), "all", r=4, alpha=8, init_lora_weights="pissa_niter_4")
    x = ids()
    torch.testing.assert_close(logits(model, x), logits(base, x), rtol=1e-4, atol=1e-4)  # residual + BA = W
    save_pissa_init(model, tmp_path / "pissa_init")
    perturb_trainable(model)
    save_adapter(model, tmp_path / "final")
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa_niter_4"
    save_pissa_converted(model, tmp_path / "converted", tmp_path / "pissa_init")
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    torch.testing.assert_close(peft_logits(base, tmp_path / "converted", x), logits(model, x), rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(ValueError, match="pissa_convert"):
        save_pissa_init(apply_lora(copy.deepcopy(base), "q_proj"), tmp_path / "x")


def test_pissa_init_equals_peft_and_is_refused_on_nf4():
    base = tiny()
    torch.manual_seed(5)
    model = apply_lora(copy.deepcopy(base), "q_proj,down_proj", r=4, alpha=8, init_lora_weights="pissa")
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                                                                      target_modules=["q_proj", "down_proj"]))
    ours = dict(model.named_parameters())
    for name, p in pm.named_parameters():
        key = name.replace("base_model.model.", "").replace(".default", "")
        torch.testing.assert_close(ours[key], p, rtol=1e-5, atol=1e-6, msg=key)
    quantized = copy.deepcopy(base)
    quantize_linears(quantized)
    with pytest.raises(ValueError, match="init_lora_weights: PiSSA needs a dense base"):
        apply_lora(quantized, "q_proj", init_lora_weights="pissa")


def test_apply_adapter_method_follows_the_recipe_keys():
    from npu_ft.modules import LoraLinear, Nf4Linear

    def make(**keys):
        return apply_adapter_method(tiny(), build_config({"model_name_or_path": "m", **keys}))

    qdora = make(use_dora=True, quantization_bit=4, lora_rank=4)
    layer = qdora.model.layers[0].self_attn.q_proj
    assert isinstance(layer, DoraLinear) and isinstance(layer.base_layer, Nf4Linear) and layer.r == 4
    fa = make(lora_fa=True, use_rslora=True, lora_rank=4, lora_alpha=8)
    layer = fa.model.layers[0].mlp.down_proj
    assert type(layer) is LoraLinear and not layer.lora_A.weight.requires_grad and layer.scaling == 4.0
    vera = make(finetuning_type="vera", vera_rank=8, lora_target="q_proj,v_proj", additional_target="norm")
    spec = get_lora_spec(vera)
    assert isinstance(spec, VeraSpec) and spec.r == 8 and spec.modules_to_save == ["norm"]
    pissa = make(pissa_init=True, pissa_iter=-1, lora_target="q_proj")
    assert get_lora_spec(pissa).init_lora_weights == "pissa"


@pytest.mark.parametrize("method", ["dora", "lora_fa", "vera"])
@pytest.mark.parametrize("policy", ["full", "selective"])
def test_checkpointing_policies_give_the_same_gradients(method, policy):
    from npu_ft.modules.checkpointing import enable_gradient_checkpointing

    def build():
        model = tiny()
        if method == "vera":
            apply_vera(model, "all", r=8)
        else:
            apply_lora(model, "all", r=4, use_dora=method == "dora", lora_fa=method == "lora_fa")
        perturb_trainable(model)
        return model.train()

    x = ids()
    grads = []
    for checkpointed in (False, True):
        model = build()
        if checkpointed:
            enable_gradient_checkpointing(model, policy, use_reentrant=False)
        model(x, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_vera_over_an_nf4_base_matches_peft_over_bitsandbytes():
    """QVeRA: VeraLinear(Nf4Linear) against PEFT's VeRA over bnb.nn.Linear4bit: output and gradients."""
    bnb = pytest.importorskip("bitsandbytes")
    from torch import nn

    from npu_ft.modules import Nf4Linear
    from npu_ft.modules.vera import VeraProjections
    from tests.ops.test_dora_linear import _Wrap4bit

    torch.manual_seed(0)
    lin = nn.Linear(128, 80)  # rows hold whole blocks: bnb's native CPU kernel is exact then
    q = bnb.nn.Linear4bit(128, 80, bias=True, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                 compress_statistics=True)
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    q = q.to("cpu")  # quantizes
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(_Wrap4bit(q), peft.VeraConfig(r=16, target_modules=["proj"], projection_prng_key=5))
    layer_ref = ref.base_model.model.proj
    torch.manual_seed(1)
    ours = VeraLinear(Nf4Linear.from_linear(lin), VeraProjections(16, 128, 80, 5), 16)
    with torch.no_grad():
        for mine, theirs in ((ours.vera_lambda_b, layer_ref.vera_lambda_b["default"]),
                             (ours.vera_lambda_d, layer_ref.vera_lambda_d["default"])):
            theirs.normal_()
            mine.copy_(theirs)
    x, gy = torch.randn(2, 5, 128), torch.randn(2, 5, 80)
    out = []
    for layer, b, d in ((ours, ours.vera_lambda_b, ours.vera_lambda_d),
                        (layer_ref, layer_ref.vera_lambda_b["default"], layer_ref.vera_lambda_d["default"])):
        xx = x.clone().requires_grad_(True)
        y = layer(xx)
        y.backward(gy)
        out.append((y.detach(), xx.grad, b.grad, d.grad))
    for name, got, want in zip(("y", "dx", "dlambda_b", "dlambda_d"), *out, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("keys", [
    {},                                                   # QLoRA
    {"use_dora": True},                                   # QDoRA
    {"lora_fa": True},                                    # QLoRA-FA
    {"finetuning_type": "vera", "vera_rank": 8},          # QVeRA
    {"additional_target": "embed_tokens"},                # a module trained in full stays dense
], ids=["qlora", "qdora", "qlora_fa", "qvera", "modules_to_save"])
def test_export_over_an_nf4_base_is_the_function_that_trained(keys, tmp_path):
    """`npu-ft export quantization_bit=4` rebuilds the NF4 base the adapter trained on, whatever the
    method (VeRA too), and merges into its dequantized weights: the exported folder's logits are the
    adapted model's."""
    from transformers import AutoModelForCausalLM

    from npu_ft.model.loading import load_model
    from npu_ft.train.export import export_main

    from ._sft_helpers import tiny_model_dir

    folder = tiny_model_dir(tmp_path)
    model = load_model({"model_name_or_path": str(folder)}, device="cpu", dtype=torch.float32)
    rank = {} if keys.get("finetuning_type") == "vera" else {"lora_rank": 4}  # VeRA has vera_rank
    cfg = build_config({"model_name_or_path": str(folder), "quantization_bit": 4, **rank, **keys})
    apply_adapter_method(model, cfg, compute_dtype=torch.float32)
    perturb_trainable(model)
    save_adapter(model, tmp_path / "adapter", cfg)
    x = ids()
    want = logits(model, x)
    out = tmp_path / "merged"
    assert export_main([f"model_name_or_path={folder}", f"adapter_name_or_path={tmp_path / 'adapter'}",
                        "quantization_bit=4", f"export_dir={out}"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    torch.testing.assert_close(logits(merged, x), want, rtol=1e-4, atol=1e-4)


def test_export_over_an_nf4_base_takes_one_adapter(tmp_path, capsys):
    from npu_ft.train.export import export_main

    from ._sft_helpers import tiny_model_dir

    folder = tiny_model_dir(tmp_path)
    model = apply_lora(tiny(), "all", r=4)
    for name in ("a", "b"):
        save_adapter(model, tmp_path / name)
    assert export_main([f"model_name_or_path={folder}", f"adapter_name_or_path={tmp_path / 'a'},{tmp_path / 'b'}",
                        "quantization_bit=4", f"export_dir={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err
    assert "single adapter" in err and "adapter_name_or_path" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
