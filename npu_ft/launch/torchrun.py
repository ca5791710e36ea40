"""Multi-process launch through torchrun (``torch.distributed.run``), the LLaMA-Factory way.

``npu-ft train RECIPE`` calls :func:`launch_or_init` first. Three cases:

* **launcher** -- more than one process is wanted (several visible devices, ``NPROC_PER_NODE``/
  ``--nproc-per-node`` > 1, or ``NNODES`` > 1) and this process was not started by torchrun: the
  recipe and its inputs are checked here, once (:mod:`npu_ft.train.preflight`: config, model
  folder and tokenizer, data files, template, trackers; the device and process count; DeepSpeed
  combinations in :mod:`npu_ft.launch.checks`), then ``python -m torch.distributed.run ... -m
  npu_ft.launch RECIPE k=v`` runs and its exit code is returned. Nothing is launched when a check
  fails: one line says what to fix.
* **single process** -- the same checks except the tokenizer (the trainer loads it next, before
  writing anything), then None: training goes on in this process.
* **worker** -- started by torchrun (``LOCAL_RANK``/``WORLD_SIZE`` set): the process group is
  created with the device layer's backend (gloo / nccl / hccl) on this rank's device, and None is
  returned so training goes on (transformers/accelerate/DeepSpeed find the group already there).

The environment that shapes the launch (``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``, ``NPROC_PER_NODE``, visible devices) is read by :mod:`npu_ft.launch.plan`;
each worker gets the ``LOCAL_RANK``-th visible device (the device layer's ``device_for_local_rank``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, MutableSequence, Sequence

from .plan import (
    VISIBLE_DEVICES_ENV,
    LaunchError,
    LaunchPlan,
    in_torchrun_worker,
    plan_launch,
    visible_device_ids,
)

__all__ = [
    "LAUNCH_FLAGS",
    "VISIBLE_DEVICES_ENV",
    "LaunchError",
    "LaunchPlan",
    "distributed_training_kwargs",
    "in_torchrun_worker",
    "init_worker_process_group",
    "launch_or_init",
    "plan_launch",
    "pop_launch_flags",
    "split_recipe_argv",
    "torchrun_command",
    "visible_device_ids",
]

#: command-line flags of ``npu-ft train`` that belong to the launcher -> env var they set
LAUNCH_FLAGS = {
    "--nproc-per-node": "NPROC_PER_NODE",
    "--nnodes": "NNODES",
    "--node-rank": "NODE_RANK",
    "--master-addr": "MASTER_ADDR",
    "--master-port": "MASTER_PORT",
}


def torchrun_command(plan: LaunchPlan, train_argv: Sequence[str], python: str | None = None) -> list[str]:
    """The ``python -m torch.distributed.run ... -m npu_ft.launch RECIPE ...`` command for ``plan``
    (each worker runs :mod:`npu_ft.launch`, i.e. ``npu-ft train``, whose hook then only creates the
    process group)."""
    return [
        python or sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(plan.nnodes),
        "--node_rank", str(plan.node_rank),
        "--nproc_per_node", str(plan.nproc_per_node),
        "--master_addr", plan.master_addr,
        "--master_port", str(plan.master_port),
        "-m", "npu_ft.launch", *train_argv,
    ]


#: launcher flags whose value is an integer -> smallest allowed value
_INT_FLAGS = {"--nproc-per-node": 1, "--nnodes": 1, "--node-rank": 0, "--master-port": 1}


def pop_launch_flags(argv: MutableSequence[str]) -> dict[str, str]:
    """Remove ``--nproc-per-node N`` & co. from ``argv`` (in place); return them as env settings.

    A flag without a value, or a number flag whose value is not a number in range, is a
    :class:`~npu_ft.cli_common.UsageError` (exit code 2).
    """
    from npu_ft.cli_common import UsageError

    found: dict[str, str] = {}
    i = 0
    while i < len(argv):
        name, sep, value = argv[i].partition("=")
        key = name.replace("_", "-")
        if key not in LAUNCH_FLAGS:
            i += 1
            continue
        if not sep:
            if i + 1 >= len(argv):
                raise UsageError(f"{name} needs a value")
            value = argv[i + 1]
            del argv[i:i + 2]
        else:
            del argv[i]
        if key in _INT_FLAGS:
            top = 65535 if key == "--master-port" else None
            number = int(value) if value.strip().isdigit() else -1
            if number < _INT_FLAGS[key] or (top is not None and number > top):
                bounds = f">= {_INT_FLAGS[key]}" + (f" and <= {top}" if top else "")
                raise UsageError(f"{name} {value!r}: expected an integer {bounds}")
        found[LAUNCH_FLAGS[key]] = value
    return found


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------
def init_worker_process_group(device: str | None = None, timeout_s: float | None = None):
    """Inside a torchrun worker: pick this rank's device and create the process group with the
    device layer's backend (no-op if a group exists). Returns ``(backend, torch.device)``."""
    import datetime

    import torch.distributed as dist

    from npu_ft.device import select_device

    backend, torch_device = select_device(None if device in (None, "auto") else device)
    backend.set_device(torch_device)
    if not dist.is_initialized():
        kwargs = backend.process_group_kwargs(torch_device)
        if timeout_s:
            kwargs["timeout"] = datetime.timedelta(seconds=float(timeout_s))
        dist.init_process_group(backend=backend.dist_backend, **kwargs)
    return backend, torch_device


