"""Launch-config tuning without a GPU: the search spaces, the tuned file the launchers read before their
tables (a fake device's file), a malformed file, and the tuner's choice and budget with injected
timings (kernels/_configs.py, kernels/tuning.py)."""
from __future__ import annotations

import importlib
import json
import math
import time

import pytest
import torch

from jepa_engine.kernels import _configs, _launch, tuning
from jepa_engine.kernels._launch import triton_available
from jepa_engine.kernels._registry import KERNELS, LaunchConfig, key_label

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed (no kernels registered)")

FAKE = "Fake GPU 9000 (tuning test)"


def _specs():
    import jepa_engine.kernels  # noqa: F401  (registers the kernels)

    return {n: s for n, s in KERNELS.items() if s.search_space}


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --------------------------------------------------------------------------------------------------
# Search spaces
# --------------------------------------------------------------------------------------------------
def test_search_spaces_are_well_formed_and_start_with_the_table():
    specs = _specs()
    assert set(tuning.CASES) <= set(specs), "a kernel with tuning cases needs a search space"
    for name, spec in specs.items():
        table = {c for v in spec.variants for c in spec.configs_for(v)}
        firsts = [space[0] for space in spec.search_space.values()]
        # every key starts with its table's config, and every config of the table is some key's first
        assert set(firsts) == table, (name, [c.label() for c in firsts], [c.label() for c in table])
        labels = [key_label(k) for k in spec.search_space]
        assert len(set(labels)) == len(labels), name
        for key, space in spec.search_space.items():
            assert len(set(space)) == len(space), (name, key)
            for cfg in space:
                assert set(cfg.constexprs) == set(space[0].constexprs), (name, key, cfg.label())
                assert all(_power_of_two(v) for k, v in cfg.constexprs.items() if k.startswith("BLOCK")), cfg
                assert cfg.num_warps in (1, 2, 4, 8, 16) and 1 <= cfg.num_stages <= 4, (name, cfg.label())
            # every candidate is compiled by `audit --search-space` for some variant that looks this key up
            users = [v for v in spec.variants if key in spec.search_keys_for(v)]
            assert users, (name, key, "no audited variant launches this key")
            for v in users:
                audited = set(spec.search_configs_for(v)) | set(spec.configs_for(v))
                assert space[0] in spec.configs_for(v) and set(space[1:]) <= audited, (name, key, v)


def test_goal_cost_candidates_keep_one_column_tile():
    """linear_goal_cost holds the whole embedding in one tile: BLOCK_N stays the key's width."""
    spec = _specs()["linear_goal_cost"]
    for (cls, width), space in spec.search_space.items():
        assert {c.constexprs["BLOCK_N"] for c in space} == {width}, (cls, width)


def test_search_space_helper_checks_its_input():
    table = {("16bit", 64): LaunchConfig({"BLOCK_M": 64}, 4, 2)}
    space = _launch.search_space(table, {("16bit", 64): _launch.candidates("BLOCK_M", (64, 4, 2), (32, 4, 2),
                                                                          (32, 4, 2))})
    assert [c.label() for c in space[("16bit", 64)]] == ["BLOCK_M=64,w4,s2", "BLOCK_M=32,w4,s2"]   # repeats dropped
    with pytest.raises(KeyError, match="not in the launch table"):
        _launch.search_space(table, {("fp32", 64): []})
    with pytest.raises(ValueError, match=r"must set the constexprs \['BLOCK_M'\]"):
        _launch.search_space(table, {("16bit", 64): [LaunchConfig({"BLOCK_N": 64}, 4, 2)]})
    with pytest.raises(ValueError, match="each row must give"):
        _launch.candidates("BLOCK_M,BLOCK_N", (64, 4, 2))


