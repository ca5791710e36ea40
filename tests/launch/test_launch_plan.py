"""torchrun planning, launcher flags and the pre-launch checks: everything that must fail (or
succeed) before a single process is started. No process is launched here: the hook's ``run`` is a
recorder."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import npu_ft.device
from npu_ft.cli_common import UsageError
from npu_ft.config import build_config
from npu_ft.device import DeviceBackend
from npu_ft.launch import LaunchError, LaunchPlan, launch_or_init, plan_launch, pop_launch_flags, torchrun_command
from npu_ft.launch.checks import check_launch, zero_offload, zero_stage

from ._helpers import ROOT, toy_dataset, write_yaml

DS = ROOT / "recipes" / "deepspeed"


class FakeAccelerator:
    """Stands in for the npu / cuda backend: ``count`` devices visible."""

    def __init__(self, name: str, count: int):
        self.name, self.count = name, count
        self.dist_backend = {"npu": "hccl", "cuda": "nccl"}[name]

    def device_count(self) -> int:
        return self.count

    # the device layer's rule (one process per visible device), read through device_count above
    local_process_slots = DeviceBackend.local_process_slots


@pytest.fixture
def npu8(monkeypatch):
    monkeypatch.setattr(npu_ft.device, "get_backend", lambda name=None: FakeAccelerator("npu", 8))


def test_cpu_defaults_to_one_process_and_gloo():
    plan = plan_launch("cpu", env={})
    assert (plan.device, plan.dist_backend, plan.nproc_per_node, plan.nnodes, plan.node_rank) == (
        "cpu",
        "gloo",
        1,
        1,
        0,
    )
    assert not plan.distributed and plan.master_addr == "127.0.0.1" and 0 < plan.master_port < 65536


def test_cpu_nproc_can_be_forced():
    plan = plan_launch("cpu", env={"NPROC_PER_NODE": "2", "MASTER_PORT": "29511"})
    assert plan.nproc_per_node == 2 and plan.distributed and plan.master_port == 29511


def test_npu_uses_every_visible_device_and_hccl(npu8):
    plan = plan_launch("npu", env={})
    assert (plan.nproc_per_node, plan.dist_backend) == (8, "hccl")


def test_visible_devices_env_is_honoured(monkeypatch):
    # the runtime already hides devices listed out by ASCEND_RT_VISIBLE_DEVICES (count 2 here)
    monkeypatch.setattr(npu_ft.device, "get_backend", lambda name=None: FakeAccelerator("npu", 2))
    env = {"ASCEND_RT_VISIBLE_DEVICES": "4,5"}
    plan = plan_launch("npu", env=env)
    assert plan.nproc_per_node == 2 and plan.visible_devices == ("4", "5")
    with pytest.raises(
        LaunchError, match=r"more processes than visible npu devices: 2 \(ASCEND_RT_VISIBLE_DEVICES=4,5\)"
    ):
        plan_launch("npu", env={**env, "NPROC_PER_NODE": "4"})


def test_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr(npu_ft.device, "get_backend", lambda name=None: FakeAccelerator("cuda", 3))
    plan = plan_launch("cuda", env={"CUDA_VISIBLE_DEVICES": "0,1,2"})
    assert (plan.nproc_per_node, plan.dist_backend) == (3, "nccl")
    with pytest.raises(LaunchError, match="twice"):
        plan_launch("cuda", env={"CUDA_VISIBLE_DEVICES": "0,0"})


def test_more_processes_than_devices(npu8):
    with pytest.raises(LaunchError, match="more processes than visible npu devices: 8"):
        plan_launch("npu", env={"NPROC_PER_NODE": "16"})


def test_more_cpu_processes_than_cores():
    n = (os.cpu_count() or 1) + 1
    with pytest.raises(LaunchError, match="more processes than this host has CPU cores"):
        plan_launch("cpu", env={"NPROC_PER_NODE": str(n)})


def test_multi_node(npu8):
    env = {"NNODES": "4", "NODE_RANK": "3", "MASTER_ADDR": "10.0.0.1"}
    plan = plan_launch("npu", env=env)
    assert (plan.nnodes, plan.node_rank, plan.world_size, plan.master_addr, plan.master_port) == (
        4,
        3,
        32,
        "10.0.0.1",
        29500,
    )
    cmd = torchrun_command(plan, ["r.yaml", "lora_rank=4"], python="python")
    assert cmd == [
        "python",
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "4",
        "--node_rank",
        "3",
        "--nproc_per_node",
        "8",
        "--master_addr",
        "10.0.0.1",
        "--master_port",
        "29500",
        "-m",
        "npu_ft.launch",
        "r.yaml",
        "lora_rank=4",
    ]


@pytest.mark.parametrize(
    "env, match",
    [
        ({"NNODES": "2"}, "NNODES=2 needs MASTER_ADDR"),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK=2 must be smaller than NNODES=2"),
        ({"NNODES": "two"}, "NNODES='two' is not an integer"),
        ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE=0 must be >= 1"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ],
)
def test_bad_environment(npu8, env, match):
    with pytest.raises(LaunchError, match=match):
        plan_launch("npu", env=env)


def test_pop_launch_flags():
    argv = ["--nproc-per-node", "2", "r.yaml", "--nnodes=1", "lora_rank=4", "--master_port", "29400"]
    assert pop_launch_flags(argv) == {"NPROC_PER_NODE": "2", "NNODES": "1", "MASTER_PORT": "29400"}
    assert argv == ["r.yaml", "lora_rank=4"]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["r.yaml", "--node-rank"], "--node-rank needs a value"),
        (["--nproc-per-node", "0", "r.yaml"], "--nproc-per-node '0': expected an integer >= 1"),
        (["--nproc-per-node=two", "r.yaml"], "--nproc-per-node 'two': expected an integer >= 1"),
        (["--master-port", "70000", "r.yaml"], "expected an integer >= 1 and <= 65535"),
        (["--node-rank", "-1", "r.yaml"], "--node-rank '-1': expected an integer >= 0"),
    ],
)
def test_bad_launch_flags_are_usage_errors(argv, match):
    with pytest.raises(UsageError, match=match):
        pop_launch_flags(argv)


def _cfg(**kw):
    return build_config({"model_name_or_path": "m", "dataset": "d", "do_train": True, **kw}, source="r.yaml")


def test_deepspeed_stage_and_offload_readers():
    z3o = json.loads((DS / "ds_z3_offload_config.json").read_text())
    assert zero_stage(z3o) == 3 and zero_offload(z3o) == (True, True)
    assert zero_stage(json.loads((DS / "ds_z2_config.json").read_text())) == 2
    assert zero_offload(json.loads((DS / "ds_z3_config.json").read_text())) == (False, False)
    assert zero_stage(None) == 0


def test_qlora_with_zero3_is_refused():
    cfg = _cfg(quantization_bit=4, deepspeed=str(DS / "ds_z3_config.json"))
    with pytest.raises(LaunchError, match="QLoRA .* ZeRO-3 is not supported"):
        check_launch(cfg)
    assert (
        check_launch(_cfg(quantization_bit=4, deepspeed=str(DS / "ds_z2_config.json")))["zero_optimization"]["stage"]
        == 2
    )
    assert check_launch(_cfg(deepspeed=str(DS / "ds_z3_config.json")))["zero_optimization"]["stage"] == 3


def test_deepspeed_config_problems(tmp_path):
    with pytest.raises(LaunchError, match="deepspeed config 'nope.json' not found"):
        check_launch(_cfg(deepspeed="nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LaunchError, match="is not valid JSON"):
        check_launch(_cfg(deepspeed=str(bad)))
    with pytest.raises(LaunchError, match="bf16.enabled=True but the recipe has bf16: false"):
        check_launch(_cfg(deepspeed={"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(
        LaunchError, match="train_micro_batch_size_per_gpu=4 but the recipe has per_device_train_batch_size: 8"
    ):
        check_launch(_cfg(deepspeed={"train_micro_batch_size_per_gpu": 4}))
    plan = LaunchPlan("cpu", "gloo", 2)
    with pytest.raises(LaunchError, match="parameter offload"):
        check_launch(_cfg(deepspeed=str(DS / "ds_z3_offload_config.json")), plan)


def test_deepspeed_missing_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(LaunchError, match="deepspeed package is not installed"):
        check_launch(_cfg(deepspeed=str(DS / "ds_z2_config.json")))


# -- the hook: what it launches, and that nothing launches on bad input -----------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A real tiny model folder (the launcher loads its tokenizer) and a toy dataset."""
    from npu_ft.model.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("hook")
    return {"model": build_tiny_model(root / "tiny", arch="qwen2", seed=0), "data": toy_dataset(root / "data")}


