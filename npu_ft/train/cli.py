"""``npu-ft train CONFIG.yaml [key=value ...]``: LLaMA-Factory keys; overrides after the file, as
``llamafactory-cli train``; ``--nproc-per-node N`` & co. (or ``NPROC_PER_NODE``) launch torchrun.

The recipe and its inputs are checked first, in this process (:mod:`npu_ft.launch.torchrun`,
:mod:`npu_ft.train.preflight`), before the training stack is imported or a worker started. Exit
status (:mod:`npu_ft.cli_common`): 0 on success; 1 with one line naming the file, key or line for
a bad recipe, dataset, model folder or device, or a NaN/inf loss; 2 for a malformed command line;
130 when interrupted. The traceback is printed only with ``NPU_FT_DEBUG=1``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from npu_ft.cli_common import EXIT_INTERRUPTED, EXIT_USAGE, is_input_error, report, wants_help

__all__ = ["train_main"]

_USAGE = "npu-ft train CONFIG.yaml [key=value ...] [--nproc-per-node N] [--nnodes N] [--node-rank R] " \
         "[--master-addr HOST] [--master-port PORT]"
_HELP = f"""usage: {_USAGE}

Fine-tune from a LLaMA-Factory 0.9.5 style YAML recipe (see docs/training.md and docs/config.md).
key=value overrides recipe keys. The launcher flags set NPROC_PER_NODE, NNODES, NODE_RANK,
MASTER_ADDR and MASTER_PORT: more than one process runs through torchrun (docs/scale-out.md)."""


def train_main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if wants_help(argv):
        print(_HELP)
        return 0
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
    print(f"npu-ft train: done: {result.method} on {result.device}, {result.global_step} steps; "
          f"outputs in {result.output_dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main(sys.argv[1:]))
