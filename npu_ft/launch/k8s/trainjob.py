"""``TrainJob`` (``trainer.kubeflow.org/v1alpha1``, Kubeflow Trainer v2.2+) on a
``ClusterTrainingRuntime`` such as ``torch-distributed``.

The TrainJob sets the image, command, environment, node count, processes per node and resources of
the runtime's trainer container (``trainer``); volumes, mounts, node selector, labels and security
contexts go into a ``runtimePatches`` entry for the runtime's ``node`` replicated job. What a
runtime patch cannot express -- ``hostNetwork``, ``schedulerName``, the restart policy -- belongs to
the runtime (:class:`~.options.JobOptions` refuses ``host_network`` here).

``numProcPerNode`` is always written: the Torch plugin counts only resources whose name contains
"gpu", so with ``huawei.com/Ascend910`` its ``auto`` would fall back to the CPU count.
"""

from __future__ import annotations

from typing import Any

from . import pod
from .options import JobOptions

__all__ = ["PATCH_MANAGER", "TRAINER_CONTAINER", "TRAINER_JOB", "build_trainjob"]

#: names in Kubeflow Trainer's torch runtimes: the replicated job and its trainer container
TRAINER_JOB = "node"
TRAINER_CONTAINER = "node"
PATCH_MANAGER = "npu-ft.k8s"


def _runtime_patch(name: str, opts: JobOptions) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "securityContext": pod.pod_security_context(opts),
        "volumes": pod.volumes(name, opts),
        "containers": [{"name": TRAINER_CONTAINER, "volumeMounts": pod.volume_mounts(opts),
                        "securityContext": pod.container_security_context(opts)}],
    }
    if opts.node_labels:
        pod_spec["nodeSelector"] = opts.node_labels
    pod_template = {"metadata": {"labels": pod.pod_labels(name, opts)}, "spec": pod_spec}
    return {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
        {"name": TRAINER_JOB, "template": {"spec": {"template": pod_template}}}]}}}}


def build_trainjob(name: str, opts: JobOptions) -> dict[str, Any]:
    trainer = {
        "image": opts.image,
        "command": ["/bin/bash", "-c", pod.launch_script(opts)],
        "env": pod.env_list(opts),
        "numNodes": opts.nodes,
        "numProcPerNode": opts.npus_per_node,
        "resourcesPerNode": pod.resources(opts),
    }
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": pod.object_metadata(name, name, opts),
            "spec": {"runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                    "name": opts.runtime},
                     "trainer": trainer,
                     "runtimePatches": [_runtime_patch(name, opts)]}}