def _recipe(tmp_path: Path, inputs, **kw) -> Path:
    return write_yaml(
        tmp_path / "r.yaml",
        {
            "model_name_or_path": str(inputs["model"]),
            "dataset": "toy",
            "dataset_dir": str(inputs["data"]),
            "template": "qwen",
            "do_train": True,
            "output_dir": str(tmp_path / "out"),
            "device": "cpu",
            **kw,
        },
    )


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, cmd, env):
        self.calls.append((cmd, env))
        return 0


def test_hook_launches_torchrun_with_the_env(tmp_path, capsys, inputs):
    recipe = _recipe(tmp_path, inputs)
    rec = Recorder()
    argv = ["--nproc-per-node", "2", str(recipe), "lora_rank=4"]
    assert launch_or_init(argv, env={"MASTER_PORT": "29512"}, run=rec) == 0
    ((cmd, env),) = rec.calls
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and cmd[cmd.index("--master_port") + 1] == "29512"
    assert cmd[-4:] == ["-m", "npu_ft.launch", str(recipe), "lora_rank=4"]
    assert env["NPU_FT_DEVICE"] == "cpu" and env["NPROC_PER_NODE"] == "2"
    assert argv == [str(recipe), "lora_rank=4"]
    assert "launching 2 processes (1 node(s) x 2) on cpu with gloo" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_hook_single_process_goes_on(tmp_path, inputs):
    rec = Recorder()
    assert launch_or_init([str(_recipe(tmp_path, inputs))], env={}, run=rec) is None
    assert rec.calls == []


