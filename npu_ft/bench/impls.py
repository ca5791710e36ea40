"""The implementations a case can run: how the model is adapted for a method.

* ``npu-ft``: npu-ft's own modules (``LoraLinear`` on ``npu_ft::lora_linear``, ``Nf4Linear`` on the
  NF4 ops) injected with ``npu_ft.modules.inject``, the fused decoder-block ops (RMSNorm, RoPE,
  SwiGLU; ``case.fused_kernels``) and the loss from the chunked fused linear cross-entropy
  (``npu_ft.modules.fused_loss``: the model's forward is patched, no full logits), as ``run_sft``
  trains by default.
* ``reference``: what LLaMA-Factory runs: transformers + PEFT (transformers' own loss on the full
  logits), and for QLoRA bitsandbytes 4-bit loading (``BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=<dtype>)``
  through ``from_pretrained``).
* ``custom:<module>:<function>``: any ``function(case, base_model_factory, device) -> Prepared``,
  to benchmark an implementation that lives outside npu-ft (or, in tests, one that crashes).

Both built-in implementations start from the same random weights (same seed) and then get the same
LoRA weights (:func:`align_lora_init`), so their loss curves must agree to the parity tolerance.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: module names LoRA targets when a suite says ``targets: all`` (every linear of a Qwen block)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass
class Prepared:
    """A model ready for the training loop."""

    model: nn.Module
    #: loss_fn(model, inputs) -> scalar loss (inputs: input_ids, labels, attention_mask, position_ids);
    #: None = ``model(**inputs).loss``
    loss_fn: Callable | None = None
    #: what this implementation used, for the report (e.g. "npu_ft::lora_linear")
    features: list[str] = dataclasses.field(default_factory=list)
    cleanup: Callable[[], None] | None = None


def lora_targets(case) -> list[str]:
    t = case.lora.get("targets", "all")
    if t == "all" or t == ["all"]:
        return list(ALL_LINEAR)
    if isinstance(t, str):
        return [s.strip() for s in t.split(",") if s.strip()]
    return list(t)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def apply_block_kernels(case, model: nn.Module) -> list[str]:
    """npu-ft's fused decoder-block ops (:func:`npu_ft.modules.fused_blocks.apply_fused_kernels`) when
    ``case.fused_kernels`` (the default, as ``npu-ft train``); call it before checkpointing is enabled,
    as run_sft does. Returns the features to report: ``["fused_blocks"]`` when something was patched."""
    if not getattr(case, "fused_kernels", True):
        return []
    from npu_ft.modules.fused_blocks import apply_fused_kernels

    return ["fused_blocks"] if apply_fused_kernels(model) else []


def _enable_gradient_checkpointing(model: nn.Module, policy: str = "full") -> None:
    """Non-reentrant checkpointing of every decoder layer on both sides; npu-ft may use its
    ``selective`` policy (:mod:`npu_ft.modules.checkpointing`), the reference always runs "full"."""
    from npu_ft.modules.checkpointing import enable_gradient_checkpointing

    enable_gradient_checkpointing(model, policy, use_reentrant=False)


# --------------------------------------------------------------------------------------------------
# LoRA init alignment: both implementations get identical LoRA weights, whatever RNG they consumed
# --------------------------------------------------------------------------------------------------

_LORA_PARAM = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<which>lora_A|lora_B)(?:\.default)?(?:\.weight)?$"
)


def lora_parameters(model: nn.Module) -> dict[tuple[str, str], nn.Parameter]:
    """{(target module path, "lora_A"|"lora_B"): parameter} for PEFT and npu-ft naming alike."""
    out = {}
    for name, p in model.named_parameters():
        m = _LORA_PARAM.match(name)
        if m:
            module = m.group("module").replace(".base_layer", "")
            out[(module, m.group("which"))] = p
    return out


def _name_seed(seed: int, name: str) -> int:
    h = seed * 1000003
    for ch in name.encode():
        h = (h * 131 + ch) % (2**61 - 1)
    return h


@torch.no_grad()
def align_lora_init(model: nn.Module, seed: int) -> int:
    """Set every LoRA A to PEFT's default init (kaiming-uniform, a=√5) drawn from a generator
    seeded by (seed, module path), and B to zeros. Returns the number of adapted modules."""
    params = lora_parameters(model)
    count = 0
    for (module, which), p in params.items():
        if which == "lora_A":
            g = torch.Generator().manual_seed(_name_seed(seed, module))
            fan_in = p.shape[1]
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), +)
            vals = torch.rand(p.shape, generator=g, dtype=torch.float32) * (2 * bound) - bound
            p.copy_(vals.to(p.dtype))
            count += 1
        else:
            p.zero_()
    return count


# --------------------------------------------------------------------------------------------------
# reference: transformers + PEFT (+ bitsandbytes)
# --------------------------------------------------------------------------------------------------


def _peft_lora(model, case):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=case.lora["r"],
        lora_alpha=case.lora["alpha"],
        lora_dropout=float(case.lora["dropout"]),
        target_modules=lora_targets(case),
        use_rslora=bool(case.lora.get("use_rslora", False)),
        modules_to_save=case.lora.get("additional_target") or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def build_reference(case, base_model_factory, device: torch.device) -> Prepared:
    dtype = torch_dtype(case.dtype)
    cleanup = None
    features = ["transformers"] + (["peft"] if case.method in ("lora", "qlora") else [])
    if case.method == "qlora":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from .shapes import ATTN_IMPLEMENTATION

        # Quantize the way LLaMA-Factory does: from_pretrained with a BitsAndBytesConfig. The random
        # model is saved once to a temporary folder so that the same weights are quantized.
        tmp = tempfile.mkdtemp(prefix="npu_ft_bench_")
        cleanup = lambda: shutil.rmtree(tmp, ignore_errors=True)  # noqa: E731
        base = base_model_factory()
        base.save_pretrained(tmp)
        del base
        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        model = AutoModelForCausalLM.from_pretrained(
            tmp,
            quantization_config=bnb,
            dtype=dtype,
            device_map={"": str(device)},
            attn_implementation=ATTN_IMPLEMENTATION,
        )
        model.config.use_cache = False
        features.append("bitsandbytes-4bit")
    else:
        model = base_model_factory().to(device)
    if case.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    if case.method in ("lora", "qlora"):
        model = _peft_lora(model, case)
        align_lora_init(model, case.seed)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return Prepared(model=model, features=features, cleanup=cleanup)


# --------------------------------------------------------------------------------------------------
# npu-ft
# --------------------------------------------------------------------------------------------------


def _call_with_supported(fn, *args, **kwargs):
    """Call ``fn`` with the keyword arguments its signature accepts (the inject API is young)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return fn(*args, **kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(*args, **kwargs)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params})


