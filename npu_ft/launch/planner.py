"""``npu-ft plan MODEL --method METHOD [--optim OPTIM] --card CARD --seq-len N``: the settings the
estimator says fit the card with the most tokens per step, written out as a recipe.

``METHOD`` is one of :data:`METHODS`, named as the bench names them (:func:`npu_ft.bench.suite.method_name`):
full, lora, qlora, and the LoRA family on a dense or NF4 base (dora / qdora, lora_fa / qlora_fa,
vera / qvera, pissa). ``OPTIM`` is one of :data:`~npu_ft.launch.estimate.OPTIMS` (AdamW, 8-bit AdamW,
paged variants). Each is estimated as itself (:func:`~npu_ft.launch.estimate.estimate`'s ``adapter``
and ``optim``) and written with the recipe keys that train it.

Searched (:func:`plan`): micro-batch 1, 2, 4, ... 64; checkpointing off, selective, full; DeepSpeed
in this order, the first under which anything fits (:data:`~npu_ft.launch.estimate.USABLE_FRACTION`
of the card): none, ZeRO-2, ZeRO-3, ZeRO-3 with offload for full fine-tuning; none, ZeRO-3, ZeRO-3
with offload for the adapters on a dense base; none on an NF4 base (ZeRO-3 cannot shard NF4 weights).
An 8-bit optimizer is not combined with DeepSpeed's offload (which steps its own CPU Adam), a paged
one with no DeepSpeed at all (paging is its own offload). Under the first stage that fits, the most
tokens per micro-batch win, then the faster checkpointing (off, then selective, then full). The
fused linear cross-entropy and the fused decoder-block ops (``fused_kernels``) are always on.
Gradient accumulation brings each optimizer step to ``--sequences-per-step`` sequences per card.

Exit codes: 0 (planned), 1 (nothing fits, or a model/card the estimator cannot read), 2 (usage).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path

__all__ = ["METHODS", "Plan", "plan", "plan_main", "render_plan", "zero_choices"]

MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
#: fastest first
POLICY_ORDER = ("off", "selective", "full")
#: ``--method``: the bench's method name -> (estimate's method, its adapter); PiSSA trains and keeps
#: what LoRA does (only its initialisation differs); PiSSA on an NF4 base is refused by npu-ft train
METHODS = {"full": ("full", "lora"), "lora": ("lora", "lora"), "qlora": ("qlora", "lora"),
           "dora": ("lora", "dora"), "qdora": ("qlora", "dora"), "lora_fa": ("lora", "lora_fa"),
           "qlora_fa": ("qlora", "lora_fa"), "vera": ("lora", "vera"), "qvera": ("qlora", "vera"),
           "pissa": ("lora", "lora")}
LORA_RANK = 16
VERA_RANK = 256
#: (name, stage, offload) per base method, preferred first
ZERO_CHOICES = {
    "lora": ((None, 0, False), ("z3", 3, False), ("z3_offload", 3, True)),
    "qlora": ((None, 0, False),),
    "full": ((None, 0, False), ("z2", 2, False), ("z3", 3, False), ("z3_offload", 3, True)),
}
_HEADER = "# Planned by `npu-ft plan`"
#: the DeepSpeed configs shipped in recipes/deepspeed/ (paths relative to the working directory)
DS_CONFIGS = {"z2": "recipes/deepspeed/ds_z2_config.json", "z3": "recipes/deepspeed/ds_z3_config.json",
              "z3_offload": "recipes/deepspeed/ds_z3_offload_config.json"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """One setting and its estimate."""

    model: str
    method: str  # a key of METHODS
    card: str
    seq_len: int
    micro_batch: int
    accumulation: int
    policy: str
    zero: str | None
    world_size: int
    total_gib: float
    usable_gib: float
    optim: str = "adamw_torch"

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch * self.seq_len


def zero_choices(method: str, optim: str = "adamw_torch") -> tuple[tuple[str | None, int, bool], ...]:
    """The DeepSpeed settings searched for ``method`` (a key of :data:`METHODS`) with ``optim``,
    preferred first (see the module doc)."""
    from .estimate import OPTIMS

    choices = ZERO_CHOICES[METHODS[method][0]]
    bits, paged = OPTIMS[optim]
    if paged:
        return choices[:1]
    return tuple(c for c in choices if not c[2]) if bits == 8 else choices


def plan(model: str, method: str, card_spec: str, seq_len: int, world_size: int = 1,
         sequences_per_step: int = 16, dtype: str = "bf16", optim: str = "adamw_torch") -> tuple[Plan | None, str]:
    """The best fitting :class:`Plan` (None when nothing fits) and a sentence on the search.

    ``method``: a key of :data:`METHODS`; ``optim``: a key of :data:`~npu_ft.launch.estimate.OPTIMS`."""
    from .budget import card, model_shape
    from .estimate import GIB, OPTIMS, estimate

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if optim not in OPTIMS:
        raise ValueError(f"optim must be one of {', '.join(OPTIMS)}, got {optim!r}")
    base, adapter = METHODS[method]
    rank = VERA_RANK if adapter == "vera" else LORA_RANK
    shape, target = model_shape(model), card(card_spec)
    choices = zero_choices(method, optim)
    best: tuple | None = None
    smallest = None
    for (zero, stage, offload) in choices:
        for p_rank, policy in enumerate(POLICY_ORDER):
            for micro in MICRO_BATCHES:
                est = estimate(shape, base, zero=stage, offload_optimizer=offload, offload_param=offload,
                               world_size=world_size, batch=micro, seq=seq_len, gradient_checkpointing=policy != "off",
                               lora_rank=rank, dtype=dtype, overhead_gib=target.overhead_gib,
                               checkpoint_policy="full" if policy == "off" else policy, fused_kernels=True,
                               adapter=adapter, optim=optim)
                if smallest is None or est.total < smallest[0]:
                    smallest = (est.total, micro, policy, zero)
                if est.total > target.usable_bytes:
                    break  # larger micro-batches need more
                z_rank = [z[0] for z in choices].index(zero)
                key = (-z_rank, micro, -p_rank)
                if best is None or key > best[0]:
                    accum = max(1, math.ceil(sequences_per_step / micro))
                    best = (key, Plan(shape.name if model == shape.name else model, method, target.name, seq_len,
                                      micro, accum, policy, zero, world_size, est.total / GIB,
                                      target.usable_bytes / GIB, optim))
    searched = (f"searched micro-batch {MICRO_BATCHES[0]}-{MICRO_BATCHES[-1]}, checkpointing "
                f"{', '.join(POLICY_ORDER)}, DeepSpeed {', '.join(z[0] or 'none' for z in choices)}")
    if best is None:
        assert smallest is not None
        return None, (f"nothing fits {target.name} ({target.usable_bytes / GIB:.1f} GiB usable): the smallest "
                      f"setting (micro-batch {smallest[1]}, checkpointing {smallest[2]}, DeepSpeed "
                      f"{smallest[3] or 'none'}) "
                      f"needs {smallest[0] / GIB:.1f} GiB per card; {searched}. Lower --seq-len, use more cards "
                      "(--nodes/--devices-per-node, with ZeRO), an NF4 base (qlora, qdora, ...) or an 8-bit optimizer")
    return best[1], searched


def _method_lines(method: str) -> list[str]:
    """The recipe keys that train ``method`` (a key of :data:`METHODS`): the base, then the adapter."""
    base, adapter = METHODS[method]
    lines = ["quantization_bit: 4", "quantization_method: bnb", "double_quantization: true"] if base == "qlora" else []
    lines += ["", "### method", "stage: sft", "do_train: true"]
    if base == "full":
        return lines + ["finetuning_type: full"]
    if adapter == "vera":
        return lines + ["finetuning_type: vera", f"vera_rank: {VERA_RANK}", "lora_target: all",
                        "# VeRA trains two vectors per linear: it usually wants a higher learning rate than LoRA"]
    lines += ["finetuning_type: lora", f"lora_rank: {LORA_RANK}", f"lora_alpha: {2 * LORA_RANK}", "lora_dropout: 0.0",
              "lora_target: all"]
    if adapter == "dora":
        lines.append("use_dora: true")
    if adapter == "lora_fa":
        lines.append("lora_fa: true")
    if method == "pissa":
        lines += ["pissa_init: true", "pissa_convert: true"]
    return lines


def render_plan(p: Plan, model_path: str, template: str) -> str:
    """The plan as a LLaMA-Factory style recipe (npu-ft keys for what LLaMA-Factory does not have)."""
    full = METHODS[p.method][0] == "full"
    lines = [
        f"{_HEADER} for {p.card}: {p.method}, {p.world_size} card(s), seq {p.seq_len}.",
        f"# Estimated {p.total_gib:.1f} GiB per card of {p.usable_gib:.1f} GiB usable; "
        f"{p.tokens_per_micro_batch} tokens per micro-batch (`npu-ft estimate` on this file shows the breakdown).",
        "", "### model", f"model_name_or_path: {model_path}",
    ]
    lines += _method_lines(p.method)
    if p.zero:
        lines.append(f"deepspeed: {DS_CONFIGS[p.zero]}")
    lines += ["", "### dataset", "dataset: alpaca_en_demo", "dataset_dir: data", f"template: {template}",
              f"cutoff_len: {p.seq_len}",
              "", "### output", f"output_dir: saves/plan/{p.method}/sft", "logging_steps: 10", "save_steps: 500",
              "overwrite_output_dir: true", "report_to: none",
              "", "### train", f"per_device_train_batch_size: {p.micro_batch}",
              f"gradient_accumulation_steps: {p.accumulation}",
              f"learning_rate: {'2.0e-5' if full else '1.0e-4'}",
              "num_train_epochs: 3.0", "lr_scheduler_type: cosine", "warmup_ratio: 0.1", "bf16: true"]
    if p.optim != "adamw_torch":
        lines.append(f"optim: {p.optim}")
    lines += [f"disable_gradient_checkpointing: {'true' if p.policy == 'off' else 'false'}",
              "", "### npu-ft", "fused_cross_entropy: true", "fused_kernels: true"]
    if p.policy != "off":
        lines.append(f"gradient_checkpointing_policy: {p.policy}")
    return "\n".join(lines) + "\n"


def _model_path_and_template(model: str) -> tuple[str, str]:
    """``model_name_or_path`` is MODEL as given (the folder holding the weights), the chat template
    follows the family."""
    return model, "qwen3" if "qwen3" in model.lower() else "qwen"


def _write(path: Path, text: str) -> None:
    """Write through a staging file; never over a file `npu-ft plan` did not write."""
    if path.exists() and not path.read_text(errors="replace").startswith(_HEADER):
        raise FileExistsError(f"--out {path}: exists and was not written by npu-ft plan; choose another path")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plan_main(argv: list[str]) -> int:
    from .budget import EstimateError
    from .estimate import OPTIMS
    from .estimate_cli import _parser

    p = _parser("npu-ft plan", "the settings that fit a card with the most tokens per step, as a recipe")
    p.usage = ("npu-ft plan MODEL --method lora|qlora|full|dora|... [--optim OPTIM] [--card CARD] --seq-len N "
               "[--nodes N --devices-per-node M] [--out FILE]")
    p.add_argument("model", help="the model folder (its config.json gives the shape; written as model_name_or_path), "
                                 "or a Qwen name the estimator knows (models/Qwen2.5-7B-Instruct, qwen3-8b)")
    p.add_argument("--method", required=True, choices=list(METHODS),
                   help="full, lora, qlora, or the LoRA family on a dense or NF4 base: dora/qdora, lora_fa/qlora_fa, "
                        "vera/qvera, pissa")
    p.add_argument("--optim", default="adamw_torch", choices=list(OPTIMS),
                   help="the optimizer as in a recipe's optim (default adamw_torch); 8-bit and paged ones keep "
                        "smaller or host-side states")
    p.add_argument("--seq-len", type=int, required=True, help="cutoff_len")
    p.add_argument("--sequences-per-step", type=int, default=16, help="per card per optimizer step (default 16)")
    p.add_argument("--out", default=None, help="write the recipe here (default: print it)")
    args = p.parse_args(argv)
    if args.seq_len < 1 or args.nodes < 1 or args.devices_per_node < 1 or args.sequences_per_step < 1:
        p.error("--seq-len, --nodes, --devices-per-node and --sequences-per-step must be >= 1")
    try:
        best, note = plan(args.model, args.method, args.card, args.seq_len, args.nodes * args.devices_per_node,
                          args.sequences_per_step, optim=args.optim)
    except EstimateError as exc:
        print(f"npu-ft plan: {exc}", file=sys.stderr)
        return 1
    if best is None:
        print(f"npu-ft plan: {note}", file=sys.stderr)
        return 1
    text = render_plan(best, *_model_path_and_template(args.model))
    print(f"npu-ft plan: micro-batch {best.micro_batch} x accumulation {best.accumulation}, checkpointing "
          f"{best.policy}, DeepSpeed {best.zero or 'none'}: {best.total_gib:.1f} of {best.usable_gib:.1f} GiB "
          f"({note})", file=sys.stderr)
    if args.out:
        try:
            _write(Path(args.out), text)
        except (FileExistsError, OSError) as exc:
            print(f"npu-ft plan: {exc}", file=sys.stderr)
            return 1
        print(f"npu-ft plan: wrote {args.out}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(plan_main(sys.argv[1:]))
