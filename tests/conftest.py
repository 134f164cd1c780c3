"""Fixtures shared by the whole suite."""
from __future__ import annotations

import pytest

from jepa_engine.kernels._launch import triton_available
from tests.helpers import require_kernel_device, start_audit, stop_audit


@pytest.hookimpl(trylast=True)  # after -m and -k deselected theirs
def pytest_collection_modifyitems(session, config, items):
    """The tests marked ``audit`` read the rows of one ahead-of-time audit process (tests/helpers.py
    run_audit): it starts now in the background, and those tests run last, so that it compiles while
    the rest of the suite runs."""
    audit = [item for item in items if item.get_closest_marker("audit")]
    if not audit:
        return
    items[:] = [item for item in items if not item.get_closest_marker("audit")] + audit
    if triton_available() and not config.option.collectonly:
        start_audit()


def pytest_sessionfinish(session, exitstatus):
    stop_audit()


@pytest.fixture(scope="session")
def kernel_device() -> str:
    """The device every kernel-vs-reference test runs on: ``"cuda"`` when a CUDA device is present
    (kernels compiled), else ``"cpu"`` under ``TRITON_INTERPRET=1``; otherwise the test is skipped
    with the reason (the rule: :func:`tests.helpers.kernel_device_choice`). Session-scoped: the
    choice holds for the whole run (and hypothesis tests may take it)."""
    return require_kernel_device()


@pytest.fixture
def plain_cpu(monkeypatch) -> None:
    """A user's CPU process: no Triton interpreter (``TRITON_INTERPRET=0``), so CPU calls take the ops'
    plain-CPU dispatch (the native C++ kernels where loaded). Set through the test's ``monkeypatch``
    rather than :func:`jepa_engine.kernels._launch.interpreter_off`: ``monkeypatch.undo()`` in the test
    undoes it too, and the test's own ``TRITON_INTERPRET`` changes unwind in order with it."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def backend_device(backend: str, request) -> str:
    """Where a test parametrized by ``backend`` runs: for ``"triton"``, :func:`kernel_device` (CUDA,
    compiled, where a device is present; else CPU under the interpreter; else a skip), since a forced
    Triton backend cannot run on plain CPU tensors; for ``"reference"``, CPU."""
    return request.getfixturevalue("kernel_device") if backend == "triton" else "cpu"
