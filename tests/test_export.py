"""The decision step exported with AOTInductor and run by the C++ runner: the same plan as the Python
planner for the same seed, and clear errors for bad input.

One package (the test-sized world model with a history of 2, two environments, CEM 16 x 3, horizon 3, a
model per history length: about 50 s of export and compile on 2 cores, tests/export_fixtures.py)
serves the C++ tests; the runner comes from ``make native`` (build/native/jepa_plan) or is built here
into a temporary folder.
Both planners and the warm start are also checked on the eager decision step (the module that is
exported, its iterations a Python loop), against the Python planners.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from jepa_engine.cli import main
from jepa_engine.integrations.export import DecisionStep, ExportError, decision_inputs, export_decision, model_name
from jepa_engine.kernels import _launch, _native, elite_refit, sample_actions, use_backend
from jepa_engine.models.world_model import WorldModel
from jepa_engine.planning import CEMPlanner, MPPIPlanner, Plan, PlannerConfig, latent_cost
from jepa_engine.training.configs import WMTrainConfig
from jepa_engine.training.world_model import save_world_model
from tests import export_fixtures
from tests.export_fixtures import BUDGET, ENVS, ROOT, TOOLS

needs_native = pytest.mark.skipif(not _native.available(), reason=f"no native library: {_native.status()}")
needs_cxx = pytest.mark.skipif(bool(TOOLS), reason=f"no {' or '.join(TOOLS)} on PATH to build the C++ runner")


def _model() -> WorldModel:
    return export_fixtures.export_model()


def _python_plan(model: WorldModel, config: PlannerConfig, frames, past, goal, mode="cem", warm=None) -> Plan:
    """What the Python planner decides from these observations on the CPU (sampling and refit by the
    native library's C++ kernels, the rollout by the reference ops)."""
    with torch.no_grad(), _launch.interpreter_off():
        z_hist, z_goal = model.encode_frames(frames), model.encode(goal)
        planner = (CEMPlanner if mode == "cem" else MPPIPlanner)(config)
        return planner.plan(latent_cost(model, z_hist, past, z_goal), frames.shape[0], warm_start=warm)


# ---- the eager decision step (what is exported) against the Python planners
@needs_native
@pytest.mark.parametrize("mode", ["cem", "mppi"])
def test_decision_step_equals_the_python_planner(mode):
    model = _model()
    config = PlannerConfig(action_dim=2, **BUDGET)
    step = DecisionStep(model, config, mode=mode, num_envs=2, loop=False)   # the loop in Python: no tracing
    frames, past, goal, prev = decision_inputs(model, config, 2, torch.Generator().manual_seed(1))
    with _launch.interpreter_off():
        action, plan, cost, mean = step(frames, past, goal, prev)
    ref = _python_plan(model, config, frames, past, goal, mode)
    # The same ops in the same order: the same bits.
    assert torch.equal(plan, ref.actions) and torch.equal(action, ref.actions[:, 0])
    assert torch.equal(cost, ref.cost) and torch.equal(mean, ref.mean)
    # A warm start: the previous mean shifted by one step, as Planner.initial does.
    with _launch.interpreter_off():
        _, plan2, cost2, _ = step(frames, past, goal, mean)
    ref2 = _python_plan(model, config, frames, past, goal, mode, warm=ref)
    assert torch.equal(plan2, ref2.actions) and torch.equal(cost2, ref2.cost)
    assert not torch.equal(plan2, plan)


@needs_native
def test_decision_step_bad_arguments():
    model = _model()
    with pytest.raises(ExportError, match="mode must be one of"):
        DecisionStep(model, PlannerConfig(**BUDGET), mode="gradient")
    with pytest.raises(ExportError, match="action_dim must be the model's 2, got 3"):
        DecisionStep(model, PlannerConfig(action_dim=3, **BUDGET))
    with pytest.raises(ExportError, match="out must be a .pt2 file name"):
        export_decision(model, PlannerConfig(**BUDGET), "plan.bin")


# ---- the decision step exported for CUDA: the planning ops as their Triton kernels, no Python-only op
@pytest.mark.skipif(not _launch.triton_available(), reason="triton is not installed")
def test_cuda_export_holds_triton_ops_only():
    """Traced for CUDA (on this machine's CPU: the trace only reads shapes), the graph calls no op whose
    CUDA kernel exists only in Python: sampling and refit are their ``triton_op`` twins, which
    AOTInductor compiles into the package as Triton kernels, and the attention is aten ops. In a
    process without the Triton interpreter: ``triton.jit`` makes interpreted kernels at import there,
    which ``wrap_triton`` cannot trace; and without the native library, as the GPU machine installs the
    package (a CUDA package calls none of its kernels)."""
    code = f"""
import torch
from jepa_engine.kernels import _native
assert not _native.available(), _native.status()
from jepa_engine.integrations.export import TRITON_OPS, DecisionStep, export_program, graph_nodes
from jepa_engine.models.world_model import WorldModel, WorldModelConfig
from jepa_engine.planning import PlannerConfig
torch.manual_seed(0)
step = DecisionStep(WorldModel(WorldModelConfig.from_name("test")).eval(), PlannerConfig(action_dim=2, **{BUDGET!r}),
                    num_envs={ENVS})
ep = export_program(step, step.example_inputs(), target="cuda")
ops = {{str(n.target) for n in graph_nodes(ep) if n.op == "call_function" and "jepa_engine" in str(n.target)}}
assert ops == {{f"jepa_engine.{{name}}.default" for name in TRITON_OPS}}, ops
assert any(str(n.target) == "while_loop" for n in graph_nodes(ep))
print("ok", sorted(ops))
"""
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "JEPA_ENGINE_NATIVE": "0"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, (run.stdout + run.stderr)[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: a CUDA package compiles and runs there")
@pytest.mark.skipif(_launch.interpreting(), reason="TRITON_INTERPRET is set: the package compiles the Triton kernels")
def test_cuda_package_equals_the_eager_decision_step(tmp_path_factory, tmp_path):
    """``export --device cuda``: AOTInductor compiles the Triton sampling and refit kernels into the package,
    which runs (from Python, and in the C++ runner where it is built) the eager decision step's plan:
    the same samples bit for bit, its costs rounded as compiled code rounds them."""
    model = _model().cuda()
    config = PlannerConfig(action_dim=2, **BUDGET)
    out = tmp_path / "plan_cuda.pt2"
    report = export_decision(model, config, out, num_envs=ENVS, device="cuda")
    assert report.meta["jepa_engine.device"] == "cuda" and out.is_file()
    frames, past, goal, prev = (t.cuda() for t in decision_inputs(model, config, ENVS, torch.Generator().manual_seed(3)))
    package = torch._inductor.aoti_load_package(str(out))
    action, plan, cost, mean = package(frames, past, goal, prev)
    assert plan.device.type == "cuda" and plan.shape == (ENVS, config.horizon, 2)
    step = DecisionStep(model, config, num_envs=ENVS, loop=False).cuda()
    with use_backend("reference"):
        want = step(frames, past, goal, prev)
    for name, got, ref in zip(("action", "plan", "cost", "mean"), (action, plan, cost, mean), want):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    assert plan.abs().max() > 1e-3
    if TOOLS or not _native.available():
        return
    runner = _runner(tmp_path_factory)
    obs = tmp_path / "obs.f32"
    np.concatenate([t.cpu().numpy().ravel() for t in (frames, past, goal)]).astype("<f4").tofile(obs)
    run = _run(runner, out, "--obs", obs, "--repeat", "2")
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(got["plan"], plan.flatten().cpu().numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["cost"], cost.cpu().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["cem", "mppi"])
def test_triton_ops_equal_the_planning_ops(kernel_device, mode):
    """The ``triton_op`` twins the CUDA package calls compute what the planning ops compute."""
    g = torch.Generator().manual_seed(3)
    mean, std = torch.randn(2, 6, generator=g), torch.rand(2, 6, generator=g) + 0.2
    low, high, rng = torch.full((2,), -1.0), torch.full((2,), 1.0), torch.tensor([11, 40], dtype=torch.int64)
    args = [t.to(kernel_device) for t in (mean, std, low, high, rng)]
    x = torch.ops.jepa_engine.sample_actions_triton(*args, 50, True)
    with use_backend("triton"):
        want = sample_actions(*args, 50)
    assert torch.equal(x, want)
    costs = x.square().sum(-1)
    got = torch.ops.jepa_engine.elite_refit_triton(costs, x, args[0], args[1], mode, 5, 0.5, 0.1, 0.05)
    with use_backend("triton"):
        ref = elite_refit(costs, x, args[0], args[1], mode=mode, k=5, temperature=0.5, momentum=0.1, min_std=0.05)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_export_without_the_native_library(monkeypatch, tmp_path, capsys):
    """A CPU package calls the C++ kernels: without the library it is refused, before any tracing. A CUDA
    package calls none (the GPU machine installs without the C++ build): the library is not asked for, so
    here the next check, the missing device, is what stops it. The decision step itself runs eagerly."""
    monkeypatch.setattr(_native, "_loaded", False)
    monkeypatch.setattr(_native, "_reason", "JEPA_ENGINE_NATIVE=0: the native library is not loaded")
    model, config = _model(), PlannerConfig(action_dim=2, **BUDGET)
    step = DecisionStep(model, config, num_envs=ENVS, loop=False)
    with _launch.interpreter_off():            # a user's process: the Python CPU kernels
        assert step(*decision_inputs(model, config, ENVS))[1].shape == (ENVS, config.horizon, 2)
    with pytest.raises(ExportError, match="need the native library jepa_engine/_C.so; JEPA_ENGINE_NATIVE=0"):
        export_decision(model, config, tmp_path / "p.pt2")
    if _launch.triton_available() and not torch.cuda.is_available():
        with pytest.raises(ExportError, match="^export: device cuda asked, but no CUDA device is available here$"):
            export_decision(model, config, tmp_path / "p.pt2", device="cuda")
    save_world_model(tmp_path / "run", 1, _model(), WMTrainConfig.from_name("test"))
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "p.pt2")]) == 2
    assert "need the native library jepa_engine/_C.so" in capsys.readouterr().err
    assert not (tmp_path / "p.pt2").exists()


