"""Does a recipe fit a card? The estimator (:mod:`npu_ft.launch.estimate`) applied to a recipe.

* :data:`CARDS` / :func:`card` -- the cards users have (``910B3-64G``, ``910B4-32G``, ``A100-80G``,
  ``H100-80G``) or ``custom:<GiB>``, with the runtime overhead assumed on each;
* :func:`recipe_estimate` -- the per-card estimate of a recipe (its model folder's ``config.json``,
  method, DeepSpeed stage, micro-batch, cutoff, checkpointing policy, dtype, fused loss) and the
  assumptions behind it;
* :func:`choose_checkpoint_policy` -- what ``gradient_checkpointing_policy: auto`` runs;
* :func:`memory_warning` -- the line ``npu-ft train`` prints before loading a model that will not fit;
* :func:`check_before_loading` -- both, as ``npu-ft train`` runs them (one call in ``run_sft``).

Reading a recipe and estimating imports neither torch nor transformers (only the device's total
memory does, in :func:`device_total_bytes`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .estimate import (
    GIB,
    LINEAR_NAMES,
    MODELS,
    OPTIMS,
    USABLE_FRACTION,
    Estimate,
    ModelShape,
    adapted_linears,
    estimate,
)

__all__ = ["CARDS", "Card", "EstimateError", "card", "check_before_loading", "choose_checkpoint_policy",
           "device_total_bytes", "memory_warning", "model_shape", "recipe_estimate"]

logger = logging.getLogger("npu_ft.train")


class EstimateError(ValueError):
    """A recipe or card the estimator cannot work with; the message names the key or flag."""


@dataclasses.dataclass(frozen=True)
class Card:
    """One accelerator: its memory and the runtime overhead assumed on it."""

    name: str
    gib: float
    kind: str  # npu | cuda | cpu | custom
    overhead_gib: float
    note: str = ""

    @property
    def usable_bytes(self) -> float:
        return self.gib * GIB * USABLE_FRACTION


#: the runtime's share of a card the estimate assumes (not measured: check on the first run)
NPU_OVERHEAD_GIB = 3.0
CUDA_OVERHEAD_GIB = 1.5

CARDS: dict[str, Card] = {c.name: c for c in (
    Card("910B3-64G", 64, "npu", NPU_OVERHEAD_GIB, "Ascend 910B3, 64 GB HBM; CANN/HCCL workspaces assumed 3 GiB"),
    Card("910B4-32G", 32, "npu", NPU_OVERHEAD_GIB, "Ascend 910B4, 32 GB HBM; CANN/HCCL workspaces assumed 3 GiB"),
    Card("A100-80G", 80, "cuda", CUDA_OVERHEAD_GIB, "NVIDIA A100 80 GB; CUDA context, cuBLAS/NCCL assumed 1.5 GiB"),
    Card("H100-80G", 80, "cuda", CUDA_OVERHEAD_GIB, "NVIDIA H100 80 GB; CUDA context, cuBLAS/NCCL assumed 1.5 GiB"),
)}


def card(spec: str) -> Card:
    """A name of :data:`CARDS` (case-insensitive) or ``custom:<GiB>`` (NPU-like overhead assumed)."""
    for name, c in CARDS.items():
        if spec.lower() == name.lower():
            return c
    if spec.lower().startswith("custom:"):
        try:
            gib = float(spec.split(":", 1)[1])
        except ValueError:
            gib = -1.0
        if gib <= 0:
            raise EstimateError(f"--card {spec!r}: custom needs a positive size in GiB, e.g. custom:48")
        return Card(f"custom-{gib:g}G", gib, "custom", NPU_OVERHEAD_GIB,
                    f"{gib:g} GiB; runtime overhead assumed {NPU_OVERHEAD_GIB:g} GiB")
    raise EstimateError(f"--card {spec!r}: expected one of {', '.join(CARDS)} or custom:<GiB>")


def _shape_from_config_json(path: Path, name: str) -> ModelShape:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ModelShape.from_config(SimpleNamespace(**data), name)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise EstimateError(f"{path}: not a Qwen2/Qwen3 config.json the estimator can read ({exc})") from None


def model_shape(model: str) -> ModelShape:
    """The shape of ``model``: a folder with ``config.json``, or a Qwen name the estimator knows
    (``Qwen2.5-7B-Instruct``, ``models/Qwen3-8B``, ``qwen2.5-0.5b``)."""
    folder = Path(model)
    if (folder / "config.json").is_file():
        return _shape_from_config_json(folder / "config.json", folder.name)
    key = re.sub(r"-(instruct|base|chat)$", "", folder.name.lower())
    if key in MODELS:
        return MODELS[key]
    raise EstimateError(f"model_name_or_path {model!r}: no config.json there and not a model the estimator knows "
                        f"({', '.join(MODELS)})")


def _deepspeed(cfg: Any) -> tuple[int, bool, bool]:
    from .checks import load_deepspeed_config, zero_offload, zero_stage
    from .torchrun import LaunchError

    try:
        ds = load_deepspeed_config(cfg.get("deepspeed"), cfg.source)
        return (zero_stage(ds), *zero_offload(ds))
    except LaunchError as exc:
        raise EstimateError(str(exc)) from None


def _method_and_adapter(cfg: Any) -> tuple[str, str]:
    """(estimate's method, its adapter) of a recipe: VeRA is an adapter on a dense or NF4 base."""
    base = "qlora" if cfg.get("quantization_bit") == 4 else "lora"
    if cfg.method == "vera":
        return base, "vera"
    if cfg.method == "full":
        return "full", "lora"
    if cfg.get("use_dora"):
        return cfg.method, "dora"
    return cfg.method, "lora_fa" if cfg.get("lora_fa") else "lora"


def _adapter_words(adapter: str, rank: int) -> str:
    return {"lora": f"LoRA r={rank}: A and B train",
            "dora": f"DoRA r={rank}: A, B and one magnitude per output feature train; each adapted linear keeps "
                    "its output and weight norm for backward",
            "lora_fa": f"LoRA-FA r={rank}: B trains, A is frozen; the adapted linears keep x A^T, not x",
            "vera": f"VeRA r={rank}: two vectors per linear train over frozen projections shared by all layers; "
                    "the adapted linears keep x A^T, not x"}[adapter]


def _optimizer_words(optim: str) -> str:
    bits, paged = OPTIMS[optim]
    words = ("AdamW: 2 fp32 moments per trainable weight" if bits == 32 else
             "8-bit AdamW: 2 one-byte blockwise moments per trainable weight (fp32 ones for the embedding)")
    return words + ("; paged: the states in host memory, one tensor's on the card while it is updated"
                    if paged else "")


def recipe_estimate(cfg: Any, target: Card, world_size: int = 1, policy: str | None = None
                    ) -> tuple[Estimate, list[str], dict[str, Any]]:
    """The per-card estimate of recipe ``cfg`` (an :class:`~npu_ft.config.SftConfig`) on ``target``.

    ``policy``: the checkpointing policy to estimate (default: the recipe's; ``auto`` resolved by
    :func:`choose_checkpoint_policy`). Returns the estimate, the assumptions in words, and the
    keyword arguments given to :func:`~npu_ft.launch.estimate.estimate`.
    """
    shape = model_shape(str(cfg.model_name_or_path))
    zero, off_opt, off_param = _deepspeed(cfg)
    gc = bool(cfg.gradient_checkpointing_enabled)
    policy = policy or cfg.get("gradient_checkpointing_policy", "full")
    assumptions = []
    if policy == "auto":
        policy, why = choose_checkpoint_policy(cfg, target.gib * GIB, world_size, target)
        assumptions.append(f"gradient_checkpointing_policy auto -> {why}")
    half = bool(cfg.bf16 or cfg.fp16 or cfg.get("pure_bf16"))
    kwargs = dict(zero=zero, offload_optimizer=off_opt, offload_param=off_param, world_size=world_size,
                  batch=int(cfg.per_device_train_batch_size), seq=int(cfg.cutoff_len), gradient_checkpointing=gc,
                  lora_rank=int(cfg.lora_rank), dtype="bf16" if half else "fp32",
                  overhead_gib=target.overhead_gib if target.kind != "cpu" else 0.0,
                  fused_cross_entropy=bool(cfg.get("fused_cross_entropy", True)),
                  checkpoint_policy=policy if gc else "full",
                  # Liger-Kernel's RMSNorm / SwiGLU keep what npu-ft's fused ops keep (input + 1/rms; gate, up)
                  fused_kernels=bool(cfg.get("fused_kernels", True)) or bool(cfg.get("enable_liger_kernel", False)))
    method, adapter = _method_and_adapter(cfg)
    if method == "qlora" and zero == 3:
        raise EstimateError(f"{cfg.source}: a 4-bit base with DeepSpeed ZeRO-3 is not supported")
    kwargs["adapter"] = adapter
    if cfg.method != "full":
        targets = adapted_linears(cfg.lora_target)
        if not targets:
            raise EstimateError(f"{cfg.where('lora_target')}: key 'lora_target': names none of the decoder linears "
                                f"({', '.join(LINEAR_NAMES)}) the estimator counts")
        if targets != LINEAR_NAMES:
            kwargs["targets"] = targets
    if cfg.method == "vera":
        kwargs["lora_rank"] = int(cfg.vera_rank)
    optim = str(cfg.optim)
    if optim in OPTIMS:
        kwargs["optim"] = optim
    else:
        assumptions.append(f"optim {optim} estimated as AdamW (two fp32 moments per trainable weight)")
    est = estimate(shape, method, **kwargs)  # type: ignore[arg-type]
    tokens = kwargs["batch"] * kwargs["seq"]
    assumptions += [
        f"model {shape.name}: {shape.params / 1e9:.2f} B parameters, hidden {shape.hidden}, {shape.layers} layers, "
        f"vocabulary {shape.vocab}",
        f"{'bf16/fp16 (2 bytes)' if half else 'fp32 (4 bytes)'} weights and activations"
        + ("; full fine-tuning keeps fp32 trainable weights without DeepSpeed, as LLaMA-Factory" if cfg.method
           == "full" and half and not zero else ""),
        f"activations of one micro-batch of {kwargs['batch']} x cutoff_len {kwargs['seq']} = {tokens} tokens "
        "(every row as long as cutoff_len: the worst case of a batch)",
        f"checkpointing: {policy if gc else 'off'}",
        "loss: " + ("npu-ft's fused linear cross-entropy, one fp32 logits chunk" if kwargs["fused_cross_entropy"]
                    else "transformers' loss on the whole [tokens, vocab] logits"),
        "decoder blocks: " + ("fused RMSNorm / RoPE / SwiGLU ops (input + 1/rms per norm, gate and up kept)"
                              if kwargs["fused_kernels"] else "transformers' modules (silu(gate) kept too, "
                              "fp32 norm copies with 16-bit activations)"),
        _optimizer_words(kwargs.get("optim", "adamw_torch"))
        + (" + an fp32 master copy (DeepSpeed bf16)" if zero and half and cfg.method == "full" else "")
        + ("; optimizer states offloaded to the host" if off_opt else ""),
        _adapter_words(adapter, kwargs["lora_rank"]) if method != "full" else "full fine-tuning: every weight trains",
        f"DeepSpeed ZeRO-{zero} over {world_size} card(s)" if zero else f"no DeepSpeed; {world_size} card(s), "
        "memory per card does not fall with more cards",
        f"runtime overhead {kwargs['overhead_gib']:g} GiB per card ({target.note or target.name}), "
        f"usable {USABLE_FRACTION:.0%} of the card",
    ]
    if "targets" in kwargs:
        assumptions.append(f"adapters on {', '.join(kwargs['targets'])} of each decoder layer (lora_target); the "
                           "other linears are frozen and keep no input for backward")
    return est, assumptions, kwargs


def choose_checkpoint_policy(cfg: Any, device_bytes: float, world_size: int = 1,
                             target: Card | None = None) -> tuple[str, str]:
    """What ``gradient_checkpointing_policy: auto`` runs on a device of ``device_bytes``:
    ``selective`` (GEMM outputs kept, no recomputed GEMMs) when its estimate fits the usable share of
    the device (:data:`~npu_ft.launch.estimate.USABLE_FRACTION`), else ``full``. Returns the policy and
    a sentence saying why. ``target``: the card (default: an NPU-like card of that size)."""
    if not cfg.gradient_checkpointing_enabled:
        return "off", "gradient checkpointing is disabled (disable_gradient_checkpointing: true)"
    target = target or Card("device", device_bytes / GIB, "custom", NPU_OVERHEAD_GIB)
    usable = device_bytes * USABLE_FRACTION
    sel, _, _ = recipe_estimate(cfg, target, world_size, policy="selective")
    full, _, _ = recipe_estimate(cfg, target, world_size, policy="full")
    extra = (sel.activations - full.activations) / GIB
    if sel.total <= usable:
        return "selective", (f"selective: the estimate with the kept GEMM outputs (+{extra:.1f} GiB) is "
                             f"{sel.total_gib:.1f} GiB, within {usable / GIB:.1f} GiB usable")
    return "full", (f"full: selective would need {sel.total_gib:.1f} GiB (+{extra:.1f} GiB of kept GEMM outputs), "
                    f"more than {usable / GIB:.1f} GiB usable")


def device_total_bytes(backend: Any) -> int | None:
    """Total memory of the backend's current device (CPU: the machine's RAM); None when unknown."""
    return backend.total_memory_bytes()


def memory_warning(cfg: Any, backend: Any, world_size: int | None = None) -> str | None:
    """One line when the recipe's estimate exceeds the usable memory of the backend's device (None
    when it fits or cannot be estimated: no config.json, an unknown device total)."""
    total = device_total_bytes(backend)
    if not total:
        return None
    world = world_size or int(os.environ.get("WORLD_SIZE", "1") or 1)
    kind = backend.name
    target = Card(kind, total / GIB, kind, {"npu": NPU_OVERHEAD_GIB, "cuda": CUDA_OVERHEAD_GIB}.get(kind, 0.0))
    try:
        est, _, kwargs = recipe_estimate(cfg, target, world)
    except EstimateError:
        return None
    if est.total <= target.usable_bytes:
        return None
    return (f"memory estimate {est.total_gib:.1f} GiB per device (weights {est.weights / GIB:.1f}, activations "
            f"{est.activations / GIB:.1f}, optimizer {est.optimizer / GIB:.1f}, gradients {est.gradients / GIB:.1f}, "
            f"overhead {est.overhead / GIB:.1f}) exceeds the {target.usable_bytes / GIB:.1f} GiB usable of this "
            f"{kind} device ({total / GIB:.1f} GiB): lower per_device_train_batch_size "
            f"({kwargs['batch']}) or cutoff_len ({kwargs['seq']}), or use gradient checkpointing, QLoRA or "
            "DeepSpeed; `npu-ft estimate RECIPE` shows the breakdown")


def check_before_loading(cfg: Any, backend: Any) -> None:
    """Before ``npu-ft train`` loads the model: log a warning when the recipe's estimate exceeds the
    device's usable memory, and resolve ``gradient_checkpointing_policy: auto`` in ``cfg`` (to
    selective or full; an unknown device total gives full), logging the choice and why."""
    warning = memory_warning(cfg, backend)
    if warning is not None:
        logger.warning("%s", warning)
    if cfg.get("gradient_checkpointing_policy") == "auto":
        try:
            policy, why = choose_checkpoint_policy(cfg, device_total_bytes(backend) or 0)
        except EstimateError as exc:  # a recipe the estimator cannot read still trains, as LLaMA-Factory would
            policy, why = "full", f"full: the estimator cannot read this recipe ({exc})"
        cfg.gradient_checkpointing_policy = "full" if policy == "off" else policy
        logger.info("gradient_checkpointing_policy auto -> %s", why)
