"""Fixtures shared by the whole suite."""
from __future__ import annotations

import pytest

from tests.helpers import require_kernel_device


@pytest.fixture(scope="session")
def kernel_device() -> str:
    """The device every kernel-vs-reference test runs on: ``"cuda"`` when a CUDA device is present
    (kernels compiled), else ``"cpu"`` under ``TRITON_INTERPRET=1``; otherwise the test is skipped
    with the reason (the rule: :func:`tests.helpers.kernel_device_choice`). Session-scoped: the
    choice holds for the whole run (and hypothesis tests may take it)."""
    return require_kernel_device()
