"""npu kernels of the npu_ft ops, one module per op family (e.g. `nf4.py`, `lora.py`).

Each module defines `register()`, which calls `npu_ft.ops._registry.register_kernel(op, "npu", fn)`
for its kernels; :func:`register` below runs them all.
"""

from __future__ import annotations

from .._discover import register_submodules


def register() -> None:
    """Register every npu kernel."""
    register_submodules(__name__)
