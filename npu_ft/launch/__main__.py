"""``python -m npu_ft.launch [--nproc-per-node N] RECIPE [key=value ...]``: ``npu-ft train``.

torchrun's workers run this module: in a worker the launch hook (:func:`npu_ft.launch.launch_or_init`,
called first by ``train_main``) only creates the process group, and training goes on.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from npu_ft.train.cli import train_main

    return int(train_main(list(sys.argv[1:] if argv is None else argv)) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
