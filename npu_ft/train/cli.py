"""``npu-ft train CONFIG.yaml [key=value ...]``: LLaMA-Factory keys; overrides after the file, as
``llamafactory-cli train``; ``--nproc-per-node N`` & co. (or ``NPROC_PER_NODE``) launch torchrun.

The recipe and its inputs are checked first, in this process (:mod:`npu_ft.launch.torchrun`,
:mod:`npu_ft.train.preflight`), before the training stack is imported or a worker started. Exit
status (:mod:`npu_ft.cli_common`): 0 on success; 1 with one line naming the file, key or line for
a bad recipe, dataset, model folder or device, or a NaN/inf loss; 2 for a malformed command line;
130 when interrupted. The traceback is printed only with ``NPU_FT_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from npu_ft.cli_common import EXIT_INTERRUPTED, EXIT_USAGE, UsageError, is_input_error, report, wants_help
from npu_ft.logs import VERBOSITY_ENV, LogLevelError, setup_logging

__all__ = ["train_main"]

_USAGE = "npu-ft train CONFIG.yaml [key=value ...] [--log-level LEVEL] [--nproc-per-node N] [--nnodes N] " \
         "[--node-rank R] [--master-addr HOST] [--master-port PORT]"
_HELP = f"""usage: {_USAGE}

Fine-tune from a LLaMA-Factory 0.9.5 style YAML recipe (see docs/training.md and docs/config.md).
key=value overrides recipe keys.

options:
  --log-level LEVEL     DEBUG | INFO (default) | WARNING | ERROR; or NPU_FT_VERBOSITY

launch (more than one process runs through torchrun; docs/scale-out.md):
  --nproc-per-node N    processes on this node (NPROC_PER_NODE; default: every visible NPU / GPU, 1 on CPU)
  --nnodes N            nodes (NNODES, default 1)
  --node-rank R         this node's index, 0..N-1 (NODE_RANK, default 0)
  --master-addr HOST    rendezvous host, required with several nodes (MASTER_ADDR)
  --master-port PORT    rendezvous port (MASTER_PORT; default a free port, 29500 with several nodes)
  devices per process follow ASCEND_RT_VISIBLE_DEVICES (npu) or CUDA_VISIBLE_DEVICES (cuda)
"""


def _help_text() -> str:
    from npu_ft.config.docs import keys_help

    return f"{_HELP}\n{keys_help()}"


def _pop_log_level(argv: list[str]) -> str | None:
    """Remove ``--log-level X`` / ``--log-level=X`` from ``argv``; its value (None when absent)."""
    for i, arg in enumerate(argv):
        if arg == "--log-level":
            if i + 1 >= len(argv):
                raise UsageError("--log-level needs a value (DEBUG, INFO, WARNING, ERROR)")
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if arg.startswith("--log-level="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def train_main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if wants_help(argv):
        print(_help_text())
        return 0
    level = None
    try:
        level = _pop_log_level(argv)
        setup_logging(level)
    except UsageError as exc:
        print(f"usage: {_USAGE}", file=sys.stderr)
        return report("npu-ft train", exc)
    except LogLevelError as exc:  # a bad --log-level is usage; a bad NPU_FT_VERBOSITY is bad input
        return report("npu-ft train", UsageError(str(exc)) if level else exc)
    if level:
        os.environ[VERBOSITY_ENV] = level  # the same level in torchrun's workers
    if not argv:
        print(f"usage: {_USAGE}\nnpu-ft train: error: the YAML recipe is missing", file=sys.stderr)
        return EXIT_USAGE
    from npu_ft.launch import launch_or_init  # checks everything; torchrun when >1 process

    if (rc := launch_or_init(argv)) is not None:
        return rc
    config_path, overrides = argv[0], argv[1:]
    try:
        from npu_ft.config import load_config

        from .run import run_sft

        result = run_sft(load_config(config_path, overrides))
    except KeyboardInterrupt:
        print("npu-ft train: interrupted (complete checkpoints are kept; resume with "
              "resume_from_checkpoint=true)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if not is_input_error(exc):
            raise
        return report("npu-ft train", exc)
    what = "already finished, no step run" if result.already_finished else f"{result.global_step} steps"
    print(f"npu-ft train: done: {result.method} on {result.device}, {what}; outputs in {result.output_dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main(sys.argv[1:]))
