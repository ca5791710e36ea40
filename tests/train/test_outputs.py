"""What a run writes: file modes follow the umask, no pickle anywhere, the training state round-trips
through safetensors, the earlier run's files are set aside (never a user's), output_dir checks."""

from __future__ import annotations

import errno
import json
import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from npu_ft.config import load_config
from npu_ft.train.outputs import OutputDirError, check_output_dir, is_disk_full
from npu_ft.train.previous_run import is_run_file, set_aside_previous_run
from npu_ft.train.run import run_sft
from npu_ft.train.run_identity import RUN_FILE, compute_identity, file_digest, read_run_file, snapshot_files
from npu_ft.train.state_io import UnsupportedStateError, load_state, save_state

from ._sft_helpers import base_recipe, tiny_model_dir, write_dataset, write_recipe

#: what pickle / torch.save files start with (protocol 2+ opcode, zip archive)
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    return {"model": tiny_model_dir(root), "data": write_dataset(root / "data", n=8), "root": root}


@pytest.fixture
def umask():
    """Set a umask for one test and restore the old one."""
    saved: list[int] = []

    def set_mask(mask: int) -> None:
        saved.append(os.umask(mask))

    yield set_mask
    if saved:
        os.umask(saved[0])


@pytest.mark.parametrize("method,mask", [("lora", 0o022), ("full", 0o002)])
def test_every_output_follows_the_umask_and_no_pickle_is_written(env, tmp_path, umask, method, mask):
    umask(mask)
    out = tmp_path / "out"
    run_sft(load_config(write_recipe(tmp_path / "r.yaml", base_recipe(
        env["model"], env["data"], out, finetuning_type=method, max_steps=2, save_steps=1, plot_loss=True))))
    entries = [out, *out.rglob("*")]
    assert len(entries) > 20
    for path in entries:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o777 if path.is_dir() else 0o666) & ~mask, f"{path}: {oct(mode)}"
    weights = out / ("adapter_model.safetensors" if method == "lora" else "model.safetensors")
    assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~mask
    for path in out.rglob("*"):
        if path.is_file():
            assert path.suffix not in (".bin", ".pt", ".pth", ".pkl", ".pickle"), path
            with open(path, "rb") as f:
                assert not f.read(4).startswith(_PICKLE_MAGIC), f"{path} looks like a pickle / torch.save file"
    args = json.loads((out / "checkpoint-1" / "training_args.json").read_text())
    assert args["output_dir"] == str(out) and args["max_steps"] == 2
    assert (out / "training_args.json").is_file()


def test_state_round_trips_without_pickle(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(7))]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.8, 0.95))
    for _ in range(2):
        (params[0].square().sum() + params[1].sum()).backward()
        opt.step()
    shared = torch.arange(4.0)
    state = {"optimizer": opt.state_dict(), "python": random.getstate(), "numpy": np.random.get_state(),
             "cpu": torch.random.get_rng_state(), "nan": float("nan"), "tuple": (1, "a", None),
             "same": [shared, shared], "view": shared[1:], "empty": torch.zeros(0), 3: {"int-key": True}}
    save_state(state, tmp_path / "s.safetensors")
    back = load_state(tmp_path / "s.safetensors")
    assert back["python"] == state["python"]
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], state["numpy"][1])
    assert back["numpy"][1].dtype == state["numpy"][1].dtype and back["numpy"][2:] == state["numpy"][2:]
    assert torch.equal(back["cpu"], state["cpu"]) and back["tuple"] == (1, "a", None) and back[3] == {"int-key": True}
    assert back["nan"] != back["nan"] and back["same"][0] is back["same"][1] and torch.equal(back["view"], shared[1:])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)
    fresh = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-3)
    fresh.load_state_dict(back["optimizer"])
    for i, p in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state[fresh.param_groups[0]["params"][i]][key], opt.state[p][key]), key
    with pytest.raises(UnsupportedStateError, match="object"):
        save_state({"x": object()}, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_set_aside_deletes_only_what_npu_ft_wrote(tmp_path, env):
    out = tmp_path / "out"
    ckpt = out / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"w")
    cfg = load_config(write_recipe(tmp_path / "r.yaml", base_recipe(env["model"], env["data"], out)))
    identity = compute_identity(cfg)
    from npu_ft.train.run_identity import write_run_file

    write_run_file(str(ckpt), identity, snapshot_files(str(ckpt)))
    (out / "adapter_model.safetensors").write_bytes(b"final")
    (out / "trainer_state.json").write_text("{}")
    write_run_file(str(out), identity, snapshot_files(str(out)))
    (out / "trainer_state.json").write_text('{"changed": 1}')  # no longer what npu-ft wrote
    (out / "config.json").write_text("{}")  # a run-file name npu-ft did not write
    (out / "README.md").write_text("mine")  # a run-file name (the model card) npu-ft did not write: moved
    (out / "notes.txt").write_text("mine")  # not a run file: stays
    keep = out / "checkpoint-9"  # e.g. the model folder itself
    keep.mkdir()
    done = set_aside_previous_run(str(out), keep=[str(keep)])
    assert sorted(done.deleted) == sorted(["checkpoint-2", "adapter_model.safetensors", RUN_FILE])
    assert sorted(done.moved) == ["README.md", "config.json", "trainer_state.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["notes.txt", "checkpoint-9", Path(done.moved_to).name])
    assert (Path(done.moved_to) / "README.md").read_text() == "mine"
    assert json.loads((Path(done.moved_to) / "trainer_state.json").read_text()) == {"changed": 1}
    assert is_run_file("model-00001-of-00002.safetensors") and not is_run_file("previous-run-20260101-000000")


def test_identity_fingerprint_changes_with_model_data_and_keys(env, tmp_path):
    cfg = load_config(write_recipe(tmp_path / "r.yaml", base_recipe(env["model"], env["data"], tmp_path / "o")))
    base = compute_identity(cfg)
    assert compute_identity(cfg).fingerprint == base.fingerprint
    other = load_config(write_recipe(tmp_path / "r2.yaml", base_recipe(env["model"], env["data"], tmp_path / "x",
                                                                      logging_steps=3, save_steps=1)))
    assert compute_identity(other).fingerprint == base.fingerprint  # output keys are not the trajectory
    lr = load_config(write_recipe(tmp_path / "r3.yaml", base_recipe(env["model"], env["data"], tmp_path / "o",
                                                                   learning_rate=2e-3)))
    assert [d[0] for d in base.differences(compute_identity(lr))] == ["learning_rate"]
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))
    sampled = file_digest(str(big), sampled=True)
    data = bytearray(big.read_bytes())
    data[len(data) // 2 + 7] ^= 1  # inside a sampled slice? not necessarily; the ends always are
    data[5] ^= 1
    big.write_bytes(bytes(data))
    assert file_digest(str(big), sampled=True) != sampled and sampled.startswith("sampled:")
    assert read_run_file(str(tmp_path)) is None


def test_check_output_dir(tmp_path, env):
    check_output_dir(str(tmp_path / "new" / "deeper"), env["model"])  # creatable: fine, nothing made
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".npu_ft-write-probe-*"))
    with pytest.raises(OutputDirError, match="is the model folder"):
        check_output_dir(str(env["model"]) + "/", env["model"])
    with pytest.raises(OutputDirError, match="inside the model folder"):
        check_output_dir(str(env["model"] / "a" / ".." / "b"), env["model"])


def test_is_disk_full():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "x")
    assert is_disk_full(wrapped)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    # torch.save's message counts only where the folder is (nearly) full; "/" has room
    assert not is_disk_full(RuntimeError("[enforce fail at inline_container.cc] file write failed"), "/")
