"""Meters: CPU time and RAPL-or-unavailable, NVML counter arithmetic on a fake pynvml, a real NVML run
where NVML works, and the pytest-benchmark integration."""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from jepa_engine.profiling import EnergyMeter, NvmlSource, RaplSource, measure, meters, wrapped_delta
from jepa_engine.profiling.pytest_energy import add_energy_info


# ---------------------------------------------------------------- a fake clock and a fake NVML
class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


class FakeNvml(types.ModuleType):
    """Just enough of pynvml: a settable energy counter (mJ) and instantaneous power (mW)."""

    NVML_FI_DEV_POWER_INSTANT = 186
    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0

    class NVMLError(Exception):
        pass

    def __init__(self, energy_mj: int = 5_000_000, idle_mw: int = 60_000, instant: bool = True):
        super().__init__("pynvml")
        self.energy_mj, self.idle_mw, self.instant = energy_mj, idle_mw, instant
        self.inited = False

    def nvmlInit(self):
        self.inited = True

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("gpu", i)

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return int(self.energy_mj) % 2 ** 64

    def nvmlDeviceGetFieldValues(self, h, ids):
        if not self.instant:
            raise self.NVMLError("Not Supported")
        value = types.SimpleNamespace(uiVal=self.idle_mw)
        return [types.SimpleNamespace(nvmlReturn=0, value=value)]

    def nvmlDeviceGetPowerUsage(self, h):
        return self.idle_mw

    def nvmlDeviceGetName(self, h):
        return b"Fake H100"

    def nvmlDeviceGetClockInfo(self, h, kind):
        return 1980 if kind == self.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetTemperature(self, h, kind):
        return 41

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 700_000


@pytest.fixture
def fake(monkeypatch):
    clock = FakeClock()
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(meters, "_clock", clock)
    monkeypatch.setattr(meters, "_sleep", clock.sleep)
    return clock, nvml


# ---------------------------------------------------------------- CPU
def test_cpu_meter_time_and_energy_or_reason():
    torch.set_num_threads(1)
    with EnergyMeter("cpu", idle_seconds=0.0) as m:
        x = torch.randn(256, 256)
        for _ in range(20):
            x = torch.tanh(x @ x * 1e-2)
    assert m.seconds > 0 and m.cpu_seconds > 0 and m.gpu_seconds is None
    src, why = RaplSource.open()
    if src is None:
        assert not m.available and m.joules is None and m.above_idle_joules is None
        assert "RAPL unavailable" in m.reason and m.reason == why
    else:
        assert m.available and m.joules is not None and m.joules > 0, m.to_dict()


def test_rapl_reads_a_fake_powercap_tree_with_wraparound(tmp_path):
    dom = tmp_path / "intel-rapl:0"
    sub = tmp_path / "intel-rapl:0:0"  # a sub-domain: counted inside the package, must be ignored
    for d in (dom, sub):
        d.mkdir()
        (d / "max_energy_range_uj").write_text("1000000\n")  # the counter wraps after 1 J
    (dom / "energy_uj").write_text("900000\n")
    (sub / "energy_uj").write_text("0\n")
    src, why = RaplSource.open(str(tmp_path))
    assert src is not None, why
    assert len(src.domains) == 1
    assert src.read_joules() == 0.0
    (dom / "energy_uj").write_text("200000\n")  # wrapped: 0.1 J to the top, then 0.2 J
    assert src.read_joules() == pytest.approx(0.3)
    (dom / "energy_uj").write_text("700000\n")
    assert src.read_joules() == pytest.approx(0.8)


def test_rapl_missing_gives_reason(tmp_path):
    src, why = RaplSource.open(str(tmp_path))
    assert src is None and "RAPL unavailable" in why


def test_wrapped_delta():
    assert wrapped_delta(10, 25, 100) == 15
    assert wrapped_delta(90, 5, 100) == 15


def test_meter_without_pynvml_is_unavailable_with_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    m = EnergyMeter("cuda:0", idle_seconds=0.0)
    with m:
        pass
    assert not m.available and m.joules is None and "pynvml" in m.reason


def test_bad_meter_arguments_name_the_field():
    with pytest.raises(ValueError, match="min_seconds"):
        EnergyMeter("cpu", min_seconds=-1)
    with pytest.raises(ValueError, match="device"):
        EnergyMeter("meta")
    with pytest.raises(ValueError, match="trials"):
        measure(lambda: None, trials=0)


# ---------------------------------------------------------------- fake NVML: the arithmetic
def test_fake_nvml_counter_idle_subtraction_and_gpu_info(fake):
    clock, nvml = fake
    with EnergyMeter("cuda:0", idle_seconds=0.03, sample_interval=0.01) as m:
        clock.t += 2.5                    # the work lasts 2.5 s ...
        nvml.energy_mj += 250_000         # ... and uses 250 J
    assert m.available and m.window_ok and m.seconds == pytest.approx(2.5)
    assert m.joules == pytest.approx(250.0)
    assert m.idle_watts == pytest.approx(60.0)
    assert m.above_idle_joules == pytest.approx(250.0 - 60.0 * 2.5)
    assert m.power_source == "instant"
    assert m.device_info["gpu_name"] == "Fake H100" and m.device_info["power_limit_w"] == 700.0
    assert m.device_info["sm_clock_mhz"] == 1980 and m.device_info["temperature_c"] == 41


def test_fake_nvml_counter_wraparound(fake):
    clock, nvml = fake
    nvml.energy_mj = 2 ** 64 - 100_000    # 100 J before the 64-bit counter wraps
    with EnergyMeter("cuda:0", idle_seconds=0.0) as m:
        clock.t += 3.0
        nvml.energy_mj += 400_000
    assert m.joules == pytest.approx(400.0)


