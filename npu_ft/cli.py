"""`npu-ft` command line: train | export | bench | doctor | env | demo.

Each sub-command lives in its own module and is imported only when it runs, so `npu-ft env`
works even where the training stack is broken.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

#: sub-command -> (module, function, help). The function takes (argv: list[str]) -> int.
COMMANDS = {
    "train": ("npu_ft.train.cli", "train_main", "fine-tune from a LLaMA-Factory style YAML"),
    "export": ("npu_ft.train.cli", "export_main", "merge an adapter into its base model"),
    "bench": ("npu_ft.bench.cli", "bench_main", "run a benchmark suite or compare results"),
    "doctor": ("npu_ft.doctor", "doctor_main", "check every op against its reference on a device"),
    "demo": ("npu_ft.demo", "demo_main", "fine-tune a tiny Qwen2 on CPU and show it learned"),
    "env": ("npu_ft.cli", "env_main", "print versions and what each device backend can do"),
    "k8s": ("npu_ft.launch.k8s", "k8s_main", "write a Kubeflow PyTorchJob manifest for a recipe (Ascend 910B)"),
    "lf-train": ("npu_ft.plugins_cli", "lf_train_main", "run LLaMA-Factory's own training on npu-ft's ops (plugin)"),
    "estimate": ("npu_ft.launch.estimate_cli", "estimate_main", "memory per card of a recipe, part by part"),
    "plan": ("npu_ft.launch.planner", "plan_main", "settings that fit a card with the most tokens per step"),
    "verify": ("npu_ft.bench.verify", "verify_main", "verify a machine: doctor, device tests, micro-bench, smoke"),
}


def env_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="npu-ft env", description=COMMANDS["env"][2])
    parser.add_argument("--device", default=None, help="cpu | cuda | npu | auto (default: $NPU_FT_DEVICE or auto)")
    args = parser.parse_args(argv)
    from npu_ft.env_info import environment_report

    print(json.dumps(environment_report(args.device), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        lines = [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
        print("usage: npu-ft COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from npu_ft import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"npu-ft: unknown command {name!r} (expected one of: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    func = getattr(importlib.import_module(module_name), func_name)
    from npu_ft.device import DeviceUnavailableError

    try:
        return int(func(rest) or 0)
    except DeviceUnavailableError as exc:
        print(f"npu-ft {name}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
