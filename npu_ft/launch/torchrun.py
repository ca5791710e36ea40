"""Multi-process launch through torchrun (``torch.distributed.run``), the LLaMA-Factory way.

``npu-ft train RECIPE`` calls :func:`launch_or_init` first. Three cases:

* **launcher** -- more than one process is wanted (several visible devices, ``NPROC_PER_NODE``/
  ``--nproc-per-node`` > 1, or ``NNODES`` > 1) and this process was not started by torchrun: the
  recipe is checked (:func:`npu_ft.launch.checks.check_launch`), then ``python -m
  torch.distributed.run ... -m npu_ft.cli train RECIPE k=v`` runs and its exit code is returned.
  Nothing is launched when a check fails: a :class:`LaunchError` says what to fix.
* **worker** -- started by torchrun (``LOCAL_RANK``/``WORLD_SIZE`` set): the process group is
  created with the device layer's backend (gloo / nccl / hccl) on this rank's device, and None is
  returned so training goes on (transformers/accelerate/DeepSpeed find the group already there).
* **single process** -- nothing to do, None.

Environment (same names as ``llamafactory-cli``):

=================  ======================================================================
``NNODES``          number of nodes (default 1)
``NODE_RANK``       this node's index, 0..NNODES-1 (default 0)
``MASTER_ADDR``     rendezvous host; required when NNODES > 1 (default 127.0.0.1 on one node)
``MASTER_PORT``     rendezvous port (default: a free port on one node, 29500 on several)
``NPROC_PER_NODE``  processes per node (default: visible devices of the device layer; CPU: 1)
=================  ======================================================================

Visible devices follow ``ASCEND_RT_VISIBLE_DEVICES`` (npu) or ``CUDA_VISIBLE_DEVICES`` (cuda):
each worker gets ``LOCAL_RANK``-th visible device (the device layer's ``device_for_local_rank``).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, MutableSequence, Sequence

__all__ = [
    "LAUNCH_FLAGS",
    "LaunchError",
    "LaunchPlan",
    "VISIBLE_DEVICES_ENV",
    "distributed_training_kwargs",
    "in_torchrun_worker",
    "init_worker_process_group",
    "launch_or_init",
    "plan_launch",
    "pop_launch_flags",
    "torchrun_command",
    "visible_device_ids",
]

#: env var that restricts the devices a process sees, per device kind
VISIBLE_DEVICES_ENV = {"npu": "ASCEND_RT_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES"}

#: command-line flags of ``npu-ft train`` that belong to the launcher -> env var they set
LAUNCH_FLAGS = {
    "--nproc-per-node": "NPROC_PER_NODE",
    "--nnodes": "NNODES",
    "--node-rank": "NODE_RANK",
    "--master-addr": "MASTER_ADDR",
    "--master-port": "MASTER_PORT",
}


class LaunchError(ValueError):
    """A launch that cannot work (bad env, too many processes, unsupported combination)."""


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """How many processes run where, on which device kind, with which process-group backend."""

    device: str
    dist_backend: str
    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    visible_devices: tuple[str, ...] | None = None

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------
def in_torchrun_worker(env: Mapping[str, str] | None = None) -> bool:
    """True inside a process started by torchrun / torch.distributed / deepspeed launchers."""
    env = os.environ if env is None else env
    return "LOCAL_RANK" in env and "WORLD_SIZE" in env


def visible_device_ids(device: str, env: Mapping[str, str] | None = None) -> list[str] | None:
    """Device ids listed in ``ASCEND_RT_VISIBLE_DEVICES`` / ``CUDA_VISIBLE_DEVICES``, or None if unset."""
    env = os.environ if env is None else env
    name = VISIBLE_DEVICES_ENV.get(device)
    if name is None or name not in env:
        return None
    ids = [part.strip() for part in env[name].split(",") if part.strip()]
    if len(set(ids)) != len(ids):
        raise LaunchError(f"{name}={env[name]!r} lists a device twice")
    return ids


def _int_env(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or str(raw).strip() == "":
        return default
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise LaunchError(f"{name}={value} must be >= {minimum}")
    return value


def free_port() -> int:
    """A TCP port that is free on this host right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def plan_launch(device: str | None = None, env: Mapping[str, str] | None = None) -> LaunchPlan:
    """Read NNODES / NODE_RANK / MASTER_* / NPROC_PER_NODE and the device layer into a plan.

    ``device`` is the recipe's ``device:`` (``auto``/None: ``$NPU_FT_DEVICE`` or npu > cuda > cpu).
    Raises :class:`LaunchError` for impossible requests and ``DeviceUnavailableError`` when the
    device asked for cannot be used here.
    """
    from npu_ft.device import get_backend

    env = os.environ if env is None else env
    backend = get_backend(None if device in (None, "auto") else device)
    visible = visible_device_ids(backend.name, env)
    if backend.name == "cpu":
        available = os.cpu_count() or 1
        default_nproc = 1
    else:
        available = backend.device_count()
        if visible is not None and len(visible) < available:  # pragma: no cover - runtime honours it
            available = len(visible)
        default_nproc = max(available, 1)
    nproc = _int_env(env, "NPROC_PER_NODE", default_nproc, 1)
    if nproc > available:
        if backend.name == "cpu":
            raise LaunchError(f"NPROC_PER_NODE={nproc} asks for more processes than this host has CPU cores "
                              f"({available}); use at most {available}")
        where = f" ({VISIBLE_DEVICES_ENV[backend.name]}={env[VISIBLE_DEVICES_ENV[backend.name]]})" \
            if visible is not None else ""
        raise LaunchError(f"NPROC_PER_NODE={nproc} asks for more processes than visible {backend.name} "
                          f"devices: {available}{where}; one process per device, so use at most {available}")
    nnodes = _int_env(env, "NNODES", 1, 1)
    node_rank = _int_env(env, "NODE_RANK", 0, 0)
    if node_rank >= nnodes:
        raise LaunchError(f"NODE_RANK={node_rank} must be smaller than NNODES={nnodes}")
    master_addr = (env.get("MASTER_ADDR") or "").strip()
    if nnodes > 1 and not master_addr:
        raise LaunchError(f"NNODES={nnodes} needs MASTER_ADDR: set it to the address of the node with "
                          "NODE_RANK=0 (and the same MASTER_PORT on every node)")
    if nnodes > 1 and "MASTER_PORT" not in env:
        port = 29500
    else:
        port = _int_env(env, "MASTER_PORT", 0, 1) or free_port()
    if not 0 < port < 65536:
        raise LaunchError(f"MASTER_PORT={port} is not a TCP port (1..65535)")
    return LaunchPlan(device=backend.name, dist_backend=backend.dist_backend, nproc_per_node=nproc,
                      nnodes=nnodes, node_rank=node_rank, master_addr=master_addr or "127.0.0.1",
                      master_port=port, visible_devices=tuple(visible) if visible is not None else None)