# --------------------------------------------------------------------------------------------------
# The tuned file, read by the launchers before their tables
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_device(tmp_path, monkeypatch):
    """A compiled-kernel process (no interpreter) on a fake device whose configs file lives in tmp_path."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(_configs.ENV, str(tmp_path))
    monkeypatch.setattr(_configs, "device_name", lambda: FAKE)
    _configs.reset()
    yield tmp_path / f"{_configs.device_key(FAKE)}.json"
    _configs.reset()


def _pick_last(specs) -> dict:
    """A file choosing every key's last candidate (never the table's)."""
    return {name: {key_label(k): {"config": space[-1].to_json()} for k, space in spec.search_space.items()
                   if len(space) > 1} for name, spec in specs.items()}


def _write(path, kernels, device=FAKE, **extra):
    path.write_text(json.dumps({"format": _configs.FORMAT, "device": device, "device_key": _configs.device_key(device),
                                "kernels": kernels, **extra}))


def test_device_key_and_path():
    assert _configs.device_key("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert _configs.device_key("NVIDIA A100-SXM4-40GB") == "nvidia-a100-sxm4-40gb"
    with pytest.raises(ValueError, match="device_key: name must contain a letter or digit, got '--'"):
        _configs.device_key("--")


def test_the_file_comes_before_the_table(fake_device):
    specs = _specs()
    _write(fake_device, _pick_last(specs))
    assert _configs.config_path() == fake_device
    for name, spec in specs.items():
        for key, space in spec.search_space.items():
            assert _launch.tuned(name, key, space[0]) == space[-1], (name, key)
    # and under the interpreter, the table's (the file is not read there)
    key, space = next(iter(specs["latent_cost_fwd"].search_space.items()))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        assert _launch.tuned("latent_cost_fwd", key, space[0]) == space[0]
    # an override (the tuner's) comes before both
    with _configs.override("latent_cost_fwd", space[1]):
        assert _launch.tuned("latent_cost_fwd", key, space[0]) == space[1]
    assert _launch.tuned("latent_cost_fwd", key, space[0]) == space[-1]


class _Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the launch's kwargs."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append(kw)


def _constexprs(kw: dict, cfg: LaunchConfig) -> dict:
    return {k: kw[k] for k in cfg.constexprs} | {"num_warps": kw["num_warps"], "num_stages": kw["num_stages"]}


def _as_launched(cfg: LaunchConfig) -> dict:
    return dict(cfg.constexprs) | {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def test_launchers_take_the_file_config(fake_device, monkeypatch):
    """Each launcher, called on CPU tensors with its kernel replaced by a recorder, launches the file's
    config for its key, not its table's."""
    specs = _specs()
    _write(fake_device, _pick_last(specs))
    last = lambda kernel, key: specs[kernel].search_space[key][-1]  # noqa: E731
    mods = {m: importlib.import_module(f"jepa_engine.kernels.{m}") for m in
            ("masked_attention", "fused_linear", "latent_loss", "latent_cost", "elite_refit", "sample_actions", "ema")}
    rec = {}
    for mod, attr in (("masked_attention", "_masked_attention_fwd_kernel"),
                      ("masked_attention", "_masked_attention_bwd_preprocess_kernel"),
                      ("masked_attention", "_masked_attention_bwd_kernel"), ("fused_linear", "_fused_linear_kernel"),
                      ("fused_linear", "_linear_goal_cost_kernel"), ("latent_loss", "_latent_loss_fwd_kernel"),
                      ("latent_loss", "_latent_loss_bwd_kernel"), ("latent_cost", "_latent_cost_fwd_kernel"),
                      ("elite_refit", "_elite_refit_kernel"), ("sample_actions", "_sample_actions_kernel")):
        rec[attr] = _Recorder()
        monkeypatch.setattr(mods[mod], attr, rec[attr])
    ma, fl = mods["masked_attention"], mods["fused_linear"]
    q = torch.randn(2, 2, 40, 64, dtype=torch.bfloat16)
    out, lse = ma.masked_attention_forward(q, q, q, None, None, None, 0, 0.125)
    ma.masked_attention_backward(out, q, q, q, out, lse, None, None, None, 0, 0.125)
    x = torch.randn(50, 32)
    fl.fused_linear_forward(x, torch.randn(100, 32), None, True, 1e-6, False, None)
    fl.linear_goal_cost_forward(x, torch.randn(192, 32), None, torch.randn(1, 192), True, 1e-6, "l2")
    rows = torch.randn(30, 768)
    mods["latent_loss"].latent_loss_forward(rows, rows, None, "l2", 1.0)
    mods["latent_loss"].latent_loss_backward(torch.ones(()), rows, rows, None, "l2", 1.0, False)
    mods["latent_cost"].latent_cost_forward(torch.randn(4, 3, 100), torch.randn(1, 100), None, "l2", "final")
    costs, samples = torch.rand(2, 50), torch.rand(2, 50, 10)
    mods["elite_refit"].elite_refit_forward(costs, samples, samples[:, 0], samples[:, 0], "cem", 5, 1.0, 0.0, 0.0)
    mods["sample_actions"].sample_actions_forward(torch.zeros(2, 10), torch.ones(2, 10), -torch.ones(2), torch.ones(2),
                                                  torch.tensor([1, 0]), 50, True)
    expect = {"_masked_attention_fwd_kernel": last("masked_attention_fwd", ("16bit", 64)),
              "_masked_attention_bwd_preprocess_kernel": last("masked_attention_bwd_preprocess", ()),
              "_masked_attention_bwd_kernel": last("masked_attention_bwd", ("16bit", 64)),
              "_fused_linear_kernel": last("fused_linear", ("fp32", 128)),
              "_linear_goal_cost_kernel": last("linear_goal_cost", ("fp32", 256)),
              "_latent_loss_fwd_kernel": last("latent_loss_fwd", (256,)),
              "_latent_loss_bwd_kernel": last("latent_loss_bwd", (256,)),
              "_latent_cost_fwd_kernel": last("latent_cost_fwd", (128,)),
              "_elite_refit_kernel": last("elite_refit", (16,)),
              "_sample_actions_kernel": last("sample_actions", ())}
    for attr, cfg in expect.items():
        (kw,) = rec[attr].launches
        assert _constexprs(kw, cfg) == _as_launched(cfg), attr
    # EMA: the plan of a CUDA parameter list is built for the file's block and warps
    assert mods["ema"]._plan_config(torch.device("cuda")) == last("ema", ())
    assert mods["ema"]._plan_config(torch.device("cpu")) == specs["ema"].search_space[()][0]


