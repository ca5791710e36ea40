"""Test-wide setup.

* Triton kernels run under the interpreter on CPU tensors when no GPU is present; the variable must
  be set before triton is imported, so it is set here.
* The ``ascend`` / ``cuda`` markers select tests that need real hardware; they are deselected (not
  skipped-as-passed) where that hardware is missing, and the reason is printed in the summary.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _real_npu_reason() -> str | None:
    from npu_ft.device import all_backends

    return all_backends()["npu"].unavailable_reason()


def pytest_collection_modifyitems(config, items):
    need = {
        "cuda": (lambda: None if torch.cuda.is_available() else "no CUDA GPU on this machine"),
        "ascend": _real_npu_reason,
    }
    reasons = {}
    for item in items:
        for marker, why in need.items():
            if item.get_closest_marker(marker) is not None:
                if marker not in reasons:
                    reasons[marker] = why()
                if reasons[marker]:
                    item.add_marker(pytest.mark.skip(reason=f"needs {marker} hardware: {reasons[marker]}"))
