"""The Qwen recipe table, and the generator of ``recipes/<model>/<method>.yaml`` and of the memory
table in ``docs/recipes.md`` (a development script: it writes into the source checkout, so it is
not part of the installed ``npu_ft`` package).

    python scripts/generate_recipes.py            # rewrite recipes/*/*.yaml + docs table
    python scripts/generate_recipes.py --check    # exit 1 if anything on disk differs (the test does this)

Per model: ``{lora,qlora,full}.yaml`` (training), ``merge_{lora,qlora}.yaml`` (``npu-ft export``: the
adapter merged into its base, as LLaMA-Factory's ``examples/merge_lora``) and ``chat_{lora,full}.yaml``
(``npu-ft chat``: the trained result, as its ``examples/inference``).

Edit :data:`MODELS_TABLE` / :func:`recipe_settings`, never the generated files. The YAMLs use only
LLaMA-Factory 0.9.5 keys, so ``llamafactory-cli train`` reads them too.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from npu_ft.launch.estimate import CARD_GIB, MODELS, USABLE_FRACTION, cards_needed, format_gib

__all__ = ["DS_CONFIGS", "METHODS", "MODELS_TABLE", "Recipe", "all_recipes", "render_chat_recipe",
           "render_docs_table", "render_merge_recipe", "render_recipe", "write_all"]

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lora", "qlora", "full")
#: ZeRO setting -> DeepSpeed config shipped in recipes/deepspeed/
DS_CONFIGS = {
    "z2": "recipes/deepspeed/ds_z2_config.json",
    "z3": "recipes/deepspeed/ds_z3_config.json",
    "z3_offload": "recipes/deepspeed/ds_z3_offload_config.json",
}
DOCS_BEGIN = "<!-- BEGIN GENERATED: python scripts/generate_recipes.py -->"
DOCS_END = "<!-- END GENERATED -->"


@dataclasses.dataclass(frozen=True)
class ModelRow:
    key: str             # estimate.MODELS key and recipes/ folder name
    folder: str          # model folder under models/ (the Hugging Face repo name)
    template: str
    size_b: float        # billions of parameters (for the defaults below)


#: model key, folder (local copy of the Hugging Face repo), chat template, size
MODELS_TABLE: tuple[ModelRow, ...] = (
    ModelRow("qwen2.5-0.5b", "Qwen2.5-0.5B-Instruct", "qwen", 0.5),
    ModelRow("qwen2.5-1.5b", "Qwen2.5-1.5B-Instruct", "qwen", 1.5),
    ModelRow("qwen2.5-7b", "Qwen2.5-7B-Instruct", "qwen", 7),
    ModelRow("qwen2.5-14b", "Qwen2.5-14B-Instruct", "qwen", 14),
    ModelRow("qwen2.5-32b", "Qwen2.5-32B-Instruct", "qwen", 32),
    ModelRow("qwen2.5-72b", "Qwen2.5-72B-Instruct", "qwen", 72),
    ModelRow("qwen3-0.6b", "Qwen3-0.6B", "qwen3", 0.6),
    ModelRow("qwen3-8b", "Qwen3-8B", "qwen3", 8),
    ModelRow("qwen3-32b", "Qwen3-32B", "qwen3", 32),
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    model: ModelRow
    method: str
    zero: str | None          # None | z2 | z3 | z3_offload
    learning_rate: float
    batch: int
    accum: int
    cutoff_len: int = 2048
    lora_rank: int = 16

    @property
    def path(self) -> str:
        return f"recipes/{self.model.key}/{self.method}.yaml"

    @property
    def zero_stage(self) -> int:
        return {None: 0, "z2": 2, "z3": 3, "z3_offload": 3}[self.zero]

    def estimate_cards(self):
        """(cards, Estimate) on 910B 64 GB cards (cards None: does not fit)."""
        off = self.zero == "z3_offload"
        return cards_needed(self.model.key, self.method, zero=self.zero_stage, offload_optimizer=off,
                            offload_param=off, batch=self.batch, seq=self.cutoff_len,
                            gradient_checkpointing=True, lora_rank=self.lora_rank)


def recipe_settings(model: ModelRow, method: str) -> Recipe:
    """The 910B defaults: the choices are explained in docs/recipes.md."""
    size = model.size_b
    batch, accum = (4, 4) if size <= 2 else (2, 8) if size <= 14 else (1, 16)
    if method == "full":
        lr = 2e-5 if size <= 2 else 1e-5
        zero = "z2" if size <= 2 else "z3"
    else:
        lr = 1e-4 if size <= 32 else 5e-5
        # LoRA keeps a bf16 copy of the base: beyond ~14B it no longer fits one card -> ZeRO-3.
        # QLoRA's 4-bit base fits one card up to 72B; ZeRO-3 is not supported for it.
        zero = "z3" if method == "lora" and size > 14 else None
    return Recipe(model, method, zero, lr, batch, accum)


def all_recipes() -> list[Recipe]:
    return [recipe_settings(m, method) for m in MODELS_TABLE for method in METHODS]


def _lr(value: float) -> str:
    mant, exp = f"{value:.1e}".split("e")
    return f"{mant}e{int(exp)}"


def render_recipe(r: Recipe) -> str:
    cards, est = r.estimate_cards()
    need = f"{cards} x 910B 64 GB" if cards else "more than 128 x 910B 64 GB"
    zero_text = {None: "no DeepSpeed (DDP)", "z2": "DeepSpeed ZeRO-2", "z3": "DeepSpeed ZeRO-3",
                 "z3_offload": "DeepSpeed ZeRO-3 + CPU offload"}[r.zero]
    lines = [
        f"# {r.model.folder}, {r.method.upper() if r.method != 'full' else 'full'} SFT on Ascend 910B; {zero_text}.",
        f"# Estimated {format_gib(est.total_gib)} GiB per card, needs {need} (docs/recipes.md).",
        "# Generated by `python scripts/generate_recipes.py`: edit the table in that script, not this file.",
        "# Run: npu-ft train " + r.path + "   (all visible NPUs; NNODES/NODE_RANK/MASTER_ADDR for several nodes)",
        "",
        "### model",
        f"model_name_or_path: models/{r.model.folder}",  # Qwen2.5/Qwen3 need no trust_remote_code
    ]
    if r.method == "qlora":
        lines += ["quantization_bit: 4", "quantization_method: bnb", "double_quantization: true"]
    lines += ["", "### method", "stage: sft", "do_train: true",
              f"finetuning_type: {'full' if r.method == 'full' else 'lora'}"]
    if r.method != "full":
        lines += [f"lora_rank: {r.lora_rank}", f"lora_alpha: {2 * r.lora_rank}", "lora_dropout: 0.0",
                  "lora_target: all"]
    if r.zero:
        lines.append(f"deepspeed: {DS_CONFIGS[r.zero]}")
    lines += ["", "### dataset", "dataset: alpaca_en_demo", "dataset_dir: data", f"template: {r.model.template}",
              f"cutoff_len: {r.cutoff_len}", "overwrite_cache: true", "preprocessing_num_workers: 16",
              "dataloader_num_workers: 4",
              "", "### output", f"output_dir: saves/{r.model.key}/{r.method}/sft", "logging_steps: 10",
              "save_steps: 500", "plot_loss: true", "overwrite_output_dir: true", "save_only_model: false",
              "report_to: none",
              "", "### train", f"per_device_train_batch_size: {r.batch}",
              f"gradient_accumulation_steps: {r.accum}", f"learning_rate: {_lr(r.learning_rate)}",
              "num_train_epochs: 3.0", "lr_scheduler_type: cosine", "warmup_ratio: 0.1", "bf16: true",
              "disable_gradient_checkpointing: false", "ddp_timeout: 180000000", ""]
    return "\n".join(lines)


def _model_header(model: ModelRow, what: str, command: str) -> list[str]:
    return [f"# {model.folder}: {what}.",
            "# Generated by `python scripts/generate_recipes.py`: edit the table in that script, not this file.",
            f"# Run: {command}", ""]


def render_merge_recipe(model: ModelRow, method: str) -> str:
    """``recipes/<model>/merge_<method>.yaml``: merge the adapter of ``<method>.yaml``'s run into its base.

    A QLoRA adapter is merged into the NF4-quantized base and the dequantized weights are written (the
    function the QLoRA run trained); the merged folder is bf16 either way.
    """
    path = f"recipes/{model.key}/merge_{method}.yaml"
    what = f"merge the {method.upper()} adapter of recipes/{model.key}/{method}.yaml into its base model"
    lines = _model_header(model, what, f"npu-ft export {path}")
    lines += ["### model", f"model_name_or_path: models/{model.folder}",
              f"adapter_name_or_path: saves/{model.key}/{method}/sft", f"template: {model.template}",
              "finetuning_type: lora"]
    if method == "qlora":
        lines += ["quantization_bit: 4"]
    lines += ["", "### export", f"export_dir: saves/{model.key}/{method}/merged", "export_size: 5",
              "export_device: cpu", "export_legacy_format: false", ""]
    return "\n".join(lines)


def render_chat_recipe(model: ModelRow, method: str) -> str:
    """``recipes/<model>/chat_<method>.yaml``: chat with the result of ``<method>.yaml``'s run (the
    base model plus the LoRA adapter, or the fully fine-tuned folder)."""
    path = f"recipes/{model.key}/chat_{method}.yaml"
    lines = _model_header(model, f"chat with the result of recipes/{model.key}/{method}.yaml",
                          f"npu-ft chat {path}   (--prompt TEXT for one answer)")
    if method == "full":
        lines += [f"model_name_or_path: saves/{model.key}/full/sft"]
    else:
        lines += [f"model_name_or_path: models/{model.folder}", f"adapter_name_or_path: saves/{model.key}/{method}/sft"]
    lines += [f"template: {model.template}", "infer_backend: huggingface", "max_new_tokens: 512", ""]
    return "\n".join(lines)


def all_generated() -> dict[str, str]:
    """Every generated recipe: path -> text."""
    targets = {r.path: render_recipe(r) for r in all_recipes()}
    for model in MODELS_TABLE:
        for method in ("lora", "qlora"):
            targets[f"recipes/{model.key}/merge_{method}.yaml"] = render_merge_recipe(model, method)
        for method in ("lora", "full"):
            targets[f"recipes/{model.key}/chat_{method}.yaml"] = render_chat_recipe(model, method)
    return targets


def render_docs_table() -> str:
    head = ["| recipe | method | DeepSpeed | batch x accum | lr | weights | grads | optimizer | activations "
            "| overhead | **GiB / card** | **910B cards** |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for r in all_recipes():
        cards, est = r.estimate_cards()
        p = est.parts_gib()
        rows.append(
            f"| `{r.path}` | {r.method} | {r.zero or '-'} | {r.batch} x {r.accum} | {_lr(r.learning_rate)} "
            f"| {format_gib(p['weights'])} | {format_gib(p['gradients'])} | {format_gib(p['optimizer'])} "
            f"| {format_gib(p['activations'])} | {format_gib(p['overhead'])} | **{format_gib(p['total'])}** "
            f"| **{cards if cards else '> 128'}** |")
    foot = ["", f"Budget per card: {USABLE_FRACTION:.0%} of {CARD_GIB:g} GB. Cards are the smallest of "
            "1, 2, 4, 8, 16, 32, ... that fits; without ZeRO the memory per card does not fall with more "
            "cards (more cards only make it faster). Parameters: "
            + ", ".join(f"{k} {v.params / 1e9:.2f} B" for k, v in MODELS.items()) + "."]
    return "\n".join([DOCS_BEGIN, *head, *rows, *foot, DOCS_END])


def _docs_with_table(text: str) -> str:
    start, end = text.index(DOCS_BEGIN), text.index(DOCS_END) + len(DOCS_END)
    return text[:start] + render_docs_table() + text[end:]


def write_all(root: Path = ROOT, check: bool = False) -> list[str]:
    """Write (or with ``check``, compare) every generated file; returns the paths that differ."""
    stale = []
    targets = all_generated()
    docs = root / "docs" / "recipes.md"
    if docs.exists():
        targets["docs/recipes.md"] = _docs_with_table(docs.read_text(encoding="utf-8"))
    for rel, text in targets.items():
        path = root / rel
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(rel)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_name(f".{path.name}.tmp")
            staging.write_text(text, encoding="utf-8")
            staging.replace(path)
    return stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/generate_recipes.py", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only report files that are out of date")
    args = p.parse_args(argv)
    stale = write_all(check=args.check)
    for rel in stale:
        print(("stale: " if args.check else "wrote: ") + rel)
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
