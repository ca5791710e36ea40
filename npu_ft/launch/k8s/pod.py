"""The pieces every training pod gets, whichever job kind carries them: labels, environment,
resources, volumes and mounts (PVC, recipe, shared memory, Ascend driver), security contexts and the
launch command.

Ascend specifics (docs/scale-out.md explains each):

* NPUs are the ``huawei.com/Ascend910`` resource of Huawei's Ascend device plugin (requests = limits).
* The driver is not in the image. Without the Ascend Docker Runtime the pod mounts it from the node
  read-only (:data:`ASCEND_HOST_PATHS`); with it (``ascend_runtime``) the runtime injects it.
* ``HCCL_IF_IP`` is the pod's IP (downward API ``status.podIP``; the node's IP under
  ``hostNetwork``), unless ``HCCL_SOCKET_IFNAME`` names the interface to use instead.
* With ``--scheduler volcano`` job and pods carry MindCluster's ``ring-controller.atlas`` label.
"""

from __future__ import annotations

import shlex
from typing import Any

from .options import JobOptions
from .pod_recipe import CONFIG_DIR

__all__ = ["ASCEND_HOST_PATHS", "ASCEND_RESOURCE", "DEFAULT_HCCL_ENV", "container_security_context", "env_list",
           "launch_script", "object_metadata", "pod_labels", "pod_security_context", "resources", "volume_mounts",
           "volumes"]

ASCEND_RESOURCE = "huawei.com/Ascend910"
RING_CONTROLLER_LABEL = "ring-controller.atlas"

#: HCCL / torch_npu environment for multi-node jobs (override with --env KEY=VALUE)
DEFAULT_HCCL_ENV = {
    "HCCL_CONNECT_TIMEOUT": "1200",     # seconds to wait for all ranks to join (slow image pulls)
    "HCCL_EXEC_TIMEOUT": "1800",        # seconds one collective may take
    "HCCL_BUFFSIZE": "200",             # MB of communication buffer per rank
    "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True",
    "TASK_QUEUE_ENABLE": "1",
}

#: volume name -> (node path, hostPath type): the driver files an image without them needs, read-only
ASCEND_HOST_PATHS = {
    "ascend-driver": ("/usr/local/Ascend/driver", "Directory"),
    "ascend-dcmi": ("/usr/local/dcmi", "Directory"),
    "npu-smi": ("/usr/local/bin/npu-smi", "File"),
    "ascend-install-info": ("/etc/ascend_install.info", "File"),
}


def pod_labels(name: str, opts: JobOptions) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "npu-ft", "npu-ft/job": name}
    if opts.volcano:
        labels[RING_CONTROLLER_LABEL] = opts.ring_controller
    return labels


def object_metadata(name: str, job: str, opts: JobOptions, **extra: Any) -> dict[str, Any]:
    """``metadata`` of the job or its ConfigMap: ``name``, the labels of ``job``, the namespace if given."""
    meta: dict[str, Any] = {"name": name, "labels": pod_labels(job, opts), **extra}
    if opts.namespace:
        meta["namespace"] = opts.namespace
    return meta


def env_list(opts: JobOptions) -> list[dict[str, Any]]:
    """The container's ``env``: HCCL defaults, HCCL_IF_IP or HCCL_SOCKET_IFNAME, --env, hub token."""
    entries: dict[str, dict[str, Any]] = {k: {"name": k, "value": v} for k, v in DEFAULT_HCCL_ENV.items()}
    if opts.hccl_socket_ifname:
        entries["HCCL_SOCKET_IFNAME"] = {"name": "HCCL_SOCKET_IFNAME", "value": opts.hccl_socket_ifname}
    else:  # HCCL_IF_IP wins over HCCL_SOCKET_IFNAME, so only one of them is set
        entries["HCCL_IF_IP"] = {"name": "HCCL_IF_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    entries.update({k: {"name": k, "value": str(v)} for k, v in opts.env.items()})
    entries["NPROC_PER_NODE"] = {"name": "NPROC_PER_NODE", "value": str(opts.npus_per_node)}
    entries["NPU_FT_DEVICE"] = {"name": "NPU_FT_DEVICE", "value": "npu"}
    out = [entries[k] for k in sorted(entries)]
    if opts.hub_token_secret:
        for var in ("HF_TOKEN", "MODELSCOPE_API_TOKEN"):
            out.append({"name": var, "valueFrom": {"secretKeyRef": {
                "name": opts.hub_token_secret, "key": opts.hub_token_key, "optional": True}}})
    return out


def resources(opts: JobOptions) -> dict[str, Any]:
    """requests = limits: the NPUs, and --cpu / --memory when given."""
    amounts: dict[str, Any] = {ASCEND_RESOURCE: opts.npus_per_node}
    if opts.cpu:
        amounts["cpu"] = opts.cpu
    if opts.memory:
        amounts["memory"] = opts.memory
    return {"requests": dict(amounts), "limits": dict(amounts)}


def volumes(name: str, opts: JobOptions) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"name": "workspace", "persistentVolumeClaim": {"claimName": opts.pvc_name}},
        {"name": "recipe", "configMap": {"name": f"{name}-recipe"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm}},
    ]
    if not opts.ascend_runtime:
        out += [{"name": vol, "hostPath": {"path": path, "type": kind}}
                for vol, (path, kind) in ASCEND_HOST_PATHS.items()]
    return out


def volume_mounts(opts: JobOptions) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"name": "workspace", "mountPath": opts.mount},
        {"name": "recipe", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if not opts.ascend_runtime:
        out += [{"name": vol, "mountPath": path, "readOnly": True} for vol, (path, _) in ASCEND_HOST_PATHS.items()]
    return out


def container_security_context(opts: JobOptions) -> dict[str, Any]:
    """No privilege escalation, every capability dropped (--cap-add gives some back)."""
    caps: dict[str, Any] = {"drop": ["ALL"]}
    if opts.capabilities:
        caps["add"] = list(opts.capabilities)
    return {"allowPrivilegeEscalation": False, "capabilities": caps}


def pod_security_context(opts: JobOptions) -> dict[str, Any]:
    """The runtime's default seccomp profile; with --run-as-user a non-root user and group."""
    ctx: dict[str, Any] = {"seccompProfile": {"type": "RuntimeDefault"}}
    if opts.user is not None:
        uid, gid = opts.user
        ctx.update({"runAsNonRoot": True, "runAsUser": uid})
        if gid is not None:
            ctx["runAsGroup"] = gid
    return ctx


def launch_script(opts: JobOptions) -> str:
    """``bash -c`` text: torchrun's node settings from the operator's ``PET_*`` variables, then train.

    The Training Operator (PyTorchJob) sets PET_NNODES / PET_NODE_RANK and MASTER_ADDR / MASTER_PORT;
    Kubeflow Trainer (TrainJob) sets PET_NNODES / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT.
    """
    return (f"cd {shlex.quote(opts.mount)} && "
            'export NNODES="${PET_NNODES:-1}" NODE_RANK="${PET_NODE_RANK:-0}" '
            'MASTER_ADDR="${PET_MASTER_ADDR:-${MASTER_ADDR:-127.0.0.1}}" '
            'MASTER_PORT="${PET_MASTER_PORT:-${MASTER_PORT:-29500}}" && '
            f"exec npu-ft train {CONFIG_DIR}/recipe.yaml")
