"""Bad input and faults: ``npu-ft train`` exits non-zero with a message naming the file, key or line,
and writes nothing; a NaN loss stops the run and keeps the last good checkpoint; a full disk during
a checkpoint save keeps the previous checkpoint whole."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from npu_ft.config import load_config
from npu_ft.train.callbacks import NonFiniteLossError
from npu_ft.train.cli import train_main
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
    overrides.setdefault("output_dir", tmp_path / "out")
    return write_recipe(tmp_path / "recipe.yaml", base_recipe(env["model"], env["data"], **overrides))


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


# ---------------------------------------------------------------------------------------------
# faults that must give one clear line, exit 1 and leave nothing behind
# ---------------------------------------------------------------------------------------------
def _one_line(code: int, err: str, *fragments: str) -> None:
    """Exit 1, no traceback, and the error is one line holding every fragment."""
    _assert_failed(code, err, *fragments)
    assert code == 1
    errors = [line for line in err.splitlines() if "npu-ft train: error:" in line]
    assert len(errors) == 1 and all(f in errors[0] for f in fragments), err


def _model_copy(env, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(env["model"], copy)
    return copy


def test_truncated_model_safetensors(env, capsys, tmp_path):
    model = _model_copy(env, tmp_path)
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    code, err = _run(capsys, [_recipe(env, tmp_path, model_name_or_path=str(model))])
    _one_line(code, err, f"model folder '{model}': model.safetensors is truncated or corrupt")
    assert not (tmp_path / "out").exists()


def test_corrupt_model_safetensors_header(env, capsys, tmp_path):
    model = _model_copy(env, tmp_path)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"garbage!"  # the JSON header
    weights.write_bytes(bytes(data))
    code, err = _run(capsys, [_recipe(env, tmp_path, model_name_or_path=str(model))])
    _one_line(code, err, "model.safetensors is truncated or corrupt", "unreadable header")
    assert not (tmp_path / "out").exists()


def test_output_dir_is_a_file(env, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    code, err = _run(capsys, [_recipe(env, tmp_path, output_dir=str(blocker))])
    _one_line(code, err, "key 'output_dir'", "is a file, not a folder")
    code, err = _run(capsys, [_recipe(env, tmp_path, output_dir=str(blocker / "out"))])
    _one_line(code, err, "key 'output_dir'", "cannot be created", "is a file")
    assert blocker.read_text() == "mine"


def _can_mount() -> list[str] | None:
    """The unshare command that lets this process mount a tmpfs (root, or a user namespace)."""
    for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True,
                               timeout=60)
        if probe.returncode == 0:
            return prefix
    return None


def _in_tmpfs(prefix: list[str], mount: Path, options: str, command: str) -> subprocess.CompletedProcess:
    """Run ``command`` (sh) with a fresh tmpfs mounted on ``mount``; the mount ends with it."""
    mount.mkdir(parents=True, exist_ok=True)
    script = f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(mount))} && {command}"
    return subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True, timeout=1800,
                          env={**os.environ})


def test_output_dir_not_writable(env, capsys, tmp_path):
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        code, err = _run(capsys, [_recipe(env, tmp_path, output_dir=str(locked / "out"))])
        _one_line(code, err, "key 'output_dir'", "not writable")
        assert list(locked.iterdir()) == []
        return
    # root writes through chmod 0555: use a read-only file system instead
    prefix = _can_mount()
    if prefix is None:
        pytest.skip("running as root and cannot mount a read-only tmpfs (no mount namespace): no way to make a "
                    "folder unwritable")
    mount = tmp_path / "ro"
    recipe = _recipe(env, tmp_path, output_dir=str(mount / "out"))
    proc = _in_tmpfs(prefix, mount, "ro,size=1m",
                     f"{shlex.quote(sys.executable)} -m npu_ft.cli train {shlex.quote(str(recipe))}")
    _one_line(proc.returncode, proc.stderr, "key 'output_dir'", "cannot be created", "not writable",
              "Read-only file system")


def test_output_dir_is_or_is_inside_the_model_folder(env, capsys, tmp_path):
    model = _model_copy(env, tmp_path)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in model.iterdir())
    link = tmp_path / "link-to-model"
    link.symlink_to(model)
    for out, what in ((model, "is the model folder"), (model / "run", "is inside the model folder"),
                      (link / "run", "is inside the model folder")):
        for method in ("full", "lora"):
            code, err = _run(capsys, [_recipe(env, tmp_path, model_name_or_path=str(model), output_dir=str(out),
                                              finetuning_type=method)])
            _one_line(code, err, "key 'output_dir'", what)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in model.iterdir()) == before


def test_data_row_with_wrong_types(env, capsys, tmp_path):
    good = {"instruction": "a", "input": "", "output": "b"}
    rows = [good, good, {"instruction": ["a", "b"], "input": "", "output": "c"}]
    data = _dataset(tmp_path, {"toy": {"file_name": "toy.json"}}, {"toy.json": json.dumps(rows)})
    code, err = _run(capsys, [_recipe(env, tmp_path, dataset_dir=str(data))])
    _one_line(code, err, "toy.json", "row 3", "column 'instruction'", "expected a string, got list")
    assert not (tmp_path / "out").exists()


def test_sharegpt_message_with_wrong_type(env, capsys, tmp_path):
    rows = [{"conversations": [{"from": "human", "value": {"text": "hi"}}, {"from": "gpt", "value": "x"}]}]
    data = _dataset(tmp_path, {"toy": {"file_name": "toy.jsonl", "formatting": "sharegpt"}},
                    {"toy.jsonl": "\n".join(json.dumps(r) for r in rows)})
    code, err = _run(capsys, [_recipe(env, tmp_path, dataset_dir=str(data))])
    _one_line(code, err, "toy.jsonl", "row 1", "column 'conversations' message 0", "column 'value'",
              "expected a string, got dict")


def test_lora_rank_larger_than_a_layer(env, capsys, tmp_path):
    # the tiny model's k_proj / v_proj are 32 x 64 (2 kv heads of 16)
    code, err = _run(capsys, [_recipe(env, tmp_path, lora_rank=48)])
    _one_line(code, err, "key 'lora_rank'", "lora_rank 48", "model.layers.0.self_attn.k_proj", "32 x 64")
    assert not (tmp_path / "out").exists()
    code, err = _run(capsys, [_recipe(env, tmp_path, lora_rank=48, lora_target="q_proj,o_proj")])
    assert code == 0, err  # 64 x 64 layers take rank 48


def test_disk_full_during_checkpoint_save(env, tmp_path):
    prefix = _can_mount()
    if prefix is None:
        pytest.skip("cannot mount a tmpfs (neither root nor a user namespace): no way to fill a disk safely")
    mount = tmp_path / "small"
    after = tmp_path / "after"
    recipe = _recipe(env, tmp_path, output_dir=str(mount / "out"), max_steps=6, save_steps=2)
    # a LoRA checkpoint of the tiny model is ~19 MB (18 MB of it the tokenizer): 30 MB holds one
    command = (f"{shlex.quote(sys.executable)} -m npu_ft.cli train {shlex.quote(str(recipe))}; rc=$?; "
               f"cp -a {shlex.quote(str(mount / 'out'))} {shlex.quote(str(after))}; exit $rc")
    proc = _in_tmpfs(prefix, mount, "size=30m", command)
    _one_line(proc.returncode, proc.stderr, "the disk is full (no space left on device)",
              "the last complete checkpoint is", "checkpoint-2")
    assert sorted(p.name for p in after.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert not (after / "adapter_model.safetensors").exists()
    # the previous checkpoint is whole: every file it lists is there with its size, and it loads
    ckpt = after / "checkpoint-2"
    recorded = json.loads((ckpt / "npu_ft_run.json").read_text())["files"]
    assert recorded and all((ckpt / name).stat().st_size == size for name, (size, _) in recorded.items())
    from npu_ft.train.state_io import load_state

    assert load_state(ckpt / "optimizer.safetensors")["state"]
    cfg = load_config(_recipe(env, tmp_path, output_dir=str(after), max_steps=6, save_steps=2,
                              overwrite_output_dir=False))
    assert run_sft(cfg).global_step == 6  # and resumes from it
