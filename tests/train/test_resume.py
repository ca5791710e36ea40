"""A run killed with SIGKILL mid-training and resumed with ``resume_from_checkpoint`` gives the
uninterrupted run's loss at every later step (fp32, same seed); checkpoints are never half-written.
A resume never continues another run (run identity) or trains past the end; ``overwrite_output_dir``
leaves no checkpoint of an earlier run behind; resuming reads no pickle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from npu_ft.config import load_config
from npu_ft.train.checkpoint import CheckpointError, atomic_publish, latest_checkpoint, resolve_resume
from npu_ft.train.cli import train_main
from npu_ft.train.run import TrainingError, run_sft

from ._sft_helpers import base_recipe, read_log, step_losses, tiny_model_dir, write_dataset, write_recipe

STEPS, SAVE_EVERY, KILL_AFTER = 10, 2, 4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return {"model": tiny_model_dir(root), "data": write_dataset(root / "data", n=24), "root": root}


def _recipe(env, out: Path, name: str) -> Path:
    # 24 examples / batch 2 / accumulation 2 = 6 steps per epoch: the kill and the resume fall in
    # epoch 1 and training crosses an epoch boundary (reshuffle) after resuming
    return write_recipe(env["root"] / f"{name}.yaml", base_recipe(
        env["model"], env["data"], out, max_steps=STEPS, save_steps=SAVE_EVERY, gradient_accumulation_steps=2,
        lora_dropout=0.1))


def _complete(ckpt: Path) -> bool:
    return (ckpt / "trainer_state.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(env):
    reference = env["root"] / "reference"
    run_sft(load_config(_recipe(env, reference, "reference")))
    expected = step_losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))

    killed = env["root"] / "killed"
    recipe = _recipe(env, killed, "killed")
    proc = subprocess.Popen([sys.executable, "-m", "npu_ft.cli", "train", str(recipe)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    target = killed / f"checkpoint-{KILL_AFTER}"
    deadline = time.time() + 600
    try:
        while not target.exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "checkpoint never appeared"
            time.sleep(0.02)
        still_running = proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert still_running, "the run finished before SIGKILL"
    assert proc.returncode == -signal.SIGKILL
    # every checkpoint-N that exists is complete (atomic rename)
    for ckpt in killed.glob("checkpoint-*"):
        assert _complete(ckpt), ckpt
    assert not (killed / "adapter_model.safetensors").exists()

    last = latest_checkpoint(str(killed))
    resumed_from = int(last.rsplit("-", 1)[1])
    assert KILL_AFTER <= resumed_from < STEPS
    result = run_sft(load_config(recipe, ["resume_from_checkpoint=" + last]))
    assert result.resumed_from == last and result.global_step == STEPS
    got = step_losses(killed)
    assert sorted(got) == list(range(1, STEPS + 1))  # lines past the checkpoint were replaced
    for step in range(resumed_from + 1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
    for step in range(1, resumed_from + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
    assert not list(killed.glob("tmp-checkpoint-*"))


def test_resume_true_picks_latest_and_errors(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resolve_resume(True, str(out))
    for step in (2, 10, 4):
        staged = tmp_path / f"staged-{step}"
        staged.mkdir()
        (staged / "trainer_state.json").write_text("{}")
        out.mkdir(exist_ok=True)
        atomic_publish(str(staged), str(out / f"checkpoint-{step}"))
    (out / "tmp-checkpoint-12").mkdir()  # an interrupted save is never picked
    assert resolve_resume("true", str(out)) == str(out / "checkpoint-10")
    assert resolve_resume(None, str(out)) is None
    with pytest.raises(CheckpointError, match="not a folder"):
        resolve_resume(str(tmp_path / "nope"), str(out))


# ---------------------------------------------------------------------------------------------
# never past the end; run identity; overwrite_output_dir
# ---------------------------------------------------------------------------------------------
def _short_recipe(env, out: Path, name: str, **overrides) -> Path:
    # 24 examples / batch 2 = 12 steps per epoch: max_steps 4 ends mid-epoch (where transformers
    # used to run a 5th step when resumed from checkpoint-4)
    settings = dict(max_steps=4, save_steps=2, overwrite_output_dir=False)
    settings.update(overrides)
    return write_recipe(env["root"] / f"{name}.yaml", base_recipe(env["model"], env["data"], out, **settings))


def _error_line(code: int, err: str) -> str:
    """The one error line of a failed ``npu-ft train`` (exit 1, no traceback)."""
    errors = [line for line in err.splitlines() if "npu-ft train: error:" in line]
    assert code == 1 and "Traceback" not in err and len(errors) == 1, err
    return errors[0]


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under folder with (size, mtime_ns): equal before and after means nothing was written."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("end", [dict(max_steps=4, save_steps=2),  # the end falls mid-epoch
                                 dict(max_steps=-1, num_train_epochs=0.5, save_steps=3)],  # 12 steps/epoch: 6
                         ids=["max_steps", "epochs"])
def test_rerun_of_finished_run_trains_no_step(env, caplog, end):
    out = env["root"] / f"finished-{end['max_steps']}"
    total, every = (4, 2) if end["max_steps"] > 0 else (6, 3)
    recipe = _short_recipe(env, out, f"finished-{total}", **end)
    run_sft(load_config(recipe))
    results = (out / "train_results.json").read_text()
    adapter = (out / "adapter_model.safetensors").read_bytes()
    with caplog.at_level("WARNING", logger="npu_ft.train.run"):
        again = run_sft(load_config(recipe))  # auto-resumes from the last checkpoint (overwrite_output_dir false)
    assert max(step_losses(out)) == total  # no 5/4 line
    assert all(rec["current_steps"] <= total for rec in read_log(out))
    assert again.global_step == total and again.already_finished
    assert again.resumed_from == str(out / f"checkpoint-{total}")
    assert f"already at the end of training (step {total} of {total})" in caplog.text
    assert (out / "train_results.json").read_text() == results  # the finished run's metrics are kept
    assert (out / "adapter_model.safetensors").read_bytes() == adapter
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{every}", f"checkpoint-{total}"]


def test_kill_during_final_save_then_rerun_writes_final_model_without_a_step(env):
    out = env["root"] / "killed-final"
    recipe = _short_recipe(env, out, "killed-final")
    run_sft(load_config(recipe))
    # what a kill during the final save leaves: checkpoint-4 complete, the final files partly moved
    for name in ("adapter_config.json", "train_results.json", "all_results.json", "trainer_state.json"):
        (out / name).unlink()
    (out / "adapter_model.safetensors").write_bytes(b"half")
    again = run_sft(load_config(recipe, ["resume_from_checkpoint=true"]))
    assert max(step_losses(out)) == 4
    assert again.global_step == 4 and again.already_finished
    final = out / "adapter_model.safetensors"
    assert final.read_bytes() == (out / "checkpoint-4" / "adapter_model.safetensors").read_bytes()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert (out / "adapter_config.json").is_file()
    # the returned model is the trained one (the checkpoint's adapter), not a fresh adapter
    from npu_ft.train.adapter_io import adapter_state_dict

    tensors = load_file(str(final))
    for key, value in adapter_state_dict(again.model).items():
        assert torch.equal(value, tensors[key]), key


def test_auto_resume_refuses_a_checkpoint_of_another_run(env, capsys):
    out = env["root"] / "other-run"
    run_sft(load_config(_short_recipe(env, out, "other-run-a")))
    before = _tree(out)
    recipe = _short_recipe(env, out, "other-run-b", lora_rank=16)
    capsys.readouterr()
    code = train_main([str(recipe)])
    err = _error_line(code, capsys.readouterr().err)
    first = json.loads((out / "checkpoint-4" / "npu_ft_run.json").read_text())["run_id"]
    assert f"checkpoint-4 was made by run {first}" in err
    assert "lora_rank 8" in err and "lora_rank 16" in err and "this run is" in err
    assert "overwrite_output_dir: true" in err
    assert _tree(out) == before  # nothing written


def test_explicit_resume_refuses_a_checkpoint_made_with_other_data(env, tmp_path):
    data = write_dataset(tmp_path / "data", n=24)
    out = tmp_path / "out"
    run_sft(load_config(write_recipe(tmp_path / "a.yaml", base_recipe(
        env["model"], data, out, max_steps=4, save_steps=2))))
    write_dataset(tmp_path / "data", n=24, seed=1)  # same file name, other rows
    recipe = write_recipe(tmp_path / "b.yaml", base_recipe(env["model"], data, out, max_steps=4, save_steps=2))
    with pytest.raises(TrainingError) as info:
        run_sft(load_config(recipe, [f"resume_from_checkpoint={out / 'checkpoint-2'}"]))
    message = str(info.value)
    assert "checkpoint-2 was made by run" in message and "data file toy.json" in message
    assert "point resume_from_checkpoint at a checkpoint of this run" in message


@pytest.mark.parametrize("first,second", [("lora", "full"), ("full", "lora")])
def test_checkpoint_of_the_other_method_is_refused(env, tmp_path, capsys, first, second):
    out = tmp_path / "out"
    run_sft(load_config(write_recipe(tmp_path / "a.yaml", base_recipe(
        env["model"], env["data"], out, finetuning_type=first, max_steps=2, save_steps=2))))
    before = _tree(out)
    recipe = write_recipe(tmp_path / "b.yaml", base_recipe(env["model"], env["data"], out, finetuning_type=second,
                                                           max_steps=2, save_steps=2))
    capsys.readouterr()
    code = train_main([str(recipe), f"resume_from_checkpoint={out / 'checkpoint-2'}"])
    err = _error_line(code, capsys.readouterr().err)
    assert f"is a {first} checkpoint" in err and f"this run is {second}" in err
    assert _tree(out) == before
    # the loader refuses it too (a checkpoint without run file: told apart by its files)
    (out / "checkpoint-2" / "npu_ft_run.json").unlink()
    with pytest.raises(TrainingError, match=f"is a {'lora' if first == 'lora' else 'full'} checkpoint"):
        run_sft(load_config(recipe, [f"resume_from_checkpoint={out / 'checkpoint-2'}"]))


def test_overwrite_leaves_no_checkpoint_of_the_earlier_run(env, tmp_path, caplog):
    out = tmp_path / "out"
    run_sft(load_config(write_recipe(tmp_path / "a.yaml", base_recipe(
        env["model"], env["data"], out, max_steps=6, save_steps=2))))
    (out / "notes.txt").write_text("mine")  # the user's own file
    foreign = out / "checkpoint-8"  # a checkpoint npu-ft did not write (e.g. LLaMA-Factory's)
    foreign.mkdir()
    (foreign / "trainer_state.json").write_text("{}")
    (out / "trainer_log.jsonl").open("a").write("{}\n")  # changed since npu-ft wrote it
    with caplog.at_level("WARNING", logger="npu_ft.train.previous_run"):
        second = run_sft(load_config(write_recipe(tmp_path / "b.yaml", base_recipe(
            env["model"], env["data"], out, max_steps=2, save_steps=2, overwrite_output_dir=True))))
    assert second.resumed_from is None and second.global_step == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-2")
    ours = json.loads((out / "npu_ft_run.json").read_text())["fingerprint"]
    assert json.loads((out / "checkpoint-2" / "npu_ft_run.json").read_text())["fingerprint"] == ours
    assert (out / "notes.txt").read_text() == "mine"
    aside = list(out.glob("previous-run-*"))
    assert len(aside) == 1 and "moved the earlier run's other files" in caplog.text
    assert sorted(p.name for p in aside[0].iterdir()) == ["checkpoint-8", "trainer_log.jsonl"]
    assert [rec["current_steps"] for rec in read_log(out) if "loss" in rec] == [1, 2]
    # and a later automatic resume finds this run's checkpoint, nothing of the earlier run
    third = run_sft(load_config(write_recipe(tmp_path / "c.yaml", base_recipe(
        env["model"], env["data"], out, max_steps=2, save_steps=2, overwrite_output_dir=False))))
    assert third.already_finished and third.resumed_from == str(out / "checkpoint-2")


def test_resume_needs_no_pickle_and_accepts_a_checkpoint_without_run_file(env, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "a.yaml", base_recipe(env["model"], env["data"], out, max_steps=4,
                                                           save_steps=2))
    run_sft(load_config(recipe))
    expected = step_losses(out)
    ckpt = out / "checkpoint-2"
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
    (ckpt / "npu_ft_run.json").unlink()  # as if made by an older npu-ft

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called on resume")

    monkeypatch.setattr(torch, "load", no_pickle)
    with caplog.at_level("WARNING", logger="npu_ft.train.run_identity"):
        result = run_sft(load_config(recipe, [f"resume_from_checkpoint={ckpt}"]))
    assert "has no npu_ft_run.json" in caplog.text
    assert result.global_step == 4
    got = step_losses(out)
    for step in (3, 4):  # optimizer, scheduler and RNG state came back from the safetensors files
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