def _bad_data(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "bad_data"
    folder.mkdir()
    (folder / "dataset_info.json").write_text(json.dumps({"toy": {"file_name": "toy.jsonl"}}))
    (folder / "toy.jsonl").write_text(text)
    return folder


# every input the launcher checks before starting a worker: one line, exit 1, nothing launched
@pytest.mark.parametrize(
    "kw, env, match",
    [
        ({}, {"NPROC_PER_NODE": "999"}, "more processes than this host has CPU cores"),
        ({}, {"NNODES": "2", "NPROC_PER_NODE": "1"}, "needs MASTER_ADDR"),
        (
            {"quantization_bit": 4, "deepspeed": str(DS / "ds_z3_config.json")},
            {"NPROC_PER_NODE": "2"},
            "ZeRO-3 is not supported",
        ),
        ({"lora_rnak": 4}, {"NPROC_PER_NODE": "2"}, "r.yaml: key 'lora_rnak': unknown key"),
        ({"model_name_or_path": "/nonexistent/model"}, {"NPROC_PER_NODE": "2"}, "r.yaml: model_name_or_path"),
        ({"dataset": "nope"}, {"NPROC_PER_NODE": "2"}, "Undefined dataset 'nope'"),
        ({"template": "llama9"}, {"NPROC_PER_NODE": "2"}, "r.yaml: key 'template': unknown template 'llama9'"),
        ({"report_to": "no_such_tracker"}, {"NPROC_PER_NODE": "2"}, "key 'report_to': unknown value 'no_such_tracker'"),
        ({"device": "cuda"}, {"NPROC_PER_NODE": "2"}, "cuda unavailable"),
        ({"do_train": False}, {"NPROC_PER_NODE": "2"}, "key 'do_train'"),
    ],
)
def test_hook_refuses_before_launch(tmp_path, capsys, inputs, kw, env, match):
    import torch

    if kw.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is usable here")
    rec = Recorder()
    assert launch_or_init([str(_recipe(tmp_path, inputs, **kw))], env=env, run=rec) == 1
    assert rec.calls == []
    err = capsys.readouterr().err
    assert err.startswith("npu-ft train: error: ") and match in err and err.count("\n") == 1, err


def test_hook_reads_every_data_file_before_launch(tmp_path, capsys, inputs):
    good = json.dumps({"instruction": "a", "input": "", "output": "b"})
    data = _bad_data(tmp_path, f"{good}\n{good}\n{{oops\n")
    rec = Recorder()
    recipe = _recipe(tmp_path, inputs, dataset_dir=str(data))
    assert launch_or_init([str(recipe)], env={"NPROC_PER_NODE": "2"}, run=rec) == 1
    assert rec.calls == []
    assert "toy.jsonl:3" in capsys.readouterr().err


def test_hook_refuses_a_model_folder_without_tokenizer(tmp_path, capsys, inputs):
    """Without tokenizer files transformers builds an empty tokenizer and training runs on nothing:
    refused in the launcher and in a single process."""
    import shutil

    model = tmp_path / "no-tokenizer"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(inputs["model"] / name, model / name)
    recipe = _recipe(tmp_path, inputs, model_name_or_path=str(model))
    rec = Recorder()
    for env in ({"NPROC_PER_NODE": "2"}, {}):
        assert launch_or_init([str(recipe)], env=env, run=rec) == 1
        assert rec.calls == [] and "has no tokenizer files" in capsys.readouterr().err


def test_launcher_loads_the_tokenizer(tmp_path, capsys, inputs):
    """A tokenizer file that does not load: the launcher says so once, before starting workers."""
    import shutil

    model = tmp_path / "bad-tokenizer"
    shutil.copytree(inputs["model"], model)
    (model / "tokenizer.json").write_text("{not json")
    recipe = _recipe(tmp_path, inputs, model_name_or_path=str(model))
    rec = Recorder()
    assert launch_or_init([str(recipe)], env={"NPROC_PER_NODE": "2"}, run=rec) == 1
    err = capsys.readouterr().err
    assert rec.calls == [] and "cannot load its tokenizer" in err and err.count("\n") == 1, err


def test_hook_usage_errors_exit_2(tmp_path, capsys, inputs):
    recipe = str(_recipe(tmp_path, inputs))
    for argv in (["--nproc-per-node"], [recipe, "--foo"], [recipe, "lora_rank"], ["lora_rank=4"]):
        assert launch_or_init(list(argv), env={}, run=Recorder()) == 2, argv
        assert capsys.readouterr().err.startswith("npu-ft train: error: ")
