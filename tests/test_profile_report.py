"""`jepa-engine profile` end to end on a tiny config: JSON rows, markdown, a PNG of the right size; the quick
mode; the demo's closing section (`demo_profile`); bad options."""
from __future__ import annotations

import json

import pytest
import torch

from jepa_engine.baselines import DecoderConfig
from jepa_engine.cli import main
from jepa_engine.kernels import use_backend
from jepa_engine.models.world_model import WorldModel, WorldModelConfig
from jepa_engine.comparison.config import (QUICK_DEFAULTS, SWEEP_LABEL, PlannerBudget, ProfileConfig, parse_int_list,
                                          parse_sizes)
from jepa_engine.comparison.flops import decoder_flops, planner_flops, predictor_flops
from jepa_engine.comparison.render import PLOT_DPI, PLOT_SIZE
from tests.helpers import reference_ops_one_thread

TINY = ["--preset", "tiny", "--budget-minutes", "0.15", "--reasoning-tokens", "0,8", "--sizes", "1x,10x",
        "--budgets", "cem:32x3,mppi:16x2:cold", "--decisions", "2", "--max-steps", "4", "--no-compile",
        "--timing-seconds", "0.02", "--no-progress"]


@pytest.fixture(autouse=True)
def _reference_ops():
    with reference_ops_one_thread():
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    torch.set_num_threads(1)
    with use_backend("reference"):
        rc = main(["profile", *TINY, "--out", str(out)])
    return rc, out


def test_profile_writes_json_markdown_png(run):
    rc, out = run
    assert rc == 0
    report = json.loads((out / "profile.json").read_text())
    assert {"config", "environment", "models", "decisions", "rows", "ratios", "notes", "caveats", "energy",
            "seconds"} <= set(report)
    assert report["environment"]["torch"] == torch.__version__
    rows = report["rows"]
    planners = [r for r in rows if r["kind"] == "planner"]
    # the reference budget eager (model.rollout loop) and fused, the others fused; on CUDA each fused
    # row has a graphed twin (the whole plan replayed from one CUDA graph)
    graphed = report["environment"].get("gpu") is not None
    expected = [("cem 32x3", "planner-eager"), ("cem 32x3", "planner-fused")]
    expected += [("cem 32x3", "planner-graphed")] * graphed + [("mppi 16x2 cold", "planner-fused")]
    expected += [("mppi 16x2 cold", "planner-graphed")] * graphed
    assert [(r["budget"], r["impl"]) for r in planners] == expected
    eager, fused = planners[:2]
    if graphed:
        twin = planners[2]
        assert twin["success_rate"] == fused["success_rate"] and twin["flops_per_decision"] == fused["flops_per_decision"]
        assert twin["latency_s"] > 0 and "CUDA graph" in twin["backend_note"]
    assert fused["flops_per_decision"] < 0.8 * eager["flops_per_decision"]   # the fused rollout's count
    assert fused["success_rate"] == eager["success_rate"]                    # one MPC measurement, both forms
    decision = [r for r in rows if r["kind"] == "decoder" and r["sweep"] == "decision"]
    assert [r["cache"] for r in decision] == ["dynamic", "static"]
    L_sweep = [r for r in rows if r.get("sweep") == "reasoning_tokens"]
    assert [r["reasoning_tokens"] for r in L_sweep] == [0, 8]
    assert [r["tokens_per_decision"] for r in L_sweep] == [10, 18]
    size_sweep = [r for r in rows if r.get("sweep") == "size"]
    assert [r["size"] for r in size_sweep] == ["1x", "10x"]
    assert size_sweep[1]["params"] > 5 * size_sweep[0]["params"]
    for r in L_sweep + size_sweep:
        assert r["label"] == SWEEP_LABEL and r.get("success_rate") is None
    for r in rows:
        assert 0 < r["latency_s"] <= r["latency_p90_s"] * (1 + 1e-9), r
        assert r["flops_per_decision"] > 0 and r["params"] > 0
        # energy is a measured number or None with a reason, never a made-up figure
        assert r["joules_per_decision"] is None or r["joules_per_decision"] > 0
        if r["joules_per_decision"] is None:
            assert r["energy_reason"]
    for r in planners + decision:   # trained models: success is defined
        assert 0.0 <= r["success_rate"] <= 1.0 and r["episodes"] == 2
    assert len(report["ratios"]) == len(planners) * len(decision)
    q = report["ratios"][0]
    assert q["latency"] == pytest.approx(planners[0]["latency_s"] / decision[0]["latency_s"])
    md = (out / "profile.md").read_text()
    for r in decision:   # the decode step's bandwidth use, as gpt-fast reports it
        assert r["bytes_per_token"] >= 4 * r["params"] * 0.5 and r["achieved_gbps"] > 0
    for text in ("## What is compared", "## Caveats", "| JEPA cem 32x3 (eager)", "| JEPA cem 32x3 (fused)",
                 "## Decode step memory bandwidth", "| decoder eager dynamic cache | decision |",
                 "The planner's forms at that budget", "L = 8", "size 10x",
                 "0.12-0.20 J per token", "## Ratios"):
        assert text in md, text


