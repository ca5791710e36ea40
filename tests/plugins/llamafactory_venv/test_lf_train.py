"""Real ``llamafactory-cli train`` runs with and without the plugin (LLaMA-Factory venv only).

Run by scripts/ci_llamafactory.sh. A tiny random Qwen2 (npu_ft.model.build_tiny_model, real Qwen
tokenizer) and 16 alpaca examples; 4 optimizer steps, fp32, no gradient checkpointing. Each pair of
runs must log the same loss at every step (LoRA: relative 1e-4, QLoRA: 1e-3), npu-ft's kernels must
be the ones that ran (counters written by the plugin at exit; the fused decoder-block ops are on in
every patched run), and LLaMA-Factory must save the same PEFT adapter files; pairs train DoRA,
QDoRA (4-bit base) and PiSSA (with pissa_convert).
One run goes through LLaMA-Factory's torchrun launcher (one CPU worker), to show that
`npu-ft lf-train` hands its options to the workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
LF_CLI = BIN / "llamafactory-cli"
NPU_FT = BIN / "npu-ft"

if not LF_CLI.exists():  # this directory is collected only by scripts/ci_llamafactory.sh: fail, never skip
    raise RuntimeError(f"tests/plugins/llamafactory_venv needs llamafactory-cli next to {sys.executable}")

CONFIG = """\
model_name_or_path: {model}
stage: sft
do_train: true
finetuning_type: lora
lora_target: all
lora_rank: 8
dataset: tiny
dataset_dir: {data}
template: qwen
cutoff_len: 64
max_samples: 16
overwrite_cache: true
preprocessing_num_workers: 1
dataloader_num_workers: 0
output_dir: {out}
overwrite_output_dir: true
logging_steps: 1
save_strategy: "no"
plot_loss: false
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
learning_rate: 1.0e-3
max_steps: 4
lr_scheduler_type: constant
seed: 42
report_to: none
disable_gradient_checkpointing: true
"""

TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from npu_ft.model.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("lf")
    build_tiny_model(root / "model", arch="qwen2", seed=0)
    data = root / "data"
    data.mkdir()
    rows = [{"instruction": f"Say the number {i} in words.", "input": "", "output": f"The number is {i}."}
            for i in range(16)]
    (data / "tiny.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    yield root
    if TIMINGS:
        print("\nllamafactory run times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in TIMINGS.items()))


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NPU_FT_LF") and k != "NPU_FT_LLAMAFACTORY"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", **extra)
    return env


def _run(work: Path, name: str, cmd_prefix: list, overrides: list[str] = (), env=None, model="model",
         check=True) -> subprocess.CompletedProcess:
    out = work / name
    cfg = work / f"{name}.yaml"
    cfg.write_text(CONFIG.format(model=work / model, data=work / "data", out=out))
    t = time.perf_counter()
    proc = subprocess.run([*map(str, cmd_prefix), str(cfg), *overrides], env=env or _env(), cwd=work,
                          capture_output=True, text=True, timeout=900)
    TIMINGS[name] = time.perf_counter() - t
    (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name}: exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc


def _losses(work: Path, name: str) -> list[float]:
    lines = (work / name / "trainer_log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def _assert_same_losses(a: list[float], b: list[float], rtol: float) -> None:
    assert len(a) == len(b) == 4, (a, b)
    for step, (x, y) in enumerate(zip(a, b, strict=False), 1):
        assert abs(x - y) <= rtol * abs(x), f"step {step}: {x} vs {y} (relative {abs(x - y) / abs(x):.2e} > {rtol})"


def _assert_same_adapter_files(work: Path, ref: str, ours: str) -> None:
    from safetensors import safe_open

    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (work / ours / f).exists(), f
    cfg_ref = json.loads((work / ref / "adapter_config.json").read_text())
    cfg = json.loads((work / ours / "adapter_config.json").read_text())
    # LLaMA-Factory builds target_modules from a set: the order differs between any two runs
    assert sorted(cfg.pop("target_modules")) == sorted(cfg_ref.pop("target_modules"))
    assert cfg == cfg_ref
    with safe_open(str(work / ref / "adapter_model.safetensors"), "pt") as a, \
            safe_open(str(work / ours / "adapter_model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight" in a.keys()
        for k in a.keys():
            assert a.get_tensor(k).shape == b.get_tensor(k).shape, k


def _counters(path: Path) -> dict:
    return json.loads(path.read_text())


def test_lora_same_loss_via_env_hook(work):
    """Unpatched `llamafactory-cli train` vs the same command with NPU_FT_LLAMAFACTORY=1 (.pth hook)."""
    _run(work, "lora_ref", [LF_CLI, "train"])
    counters = work / "lora_counters.json"
    proc = _run(work, "lora_npu_ft", [LF_CLI, "train"],
                env=_env(NPU_FT_LLAMAFACTORY="1", NPU_FT_LF_COUNTERS=str(counters)))
    assert "[npu-ft] LLaMA-Factory 0.9.5 patched" in proc.stderr
    _assert_same_losses(_losses(work, "lora_ref"), _losses(work, "lora_npu_ft"), 1e-4)
    c = _counters(counters)
    assert c["patched"] and c["model_type"] == "qwen2"
    # 7 target linears x 2 layers x 4 steps, forward and backward, all through npu-ft's kernel
    assert sum(c["kernel_calls"]["lora_linear"].values()) == 56, c
    assert sum(c["kernel_calls"]["lora_linear_backward"].values()) == 56, c
    assert c["plugin"].get("fallback", 0) == 0, c
    # the loss of every step went through npu-ft's fused linear cross-entropy
    assert c["fused_cross_entropy"] is True and c["fused_loss_calls"] == {"fused": 4}, c
    _assert_same_adapter_files(work, "lora_ref", "lora_npu_ft")


def test_lora_selective_checkpointing_via_env(work):
    """LLaMA-Factory with checkpointing on and NPU_FT_LF_CHECKPOINT_POLICY=selective: the same losses
    as its unpatched run without checkpointing, and no linear runs twice (full would rerun all 56)."""
    if not (work / "lora_ref" / "trainer_log.jsonl").exists():
        _run(work, "lora_ref", [LF_CLI, "train"])
    counters = work / "lora_selective_counters.json"
    proc = _run(work, "lora_selective", [LF_CLI, "train"], ["disable_gradient_checkpointing=false"],
                env=_env(NPU_FT_LLAMAFACTORY="1", NPU_FT_LF_CHECKPOINT_POLICY="selective",
                         NPU_FT_LF_COUNTERS=str(counters)))
    assert "[npu-ft] gradient checkpointing: selective policy" in proc.stderr
    _assert_same_losses(_losses(work, "lora_ref"), _losses(work, "lora_selective"), 1e-4)
    c = _counters(counters)
    assert c["checkpoint_policy"] == "selective", c
    assert sum(c["kernel_calls"]["lora_linear"].values()) == 56, c
    assert sum(c["kernel_calls"]["lora_linear_backward"].values()) == 56, c


def test_lf_train_options_reach_torchrun_workers(work):
    """`npu-ft lf-train` with LLaMA-Factory's torchrun launcher (FORCE_TORCHRUN, one CPU worker): the
    options it read (checkpoint policy, fused loss off, counters file) patch the worker through the
    import hook, the worker writes the counters and the launching process does not overwrite them."""
    if not (work / "lora_ref" / "trainer_log.jsonl").exists():
        _run(work, "lora_ref", [LF_CLI, "train"])
    counters = work / "torchrun_counters.json"
    env = _env(FORCE_TORCHRUN="1", NPROC_PER_NODE="1", NPU_FT_LF_CHECKPOINT_POLICY="selective",
               NPU_FT_LF_FUSED_LOSS="0", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = _run(work, "lora_torchrun", [NPU_FT, "lf-train"],
                ["disable_gradient_checkpointing=false", "--counters", str(counters)], env=env)
    assert "[npu-ft] gradient checkpointing: selective policy" in proc.stderr  # printed by the worker
    _assert_same_losses(_losses(work, "lora_ref"), _losses(work, "lora_torchrun"), 1e-4)
    c = _counters(counters)
    assert c["patched"] and c["checkpoint_policy"] == "selective", c
    assert c["fused_cross_entropy"] is False and c["fused_loss_calls"] == {}, c
    assert sum(c["kernel_calls"]["lora_linear"].values()) == 56, c
    assert sum(c["kernel_calls"]["lora_linear_backward"].values()) == 56, c


def test_qlora_same_loss_via_lf_train(work):
    """LLaMA-Factory + bitsandbytes 4-bit (CPU) vs `npu-ft lf-train` (npu-ft NF4, no bitsandbytes)."""
    _run(work, "qlora_ref", [LF_CLI, "train"], ["quantization_bit=4"])
    counters = work / "qlora_counters.json"
    proc = _run(work, "qlora_npu_ft", [NPU_FT, "lf-train"], ["quantization_bit=4", "--counters", str(counters)])
    assert "bitsandbytes is not used" in proc.stderr
    _assert_same_losses(_losses(work, "qlora_ref"), _losses(work, "qlora_npu_ft"), 1e-3)
    c = _counters(counters)
    assert c["nf4_layers"] == 14, c
    assert sum(c["kernel_calls"]["nf4_linear"].values()) == 56, c
    assert sum(c["kernel_calls"]["nf4_linear_backward"].values()) == 56, c
    assert not c["kernel_calls"]["lora_linear"], c
    assert c["fused_cross_entropy"] is True and c["fused_loss_calls"] == {"fused": 4}, c
    _assert_same_adapter_files(work, "qlora_ref", "qlora_npu_ft")


def test_unsupported_model_type_is_a_clear_error_unless_fallback(work):
    """A Llama-architecture model: refused with a clear message; runs unpatched only on request."""
    from npu_ft.model.tiny import model_from_config, tiny_config

    cfg = tiny_config("qwen2")
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    for k in ("use_sliding_window", "sliding_window", "max_window_layers"):
        cfg.pop(k, None)
    model = model_from_config(cfg, seed=0)
    model.save_pretrained(str(work / "llama"))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(work / "model")).save_pretrained(str(work / "llama"))

    proc = _run(work, "llama_refused", [NPU_FT, "lf-train"], ["max_steps=1"], model="llama", check=False)
    assert proc.returncode != 0
    assert "model type 'llama' is not supported" in proc.stderr and "NPU_FT_LF_FALLBACK=1" in proc.stderr
    assert not (work / "llama_refused" / "adapter_model.safetensors").exists()

    proc = _run(work, "llama_fallback", [NPU_FT, "lf-train"], ["max_steps=1", "--allow-unpatched"], model="llama")
    assert "running LLaMA-Factory UNPATCHED" in proc.stderr
    assert (work / "llama_fallback" / "adapter_model.safetensors").exists()


def test_unsupported_version_in_process(monkeypatch):
    """The version gate (the real LLaMA-Factory 0.9.5 made 'unsupported' by narrowing the list)."""
    from npu_ft_llamafactory import lf_patch

    monkeypatch.setattr(lf_patch, "SUPPORTED_LF_VERSIONS", ("9.9.9",))
    with pytest.raises(lf_patch.NpuFtLlamaFactoryError, match=r"LLaMA-Factory 0\.9\.5 is not a supported version"):
        lf_patch.apply_npu_ft_to_llamafactory(fallback=False)
    with pytest.warns(RuntimeWarning, match="UNPATCHED"):
        info = lf_patch.apply_npu_ft_to_llamafactory(fallback=True)
    assert info["patched"] is False
    lf_patch.peft_patch.set_enabled(True)


def test_dora_same_loss_and_fused_block_ops_via_env_hook(work):
    """`use_dora: true`: unpatched `llamafactory-cli train` vs the plugin (.pth hook). The same loss at
    every step, PEFT's DoRA layers run npu_ft::dora_linear, and the decoder blocks npu-ft's fused
    RMSNorm(+residual) / RoPE / SwiGLU ops (on by default)."""
    _run(work, "dora_ref", [LF_CLI, "train"], ["use_dora=true"])
    counters = work / "dora_counters.json"
    proc = _run(work, "dora_npu_ft", [LF_CLI, "train"], ["use_dora=true"],
                env=_env(NPU_FT_LLAMAFACTORY="1", NPU_FT_LF_COUNTERS=str(counters)))
    assert "[npu-ft] fused decoder-block ops: rms_norm, residual_rms_norm, rope, swiglu" in proc.stderr
    _assert_same_losses(_losses(work, "dora_ref"), _losses(work, "dora_npu_ft"), 1e-4)
    c = _counters(counters)
    # 7 DoRA linears x 2 layers x 4 steps, forward and backward; no plain LoRA call, no PEFT fallback
    assert sum(c["kernel_calls"]["dora_linear"].values()) == 56, c
    assert sum(c["kernel_calls"]["dora_linear_backward"].values()) == 56, c
    assert sum(c["kernel_calls"]["lora_linear"].values()) == 0 and c["plugin"].get("fallback", 0) == 0, c
    # 2 layers: 2 norms each + the final norm; the post-attention norm runs as the layer's residual call
    assert c["fused_kernels"] == {"rms_norm": 5, "residual_rms_norm": 2, "rope": 2, "swiglu": 2}, c
    assert sum(c["kernel_calls"]["rms_norm"].values()) == 5 * 4, c
    assert sum(c["kernel_calls"]["rope"].values()) == sum(c["kernel_calls"]["rope_backward"].values()) == 2 * 4, c
    assert sum(c["kernel_calls"]["swiglu"].values()) == sum(c["kernel_calls"]["swiglu_backward"].values()) == 8, c
    _assert_same_adapter_files(work, "dora_ref", "dora_npu_ft")


#: `llamafactory-cli train` with one fix: LLaMA-Factory 0.9.5 refuses DoRA on every quantized model
#: ("DoRA is not compatible with PTQ-quantized models") because it compares transformers'
#: model.quantization_method ("bitsandbytes") with its own QuantizationMethod.BNB ("bnb"); its intent
#: is to allow bitsandbytes. The fix gives the check transformers' name; nothing else changes.
LF_WITH_QDORA_FIX = """
import sys
from llamafactory.model import adapter
class QuantizationMethod:
    BNB = "bitsandbytes"
