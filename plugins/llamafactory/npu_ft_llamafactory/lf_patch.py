"""LLaMA-Factory integration: two function patches inside its model loader, plus the PEFT patch.

``apply_npu_ft_to_llamafactory()`` (idempotent):

1. checks that LLaMA-Factory is installed at a supported version (:data:`SUPPORTED_LF_VERSIONS`);
2. :func:`~.peft_patch.apply_npu_ft_to_peft` -- PEFT's LoRA Linear forward runs ``npu_ft::lora_linear``
   (DoRA layers: ``npu_ft::dora_linear``);
3. wraps ``llamafactory.model.patcher.configure_quantization``: for on-the-fly bitsandbytes 4-bit
   (``quantization_bit: 4``, ``quantization_method: bnb``) no ``BitsAndBytesConfig`` is made, so the
   model loads in its compute dtype and bitsandbytes is never needed; the settings are remembered;
4. wraps ``llamafactory.model.loader.init_adapter``: checks the model type, marks the model as
   quantized for LLaMA-Factory's own guards (``quantization_method``: only LoRA/OFT, no PiSSA), lets
   LLaMA-Factory build the PEFT model as usual, then replaces the base linears by npu-ft NF4 layers
   (:func:`~.qlora.quantize_base_layers`; double quantization as configured) and converts any
   bitsandbytes ``Linear4bit`` of a pre-quantized checkpoint (:func:`~.qlora.convert_bnb_4bit_layers`);
   for training, it also switches on npu-ft's fused linear cross-entropy on the model inside PEFT
   (:func:`npu_ft.modules.fused_loss.enable_fused_cross_entropy`: the same loss without the
   ``[tokens, vocab]`` logits) unless ``fused_loss=False`` or a LLaMA-Factory option needs the
   training logits (:data:`LOGIT_OPTIONS`, Liger kernels), and npu-ft's fused decoder-block ops
   (:func:`npu_ft.modules.fused_blocks.apply_fused_kernels`: RMSNorm with the residual add, RoPE,
   SwiGLU) unless ``fused_kernels=False`` or ``enable_liger_kernel`` (LLaMA-Factory applies Liger);
5. wraps ``llamafactory.model.model_utils.checkpointing._gradient_checkpointing_enable`` so that
   ``checkpoint_policy="selective"`` checkpoints with npu-ft's selective policy
   (:mod:`npu_ft.modules.checkpointing`: GEMM outputs kept, not recomputed); ``full``:
   LLaMA-Factory's own checkpointing, unchanged.

The wrappers read the options of the latest ``apply_npu_ft_to_llamafactory`` call (a
:class:`~.options.PluginOptions` kept in this module), never the environment.

Nothing else of LLaMA-Factory changes: its arguments, data, Trainer, callbacks and adapter saving
(PEFT ``adapter_model.safetensors`` + ``adapter_config.json``) are its own.

What cannot be patched (LLaMA-Factory missing or at another version, a model type outside
:data:`SUPPORTED_MODEL_TYPES`, ``quantization_bit: 8``, ``quantization_type: fp4``, 4-bit with DeepSpeed
ZeRO-3 / FSDP) raises :class:`NpuFtLlamaFactoryError` -- unless the user asked for the fallback
(``fallback=True``; ``npu-ft lf-train --allow-unpatched`` or ``NPU_FT_LF_FALLBACK=1``): then a
warning says so and LLaMA-Factory runs unpatched.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import sys
import warnings

import torch

from . import peft_patch, qlora
from .options import ENV_FALLBACK, NpuFtLlamaFactoryError, PluginOptions

__all__ = [
    "LOGIT_OPTIONS",
    "NpuFtLlamaFactoryError",
    "SUPPORTED_LF_VERSIONS",
    "SUPPORTED_MODEL_TYPES",
    "apply_npu_ft_to_llamafactory",
    "check_llamafactory",
    "counters",
    "current_options",
    "startup_line",
    "write_counters",
]

logger = logging.getLogger("npu_ft_llamafactory")

#: LLaMA-Factory versions whose loader this plugin was tested against
SUPPORTED_LF_VERSIONS = ("0.9.5",)
#: ``config.model_type`` values the plugin patches (the Qwen families npu-ft is built and tested for)
SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3")

#: LLaMA-Factory finetuning options whose loss or metrics read the training logits: no fused loss
LOGIT_OPTIONS = ("use_asft_loss", "use_dft_loss", "use_eaft_loss", "compute_accuracy")

_STATE = {"applied": False, "options": PluginOptions(), "unpatched_reason": None, "quantized": 0, "converted": 0,
          "model_type": None, "counters_hook": False, "fused_cross_entropy": None, "fused_kernels": None,
          "checkpoint_policy": None}


def current_options() -> PluginOptions:
    """The options of the latest :func:`apply_npu_ft_to_llamafactory` call (the defaults before any)."""
    return _STATE["options"]


def _unpatchable(reason: str) -> None:
    """Raise, or (fallback option) switch the plugin off for this process and warn."""
    if not current_options().fallback:
        raise NpuFtLlamaFactoryError(
            f"npu-ft LLaMA-Factory plugin: {reason}. Nothing was patched. To run LLaMA-Factory unpatched "
            f"anyway, pass --allow-unpatched to `npu-ft lf-train` (or set {ENV_FALLBACK}=1; from Python: "
            "apply_npu_ft_to_llamafactory(fallback=True))."
        )
    _STATE["unpatched_reason"] = reason
    peft_patch.set_enabled(False)
    msg = f"npu-ft LLaMA-Factory plugin: {reason}; running LLaMA-Factory UNPATCHED (fallback requested)"
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    print(msg, file=sys.stderr)


def check_llamafactory() -> str:
    """The installed LLaMA-Factory version; raises :class:`NpuFtLlamaFactoryError` if missing."""
    from importlib import metadata

    try:
        return metadata.version("llamafactory")
    except metadata.PackageNotFoundError:
        raise NpuFtLlamaFactoryError(
            "npu-ft LLaMA-Factory plugin: LLaMA-Factory is not installed in this Python "
            f"({sys.executable}); install it with: pip install llamafactory=={SUPPORTED_LF_VERSIONS[-1]} "
            "(see docs/llamafactory.md)"
        ) from None


def version_supported(version: str) -> bool:
    return version in SUPPORTED_LF_VERSIONS


# --------------------------------------------------------------------------------------------------
# the two LLaMA-Factory function patches
# --------------------------------------------------------------------------------------------------

def _is_bnb(method) -> bool:
    return str(getattr(method, "value", method)).lower() in ("bnb", "bitsandbytes")


def _wrap_configure_quantization(original):
    @functools.wraps(original)
    def configure_quantization(config, tokenizer, model_args, is_trainable, init_kwargs):
        on_the_fly = (not getattr(config, "quantization_config", None)
                      and getattr(model_args, "export_quantization_bit", None) is None
                      and getattr(model_args, "quantization_bit", None) is not None
                      and _is_bnb(getattr(model_args, "quantization_method", "bnb")))
        if not (peft_patch.is_enabled() and on_the_fly):
            return original(config, tokenizer, model_args, is_trainable, init_kwargs)
        bits = model_args.quantization_bit
        qtype = str(getattr(model_args, "quantization_type", "nf4"))
        reason = None
        if bits != 4:
            reason = f"quantization_bit: {bits} is not supported (npu-ft replaces bitsandbytes 4-bit NF4 only)"
        elif qtype != "nf4":
            reason = f"quantization_type: {qtype} is not supported (npu-ft's 4-bit layers are NF4 only)"
        elif _zero3_or_fsdp():
            reason = "4-bit quantization with DeepSpeed ZeRO-3 / FSDP is not supported by npu-ft's NF4 layers"
        if reason:
            _unpatchable(reason)
            return original(config, tokenizer, model_args, is_trainable, init_kwargs)
        model_args.npu_ft_nf4 = {"double_quant": bool(getattr(model_args, "double_quantization", True)),
                                 "compute_dtype": getattr(model_args, "compute_dtype", None)}
        print("[npu-ft] quantization_bit: 4 -> npu-ft NF4 layers (bitsandbytes format, double quantization "
              f"{'on' if model_args.npu_ft_nf4['double_quant'] else 'off'}); bitsandbytes is not used",
              file=sys.stderr)

    configure_quantization.__npu_ft_patched__ = True
    return configure_quantization


def _zero3_or_fsdp() -> bool:
    """Whether this run shards parameters (DeepSpeed ZeRO-3, or FSDP as accelerate's launcher sets it)."""
    from accelerate.utils import parse_flag_from_env

    try:
        from transformers.integrations import is_deepspeed_zero3_enabled

        zero3 = is_deepspeed_zero3_enabled()
    except Exception:  # noqa: BLE001 - no DeepSpeed integration: no ZeRO-3
        zero3 = False
    return zero3 or parse_flag_from_env("ACCELERATE_USE_FSDP")


def _quantize_device():
    """Where to quantize: the accelerator npu-ft would train on (packed codes stay there), else None."""
    try:
        from npu_ft.device import select_device

        backend, device = select_device()
        return None if device.type == "cpu" else device
    except Exception:  # noqa: BLE001 - quantize where the weights are
        return None


def _fused_loss_blocker(model_args, finetuning_args) -> str | None:
    """Why LLaMA-Factory's run must keep transformers' loss (None: the fused loss may be used)."""
    if not current_options().fused_loss:
        return "fused_loss=False"
    if getattr(model_args, "enable_liger_kernel", False):
        return "enable_liger_kernel (Liger's own fused loss)"
    for name in LOGIT_OPTIONS:
        if getattr(finetuning_args, name, False):
            return f"{name} reads the training logits"
    return None


def _enable_fused_loss(model, model_args, finetuning_args) -> bool:
    """Switch on npu-ft's fused linear cross-entropy on the causal LM inside LLaMA-Factory's
    (PEFT) model; logs and returns whether it is on."""
    reason = _fused_loss_blocker(model_args, finetuning_args)
    if reason is not None:
        logger.info("npu-ft fused cross-entropy off: %s", reason)
        return False
    from npu_ft.modules.fused_loss import enable_fused_cross_entropy

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return enable_fused_cross_entropy(inner)


def _apply_fused_kernels(model, model_args) -> dict[str, int]:
    """npu-ft's fused decoder-block ops on the causal LM inside LLaMA-Factory's (PEFT) model;
    returns the patched modules per kind (``{}``: not applied)."""
    if not current_options().fused_kernels:
        logger.info("npu-ft fused decoder-block ops off: fused_kernels=False")
        return {}
    if getattr(model_args, "enable_liger_kernel", False):
        logger.info("npu-ft fused decoder-block ops off: enable_liger_kernel (LLaMA-Factory applies Liger's)")
        return {}
    from npu_ft.modules.fused_blocks import apply_fused_kernels, fused_kernels_applied

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    kinds = apply_fused_kernels(inner)
    if kinds:
        print(f"[npu-ft] fused decoder-block ops: {', '.join(kinds)}", file=sys.stderr)
    return fused_kernels_applied(inner)


def _wrap_init_adapter(original):
    @functools.wraps(original)
    def init_adapter(config, model, model_args, finetuning_args, is_trainable):
        if peft_patch.is_enabled():
            model_type = getattr(config, "model_type", None)
            _STATE["model_type"] = model_type
            if model_type not in SUPPORTED_MODEL_TYPES:
                _unpatchable(f"model type {model_type!r} is not supported (supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)})")
        nf4 = getattr(model_args, "npu_ft_nf4", None)
        if nf4 is not None and not peft_patch.is_enabled():
            # a fallback was triggered after configure_quantization: the model is dense, say so loudly
            raise NpuFtLlamaFactoryError("npu-ft LLaMA-Factory plugin: the model was loaded for npu-ft NF4 but the "
                                         "plugin was switched off afterwards; cannot quantize it with bitsandbytes now")
        if nf4 is not None:
            model.quantization_method = "bnb"  # LLaMA-Factory's guards for quantized models apply as with bnb
        model = original(config, model, model_args, finetuning_args, is_trainable)
        if nf4 is not None:
            names = qlora.quantize_base_layers(model, double_quant=nf4["double_quant"],
                                               compute_dtype=nf4["compute_dtype"], device=_quantize_device())
            _STATE["quantized"] += len(names)
            peft_patch.STATS["nf4_layers"] += len(names)
            print(f"[npu-ft] quantized {len(names)} linear layers to NF4", file=sys.stderr)
        if peft_patch.is_enabled():
            converted = qlora.convert_bnb_4bit_layers(model)
            _STATE["converted"] += len(converted)
            if converted:
                print(f"[npu-ft] converted {len(converted)} bitsandbytes Linear4bit layers to npu-ft NF4",
                      file=sys.stderr)
            if is_trainable:
                _STATE["fused_cross_entropy"] = _enable_fused_loss(model, model_args, finetuning_args)
                _STATE["fused_kernels"] = _apply_fused_kernels(model, model_args)
        return model

    init_adapter.__npu_ft_patched__ = True
    return init_adapter


def _wrap_gradient_checkpointing_enable(original):
    @functools.wraps(original)
    def _gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, use_unsloth_gc=False):
        policy = current_options().checkpoint_policy
        if policy != "full" and peft_patch.is_enabled():
            if use_unsloth_gc:
                raise NpuFtLlamaFactoryError(f"npu-ft LLaMA-Factory plugin: checkpoint_policy={policy!r} cannot be "
                                             "combined with use_unsloth_gc")
            from npu_ft.modules.checkpointing import checkpointing_kwargs

            gradient_checkpointing_kwargs = checkpointing_kwargs(policy)
            print(f"[npu-ft] gradient checkpointing: {policy} policy", file=sys.stderr)
        else:
            policy = "full"
        _STATE["checkpoint_policy"] = policy
        return original(self, gradient_checkpointing_kwargs, use_unsloth_gc)

    _gradient_checkpointing_enable.__npu_ft_patched__ = True
    return _gradient_checkpointing_enable


