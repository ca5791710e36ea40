"""Scale-out: torchrun launch, pre-launch checks, memory estimates, recipes and Kubernetes jobs.

* :func:`launch_or_init` -- the hook ``npu-ft train`` calls first (torchrun when >1 process).
* :mod:`npu_ft.launch.plan` -- :func:`plan_launch`: NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT /
  NPROC_PER_NODE + the device layer -> a :class:`LaunchPlan`; :class:`LaunchError` for impossible
  requests.
* :mod:`npu_ft.launch.torchrun` -- the launch hook and the torchrun command line.
* :mod:`npu_ft.launch.checks` -- DeepSpeed config and method combinations, before launch.
* :mod:`npu_ft.launch.estimate` -- memory per card and 910B cards per recipe.
* :mod:`npu_ft.launch.k8s` -- ``npu-ft k8s``: Kubeflow PyTorchJob / TrainJob manifests.

The Qwen recipe generator is a development script, ``scripts/generate_recipes.py``.

``python -m npu_ft.launch [--nproc-per-node N] RECIPE [key=value ...]`` is ``npu-ft train`` with
the launch step in front (torchrun workers run this module too).
"""

from .plan import LaunchError, LaunchPlan, in_torchrun_worker, plan_launch, visible_device_ids
from .torchrun import (
    distributed_training_kwargs,
    init_worker_process_group,
    launch_or_init,
    pop_launch_flags,
    torchrun_command,
)

__all__ = [
    "LaunchError",
    "LaunchPlan",
    "distributed_training_kwargs",
    "in_torchrun_worker",
    "init_worker_process_group",
    "launch_or_init",
    "plan_launch",
    "pop_launch_flags",
    "torchrun_command",
    "visible_device_ids",
]
