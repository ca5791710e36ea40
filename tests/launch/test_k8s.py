"""``npu-ft k8s``: the PyTorchJob + ConfigMap manifests validate against published schemas.

Validator: jsonschema (Draft 2020-12). Schemas: the PyTorchJob CRD schema of the Kubeflow Training
Operator (tests/launch/schemas/pytorchjob-v1.schema.json, a credited excerpt) whose pod template
is checked against the strict core/v1 PodTemplateSpec schema shipped by the ``kubernetes-validate``
package, which also validates the ConfigMap.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from npu_ft.launch.k8s import ASCEND_RESOURCE, build_manifests, dump_manifests, job_name_for, k8s_main
from npu_ft.launch.torchrun import LaunchError

from ._helpers import ROOT

kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (test extra)")
jsonschema = pytest.importorskip("jsonschema")

K8S_VERSION = "1.30"
SCHEMA = Path(__file__).with_name("schemas") / "pytorchjob-v1.schema.json"


def _pytorchjob_validator():
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
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


VALIDATOR = _pytorchjob_validator()


def validate(docs):
    configmap, job = docs
    kv.validate(configmap, K8S_VERSION, strict=True)
    errors = sorted(VALIDATOR.iter_errors(job), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


@pytest.fixture
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_multi_node_lora_zero3_job(in_root):
    docs = build_manifests(
        "recipes/qwen2.5-72b/lora.yaml",
        nodes=4,
        npus_per_node=8,
        image="reg/npu-ft:1",
        namespace="llm",
        hub_token_secret="hf-token",
        scheduler="volcano",
    )
    validate(docs)
    configmap, job = docs
    assert job["metadata"]["name"] == "npu-ft-qwen2-5-72b-lora" and job["spec"]["nprocPerNode"] == "8"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 3
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 4}
    pod = specs["Worker"]["template"]["spec"]
    assert pod["schedulerName"] == "volcano"
    (c,) = pod["containers"]
    assert c["name"] == "pytorch" and c["image"] == "reg/npu-ft:1"
    assert c["resources"]["requests"] == c["resources"]["limits"] == {ASCEND_RESOURCE: 8}
    env = {e["name"]: e for e in c["env"]}
    assert env["NPROC_PER_NODE"]["value"] == "8" and env["HCCL_CONNECT_TIMEOUT"]["value"] == "1200"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token", "optional": True}
    assert "PET_NODE_RANK" in c["command"][-1] and c["command"][-1].endswith("npu-ft train /etc/npu-ft/recipe.yaml")
    claim = {v["name"]: v for v in pod["volumes"]}["workspace"]["persistentVolumeClaim"]["claimName"]
    assert claim == "npu-ft-workspace" and c["workingDir"] == "/workspace"
    # the pod gets the recipe with the DeepSpeed config next to it
    assert "deepspeed: /etc/npu-ft/ds_config.json" in configmap["data"]["recipe.yaml"]
    assert json.loads(configmap["data"]["ds_config.json"])["zero_optimization"]["stage"] == 3


def test_single_node_qlora_job_and_cli(in_root, tmp_path, capsys):
    out = tmp_path / "job.yaml"
    rc = k8s_main(
        [
            "recipes/qwen3-8b/qlora.yaml",
            "--nodes",
            "1",
            "--npus-per-node",
            "8",
            "--image",
            "img",
            "--cpu",
            "96",
            "--memory",
            "1000Gi",
            "--env",
            "HCCL_SOCKET_IFNAME=bond0",
            "-o",
            str(out),
            "num_train_epochs=1",
        ]
    )
    assert rc == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    validate(docs)
    configmap, job = docs
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    c = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"] == {ASCEND_RESOURCE: 8, "cpu": "96", "memory": "1000Gi"}
    assert {e["name"]: e.get("value") for e in c["env"]}["HCCL_SOCKET_IFNAME"] == "bond0"
    assert "ds_config.json" not in configmap["data"] and "num_train_epochs: 1" in configmap["data"]["recipe.yaml"]
    # the stdout form is the same YAML
    assert k8s_main(["recipes/qwen3-8b/qlora.yaml", "--image", "img"]) == 0
    assert list(yaml.safe_load_all(capsys.readouterr().out))[1]["kind"] == "PyTorchJob"


def test_validator_rejects_broken_manifests(in_root):
    docs = build_manifests("recipes/qwen2.5-7b/full.yaml", nodes=2, npus_per_node=8, image="img")
    validate(docs)
    job = json.loads(json.dumps(docs[1]))
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "two"
    assert not VALIDATOR.is_valid(job)
    job = json.loads(json.dumps(docs[1]))
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resource"] = {}
    assert not VALIDATOR.is_valid(job)  # a typo in the pod template is caught by the core/v1 schema
    job = json.loads(json.dumps(docs[1]))
    del job["spec"]["pytorchReplicaSpecs"]
    assert not VALIDATOR.is_valid(job)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(nodes=0), "--nodes must be >= 1"),
        (dict(npus_per_node=32), "--npus-per-node must be 1..16"),
        (dict(image=""), "--image is required"),
        (dict(name="Bad_Name"), "not a valid Kubernetes name"),
    ],
)
def test_bad_arguments(in_root, kw, match):
    args = dict(nodes=1, npus_per_node=8, image="img")
    args.update(kw)
    with pytest.raises(LaunchError, match=match):
        build_manifests("recipes/qwen2.5-7b/lora.yaml", **args)


def test_qlora_zero3_refused(in_root, capsys):
    rc = k8s_main(["recipes/qwen2.5-7b/qlora.yaml", "--image", "img", "deepspeed=recipes/deepspeed/ds_z3_config.json"])
    assert rc == 2 and "ZeRO-3 is not supported" in capsys.readouterr().err


def test_job_names():
    assert job_name_for("recipes/qwen2.5-7b/lora.yaml") == "npu-ft-qwen2-5-7b-lora"
    assert job_name_for("my.yaml") == "npu-ft-my"


def test_dump_is_a_yaml_stream(in_root):
    text = dump_manifests(build_manifests("recipes/qwen2.5-0.5b/lora.yaml", nodes=1, npus_per_node=1, image="i"))
    assert text.count("\n---\n") == 1 and "recipe.yaml: |" in text