def _patch_checkpointing() -> None:
    """Install :func:`_wrap_gradient_checkpointing_enable` (LLaMA-Factory looks the function up in its
    module when it prepares the model, so replacing the module attribute is enough)."""
    try:
        from llamafactory.model.model_utils import checkpointing
    except ImportError as exc:
        if current_options().checkpoint_policy != "full":
            _unpatchable(f"checkpoint_policy={current_options().checkpoint_policy!r} needs LLaMA-Factory's "
                         f"checkpointing module, which is missing ({exc})")
        return
    current = checkpointing._gradient_checkpointing_enable
    if not getattr(current, "__npu_ft_patched__", False):
        checkpointing._gradient_checkpointing_enable = _wrap_gradient_checkpointing_enable(current)


# --------------------------------------------------------------------------------------------------


def apply_npu_ft_to_llamafactory(fallback: bool = False, fused_loss: bool = True, fused_kernels: bool = True,
                                 checkpoint_policy: str = "full",
                                 counters_path: str | os.PathLike | None = None) -> dict:
    """Patch LLaMA-Factory (see the module docstring). Returns what was done.

    Options (see :class:`~.options.PluginOptions`; a bad value raises :class:`NpuFtLlamaFactoryError`
    naming the argument): ``fallback`` runs LLaMA-Factory unpatched, with a warning, where it cannot be
    patched (else :class:`NpuFtLlamaFactoryError`); ``fused_loss``: npu-ft's fused linear
    cross-entropy for training; ``fused_kernels``: npu-ft's fused RMSNorm / RoPE / SwiGLU in the
    trained model's decoder blocks; ``checkpoint_policy``: ``full`` or ``selective``; ``counters_path``:
    write :func:`counters` there at exit. Idempotent; calling it again replaces the options.
    """
    options = PluginOptions(fallback=fallback, fused_loss=fused_loss, fused_kernels=fused_kernels,
                            checkpoint_policy=checkpoint_policy, counters_path=counters_path)
    _STATE["options"] = options
    version = check_llamafactory()
    if not version_supported(version):
        _unpatchable(
            f"LLaMA-Factory {version} is not a supported version (supported: {', '.join(SUPPORTED_LF_VERSIONS)})"
        )
        return {"patched": False, "llamafactory": version, "reason": _STATE["unpatched_reason"]}
    _install_counters_hook()
    if _STATE["applied"]:
        return {"patched": True, "llamafactory": version}
    classes = peft_patch.apply_npu_ft_to_peft()
    from llamafactory.model import loader, patcher

    # (an import hook installed in this process may have applied its own options meanwhile: ours win)
    _STATE["options"] = options
    if not getattr(patcher.configure_quantization, "__npu_ft_patched__", False):
        patcher.configure_quantization = _wrap_configure_quantization(patcher.configure_quantization)
    if not getattr(loader.init_adapter, "__npu_ft_patched__", False):
        loader.init_adapter = _wrap_init_adapter(loader.init_adapter)
    _patch_checkpointing()
    _STATE["applied"] = True
    return {"patched": True, "llamafactory": version, "peft_classes": classes}