adapter.QuantizationMethod = QuantizationMethod
from llamafactory.cli import main
sys.argv = ["llamafactory-cli", "train", *sys.argv[1:]]
main()
"""


def test_qdora_same_loss_via_lf_train(work):
    """`use_dora: true` with `quantization_bit: 4` (QDoRA). Unpatched LLaMA-Factory 0.9.5 refuses it
    (the enum mismatch above); with only that check fixed it trains PEFT DoRA over bitsandbytes 4-bit,
    and `npu-ft lf-train` (which quantizes with npu-ft's NF4 and so passes the check as it is) gives
    the same losses with PEFT's DoRA layers on npu_ft::dora_nf4_linear."""
    args = ["use_dora=true", "quantization_bit=4"]
    refused = _run(work, "qdora_unpatched", [LF_CLI, "train"], args, check=False)
    assert refused.returncode != 0 and "DoRA is not compatible with PTQ-quantized models" in refused.stderr
    _run(work, "qdora_ref", [sys.executable, "-c", LF_WITH_QDORA_FIX], args)
    counters = work / "qdora_counters.json"
    _run(work, "qdora_npu_ft", [NPU_FT, "lf-train"], [*args, "--counters", str(counters)])
    _assert_same_losses(_losses(work, "qdora_ref"), _losses(work, "qdora_npu_ft"), 1e-3)
    c = _counters(counters)
    assert c["nf4_layers"] == 14, c
    assert sum(c["kernel_calls"]["dora_nf4_linear"].values()) == 56, c
    assert sum(c["kernel_calls"]["dora_nf4_linear_backward"].values()) == 56, c
    assert not c["kernel_calls"]["nf4_linear"] and not c["kernel_calls"]["dora_linear"], c
    _assert_same_adapter_files(work, "qdora_ref", "qdora_npu_ft")


def test_pissa_same_loss_via_env_hook(work):
    """`pissa_init: true` (PEFT's fast-SVD PiSSA initialization, run by LLaMA-Factory): unpatched vs the
    plugin. PiSSA's layers are LoRA layers once initialized, so they run npu_ft::lora_linear, from the
    same initial adapter (same seed), with the same losses; `pissa_convert` writes the same files."""
    args = ["pissa_init=true", "pissa_iter=4", "pissa_convert=true"]
    _run(work, "pissa_ref", [LF_CLI, "train"], args)
    counters = work / "pissa_counters.json"
    _run(work, "pissa_npu_ft", [LF_CLI, "train"], args,
         env=_env(NPU_FT_LLAMAFACTORY="1", NPU_FT_LF_COUNTERS=str(counters)))
    _assert_same_losses(_losses(work, "pissa_ref"), _losses(work, "pissa_npu_ft"), 1e-4)
    c = _counters(counters)
    assert sum(c["kernel_calls"]["lora_linear"].values()) == 56, c
    assert sum(c["kernel_calls"]["lora_linear_backward"].values()) == 56, c
    assert c["plugin"].get("fallback", 0) == 0, c
    _assert_same_adapter_files(work, "pissa_ref", "pissa_npu_ft")
    for sub in ("pissa_init", "pissa_converted"):
        assert (work / "pissa_npu_ft" / sub / "adapter_model.safetensors").exists(), sub
