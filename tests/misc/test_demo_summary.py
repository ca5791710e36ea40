"""The demo's closing line names only the files its run wrote."""

from __future__ import annotations

from npu_ft.demo import _run_files


def test_only_written_files_are_named(tmp_path):
    (tmp_path / "trainer_log.jsonl").write_text("{}\n")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert _run_files(tmp_path) == "trainer_log.jsonl, model.safetensors"  # no loss plot: too few logged steps
    (tmp_path / "training_loss.png").write_bytes(b"png")
    assert "training_loss.png" in _run_files(tmp_path)
    assert _run_files(tmp_path / "missing") == "no files"
