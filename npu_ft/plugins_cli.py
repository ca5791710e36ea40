"""Sub-commands that live in plugins (separate distributions, imported only when installed).

``npu-ft lf-train`` runs LLaMA-Factory's own training with npu-ft's ops patched in; the code is the
``npu-ft-llamafactory`` distribution (package ``npu_ft_llamafactory``, source in
``plugins/llamafactory``; ``pip install -e plugins/llamafactory``). See docs/llamafactory.md.
"""

from __future__ import annotations

import importlib.util
import sys


def lf_train_main(argv: list[str]) -> int:
    if importlib.util.find_spec("npu_ft_llamafactory") is None:
        print("npu-ft lf-train: error: the LLaMA-Factory plugin (npu-ft-llamafactory) is not installed: "
              "pip install -e plugins/llamafactory from an npu-ft checkout (docs/llamafactory.md)", file=sys.stderr)
        return 1
    from npu_ft_llamafactory import cli

    return cli.lf_train_main(argv)
