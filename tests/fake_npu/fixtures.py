"""pytest fixtures for the fake npu device; import them into a test module to use them::

    from tests.fake_npu.fixtures import fake_npu  # noqa: F401
"""

from __future__ import annotations

import os

import pytest
import torch

from . import FakeNpuUnavailable, fake_npu_active


@pytest.fixture(scope="module")
def fake_npu():
    """The fake npu, active for this test module: yields ``torch.device("npu")``.

    Skips (with the reason) where the extension cannot be built or a real npu backend is present;
    under CI (``CI`` set) a failed build fails instead.
    """
    try:
        context = fake_npu_active()
        context.__enter__()
    except FakeNpuUnavailable as exc:
        if os.environ.get("CI"):  # in CI the compiler is there: a failed build is a failure
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    try:
        yield torch.device("npu")
    finally:
        context.__exit__(None, None, None)
