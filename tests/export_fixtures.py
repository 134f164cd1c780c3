"""The export tests' package: the test-sized world model saved as a run's checkpoint and exported by the
CLI (a model per history length, the default). Its two AOTInductor compiles take about a minute of one
core, so a background process writes it while the other tests run (started by tests/conftest.py as the
collection ends, for the tests marked ``package``, which run last); without one (pytest-xdist, or a
single test picked by hand) the first test that needs it writes it in the test process.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from jepa_engine.kernels import _native
from jepa_engine.models.world_model import WorldModel, WorldModelConfig
from tests.helpers import finish_job, job_started, start_job

ROOT = Path(__file__).resolve().parents[1]
BUDGET = dict(samples=16, iterations=3, elites=4, horizon=3, seed=5)
ENVS = 2                                  # environments per decision in the exported package
TOOLS = [t for t in ("cmake", "c++") if shutil.which(t) is None]
_JOB = "package"
_FOLDERS: list[str] = []


def export_model() -> WorldModel:
    """The test-sized world model with a history of 2 frames (a package holds one model per history length,
    each an AOTInductor compile), seeded: the same weights in every process."""
    torch.manual_seed(0)
    return WorldModel(WorldModelConfig.from_name("test", history=2)).eval()


def unavailable() -> str:
    """Why no package can be written here ("" when it can): a CPU package needs the native library, and
    the tests that read it the C++ runner's tools."""
    if not _native.available():
        return f"no native library: {_native.status()}"
    if TOOLS:
        return f"no {' or '.join(TOOLS)} on PATH to build the C++ runner"
    return ""


def write_package(folder: Path) -> Path:
    """Save the model as ``folder/run``'s checkpoint and export it with the CLI to ``folder/plan.pt2``."""
    from jepa_engine.cli import main
    from jepa_engine.training.configs import WMTrainConfig
    from jepa_engine.training.world_model import save_world_model

    save_world_model(folder / "run", 1, export_model(), WMTrainConfig.from_name("test"))
    out = folder / "plan.pt2"
    args = ["export", "--checkpoint", str(folder / "run"), "--out", str(out), "--num-envs", str(ENVS)]
    for k, v in BUDGET.items():
        args += [f"--{k}", str(v)]
    assert main(args) == 0 and out.is_file(), f"export {' '.join(args)} failed"
    return out


def start_package() -> None:
    """Write the package in a background process (nothing when it cannot be written here)."""
    if unavailable() or job_started(_JOB):
        return
    folder = tempfile.mkdtemp(prefix="jepa-export-")
    _FOLDERS.append(folder)
    code = "import sys; from pathlib import Path; from tests.export_fixtures import write_package; " \
           "print(write_package(Path(sys.argv[1])))"
    start_job(_JOB, [sys.executable, "-c", code, folder], dict(os.environ), cwd=str(ROOT))


def package(folder: Path) -> Path:
    """The package: the background process's (waited for), else written into ``folder`` now."""
    if not job_started(_JOB):
        return write_package(folder)
    returncode, out, err = finish_job(_JOB)
    assert returncode == 0, f"the background export failed (exit status {returncode}):\n{(out + err)[-3000:]}"
    return Path(out.strip().splitlines()[-1])


def remove_folders() -> None:
    while _FOLDERS:
        shutil.rmtree(_FOLDERS.pop(), ignore_errors=True)