def test_fake_nvml_short_window_is_flagged_never_zero(fake):
    clock, nvml = fake
    with EnergyMeter("cuda:0", idle_seconds=0.0) as m:
        clock.t += 0.05                   # counter did not move in 50 ms
    assert m.available and m.window_ok is False
    assert m.joules is None and m.above_idle_joules is None and m.raw_joules == 0.0
    assert "shorter than min_seconds" in m.reason


def test_fake_nvml_power_usage_fallback_is_noted(monkeypatch, fake):
    clock, nvml = fake
    nvml.instant = False
    src, _ = NvmlSource.open(0)
    assert src.power_source == "average_1s" and "1-second" in src.note
    assert src.watts() == pytest.approx(60.0)


def test_fake_nvml_measure_repeats_to_min_window_and_reports_spread(fake):
    clock, nvml = fake
    watts = iter([110.0, 90.0])           # the draw of trials 2 and 3 (trial 1: 100 W)
    state = {"w": 100.0}

    def work():  # one call: 0.5 s at the trial's power
        clock.t += 0.5
        nvml.energy_mj += 0.5 * state["w"] * 1000

    calls_seen = []

    def fn():
        work()
        calls_seen.append(state["w"])

    # switch the power draw at each new trial: cool-downs are the only _sleep calls after calibration
    real_sleep = clock.sleep

    def sleep_and_switch(s):
        real_sleep(s)
        state["w"] = next(watts)

    meters._sleep = sleep_and_switch
    m = measure(fn, device="cuda:0", min_seconds=2.0, trials=3, cooldown_seconds=1.0, idle_seconds=0.02)
    assert m.calls == [5, 5, 5]           # ceil(1.05 * 2.0 / 0.5)
    assert m.seconds_per_call == pytest.approx(0.5)
    assert m.window_ok and m.available
    per_call = [0.5 * w for w in (100.0, 110.0, 90.0)]
    assert m.joules_per_call == pytest.approx(sorted(per_call)[1])
    mean = sum(per_call) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in per_call) / 2)
    assert m.rel_std_joules == pytest.approx(std / mean)
    assert m.above_idle_joules_per_call == pytest.approx(50.0 - 60.0 * 0.5)
    assert [t["calls"] for t in m.trials] == [5, 5, 5]


def test_fake_nvml_measure_redoes_a_trial_that_came_out_short(fake):
    clock, nvml = fake
    durations = iter([0.5, 0.5] + [0.1] * 100 + [0.5] * 1000)  # calibration says 0.5 s, the work then speeds up

    def fn():
        clock.t += next(durations)
        nvml.energy_mj += 1_000

    m = measure(fn, device="cuda:0", min_seconds=2.0, trials=1, idle_seconds=0.0)
    assert m.window_ok and m.calls[0] > 5


# ---------------------------------------------------------------- real NVML, where it works
def _nvml_reason() -> str:
    src, why = NvmlSource.open(0)
    return "" if src is not None and torch.cuda.is_available() else (why or "no CUDA device")


@pytest.mark.gpu
@pytest.mark.skipif(bool(_nvml_reason()), reason=f"NVML meter test needs a working NVML: {_nvml_reason()}")
def test_real_nvml_energy_of_a_matmul_loop():
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    m = measure(lambda: a @ a, device="cuda", min_seconds=2.0, trials=2, cooldown_seconds=0.5)
    assert m.available and m.window_ok and m.joules_per_call > 0
    assert m.idle_watts > 0 and m.gpu_seconds_per_call > 0
    assert m.trials[0]["gpu_name"]


# ---------------------------------------------------------------- pytest-benchmark integration
def test_add_energy_info_fills_extra_info(fake):
    clock, nvml = fake

    def fn():
        clock.t += 0.25
        nvml.energy_mj += 25_000          # 100 W

    bench = types.SimpleNamespace(extra_info={})
    info = add_energy_info(bench, fn, device="cuda:0", trials=2, cooldown_seconds=0.0, idle_seconds=0.02)
    assert bench.extra_info["joules_per_call"] == pytest.approx(25.0)
    assert bench.extra_info["mean_watts"] == pytest.approx(60.0)  # the instant field of the fake reads idle power
    assert info["energy_available"] and bench.extra_info["energy_device_info"]["gpu_name"] == "Fake H100"


def test_add_energy_info_on_cpu_says_why(monkeypatch):
    monkeypatch.setattr(meters.RaplSource, "open", classmethod(lambda cls, root=None: (None, "RAPL unavailable: test")))
    bench = types.SimpleNamespace(extra_info={})
    add_energy_info(bench, lambda: None, device="cpu", min_seconds=0.01, trials=1, idle_seconds=0.0)
    assert bench.extra_info["energy_available"] is False
    assert bench.extra_info["energy_reason"] == "RAPL unavailable: test"
    assert bench.extra_info["joules_per_call"] is None


def test_hardware_peaks_and_percentile():
    from jepa_engine.profiling.hardware import peak_for, percentile

    assert peak_for("NVIDIA H100 80GB HBM3") == (989.0, 3.35)
    assert peak_for("cpu-x86_64-2threads") is None
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([1.0, 2.0], 0.0) == 1.0 and percentile([1.0, 2.0], 1.0) == 2.0


def test_progress_redraws_every_10_s_off_a_terminal(monkeypatch):
    import sys

    from jepa_engine.runtime import progress_mininterval

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert progress_mininterval() == 10.0
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert progress_mininterval() == 0.1