def distributed_training_kwargs(cfg=None) -> dict:
    """Extra ``TrainingArguments`` for a distributed run: the device layer's ``ddp_backend``."""
    if not in_torchrun_worker():
        return {}
    from npu_ft.device import get_backend

    device = getattr(cfg, "device", None) if cfg is not None else None
    return {"ddp_backend": get_backend(None if device in (None, "auto") else device).dist_backend}


# ---------------------------------------------------------------------------------------------
# the hook ``npu-ft train`` calls
# ---------------------------------------------------------------------------------------------
def split_recipe_argv(argv: Sequence[str]) -> tuple[str, list[str]]:
    """``RECIPE.yaml [key=value ...]`` (launcher flags already removed) -> ``(recipe, overrides)``.

    Raises :class:`~npu_ft.cli_common.UsageError` for a missing recipe, an unknown ``--flag`` or an
    argument after the recipe that is not ``key=value``.
    """
    from npu_ft.cli_common import UsageError

    if not argv:
        raise UsageError("the YAML recipe is missing")
    recipe, overrides = argv[0], list(argv[1:])
    if recipe.startswith("-"):
        raise UsageError(f"unknown option {recipe!r}")
    if "=" in recipe and not os.path.exists(recipe):
        raise UsageError(f"the first argument must be the YAML recipe, got {recipe!r}")
    for item in overrides:
        if "=" not in item:
            what = "unknown option" if item.startswith("-") else "expected key=value after the recipe, got"
            raise UsageError(f"{what} {item!r}")
    return recipe, overrides


def _check_before_launch(recipe: str, overrides: Sequence[str], env: Mapping[str, str]) -> LaunchPlan:
    """Config, inputs, device and plan, DeepSpeed combination; the tokenizer when launching workers."""
    from npu_ft.config import load_config
    from npu_ft.train.preflight import check_inputs, check_tokenizer

    from .checks import check_launch

    cfg = load_config(recipe, overrides)
    check_inputs(cfg)
    plan = _plan_for(cfg, env)
    check_launch(cfg, plan)
    if plan.distributed:
        check_tokenizer(cfg)  # each worker would find a broken tokenizer itself, after a slow start
    return plan


def _plan_for(cfg, env: Mapping[str, str]) -> LaunchPlan:
    """:func:`plan_launch` for the recipe; an unusable device names where it was asked for."""
    from npu_ft.device import DeviceUnavailableError

    try:
        return plan_launch(cfg.device, env)
    except DeviceUnavailableError as exc:
        origin = f"{cfg.source}: key 'device'" if cfg.device not in (None, "auto") else \
            f"NPU_FT_DEVICE={os.environ.get('NPU_FT_DEVICE')!r}"
        raise DeviceUnavailableError(f"{origin}: {exc}") from None


def launch_or_init(argv: MutableSequence[str], env: Mapping[str, str] | None = None,
                   run=subprocess.call, prog: str = "npu-ft train") -> int | None:
    """Call first in ``train_main(argv)``: ``rc = launch_or_init(argv); if rc is not None: return rc``.

    Removes the launcher flags (``--nproc-per-node``, ``--nnodes``, ``--node-rank``,
    ``--master-addr``, ``--master-port``) from ``argv`` in place. Returns torchrun's exit code when
    this process launched the workers; 2 for a malformed command line and 1 for bad input (a
    recipe, model folder, data file, device, launch environment or combination that cannot work),
    after printing one line and starting nothing; None when training should go on in this process
    (a single process whose inputs passed the checks, or a torchrun worker whose process group is
    now initialised).
    """
    from npu_ft.cli_common import is_input_error, report

    env = dict(os.environ if env is None else env)
    try:
        env.update(pop_launch_flags(argv))
        recipe, overrides = split_recipe_argv(argv)
        if in_torchrun_worker(env):
            from npu_ft.config import load_config

            cfg = load_config(recipe, overrides)
            init_worker_process_group(cfg.device, timeout_s=cfg.ddp_timeout)
            return None
        plan = _check_before_launch(recipe, overrides, env)
    except Exception as exc:
        if not is_input_error(exc):
            raise
        return report(prog, exc)
    if not plan.distributed:
        return None
    cmd = torchrun_command(plan, list(argv))
    child_env = dict(env)
    child_env["NPU_FT_DEVICE"] = plan.device
    child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.nproc_per_node)))
    print(f"{prog}: launching {plan.world_size} processes ({plan.nnodes} node(s) x "
          f"{plan.nproc_per_node}) on {plan.device} with {plan.dist_backend}: {' '.join(cmd)}",
          file=sys.stderr, flush=True)
    return int(run(cmd, env=child_env))
