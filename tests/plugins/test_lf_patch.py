"""LLaMA-Factory-level patches, the import hook and `npu-ft lf-train` errors -- in the main environment.

A small fake ``llamafactory`` package (version metadata + the two functions the plugin wraps) stands
in for the real one; tests/plugins/llamafactory_venv runs the real LLaMA-Factory 0.9.5.
"""

from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from npu_ft.model.tiny import model_from_config, tiny_config

FAKE_LOADER = '''
CALLS = []
def init_adapter(config, model, model_args, finetuning_args, is_trainable):
    from peft import LoraConfig, get_peft_model
    CALLS.append(("init_adapter", getattr(model, "quantization_method", None)))
    if getattr(finetuning_args, "finetuning_type", "lora") == "full":  # LLaMA-Factory: every weight trains
        return model
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
'''
FAKE_PATCHER = '''
CALLS = []
def configure_quantization(config, tokenizer, model_args, is_trainable, init_kwargs):
    CALLS.append("configure_quantization")
    init_kwargs["quantization_config"] = "bitsandbytes would be used"
'''

FAKE_CHECKPOINTING = '''
CALLS = []
def _gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, use_unsloth_gc=False):
    CALLS.append((gradient_checkpointing_kwargs, use_unsloth_gc))
    self.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
'''


@pytest.fixture
def fake_lf(tmp_path, monkeypatch):
    def make(version="0.9.5"):
        root = tmp_path / f"site-{version}"
        pkg = root / "llamafactory" / "model"
        pkg.mkdir(parents=True)
        (root / "llamafactory" / "__init__.py").write_text(f"__version__ = {version!r}\n")
        (pkg / "__init__.py").write_text("")
        (pkg / "loader.py").write_text(textwrap.dedent(FAKE_LOADER))
        (pkg / "patcher.py").write_text(textwrap.dedent(FAKE_PATCHER))
        (pkg / "model_utils").mkdir()
        (pkg / "model_utils" / "__init__.py").write_text("")
        (pkg / "model_utils" / "checkpointing.py").write_text(textwrap.dedent(FAKE_CHECKPOINTING))
        dist = root / f"llamafactory-{version}.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: llamafactory\nVersion: {version}\n")
        monkeypatch.syspath_prepend(str(root))
        return root

    saved = {k: v for k, v in sys.modules.items() if k == "llamafactory" or k.startswith("llamafactory.")}
    from npu_ft_llamafactory import lf_patch, peft_patch

    state = dict(lf_patch._STATE)
    yield make
    for k in [k for k in sys.modules if k == "llamafactory" or k.startswith("llamafactory.")]:
        del sys.modules[k]
    sys.modules.update(saved)
    lf_patch._STATE.clear()
    lf_patch._STATE.update(state)
    peft_patch.revert_npu_ft_peft()
    peft_patch.set_enabled(True)
    peft_patch.STATS.clear()
    from npu_ft_llamafactory import hook

    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, hook._PatchAfterImport)]


def _args(**kw):
    base = dict(quantization_bit=None, quantization_method="bnb", quantization_type="nf4", double_quantization=True,
                export_quantization_bit=None, compute_dtype=torch.float32)
    base.update(kw)
    return types.SimpleNamespace(**base)


def _load(arch="qwen2", finetuning_args=None, **model_kw):
    """What LLaMA-Factory's load_model does around the two patched functions."""
    from llamafactory.model import loader, patcher

    cfg = tiny_config(arch, hidden_size=32, layers=1, heads=4, kv_heads=2, intermediate=48, vocab=97)
    model = model_from_config(cfg, seed=0)
    args = _args(**model_kw)
    init_kwargs = {}
    patcher.configure_quantization(model.config, None, args, True, init_kwargs)
    model = loader.init_adapter(model.config, model, args, finetuning_args, True)
    return model, init_kwargs


