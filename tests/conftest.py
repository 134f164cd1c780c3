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


@pytest.fixture
def backend_device(backend: str, request) -> str:
    """Where a test parametrized by ``backend`` runs: for ``"triton"``, :func:`kernel_device` (CUDA,
    compiled, where a device is present; else CPU under the interpreter; else a skip), since a forced
    Triton backend cannot run on plain CPU tensors; for ``"reference"``, CPU."""
    return request.getfixturevalue("kernel_device") if backend == "triton" else "cpu"