def torchrun_command(plan: LaunchPlan, train_argv: Sequence[str], python: str | None = None) -> list[str]:
    """The ``python -m torch.distributed.run ... -m npu_ft.launch RECIPE ...`` command for ``plan``
    (each worker runs :mod:`npu_ft.launch`, i.e. this hook, then ``npu-ft train``)."""
    return [
        python or sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(plan.nnodes),
        "--node_rank", str(plan.node_rank),
        "--nproc_per_node", str(plan.nproc_per_node),
        "--master_addr", plan.master_addr,
        "--master_port", str(plan.master_port),
        "-m", "npu_ft.launch", *train_argv,
    ]


def pop_launch_flags(argv: MutableSequence[str]) -> dict[str, str]:
    """Remove ``--nproc-per-node N`` & co. from ``argv`` (in place); return them as env settings."""
    found: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, sep, value = arg.partition("=")
        key = name.replace("_", "-")
        if key in LAUNCH_FLAGS:
            if not sep:
                if i + 1 >= len(argv):
                    raise LaunchError(f"{name} needs a value")
                value = argv[i + 1]
                del argv[i:i + 2]
            else:
                del argv[i]
            found[LAUNCH_FLAGS[key]] = value
            continue
        i += 1
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
        kwargs = {}
        if timeout_s:
            kwargs["timeout"] = datetime.timedelta(seconds=float(timeout_s))
        if backend.name != "cpu":
            kwargs["device_id"] = torch_device
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
def _split_recipe_argv(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    recipe = next((a for a in argv if not a.startswith("-") and "=" not in a), None)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    return recipe, overrides


def launch_or_init(argv: MutableSequence[str], env: Mapping[str, str] | None = None,
                   run=subprocess.call, prog: str = "npu-ft train") -> int | None:
    """Call first in ``train_main(argv)``: ``rc = launch_or_init(argv); if rc is not None: return rc``.

    Removes the launcher flags (``--nproc-per-node``, ``--nnodes``, ``--node-rank``,
    ``--master-addr``, ``--master-port``) from ``argv`` in place. Returns torchrun's exit code when
    this process launched the workers, 1 (after printing the reason) when the launch request or
    the recipe's combination cannot work, and None when training should go on in this process (a
    single process, or a torchrun worker whose process group is now initialised). A recipe that
    does not load is left to the trainer, which reports it.
    """
    from npu_ft.device import DeviceUnavailableError
    from npu_ft.train.config import ConfigError, load_config

    from .checks import check_launch

    env = dict(os.environ if env is None else env)
    try:
        env.update(pop_launch_flags(argv))
    except LaunchError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    recipe, overrides = _split_recipe_argv(argv)
    if recipe is None:
        return None  # the trainer CLI prints its own usage error
    try:
        cfg = load_config(recipe, overrides)
    except ConfigError:
        return None  # the trainer reports it, with its own wording
    try:
        if in_torchrun_worker(env):
            init_worker_process_group(cfg.device, timeout_s=cfg.ddp_timeout)
            return None
        plan = plan_launch(cfg.device, env)
        check_launch(cfg, plan)
    except (LaunchError, DeviceUnavailableError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
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