def test_lora_and_qlora_through_fake_loader(fake_lf):
    fake_lf("0.9.5")
    from npu_ft.modules.nf4 import Nf4Linear
    from npu_ft_llamafactory import apply_npu_ft_to_llamafactory, is_peft_patched

    info = apply_npu_ft_to_llamafactory(fallback=False)
    assert info["patched"] and info["llamafactory"] == "0.9.5" and is_peft_patched()
    model, init_kwargs = _load()
    assert init_kwargs == {"quantization_config": "bitsandbytes would be used"}  # no quantization: LF's own path
    assert not any(isinstance(m, Nf4Linear) for m in model.modules())

    model, init_kwargs = _load(quantization_bit=4)
    assert init_kwargs == {}  # no BitsAndBytesConfig: bitsandbytes is never needed
    from llamafactory.model import loader

    assert loader.CALLS[-1] == ("init_adapter", "bnb")  # LF's quantized-model guards still see a quantized model
    nf4 = [m for m in model.modules() if isinstance(m, Nf4Linear)]
    assert len(nf4) == 7 and all(m.quant_state.nested for m in nf4)  # 7 linears in the one layer, head skipped
    ids = torch.randint(0, 97, (1, 5))
    from npu_ft.ops import kernel_calls, reset_kernel_calls

    reset_kernel_calls()
    model(input_ids=ids, labels=ids).loss.backward()
    assert sum(kernel_calls("nf4_linear").values()) == 7


def test_fused_loss_on_the_model_inside_peft(fake_lf, monkeypatch):
    fake_lf("0.9.5")
    from npu_ft.modules.fused_loss import CALLS, fused_cross_entropy_enabled
    from npu_ft_llamafactory import apply_npu_ft_to_llamafactory, counters

    apply_npu_ft_to_llamafactory(fallback=False)
    model, _ = _load()
    assert fused_cross_entropy_enabled(model.get_base_model())
    CALLS.clear()
    ids = torch.randint(0, 97, (2, 6))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert CALLS == {"fused": 1} and torch.isfinite(loss)
    assert counters()["fused_cross_entropy"] is True and counters()["fused_loss_calls"] == {"fused": 1}
    # LLaMA-Factory options that read the training logits, and the opt-out, keep transformers' loss
    for finetuning_args in (types.SimpleNamespace(compute_accuracy=True), types.SimpleNamespace(use_dft_loss=True)):
        model, _ = _load(finetuning_args=finetuning_args)
        assert not fused_cross_entropy_enabled(model.get_base_model())
    model, _ = _load(enable_liger_kernel=True)
    assert not fused_cross_entropy_enabled(model.get_base_model())
    # the option of the apply call decides, not the environment
    monkeypatch.setenv("NPU_FT_LF_FUSED_LOSS", "0")
    model, _ = _load()
    assert fused_cross_entropy_enabled(model.get_base_model())
    apply_npu_ft_to_llamafactory(fallback=False, fused_loss=False)
    monkeypatch.setenv("NPU_FT_LF_FUSED_LOSS", "1")
    model, _ = _load()
    assert not fused_cross_entropy_enabled(model.get_base_model())
    assert counters()["fused_cross_entropy"] is False


def test_fused_loss_for_full_fine_tuning(fake_lf):
    """finetuning_type: full has no PEFT model: the fused loss goes on the causal LM itself, with the
    same loss and gradients as transformers' loss."""
    fake_lf("0.9.5")
    from npu_ft.modules.fused_loss import CALLS, fused_cross_entropy_enabled
    from npu_ft_llamafactory import apply_npu_ft_to_llamafactory, counters

    apply_npu_ft_to_llamafactory(fallback=False)
    model, _ = _load(finetuning_args=types.SimpleNamespace(finetuning_type="full"))
    assert not hasattr(model, "get_base_model") and fused_cross_entropy_enabled(model)
    reference = model_from_config(tiny_config("qwen2", hidden_size=32, layers=1, heads=4, kv_heads=2, intermediate=48,
                                              vocab=97), seed=0)
    ids = torch.randint(0, 97, (2, 6))
    CALLS.clear()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    ref_loss = reference(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    assert CALLS == {"fused": 1} and counters()["fused_cross_entropy"] is True
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.lm_head.weight.grad, reference.lm_head.weight.grad, rtol=1e-4, atol=1e-6)


def _fused_blocks_reference(arch, finetuning_args):
    """The model ``_load`` builds, through LLaMA-Factory's unwrapped init_adapter (nothing of npu-ft)."""
    from llamafactory.model import loader

    cfg = tiny_config(arch, hidden_size=32, layers=1, heads=4, kv_heads=2, intermediate=48, vocab=97)
    model = model_from_config(cfg, seed=0)
    return loader.init_adapter.__wrapped__(model.config, model, _args(), finetuning_args, True)