def _npu_ft_features(model: nn.Module) -> list[str]:
    kinds = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("npu_ft.")})
    return kinds


def build_npu_ft(case, base_model_factory, device: torch.device) -> Prepared:
    model = base_model_factory()
    lora_kwargs = dict(
        targets=lora_targets(case),
        target_modules=lora_targets(case),
        r=case.lora["r"],
        alpha=case.lora["alpha"],
        lora_alpha=case.lora["alpha"],
        dropout=float(case.lora["dropout"]),
        lora_dropout=float(case.lora["dropout"]),
        use_rslora=bool(case.lora.get("use_rslora", False)),
        additional_target=case.lora.get("additional_target") or None,
    )
    if case.method == "lora":
        from npu_ft.modules.inject import apply_lora

        out = _call_with_supported(apply_lora, model, **lora_kwargs)
        model = out if isinstance(out, nn.Module) else model
    elif case.method == "qlora":
        from npu_ft.modules.inject import apply_qlora

        out = _call_with_supported(apply_qlora, model, compute_dtype=torch_dtype(case.dtype), **lora_kwargs)
        model = out if isinstance(out, nn.Module) else model
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model = model.to(device)
    block_features = apply_block_kernels(case, model)
    if case.gradient_checkpointing:
        _enable_gradient_checkpointing(model, case.checkpoint_policy)
    if case.method in ("lora", "qlora"):
        n = align_lora_init(model, case.seed)
        if n == 0:
            raise RuntimeError("npu-ft: no LoRA parameters found after injection (expected names with lora_A/lora_B)")
    features = (_npu_ft_features(model) or ["transformers"]) + block_features
    if case.gradient_checkpointing and case.checkpoint_policy != "full":
        features.append(f"{case.checkpoint_policy}_checkpointing")
    # npu-ft's training path computes the loss with the fused linear cross-entropy (run_sft's
    # fused_cross_entropy default): model(input_ids, labels).loss goes through the patched forward
    from npu_ft.modules.fused_loss import enable_fused_cross_entropy

    if enable_fused_cross_entropy(model):
        features.append("fused_cross_entropy")
    return Prepared(model=model, features=features)


# --------------------------------------------------------------------------------------------------


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as stored elements × 2."""
    trainable = total = 0
    seen = set()
    for p in model.parameters():
        key = (p.data_ptr(), p.numel())
        if key in seen:
            continue
        seen.add(key)
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)
        total += n
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def _tensors_of(obj: Any):
    """Tensors held by a bitsandbytes QuantState (absmax, code, nested state) or similar."""
    if obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    for v in vars(obj).values() if hasattr(obj, "__dict__") else ():
        if isinstance(v, torch.Tensor):
            yield v
        elif hasattr(v, "absmax"):  # nested QuantState
            yield from _tensors_of(v)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter, buffer and quantization state (each storage counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if t.device.type == "meta":
            return
        key = (t.data_ptr(), t.numel() * t.element_size())
        if key in seen:
            return
        seen.add(key)
        total += t.numel() * t.element_size()

    for p in model.parameters():
        add(p)
        qs = getattr(p, "quant_state", None)
        for t in _tensors_of(qs):
            add(t)
    for b in model.buffers():
        add(b)
    # npu-ft keeps its NF4 state on the module; it is covered by buffers(), and anything else with
    # a tensor attribute that is neither is counted here
    for m in model.modules():
        for name, v in vars(m).items():
            if name.startswith("_") or not hasattr(v, "absmax"):
                continue
            for t in _tensors_of(v):
                add(t)
    return total
