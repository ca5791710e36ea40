"""The model-FLOPs formula (npu_ft.bench.flops) against torch.utils.flop_counter on tiny models,
and the spec-sheet lookup."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from npu_ft.bench.flops import gemm_peak_flops, spec_tflops, step_flops
from npu_ft.launch.estimate import ModelShape

# odd sizes on purpose: nothing divides evenly
CONFIG = dict(vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


def _model(attn: str = "eager"):
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**CONFIG)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.config.use_cache = False
    return model, cfg


def _counted(model, batch: int, seq: int) -> int:
    ids = torch.randint(0, CONFIG["vocab_size"], (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("batch, seq", [(1, 13), (3, 7)])
def test_full_fine_tuning_matches_flop_counter(batch, seq):
    model, cfg = _model()
    shape = ModelShape.from_config(cfg)
    # transformers' loss computes the head on every position
    want = step_flops(shape, "full", batch * seq, seq, batch * seq)["total"]
    assert _counted(model, batch, seq) == want


@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                     ("q_proj", "v_proj")])
def test_lora_matches_flop_counter(targets):
    from peft import LoraConfig, get_peft_model

    model, cfg = _model()
    model = get_peft_model(model, LoraConfig(r=5, lora_alpha=10, target_modules=list(targets), lora_dropout=0.0))
    # every decoder layer computes its input gradient (as with checkpointing, which makes the
    # embedding output require grad); the formula assumes that
    model.enable_input_require_grads()
    shape = ModelShape.from_config(cfg)
    batch, seq = 2, 11
    want = step_flops(shape, "lora", batch * seq, seq, batch * seq, lora_rank=5, lora_targets=targets)
    assert _counted(model, batch, seq) == want["total"]
    # LoRA's weight gradients are the adapters' only: far fewer than full fine-tuning's
    full = step_flops(shape, "full", batch * seq, seq, batch * seq)
    assert want["backward_weight"] < 0.2 * full["backward_weight"]
    assert step_flops(shape, "qlora", 22, 11, 22, 5, targets) == want


def test_head_counts_only_the_positions_the_loss_needs():
    shape = ModelShape("s", 64, 128, 2, 4, 2, 1000, True)
    a = step_flops(shape, "lora", 100, 100, 100, 8)["total"]
    b = step_flops(shape, "lora", 100, 100, 40, 8)["total"]
    assert a - b == pytest.approx(2 * 2 * 60 * 64 * 1000)  # forward + input gradient of the head
    with pytest.raises(ValueError, match="method"):
        step_flops(shape, "dora", 1, 1, 1)


def test_gemm_peak_is_a_positive_rate():
    shape = ModelShape("s", 32, 48, 1, 4, 2, 100, True)
    assert gemm_peak_flops(shape, 16, torch.float32, torch.device("cpu"), repeats=1) > 0


def test_spec_sheet_lookup():
    assert spec_tflops("Ascend910B3", "bfloat16") == 313.0
    assert spec_tflops("NVIDIA A100-SXM4-80GB", "float32") == 19.5
    assert spec_tflops("x86_64", "float32") is None
    assert spec_tflops("NVIDIA H100 80GB HBM3", "float8") is None