def _train_step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch, finetuning_type", [("qwen2", "lora"), ("qwen3", "lora"), ("qwen2", "full")])
def test_fused_block_ops_on_the_trained_model(fake_lf, arch, finetuning_type):
    """init_adapter puts npu-ft's fused RMSNorm(+residual) / RoPE / SwiGLU on the causal LM (inside PEFT
    for LoRA, the model itself for full): counted, and the same loss and gradients as unpatched."""
    fake_lf("0.9.5")
    from npu_ft.modules.fused_blocks import fused_kernels_applied
    from npu_ft.ops import reset_kernel_calls
    from npu_ft_llamafactory import apply_npu_ft_to_llamafactory, counters, peft_patch

    apply_npu_ft_to_llamafactory(fallback=False)
    ft = types.SimpleNamespace(finetuning_type=finetuning_type)
    model, _ = _load(arch, finetuning_args=ft)
    inner = model.get_base_model() if finetuning_type == "lora" else model
    norms = 3 + (2 if arch == "qwen3" else 0)  # the layer's two norms + the final one (+ Qwen3's q_norm, k_norm)
    expected = {"rms_norm": norms, "residual_rms_norm": 1, "rope": 1, "swiglu": 1}
    assert fused_kernels_applied(inner) == expected and counters()["fused_kernels"] == expected
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    reset_kernel_calls()
    loss, grads = _train_step(model, ids)
    calls = {op: sum(n.values()) for op, n in counters()["kernel_calls"].items()}
    # one call per norm; post_attention_layernorm's is the decoder layer's call with the residual add.
    # LoRA: norms of frozen inputs with frozen weights (input_layernorm, Qwen3's k_norm: k_proj is no
    # target here) need no backward
    assert calls["rms_norm"] == norms
    if finetuning_type == "full":
        assert calls["rms_norm_backward"] == norms
    else:
        assert 0 < calls["rms_norm_backward"] < norms
    assert calls["rope"] == calls["rope_backward"] == 1 and calls["swiglu"] == calls["swiglu_backward"] == 1
    peft_patch.set_enabled(False)
    reference = _fused_blocks_reference(arch, ft)
    assert fused_kernels_applied(reference) == {}
    ref_loss, ref_grads = _train_step(reference, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_block_ops_off(fake_lf):
    """fused_kernels=False, LLaMA-Factory's enable_liger_kernel and a model loaded for inference keep
    transformers' modules."""
    fake_lf("0.9.5")
    from llamafactory.model import loader

    from npu_ft.modules.fused_blocks import fused_kernels_applied
    from npu_ft_llamafactory import apply_npu_ft_to_llamafactory, counters

    apply_npu_ft_to_llamafactory(fallback=False)
    model, _ = _load(enable_liger_kernel=True)
    assert fused_kernels_applied(model) == {} and counters()["fused_kernels"] == {}
    cfg = tiny_config("qwen2", hidden_size=32, layers=1, heads=4, kv_heads=2, intermediate=48, vocab=97)
    plain = model_from_config(cfg, seed=0)
    model = loader.init_adapter(plain.config, plain, _args(), None, False)  # is_trainable=False
    assert fused_kernels_applied(model) == {}
    apply_npu_ft_to_llamafactory(fallback=False, fused_kernels=False)
    model, _ = _load()
    assert fused_kernels_applied(model) == {} and counters()["fused_kernels"] == {}
    apply_npu_ft_to_llamafactory(fallback=False)
    model, _ = _load()
    assert fused_kernels_applied(model)["swiglu"] == 1


def test_checkpoint_policy_from_the_apply_call(fake_lf, monkeypatch):
    fake_lf("0.9.5")
    from npu_ft_llamafactory import apply_npu_ft_to_llamafactory, counters
    from npu_ft_llamafactory.lf_patch import NpuFtLlamaFactoryError

    apply_npu_ft_to_llamafactory(fallback=False)
    from llamafactory.model.model_utils import checkpointing

    model, _ = _load()
    monkeypatch.setenv("NPU_FT_LF_CHECKPOINT_POLICY", "selective")  # read by the CLI and the hook only
    checkpointing._gradient_checkpointing_enable(model.get_base_model(), {"use_reentrant": True})
    assert checkpointing.CALLS[-1] == ({"use_reentrant": True}, False)  # default full: LLaMA-Factory's own
    assert counters()["checkpoint_policy"] == "full"
    apply_npu_ft_to_llamafactory(fallback=False, checkpoint_policy="selective")
    monkeypatch.delenv("NPU_FT_LF_CHECKPOINT_POLICY")
    checkpointing._gradient_checkpointing_enable(model.get_base_model(), {"use_reentrant": True})
    kwargs, _ = checkpointing.CALLS[-1]
    assert kwargs["use_reentrant"] is False and callable(kwargs["context_fn"])
    assert counters()["checkpoint_policy"] == "selective"
    ids = torch.randint(0, 97, (2, 6))
    from npu_ft.ops import kernel_calls, reset_kernel_calls

    model.train()
    reset_kernel_calls()
    model(input_ids=ids, labels=ids).loss.backward()
    assert sum(kernel_calls("lora_linear").values()) == 2  # q_proj, v_proj once each: not rerun
    with pytest.raises(NpuFtLlamaFactoryError, match="cannot be combined with use_unsloth_gc"):
        checkpointing._gradient_checkpointing_enable(model.get_base_model(), None, True)
    with pytest.raises(NpuFtLlamaFactoryError, match="checkpoint_policy='most': expected one of full, selective"):
        apply_npu_ft_to_llamafactory(checkpoint_policy="most")
    # a refused call changes nothing
    checkpointing._gradient_checkpointing_enable(model.get_base_model(), None)
    assert counters()["checkpoint_policy"] == "selective"


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(checkpoint_policy="Selective"), "checkpoint_policy='Selective': expected one of full, selective"),
        (dict(fused_loss="no"), "fused_loss='no': expected True or False"),
        (dict(fused_kernels=0), "fused_kernels=0: expected True or False"),
        (dict(fallback=1), "fallback=1: expected True or False"),
        (dict(counters_path=""), "counters_path='': expected a file path or None"),
    ],
)
def test_bad_apply_arguments(fake_lf, kw, msg):
    fake_lf("0.9.5")
    from npu_ft_llamafactory import NpuFtLlamaFactoryError, apply_npu_ft_to_llamafactory, is_peft_patched

    with pytest.raises(NpuFtLlamaFactoryError, match=msg):
        apply_npu_ft_to_llamafactory(**kw)
    assert not is_peft_patched()