def test_a_malformed_file_warns_and_the_table_runs(fake_device):
    spec = _specs()["latent_cost_fwd"]
    key, space = (64,), _specs()["latent_cost_fwd"].search_space[(64,)]
    fake_device.write_text("{not json")
    with pytest.warns(RuntimeWarning, match=f"kernel configs {fake_device}: not readable as JSON"):
        assert _launch.tuned("latent_cost_fwd", key, space[0]) == space[0]
    # written for another device
    _write(fake_device, _pick_last({"latent_cost_fwd": spec}), device="Other GPU")
    _configs.reset()
    with pytest.warns(RuntimeWarning, match="written for device 'other-gpu', not this device"):
        assert _launch.tuned("latent_cost_fwd", key, space[0]) == space[0]
    # entries one by one: a bad one warns and falls back, the good ones still apply
    not_in_space = LaunchConfig({"BLOCK_M": 1024, "BLOCK_D": 64}, 4, 1).to_json()
    _write(fake_device, {"latent_cost_fwd": {"64": {"config": not_in_space}, "128": {"config": {"constexprs": "x"}},
                                             "256": {"config": spec.search_space[(256,)][-1].to_json()},
                                             "512": {"config": not_in_space}},
                         "no_such_kernel": {}})
    _configs.reset()
    with pytest.warns(RuntimeWarning) as caught:
        assert _launch.tuned("latent_cost_fwd", (64,), space[0]) == space[0]
    msgs = [str(w.message) for w in caught]
    assert all(str(fake_device) in m and m.endswith("the fixed launch table is used there") for m in msgs), msgs
    assert any("unknown kernel 'no_such_kernel'" in m for m in msgs)
    assert any("BLOCK_M=1024,BLOCK_D=64,w4,s1 is not in its search space" in m for m in msgs)
    assert any("128: config must have integer 'constexprs'" in m for m in msgs)
    assert any("unknown table key '512'" in m for m in msgs)
    assert _launch.tuned("latent_cost_fwd", (128,), spec.search_space[(128,)][0]) == spec.search_space[(128,)][0]
    assert _launch.tuned("latent_cost_fwd", (256,), spec.search_space[(256,)][0]) == spec.search_space[(256,)][-1]
    # switched off: no file is read
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_configs.ENV, "off")
        _configs.reset()
        assert _configs.config_path() is None
        assert _launch.tuned("latent_cost_fwd", (256,), space[0]) == space[0]


