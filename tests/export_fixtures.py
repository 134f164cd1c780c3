"""The export tests' package: the test-sized world model (history 2) saved as a run's checkpoint and
exported by the CLI, a model per history length (the default): two AOTInductor compiles, about 50 s on
2 cores, once per session.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from jepa_engine.cli import main
from jepa_engine.kernels import _native
from jepa_engine.models.world_model import WorldModel, WorldModelConfig
from jepa_engine.training.configs import WMTrainConfig
from jepa_engine.training.world_model import save_world_model

ROOT = Path(__file__).resolve().parents[1]
BUDGET = dict(samples=16, iterations=3, elites=4, horizon=3, seed=5)
ENVS = 2                                  # environments per decision in the exported package
TOOLS = [t for t in ("cmake", "c++") if shutil.which(t) is None]


def export_model() -> WorldModel:
    """The test-sized world model with a history of 2 frames (a package holds one model per history length,
    each an AOTInductor compile), seeded."""
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
    save_world_model(folder / "run", 1, export_model(), WMTrainConfig.from_name("test"))
    out = folder / "plan.pt2"
    args = ["export", "--checkpoint", str(folder / "run"), "--out", str(out), "--num-envs", str(ENVS)]
    for k, v in BUDGET.items():
        args += [f"--{k}", str(v)]
    assert main(args) == 0 and out.is_file(), f"export {' '.join(args)} failed"
    return out
