"""Each LoRA-family method trained by npu-ft (``run_sft``: our modules, fused ops and loss) against the
PEFT implementation of the same method (transformers ``Trainer`` + PEFT, + bitsandbytes 4-bit for NF4
bases), fp32, 20 steps, on a tiny Qwen2 and a tiny Qwen3:

* loss of every step within 1e-5 relative (dense bases) / 1e-3 (NF4 bases);
* gradients of every trainable tensor at step 1 within the same bound (relative to each tensor's
  largest entry);
* the method's losses differ from plain LoRA's (npu-ft, same recipe otherwise) by more than ten times
  that bound, so the test cannot pass with the method silently off. Learning rates are chosen so that
  each method visibly matters in 20 steps (DoRA differs from LoRA only as B and the magnitude move).

LoRA-FA's reference is PEFT's LoRA with ``lora_A`` frozen (plain AdamW); PEFT's
``create_lorafa_optimizer`` is a different optimizer (docs/methods.md).
"""

from __future__ import annotations

import pytest
import torch

from ._method_helpers import (
    TARGETS,
    assert_method_matters,
    assert_parity,
    load_reference_model,
    recipe,
    run_npu_ft,
    run_reference,
)
from ._sft_helpers import tiny_model_dir, write_dataset

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.slow

DENSE, NF4 = 1e-5, 1e-3
#: learning rate per method: large enough for the method to matter within 20 steps
LR = {"dora": 1e-2, "qdora": 2e-2, "lora_fa": 5e-3, "pissa": 2e-3, "vera": 2e-2}


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def env(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"methods-{request.param}")
    return {"model": tiny_model_dir(root, request.param), "data": write_dataset(root / "data", n=32), "root": root,
            "lora": {}}


def _lora_losses(env, monkeypatch, lr: float, quantized: bool = False) -> list[float]:
    """npu-ft's plain LoRA (QLoRA) losses with the same recipe and learning rate (cached per env)."""
    key = (lr, quantized)
    if key not in env["lora"]:
        extra = {"quantization_bit": 4} if quantized else {}
        cfg, _ = recipe(env, f"lora-{lr}-{quantized}", learning_rate=lr, **extra)
        env["lora"][key] = run_npu_ft(cfg, monkeypatch)[0]
    return env["lora"][key]


def _peft_lora(cfg, model, **kw):
    from transformers import set_seed

    set_seed(cfg.seed)  # run_sft seeds the same way before the adapters are made: same A init
    return peft.get_peft_model(model, peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                      target_modules=TARGETS, task_type="CAUSAL_LM", **kw))


def test_dora_matches_peft(env, monkeypatch):
    cfg, out = recipe(env, "dora", use_dora=True, learning_rate=LR["dora"])
    ours, ours_grads, model = run_npu_ft(cfg, monkeypatch)
    ref, ref_grads = run_reference(cfg, _peft_lora(cfg, load_reference_model(cfg), use_dora=True), out / "ref")
    assert_parity(ours, ref, ours_grads, ref_grads, DENSE, DENSE)
    assert any(".lora_magnitude_vector" in n for n in ours_grads)
    assert_method_matters(ours, _lora_losses(env, monkeypatch, LR["dora"]), DENSE)


def test_qdora_matches_peft_bitsandbytes(env, monkeypatch):
    pytest.importorskip("bitsandbytes")
    cfg, out = recipe(env, "qdora", use_dora=True, quantization_bit=4, learning_rate=LR["qdora"])
    ours, ours_grads, _ = run_npu_ft(cfg, monkeypatch)
    ref, ref_grads = run_reference(cfg, _peft_lora(cfg, load_reference_model(cfg, quantized=True), use_dora=True),
                                   out / "ref")
    assert_parity(ours, ref, ours_grads, ref_grads, NF4, NF4)
    assert_method_matters(ours, _lora_losses(env, monkeypatch, LR["qdora"], quantized=True), NF4)


def test_lora_fa_matches_peft_lora_with_frozen_a(env, monkeypatch):
    cfg, out = recipe(env, "lora_fa", lora_fa=True, learning_rate=LR["lora_fa"])
    ours, ours_grads, model = run_npu_ft(cfg, monkeypatch)
    reference = _peft_lora(cfg, load_reference_model(cfg))
    for name, param in reference.named_parameters():
        if ".lora_A." in name:
            param.requires_grad_(False)
    ref, ref_grads = run_reference(cfg, reference, out / "ref")
    assert_parity(ours, ref, ours_grads, ref_grads, DENSE, DENSE)
    assert not any(".lora_A." in n for n in ours_grads)
    assert_method_matters(ours, _lora_losses(env, monkeypatch, LR["lora_fa"]), DENSE)


@pytest.mark.parametrize("pissa_iter", [16, -1])
def test_pissa_matches_peft(env, monkeypatch, pissa_iter):
    cfg, out = recipe(env, f"pissa{pissa_iter}", pissa_init=True, pissa_iter=pissa_iter, learning_rate=LR["pissa"])
    ours, ours_grads, _ = run_npu_ft(cfg, monkeypatch)
    init = "pissa" if pissa_iter == -1 else f"pissa_niter_{pissa_iter}"
    ref, ref_grads = run_reference(cfg, _peft_lora(cfg, load_reference_model(cfg), init_lora_weights=init),
                                   out / "ref")
    assert_parity(ours, ref, ours_grads, ref_grads, DENSE, DENSE)
    assert_method_matters(ours, _lora_losses(env, monkeypatch, LR["pissa"]), DENSE)


def test_vera_matches_peft(env, monkeypatch):
    from transformers import set_seed

    cfg, out = recipe(env, "vera", finetuning_type="vera", lora_rank=None, vera_rank=32, learning_rate=LR["vera"])
    ours, ours_grads, model = run_npu_ft(cfg, monkeypatch)
    set_seed(cfg.seed)
    reference = peft.get_peft_model(load_reference_model(cfg), peft.VeraConfig(
        r=32, target_modules=TARGETS, projection_prng_key=0, d_initial=0.1, task_type="CAUSAL_LM"))
    ref, ref_grads = run_reference(cfg, reference, out / "ref")
    assert_parity(ours, ref, ours_grads, ref_grads, DENSE, DENSE)
    assert_method_matters(ours, _lora_losses(env, monkeypatch, LR["vera"]), DENSE)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora_r16 = sum(16 * (m.in_features + m.out_features) for n, m in model.named_modules()
                   if type(m).__name__ == "VeraLinear")
    assert trainable < 0.05 * lora_r16, (trainable, lora_r16)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
