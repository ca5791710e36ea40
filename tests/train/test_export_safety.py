"""``npu-ft export`` never removes what it did not write (issue #11.1).

Each refusal leaves every file where it was and exits 1 with one line; a previous npu-ft export is
replaced through a staging folder, and only the files its manifest lists are removed. The adapter
is a freshly initialised LoRA (no training needed: the folder layout is what matters here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from npu_ft.train.export import export_main
from npu_ft.train.export_folder import MANIFEST_NAME, ExportError, check_export_dir, publish

from ._sft_helpers import tiny_model_dir


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from npu_ft.model.loading import load_model
    from npu_ft.modules.inject import apply_lora
    from npu_ft.train.adapter_io import save_adapter

    root = tmp_path_factory.mktemp("export")
    model_dir = tiny_model_dir(root)
    model = apply_lora(load_model(str(model_dir), dtype="float32"), "all", r=4)
    with torch.no_grad():  # a non-zero B, so the merge changes the weights
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    adapter = save_adapter(model, root / "adapter", base_model_name_or_path=str(model_dir))
    return {"root": root, "model": model_dir, "adapter": adapter}


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (what must not change)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _export(capsys, env, export_dir, *extra: str, model=None, adapter=None) -> tuple[int, str]:
    """``npu-ft export`` of ``adapter`` (default: the fixture's) onto ``model`` -> (exit code, stderr)."""
    code = export_main([f"model_name_or_path={model or env['model']}",
                        f"adapter_name_or_path={adapter or env['adapter']}", f"export_dir={export_dir}", *extra])
    return code, capsys.readouterr().err


def _refused(code: int, err: str, *fragments: str) -> None:
    assert code == 1, err
    assert err.count("\n") == 1 and err.startswith("npu-ft export: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# -- refusals: nothing moves -----------------------------------------------------------------------
def test_export_dir_holding_the_base_model_is_refused(env, tmp_path, capsys):
    """main deleted the whole parent folder: the base model and the user's own files."""
    parent = tmp_path / "work"
    model = _copy_tree(env["model"], parent / "base")
    (parent / "notes.txt").write_text("mine")
    before = _tree(parent)
    code, err = _export(capsys, env, parent, model=model)
    _refused(code, err, "key 'export_dir'", "contains the model_name_or_path folder")
    assert _tree(parent) == before


def test_export_dir_equal_to_the_adapter_is_refused(env, tmp_path, capsys):
    adapter = _copy_tree(env["adapter"], tmp_path / "adapter")
    before = _tree(adapter)
    code, err = _export(capsys, env, adapter, adapter=adapter)
    _refused(code, err, "is the adapter_name_or_path folder")
    assert _tree(adapter) == before


def test_export_dir_given_through_a_link_to_the_model_is_refused(env, tmp_path, capsys):
    link = tmp_path / "model-link"
    link.symlink_to(env["model"], target_is_directory=True)
    before = _tree(env["model"])
    code, err = _export(capsys, env, link)
    _refused(code, err, "symbolic link")
    assert _tree(env["model"]) == before


def test_export_dir_inside_the_model_folder_is_refused(env, tmp_path, capsys):
    model = _copy_tree(env["model"], tmp_path / "base")
    before = _tree(model)
    code, err = _export(capsys, env, model / "merged", model=model)
    _refused(code, err, "lies inside the model_name_or_path folder")
    assert _tree(model) == before and not (model / "merged").exists()


def test_non_empty_folder_that_is_not_an_export_is_refused(env, tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    code, err = _export(capsys, env, target)
    _refused(code, err, "is not empty and is not an npu-ft export", MANIFEST_NAME)
    assert _tree(target) == {"thesis.tex": b"years of work"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging folder left


def test_previous_export_with_a_foreign_file_is_refused(env, tmp_path, capsys):
    target = tmp_path / "merged"
    assert _export(capsys, env, target)[0] == 0
    (target / "README.md").write_text("my model card")
    before = _tree(target)
    code, err = _export(capsys, env, target)
    _refused(code, err, "also holds what npu-ft did not write (README.md)")
    assert _tree(target) == before


def test_a_file_as_export_dir_is_refused(env, tmp_path, capsys):
    target = tmp_path / "model.bin"
    target.write_bytes(b"\0" * 16)
    code, err = _export(capsys, env, target)
    _refused(code, err, "is a file")
    assert target.read_bytes() == b"\0" * 16


@pytest.mark.parametrize("manifest", ['{"written_by": "npu-ft export", "files": ["../../etc/passwd"]}',
                                      '{"files": []}', "not json"])
def test_a_forged_or_broken_manifest_is_refused(env, tmp_path, capsys, manifest):
    target = tmp_path / "merged"
    target.mkdir()
    (target / MANIFEST_NAME).write_text(manifest)
    (target / "weights.bin").write_bytes(b"x")
    before = _tree(target)
    code, err = _export(capsys, env, target)
    _refused(code, err, MANIFEST_NAME)
    assert _tree(target) == before


# -- bad input: one line naming the file or key, nothing written -------------------------------------
@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("adapter_model.safetensors", b"\x00junk" * 50, "adapter_model.safetensors: not a readable safetensors file"),
        ("adapter_config.json", b"{\"r\": 4,", "adapter_config.json: not a valid adapter config"),
        ("adapter_config.json", b"\xff\xfe\x00garbage", "adapter_config.json: not a valid adapter config"),
        ("adapter_config.json", b"[1, 2]", "adapter_config.json: not a valid adapter config"),
        ("adapter_config.json", b"{\"target_modules\": [\"q_proj\"]}", "adapter_config.json: key 'r' is missing"),
    ],
)
def test_garbage_adapter_file_is_one_line(env, tmp_path, capsys, name, content, fragment):
    adapter = _copy_tree(env["adapter"], tmp_path / "adapter")
    (adapter / name).write_bytes(content)
    target = tmp_path / "merged"
    code, err = _export(capsys, env, target, adapter=adapter)
    _refused(code, err, fragment)
    assert not target.exists()


@pytest.mark.parametrize("size", ["0", "-1", "1.5", "true"])
def test_export_size_must_be_positive(env, tmp_path, capsys, size):
    code, err = _export(capsys, env, tmp_path / "merged", f"export_size={size}")
    _refused(code, err, "key 'export_size'")
    assert not (tmp_path / "merged").exists()


# -- replacing a previous export -------------------------------------------------------------------
def test_previous_export_is_replaced_and_user_siblings_survive(env, tmp_path, capsys):
    """main wrote through ``.tmp-<name>`` / ``.old-<name>`` and deleted whatever had those names."""
    target = tmp_path / "merged"
    for sibling in (".tmp-merged", ".old-merged"):
        (tmp_path / sibling).mkdir()
        (tmp_path / sibling / "keep.txt").write_text("mine")
    assert _export(capsys, env, target)[0] == 0
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    assert manifest["written_by"] == "npu-ft export"
    assert sorted(manifest["files"]) == sorted(set(_tree(target)) - {MANIFEST_NAME})
    assert "model.safetensors" in manifest["files"] and "tokenizer.json" in manifest["files"]
    first = _tree(target)

    code, err = _export(capsys, env, target, "infer_dtype=bfloat16")  # a different export, same folder
    assert code == 0, err
    second = _tree(target)
    assert set(second) == set(first) and second["model.safetensors"] != first["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".old-merged", ".tmp-merged", "merged"]
    for sibling in (".tmp-merged", ".old-merged"):
        assert (tmp_path / sibling / "keep.txt").read_text() == "mine"


def test_export_files_get_the_process_umask(env, tmp_path, capsys):
    target = tmp_path / "merged"
    assert _export(capsys, env, target)[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == 0o777 & ~umask  # mkdtemp would have made it 0700
    for path in target.iterdir():
        assert (path.stat().st_mode & 0o777) == 0o666 & ~umask, path


def test_export_is_a_working_model(env, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    target = tmp_path / "merged"
    assert _export(capsys, env, target)[0] == 0
    merged = AutoModelForCausalLM.from_pretrained(str(target))
    base = AutoModelForCausalLM.from_pretrained(str(env["model"]))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert not torch.allclose(merged(ids).logits, base(ids).logits)  # the adapter was merged in


# -- publish(): the swap itself --------------------------------------------------------------------
def _write(files: dict[str, str]):
    def write(folder: Path) -> None:
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
    return write


def test_an_interrupted_export_keeps_the_previous_one(tmp_path):
    target = tmp_path / "merged"
    publish(target, _write({"a.safetensors": "old", "sub/b.json": "old"}), "r.yaml", {}, {})
    before = _tree(target)

    def crash(folder: Path) -> None:
        (folder / "a.safetensors").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        publish(target, crash, "r.yaml", {}, {})
    assert _tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_swap_removes_only_what_the_old_manifest_lists(tmp_path):
    target = tmp_path / "merged"
    publish(target, _write({"a.safetensors": "1", "sub/b.json": "1"}), "r.yaml", {}, {})
    publish(target, _write({"c.safetensors": "2"}), "r.yaml", {}, {})
    assert _tree(target) == {"c.safetensors": b"2", MANIFEST_NAME: (target / MANIFEST_NAME).read_bytes()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_check_export_dir_accepts_new_and_empty_folders(tmp_path):
    check_export_dir(tmp_path / "new", "r.yaml", {"model_name_or_path": [str(tmp_path / "m")]})
    (tmp_path / "empty").mkdir()
    check_export_dir(tmp_path / "empty", "r.yaml", {})
    with pytest.raises(ExportError, match="lies inside"):
        check_export_dir(tmp_path / "m" / "x", "r.yaml", {"model_name_or_path": [str(tmp_path / "m")]})
