"""The command line: bad arguments and configs are one line on stderr and exit status 2 (with a
did-you-mean for typos), Ctrl-C is 130 without a traceback, and `plan`'s budget follows the device."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from jepa_engine import cli
from jepa_engine.config import ConfigError
from jepa_engine.evaluation.mpc import MPC, MPCConfig, MPCResult
from jepa_engine.models.vit import ViTConfig
from jepa_engine.models.world_model import WorldModel, WorldModelConfig
from jepa_engine.training.world_model import WMTrainConfig, save_world_model
from tests.helpers import reference_ops_one_thread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_thread_reference_ops():
    """Planning on the reference ops and one thread, as test_mpc.py does."""
    with reference_ops_one_thread():
        yield


@pytest.fixture(scope="module")
def wm_checkpoint(tmp_path_factory) -> str:
    """An untrained "test"-sized world model (32x32 frames), saved as a run folder: enough for the
    command line's checks, written in well under a second."""
    out = tmp_path_factory.mktemp("wm")
    torch.manual_seed(0)
    cfg = WMTrainConfig.from_name("test")
    save_world_model(out, 1, WorldModel(cfg.model_config()).eval(), cfg)
    return str(out)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """``main(argv)``'s status (an argparse SystemExit counts as its code), stdout and stderr."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:   # main returns argparse's status; a leak would be caught here
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_usage_error(rc: int, err: str, *expected: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"


# ---- bad arguments: one line, status 2, named
@pytest.mark.parametrize("args, expected", [
    (["plan", "--episodes", "-1"], "argument --episodes: must be an int >= 1, got '-1'"),
    (["plan", "--num-envs", "0"], "argument --num-envs: must be an int >= 1, got '0'"),
    (["plan", "--samples", "0"], "argument --samples: must be an int >= 1, got '0'"),
    (["plan", "--iterations", "-5"], "argument --iterations: must be an int >= 1, got '-5'"),
    (["plan", "--elites", "0"], "argument --elites: must be an int >= 1, got '0'"),
    (["plan", "--horizon", "0"], "argument --horizon: must be an int >= 1, got '0'"),
    (["plan", "--max-steps", "0"], "argument --max-steps: must be an int >= 1, got '0'"),
    (["plan", "--seed", "-1"], "argument --seed: must be an int >= 0, got '-1'"),
    (["plan", "--episodes", "two"], "argument --episodes: must be an int >= 1, got 'two'"),
    (["plan", "--samples", "4", "--elites", "5"], "argument --elites: must be <= --samples = 4, got 5"),
    (["plan", "--device", "gpu"], "argument --device: must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["train", "--out", "x", "--steps", "0"], "argument --steps: must be an int >= 1, got '0'"),
    (["train-wm", "--steps", "-3"], "argument --steps: must be an int >= 1, got '-3'"),
    (["profile", "--decisions", "0"], "argument --decisions: must be an int >= 1, got '0'"),
    (["profile", "--trials", "-1"], "argument --trials: must be an int >= 1, got '-1'"),
    (["profile", "--max-steps", "0"], "argument --max-steps: must be an int >= 1, got '0'"),
    (["profile", "--budget-minutes", "-1"], "argument --budget-minutes: must be a finite number >= 0, got '-1'"),
    (["profile", "--timing-seconds", "nan"], "argument --timing-seconds: must be a finite number > 0, got 'nan'"),
    (["profile", "--energy-seconds", "0"], "argument --energy-seconds: must be a finite number > 0, got '0'"),
    (["profile", "--success-max-evals", "-2"], "argument --success-max-evals: must be an int >= -1, got '-2'"),
    (["profile", "--seed", "-1"], "argument --seed: must be an int >= 0, got '-1'"),
])
def test_bad_argument_is_one_line_and_status_2(args, expected, wm_checkpoint, tmp_path, capsys):
    if args[0] == "plan":
        args = [*args, "--checkpoint", wm_checkpoint, "--device", "cpu"] if "--device" not in args else \
            [*args, "--checkpoint", wm_checkpoint]
    if args[0] == "profile":
        args = [*args, "--out", str(tmp_path / "profile")]
    rc, out, err = run(args, capsys)
    assert_usage_error(rc, err, f"jepa-engine {args[0]}: error: {expected}")
    assert not (tmp_path / "profile").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda(wm_checkpoint, capsys):
    rc, out, err = run(["plan", "--checkpoint", wm_checkpoint, "--device", "cuda"], capsys)
    assert_usage_error(rc, err, "argument --device: no CUDA device on this machine", "got 'cuda'")


@pytest.mark.parametrize("args, expected", [
    (["plan", "--sampels", "16"], "unrecognized arguments: --sampels 16 (did you mean --samples?)"),
    (["plan", "--max-stpes=3"], "unrecognized arguments: --max-stpes=3 (did you mean --max-steps?)"),
    (["plan", "--planner", "cme"], "invalid choice: 'cme'"),
    (["plan", "--planner", "cme"], "(did you mean 'cem'?)"),
    (["pln"], "invalid choice: 'pln'"),
    (["pln"], "(did you mean 'plan'?)"),
    (["train-wm", "--no-reprot"], "(did you mean --no-report?)"),
    (["profile", "--quik"], "(did you mean --quick?)"),
])
def test_typo_gets_a_suggestion(args, expected, wm_checkpoint, capsys):
    if args[0] == "plan":
        args = [*args, "--checkpoint", wm_checkpoint, "--device", "cpu"]
    rc, out, err = run(args, capsys)
    assert_usage_error(rc, err, expected)


def test_help_still_exits_0(capsys):
    rc, out, err = run(["plan", "--help"], capsys)
    assert rc == 0 and "--samples" in out and "--no-progress" in out, out


# ---- bad configs: unknown keys (nested too), presets and files
def test_nested_config_typo_in_train(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"encoder": "tiny", "encoder_overrides": {"dept": 2}, "steps": 2, "device": "cpu"}))
    rc, out, err = run(["train", "--config", str(cfg), "--out", str(tmp_path / "run")], capsys)
    assert_usage_error(rc, err, "ViTConfig: unknown fields ['dept'] (did you mean 'depth'?)")
    assert not (tmp_path / "run").exists(), "nothing is written for a bad config"


@pytest.mark.parametrize("command, overrides, message", [
    ("train", {"encoder": "tiny", "encoder_overrides": {"num_heads": 5}},
     "ViTConfig: embed_dim must be divisible by num_heads"),
    ("train", {"encoder": "tiny", "mask_overrides": {"npred": 0}}, "MaskConfig: npred must be >= 1, got 0"),
    ("train-wm", {"model": "test", "model_overrides": {"num_heads": 5}}, "num_heads"),
])
def test_nested_config_bad_value(command, overrides, message, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**overrides, "steps": 2, "device": "cpu"}))
    rc, out, err = run([command, "--config", str(cfg), "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and "Traceback" not in err and message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists(), "nothing is written for a bad config"


def test_nested_config_typo_in_train_wm(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": "test", "model_overrides": {"histroy": 2}, "steps": 2, "device": "cpu"}))
    rc, out, err = run(["train-wm", "--config", str(cfg), "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and "Traceback" not in err, err
    assert "WorldModelConfig: unknown fields ['histroy'] (did you mean 'history'?)" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train", "train-wm"])
def test_top_level_config_typo_and_preset_typo(command, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"stepz": 2}))
    rc, out, err = run([command, "--config", str(cfg), "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and "unknown fields ['stepz'] (did you mean 'steps'?)" in err, err
    rc, out, err = run([command, "--config", "deom", "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and "got 'deom' (did you mean 'demo'?)" in err, err


def test_config_classes_name_unknown_fields_every_way():
    with pytest.raises(ConfigError, match=r"ViTConfig: unknown fields \['dept'\] \(did you mean 'depth'\?\)"):
        ViTConfig.from_name("tiny", dept=2)
    with pytest.raises(ConfigError, match=r"WorldModelConfig: unknown fields \['histroy'\] \(did you mean 'history'"):
        WMTrainConfig.from_name("test", model_overrides={"histroy": 2})
    with pytest.raises(ConfigError, match=r"unknown fields \['zzz'\], expected a subset of \["):
        WorldModelConfig(zzz=1)                  # no close match: the fields are listed
    with pytest.raises(ConfigError, match=r"'lr' for 'lrr'"):
        WMTrainConfig.from_dict({"lrr": 1e-3, "stepz": 3})
    with pytest.raises(ConfigError, match=r"did you mean 'history'"):
        dataclasses.replace(WorldModelConfig.from_name("test"), histroy=2)
    # the known names still work, and copies keep working
    c = WorldModelConfig.from_name("test", history=2)
    assert c.history == 2 and dataclasses.replace(c, history=3).history == 3
    import copy
    import pickle
    assert copy.deepcopy(c) == c and pickle.loads(pickle.dumps(c)) == c


# ---- checkpoint errors, wherever they happen
def _truncated_checkpoint(src: str, dst) -> str:
    """A copy of the run folder's checkpoint with its tensor file cut to half: the JSON path."""
    dst.mkdir()
    meta = next(f for f in os.listdir(src) if f.startswith("ckpt-") and f.endswith(".json"))
    tensors = meta[:-len(".json")] + ".safetensors"
    (dst / meta).write_bytes(open(os.path.join(src, meta), "rb").read())
    data = open(os.path.join(src, tensors), "rb").read()
    (dst / tensors).write_bytes(data[: len(data) // 2])
    return str(dst / meta)


def test_profile_with_a_truncated_checkpoint(wm_checkpoint, tmp_path, capsys):
    path = _truncated_checkpoint(wm_checkpoint, tmp_path / "cut")
    rc, out, err = run(["profile", "--quick", "--wm-checkpoint", path, "--out", str(tmp_path / "p"), "--no-progress"],
                       capsys)
    assert_usage_error(rc, err, "jepa-engine profile: error: --wm-checkpoint: ", "bytes")


def test_plan_with_a_truncated_checkpoint(wm_checkpoint, tmp_path, capsys):
    path = _truncated_checkpoint(wm_checkpoint, tmp_path / "cut")
    rc, out, err = run(["plan", "--checkpoint", path, "--device", "cpu"], capsys)
    assert_usage_error(rc, err, "jepa-engine plan: error: --checkpoint: ", "bytes")


def test_checkpoint_error_anywhere_is_status_2(monkeypatch, capsys):
    from jepa_engine.training.checkpoint import CheckpointError

    def broken(args):
        raise CheckpointError("checkpoint runs/x/ckpt-00000010.safetensors: expected 100 bytes, got 50")

    monkeypatch.setattr(cli, "_selfcheck", broken)
    rc, out, err = run(["selfcheck"], capsys)
    assert_usage_error(rc, err, "jepa-engine selfcheck: error: checkpoint runs/x/ckpt-00000010.safetensors")


def test_other_errors_keep_their_traceback(monkeypatch):
    """Only input errors are turned into a line: a bug still raises."""
    monkeypatch.setattr(cli, "_selfcheck", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["selfcheck"])


# ---- Ctrl-C
@pytest.mark.parametrize("command, func", [
    (["plan", "--checkpoint", "x"], "_plan"), (["profile"], "_profile"), (["selfcheck"], "_selfcheck"),
    (["audit"], "_audit"), (["demo"], "_demo"), (["train", "--out", "x"], "_train"), (["train-wm"], "_train_wm"),
])
def test_ctrl_c_in_any_command_is_130(command, func, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, func, interrupted)
    rc, out, err = run(command, capsys)
    assert rc == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip() == f"jepa-engine {command[0]}: interrupted", err


def test_ctrl_c_during_planning_is_130(wm_checkpoint, monkeypatch, capsys):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(MPC, "rollout_episodes", interrupted)
    rc, out, err = run(["plan", "--checkpoint", wm_checkpoint, "--device", "cpu", "--no-progress"], capsys)
    assert rc == 130 and "Traceback" not in err and "interrupted" in err, err


def test_sigint_to_a_planning_process_is_130(wm_checkpoint):
    """A real SIGINT to `python -m jepa_engine plan` while it plans."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "jepa_engine", "plan", "--checkpoint", wm_checkpoint,
                             "--device", "cpu", "--episodes", "1000", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            # a shell without job control starts background jobs with SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = proc.stdout.readline()           # the budget line: planning has started
        assert first.startswith("MPC in the"), first + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().endswith("jepa-engine plan: interrupted"), err


# ---- plan's budget
def _spy_on_mpc(monkeypatch) -> dict:
    """Replace MPC.run by a recorder of the config, episodes and batch it was given."""
    seen: dict = {}

    def run_(self, episodes=8, num_envs=1, max_steps=None, progress=False):
        seen.update(config=self.config, episodes=episodes, num_envs=num_envs, progress=progress)
        return MPCResult([False] * episodes, [-1] * episodes, [1.0] * episodes, [1.0], num_envs)

    monkeypatch.setattr(MPC, "run", run_)
    return seen


def test_plan_cpu_default_budget(wm_checkpoint, monkeypatch, capsys):
    seen = _spy_on_mpc(monkeypatch)
    rc, out, err = run(["plan", "--checkpoint", wm_checkpoint, "--device", "cpu"], capsys)
    assert rc == 0, err
    c = seen["config"]
    assert (c.planner, c.samples, c.iterations, c.elites, c.max_steps) == ("cem", 64, 5, 6, 40)
    assert (seen["episodes"], seen["num_envs"], seen["progress"]) == (8, 8, True)
    assert "N=64 samples x I=5 iterations (K=6), horizon 5; 8 episode(s) of <= 40 steps, 8 planned at once; cpu" \
        in out, out
    assert "the CPU default for cem; on CUDA 300 x 30, 60 steps" in out, out
    # per control step, the CPU default searches 64 x 5 candidates: 1/28 of CUDA's 300 x 30, over 40
    # steps instead of 60
    cuda = cli.PLAN_BUDGETS[("cuda", "cem")]
    assert (cuda["samples"], cuda["iterations"], cuda["max_steps"]) == (300, 30, 60)
    assert c.samples * c.iterations * 28 <= cuda["samples"] * cuda["iterations"]


def test_plan_gradient_default_is_bounded(wm_checkpoint, monkeypatch, capsys):
    seen = _spy_on_mpc(monkeypatch)
    rc, out, err = run(["plan", "--checkpoint", wm_checkpoint, "--device", "cpu", "--planner", "gradient"], capsys)
    assert rc == 0, err
    c = seen["config"]
    assert (c.samples, c.iterations, c.max_steps) == (cli.PLAN_BUDGETS[("cpu", "gradient")]["samples"],
                                                      cli.PLAN_BUDGETS[("cpu", "gradient")]["iterations"], 40)
    assert c.samples * c.iterations <= 64, "gradient steps each cost a forward and a backward pass"
    assert f"N={c.samples} restarts x I={c.iterations} Adam steps" in out, out


def test_plan_given_budget_wins_and_elites_follow_samples(wm_checkpoint, monkeypatch, capsys):
    seen = _spy_on_mpc(monkeypatch)
    rc, out, err = run(["plan", "--checkpoint", wm_checkpoint, "--device", "cpu", "--samples", "300",
                        "--iterations", "30", "--max-steps", "60", "--num-envs", "1"], capsys)
    assert rc == 0, err
    c = seen["config"]
    assert (c.samples, c.iterations, c.elites, c.max_steps, seen["num_envs"]) == (300, 30, 30, 60, 1)
    assert "default" not in out, out              # nothing was defaulted
    rc, out, err = run(["plan", "--checkpoint", wm_checkpoint, "--device", "cpu", "--samples", "40",
                        "--elites", "7"], capsys)
    assert rc == 0 and seen["config"].elites == 7, err


def test_plan_samples_16_alone_runs(wm_checkpoint, capsys):
    """Before, --elites stayed 30 > 16 samples and the command failed."""
    rc, out, err = run(["plan", "--checkpoint", wm_checkpoint, "--device", "cpu", "--samples", "16",
                        "--iterations", "2", "--episodes", "2", "--max-steps", "2"], capsys)
    assert rc == 0, err
    assert "N=16 samples x I=2 iterations (K=2)" in out and "success" in out and "plan latency" in out, out
    assert "MPC (cem)" in err and "2/2" in err, err     # the progress bar, finished


def test_mpc_config_elites_follow_samples():
    assert MPCConfig().elites == 30                        # LeWorldModel's 300 x 30, K = 30
    assert MPCConfig(samples=16).elites == 2
    assert MPCConfig(samples=64).elites == 6
    assert MPCConfig(samples=1).elites == 1
    assert MPCConfig(samples=16, elites=16).elites == 16
    with pytest.raises(ValueError, match=r"MPCConfig.elites must be an int in \[1, samples\] = \[1, 16\], got 17"):
        MPCConfig(samples=16, elites=17)
    with pytest.raises(ValueError, match="MPCConfig.samples must be an int >= 1, got 0"):
        MPCConfig(samples=0)