def test_export_cli_bad_checkpoint(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "p.pt2")]) == 2
    err = capsys.readouterr().err
    assert "argument --checkpoint" in err and "missing" in err
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "p.bin")]) == 2
    assert "argument --out: must be a .pt2 file name" in capsys.readouterr().err
    assert not (tmp_path / "p.pt2").exists()


# ---- the package and the C++ runner
def _runner(tmp_path_factory) -> Path:
    """build/native/jepa_plan when ``make native`` built it after the last change of cpp/, else a fresh
    build of the runner target in a temporary folder."""
    built = ROOT / "build" / "native" / "jepa_plan"
    sources = [ROOT / "CMakeLists.txt", *(ROOT / "cpp").rglob("*.[ch]*")]
    if built.is_file() and built.stat().st_mtime >= max(p.stat().st_mtime for p in sources):
        return built
    build = tmp_path_factory.mktemp("jepa_plan_build")
    prefix = torch.utils.cmake_prefix_path
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={prefix}"],
                ["cmake", "--build", str(build), "-j2", "--target", "jepa_plan"]):
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return build / "jepa_plan"


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """(runner, package, model, config): tests/export_fixtures.py's package of the test world model."""
    reason = export_fixtures.unavailable()
    if reason:
        pytest.skip(reason)
    runner = _runner(tmp_path_factory)
    out = export_fixtures.write_package(tmp_path_factory.mktemp("export"))
    return runner, out, _model(), PlannerConfig(action_dim=2, **BUDGET)


