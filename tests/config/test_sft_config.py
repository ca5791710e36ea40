"""Config: LLaMA-Factory keys, defaults, overrides, and errors that name the file and the key."""

from __future__ import annotations

import textwrap

import pytest

from npu_ft.config import OPTIONS, ConfigError, build_config, load_config, to_training_arguments
from npu_ft.config.docs import options_markdown

LF_RECIPE = """\
### model
model_name_or_path: models/tiny-qwen2
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: qwen
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/qwen/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
"""


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def err(tmp_path, text, overrides=()):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value), str(path)


def test_llamafactory_example_recipe_loads_with_lf_semantics(tmp_path):
    cfg = load_config(write(tmp_path, LF_RECIPE))
    assert cfg.model_name_or_path == "models/tiny-qwen2"
    assert cfg.trust_remote_code is True
    assert cfg.dataset == ["identity", "alpaca_en_demo"]
    assert cfg.lora_target == ["all"]
    assert cfg.lora_alpha == 16  # None -> 2 x rank
    assert cfg.learning_rate == pytest.approx(1e-4)
    assert cfg.report_to == ["none"]
    assert cfg.packing is False  # None -> False for sft
    assert cfg.method == "lora"
    # defaults of keys the recipe did not set
    assert cfg.lora_dropout == 0.0 and cfg.use_rslora is False
    assert cfg.quantization_bit is None and cfg.quantization_type == "nf4" and cfg.double_quantization is True
    assert cfg.flash_attn == "auto" and cfg.disable_gradient_checkpointing is False
    assert cfg.dataset_dir == "data" and cfg.train_on_prompt is False and cfg.val_size == 0.0
    assert cfg.device == "auto"
    assert cfg.source == str(tmp_path / "recipe.yaml")
    assert "lora_rank" in cfg.explicit and "lora_dropout" not in cfg.explicit
    assert set(cfg.group("method")) >= {"lora_rank", "lora_target", "finetuning_type"}


def test_overrides_are_yaml_scalars_applied_after_the_file(tmp_path):
    path = write(tmp_path, LF_RECIPE)
    cfg = load_config(path, ["lora_rank=16", "bf16=false", "learning_rate=2e-5", "lora_target=q_proj,v_proj",
                             "device=cpu", "max_samples=null"])
    assert cfg.lora_rank == 16 and cfg.lora_alpha == 32
    assert cfg.bf16 is False
    assert cfg.learning_rate == pytest.approx(2e-5)  # "2e-5" is a YAML string, still a number here
    assert cfg.lora_target == ["q_proj", "v_proj"]
    assert cfg.device == "cpu"
    assert cfg.max_samples is None


def test_unknown_key_names_file_key_and_closest_match(tmp_path):
    msg, path = err(tmp_path, "model_name_or_path: m\nlora_rnak: 4\n")
    assert path in msg and "lora_rnak" in msg and "did you mean 'lora_rank'" in msg


def test_unknown_override_names_the_override(tmp_path):
    msg, _ = err(tmp_path, "model_name_or_path: m\n", ["learning_rat=1e-4"])
    assert "command-line override 'learning_rat=1e-4'" in msg and "learning_rate" in msg


@pytest.mark.parametrize(
    "line, key, words",
    [
        ("learning_rate: -1.0e-4", "learning_rate", "> 0"),
        ("lora_rank: 0", "lora_rank", ">= 1"),
        ("cutoff_len: 0", "cutoff_len", ">= 1"),
        ("lora_dropout: 1.5", "lora_dropout", "< 1"),
        ("lora_rank: eight", "lora_rank", "integer"),
        ("bf16: maybe", "bf16", "true or false"),
        ("per_device_train_batch_size: 2.5", "per_device_train_batch_size", "integer"),
        ("device: tpu", "device", "one of"),
        ("lora_target: 5", "lora_target", "comma-separated"),
    ],
)
def test_wrong_type_or_range_names_key_and_file(tmp_path, line, key, words):
    msg, path = err(tmp_path, f"model_name_or_path: m\n{line}\n")
    assert path in msg and f"'{key}'" in msg and words in msg


@pytest.mark.parametrize(
    "line, key",
    [
        ("create_new_adapter: true", "create_new_adapter"),
        ("use_llama_pro: true", "use_llama_pro"),
        ("use_unsloth: true", "use_unsloth"),
        ("rope_scaling: linear", "rope_scaling"),
        ("use_galore: true", "use_galore"),
        ("streaming: true", "streaming"),
    ],
)
def test_known_but_unsupported_keys(tmp_path, line, key):
    msg, path = err(tmp_path, f"model_name_or_path: m\n{line}\n")
    assert path in msg and f"{key} is not supported by npu-ft yet" in msg


def test_unsupported_keys_at_their_lf_default_are_accepted(tmp_path):
    cfg = load_config(write(tmp_path, "model_name_or_path: m\nuse_galore: false\nrope_scaling: null\n"))
    assert cfg.use_galore is False


@pytest.mark.parametrize(
    "line, words",
    [
        ("finetuning_type: freeze", "finetuning_type 'freeze' is not supported by npu-ft yet"),
        ("finetuning_type: oft", "finetuning_type 'oft' is not supported by npu-ft yet"),
        ("quantization_bit: 8", "8-bit quantization is not supported by npu-ft yet"),
        ("quantization_type: fp4", "'fp4' is not supported by npu-ft yet"),
        ("stage: dpo", "stage 'dpo' is not supported by npu-ft yet"),
        ("quantization_bit: 7", "must be one of 4"),
    ],
)
def test_unsupported_values(tmp_path, line, words):
    msg, path = err(tmp_path, f"model_name_or_path: m\n{line}\n")
    assert path in msg and words in msg


