"""A run killed with SIGKILL mid-training and resumed with ``resume_from_checkpoint`` gives the
uninterrupted run's loss at every later step (fp32, same seed); checkpoints are never half-written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from npu_ft.train.checkpoint import CheckpointError, atomic_publish, latest_checkpoint, resolve_resume
from npu_ft.train.config import load_config
from npu_ft.train.run import run_sft

from ._sft_helpers import base_recipe, step_losses, tiny_model_dir, write_dataset, write_recipe

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
