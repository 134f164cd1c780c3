"""Fixtures shared by the whole suite."""
from __future__ import annotations

import pytest

from jepa_engine.kernels._launch import triton_available
from tests import export_fixtures
from tests.helpers import in_background, require_kernel_device, start_audit, stop_jobs

# marker -> what starts the background job its tests read (tests/helpers.py): the ahead-of-time audit's
# rows (run_audit), the export tests' AOTInductor package (tests/export_fixtures.py)
BACKGROUND = {"package": export_fixtures.start_package,
              "audit": lambda: start_audit() if triton_available() else None}


@pytest.hookimpl(trylast=True)  # after -m and -k deselected theirs
def pytest_collection_modifyitems(session, config, items):
    """The tests marked ``package`` or ``audit`` read the result of a background job: it starts now,
    and those tests run last, so that it computes while the rest of the suite runs."""
    late = {m: [item for item in items if item.get_closest_marker(m)] for m in BACKGROUND}
    if not any(late.values()):
        return
    items[:] = [item for item in items if not any(item.get_closest_marker(m) for m in BACKGROUND)] + [
        item for m in BACKGROUND for item in late[m]]
    if config.option.collectonly or not in_background():
        return
    for marker, start in BACKGROUND.items():
        if late[marker]:
            start()


def pytest_sessionfinish(session, exitstatus):
    stop_jobs()
    export_fixtures.remove_folders()


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