def test_cross_checks(tmp_path):
    msg, _ = err(tmp_path, "model_name_or_path: m\nfinetuning_type: full\nquantization_bit: 4\n")
    assert "'quantization_bit'" in msg and "only compatible with finetuning_type: lora" in msg
    msg, _ = err(tmp_path, "model_name_or_path: m\nmask_history: true\ntrain_on_prompt: true\n")
    assert "mask_history" in msg and "train_on_prompt" in msg
    msg, _ = err(tmp_path, "model_name_or_path: m\nbf16: true\nfp16: true\n")
    assert "both" in msg
    msg, _ = err(tmp_path, "model_name_or_path: m\ndo_train: true\n")
    assert "'dataset'" in msg
    msg, _ = err(tmp_path, "lora_rank: 4\n")
    assert "'model_name_or_path'" in msg and "required" in msg
    cfg = load_config(write(tmp_path, "model_name_or_path: m\nneat_packing: true\ncutoff_len: 64\n"))
    assert cfg.packing is True and cfg.cutoff_len == 64 and cfg.effective_cutoff_len == 63
    cfg = load_config(write(tmp_path, "model_name_or_path: m\nquantization_bit: 4\n"))
    assert cfg.is_qlora and cfg.method == "qlora"


def test_missing_file_and_yaml_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml.*not found"):
        load_config(tmp_path / "nope.yaml")
    msg, path = err(tmp_path, "model_name_or_path: m\nlora_rank: [1, 2\nbf16: true\n")
    assert f"{path}:" in msg and "invalid YAML" in msg
    line = int(msg.split(f"{path}:")[1].split(":")[0])
    assert line in (2, 3, 4)
    msg, path = err(tmp_path, "- just\n- a list\n")
    assert path in msg and "mapping" in msg


def test_to_training_arguments(tmp_path):
    cfg = load_config(write(tmp_path, LF_RECIPE), [f"output_dir={tmp_path / 'out'}", "bf16=false", "device=cpu",
                                                   "deepspeed=recipes/ds_z2.json"])
    args = to_training_arguments(cfg, deepspeed=None)
    assert args.learning_rate == pytest.approx(1e-4)
    assert args.per_device_train_batch_size == 1 and args.gradient_accumulation_steps == 8
    assert args.num_train_epochs == 3.0 and str(args.lr_scheduler_type.value) == "cosine"
    assert args.get_warmup_steps(100) == 10  # warmup_ratio 0.1
    assert args.remove_unused_columns is False and args.label_names == ["labels"]
    assert args.ddp_timeout == 180000000 and args.logging_steps == 10 and args.save_steps == 500
    assert args.output_dir == str(tmp_path / "out") and args.use_cpu is True
    assert args.report_to == [] or args.report_to == ["none"]
    assert cfg.deepspeed == "recipes/ds_z2.json"  # left as the path; the trainer resolves it


def test_deepspeed_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    # simulate a machine without deepspeed, whether or not this one has it
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "deepspeed" else real_find_spec(name, *a, **k))
    cfg = load_config(write(tmp_path, "model_name_or_path: m\ndeepspeed: ds.json\n"))
    with pytest.raises(ConfigError, match="'deepspeed'.*not installed"):
        to_training_arguments(cfg, output_dir=str(tmp_path))


def test_transformers_fields_pass_through(tmp_path):
    cfg = load_config(write(tmp_path, "model_name_or_path: m\nadam_beta2: 0.95\neval_steps: 50\n"))
    assert cfg.adam_beta2 == 0.95
    assert to_training_arguments(cfg, output_dir=str(tmp_path)).adam_beta2 == 0.95


def test_option_table_is_the_single_source_of_truth():
    for name, opt in OPTIONS.items():
        assert opt.name == name and opt.status in ("supported", "ignored", "unsupported")
        assert opt.doc, name
    for key in ("lora_rank", "lora_alpha", "quantization_bit", "cutoff_len", "neat_packing", "learning_rate",
                "device", "output_dir", "deepspeed", "plot_loss"):
        assert key in OPTIONS
    assert OPTIONS["lora_rank"].default == 8 and OPTIONS["cutoff_len"].default == 2048
    doc = options_markdown()
    assert "`lora_rank`" in doc and "`use_dora`" in doc and "Known but not supported yet" in doc
    built = build_config({"model_name_or_path": "m"})
    assert all(hasattr(built, name) for name in OPTIONS)


def test_to_data_arguments():
    from npu_ft.data import DataArguments

    cfg = build_config({"model_name_or_path": "m", "dataset": "a, b", "neat_packing": True, "cutoff_len": 128,
                        "template": "qwen"})
    data = cfg.data_arguments()
    assert type(data) is DataArguments
    assert data.dataset == ["a", "b"] and data.packing is True and data.template == "qwen"
    assert data.cutoff_len == 128 and data.effective_cutoff_len == 127


def test_docs_config_md_matches_the_option_table():
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert doc.read_text(encoding="utf-8") == options_markdown(), \
        "regenerate: python -m npu_ft.config.docs > docs/config.md"