def _run(runner: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(runner), *map(str, args)], capture_output=True, text=True, timeout=120)


@needs_cxx
def test_cpp_decision_equals_the_python_planner(package, tmp_path):
    runner, pt2, model, config = package
    frames, past, goal, _ = decision_inputs(model, config, ENVS, torch.Generator().manual_seed(3))
    obs = tmp_path / "obs.f32"
    np.concatenate([frames.numpy().ravel(), past.numpy().ravel(), goal.numpy().ravel()]).astype("<f4").tofile(obs)
    run = _run(runner, pt2, "--obs", obs, "--repeat", "3", "--threads", "1", "--out", tmp_path / "out.f32")
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    ref = _python_plan(model, config, frames, past, goal)
    H, A = config.horizon, config.action_dim
    np.testing.assert_allclose(got["plan"], ref.actions.flatten().numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["action"], ref.actions[:, 0].flatten().numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["cost"], ref.cost.numpy(), rtol=1e-5, atol=1e-6)
    assert got["planner"] == "cem" and got["repeat"] == 3 and got["threads"] == 1 and got["median_ms"] > 0
    raw = np.fromfile(tmp_path / "out.f32", dtype="<f4")
    assert raw.size == ENVS * (A + H * A + 1)
    np.testing.assert_array_equal(raw[:ENVS * A], np.float32(got["action"]))
    np.testing.assert_array_equal(raw[-ENVS:], np.float32(got["cost"]))
    # The plan is not the cold start's zeros: the candidates were scored.
    assert np.abs(got["plan"]).max() > 1e-3
    # The second decision warm-starts from the first (Planner::decide keeps the mean): the package run
    # in Python with the first decision's mean gives the same. (Against the eager planner a warm start
    # near the bounds can differ: clipped candidates tie exactly, and compiled kernels round the tied
    # costs differently, which picks other elites.)
    # One thread on both sides: a reduction split over other thread counts rounds differently, which
    # can pick other elites among tied candidates.
    run = _run(runner, pt2, "--obs", obs, "--decisions", "2", "--threads", "1")
    assert run.returncode == 0, run.stderr
    warm = json.loads(run.stdout.strip().splitlines()[-1])
    package = torch._inductor.aoti_load_package(str(pt2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cold = package(frames, past, goal, torch.zeros(ENVS, H * A))
        again = package(frames, past, goal, cold[3])
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(cold[1].flatten().numpy(), got["plan"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(warm["plan"], again[1].flatten().numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(warm["cost"], again[2].numpy(), rtol=1e-6, atol=1e-6)
    assert np.abs(np.subtract(warm["plan"], got["plan"])).max() > 1e-4


@needs_cxx
@pytest.mark.parametrize("history", [1])
def test_cpp_decision_from_fewer_frames_equals_the_python_planner(package, tmp_path, history):
    """An episode's first decisions: the Python MPC plans from the 1, 2, ... frames it has, and the
    package holds a model for each (``history<h>``), which the runner and the C++ planner pick by the
    number of frames they are given."""
    runner, pt2, model, config = package
    frames, past, goal, _ = decision_inputs(model, config, ENVS, torch.Generator().manual_seed(4), history=history)
    assert frames.shape[1] == history and past.shape[1] == history - 1
    obs = tmp_path / "obs.f32"
    np.concatenate([frames.numpy().ravel(), past.numpy().ravel(), goal.numpy().ravel()]).astype("<f4").tofile(obs)
    run = _run(runner, pt2, "--obs", obs, "--history", str(history), "--threads", "1")
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    ref = _python_plan(model, config, frames, past, goal)
    assert got["history"] == history
    np.testing.assert_allclose(got["plan"], ref.actions.flatten().numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["cost"], ref.cost.numpy(), rtol=1e-5, atol=1e-6)
    # the same model from Python, by its name in the package
    from torch._inductor.package import load_package
    short = load_package(str(pt2), model_name(history, model.cfg.history))
    assert short.get_metadata()["jepa_engine.history"] == str(history)
    assert short.get_metadata()["jepa_engine.histories"] == "1,2"
    np.testing.assert_allclose(short(frames, past, goal, torch.zeros(ENVS, config.horizon * 2))[1].flatten().numpy(),
                               got["plan"], rtol=0, atol=1e-5)


@needs_native
def test_decision_step_history_argument():
    model = _model()
    config = PlannerConfig(action_dim=2, **BUDGET)
    assert DecisionStep(model, config, history=1).example_inputs()[0].shape[1] == 1
    for bad in (0, 3, 2.0, True):
        with pytest.raises(ExportError, match=rf"^DecisionStep: history must be an int in \[1, 2\] \(the model's "
                                              rf"history\), got {bad!r}$"):
            DecisionStep(model, config, history=bad)
    with pytest.raises(ExportError, match=r"^export: histories must be one of \('all', 'full'\), got 'some'$"):
        export_decision(model, config, "plan.pt2", histories="some")


@needs_cxx
def test_cpp_runner_bad_input(package, tmp_path):
    runner, pt2, model, config = package
    bad = tmp_path / "short.f32"
    np.zeros(10, dtype="<f4").tofile(bad)
    run = _run(runner, pt2, "--obs", bad)
    T, S = model.cfg.history, model.cfg.img_size
    total = ENVS * (T * S * S + (T - 1) * 2 + S * S)
    assert run.returncode == 2
    assert (f"argument --obs: {bad} must hold {total} float32 values (frames [{ENVS}, {T}, 1, {S}, {S}], "
            f"past [{ENVS}, {T - 1}, 2], goal [{ENVS}, 1, {S}, {S}]), got 40 bytes") in run.stderr
    run = _run(runner, tmp_path / "missing.pt2")
    assert run.returncode == 2 and "package: no readable file" in run.stderr
    run = _run(runner, pt2, "--repeat", "0")
    assert run.returncode == 2 and "argument --repeat: must be an int >= 1, got '0'" in run.stderr
    run = _run(runner, pt2, "--history", str(T + 1))
    assert run.returncode == 2 and (f"argument --history: must be one of the package's history lengths (1, 2), "
                                    f"got {T + 1}") in run.stderr
    not_a_package = tmp_path / "junk.pt2"
    not_a_package.write_bytes(b"not a zip")
    run = _run(runner, not_a_package)
    assert run.returncode == 1 and "cannot read the package" in run.stderr
