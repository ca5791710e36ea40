"""`npu-ft` command line: train | export | bench | doctor | demo | env | k8s | lf-train.

Each sub-command lives in its own module and is imported only when it runs, so `npu-ft env`
works even where the training stack is broken, and `--help` or a bad argument costs no more than
starting Python. Exit codes are the same in every sub-command (:mod:`npu_ft.cli_common`): 0 success,
1 bad input or a device that cannot be used (one line naming the file, key or variable), 2 usage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from npu_ft.cli_common import DEVICE_CHOICES, EXIT_INTERRUPTED, EXIT_USAGE, is_input_error, report, wants_help

#: sub-command -> (module, function, help). The function takes (argv: list[str]) -> int.
COMMANDS = {
    "train": ("npu_ft.train.cli", "train_main", "fine-tune from a LLaMA-Factory style YAML"),
    "export": ("npu_ft.train.export", "export_main", "merge an adapter into its base model"),
    "bench": ("npu_ft.bench.cli", "bench_main", "run a benchmark suite or compare results"),
    "doctor": ("npu_ft.doctor", "doctor_main", "check every op against its reference on a device"),
    "demo": ("npu_ft.demo", "demo_main", "fine-tune a tiny Qwen2 on CPU and show it learned"),
    "chat": ("npu_ft.chat", "chat_main", "chat with a fine-tuned model, or answer one --prompt"),
    "env": ("npu_ft.cli", "env_main", "print versions and what each device backend can do"),
    "k8s": ("npu_ft.launch.k8s", "k8s_main", "write a Kubeflow PyTorchJob or TrainJob for a recipe (Ascend 910B)"),
    "lf-train": ("npu_ft.plugins_cli", "lf_train_main", "run LLaMA-Factory's own training on npu-ft's ops (plugin)"),
    "estimate": ("npu_ft.launch.estimate_cli", "estimate_main", "memory per card of a recipe, part by part"),
    "plan": ("npu_ft.launch.planner", "plan_main", "settings that fit a card with the most tokens per step"),
}

#: sub-commands that pick a device through the device layer, so $NPU_FT_DEVICE must name one
DEVICE_COMMANDS = frozenset({"train", "export", "bench", "doctor", "demo", "env", "lf-train", "chat"})


def env_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="npu-ft env", description=COMMANDS["env"][2])
    parser.add_argument("--device", default=None, choices=DEVICE_CHOICES,
                        help="device to report as chosen (default: $NPU_FT_DEVICE or auto)")
    args = parser.parse_args(argv)
    from npu_ft.env_info import environment_report

    print(json.dumps(environment_report(args.device), indent=2))
    return 0


def _check_device_env() -> None:
    """``$NPU_FT_DEVICE`` names a device kind (checked by the device layer only when it does not
    obviously do, so a valid value costs no torch import)."""
    value = os.environ.get("NPU_FT_DEVICE") or "auto"
    if value.strip().lower().split(":", 1)[0] not in DEVICE_CHOICES:
        from npu_ft.device import device_name_from_env

        device_name_from_env()


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return ("usage: npu-ft COMMAND [ARGS]   (npu-ft COMMAND --help for a command's arguments)\n\ncommands:\n"
            + "\n".join(lines)
            + "\n\nexit codes: 0 success, 1 bad input or unavailable device, 2 usage error")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: npu-ft COMMAND [ARGS]\nnpu-ft: error: a command is required (npu-ft --help lists them)",
              file=sys.stderr)
        return EXIT_USAGE
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from npu_ft import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"npu-ft: error: unknown command {name!r} (expected one of: {', '.join(COMMANDS)})", file=sys.stderr)
        return EXIT_USAGE
    module_name, func_name, _ = COMMANDS[name]
    try:
        if name in DEVICE_COMMANDS and not wants_help(rest):
            _check_device_env()
        if not wants_help(rest):
            from npu_ft.logs import setup_logging

            setup_logging()  # INFO by default, $NPU_FT_VERBOSITY (npu-ft train also takes --log-level)
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(rest) or 0)
    except KeyboardInterrupt:
        print(f"npu-ft {name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if not is_input_error(exc):
            raise
        return report(f"npu-ft {name}", exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
