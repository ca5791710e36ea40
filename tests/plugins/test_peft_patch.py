"""The plugin's model/class patches, in the main environment (PEFT, no LLaMA-Factory)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from npu_ft.model.tiny import model_from_config, tiny_config
from npu_ft.ops import kernel_calls, reset_kernel_calls

peft = pytest.importorskip("peft")


def _tiny(arch="qwen2", seed=0):
    return model_from_config(tiny_config(arch, hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate=48,
                                         vocab=97), seed=seed)


def _peft_model(arch="qwen2", dropout=0.0, use_dora=False, targets="all-linear", seed=0):
    from peft import LoraConfig, get_peft_model

    model = _tiny(arch, seed)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=use_dora, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
                     if targets == "all-linear" else targets)
    torch.manual_seed(seed + 1)
    pm = get_peft_model(model, cfg)
    with torch.no_grad():  # non-zero B so the LoRA branch matters; DoRA magnitudes away from the norms
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    return pm


def _loss_and_grads(model, ids, seed=123):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads


IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))


def _assert_patched_matches_peft(patched_peft, ref, n_grads: int) -> dict:
    """One training step of ``ref`` with PEFT's forward and of a copy with the patch (kernel counters
    reset before it): the same loss and gradients (fp32: 1e-5 / 1e-4 relative). Returns the gradients."""
    ours = copy.deepcopy(ref)
    ref.train(), ours.train()
    patched_peft.set_enabled(False)
    loss_ref, g_ref = _loss_and_grads(ref, IDS)
    patched_peft.set_enabled(True)
    patched_peft.STATS.clear()
    reset_kernel_calls()
    loss, g = _loss_and_grads(ours, IDS)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert g.keys() == g_ref.keys() and len(g) == n_grads
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)
    return g


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_linear_patch_matches_peft(patched_peft, dropout):
    _assert_patched_matches_peft(patched_peft, _peft_model(dropout=dropout), 2 * 7 * 2)
    calls = kernel_calls("lora_linear")
    assert sum(calls.values()) == 14, calls  # 7 targets x 2 layers, one forward
    assert sum(kernel_calls("lora_linear_backward").values()) == 14
    assert patched_peft.STATS["lora_linear"] == 14 and patched_peft.STATS["fallback"] == 0


def test_eval_and_no_grad(patched_peft):
    m = _peft_model(dropout=0.2).eval()
    with torch.no_grad():
        y = m(input_ids=IDS).logits
        patched_peft.set_enabled(False)
        y_ref = m(input_ids=IDS).logits
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dora_patch_matches_peft(patched_peft, arch, dropout):
    """PEFT DoRA layers run npu_ft::dora_linear: the same loss and gradients (magnitude included) as
    PEFT's own DoRA forward, with and without dropout."""
    ref = _peft_model(arch, dropout=dropout, use_dora=True)
    g = _assert_patched_matches_peft(patched_peft, ref, 3 * 7 * 2)  # A, B, magnitude per target
    assert sum(n.endswith("lora_magnitude_vector.default.weight") for n in g) == 14
    assert sum(kernel_calls("dora_linear").values()) == 14, kernel_calls("dora_linear")
    assert sum(kernel_calls("dora_linear_backward").values()) == 14
    assert sum(kernel_calls("lora_linear").values()) == 0
    assert patched_peft.STATS["dora_linear"] == 14 and patched_peft.STATS["fallback"] == 0
    with torch.no_grad():  # eval: no dropout, same logits
        ref.eval()
        y = ref(input_ids=IDS).logits
        patched_peft.set_enabled(False)
        torch.testing.assert_close(y, ref(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_dora_weight_norm_cache(patched_peft):
    """||W||^2 of a DoRA base layer is computed once and recomputed when the base weight changes."""
    from npu_ft.ops.dora import weight_sq_norm
    from npu_ft_llamafactory.peft_patch import base_weight_sq_norm

    m = _peft_model(use_dora=True, targets=["q_proj"]).eval()
    base = m.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer()
    first = base_weight_sq_norm(base, torch.float32)
    assert base_weight_sq_norm(base, torch.float32) is first
    torch.testing.assert_close(first, (base.weight.double() ** 2).sum(1).float())
    with torch.no_grad():
        base.weight.mul_(1.5)  # in place: a new version of the same tensor
    second = base_weight_sq_norm(base, torch.float32)
    assert second is not first
    torch.testing.assert_close(second, weight_sq_norm(base.weight))
    base.weight = nn.Parameter(base.weight.detach() * 0.5, requires_grad=False)  # another tensor
    torch.testing.assert_close(base_weight_sq_norm(base, torch.float32), weight_sq_norm(base.weight))
    with torch.no_grad():  # and the patched forward uses the fresh norms: PEFT's result
        y = m(input_ids=IDS).logits
        patched_peft.set_enabled(False)
        torch.testing.assert_close(y, m(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    assert patched_peft.STATS["dora_linear"] == 2


@pytest.mark.parametrize("case", ["merged", "disabled", "two_adapters"])
def test_unsupported_states_fall_back_to_peft(patched_peft, case):
    m = _peft_model(use_dora=(case == "merged")).eval()
    patched_peft.set_enabled(False)
    with torch.no_grad():
        y_plain = m(input_ids=IDS).logits
    patched_peft.set_enabled(True)
    if case == "merged":
        m.merge_adapter()
    elif case == "disabled":
        ctx = m.disable_adapter()
        ctx.__enter__()
    elif case == "two_adapters":
        from peft import LoraConfig

        m.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
        m.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        y = m(input_ids=IDS).logits
    assert patched_peft.STATS["fallback"] > 0
    if case == "merged":
        assert patched_peft.STATS["lora_linear"] == 0 and patched_peft.STATS["dora_linear"] == 0
        torch.testing.assert_close(y, y_plain, rtol=1e-4, atol=1e-5)
    if case == "disabled":
        ctx.__exit__(None, None, None)


def test_adapter_state_dict_unchanged(patched_peft):
    from peft import get_peft_model_state_dict

    m = _peft_model()
    before = get_peft_model_state_dict(m)
    from npu_ft_llamafactory import quantize_base_layers

    quantize_base_layers(m)
    after = get_peft_model_state_dict(m)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k])
    assert any(k.endswith("q_proj.lora_A.weight") for k in after)


def _dequantized_reference(model):
    """The same PEFT model with every NF4 base replaced by its dequantized dense weight."""
    from npu_ft.modules.nf4 import Nf4Linear

    ref = copy.deepcopy(model)
    for _name, mod in list(ref.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, Nf4Linear):
                dense = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                dense.weight.data = child.dequantized_weight(torch.float32)
                if child.bias is not None:
                    dense.bias.data = child.bias.data.clone()
                dense.requires_grad_(False)
                setattr(mod, child_name, dense)
    return ref


@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_quantize_base_layers(patched_peft, double_quant):
    from npu_ft.modules.nf4 import Nf4Linear
    from npu_ft_llamafactory import quantize_base_layers

    m = _peft_model(targets=["q_proj", "v_proj"])
    names = quantize_base_layers(m, double_quant=double_quant)
    # every linear but the head: the 2 targets via their PEFT layer + 5 plain linears, per layer
    assert len(names) == 14
    assert not any("lm_head" in n or "lora_" in n for n in names)
    nf4 = [mod for mod in m.modules() if isinstance(mod, Nf4Linear)]
    assert len(nf4) == 14 and all(x.quant_state.nested == double_quant for x in nf4)
    assert all(x.compute_dtype == torch.float32 for x in nf4)  # default: the weight's dtype
    assert type(m.base_model.model.lm_head) is nn.Linear
    ref = _dequantized_reference(m)
    m.train(), ref.train()
    reset_kernel_calls()
    loss, g = _loss_and_grads(m, IDS)
    assert sum(kernel_calls("nf4_linear").values()) == 14  # 4 with LoRA + 10 plain, one forward
    assert patched_peft.STATS["nf4_linear"] == 4
    patched_peft.set_enabled(False)
    loss_ref, g_ref = _loss_and_grads(ref, IDS)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_qdora_over_nf4_base_matches_peft(patched_peft):
    """DoRA over npu-ft NF4 bases runs npu_ft::dora_nf4_linear: the same loss and gradients as PEFT's
    DoRA over the dequantized dense weights."""
    from npu_ft_llamafactory import quantize_base_layers

    m = _peft_model("qwen3", use_dora=True, targets=["q_proj", "v_proj"])
    assert len(quantize_base_layers(m)) == 14
    ref = _dequantized_reference(m)
    m.train(), ref.train()
    reset_kernel_calls()
    loss, g = _loss_and_grads(m, IDS)
    assert sum(kernel_calls("dora_nf4_linear").values()) == 4  # the 4 DoRA targets
    assert sum(kernel_calls("dora_nf4_linear_backward").values()) == 4
    assert sum(kernel_calls("nf4_linear").values()) == 10  # the plain NF4 linears
    assert patched_peft.STATS["dora_nf4_linear"] == 4 and patched_peft.STATS["fallback"] == 0
    patched_peft.set_enabled(False)
    loss_ref, g_ref = _loss_and_grads(ref, IDS)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert g.keys() == g_ref.keys() and len(g) == 3 * 4
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_qlora_bytes_and_a_lora_wrapped_output_head(patched_peft):
    """quantize_base_layers stores exactly npu-ft's quantize_nf4 of each dense weight (bitsandbytes'
    bytes), with the compute dtype asked for, and leaves the output head dense even when a LoRA
    adapter wraps it and no name-based skip applies."""
    from npu_ft.modules.nf4 import Nf4Linear
    from npu_ft.ops.nf4 import quantize_nf4
    from npu_ft_llamafactory import quantize_base_layers

    m = _peft_model(targets=["q_proj", "lm_head"])
    dense = {n: mod.weight.detach().clone() for n, mod in m.named_modules() if type(mod) is nn.Linear}
    names = quantize_base_layers(m, skip=(), compute_dtype=torch.bfloat16, device="cpu")
    assert len(names) == 14 and not any("lm_head" in n for n in names)
    assert type(m.base_model.model.lm_head.base_layer) is nn.Linear
    for name in names:
        layer = m.get_submodule(name)
        name = f"{name}.base_layer" if hasattr(layer, "base_layer") else name
        layer = m.get_submodule(name)
        assert isinstance(layer, Nf4Linear) and layer.compute_dtype == torch.bfloat16
        packed, state = quantize_nf4(dense[name], blocksize=64, double_quant=True)
        assert torch.equal(layer.packed, packed), name
        for field in ("qabsmax", "nested_absmax", "offset"):
            assert torch.equal(getattr(layer.quant_state, field), getattr(state, field)), (name, field)


def test_convert_bnb_4bit_layers(patched_peft):
    bnb = pytest.importorskip("bitsandbytes")
    from npu_ft.modules.nf4 import Nf4Linear
    from npu_ft_llamafactory import convert_bnb_4bit_layers
    from npu_ft_llamafactory.qlora import nf4_from_bnb_linear4bit

    torch.manual_seed(0)
    dense = nn.Linear(64, 48, bias=True)
    q = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.load_state_dict(dense.state_dict())
    q = q.to("cpu")  # quantizes
    if getattr(q.weight, "quant_state", None) is None:
        pytest.skip("this bitsandbytes does not quantize on CPU")
    x = torch.randn(3, 64)
    with torch.no_grad():
        y_bnb = q(x)
        ours = nf4_from_bnb_linear4bit(q)
        assert isinstance(ours, Nf4Linear)
        y = ours(x)
    torch.testing.assert_close(y, y_bnb, rtol=1e-5, atol=1e-5)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = q

        def forward(self, x):
            return self.proj(x)

    net = Net()
    assert convert_bnb_4bit_layers(net) == ["proj"]
    assert isinstance(net.proj, Nf4Linear)


def test_apply_to_qwen2_and_wrong_type(patched_peft):
    from npu_ft_llamafactory import NpuFtLlamaFactoryError, apply_npu_ft_to_qwen2, apply_npu_ft_to_qwen3

    m = _peft_model("qwen2")
    info = apply_npu_ft_to_qwen2(m)
    assert info["model_type"] == "qwen2" and info["nf4_layers"] == []
    assert any(c.endswith("lora.layer.Linear") for c in info["peft_classes"])
    with pytest.raises(NpuFtLlamaFactoryError, match="model type 'qwen2' is not supported"):
        apply_npu_ft_to_qwen3(m)
    info = apply_npu_ft_to_qwen2(m, quantize_nf4=True)
    assert len(info["nf4_layers"]) == 14


def test_revert_restores_peft():
    from peft.tuners.lora import layer

    from npu_ft_llamafactory import apply_npu_ft_to_peft, is_peft_patched, revert_npu_ft_peft

    original = layer.Linear.forward
    apply_npu_ft_to_peft()
    apply_npu_ft_to_peft()  # idempotent
    assert is_peft_patched() and layer.Linear.forward.__wrapped__ is original
    revert_npu_ft_peft()
    assert layer.Linear.forward is original and not is_peft_patched()