def test_configs_ship_as_package_data():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "configs/*.json" in data["jepa_engine.kernels"]
    assert _configs.PACKAGE_DIR == root / "kernels" / "configs"
    for f in _configs.PACKAGE_DIR.glob("*.json"):   # a committed file must be usable where it is
        kernels, problems = _configs.read_file(f, f.stem)
        assert not problems, (f, problems)
        for kernel, entries in kernels.items():
            for label, entry in entries.items():
                _configs.entry_config(kernel, label, entry)


# --------------------------------------------------------------------------------------------------
# The tuner's choice and budget, with injected timings
# --------------------------------------------------------------------------------------------------
A, B, C, D = (LaunchConfig({"BLOCK": b}, 4, 1) for b in (64, 128, 256, 512))


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _fake_group(shapes=("s1", "s2"), candidates=(A, B, C, D), wrong=()):
    """A group of kernel "fake": check returns 1.0, or 2.0 for the configs in ``wrong``."""
    def case(shape):
        def make():
            def run():
                cfg = _configs._OVERRIDES["fake"]
                return torch.tensor([2.0 if cfg in wrong else 1.0])
            return run, run
        return tuning.Case(shape, make)
    return tuning.Group("fake", (), tuple(candidates), [case(s) for s in shapes])


def _timer(times, clock, cost=1.0):
    """Seconds from ``times[(config label, shape)]``; each measurement advances ``clock`` by ``cost``."""
    def timer(run, *, config, case, **_):
        clock.t += cost
        return times[(config.label(), case.shape)]
    return timer


def test_the_tuner_picks_the_fastest_by_geometric_mean():
    clock = FakeClock()
    # B: 2x faster on s1, 1.25x slower on s2 (geomean 0.79); C: 0.9 on both; D the fastest but wrong
    times = {("BLOCK=64,w4,s1", "s1"): 10.0, ("BLOCK=64,w4,s1", "s2"): 10.0,
             ("BLOCK=128,w4,s1", "s1"): 5.0, ("BLOCK=128,w4,s1", "s2"): 12.5,
             ("BLOCK=256,w4,s1", "s1"): 9.0, ("BLOCK=256,w4,s1", "s2"): 9.0,
             ("BLOCK=512,w4,s1", "s1"): 1.0, ("BLOCK=512,w4,s1", "s2"): 1.0}
    res = tuning.measure_group(_fake_group(wrong=(D,)), 1e9, _timer(times, clock), clock)
    assert res.complete and res.times["s1"]["BLOCK=512,w4,s1"].startswith("mismatch: output 0: max difference 1")
    cfg, speedup = tuning.choose(res)
    assert cfg == B and speedup == pytest.approx(1 / math.sqrt(0.5 * 1.25))
    e = tuning.entry(res)
    assert e["config"] == B.to_json() and e["fixed"] == A.label() and e["complete"]
    assert e["shapes"]["s1"] == {"winner": "BLOCK=128,w4,s1", "winner_s": 5.0, "fixed_s": 10.0,
                                 "times": res.times["s1"]}
    assert e["shapes"]["s2"]["winner"] == "BLOCK=256,w4,s1" and e["shapes"]["s2"]["fixed_s"] == 10.0
    # under MIN_GAIN faster: the table's config stays
    near = {k: (v if k[0] in ("BLOCK=64,w4,s1",) else 9.9) for k, v in times.items()}
    res = tuning.measure_group(_fake_group(), 1e9, _timer(near, clock), clock)
    assert tuning.choose(res) == (A, 1.0)