def test_options_from_env(monkeypatch):
    from npu_ft_llamafactory.options import (
        NpuFtLlamaFactoryError,
        PluginOptions,
        hook_enabled_from_env,
        options_from_env,
        options_to_env,
    )

    for name in ("NPU_FT_LLAMAFACTORY", "NPU_FT_LF_FALLBACK", "NPU_FT_LF_FUSED_LOSS", "NPU_FT_LF_FUSED_KERNELS",
                 "NPU_FT_LF_CHECKPOINT_POLICY", "NPU_FT_LF_COUNTERS"):
        monkeypatch.delenv(name, raising=False)
    assert options_from_env() == PluginOptions() and not hook_enabled_from_env()
    env = {"NPU_FT_LLAMAFACTORY": "On", "NPU_FT_LF_FALLBACK": "yes", "NPU_FT_LF_FUSED_LOSS": "0",
           "NPU_FT_LF_FUSED_KERNELS": "off", "NPU_FT_LF_CHECKPOINT_POLICY": " Selective ",
           "NPU_FT_LF_COUNTERS": "/tmp/c.json"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    options = options_from_env()
    assert options == PluginOptions(fallback=True, fused_loss=False, fused_kernels=False,
                                    checkpoint_policy="selective", counters_path="/tmp/c.json")
    assert hook_enabled_from_env()
    # what lf-train hands its torchrun workers reads back as the same options
    for k, v in options_to_env(PluginOptions(fused_loss=False, checkpoint_policy="selective")).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("NPU_FT_LF_COUNTERS")
    assert options_from_env() == PluginOptions(fused_loss=False, checkpoint_policy="selective")
    monkeypatch.setenv("NPU_FT_LF_FUSED_KERNELS", options_to_env(PluginOptions(fused_kernels=False))[
        "NPU_FT_LF_FUSED_KERNELS"])
    assert options_from_env() == PluginOptions(fused_loss=False, fused_kernels=False, checkpoint_policy="selective")
    for name, value, msg in [
        ("NPU_FT_LF_CHECKPOINT_POLICY", "most", "NPU_FT_LF_CHECKPOINT_POLICY='most': expected one of full, selective"),
        ("NPU_FT_LF_FUSED_LOSS", "maybe", "NPU_FT_LF_FUSED_LOSS='maybe': expected one of 1, true"),
        ("NPU_FT_LF_FUSED_KERNELS", "x", "NPU_FT_LF_FUSED_KERNELS='x': expected one of 1, true"),
        ("NPU_FT_LF_FALLBACK", "2", "NPU_FT_LF_FALLBACK='2': expected one of 1, true"),
    ]:
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(NpuFtLlamaFactoryError, match=msg):
                options_from_env()
    monkeypatch.setenv("NPU_FT_LLAMAFACTORY", "sure")
    with pytest.raises(NpuFtLlamaFactoryError, match="NPU_FT_LLAMAFACTORY='sure'"):
        hook_enabled_from_env()


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(quantization_bit=8), "quantization_bit: 8 is not supported"),
        (dict(quantization_bit=4, quantization_type="fp4"), "quantization_type: fp4 is not supported"),
    ],
)
def test_unsupported_quantization(fake_lf, kw, msg):
    fake_lf("0.9.5")
    from npu_ft_llamafactory import NpuFtLlamaFactoryError, apply_npu_ft_to_llamafactory

    apply_npu_ft_to_llamafactory(fallback=False)
    with pytest.raises(NpuFtLlamaFactoryError, match=msg):
        _load(**kw)