def test_profile_png_opens_with_the_expected_size(run):
    import matplotlib.image as mpimg

    _, out = run
    img = mpimg.imread(out / "profile.png")
    want = (round(PLOT_SIZE[1] * PLOT_DPI), round(PLOT_SIZE[0] * PLOT_DPI))
    assert img.shape[:2] == want, (img.shape, want)
    assert img[..., :3].std() > 0.01   # not a blank image


def test_saved_models_are_reused(run, tmp_path):
    _, out = run
    rc = main(["profile", *TINY, "--budgets", "cem:16x2", "--reasoning-tokens", "0", "--sizes", "1x",
               "--wm-checkpoint", str(out / "wm"), "--decoder-checkpoint", str(out / "decoder"), "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["models"]["wm_state"].startswith("loaded") and report["models"]["decoder_state"].startswith("loaded")
    assert report["rows"][0]["success_rate"] is not None


def test_quick_mode_defaults_and_report(run, tmp_path):
    """--quick on the tiny models saved by the first run: its defaults, explicit options winning, the
    JSON marked quick, no compiled form, the markdown and a PNG of the usual size."""
    import matplotlib.image as mpimg

    _, out = run
    rc = main(["profile", "--quick", "--preset", "tiny", "--wm-checkpoint", str(out / "wm"), "--decoder-checkpoint",
               str(out / "decoder"), "--decisions", "2", "--max-steps", "4", "--timing-seconds", "0.02",
               "--budgets", "cem:16x2,mppi:8x2", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "profile.json").read_text())
    c = report["config"]
    assert c["quick"] is True and c["compile"] is False and c["trials"] == 1
    assert c["reasoning_tokens"] == list(QUICK_DEFAULTS["reasoning_tokens"])
    assert c["sizes"] == list(QUICK_DEFAULTS["sizes"])
    assert (c["decisions"], c["max_steps"], c["budgets"]) == (2, 4, ["cem 16x2", "mppi 8x2"])   # given: kept
    assert not any(r.get("compiled") for r in report["rows"])
    assert [r["cache"] for r in report["rows"] if r.get("sweep") == "decision"] == ["dynamic", "static"]
    for r in report["rows"]:
        if r["kind"] == "planner" or r.get("sweep") == "decision":
            assert r["success_rate"] is not None and r["episodes"] == 2
    md = (tmp_path / "profile.md").read_text()
    assert "quick run, tiny preset" in md and "Quick run (--quick)" in md
    img = mpimg.imread(tmp_path / "profile.png")
    assert img.shape[:2] == (round(PLOT_SIZE[1] * PLOT_DPI), round(PLOT_SIZE[0] * PLOT_DPI))


def test_quick_config_precedence():
    q = ProfileConfig.create(quick=True, decisions=3)
    assert q.quick and q.decisions == 3 and q.timing_seconds == QUICK_DEFAULTS["timing_seconds"]
    assert [b.name for b in q.budgets] == [PlannerBudget.parse(x).name for x in QUICK_DEFAULTS["budgets"].split(",")]
    full = ProfileConfig.create()
    assert not full.quick and full == ProfileConfig()
    with pytest.raises(ValueError, match="--decisions"):
        ProfileConfig.create(quick=True, decisions=0)


def test_demo_profile_trains_then_reuses_the_decoder(run, tmp_path):
    from jepa_engine.demo import demo_profile

    _, out = run
    kw = dict(decoder_steps=15, preset="tiny", budgets="cem:16x2", reasoning_tokens="0", sizes="1x", decisions=2,
              max_steps=4, timing_seconds=0.02, progress=False, log=lambda msg: None)
    lines = demo_profile(str(out / "wm"), str(tmp_path), **kw)
    text = "\n".join(lines)
    assert "trained here: 15 imitation steps" in text and "saved to" in text
    assert "planner JEPA cem 16x2 (eager)" in text and "x the decoder's latency" in text
    assert "success" in text and "energy:" in text
    for name in ("profile.json", "profile.md", "profile.png"):
        assert (tmp_path / name).is_file(), name
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["config"]["quick"] and report["models"]["wm_state"].startswith("loaded")
    again = demo_profile(str(out / "wm"), str(tmp_path), **kw)
    assert "loaded from" in again[0] and "trained here" not in again[0]


@pytest.mark.parametrize("args, option", [
    (["--budget-minutes", "-1"], "--budget-minutes"),
    (["--preset", "huge"], "--preset"),
    (["--reasoning-tokens", "0,x"], "--reasoning-tokens"),
    (["--reasoning-tokens", "-4"], "--reasoning-tokens"),
    (["--sizes", "10"], "--sizes"),
    (["--budgets", "cem:300"], "--budgets"),
    (["--budgets", "beam:10x2"], "--budgets"),
    (["--decisions", "0"], "--decisions"),
    (["--wm-checkpoint", "/nonexistent/wm"], "--wm-checkpoint"),
    (["--quick", "--timing-seconds", "0"], "--timing-seconds"),
    (["--quick", "--trials", "0"], "--trials"),
    (["--quick", "--budgets", "cem:1x1"], "--budgets"),
    (["--quick", "--energy-seconds", "inf"], "--energy-seconds"),
    (["--compile", "--no-compile"], "--compile"),
])
def test_bad_options_name_the_option(args, option, capsys, tmp_path):
    rc = main(["profile", "--out", str(tmp_path), "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2 and option in err, err
    assert not (tmp_path / "profile.json").exists()


def test_parsers_and_config_errors():
    assert parse_int_list("0, 64,256", "--reasoning-tokens") == (0, 64, 256)
    assert parse_sizes("1x,10X,3x") == ("1x", "10x", "3x")
    b = PlannerBudget.parse("cem:64x5:cold")
    assert (b.planner, b.samples, b.iterations, b.warm_start, b.elites) == ("cem", 64, 5, False, 6)
    with pytest.raises(ValueError, match="--sizes"):
        ProfileConfig(sizes="0x")
    with pytest.raises(ValueError, match="--energy-seconds"):
        ProfileConfig(energy_seconds=0)


def test_energy_fields_measure_or_say_why():
    from jepa_engine.comparison.rows import energy_fields

    cfg = ProfileConfig(energy_seconds=0.02, trials=1)
    row = energy_fields(lambda: sum(range(1000)), torch.device("cpu"), cfg, True, "", tokens=10)
    # measured through profiling.measure: joules where RAPL is readable, else None with the meter's reason
    assert (row["joules_per_decision"] is None) == bool(row["energy_reason"])
    assert row["energy_trials"] == 1
    off = energy_fields(lambda: None, torch.device("cpu"), cfg, False, "energy unavailable: no meter")
    assert off == {"joules_per_decision": None, "energy_reason": "energy unavailable: no meter"}


def test_flop_counts():
    wm = WorldModel(WorldModelConfig.from_name("test"))
    c = wm.cfg
    # the predictor's matmuls dominate: 2 x linear weights x tokens, plus attention
    lin = sum(m.weight.numel() for m in wm.predictor.blocks.modules() if isinstance(m, torch.nn.Linear))
    S = 2 * c.history
    assert predictor_flops(wm, c.history) >= 2 * lin * S
    one = planner_flops(wm, 1, 1, 1)
    assert planner_flops(wm, 300, 30, 5) - planner_flops(wm, 1, 1, 1) == pytest.approx(
        (300 * 30 * 5 - 1) * predictor_flops(wm, c.history))
    assert one > 0
    d = DecoderConfig.from_name("tiny", reasoning_tokens=64)
    non_embed = d.depth * (4 * d.dim ** 2 + 2 * d.dim * d.hidden) + d.dim * d.vocab_size
    extra = decoder_flops(d, 64) - decoder_flops(d, 0)
    assert 2 * non_embed * 64 <= extra <= 1.5 * 2 * non_embed * 64 + 4 * d.depth * d.dim * 200 * 64


def test_success_max_evals_option():
    from jepa_engine.comparison.config import ProfileConfig

    assert ProfileConfig().success_limit(torch.device("cpu")) == 2000
    assert ProfileConfig().success_limit(torch.device("cuda")) == float("inf")
    assert ProfileConfig(success_max_evals=0).success_limit(torch.device("cuda")) == 0
    with pytest.raises(ValueError, match=r"--success-max-evals: must be an int >= -1"):
        ProfileConfig(success_max_evals=-2)
