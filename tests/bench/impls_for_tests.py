"""Custom implementations for the bench tests (``custom:tests.bench.impls_for_tests:<name>``)."""

from __future__ import annotations

import os
import time

from npu_ft.bench.impls import Prepared


def plain(case, factory, device):
    """Full fine-tuning of the plain transformers model: a case that works."""
    model = factory().to(device)
    model.requires_grad_(True)
    return Prepared(model=model, features=["plain"])


def raising(case, factory, device):
    raise RuntimeError("boom: this implementation always fails")


def out_of_memory(case, factory, device):
    raise MemoryError("simulated allocation failure")


def aborting(case, factory, device):
    os.abort()  # a hard crash: no Python exception, no result file


def sleeping(case, factory, device):
    time.sleep(600)