def test_unsupported_model_type_error_and_fallback(fake_lf, monkeypatch):
    fake_lf("0.9.5")
    from npu_ft_llamafactory import NpuFtLlamaFactoryError, apply_npu_ft_to_llamafactory, lf_patch

    monkeypatch.setattr(lf_patch, "SUPPORTED_MODEL_TYPES", ("qwen3",))
    apply_npu_ft_to_llamafactory(fallback=False)
    with pytest.raises(NpuFtLlamaFactoryError, match=r"model type 'qwen2' is not supported.*NPU_FT_LF_FALLBACK=1"):
        _load()


def test_unsupported_model_type_fallback_runs_unpatched(fake_lf, monkeypatch):
    fake_lf("0.9.5")
    from npu_ft_llamafactory import apply_npu_ft_to_llamafactory, lf_patch, peft_patch

    monkeypatch.setattr(lf_patch, "SUPPORTED_MODEL_TYPES", ("qwen3",))
    apply_npu_ft_to_llamafactory(fallback=True)
    with pytest.warns(RuntimeWarning, match="UNPATCHED"):
        model, _ = _load()
    ids = torch.randint(0, 97, (1, 5))
    model(input_ids=ids)
    assert peft_patch.STATS["lora_linear"] == 0 and peft_patch.STATS["fallback: disabled"] > 0


def test_unsupported_version(fake_lf):
    fake_lf("0.9.4")
    from npu_ft_llamafactory import NpuFtLlamaFactoryError, apply_npu_ft_to_llamafactory, is_peft_patched

    with pytest.raises(NpuFtLlamaFactoryError, match=r"LLaMA-Factory 0\.9\.4 is not a supported version"):
        apply_npu_ft_to_llamafactory(fallback=False)
    assert not is_peft_patched()
    with pytest.warns(RuntimeWarning):
        assert apply_npu_ft_to_llamafactory(fallback=True)["patched"] is False


def test_import_hook_patches_on_import(fake_lf, tmp_path):
    fake_lf("0.9.5")
    from npu_ft_llamafactory import PluginOptions, hook, is_peft_patched, lf_patch

    pth = hook.install_pth(tmp_path)
    lines = pth.read_text().splitlines()
    # one guarded import line; no path entry (the plugin is importable because it is installed)
    assert len(lines) == 1 and lines[0].startswith("import os;") and "NPU_FT_LLAMAFACTORY" in lines[0]
    assert hook.uninstall_pth(tmp_path) == pth and not pth.exists()

    hook.install_import_hook(PluginOptions(checkpoint_policy="selective"))
    assert not is_peft_patched()
    import llamafactory.model.loader as loader  # the hook patches right after this import

    assert getattr(loader.init_adapter, "__npu_ft_patched__", False) and is_peft_patched()
    assert loader.__spec__.origin.endswith("loader.py")
    assert lf_patch.current_options() == PluginOptions(checkpoint_policy="selective")


