"""LoraLinear / Nf4Linear: PEFT-compatible names, init and dtypes; merge; NF4 base; errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from npu_ft.modules import LoraLinear, Nf4Linear
from npu_ft.ops import _registry
from npu_ft.ops.nf4 import dequantize_nf4, quantize_nf4

peft = pytest.importorskip("peft")


class _Wrap(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", [1, 8])
def test_init_and_adapter_keys_match_peft(dtype, r):
    base = nn.Linear(24, 20).to(dtype)
    torch.manual_seed(42)
    model = peft.get_peft_model(_Wrap(copy.deepcopy(base)),
                                peft.LoraConfig(r=r, lora_alpha=16, target_modules=["proj"]))
    torch.manual_seed(42)
    mine = LoraLinear(copy.deepcopy(base), r, 16)
    peft_sd = peft.get_peft_model_state_dict(model)
    # PEFT's saved adapter keys are ours under the module's path
    assert {k.removeprefix("base_model.model.proj.") for k in peft_sd} == {"lora_A.weight", "lora_B.weight"}
    mine_sd = mine.state_dict()
    assert set(mine_sd) == {"base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight"}
    for key in ("lora_A.weight", "lora_B.weight"):
        ref = peft_sd[f"base_model.model.proj.{key}"]
        assert mine_sd[key].dtype == ref.dtype == torch.float32  # bf16 base -> fp32 adapters (PEFT default)
        assert torch.equal(mine_sd[key], ref), key  # same seed, same values (incl. bf16 rounding)
    assert torch.count_nonzero(mine.lora_B.weight) == 0
    bound = 1 / math.sqrt(24)  # kaiming_uniform_(a=sqrt(5)) on [r, 24]
    assert mine.lora_A.weight.abs().max() <= bound
    assert mine.scaling == 16 / r


def test_only_lora_params_train_and_cpu_kernel_runs():
    mine = LoraLinear(nn.Linear(16, 12), 4, 8, lora_dropout=0.1)
    trainable = {n for n, p in mine.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight"}
    nn.init.normal_(mine.lora_B.weight)
    _registry.reset_kernel_calls()
    x = torch.randn(2, 3, 16, requires_grad=True)
    mine(x).square().sum().backward()
    assert _registry.kernel_calls("lora_linear") == {"cpu": 1}
    assert _registry.kernel_calls("lora_linear_backward") == {"cpu": 1}
    assert mine.base_layer.weight.grad is None and mine.base_layer.bias.grad is None
    assert mine.lora_A.weight.grad is not None and mine.lora_B.weight.grad is not None


def test_dropout_only_in_training():
    mine = LoraLinear(nn.Linear(16, 12), 4, 8, lora_dropout=0.5)
    nn.init.normal_(mine.lora_B.weight)
    x = torch.randn(6, 16)
    mine.eval()
    with torch.no_grad():
        y_eval = mine(x)
        expected = F.linear(x, mine.base_layer.weight, mine.base_layer.bias) + 2.0 * (
            x @ mine.lora_A.weight.T @ mine.lora_B.weight.T
        )
        torch.testing.assert_close(y_eval, expected, rtol=1e-5, atol=1e-5)
        mine.train()
        assert not torch.allclose(mine(x), y_eval)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_equals_forward(dtype):
    mine = LoraLinear(nn.Linear(32, 24).to(dtype), 8, 16, use_rslora=True).eval()
    assert mine.scaling == pytest.approx(16 / math.sqrt(8))
    nn.init.normal_(mine.lora_B.weight, std=0.1)
    merged = mine.merge()
    assert isinstance(merged, nn.Linear) and merged.weight.dtype == dtype
    assert not any(p.requires_grad for p in merged.parameters())
    x = torch.randn(5, 32).to(dtype)
    with torch.no_grad():
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(merged(x), mine(x), **tol)
    # the module itself is unchanged
    assert mine.base_layer.weight.data_ptr() != merged.weight.data_ptr()


def test_nf4_linear_module():
    torch.manual_seed(0)
    lin = nn.Linear(64, 40)
    q = Nf4Linear.from_linear(lin)
    packed, state = quantize_nf4(lin.weight.detach())
    assert torch.equal(q.packed, packed) and q.packed.dtype == torch.uint8
    assert q.in_features == 64 and q.out_features == 40 and q.dtype == torch.float32
    w = q.dequantized_weight()
    assert w.shape == (40, 64) and torch.equal(w, dequantize_nf4(packed, state))
    # NF4 error <= half the widest code gap (-1 .. -0.696: 0.304) x absmax (+ double-quant slack)
    err = (w - lin.weight.detach()).abs().max().item()
    assert err <= 0.16 * lin.weight.detach().abs().max().item(), err
    assert set(q.state_dict()) == {"packed", "bias"}
    assert not any(p.requires_grad for p in q.parameters())
    x = torch.randn(3, 64)
    torch.testing.assert_close(q(x), F.linear(x, w, lin.bias), rtol=1e-5, atol=1e-5)
    assert q.dequantized_weight(torch.bfloat16).dtype == torch.bfloat16
    moved = q.to("meta")
    assert moved.packed.device.type == "meta" and moved.quant_state.device.type == "meta"


def test_lora_on_nf4_base_trains_adapters_only_and_merges():
    torch.manual_seed(0)
    lin = nn.Linear(48, 36)
    mine = LoraLinear(Nf4Linear.from_linear(lin, double_quant=False), 4, 8)
    nn.init.normal_(mine.lora_B.weight, std=0.1)
    assert mine.lora_A.weight.dtype == torch.float32
    x = torch.randn(2, 5, 48, requires_grad=True)
    _registry.reset_kernel_calls()
    y = mine(x)
    y.square().sum().backward()
    assert _registry.kernel_calls("nf4_linear") == {"cpu": 1}
    w = mine.base_layer.dequantized_weight()
    expected = F.linear(x, w, lin.bias) + 2.0 * (x @ mine.lora_A.weight.T) @ mine.lora_B.weight.T
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert mine.lora_A.weight.grad is not None and x.grad is not None
    assert mine.base_layer.bias.grad is None
    merged = mine.merge()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)


def test_constructor_errors():
    with pytest.raises(TypeError, match=r"^base"):
        LoraLinear(nn.Conv1d(3, 3, 1), 4, 8)
    with pytest.raises(ValueError, match=r"^r"):
        LoraLinear(nn.Linear(4, 4), 0, 8)
    with pytest.raises(ValueError, match=r"^lora_dropout"):
        LoraLinear(nn.Linear(4, 4), 2, 8, lora_dropout=1.0)
    with pytest.raises(ValueError, match=r"^lora_alpha"):
        LoraLinear(nn.Linear(4, 4), 2, float("nan"))
    with pytest.raises(TypeError, match=r"^linear"):
        Nf4Linear.from_linear(nn.Conv1d(3, 3, 1))
