"""Bad input and faults: ``npu-ft train`` exits non-zero with a message naming the file, key or line,
and writes nothing; a NaN loss stops the run and keeps the last good checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from npu_ft.train.callbacks import NonFiniteLossError
from npu_ft.train.cli import train_main
from npu_ft.train.config import load_config
from npu_ft.train.run import run_sft

from ._sft_helpers import base_recipe, read_log, tiny_model_dir, write_dataset, write_recipe


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return {"model": tiny_model_dir(root), "data": write_dataset(root / "data", n=8), "root": root}


def _run(capsys, args) -> tuple[int, str]:
    code = train_main([str(a) for a in args])
    return code, capsys.readouterr().err


def _recipe(env, tmp_path, **overrides) -> Path:
    return write_recipe(tmp_path / "recipe.yaml", base_recipe(env["model"], env["data"], tmp_path / "out", **overrides))


def _dataset(tmp_path: Path, info: dict, files: dict[str, str]) -> Path:
    folder = tmp_path / "bad_data"
    folder.mkdir()
    (folder / "dataset_info.json").write_text(json.dumps(info))
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def _assert_failed(code: int, err: str, *fragments: str, out: Path | None = None) -> None:
    assert code != 0
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    if out is not None:
        assert not out.exists(), f"{out} was written: {list(out.iterdir())}"


def test_missing_yaml(capsys, tmp_path):
    code, err = _run(capsys, [tmp_path / "nope.yaml"])
    _assert_failed(code, err, "nope.yaml", "not found")


def test_invalid_yaml_names_line(capsys, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model_name_or_path: m\ndataset: [a, b\nlora_rank: 8\n")
    code, err = _run(capsys, [path])
    _assert_failed(code, err, "broken.yaml:", "invalid YAML")


def test_unknown_key_suggests(env, capsys, tmp_path):
    code, err = _run(capsys, [_recipe(env, tmp_path, lora_rnak=8)])
    _assert_failed(code, err, "recipe.yaml", "lora_rnak", "lora_rank", out=tmp_path / "out")


def test_wrong_type_and_override(env, capsys, tmp_path):
    code, err = _run(capsys, [_recipe(env, tmp_path), "learning_rate=fast"])
    _assert_failed(code, err, "learning_rate", "learning_rate=fast", out=tmp_path / "out")


def test_unsupported_key(env, capsys, tmp_path):
    code, err = _run(capsys, [_recipe(env, tmp_path, use_galore=True)])
    _assert_failed(code, err, "use_galore", "not supported", out=tmp_path / "out")


def test_quantization_with_full(env, capsys, tmp_path):
    code, err = _run(capsys, [_recipe(env, tmp_path, finetuning_type="full", quantization_bit=4)])
    _assert_failed(code, err, "quantization_bit", out=tmp_path / "out")


def test_device_absent(env, capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    code, err = _run(capsys, [_recipe(env, tmp_path), "device=cuda"])
    _assert_failed(code, err, "cuda unavailable", out=tmp_path / "out")


def test_dataset_not_in_info(env, capsys, tmp_path):
    code, err = _run(capsys, [_recipe(env, tmp_path, dataset="nope")])
    _assert_failed(code, err, "nope", "dataset_info.json", out=tmp_path / "out")


def test_missing_data_file(env, capsys, tmp_path):
    data = _dataset(tmp_path, {"toy": {"file_name": "missing.json"}}, {})
    code, err = _run(capsys, [_recipe(env, tmp_path, dataset_dir=str(data))])
    _assert_failed(code, err, "missing.json", out=tmp_path / "out")


def test_malformed_jsonl_names_line(env, capsys, tmp_path):
    good = json.dumps({"instruction": "a", "input": "", "output": "b"})
    data = _dataset(tmp_path, {"toy": {"file_name": "toy.jsonl"}}, {"toy.jsonl": f"{good}\n{good}\n{{oops\n"})
    code, err = _run(capsys, [_recipe(env, tmp_path, dataset_dir=str(data))])
    _assert_failed(code, err, "toy.jsonl", "3", out=tmp_path / "out")


def test_missing_columns(env, capsys, tmp_path):
    rows = json.dumps([{"instruction": "a", "output": "b"}])
    data = _dataset(tmp_path, {"toy": {"file_name": "toy.json", "columns": {"prompt": "question"}}},
                    {"toy.json": rows})
    code, err = _run(capsys, [_recipe(env, tmp_path, dataset_dir=str(data))])
    _assert_failed(code, err, "question", out=tmp_path / "out")


def test_sharegpt_roles_out_of_order(env, capsys, tmp_path):
    rows = json.dumps([{"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]}])
    data = _dataset(tmp_path, {"toy": {"file_name": "toy.json", "formatting": "sharegpt"}}, {"toy.json": rows})
    code, err = _run(capsys, [_recipe(env, tmp_path, dataset_dir=str(data))])
    _assert_failed(code, err, "toy", out=tmp_path / "out")


def test_empty_dataset(env, capsys, tmp_path):
    data = _dataset(tmp_path, {"toy": {"file_name": "toy.json"}}, {"toy.json": "[]"})
    code, err = _run(capsys, [_recipe(env, tmp_path, dataset_dir=str(data))])
    _assert_failed(code, err, "toy", out=tmp_path / "out")


def test_cutoff_len_too_small(env, capsys, tmp_path):
    code, err = _run(capsys, [_recipe(env, tmp_path, cutoff_len=2)])
    _assert_failed(code, err, "cutoff_len", "toy", out=tmp_path / "out")


def test_model_folder_missing(env, capsys, tmp_path):
    code, err = _run(capsys, [_recipe(env, tmp_path, model_name_or_path=str(tmp_path / "no-model"))])
    _assert_failed(code, err, "no-model", out=tmp_path / "out")


class _PoisonAt(TrainerCallback):
    """After optimizer step ``step``, set one LoRA weight to NaN: the next loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name.endswith("lora_B.weight"):
                        param.fill_(float("nan"))
                        break


def test_nan_loss_stops_and_keeps_last_good_checkpoint(env, tmp_path):
    out = tmp_path / "out"
    cfg = load_config(_recipe(env, tmp_path, max_steps=6, save_steps=2))
    with pytest.raises(NonFiniteLossError) as info:
        run_sft(cfg, callbacks=[_PoisonAt(3)])
    message = str(info.value)
    assert "step 4" in message and "nan" in message and "checkpoint-2" in message
    assert info.value.step == 4
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    assert not (out / "adapter_model.safetensors").exists()  # no final model from a diverged run
    assert [rec["current_steps"] for rec in read_log(out) if "loss" in rec] == [1, 2, 3]
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
