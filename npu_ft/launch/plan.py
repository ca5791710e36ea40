"""The launch plan: how many processes run where, read from the environment and the device layer.

Shared by the launcher (:mod:`npu_ft.launch.torchrun`), the pre-launch checks
(:mod:`npu_ft.launch.checks`) and the Kubernetes writer (:mod:`npu_ft.launch.k8s`); it imports none
of them.

Environment (same names as ``llamafactory-cli``):

=================  ======================================================================
``NNODES``          number of nodes (default 1)
``NODE_RANK``       this node's index, 0..NNODES-1 (default 0)
``MASTER_ADDR``     rendezvous host; required when NNODES > 1 (default 127.0.0.1 on one node)
``MASTER_PORT``     rendezvous port (default: a free port on one node, 29500 on several)
``NPROC_PER_NODE``  processes per node (default: visible devices of the device layer; CPU: 1)
=================  ======================================================================

Visible devices follow ``ASCEND_RT_VISIBLE_DEVICES`` (npu) or ``CUDA_VISIBLE_DEVICES`` (cuda).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping

__all__ = [
    "VISIBLE_DEVICES_ENV",
    "LaunchError",
    "LaunchPlan",
    "free_port",
    "in_torchrun_worker",
    "plan_launch",
    "visible_device_ids",
]

#: env var that restricts the devices a process sees, per device kind
VISIBLE_DEVICES_ENV = {"npu": "ASCEND_RT_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES"}


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
    available, default_nproc = backend.local_process_slots()
    if visible is not None and len(visible) < available:  # pragma: no cover - the runtime honours it
        available = default_nproc = len(visible)
    nproc = _int_env(env, "NPROC_PER_NODE", default_nproc, 1)
    if nproc > available:
        if backend.name not in VISIBLE_DEVICES_ENV:
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