@pytest.mark.parametrize("enable", ["1", "0"])
def test_import_hook_reads_the_environment(fake_lf, monkeypatch, enable):
    """Without options the hook reads NPU_FT_LLAMAFACTORY and NPU_FT_LF_* when LLaMA-Factory is imported."""
    fake_lf("0.9.5")
    from npu_ft_llamafactory import PluginOptions, hook, is_peft_patched, lf_patch

    monkeypatch.setenv("NPU_FT_LLAMAFACTORY", enable)
    monkeypatch.setenv("NPU_FT_LF_CHECKPOINT_POLICY", "selective")
    monkeypatch.setenv("NPU_FT_LF_FUSED_LOSS", "off")
    hook.install_import_hook()
    import llamafactory.model.loader as loader

    assert getattr(loader.init_adapter, "__npu_ft_patched__", False) is (enable == "1")
    assert is_peft_patched() is (enable == "1")
    if enable == "1":
        assert lf_patch.current_options() == PluginOptions(fused_loss=False, checkpoint_policy="selective")


def test_import_hook_bad_variable_is_one_line(fake_lf, monkeypatch):
    fake_lf("0.9.5")
    from npu_ft_llamafactory import hook, is_peft_patched

    monkeypatch.setenv("NPU_FT_LLAMAFACTORY", "1")
    monkeypatch.setenv("NPU_FT_LF_CHECKPOINT_POLICY", "most")
    hook.install_import_hook()
    with pytest.raises(SystemExit) as exc:
        import llamafactory.model.loader  # noqa: F401
    assert str(exc.value) == ("npu-ft LLaMA-Factory import hook: NPU_FT_LF_CHECKPOINT_POLICY='most': expected one "
                              "of full, selective")
    assert not is_peft_patched()


def test_pth_file_at_python_startup(tmp_path):
    """The .pth line in a real interpreter: the finder is active only with NPU_FT_LLAMAFACTORY set, and
    putting it there imports neither torch nor LLaMA-Factory."""
    import os
    import subprocess

    from npu_ft_llamafactory import hook

    hook.install_pth(tmp_path)
    plugin_dir = Path(hook.__file__).resolve().parents[1]
    code = ("import site, sys; site.addsitedir(sys.argv[1]); from npu_ft_llamafactory import hook; "
            "print(hook.hook_status()['active_in_this_process'], 'torch' in sys.modules)")
    base = {k: v for k, v in os.environ.items() if k != "NPU_FT_LLAMAFACTORY"}
    base["PYTHONPATH"] = os.pathsep.join([str(plugin_dir), base.get("PYTHONPATH", "")])
    outs = {}
    for value in (None, "1"):
        env = dict(base, **({"NPU_FT_LLAMAFACTORY": value} if value else {}))
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        outs[value] = proc.stdout.split()
    assert outs == {None: ["False", "False"], "1": ["True", "False"]}


def test_lf_train_without_llamafactory(capsys, monkeypatch):
    from importlib import metadata

    real = metadata.version

    def version(name):
        if name == "llamafactory":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    from npu_ft.cli import main

    assert main(["lf-train", "config.yaml"]) == 1  # an unavailable dependency is exit 1, as a missing device
    err = capsys.readouterr().err
    assert "LLaMA-Factory is not installed" in err and "pip install llamafactory==0.9.5" in err
    assert main(["lf-train", "--help"]) == 0


def test_lf_train_bad_variable(capsys, monkeypatch):
    from npu_ft.cli import main

    monkeypatch.setenv("NPU_FT_LF_FUSED_LOSS", "perhaps")
    assert main(["lf-train", "config.yaml"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("npu-ft lf-train: error: NPU_FT_LF_FUSED_LOSS='perhaps': expected one of 1, true, yes, on "
                   "(or 0, false, no, off)")
