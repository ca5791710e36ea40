"""``npu-ft k8s RECIPE --nodes N --npus-per-node 8 --image IMAGE``: a Kubeflow PyTorchJob manifest.

The output is one YAML stream with two documents:

1. a ``ConfigMap`` holding the recipe (and its DeepSpeed config), mounted at ``/etc/npu-ft``;
2. a ``PyTorchJob`` (``kubeflow.org/v1``, Kubeflow Training Operator) with one ``Master`` pod and
   ``N-1`` ``Worker`` pods. Each pod requests ``huawei.com/Ascend910: <npus>`` (requests = limits,
   the resource of Huawei's Ascend device plugin), mounts a shared PersistentVolumeClaim at
   ``/workspace`` (the recipe's relative ``models/``, ``data/`` and ``saves/`` live there), and runs
   ``npu-ft train /etc/npu-ft/recipe.yaml``, which starts torchrun with NNODES / NODE_RANK taken
   from the operator's ``PET_NNODES`` / ``PET_NODE_RANK`` and MASTER_ADDR / MASTER_PORT as set by
   the operator. HCCL settings come as environment variables; a hub token can come from a Secret.

The manifests are validated in tests against the PyTorchJob CRD schema of the Training Operator
and the Kubernetes schemas of ``kubernetes-validate`` (see tests/launch/test_k8s.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .torchrun import LaunchError

__all__ = ["DEFAULT_HCCL_ENV", "build_manifests", "k8s_main", "job_name_for"]

ASCEND_RESOURCE = "huawei.com/Ascend910"
CONFIG_DIR = "/etc/npu-ft"
DEFAULT_MOUNT = "/workspace"
MASTER_PORT = 23456  # the Training Operator's default PyTorchJob port

#: HCCL / torch_npu environment for multi-node jobs (override with --env KEY=VALUE)
DEFAULT_HCCL_ENV = {
    "HCCL_CONNECT_TIMEOUT": "1200",     # seconds to wait for all ranks to join (slow image pulls)
    "HCCL_EXEC_TIMEOUT": "1800",        # seconds one collective may take
    "HCCL_SOCKET_IFNAME": "eth0",       # pod network interface for HCCL's host-side handshake
    "HCCL_BUFFSIZE": "200",             # MB of communication buffer per rank
    "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True",
    "TASK_QUEUE_ENABLE": "1",
}


def job_name_for(recipe: str | Path) -> str:
    """``recipes/qwen2.5-7b/lora.yaml`` -> ``npu-ft-qwen2-5-7b-lora`` (a DNS-1123 label)."""
    p = Path(recipe)
    stem = f"{p.parent.name}-{p.stem}" if p.parent.name not in ("", ".", "recipes") else p.stem
    name = re.sub(r"[^a-z0-9-]+", "-", f"npu-ft-{stem}".lower()).strip("-")
    return re.sub(r"-+", "-", name)[:52].rstrip("-")


def _check_name(name: str, what: str) -> str:
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        raise LaunchError(f"{what} {name!r} is not a valid Kubernetes name (lower-case letters, digits "
                          "and '-', at most 63 characters)")
    return name


def _recipe_text_for_pod(text: str, has_ds_file: bool) -> str:
    if not has_ds_file:
        return text
    out, n = re.subn(r"(?m)^deepspeed:.*$", f"deepspeed: {CONFIG_DIR}/ds_config.json", text)
    if n != 1:  # pragma: no cover - a recipe with a path-valued deepspeed key has exactly one line
        raise LaunchError("could not rewrite the recipe's deepspeed: line")
    return out


def build_manifests(recipe: str | Path, *, nodes: int, npus_per_node: int, image: str,
                    name: str | None = None, namespace: str | None = None, pvc: str = "npu-ft-workspace",
                    mount: str = DEFAULT_MOUNT, hub_token_secret: str | None = None,
                    hub_token_key: str = "token", scheduler: str | None = None,
                    node_selector: dict[str, str] | None = None, cpu: str | None = None,
                    memory: str | None = None, shm: str = "64Gi", env: dict[str, str] | None = None,
                    overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The ``[ConfigMap, PyTorchJob]`` documents for ``recipe`` on ``nodes`` x ``npus_per_node``."""
    from npu_ft.train.config import load_config

    from .checks import check_launch, load_deepspeed_config
    from .torchrun import LaunchPlan

    if nodes < 1:
        raise LaunchError(f"--nodes must be >= 1, got {nodes}")
    if not 1 <= npus_per_node <= 16:
        raise LaunchError(f"--npus-per-node must be 1..16 (a 910B server has 8), got {npus_per_node}")
    if not image:
        raise LaunchError("--image is required (a container image with npu-ft, torch_npu and CANN)")
    recipe = Path(recipe)
    cfg = load_config(recipe, overrides)
    plan = LaunchPlan(device="npu", dist_backend="hccl", nproc_per_node=npus_per_node, nnodes=nodes,
                      master_addr="master", master_port=MASTER_PORT)
    check_launch(cfg, plan)
    ds = load_deepspeed_config(cfg.deepspeed, cfg.source)
    ds_is_file = ds is not None and isinstance(cfg.deepspeed, str)
    name = _check_name(name or job_name_for(recipe), "job name")
    if namespace:
        _check_name(namespace, "namespace")
    _check_name(pvc, "PVC name")

    text = recipe.read_text(encoding="utf-8")
    for override in overrides:  # keep overrides visible in the pod's recipe
        text += f"\n{override.split('=', 1)[0].strip()}: {override.split('=', 1)[1].strip()}"
    data = {"recipe.yaml": _recipe_text_for_pod(text, ds_is_file)}
    if ds_is_file:
        data["ds_config.json"] = json.dumps(ds, indent=2) + "\n"
    meta: dict[str, Any] = {"name": f"{name}-recipe", "labels": {"app.kubernetes.io/name": "npu-ft",
                                                                 "npu-ft/job": name}}
    if namespace:
        meta["namespace"] = namespace
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}

    envs = dict(DEFAULT_HCCL_ENV)
    envs.update(env or {})
    envs.update({"NPROC_PER_NODE": str(npus_per_node), "NPU_FT_DEVICE": "npu"})
    env_list: list[dict[str, Any]] = [{"name": k, "value": str(v)} for k, v in sorted(envs.items())]
    if hub_token_secret:
        _check_name(hub_token_secret, "secret name")
        for var in ("HF_TOKEN", "MODELSCOPE_API_TOKEN"):
            env_list.append({"name": var, "valueFrom": {"secretKeyRef": {
                "name": hub_token_secret, "key": hub_token_key, "optional": True}}})
    resources: dict[str, Any] = {ASCEND_RESOURCE: npus_per_node}
    if cpu:
        resources["cpu"] = cpu
    if memory:
        resources["memory"] = memory
    # torchrun inside the pod: the operator sets PET_NNODES / PET_NODE_RANK / MASTER_ADDR / MASTER_PORT
    script = ("export NNODES=\"${PET_NNODES:-1}\" NODE_RANK=\"${PET_NODE_RANK:-0}\"; "
              f"exec npu-ft train {CONFIG_DIR}/recipe.yaml")
    container = {
        "name": "pytorch",  # the Training Operator looks for this container name
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["/bin/bash", "-c", script],
        "workingDir": mount,
        "env": env_list,
        "ports": [{"name": "pytorchjob-port", "containerPort": MASTER_PORT, "protocol": "TCP"}],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "volumeMounts": [
            {"name": "workspace", "mountPath": mount},
            {"name": "recipe", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [
            {"name": "workspace", "persistentVolumeClaim": {"claimName": pvc}},
            {"name": "recipe", "configMap": {"name": f"{name}-recipe"}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
        ],
        "nodeSelector": dict(node_selector if node_selector is not None
                             else {"accelerator": "huawei-Ascend910"}),
    }
    if not pod_spec["nodeSelector"]:
        del pod_spec["nodeSelector"]
    if scheduler:
        pod_spec["schedulerName"] = scheduler
    template = {"metadata": {"labels": {"app.kubernetes.io/name": "npu-ft", "npu-ft/job": name}},
                "spec": pod_spec}
    replica_specs: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
    if nodes > 1:
        replica_specs["Worker"] = {"replicas": nodes - 1, "restartPolicy": "OnFailure",
                                   "template": json.loads(json.dumps(template))}
    run_policy: dict[str, Any] = {"cleanPodPolicy": "None", "backoffLimit": 3}
    if scheduler:  # gang scheduling: all pods or none (Volcano / scheduler-plugins)
        run_policy["schedulingPolicy"] = {"minAvailable": nodes}
    job_meta: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/name": "npu-ft"}}
    if namespace:
        job_meta["namespace"] = namespace
    job = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": job_meta,
           "spec": {"nprocPerNode": str(npus_per_node), "runPolicy": run_policy,
                    "pytorchReplicaSpecs": replica_specs}}
    return [configmap, job]


def dump_manifests(docs: list[dict[str, Any]]) -> str:
    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper, value):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def _kv(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise LaunchError(f"{what} {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def k8s_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="npu-ft k8s", description="write a Kubeflow PyTorchJob manifest for a recipe")
    p.add_argument("recipe", help="recipe YAML (e.g. recipes/qwen2.5-7b/lora.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (pods), default 1")
    p.add_argument("--npus-per-node", type=int, default=8, help="NPUs per node, default 8")
    p.add_argument("--image", required=True, help="container image with npu-ft, torch_npu and CANN")
    p.add_argument("--name", default=None, help="job name (default from the recipe path)")
    p.add_argument("--namespace", default=None)
    p.add_argument("--pvc", default="npu-ft-workspace", help="shared PVC with models/, data/, saves/")
    p.add_argument("--mount", default=DEFAULT_MOUNT, help="where the PVC is mounted (the working dir)")
    p.add_argument("--hub-token-secret", default=None, help="Secret with a hub token (HF_TOKEN)")
    p.add_argument("--hub-token-key", default="token", help="key in that Secret (default: token)")
    p.add_argument("--scheduler", default=None, help="schedulerName, e.g. volcano (adds gang scheduling)")
    p.add_argument("--node-selector", action="append", default=None, metavar="KEY=VALUE",
                   help="node selector (default accelerator=huawei-Ascend910; give '' for none)")
    p.add_argument("--cpu", default=None, help="CPU request = limit per pod, e.g. 128")
    p.add_argument("--memory", default=None, help="memory request = limit per pod, e.g. 1500Gi")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra/override env")
    p.add_argument("-o", "--output", default="-", help="output file (default: stdout)")
    args = p.parse_intermixed_args(argv)
    try:
        selector = None
        if args.node_selector is not None:
            selector = _kv([s for s in args.node_selector if s], "--node-selector")
        docs = build_manifests(args.recipe, nodes=args.nodes, npus_per_node=args.npus_per_node, image=args.image,
                               name=args.name, namespace=args.namespace, pvc=args.pvc, mount=args.mount,
                               hub_token_secret=args.hub_token_secret, hub_token_key=args.hub_token_key,
                               scheduler=args.scheduler, node_selector=selector, cpu=args.cpu,
                               memory=args.memory, env=_kv(args.env, "--env"), overrides=args.overrides)
    except (LaunchError, ValueError) as exc:
        print(f"npu-ft k8s: {exc}", file=sys.stderr)
        return 2
    text = dump_manifests(docs)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
