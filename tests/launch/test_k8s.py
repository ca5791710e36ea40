"""``npu-ft k8s``: the manifests validate against published schemas; the pod's recipe is data (no
key injection) that ``npu-ft train`` reads back and that resumes after a restart; Ascend options;
bad input gets one line and exit code 1.

Validator: jsonschema (Draft 2020-12). Schemas, made for these tests from the public CRDs (each file
credits its source): the PyTorchJob CRD of the Kubeflow Training Operator
(tests/launch/schemas/pytorchjob-v1.schema.json) and the TrainJob CRD of Kubeflow Trainer v2.3.0
(tests/launch/schemas/trainjob-v1alpha1.schema.json). Their embedded core/v1 types (pod template,
volumes, env, security contexts, ...) resolve to the strict Kubernetes schemas shipped by the
``kubernetes-validate`` package, which also validates the ConfigMap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from npu_ft.launch.k8s import ASCEND_RESOURCE, JobOptions, build_job, build_manifests, dump_manifests, job_name_for
from npu_ft.launch.k8s.cli import k8s_main
from npu_ft.launch.k8s.options import check_quantity
from npu_ft.launch.k8s.pod import launch_script
from npu_ft.launch.torchrun import LaunchError

from ._helpers import ROOT

kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (test extra)")
jsonschema = pytest.importorskip("jsonschema")

K8S_VERSION = "1.30"
SCHEMAS = Path(__file__).with_name("schemas")
QUANTITY_PATTERN = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
                    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")  # the CRDs' resource.Quantity


def _validator(schema_file: str):
    import importlib.resources

    from referencing import Registry, Resource

    folder = (
        importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S_VERSION}.0-local-strict"
    )
    resources = [
        Resource.from_contents(json.loads((folder / name).read_text()))
        for name in ("podtemplatespec-v1.json", "_definitions.json")
    ]
    registry = Registry().with_resources((r.id(), r) for r in resources)
    schema = json.loads((SCHEMAS / schema_file).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


VALIDATORS = {"PyTorchJob": _validator("pytorchjob-v1.schema.json"),
              "TrainJob": _validator("trainjob-v1alpha1.schema.json")}


def errors_of(job) -> list[str]:
    errors = sorted(VALIDATORS[job["kind"]].iter_errors(job), key=lambda e: list(e.path))
    return [f"{list(e.path)}: {e.message}" for e in errors]


def validate(docs):
    configmap, job = docs
    kv.validate(configmap, K8S_VERSION, strict=True)
    assert not errors_of(job), "\n".join(errors_of(job)[:5])


def pods_of(job) -> list[dict]:
    """The pod specs of a PyTorchJob (every replica type) or the runtime patch of a TrainJob."""
    if job["kind"] == "PyTorchJob":
        return [spec["template"]["spec"] for spec in job["spec"]["pytorchReplicaSpecs"].values()]
    (patch,) = job["spec"]["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    return [rjob["template"]["spec"]["template"]["spec"]]


def env_of(container) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def pod_recipe(docs) -> dict:
    return yaml.safe_load(docs[0]["data"]["recipe.yaml"])


@pytest.fixture
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)


# ---------------------------------------------------------------------------------------------
# PyTorchJob (default)
# ---------------------------------------------------------------------------------------------
def test_multi_node_lora_zero3_job(in_root):
    docs = build_manifests("recipes/qwen2.5-72b/lora.yaml", nodes=4, npus_per_node=8, image="reg/npu-ft:1",
                           namespace="llm", hub_token_secret="hf-token", scheduler="volcano", pvc="ws")
    validate(docs)
    configmap, job = docs
    assert job["metadata"]["name"] == "npu-ft-qwen2-5-72b-lora" and job["spec"]["nprocPerNode"] == "8"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 3
    assert specs["Master"]["restartPolicy"] == specs["Worker"]["restartPolicy"] == "OnFailure"
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 4}
    # Volcano / MindCluster: scheduler name and the ring-controller label on job and pods
    assert job["metadata"]["labels"]["ring-controller.atlas"] == "ascend-910b"
    assert specs["Worker"]["template"]["metadata"]["labels"]["ring-controller.atlas"] == "ascend-910b"
    pod = specs["Worker"]["template"]["spec"]
    assert pod["schedulerName"] == "volcano" and "hostNetwork" not in pod
    (c,) = pod["containers"]
    assert c["name"] == "pytorch" and c["image"] == "reg/npu-ft:1"
    assert c["resources"]["requests"] == c["resources"]["limits"] == {ASCEND_RESOURCE: 8}
    env = env_of(c)
    assert env["NPROC_PER_NODE"]["value"] == "8" and env["HCCL_CONNECT_TIMEOUT"]["value"] == "1200"
    assert env["HCCL_IF_IP"] == {"name": "HCCL_IF_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    assert "HCCL_SOCKET_IFNAME" not in env  # HCCL_IF_IP would win anyway
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token", "optional": True}
    assert c["command"][-1].endswith("exec npu-ft train /etc/npu-ft/recipe.yaml")
    claim = {v["name"]: v for v in pod["volumes"]}["workspace"]["persistentVolumeClaim"]["claimName"]
    assert claim == "ws" and c["workingDir"] == "/workspace"
    # restrictive security context by default
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    # the driver comes from the node, read-only
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in ("/usr/local/Ascend/driver", "/usr/local/dcmi", "/usr/local/bin/npu-smi", "/etc/ascend_install.info"):
        assert mounts[path]["readOnly"] is True
        assert {v["name"]: v for v in pod["volumes"]}[mounts[path]["name"]]["hostPath"]["path"] == path
    # the pod gets the recipe with the DeepSpeed config next to it
    assert pod_recipe(docs)["deepspeed"] == "/etc/npu-ft/ds_config.json"
    assert json.loads(configmap["data"]["ds_config.json"])["zero_optimization"]["stage"] == 3
    assert configmap["metadata"]["annotations"]["npu-ft/recipe"] == "recipes/qwen2.5-72b/lora.yaml"


def test_single_node_qlora_job_and_cli(in_root, tmp_path, capsys):
    out = tmp_path / "job.yaml"
    rc = k8s_main(["recipes/qwen3-8b/qlora.yaml", "--nodes", "1", "--npus-per-node", "8", "--image", "img",
                   "--cpu", "96", "--memory", "1000Gi", "--env", "HCCL_EXEC_TIMEOUT=600", "--pvc", "ws",
                   "-o", str(out), "num_train_epochs=1"])
    assert rc == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    validate(docs)
    configmap, job = docs
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    c = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"] == {ASCEND_RESOURCE: 8, "cpu": "96", "memory": "1000Gi"}
    assert env_of(c)["HCCL_EXEC_TIMEOUT"]["value"] == "600"
    assert "ds_config.json" not in configmap["data"] and pod_recipe(docs)["num_train_epochs"] == 1
    assert json.loads(configmap["metadata"]["annotations"]["npu-ft/overrides"]) == ["num_train_epochs=1"]
    err = capsys.readouterr().err
    assert "wrote" in err and "--pvc not given" not in err
    assert not list(tmp_path.glob(".*"))  # the staging file was renamed
    # the stdout form is the same YAML; without --pvc a warning names the default claim
    assert k8s_main(["recipes/qwen3-8b/qlora.yaml", "--image", "img"]) == 0
    captured = capsys.readouterr()
    assert list(yaml.safe_load_all(captured.out))[1]["kind"] == "PyTorchJob"
    assert "npu-ft k8s: warning: --pvc not given: the pods mount the PersistentVolumeClaim 'npu-ft-workspace'" \
        in captured.err


def test_ascend_options(in_root):
    base = dict(nodes=2, npus_per_node=8, image="img", pvc="ws")
    default_pod = pods_of(build_manifests("recipes/qwen2.5-7b/lora.yaml", **base)[1])[0]
    docs = build_manifests("recipes/qwen2.5-7b/lora.yaml", **base, host_network=True, ascend_runtime=True,
                           hccl_socket_ifname="bond0", run_as_user="1000:1000", cap_add=("DAC_READ_SEARCH",),
                           node_selector={}, mount="/mnt/shared space")
    validate(docs)
    for pod in pods_of(docs[1]):
        assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
        assert "nodeSelector" not in pod
        assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}, "runAsNonRoot": True,
                                          "runAsUser": 1000, "runAsGroup": 1000}
        (c,) = pod["containers"]
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["DAC_READ_SEARCH"]}
        env = env_of(c)
        assert env["HCCL_SOCKET_IFNAME"]["value"] == "bond0" and "HCCL_IF_IP" not in env
        # the Ascend Docker Runtime mounts the driver: no hostPath volumes
        assert not [v for v in pod["volumes"] if "hostPath" in v]
        assert {m["mountPath"] for m in c["volumeMounts"]} == {"/mnt/shared space", "/etc/npu-ft", "/dev/shm"}
        assert "cd '/mnt/shared space' &&" in c["command"][-1]
    assert len([v for v in default_pod["volumes"] if "hostPath" in v]) == 4
    assert default_pod["nodeSelector"] == {"accelerator": "huawei-Ascend910"}
    # a literal --env HCCL_IF_IP replaces the downward-API one
    docs = build_manifests("recipes/qwen2.5-7b/lora.yaml", **base, env={"HCCL_IF_IP": "10.0.0.5"})
    assert env_of(pods_of(docs[1])[0]["containers"][0])["HCCL_IF_IP"] == {"name": "HCCL_IF_IP", "value": "10.0.0.5"}


def test_validator_rejects_broken_manifests(in_root):
    docs = build_manifests("recipes/qwen2.5-7b/full.yaml", nodes=2, npus_per_node=8, image="img", pvc="ws")
    validate(docs)
    job = json.loads(json.dumps(docs[1]))
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "two"
    assert errors_of(job)
    job = json.loads(json.dumps(docs[1]))
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resource"] = {}
    assert errors_of(job)  # a typo in the pod template is caught by the core/v1 schema
    job = json.loads(json.dumps(docs[1]))
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["securityContext"][
        "allowPrivilegeEscalation"] = "no"
    assert errors_of(job)
    job = json.loads(json.dumps(docs[1]))
    del job["spec"]["pytorchReplicaSpecs"]
    assert errors_of(job)


# ---------------------------------------------------------------------------------------------
# TrainJob (Kubeflow Trainer v2)
# ---------------------------------------------------------------------------------------------
def test_trainer_v2_trainjob(in_root):
    manifests = build_job("recipes/qwen2.5-72b/lora.yaml",
                          JobOptions(image="img", nodes=4, npus_per_node=8, api="trainer-v2", namespace="llm",
                                     pvc="ws", cpu="180", memory="1500Gi", scheduler="volcano",
                                     hub_token_secret="hf"))
    docs = manifests.docs
    validate(docs)
    configmap, job = docs
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert job["metadata"]["namespace"] == "llm" == configmap["metadata"]["namespace"]
    spec = job["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                  "name": "torch-distributed"}
    trainer = spec["trainer"]
    # numProcPerNode explicit: the Torch plugin's "auto" counts only "gpu" resources
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8 and trainer["image"] == "img"
    assert trainer["resourcesPerNode"]["limits"] == {ASCEND_RESOURCE: 8, "cpu": "180", "memory": "1500Gi"}
    names = {e["name"] for e in trainer["env"]}
    assert not {n for n in names if n.startswith("PET_")}  # reserved by the Torch plugin
    assert {"HCCL_IF_IP", "NPROC_PER_NODE", "HF_TOKEN"} <= names
    assert 'MASTER_ADDR="${PET_MASTER_ADDR:-' in trainer["command"][-1]
    (patch,) = spec["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == "node"  # the torch runtimes' replicated job and container
    template = rjob["template"]["spec"]["template"]
    assert template["metadata"]["labels"]["ring-controller.atlas"] == "ascend-910b"
    (c,) = template["spec"]["containers"]
    assert c["name"] == "node" and {m["mountPath"] for m in c["volumeMounts"]} >= {"/workspace", "/etc/npu-ft"}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert any("a TrainJob cannot choose its scheduler" in n for n in manifests.notes)
    # the schema keeps the CRDs' quantity pattern for resourcesPerNode
    bad = json.loads(json.dumps(job))
    bad["spec"]["trainer"]["resourcesPerNode"]["limits"]["memory"] = "10GB"
    assert errors_of(bad)
    bad = json.loads(json.dumps(job))
    bad["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"][
        "spec"]["template"]["spec"]["hostNetwork"] = True  # not patchable in a TrainJob
    assert errors_of(bad)
    bad = json.loads(json.dumps(job))
    bad["spec"]["trainer"]["env"][0]["valueFrom"] = {"fieldRef": {}}
    assert errors_of(bad)
    bad = json.loads(json.dumps(job))
    del bad["spec"]["runtimeRef"]
    assert errors_of(bad)


def test_trainer_v2_refuses_host_network(in_root, capsys):
    rc = k8s_main(["recipes/qwen2.5-7b/lora.yaml", "--image", "img", "--api", "trainer-v2", "--host-network"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "--host-network cannot be set on a TrainJob" in err


def test_launch_script_maps_both_operators_envs(tmp_path):
    """Run the pod's command with a stub ``npu-ft``: NNODES / NODE_RANK / MASTER_* come from the
    Training Operator's and from Kubeflow Trainer's variables, in the mounted working directory."""
    bindir, mount = tmp_path / "bin", tmp_path / "work space"
    bindir.mkdir()
    mount.mkdir()
    stub = bindir / "npu-ft"
    stub.write_text('#!/bin/sh\necho "$PWD|$NNODES|$NODE_RANK|$MASTER_ADDR|$MASTER_PORT|$*"\n')
    stub.chmod(0o755)
    script = launch_script(JobOptions(image="i", mount=str(mount)))
    base = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    cases = [
        ({"PET_NNODES": "4", "PET_NODE_RANK": "2", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"},
         "4|2|job-master-0|23456"),  # PyTorchJob v1
        ({"PET_NNODES": "3", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "job-node-0-0.job", "PET_MASTER_PORT": "29500"},
         "3|1|job-node-0-0.job|29500"),  # TrainJob
        ({}, "1|0|127.0.0.1|29500"),
    ]
    for env, want in cases:
        out = subprocess.run(["/bin/bash", "-c", script], env={**base, **env}, capture_output=True, text=True,
                             check=True, timeout=60).stdout.strip()
        assert out == f"{mount}|{want}|train /etc/npu-ft/recipe.yaml"


# ---------------------------------------------------------------------------------------------
# the pod's recipe
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key, value", [
    ("output_dir=saves/x\ntrust_remote_code: true", "output_dir", "saves/x\ntrust_remote_code: true"),
    ("dataset=alpaca: extra", "dataset", "alpaca: extra"),
    ("output_dir=a\n---\nb: 1", "output_dir", "a\n---\nb: 1"),
    ("run_name=x # a comment", "run_name", "x"),  # as `npu-ft train x.yaml run_name=...` reads it
])
def test_override_values_cannot_inject_keys(in_root, override, key, value):
    docs = build_manifests("recipes/qwen2.5-7b/lora.yaml", [override], image="img", pvc="ws")
    validate(docs)
    text = dump_manifests(docs)
    recipe = yaml.safe_load(list(yaml.safe_load_all(text))[0]["data"]["recipe.yaml"])  # as the pod reads it
    assert recipe[key] == value
    assert "trust_remote_code" not in recipe and "b" not in recipe
    source = yaml.safe_load((ROOT / "recipes/qwen2.5-7b/lora.yaml").read_text())
    assert set(recipe) == set(source) | {key}


def test_a_recipe_that_does_not_read_back_is_refused(in_root, monkeypatch):
    """The guard behind the dumper: text pasted together the old way would inject a key; the
    read-back check refuses it before anything is written."""

    def pasted(mapping, **kwargs):
        return "".join(f"{k}: {v}\n" for k, v in mapping.items())

    monkeypatch.setattr(yaml, "safe_dump", pasted)
    with pytest.raises(LaunchError, match="does not read back as written"):
        build_manifests("recipes/qwen2.5-7b/lora.yaml", ["output_dir=saves/x\ntrust_remote_code: true"],
                        image="img", pvc="ws")


def test_pod_recipe_resumes_and_reads_back(in_root):
    manifests = build_job("recipes/qwen2.5-7b/full.yaml", JobOptions(image="img", pvc="ws"),
                          ["learning_rate=3e-5", "max_steps=100", "save_steps=50"])
    recipe = pod_recipe(manifests.docs)
    assert recipe["overwrite_output_dir"] is False and recipe["deepspeed"] == "/etc/npu-ft/ds_config.json"
    assert recipe["max_steps"] == 100 and recipe["learning_rate"] == "3e-5"  # as `npu-ft train` parses it
    assert any("overwrite_output_dir: false" in n for n in manifests.notes)
    assert "overwrite_output_dir is false so that a pod restarted" in manifests.docs[0]["data"]["recipe.yaml"]
    notes = build_job("recipes/qwen2.5-7b/lora.yaml", JobOptions(image="img", pvc="ws"),
                      ["save_strategy='no'"]).notes
    assert any("trains again from step 0" in n for n in notes)
    notes = build_job("recipes/qwen2.5-7b/lora.yaml", JobOptions(image="img", pvc="ws"),
                      ["resume_from_checkpoint=true"]).notes
    assert any("fails on the job's first start" in n for n in notes)


def test_resumes_after_a_restart_end_to_end(tmp_path, monkeypatch):
    """The pod's recipe, taken from the ConfigMap, trains a tiny model in a workspace; the run dies
    after checkpoint-2; the same recipe run again resumes there (the source recipe says
    overwrite_output_dir: true, which would start again at step 0)."""
    from transformers import TrainerCallback

    from npu_ft.config import load_config
    from npu_ft.model.tiny import build_tiny_model
    from npu_ft.train.run import run_sft

    from ..train._sft_helpers import base_recipe, write_dataset, write_recipe

    workspace = tmp_path / "workspace"  # the PVC, the pods' working directory
    build_tiny_model(workspace / "models" / "tiny", arch="qwen2", seed=0)
    write_dataset(workspace / "data", n=16)
    source = base_recipe(Path("models/tiny"), Path("data"), Path("saves/tiny/lora"), max_steps=5, save_steps=2,
                         device=None)
    assert source["overwrite_output_dir"] is True
    recipe = write_recipe(tmp_path / "recipes" / "tiny.yaml", source)
    manifests = build_job(recipe, JobOptions(image="img", npus_per_node=1, pvc="ws"))
    configmap = next(yaml.safe_load_all(dump_manifests(manifests.docs)))
    pod_file = tmp_path / "etc-npu-ft" / "recipe.yaml"
    pod_file.parent.mkdir()
    pod_file.write_text(configmap["data"]["recipe.yaml"])
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("NPU_FT_DEVICE", "cpu")  # the pod sets npu

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("simulated pod failure")

    class CountSteps(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            CountSteps.steps += 1

    with pytest.raises(RuntimeError, match="simulated pod failure"):
        run_sft(load_config(pod_file), callbacks=[Crash()])
    out = workspace / "saves" / "tiny" / "lora"
    assert (out / "checkpoint-2" / "trainer_state.json").is_file() and not (out / "adapter_model.safetensors").exists()

    result = run_sft(load_config(pod_file), callbacks=[CountSteps()])  # the restarted pod
    assert result.resumed_from == str(Path("saves/tiny/lora/checkpoint-2"))
    assert result.global_step == 5 and CountSteps.steps == 3  # steps 3..5, not 1..5
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 5
    assert (out / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["128", "500m", "1500Gi", "1.5Ti", "2e3", ".5", "64G"])
def test_quantities_accepted(value):
    assert check_quantity("--cpu", value) == value


@pytest.mark.parametrize("flag, value, match", [
    ("--cpu", "lots", "not a Kubernetes quantity"),
    ("--cpu", "-1", "positive"),
    ("--memory", "10GB", "write 10G or 10Gi, not 10GB"),
    ("--memory", "0", "more than 0"),
    ("--memory", "500m", "fraction of a byte"),
    ("--cpu", "1 Gi", "not a Kubernetes quantity"),
])
def test_quantities_refused(flag, value, match):
    with pytest.raises(LaunchError, match=match):
        check_quantity(flag, value, memory=flag == "--memory")


@pytest.mark.parametrize("kw, match", [
    (dict(nodes=0), "--nodes must be >= 1"),
    (dict(npus_per_node=32), "--npus-per-node must be 1..16"),
    (dict(image=""), "--image is required"),
    (dict(image="a b"), "must not contain spaces"),
    (dict(name="Bad_Name"), "not a valid Kubernetes name"),
    (dict(pvc="My PVC"), "PVC name"),
    (dict(cpu="lots"), "--cpu 'lots' is not a Kubernetes quantity"),
    (dict(memory="-1"), "--memory '-1'"),
    (dict(shm="1 GB"), "--shm"),
    (dict(api="mpi"), "--api must be one of"),
    (dict(mount="workspace"), "must be an absolute path"),
    (dict(env={"BAD NAME": "1"}), "not a valid environment variable name"),
    (dict(run_as_user="0"), "non-root"),
    (dict(run_as_user="me"), "UID or UID:GID"),
    (dict(cap_add=("sys admin",)), "not a Linux capability"),
    (dict(hccl_socket_ifname="eth0;rm"), "not a network interface name"),
    (dict(api="trainer-v2", host_network=True), "cannot be set on a TrainJob"),
])
def test_bad_options(in_root, kw, match):
    args = dict(nodes=1, npus_per_node=8, image="img")
    args.update(kw)
    with pytest.raises(LaunchError, match=match):
        build_manifests("recipes/qwen2.5-7b/lora.yaml", **args)


@pytest.mark.parametrize("argv, needle", [
    (["recipes/qwen2.5-7b/qlora.yaml", "deepspeed=recipes/deepspeed/ds_z3_config.json"], "ZeRO-3 is not supported"),
    (["recipes/qwen2.5-7b/lora.yaml", "lora_rnak=8"], "lora_rnak"),
    (["recipes/nope.yaml"], "recipes/nope.yaml"),
    (["recipes/qwen2.5-7b/lora.yaml", "--memory", "lots"], "--memory 'lots'"),
    (["recipes/qwen2.5-7b/lora.yaml", "-o", "missing/folder/job.yaml"], "folder 'missing/folder' does not exist"),
])
def test_bad_input_is_one_line_and_exit_1(in_root, capsys, argv, needle):
    rc = k8s_main([*argv, "--image", "img"])
    captured = capsys.readouterr()
    assert rc == 1 and captured.out == ""
    assert captured.err.startswith("npu-ft k8s: error: ") and captured.err.count("\n") == 1, captured.err
    assert needle in captured.err and "Traceback" not in captured.err
    assert not (ROOT / "missing").exists()


def test_usage_errors_exit_2(in_root, capsys):
    with pytest.raises(SystemExit) as exc:
        k8s_main(["recipes/qwen2.5-7b/lora.yaml"])  # no --image
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        k8s_main(["recipes/qwen2.5-7b/lora.yaml", "--image", "i", "--api", "mpi"])
    assert exc.value.code == 2


def test_output_file_is_replaced_only_when_npu_ft_wrote_it(in_root, tmp_path, capsys):
    out = tmp_path / "job.yaml"
    out.write_text("kind: Secret  # somebody else's file\n")
    argv = ["recipes/qwen2.5-0.5b/lora.yaml", "--image", "img", "--pvc", "ws", "-o", str(out)]
    assert k8s_main(argv) == 1
    assert "was not written by npu-ft k8s" in capsys.readouterr().err
    assert out.read_text() == "kind: Secret  # somebody else's file\n"
    out.unlink()
    assert k8s_main(argv) == 0 and k8s_main([*argv, "--nodes", "2"]) == 0  # its own file: replaced
    docs = list(yaml.safe_load_all(out.read_text()))
    assert docs[1]["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert k8s_main([*argv[:-1], str(tmp_path)]) == 1  # a folder


def test_cli_module_imports_nothing_heavy():
    code = ("import sys, npu_ft.launch.k8s, npu_ft.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'datasets', 'npu_ft.config.sft') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.strip()
    assert out == "[]"


def test_kubernetes_names():
    opts = JobOptions(image="i", api="trainer-v2", runtime="torchtune-qwen2.5-1.5b", pvc="team.models",
                      hub_token_secret="hf.token")
    assert opts.runtime == "torchtune-qwen2.5-1.5b" and opts.pvc_name == "team.models"
    for kw in (dict(name="a.b"), dict(namespace="a.b"), dict(pvc="a..b"), dict(pvc="-a"), dict(name="x" * 64),
               dict(runtime="Torch")):
        with pytest.raises(LaunchError, match="not a valid Kubernetes name"):
            JobOptions(image="i", **kw)


def test_long_job_names_are_refused_for_the_pods_they_make():
    JobOptions(image="i", name="x" * 54)  # <name>-master-0 has 63 characters
    with pytest.raises(LaunchError, match="at most 54"):
        JobOptions(image="i", name="x" * 55)
    JobOptions(image="i", name="x" * 53, nodes=12)
    with pytest.raises(LaunchError, match="pods " + "x" * 54 + "-worker-10"):
        JobOptions(image="i", name="x" * 54, nodes=12)
    JobOptions(image="i", name="x" * 53, nodes=12, api="trainer-v2")
    with pytest.raises(LaunchError, match="-node-0-11"):
        JobOptions(image="i", name="x" * 54, nodes=12, api="trainer-v2")


def test_job_names():
    assert job_name_for("recipes/qwen2.5-7b/lora.yaml") == "npu-ft-qwen2-5-7b-lora"
    assert job_name_for("my.yaml") == "npu-ft-my"


def test_dump_is_a_yaml_stream(in_root):
    docs = build_manifests("recipes/qwen2.5-0.5b/lora.yaml", nodes=1, npus_per_node=1, image="i", pvc="ws")
    text = dump_manifests(docs)
    assert text.startswith("# Generated by `npu-ft k8s`") and text.count("\n---\n") == 1
    assert "recipe.yaml: |" in text and list(yaml.safe_load_all(text)) == docs
