"""`npu-ft estimate`, `npu-ft plan`, and what `npu-ft train` uses: the auto checkpointing policy and
the memory warning (npu_ft.launch.budget)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from npu_ft.config import load_config
from npu_ft.launch import budget
from npu_ft.launch.budget import CARDS, EstimateError, card, choose_checkpoint_policy, memory_warning, model_shape
from npu_ft.launch.estimate import GIB, MODELS, estimate
from npu_ft.launch.estimate_cli import estimate_main
from npu_ft.launch.planner import METHODS, plan, plan_main, zero_choices

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "qwen2.5-7b" / "lora.yaml"


def test_breakdown_adds_up_to_the_estimate(capsys):
    assert estimate_main([str(RECIPE), "--card", "910B4-32G"]) == 0
    out = capsys.readouterr().out
    for part in ("weights", "adapters", "gradients", "optimizer states", "activations", "loss", "runtime overhead",
                 "assumptions:", "usable on the card", "fits"):
        assert part in out, part
    want = estimate("qwen2.5-7b", "lora", batch=2, seq=2048, lora_rank=16, overhead_gib=3.0)
    assert f"{want.total_gib:8.2f} GiB" in out
    # overrides after the flags; 4x the tokens no longer fit a 32 GB card
    assert estimate_main([str(RECIPE), "--card", "910B4-32G", "cutoff_len=8192", "per_device_train_batch_size=8",
                          "fused_cross_entropy=false"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, adapter, rank, words", [
    (["use_dora=true"], "dora", 16, "DoRA r=16"),
    (["lora_fa=true"], "lora_fa", 16, "LoRA-FA r=16"),
    (["finetuning_type=vera", "vera_rank=256"], "vera", 256, "VeRA r=256"),
])
def test_each_adapter_is_estimated_as_itself(overrides, adapter, rank, words, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"  # VeRA has no lora_rank / lora_alpha
    keep = [line for line in RECIPE.read_text().splitlines() if adapter != "vera" or
            not line.startswith(("lora_rank:", "lora_alpha:"))]
    recipe.write_text("\n".join(keep) + "\n")
    assert estimate_main([str(recipe), "--card", "910B4-32G", *overrides]) == 0
    out = capsys.readouterr().out
    assert words in out and "estimated as LoRA" not in out
    want = estimate("qwen2.5-7b", "lora", batch=2, seq=2048, lora_rank=rank, overhead_gib=3.0, adapter=adapter)
    assert f"{want.total_gib:8.2f} GiB" in out


@pytest.mark.parametrize("target, names", [("q_proj,v_proj", ("q_proj", "v_proj")),
                                           ("self_attn.o_proj,mlp.down_proj", ("o_proj", "down_proj"))])
def test_lora_target_subset_is_estimated_as_itself(target, names, capsys):
    no_gc = ["disable_gradient_checkpointing=true"]  # where what each linear keeps shows most
    assert estimate_main([str(RECIPE), "--card", "910B4-32G", *no_gc, f"lora_target={target}"]) == 0
    out = capsys.readouterr().out
    assert f"adapters on {', '.join(names)} of each decoder layer" in out and "counted on every" not in out
    kw = dict(batch=2, seq=2048, lora_rank=16, overhead_gib=3.0, gradient_checkpointing=False)
    want, every = estimate("qwen2.5-7b", "lora", targets=names, **kw), estimate("qwen2.5-7b", "lora", **kw)
    assert f"{want.total_gib:8.2f} GiB" in out
    assert want.adapters < every.adapters and want.activations < every.activations
    assert estimate_main([str(RECIPE), "lora_target=embed_tokens"]) == 1
    err = capsys.readouterr().err.strip()
    assert "lora_target" in err and "names none of the decoder linears" in err and len(err.splitlines()) == 1


def test_8bit_and_paged_optimizers(capsys):
    full = ROOT / "recipes" / "qwen2.5-0.5b" / "full.yaml"
    totals = {}
    for optim in ("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "adafactor"):
        assert estimate_main([str(full), f"optim={optim}"]) == 0
        out = capsys.readouterr().out
        totals[optim] = float(out.split("optimizer states")[1].split()[0])
        if optim == "adafactor":
            assert "optim adafactor estimated as AdamW" in out
    # (the recipe runs DeepSpeed bf16: its fp32 master copy and the embedding's fp32 states stay)
    assert totals["paged_adamw_8bit"] < totals["adamw_8bit"] < 0.7 * totals["adamw_torch"]
    assert totals["adafactor"] == totals["adamw_torch"]


def test_zero3_divides_per_card(capsys):
    full72 = ROOT / "recipes" / "qwen2.5-72b" / "full.yaml"
    assert estimate_main([str(full72), "--nodes", "2", "--devices-per-node", "8"]) == 0
    out16 = capsys.readouterr().out
    assert estimate_main([str(full72), "--nodes", "4", "--devices-per-node", "8"]) == 0
    out32 = capsys.readouterr().out
    assert "ZeRO-3 over 16 card(s)" in out16 and "ZeRO-3 over 32 card(s)" in out32

    def total(text):
        return float(next(line for line in text.splitlines() if line.strip().startswith("total")).split()[1])

    assert total(out32) < total(out16)


@pytest.mark.parametrize("args, words", [
    (["--card", "tpu-v9"], ["--card 'tpu-v9'", "custom:<GiB>"]),
    (["--card", "custom:-3"], ["positive size"]),
    (["lora_rank=zero"], ["lora_rank"]),
])
def test_bad_input_is_one_line_exit_1(args, words, capsys):
    assert estimate_main([str(RECIPE), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for w in words:
        assert w in err


def test_model_shape_from_config_json_or_name(tmp_path):
    m = MODELS["qwen2.5-0.5b"]
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="qwen2", hidden_size=m.hidden, intermediate_size=m.intermediate, num_hidden_layers=m.layers,
        num_attention_heads=m.heads, num_key_value_heads=m.kv_heads, vocab_size=m.vocab, tie_word_embeddings=True)))
    assert model_shape(str(tmp_path)).params == m.params
    assert model_shape("models/Qwen2.5-7B-Instruct") == MODELS["qwen2.5-7b"]
    with pytest.raises(EstimateError, match="model_name_or_path 'models/mystery'"):
        model_shape("models/mystery")
    assert card("910b3-64g") is CARDS["910B3-64G"] and card("custom:48").gib == 48


def _cfg(**over):
    return load_config(RECIPE, [f"{k}={v}" for k, v in over.items()])


def test_auto_policy_picks_selective_where_it_fits():
    big, why = choose_checkpoint_policy(_cfg(), 64 * GIB)
    assert big == "selective" and "within" in why
    # 8 x 4096 tokens of Qwen2.5-7B: the kept GEMM outputs (~22 GiB in bf16) no longer fit 32 GB
    small, why = choose_checkpoint_policy(_cfg(cutoff_len=4096, per_device_train_batch_size=8), 32 * GIB)
    assert small == "full" and "more than" in why
    assert choose_checkpoint_policy(_cfg(disable_gradient_checkpointing=True), 64 * GIB)[0] == "off"
    # estimating an auto recipe says what auto chose
    _, assumptions, kwargs = budget.recipe_estimate(_cfg(gradient_checkpointing_policy="auto"), CARDS["910B3-64G"])
    assert kwargs["checkpoint_policy"] == "selective" and any("auto -> selective" in a for a in assumptions)


def test_memory_warning(monkeypatch):
    from npu_ft.device import get_backend

    assert budget.device_total_bytes(get_backend("cpu")) > 2**30  # the machine's RAM
    backend = SimpleNamespace(name="npu")
    monkeypatch.setattr(budget, "device_total_bytes", lambda b: 64 * GIB)
    assert memory_warning(_cfg(), backend) is None
    monkeypatch.setattr(budget, "device_total_bytes", lambda b: 16 * GIB)
    line = memory_warning(_cfg(), backend)
    assert line and "exceeds" in line and "per_device_train_batch_size (2)" in line and "\n" not in line
    monkeypatch.setattr(budget, "device_total_bytes", lambda b: None)
    assert memory_warning(_cfg(), backend) is None  # unknown total: no warning


def test_plan_fits_and_writes_a_recipe_that_estimates_the_same(tmp_path, capsys):
    best, note = plan("qwen2.5-7b", "lora", "910B4-32G", 4096)
    assert best is not None and best.total_gib <= best.usable_gib and "searched" in note
    out = tmp_path / "plan.yaml"
    assert plan_main(["qwen2.5-7b", "--method", "lora", "--card", "910B4-32G", "--seq-len", "4096",
                      "--out", str(out)]) == 0
    cfg = load_config(out)
    assert cfg.per_device_train_batch_size == best.micro_batch and cfg.cutoff_len == 4096
    assert cfg.gradient_accumulation_steps * best.micro_batch >= 16
    est, _, _ = budget.recipe_estimate(cfg, CARDS["910B4-32G"])
    assert est.total_gib == pytest.approx(best.total_gib, rel=1e-6)
    # one more micro-batch step would not fit (the plan is the largest that does)
    bigger = load_config(out, [f"per_device_train_batch_size={2 * best.micro_batch}"])
    assert budget.recipe_estimate(bigger, CARDS["910B4-32G"])[0].total > CARDS["910B4-32G"].usable_bytes
    assert plan_main(["qwen2.5-7b", "--method", "lora", "--card", "910B4-32G", "--seq-len", "2048",
                      "--out", str(out)]) == 0  # its own file: rewritten
    foreign = tmp_path / "mine.yaml"
    foreign.write_text("keep me\n")
    capsys.readouterr()
    assert plan_main(["qwen2.5-7b", "--method", "lora", "--seq-len", "2048", "--out", str(foreign)]) == 1
    assert foreign.read_text() == "keep me\n" and "not written by npu-ft plan" in capsys.readouterr().err


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_8bit", "paged_adamw_8bit"])
def test_every_method_and_optimizer_plans_a_recipe_that_trains_and_estimates_as_itself(method, optim, tmp_path):
    out = tmp_path / "plan.yaml"
    assert plan_main(["qwen2.5-1.5b", "--method", method, "--optim", optim, "--card", "910B4-32G",
                      "--seq-len", "4096", "--out", str(out)]) == 0
    best, _ = plan("qwen2.5-1.5b", method, "910B4-32G", 4096, optim=optim)
    cfg = load_config(out)  # npu-ft train's own validation accepts it
    est, words, kwargs = budget.recipe_estimate(cfg, CARDS["910B4-32G"])
    assert est.total_gib == pytest.approx(best.total_gib, rel=1e-6)
    base, adapter = METHODS[method]
    assert budget._method_and_adapter(cfg) == (base, adapter)
    assert kwargs.get("optim", "adamw_torch") == optim and cfg.pissa_init == (method == "pissa")
    assert not any("estimated as" in w for w in words)
    zeros = [z for z, _, _ in zero_choices(method, optim)]
    assert best.zero in zeros
    # paging is its own offload; an 8-bit optimizer never meets DeepSpeed's CPU Adam; NF4 bases take no ZeRO
    assert zeros == [None] if optim.startswith("paged") or base == "qlora" else "z3" in zeros
    assert "z3_offload" not in zeros or optim == "adamw_torch"


def test_plan_picks_more_tokens_with_smaller_states():
    """8-bit states free room for activations: full fine-tuning of the 1.5B on one 32 GB card fits 8x the
    micro-batch it fits with AdamW's fp32 moments, and paging the states frees more."""
    plans = {optim: plan("qwen2.5-1.5b", "full", "910B4-32G", 4096, optim=optim)[0]
             for optim in ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")}
    assert all(p is not None and p.zero is None for p in plans.values())
    fp32, int8, paged = (plans[o] for o in ("adamw_torch", "adamw_8bit", "paged_adamw_8bit"))
    assert int8.micro_batch >= 4 * fp32.micro_batch and paged.micro_batch >= int8.micro_batch


def test_plan_nothing_fits(capsys):
    assert plan_main(["qwen2.5-72b", "--method", "full", "--card", "910B4-32G", "--seq-len", "4096"]) == 1
    assert "nothing fits 910B4-32G" in capsys.readouterr().err


def test_registered_commands_answer_help():
    for cmd in ("estimate", "plan"):
        proc = subprocess.run([sys.executable, "-m", "npu_ft.cli", cmd, "--help"], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0 and "usage" in proc.stdout, (cmd, proc.stderr)


def test_check_before_loading_resolves_auto_and_warns(monkeypatch, caplog):
    import logging

    backend = SimpleNamespace(name="npu")
    cfg = _cfg(gradient_checkpointing_policy="auto")
    monkeypatch.setattr(budget, "device_total_bytes", lambda b: 64 * GIB)
    with caplog.at_level(logging.INFO, logger="npu_ft.train"):
        budget.check_before_loading(cfg, backend)
    assert cfg.gradient_checkpointing_policy == "selective"
    assert "auto -> selective" in caplog.text and "exceeds" not in caplog.text
    caplog.clear()
    cfg = _cfg(gradient_checkpointing_policy="auto", cutoff_len=4096, per_device_train_batch_size=8)
    monkeypatch.setattr(budget, "device_total_bytes", lambda b: 16 * GIB)
    with caplog.at_level(logging.INFO, logger="npu_ft.train"):
        budget.check_before_loading(cfg, backend)
    assert cfg.gradient_checkpointing_policy == "full"
    assert "exceeds" in caplog.text and "auto -> full" in caplog.text
    cfg = _cfg(gradient_checkpointing_policy="auto")
    monkeypatch.setattr(budget, "device_total_bytes", lambda b: None)  # unknown device total: full, no warning
    budget.check_before_loading(cfg, backend)
    assert cfg.gradient_checkpointing_policy == "full"
    explicit = _cfg(gradient_checkpointing_policy="selective")
    budget.check_before_loading(explicit, backend)
    assert explicit.gradient_checkpointing_policy == "selective"  # only auto is changed
    # a recipe the estimator cannot read (adapters only outside the decoder linears) still trains: full
    caplog.clear()
    odd = _cfg(gradient_checkpointing_policy="auto", lora_target=["lm_head"])
    monkeypatch.setattr(budget, "device_total_bytes", lambda b: 64 * GIB)
    with caplog.at_level(logging.INFO, logger="npu_ft.train"):
        budget.check_before_loading(odd, backend)
    assert odd.gradient_checkpointing_policy == "full" and "cannot read this recipe" in caplog.text
