"""cuda kernels of the npu_ft ops, one module per op family (e.g. `nf4.py`, `lora.py`).

Each module (private ones, `_*.py`, aside) defines `KERNELS = {op name: kernel function}`;
:func:`register` below registers them all on the cuda dispatch key (only for the ops that exist).
"""

from __future__ import annotations

from .._discover import register_submodules


def register() -> None:
    """Register every cuda kernel."""
    register_submodules(__name__)
