"""Training runs of the LoRA-family methods for the parity tests: npu-ft's ``run_sft`` and the
reference (transformers ``Trainer`` + PEFT, + bitsandbytes for NF4) on the same tokens and seed, with
the loss of every step and the gradients of step 1 (before the optimizer moves anything)."""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import TrainerCallback

from npu_ft.config import load_config, to_training_arguments
from npu_ft.train.run import run_sft

from ._sft_helpers import base_recipe, step_losses, write_recipe

STEPS = 20
TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


class FirstStepGrads(TrainerCallback):
    """Keeps a CPU copy of every trainable parameter's gradient at step 1, by normalized name."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 and model is not None:
            self.grads = {normalize(n): p.grad.detach().float().cpu().clone()
                          for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def normalize(name: str) -> str:
    """PEFT's in-memory parameter names -> npu-ft's (no ``base_model.model.``, no adapter name)."""
    name = re.sub(r"^base_model\.model\.", "", name)
    name = name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
    name = name.replace(".modules_to_save.default.", ".")
    return re.sub(r"\.default(\.|$)", r"\1", name)


def recipe(env: dict, name: str, **overrides: Any):
    """A 20-step fp32 recipe (``learning_rate`` from overrides) -> ``(SftConfig, output_dir)``."""
    out = env["root"] / name
    data = base_recipe(env["model"], env["data"], out, max_steps=STEPS, save_steps=STEPS, **overrides)
    return load_config(write_recipe(env["root"] / f"{name}.yaml", data)), out


def run_npu_ft(cfg, monkeypatch) -> tuple[list[float], dict[str, torch.Tensor], Any]:
    """``run_sft(cfg)`` -> (losses of steps 1..20, step-1 gradients, the trained model)."""
    grads = FirstStepGrads()
    result = run_sft(cfg, callbacks=[grads])
    losses = step_losses(cfg.output_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return [losses[i] for i in range(1, STEPS + 1)], grads.grads, result.model


def load_reference_model(cfg, quantized: bool = False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        kwargs["device_map"] = {"": "cpu"}
    return AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, **kwargs)


def run_reference(cfg, model, out_dir) -> tuple[list[float], dict[str, torch.Tensor]]:
    """transformers ``Trainer`` on ``model`` (a PEFT model) with the recipe's arguments."""
    from transformers import AutoTokenizer, Trainer

    from npu_ft.data import SFTDataCollator, build_sft_dataset

    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path, local_files_only=True)
    train = build_sft_dataset(cfg.data_arguments(), tokenizer, seed=cfg.seed)
    args = to_training_arguments(cfg, output_dir=str(out_dir), use_cpu=True, save_strategy="no", disable_tqdm=True)
    grads = FirstStepGrads()
    trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer, callbacks=[grads],
                      data_collator=SFTDataCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=8))
    trainer.train()
    losses = [rec["loss"] for rec in trainer.state.log_history if "loss" in rec]
    assert len(losses) == STEPS
    return losses, grads.grads


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def assert_parity(ours, ref, ours_grads, ref_grads, rel: float, grad_rel: float) -> float:
    """Losses within ``rel`` per step; step-1 gradients of every trainable tensor within ``grad_rel``
    of that tensor's largest entry; the reference trained."""
    worst = max_rel_diff(ours, ref)
    assert worst <= rel, f"max relative loss difference {worst:.2e} > {rel:g}\nours={ours}\nref={ref}"
    assert ref[-1] < ref[0]
    assert ours_grads and set(ours_grads) == set(ref_grads), sorted(set(ours_grads) ^ set(ref_grads))[:6]
    for name, want in ref_grads.items():
        got = ours_grads[name]
        scale = max(want.abs().max().item(), 1e-12)
        err = (got - want).abs().max().item()
        assert err <= grad_rel * scale, f"step-1 grad of {name}: error {err:.2e} > {grad_rel:g} x {scale:.2e}"
    print(f"max relative loss difference to the reference: {worst:.2e}")
    return worst


def assert_method_matters(method_losses, lora_losses, tolerance: float) -> float:
    """The method's losses differ from plain LoRA's by more than 10x the parity tolerance."""
    diff = max_rel_diff(method_losses, lora_losses)
    assert diff > 10 * tolerance, f"the method changes the losses by only {diff:.2e} (<= 10 x {tolerance:g})"
    print(f"max relative loss difference to plain LoRA: {diff:.2e}")
    return diff