def startup_line(info: dict) -> str:
    """The one line a patched process prints at start (``npu-ft lf-train`` and the import hook)."""
    return (f"[npu-ft] LLaMA-Factory {info['llamafactory']} patched: PEFT LoRA / DoRA -> npu_ft::lora_linear / "
            "dora_linear, bitsandbytes 4-bit -> npu-ft NF4")


def counters() -> dict:
    """npu-ft op kernel calls + plugin counters (what ran where), JSON-ready."""
    from npu_ft.modules.fused_loss import CALLS as fused_loss_calls
    from npu_ft.ops import kernel_calls

    ops = ("lora_linear", "nf4_linear", "dora_linear", "dora_nf4_linear", "rms_norm", "rope", "swiglu")
    return {
        "kernel_calls": {name: kernel_calls(name) for op in ops for name in (op, f"{op}_backward")},
        "plugin": dict(peft_patch.STATS),
        "patched": bool(_STATE["applied"]) and peft_patch.is_enabled(),
        "unpatched_reason": _STATE["unpatched_reason"],
        "model_type": _STATE["model_type"],
        "nf4_layers": _STATE["quantized"],
        "bnb_layers_converted": _STATE["converted"],
        "fused_cross_entropy": _STATE["fused_cross_entropy"],
        "fused_loss_calls": dict(fused_loss_calls),
        "fused_kernels": _STATE["fused_kernels"],
        "checkpoint_policy": _STATE["checkpoint_policy"],
        "torch": torch.__version__,
    }


def write_counters(path: str | os.PathLike | None = None) -> str | None:
    """Write :func:`counters` as JSON to ``path`` (default: the ``counters_path`` option), with
    ``.rank<N>`` appended on ranks other than 0; returns the path written (None: no path)."""
    path = os.fspath(path) if path is not None else current_options().counters_path
    if not path:
        return None
    rank = os.environ.get("RANK")
    if rank not in (None, "", "0"):
        path = f"{path}.rank{rank}"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(counters(), f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


def _install_counters_hook() -> None:
    """Write :func:`counters` to the ``counters_path`` option when the process exits (if set then)."""
    if not _STATE["counters_hook"] and current_options().counters_path:
        atexit.register(write_counters)
        _STATE["counters_hook"] = True
