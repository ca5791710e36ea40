"""The settings of one ``npu-ft k8s`` job, checked before anything is built: Kubernetes names,
resource quantities, environment variable names, the user to run as.

>>> check_quantity("--memory", "1500Gi")
'1500Gi'
>>> try:
...     check_quantity("--memory", "10GB")
... except ValueError as exc:
...     print(str(exc).split(": ")[-1])
write 10G or 10Gi, not 10GB
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from ..torchrun import LaunchError

__all__ = ["APIS", "DEFAULT_PVC", "JobOptions", "check_job_name", "check_name", "check_quantity"]

APIS = ("pytorchjob", "trainer-v2")
DEFAULT_PVC = "npu-ft-workspace"
DEFAULT_MOUNT = "/workspace"
#: Huawei's node label for 910 servers (MindCluster / Ascend device plugin installs set it)
DEFAULT_NODE_SELECTOR = {"accelerator": "huawei-Ascend910"}

# Kubernetes resource.Quantity without a sign (k8s.io/apimachinery/pkg/api/resource): a decimal
# number, then a binary-SI (Ki..Ei), decimal-SI (n u m k M G T P E) or exponent (e3) suffix
_QUANTITY = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<suffix>[KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# label values: at most 63 characters, alphanumerics with - _ . inside
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
_CAPABILITY = re.compile(r"[A-Z][A-Z0-9_]*")


def check_name(name: str, what: str, *, dots: bool = False) -> str:
    """A DNS-1123 label (job and namespace names: lower-case, digits, '-', <= 63 characters) or, with
    ``dots``, a DNS-1123 subdomain (PVC, Secret, runtime names: labels joined by '.', <= 253)."""
    parts = name.split(".") if dots else [name]
    if not all(_NAME.fullmatch(p) and len(p) <= 63 for p in parts) or len(name) > 253:
        allowed = "lower-case letters, digits, '-' and '.'" if dots else "lower-case letters, digits and '-'"
        raise LaunchError(f"{what} {name!r} is not a valid Kubernetes name ({allowed}, at most "
                          f"{253 if dots else 63} characters)")
    return name


def check_job_name(name: str, opts: JobOptions) -> str:
    """The job name, if the names the operator derives from it stay DNS labels (<= 63 characters):
    PyTorchJob pods/Services ``<job>-worker-<i>``, TrainJob pods ``<job>-node-0-<i>``."""
    check_name(name, "job name")
    longest = (f"-node-0-{opts.nodes - 1}" if opts.api == "trainer-v2"
               else f"-worker-{opts.nodes - 2}" if opts.nodes > 1 else "-master-0")
    if len(name) + len(longest) > 63:
        raise LaunchError(f"job name {name!r} is too long: the operator names pods {name}{longest}, which must "
                          f"have at most 63 characters (give --name with at most {63 - len(longest)})")
    return name


def check_quantity(flag: str, value: str, *, memory: bool = False) -> str:
    """``value`` if it is a positive Kubernetes quantity (``128``, ``500m``, ``1500Gi``, ``1.5Ti``)."""
    match = _QUANTITY.fullmatch(value)
    if match is None:
        hint = ""
        if re.fullmatch(r"[0-9.]+[KMGTPE]B", value):
            hint = f": write {value[:-1]} or {value[:-1]}i, not {value}"
        elif value.startswith(("-", "+")):
            hint = ": it must be a positive amount"
        raise LaunchError(f"{flag} {value!r} is not a Kubernetes quantity (e.g. 128, 500m, 1500Gi, 1.5Ti){hint}")
    if float(match["number"]) == 0:
        raise LaunchError(f"{flag} {value!r} must be more than 0")
    if memory and match["suffix"] in ("n", "u", "m"):
        raise LaunchError(f"{flag} {value!r} is a fraction of a byte ({match['suffix']!r} is a milli/micro/nano "
                          f"suffix); did you mean {match['number']}Mi?")
    return value


def _check_env(env: Mapping[str, str]) -> dict[str, str]:
    for key in env:
        if not _ENV_NAME.fullmatch(key):
            raise LaunchError(f"--env {key!r} is not a valid environment variable name")
    return dict(env)


def _parse_user(value: str) -> tuple[int, int | None]:
    uid, _, gid = value.partition(":")
    try:
        ids = int(uid), (int(gid) if gid else None)
    except ValueError:
        raise LaunchError(f"--run-as-user {value!r} must be UID or UID:GID (numbers)") from None
    if ids[0] <= 0 or (ids[1] is not None and ids[1] < 0):
        raise LaunchError(f"--run-as-user {value!r}: the UID must be a non-root user (> 0)")
    return ids


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """Everything ``npu-ft k8s`` puts into the manifests besides the recipe (checked on creation)."""

    image: str
    nodes: int = 1
    npus_per_node: int = 8
    api: str = "pytorchjob"                  # pytorchjob (kubeflow.org/v1) | trainer-v2 (TrainJob)
    runtime: str = "torch-distributed"       # trainer-v2: the ClusterTrainingRuntime to use
    name: str | None = None
    namespace: str | None = None
    pvc: str | None = None                   # None: DEFAULT_PVC, with a warning
    mount: str = DEFAULT_MOUNT
    hub_token_secret: str | None = None
    hub_token_key: str = "token"
    scheduler: str | None = None
    ring_controller: str = "ascend-910b"     # MindCluster's Volcano label value (with scheduler volcano)
    node_selector: Mapping[str, str] | None = None   # None: DEFAULT_NODE_SELECTOR; {}: none
    cpu: str | None = None
    memory: str | None = None
    shm: str = "64Gi"
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    host_network: bool = False
    hccl_socket_ifname: str | None = None    # None: HCCL_IF_IP = the pod's IP
    ascend_runtime: bool = False             # True: Ascend Docker Runtime mounts the driver
    run_as_user: str | None = None           # "UID[:GID]": runAsNonRoot with that user
    cap_add: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self._check_shape()
        self._check_names()
        self._check_pod_settings()

    def _check_shape(self) -> None:
        """Nodes, NPUs, image, API, resource quantities."""
        if self.nodes < 1:
            raise LaunchError(f"--nodes must be >= 1, got {self.nodes}")
        if not 1 <= self.npus_per_node <= 16:
            raise LaunchError(f"--npus-per-node must be 1..16 (a 910B server has 8), got {self.npus_per_node}")
        if not self.image.strip():
            raise LaunchError("--image is required (a container image with npu-ft, torch_npu and CANN)")
        if any(c.isspace() for c in self.image):
            raise LaunchError(f"--image {self.image!r} must not contain spaces")
        if self.api not in APIS:
            raise LaunchError(f"--api must be one of {', '.join(APIS)}, got {self.api!r}")
        for flag, value, memory in (("--cpu", self.cpu, False), ("--memory", self.memory, True),
                                    ("--shm", self.shm, True)):
            if value is not None:
                check_quantity(flag, value, memory=memory)

    def _check_names(self) -> None:
        """Kubernetes names and label values."""
        check_name(self.runtime, "--runtime", dots=True)
        if self.name is not None:
            check_job_name(self.name, self)
        if self.namespace is not None:
            check_name(self.namespace, "namespace")
        check_name(self.pvc_name, "PVC name", dots=True)
        if self.hub_token_secret is not None:
            check_name(self.hub_token_secret, "secret name", dots=True)
        if self.scheduler is not None:
            check_name(self.scheduler, "--scheduler", dots=True)
        if not _LABEL_VALUE.fullmatch(self.ring_controller) or len(self.ring_controller) > 63:
            raise LaunchError(f"--ring-controller {self.ring_controller!r} is not a valid label value")

    def _check_pod_settings(self) -> None:
        """Mount path, environment, network, user and capabilities."""
        if not self.mount.startswith("/") or self.mount.rstrip("/") in ("", "/etc/npu-ft", "/dev/shm"):
            raise LaunchError(f"--mount {self.mount!r} must be an absolute path in the container "
                              "(not /, /etc/npu-ft or /dev/shm)")
        _check_env(self.env)
        if self.hccl_socket_ifname is not None and not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,15}",
                                                                    self.hccl_socket_ifname):
            raise LaunchError(f"--hccl-socket-ifname {self.hccl_socket_ifname!r} is not a network interface name")
        if self.run_as_user is not None:
            _parse_user(self.run_as_user)
        for cap in self.cap_add:
            if not _CAPABILITY.fullmatch(cap):
                raise LaunchError(f"--cap-add {cap!r} is not a Linux capability name (e.g. DAC_READ_SEARCH)")
        if self.api == "trainer-v2" and self.host_network:
            raise LaunchError("--host-network cannot be set on a TrainJob (Kubeflow Trainer's runtimePatches do not "
                              "cover hostNetwork): use a ClusterTrainingRuntime whose pod template sets "
                              "hostNetwork: true (--runtime NAME), or --api pytorchjob")

    @property
    def pvc_name(self) -> str:
        return DEFAULT_PVC if self.pvc is None else self.pvc

    @property
    def node_labels(self) -> dict[str, str]:
        return dict(DEFAULT_NODE_SELECTOR if self.node_selector is None else self.node_selector)

    @property
    def volcano(self) -> bool:
        return self.scheduler == "volcano"

    @property
    def user(self) -> tuple[int, int | None] | None:
        return None if self.run_as_user is None else _parse_user(self.run_as_user)

    @property
    def capabilities(self) -> list[str]:
        return [cap.removeprefix("CAP_") for cap in self.cap_add]
