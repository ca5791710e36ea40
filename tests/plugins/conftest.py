"""Plugin tests.

* ``tests/plugins/test_*.py`` run in the main environment with PEFT alone (no LLaMA-Factory): the
  patch functions, the import hook and the LLaMA-Factory-level wrappers against a small fake
  LLaMA-Factory package.
* ``tests/plugins/llamafactory_venv/`` needs a real ``llamafactory==0.9.5`` and runs only from
  ``scripts/ci_llamafactory.sh`` (which sets ``NPU_FT_LF_VENV_TESTS=1``). The main suite does not
  collect it at all (it is not reported as passed or skipped); the CI script fails if it cannot run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "plugins" / "llamafactory"
if str(PLUGIN_DIR) not in sys.path:
    sys.path.insert(0, str(PLUGIN_DIR))

collect_ignore = []
if os.environ.get("NPU_FT_LF_VENV_TESTS") != "1":
    collect_ignore.append("llamafactory_venv")


@pytest.fixture
def patched_peft():
    """PEFT patched for one test, reverted afterwards (other tests see PEFT untouched)."""
    from npu_ft.ops import reset_kernel_calls
    from npu_ft_llamafactory import peft_patch

    peft_patch.apply_npu_ft_to_peft()
    peft_patch.set_enabled(True)
    peft_patch.STATS.clear()
    reset_kernel_calls()
    yield peft_patch
    peft_patch.revert_npu_ft_peft()
    peft_patch.set_enabled(True)
    peft_patch.STATS.clear()
