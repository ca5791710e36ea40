"""Gradient-checkpointing policies (npu_ft.modules.checkpointing): ``selective`` gives the same loss
and gradients as ``full`` and as no checkpointing, and really skips the GEMM recomputation."""

from __future__ import annotations

import pytest
import torch

from npu_ft.bench.suite import SuiteError, parse_suite
from npu_ft.model.tiny import model_from_config, tiny_config
from npu_ft.modules.checkpointing import POLICIES, checkpointing_kwargs, enable_gradient_checkpointing
from npu_ft.modules.inject import apply_lora, apply_qlora
from npu_ft.ops import _registry

VOCAB = 211
LAYERS = 3


def _model(method: str, policy: str | None, dropout: float = 0.0):
    cfg = tiny_config("qwen2", hidden_size=48, layers=LAYERS, heads=4, kv_heads=2, intermediate=80, vocab=VOCAB)
    cfg.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = model_from_config(cfg, dtype=torch.float32, seed=0)
    if method == "lora":
        apply_lora(model, "all", r=4, alpha=8, dropout=dropout)
    elif method == "qlora":
        apply_qlora(model, "all", r=4, alpha=8, compute_dtype=torch.float32)
    else:
        model.requires_grad_(True)
    with torch.no_grad():  # B = 0 at init would make A's gradients trivially zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    if policy is not None:
        enable_gradient_checkpointing(model, policy)
    model.train()
    return model


def _batch(seq=23):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, seq), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    return ids, labels


def _loss_and_grads(model):
    ids, labels = _batch()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_selective_matches_full_and_no_checkpointing(method):
    results = {policy: _loss_and_grads(_model(method, policy)) for policy in (None, "full", "selective")}
    loss0, grads0 = results[None]
    assert grads0, "no trainable parameters"
    for policy in ("full", "selective"):
        loss, grads = results[policy]
        torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-6, msg=f"{policy}: loss")
        assert grads.keys() == grads0.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, grads0[name], rtol=1e-5, atol=1e-6, msg=f"{policy}: grad of {name}")


def test_selective_with_lora_dropout_replays_the_same_masks():
    """Dropout's random masks are drawn again in the recomputation from the saved RNG state: the
    gradients equal those of the run without checkpointing (same seed)."""
    results = {}
    for policy in (None, "full", "selective"):
        model = _model("lora", policy, dropout=0.3)
        torch.manual_seed(11)
        results[policy] = _loss_and_grads(model)
    for policy in ("full", "selective"):
        torch.testing.assert_close(results[policy][0], results[None][0], rtol=1e-6, atol=1e-6)
        for name, g in results[policy][1].items():
            torch.testing.assert_close(g, results[None][1][name], rtol=1e-5, atol=1e-6, msg=f"{policy}: {name}")


@pytest.mark.parametrize("method, op", [("lora", "lora_linear"), ("qlora", "nf4_linear")])
def test_selective_does_not_rerun_the_gemms(method, op):
    """``full`` reruns every adapted linear in the backward pass; ``selective`` reads its output back."""
    linears = 7 * LAYERS
    calls = {}
    for policy in ("full", "selective"):
        model = _model(method, policy)
        ids, labels = _batch()
        _registry.reset_kernel_calls()
        model(input_ids=ids, labels=labels).loss.backward()
        calls[policy] = sum(_registry.kernel_calls(op).values())
    assert calls == {"full": 2 * linears, "selective": linears}


def test_checkpointing_kwargs():
    assert checkpointing_kwargs("full", True) == {"use_reentrant": True}
    sel = checkpointing_kwargs("selective", True)
    assert sel["use_reentrant"] is False and callable(sel["context_fn"])
    with pytest.raises(ValueError, match="unknown gradient checkpointing policy 'some'.*full, selective"):
        checkpointing_kwargs("some")
    assert POLICIES == ("full", "selective")


def _suite(**extra):
    return dict(models=["tiny"], methods=["lora", "qlora"], implementations=["npu-ft", "reference"],
                gradient_checkpointing=True, **extra)


def test_suite_checkpoint_policy_per_method():
    suite = parse_suite(_suite(checkpoint_policy={"lora": "selective"}), "s.yaml", check_devices=False)
    got = {(c.method, c.implementation): c.checkpoint_policy for c in suite.cases}
    assert got == {("lora", "npu-ft"): "selective", ("lora", "reference"): "full",
                   ("qlora", "npu-ft"): "full", ("qlora", "reference"): "full"}
    lora_npu_ft = next(c for c in suite.cases if c.method == "lora" and c.implementation == "npu-ft")
    assert "gc-selective" in lora_npu_ft.case_id
    # the policy does not split parity groups: the reference stays npu-ft's parity partner
    ref = next(c for c in suite.cases if c.method == "lora" and c.implementation == "reference")
    assert ref.parity_group == lora_npu_ft.parity_group


@pytest.mark.parametrize("value, message", [
    ("lazy", r"s\.yaml: key 'checkpoint_policy': unknown policy 'lazy'"),
    ({"dora": "full"}, r"s\.yaml: key 'checkpoint_policy\.dora': unknown method"),
    ({"lora": "most"}, r"s\.yaml: key 'checkpoint_policy\.lora': unknown policy 'most'"),
    (3, r"s\.yaml: key 'checkpoint_policy' must be str or dict"),
])
def test_suite_checkpoint_policy_errors(value, message):
    with pytest.raises(SuiteError, match=message):
        parse_suite(_suite(checkpoint_policy=value), "s.yaml", check_devices=False)


def test_run_sft_trains_the_same_under_each_policy(tmp_path):
    """The config key reaches the model: ``selective`` skips the reruns and keeps every step's loss."""
    from npu_ft.config import load_config
    from npu_ft.train.run import run_sft

    from ._sft_helpers import base_recipe, step_losses, tiny_model_dir, write_dataset, write_recipe

    model_dir, data_dir = tiny_model_dir(tmp_path), write_dataset(tmp_path / "data", n=8)
    losses, calls = {}, {}
    for policy in POLICIES:
        out = tmp_path / policy
        cfg = load_config(write_recipe(tmp_path / f"{policy}.yaml", base_recipe(
            model_dir, data_dir, out, max_steps=3, save_steps=3, disable_gradient_checkpointing=False,
            gradient_checkpointing_policy=policy)))
        _registry.reset_kernel_calls()
        run_sft(cfg)
        losses[policy] = list(step_losses(out).values())
        calls[policy] = sum(_registry.kernel_calls("lora_linear").values())
    assert len(losses["full"]) == 3
    assert losses["selective"] == pytest.approx(losses["full"], rel=1e-6)
    assert calls["selective"] < calls["full"]


def test_config_rejects_an_unknown_policy(tmp_path):
    from npu_ft.config import ConfigError, build_config, option

    # the config offers every policy, and auto (resolved to one of them by npu_ft.launch.budget)
    assert option("gradient_checkpointing_policy").choices == (*POLICIES, "auto")
    with pytest.raises(ConfigError, match="gradient_checkpointing_policy"):
        build_config({"model_name_or_path": str(tmp_path), "gradient_checkpointing_policy": "some"}, "r.yaml")
