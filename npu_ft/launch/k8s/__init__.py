"""``npu-ft k8s RECIPE --nodes N --npus-per-node 8 --image IMAGE``: Kubernetes manifests for a recipe.

The output is one YAML stream with two documents:

1. a ``ConfigMap`` with the pod's recipe (built as data and checked with ``load_config``; see
   :mod:`.pod_recipe`) and its DeepSpeed JSON, mounted read-only at ``/etc/npu-ft``;
2. the job: a Kubeflow Training Operator ``PyTorchJob`` (``kubeflow.org/v1``, default;
   :mod:`.pytorchjob`) or, with ``--api trainer-v2``, a Kubeflow Trainer ``TrainJob``
   (``trainer.kubeflow.org/v1alpha1``; :mod:`.trainjob`).

Every pod requests ``huawei.com/Ascend910`` NPUs, mounts a shared PVC as its working directory and
runs ``npu-ft train /etc/npu-ft/recipe.yaml`` (torchrun across the nodes); the Ascend-specific
pieces (driver mounts, HCCL, Volcano label, security contexts) are in :mod:`.pod`; option checks in
:mod:`.options`; the command line in :mod:`.cli`. User documentation: docs/scale-out.md.
"""

from .build import Manifests, build_job, build_manifests, dump_manifests, job_name_for
from .cli import k8s_main
from .options import JobOptions
from .pod import ASCEND_RESOURCE, DEFAULT_HCCL_ENV
from .pod_recipe import CONFIG_DIR

__all__ = [
    "ASCEND_RESOURCE",
    "CONFIG_DIR",
    "DEFAULT_HCCL_ENV",
    "JobOptions",
    "Manifests",
    "build_job",
    "build_manifests",
    "dump_manifests",
    "job_name_for",
    "k8s_main",
]
