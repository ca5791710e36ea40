"""``python -m npu_ft.launch [--nproc-per-node N] RECIPE [key=value ...]``: launch, then train.

torchrun's workers run this module as well: in a worker :func:`launch_or_init` only creates the
process group (device layer backend) and training goes on in ``npu_ft.train.cli.train_main``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .torchrun import launch_or_init

    rc = launch_or_init(argv)
    if rc is not None:
        return rc
    from npu_ft.train.cli import train_main

    return int(train_main(argv) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
