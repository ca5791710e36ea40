"""``PyTorchJob`` (``kubeflow.org/v1``, Kubeflow Training Operator): one ``Master`` pod and
``nodes - 1`` ``Worker`` pods, restarted on failure (the pod's recipe then resumes from the last
checkpoint)."""

from __future__ import annotations

import copy
from typing import Any

from . import pod
from .options import JobOptions

__all__ = ["MASTER_PORT", "build_pytorchjob"]

MASTER_PORT = 23456  # the Training Operator's default PyTorchJob port


def _pod_template(name: str, opts: JobOptions) -> dict[str, Any]:
    container = {
        "name": "pytorch",  # the Training Operator looks for this container name
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["/bin/bash", "-c", pod.launch_script(opts)],
        "workingDir": opts.mount,
        "env": pod.env_list(opts),
        "ports": [{"name": "pytorchjob-port", "containerPort": MASTER_PORT, "protocol": "TCP"}],
        "resources": pod.resources(opts),
        "volumeMounts": pod.volume_mounts(opts),
        "securityContext": pod.container_security_context(opts),
    }
    spec: dict[str, Any] = {"containers": [container], "volumes": pod.volumes(name, opts),
                            "securityContext": pod.pod_security_context(opts)}
    if opts.node_labels:
        spec["nodeSelector"] = opts.node_labels
    if opts.scheduler:
        spec["schedulerName"] = opts.scheduler
    if opts.host_network:
        spec["hostNetwork"] = True
        spec["dnsPolicy"] = "ClusterFirstWithHostNet"  # pods still resolve the master's Service name
    return {"metadata": {"labels": pod.pod_labels(name, opts)}, "spec": spec}


def build_pytorchjob(name: str, opts: JobOptions) -> dict[str, Any]:
    template = _pod_template(name, opts)
    replica_specs: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
    if opts.nodes > 1:
        replica_specs["Worker"] = {"replicas": opts.nodes - 1, "restartPolicy": "OnFailure",
                                   "template": copy.deepcopy(template)}
    run_policy: dict[str, Any] = {"cleanPodPolicy": "None", "backoffLimit": 3}
    if opts.scheduler:  # gang scheduling: all pods or none (Volcano / scheduler-plugins)
        run_policy["schedulingPolicy"] = {"minAvailable": opts.nodes}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": pod.object_metadata(name, name, opts),
            "spec": {"nprocPerNode": str(opts.npus_per_node), "runPolicy": run_policy,
                     "pytorchReplicaSpecs": replica_specs}}