def test_the_tuner_stops_at_its_budget_and_keeps_what_it_measured(tmp_path):
    clock = FakeClock()
    times = {(c.label(), s): t for c, t in zip((A, B, C, D), (10.0, 4.0, 1.0, 8.0)) for s in ("s1", "s2")}
    groups = [_fake_group(), tuning.Group("fake2", (), (A, B), _fake_group().cases)]
    out = tmp_path / "fake.json"
    # 2 shapes a candidate, 1 s a measurement: 5 s covers A, B and half of C, then stops
    summary = tuning.tune(groups, out, FAKE, budget_s=5.0, timer=_timer(times, clock), clock=clock, log=lambda m: None)
    assert summary["groups_cut"] == ["fake default"] and summary["groups_not_run"] == ["fake2 default"]
    data = json.loads(out.read_text())
    assert data["device_key"] == _configs.device_key(FAKE) and data["format"] == _configs.FORMAT
    e = data["kernels"]["fake"]["default"]
    assert not e["complete"] and e["chosen"] == B.label()            # C was cut at s2: not a choice
    assert set(e["shapes"]["s1"]["times"]) == {A.label(), B.label(), C.label()}
    assert set(e["shapes"]["s2"]["times"]) == {A.label(), B.label()}
    # a complete entry is not replaced by a cut one; a complete one replaces it
    clock.t = 0.0
    base = {"fake": {"default": dict(e, complete=True)}}
    tuning.tune(groups[:1], out, FAKE, budget_s=3.0, timer=_timer(times, clock), clock=clock, base=base,
                log=lambda m: None)
    assert json.loads(out.read_text())["kernels"]["fake"]["default"]["seconds"] == e["seconds"]
    clock.t = 0.0
    tuning.tune(groups[:1], out, FAKE, budget_s=100.0, timer=_timer(times, clock), clock=clock, base=base,
                log=lambda m: None)
    assert json.loads(out.read_text())["kernels"]["fake"]["default"]["chosen"] == C.label()


def test_groups_come_in_priority_order_unmeasured_first():
    groups = tuning.plan_groups(device="cpu")
    order = [(g.kernel, g.key) for g in groups]
    assert order[:3] == tuning.PRIORITY[:3]
    again = tuning.plan_groups(device="cpu", measured=[("masked_attention_fwd", "16bit/64")])
    assert (again[-1].kernel, again[-1].key) == ("masked_attention_fwd", ("16bit", 64))
    with pytest.raises(ValueError, match="tuning: unknown kernels \\['nope'\\]"):
        tuning.plan_groups(["nope"], device="cpu")


def test_interpreter_rehearsal_writes_a_usable_file(tmp_path, monkeypatch, capsys):
    """The whole command under the Triton interpreter on tiny CPU shapes (a CPU clock: the numbers
    mean nothing): the file is written, and it is one the launchers accept."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tuning.main(["--interpret", "--out", str(tmp_path), "--budget-s", "60", "--kernel", "latent_cost_fwd"]) == 0
    path = tmp_path / f"{tuning.INTERPRETER_DEVICE}.json"
    kernels, problems = _configs.read_file(path, tuning.INTERPRETER_DEVICE)
    assert not problems and list(kernels) == ["latent_cost_fwd"]
    entry = kernels["latent_cost_fwd"]["64"]
    assert entry["complete"] and len(entry["shapes"]["B=24 H=3 D=16 G=2 fp32"]["times"]) == 4
    key, cfg = _configs.entry_config("latent_cost_fwd", "64", entry)
    assert key == (64,) and cfg in KERNELS["latent_cost_fwd"].search_space[key]
    assert "1 groups measured" in capsys.readouterr().out


def test_command_line_errors(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit):
        tuning.main(["--interpret", "--budget-s", "5"])
    assert "--interpret needs TRITON_INTERPRET=1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tuning.main(["--budget-s", "0"])
    assert "--budget-s must be positive, got 0.0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert tuning.main(["--budget-s", "5"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert tuning.main(["--list", "--kernel", "ema"]) == 0
    assert "ema default: 4 configs x 3 shapes" in capsys.readouterr().out


def test_compile_workers_mark_what_they_compiled(tmp_path, monkeypatch):
    """The worker processes (on a GPU they fill Triton's cache ahead of the timing) rehearsed under the
    interpreter: every item of the plan is marked done, and the timing waits for the marks."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    groups = tuning.plan_groups(["latent_cost_fwd"], "cpu", tiny=True)
    pre = tuning.Precompile(groups, 1, time.time() + 120, ["latent_cost_fwd"], "cpu", True)
    try:
        for ci in range(len(groups[0].candidates)):
            pre.wait(groups[0], ci)
        marks = sorted(p.name for p in pre.dir.glob("*.done"))
        assert marks == [f"{i}.done" for i in range(len(groups[0].candidates))], marks
        assert all(p.wait(timeout=60) == 0 for p in pre.procs)
    finally:
        pre.close()
    assert not pre.dir.exists()
