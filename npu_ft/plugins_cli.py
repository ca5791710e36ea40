"""Sub-commands that live in plugins (outside the ``npu_ft`` package).

``npu-ft lf-train`` runs LLaMA-Factory's own training with npu-ft's ops patched in; the code is the
``npu_ft_llamafactory`` package in ``plugins/llamafactory`` (installed with
``pip install -e plugins/llamafactory``, or found next to this checkout). See docs/llamafactory.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

_PLUGIN_DIR = Path(__file__).resolve().parents[1] / "plugins" / "llamafactory"


def _import_plugin():
    try:
        import npu_ft_llamafactory  # noqa: F401 - installed
    except ImportError:
        if not (_PLUGIN_DIR / "npu_ft_llamafactory" / "__init__.py").exists():
            return None
        sys.path.insert(0, str(_PLUGIN_DIR))  # a source checkout: the plugin sits next to npu_ft
    from npu_ft_llamafactory import cli

    return cli


def lf_train_main(argv: list[str]) -> int:
    cli = _import_plugin()
    if cli is None:
        print("npu-ft lf-train: the LLaMA-Factory plugin (npu_ft_llamafactory) is not installed; "
              "pip install -e plugins/llamafactory from an npu-ft checkout (docs/llamafactory.md)", file=sys.stderr)
        return 2
    return cli.lf_train_main(argv)
