"""``npu-ft k8s RECIPE [key=value ...] --image IMAGE [options]``: the command line.

Exit codes: 0 written; 1 bad input (recipe, option value, output path), one line
``npu-ft k8s: error: ...``; 2 usage (argparse).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..torchrun import LaunchError
from .build import HEADER, build_job, dump_manifests
from .options import APIS, DEFAULT_MOUNT, DEFAULT_NODE_SELECTOR, DEFAULT_PVC, JobOptions

__all__ = ["k8s_main", "write_output"]


def _kv(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise LaunchError(f"{what} {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="npu-ft k8s",
                                description="write Kubernetes manifests (a ConfigMap with the recipe and a Kubeflow "
                                            "PyTorchJob or TrainJob) to train a recipe on Ascend NPUs")
    p.add_argument("recipe", help="recipe YAML (e.g. recipes/qwen2.5-7b/lora.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    p.add_argument("--image", required=True, help="container image with npu-ft, torch_npu and CANN")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (pods), default 1")
    p.add_argument("--npus-per-node", type=int, default=8, help="NPUs per node, default 8")
    p.add_argument("--api", choices=APIS, default="pytorchjob",
                   help="pytorchjob: Kubeflow Training Operator PyTorchJob v1 (default); trainer-v2: Kubeflow "
                        "Trainer TrainJob")
    p.add_argument("--runtime", default="torch-distributed",
                   help="trainer-v2: the ClusterTrainingRuntime (default torch-distributed)")
    p.add_argument("--name", default=None, help="job name (default from the recipe path)")
    p.add_argument("--namespace", default=None)
    p.add_argument("--pvc", default=None, help=f"shared PVC with models/, data/, saves/ (default {DEFAULT_PVC})")
    p.add_argument("--mount", default=DEFAULT_MOUNT, help="where the PVC is mounted (the working dir)")
    p.add_argument("--hub-token-secret", default=None, help="Secret with a hub token (HF_TOKEN)")
    p.add_argument("--hub-token-key", default="token", help="key in that Secret (default: token)")
    p.add_argument("--scheduler", default=None, help="schedulerName, e.g. volcano (adds gang scheduling)")
    p.add_argument("--ring-controller", default="ascend-910b",
                   help="with --scheduler volcano: the ring-controller.atlas label value (default ascend-910b)")
    default_selector = ",".join(f"{k}={v}" for k, v in DEFAULT_NODE_SELECTOR.items())
    p.add_argument("--node-selector", action="append", default=None, metavar="KEY=VALUE",
                   help=f"node selector (default {default_selector}; give '' for none)")
    p.add_argument("--cpu", default=None, help="CPU request = limit per pod, e.g. 128")
    p.add_argument("--memory", default=None, help="memory request = limit per pod, e.g. 1500Gi")
    p.add_argument("--shm", default="64Gi", help="size of the memory-backed /dev/shm (default 64Gi)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra/override env")
    p.add_argument("--host-network", action="store_true", help="pods use the node's network (hostNetwork)")
    p.add_argument("--hccl-socket-ifname", default=None, metavar="IFACE",
                   help="HCCL_SOCKET_IFNAME=IFACE instead of the default HCCL_IF_IP=<pod IP>")
    p.add_argument("--ascend-runtime", action="store_true",
                   help="the nodes run the Ascend Docker Runtime, which mounts the driver: no hostPath mounts")
    p.add_argument("--run-as-user", default=None, metavar="UID[:GID]",
                   help="run as this non-root user (runAsNonRoot); default: the image's user")
    p.add_argument("--cap-add", action="append", default=[], metavar="CAP",
                   help="give back a Linux capability (all are dropped), e.g. DAC_READ_SEARCH")
    p.add_argument("-o", "--output", default="-", help="output file (default: stdout); its folder must exist")
    return p


def write_output(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a staging file + rename. Refuses a missing folder, and a file
    that ``npu-ft k8s`` did not write (its first line is not :data:`HEADER`)."""
    folder = path.parent
    if not folder.is_dir():
        raise LaunchError(f"-o {path}: folder {str(folder)!r} does not exist (create it first)")
    if path.is_dir():
        raise LaunchError(f"-o {path}: is a folder, give a file name")
    if path.exists():
        try:
            with open(path, encoding="utf-8") as f:
                first = f.readline().rstrip("\n")
        except (OSError, UnicodeDecodeError):
            first = ""
        if first != HEADER:
            raise LaunchError(f"-o {path}: the file exists and was not written by npu-ft k8s; remove it or choose "
                              "another name")
    staging = folder / f".{path.name}.npu-ft-tmp"
    try:
        staging.write_text(text, encoding="utf-8")
        os.replace(staging, path)
    except OSError as exc:
        staging.unlink(missing_ok=True)
        raise LaunchError(f"-o {path}: {exc.strerror or exc}") from None


def k8s_main(argv: list[str]) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        selector = None
        if args.node_selector is not None:
            selector = _kv([s for s in args.node_selector if s], "--node-selector")
        opts = JobOptions(image=args.image, nodes=args.nodes, npus_per_node=args.npus_per_node, api=args.api,
                          runtime=args.runtime, name=args.name, namespace=args.namespace, pvc=args.pvc,
                          mount=args.mount, hub_token_secret=args.hub_token_secret, hub_token_key=args.hub_token_key,
                          scheduler=args.scheduler, ring_controller=args.ring_controller, node_selector=selector,
                          cpu=args.cpu, memory=args.memory, shm=args.shm, env=_kv(args.env, "--env"),
                          host_network=args.host_network, hccl_socket_ifname=args.hccl_socket_ifname,
                          ascend_runtime=args.ascend_runtime, run_as_user=args.run_as_user,
                          cap_add=tuple(args.cap_add))
        manifests = build_job(args.recipe, opts, args.overrides)
        text = dump_manifests(manifests.docs)
        if args.output != "-":
            write_output(Path(args.output), text)
    except ValueError as exc:  # LaunchError, ConfigError, YamlError
        print(f"npu-ft k8s: error: {exc}", file=sys.stderr)
        return 1
    for note in manifests.notes:
        print(f"npu-ft k8s: warning: {note}", file=sys.stderr)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        print(f"npu-ft k8s: wrote {args.output}", file=sys.stderr)
    return 0
