"""cpu kernels of the npu_ft ops, one module per op family (e.g. `nf4.py`, `lora.py`).

Each module (private ones, `_*.py`, aside) defines `KERNELS = {op name: kernel function}`;
:func:`register` below registers them all on the cpu dispatch key (only for the ops that exist).
"""

from __future__ import annotations

from .._discover import register_submodules


def register() -> None:
    """Register every cpu kernel."""
    register_submodules(__name__)


def load_native() -> str | None:
    """Load the native CPU kernels now (building them once per machine) rather than at the first op
    call, e.g. before a memory baseline; returns why they are unavailable, or None."""
    from . import _native

    return _native.unavailable_reason()
