"""End-to-end tiny runs through ``npu-ft train`` / ``run_sft``: outputs, formats, reloading."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from npu_ft.config import load_config
from npu_ft.train.cli import train_main
from npu_ft.train.export import export_main
from npu_ft.train.run import run_sft

from ._sft_helpers import base_recipe, read_log, tiny_model_dir, write_dataset, write_recipe

_TIME = re.compile(r"^\d+:\d\d:\d\d$")
_LOG_KEYS = ["current_steps", "total_steps", "loss", "lr", "epoch", "percentage", "elapsed_time", "remaining_time"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    return {"model": tiny_model_dir(root), "data": write_dataset(root / "data", n=16), "root": root}


def _batch(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    enc = tok(["<|im_start|>user\nRepeat the digits.\n1234<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    return enc["input_ids"]


def _check_common_outputs(out: Path, steps: int, save_steps: int, plot: bool = True) -> None:
    assert (out / "training_loss.png").is_file() == plot
    for name in ("trainer_log.jsonl", "trainer_state.json", "train_results.json", "all_results.json",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name
    log = read_log(out)
    step_lines = [rec for rec in log if "loss" in rec]
    assert [rec["current_steps"] for rec in step_lines] == list(range(1, steps + 1))
    for rec in step_lines:
        assert list(rec)[: len(_LOG_KEYS)] == _LOG_KEYS
        assert rec["total_steps"] == steps
        assert rec["percentage"] == round(rec["current_steps"] / steps * 100, 2)
        assert _TIME.match(rec["elapsed_time"]) and _TIME.match(rec["remaining_time"])
        assert isinstance(rec["loss"], float) and rec["loss"] > 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    results = json.loads((out / "train_results.json").read_text())
    assert "train_loss" in results and "train_runtime" in results
    ckpts = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert ckpts == [f"checkpoint-{n}" for n in range(save_steps, steps + 1, save_steps)]
    assert not [p for p in out.iterdir() if p.name.startswith(("tmp-checkpoint", ".tmp"))]


def test_lora_cli_outputs_and_peft_loads_adapter(env, capsys):
    out = env["root"] / "lora"
    recipe = write_recipe(env["root"] / "lora.yaml",
                          base_recipe(env["model"], env["data"], out, plot_loss=True))
    assert train_main([str(recipe), "lora_rank=4", "max_steps=4"]) == 0
    assert "done" in capsys.readouterr().out
    _check_common_outputs(out, steps=4, save_steps=2)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert not (out / "model.safetensors").exists()
    ck = out / "checkpoint-2"
    for name in ("adapter_model.safetensors", "optimizer.safetensors", "scheduler.safetensors", "rng_state.safetensors",
                 "trainer_state.json", "training_args.json", "npu_ft_run.json"):
        assert (ck / name).is_file(), name

    # PEFT loads our adapter and gives the same logits as npu-ft's own modules
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from npu_ft.model.loading import load_model
    from npu_ft.train.adapter_io import load_adapter

    ids = _batch(env["model"])
    ours = load_adapter(load_model(str(env["model"]), dtype="float32"), out).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(env["model"]), dtype=torch.float32),
                                     str(out)).eval()
    with torch.no_grad():
        a, b = ours(ids).logits, peft(ids).logits
    assert not torch.equal(a, AutoModelForCausalLM.from_pretrained(str(env["model"]))(ids).logits)  # trained
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # export: merge the adapter into the base -> plain HF folder with the same logits
    export_dir = env["root"] / "merged"
    assert export_main([f"model_name_or_path={env['model']}", f"adapter_name_or_path={out}",
                        "template=qwen", f"export_dir={export_dir}"]) == 0
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json"):
        assert (export_dir / name).is_file(), name
    merged = AutoModelForCausalLM.from_pretrained(str(export_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, a, rtol=1e-4, atol=1e-4)


def test_full_run_writes_hf_model(env):
    out = env["root"] / "full"
    cfg = load_config(write_recipe(env["root"] / "full.yaml", base_recipe(
        env["model"], env["data"], out, finetuning_type="full", lora_target=None, lora_rank=None,
        learning_rate=1e-4, max_steps=2, save_steps=2, plot_loss=True,
        disable_gradient_checkpointing=False)))
    result = run_sft(cfg)
    assert result.method == "full" and result.global_step == 2
    _check_common_outputs(out, steps=2, save_steps=2)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not (out / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    ids = _batch(env["model"])
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    trained = result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trained(ids).logits, rtol=1e-5, atol=1e-5)


def test_qlora_run_and_export(env):
    out = env["root"] / "qlora"
    cfg = load_config(write_recipe(env["root"] / "qlora.yaml", base_recipe(
        env["model"], env["data"], out, quantization_bit=4, max_steps=2, save_steps=2)))
    result = run_sft(cfg)
    assert result.method == "qlora"
    _check_common_outputs(out, steps=2, save_steps=2, plot=False)
    from npu_ft.modules.nf4 import Nf4Linear

    assert any(isinstance(m, Nf4Linear) for m in result.model.modules())
    ids = _batch(env["model"])
    with torch.no_grad():
        trained_logits = result.model.eval()(ids).logits

    # export with quantization_bit: 4 merges into the dequantized NF4 base: same function as trained
    export_dir = env["root"] / "qmerged"
    assert export_main([f"model_name_or_path={env['model']}", f"adapter_name_or_path={out}",
                        "quantization_bit=4", f"export_dir={export_dir}"]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(export_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained_logits, rtol=1e-4, atol=1e-4)
