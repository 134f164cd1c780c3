"""Time and energy meters: ``EnergyMeter`` (one window) and ``measure`` (repeated work, trials, spread).

    with EnergyMeter(device="cuda:0") as m:
        run_the_work()
    m.seconds, m.joules, m.above_idle_joules, m.idle_watts, m.window_ok, m.available, m.reason

Semantics (what a number means, and when there is none):
- GPU energy is the difference of NVML's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``,
  millijoules since the driver loaded, Volta and newer), read through ``nvidia-ml-py`` (module
  ``pynvml``). The counter moves only every 20-100 ms, so a window shorter than ``min_seconds``
  (default 2 s) is flagged ``window_ok=False`` and its ``joules`` is ``None`` (its raw counter
  difference is kept in ``raw_joules``): a short window is never reported as 0 J. ``measure`` repeats
  the work until the window is long enough and divides by the repetition count.
- Idle power is measured before the window (power samples over ``idle_seconds`` with nothing
  running); ``above_idle_joules = joules - idle_watts * seconds``.
- The power trace is sampled in a background thread from the instantaneous field
  (``NVML_FI_DEV_POWER_INSTANT``); where the driver lacks it, ``nvmlDeviceGetPowerUsage`` is used and
  ``power_source`` says it is a 1-second moving average.
- GPU time is measured with CUDA events (``gpu_seconds``), wall time with ``perf_counter`` after a
  synchronisation at both ends.
- CPU energy comes from Linux RAPL package domains (``/sys/class/powercap/intel-rapl:N/energy_uj``,
  wrap-around at ``max_energy_range_uj``) where readable; otherwise ``joules`` is ``None`` and
  ``reason`` says why. Energy is never estimated from a TDP.
"""
from __future__ import annotations

import glob
import math
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch

from .hardware import sync

# Indirections so tests can drive a fake clock; nothing else reassigns them.
_clock: Callable[[], float] = time.perf_counter
_sleep: Callable[[float], None] = time.sleep

NVML_COUNTER_RANGE = 2 ** 64  # nvmlDeviceGetTotalEnergyConsumption is an unsigned long long (mJ)
RAPL_ROOT = "/sys/class/powercap"


def _device(device: Any) -> torch.device:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"EnergyMeter: device must be 'cpu' or 'cuda[:i]', got {str(dev)!r}")
    return dev


# ------------------------------------------------------------------------------------------------
# Energy sources: NVML (GPU) and RAPL (CPU). Each reads a cumulative counter in joules and a power.
# ------------------------------------------------------------------------------------------------
class NvmlSource:
    """One GPU through NVML. ``NvmlSource.open(index)`` returns (source or None, reason)."""

    kind = "nvml"

    def __init__(self, nvml, handle, index: int):
        self.nvml, self.handle, self.index = nvml, handle, index
        self.power_source = "instant"
        try:
            self._instant_watts()
        except Exception:  # older drivers: no instantaneous field
            self.power_source = "average_1s"
        self.note = ("power trace from NVML_FI_DEV_POWER_INSTANT" if self.power_source == "instant" else
                     "power trace from nvmlDeviceGetPowerUsage, a 1-second moving average on Ampere/Hopper")

    @classmethod
    def open(cls, index: int) -> tuple[Optional["NvmlSource"], str]:
        try:
            import pynvml
        except ImportError as exc:
            return None, f"NVML unavailable: cannot import pynvml (install nvidia-ml-py): {exc}"
        try:
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except Exception as exc:  # NVMLError_* (no driver, no library, not supported before Volta)
            return None, f"NVML unavailable for GPU {index}: {type(exc).__name__}: {exc}"
        return cls(pynvml, handle, index), ""

    def read_joules(self) -> float:
        return float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)) / 1000.0

    def counter_range_joules(self) -> float:
        return NVML_COUNTER_RANGE / 1000.0

    def _instant_watts(self) -> float:
        value = self.nvml.nvmlDeviceGetFieldValues(self.handle, [self.nvml.NVML_FI_DEV_POWER_INSTANT])[0]
        if getattr(value, "nvmlReturn", 0) != 0:
            raise RuntimeError(f"NVML_FI_DEV_POWER_INSTANT returned {value.nvmlReturn}")
        return float(value.value.uiVal) / 1000.0

    def watts(self) -> float:
        if self.power_source == "instant":
            return self._instant_watts()
        return float(self.nvml.nvmlDeviceGetPowerUsage(self.handle)) / 1000.0

    def info(self) -> dict:
        n, h, out = self.nvml, self.handle, {"gpu_index": self.index}
        probes = {
            "gpu_name": lambda: n.nvmlDeviceGetName(h),
            "sm_clock_mhz": lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM),
            "temperature_c": lambda: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU),
            "power_limit_w": lambda: n.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
        }
        for key, probe in probes.items():
            try:
                value = probe()
                out[key] = value.decode() if isinstance(value, bytes) else value
            except Exception:
                out[key] = None
        return out


class RaplSource:
    """The CPU package domains of Linux RAPL (``intel-rapl:N``, not their sub-domains), summed."""

    kind = "rapl"
    power_source = "counter"
    note = "CPU package energy from Linux RAPL"

    def __init__(self, domains: list[tuple[str, float]]):
        self.domains = domains  # (energy_uj path, max_energy_range_uj in joules)
        self._last = [self._read_one(p) for p, _ in domains]
        self._total = 0.0

    @classmethod
    def open(cls, root: str = RAPL_ROOT) -> tuple[Optional["RaplSource"], str]:
        paths = sorted(p for p in glob.glob(os.path.join(root, "intel-rapl:*")) if p.count(":") == 1)
        if not paths:
            return None, f"RAPL unavailable: no {root}/intel-rapl:N package domain (not Linux/Intel-AMD, or not exposed)"
        domains = []
        for p in paths:
            try:
                with open(os.path.join(p, "energy_uj")) as f:
                    int(f.read())
                with open(os.path.join(p, "max_energy_range_uj")) as f:
                    rng = int(f.read()) / 1e6
            except (OSError, ValueError) as exc:
                return None, f"RAPL unavailable: cannot read {p}/energy_uj ({exc}); it is root-only on recent kernels"
            domains.append((os.path.join(p, "energy_uj"), rng))
        return cls(domains), ""

    @staticmethod
    def _read_one(path: str) -> float:
        with open(path) as f:
            return int(f.read()) / 1e6

    def read_joules(self) -> float:
        """A cumulative count that never wraps: each domain's step is unwrapped on every read.
        Reads must come closer together than one wrap (about 60 s at 100 W per 2^32 uJ)."""
        for i, (path, rng) in enumerate(self.domains):
            now = self._read_one(path)
            self._total += wrapped_delta(self._last[i], now, rng)
            self._last[i] = now
        return self._total

    def counter_range_joules(self) -> float:
        return math.inf  # already unwrapped

    def watts(self) -> float:
        return math.nan  # RAPL has no power reading; idle power comes from the counter

    def info(self) -> dict:
        return {"rapl_domains": [os.path.dirname(p) for p, _ in self.domains]}


def energy_probe(device: torch.device) -> tuple[bool, str]:
    """Whether the device's energy counter is readable, and why not."""
    source, reason = NvmlSource.open(device.index or 0) if device.type == "cuda" else RaplSource.open()
    if source is None:
        return False, f"energy unavailable: {reason}"
    return True, ""


def wrapped_delta(start: float, end: float, counter_range: float) -> float:
    """``end - start`` of a counter that wraps to 0 after ``counter_range``."""
    return end - start if end >= start else end + counter_range - start


# ------------------------------------------------------------------------------------------------
class _PowerSampler(threading.Thread):
    """Samples ``source.watts()`` every ``interval`` seconds until stopped: trace [(t_s, watts)]."""

    def __init__(self, source, interval: float):
        super().__init__(daemon=True)
        self.source, self.interval = source, interval
        self.trace: list[tuple[float, float]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop_event.is_set():
            try:
                self.trace.append((time.perf_counter() - t0, self.source.watts()))
            except Exception:
                pass
            self._stop_event.wait(self.interval)

    def stop(self) -> list[tuple[float, float]]:
        self._stop_event.set()
        self.join()
        return self.trace


class EnergyMeter:
    """Context manager measuring one window of work on ``device``: wall, CPU, GPU time and energy.

    device: "cpu" (RAPL) or "cuda[:i]" (NVML for that GPU index).
    min_seconds: the shortest window whose energy is reported (None: 2.0 for NVML, 0.01 for RAPL).
    idle_seconds: how long idle power is measured before the window (0 disables it).
    sample_interval: seconds between power samples of the background thread (NVML only).
    """

    def __init__(self, device: Any = "cpu", *, min_seconds: Optional[float] = None, idle_seconds: float = 0.5,
                 sample_interval: float = 0.02, trace: bool = True):
        if min_seconds is not None and not min_seconds >= 0:
            raise ValueError(f"EnergyMeter: min_seconds must be >= 0, got {min_seconds!r}")
        if not idle_seconds >= 0:
            raise ValueError(f"EnergyMeter: idle_seconds must be >= 0, got {idle_seconds!r}")
        if not sample_interval > 0:
            raise ValueError(f"EnergyMeter: sample_interval must be > 0, got {sample_interval!r}")
        self.device = _device(device)
        self.idle_seconds, self.sample_interval, self.trace_enabled = idle_seconds, sample_interval, trace
        if self.device.type == "cuda":
            self.source, self.reason = NvmlSource.open(self.device.index or 0)
        else:
            self.source, self.reason = RaplSource.open()
        self.min_seconds = min_seconds if min_seconds is not None else (2.0 if self.device.type == "cuda" else 0.01)
        self.available = self.source is not None
        self.power_source = self.source.power_source if self.source else None
        self.note = self.source.note if self.source else ""
        self.device_info: dict = self.source.info() if self.source else {}
        self.seconds = self.cpu_seconds = self.gpu_seconds = None
        self.joules = self.raw_joules = self.above_idle_joules = self.idle_watts = None
        self.mean_watts = self.peak_watts = None
        self.window_ok: Optional[bool] = None
        self.power_trace: list[tuple[float, float]] = []

    # ---- idle power, before the window
    def _measure_idle(self) -> Optional[float]:
        if self.source is None or self.idle_seconds <= 0:
            return None
        if self.source.kind == "rapl":
            e0, t0 = self.source.read_joules(), _clock()
            _sleep(self.idle_seconds)
            e1, t1 = self.source.read_joules(), _clock()
            return (e1 - e0) / (t1 - t0) if t1 > t0 else None
        samples, t_end = [], time.perf_counter() + self.idle_seconds
        while True:
            try:
                samples.append(self.source.watts())
            except Exception:
                pass
            if time.perf_counter() >= t_end:
                break
            time.sleep(min(self.sample_interval, self.idle_seconds))
        return statistics.fmean(samples) if samples else None

    def __enter__(self) -> "EnergyMeter":
        sync(self.device)
        self.idle_watts = self._measure_idle()
        if self.source is not None and self.source.kind == "nvml":
            self.device_info = self.source.info()  # clocks and temperature at the start of the window
        self._sampler = None
        if self.source is not None and self.source.kind == "nvml" and self.trace_enabled:
            self._sampler = _PowerSampler(self.source, self.sample_interval)
            self._sampler.start()
        self._events = None
        if self.device.type == "cuda" and torch.cuda.is_available():
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._e0 = self.source.read_joules() if self.source else None
        self._cpu0, self._t0 = time.process_time(), _clock()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._events is not None:
            self._events[1].record()
        sync(self.device)
        t1, cpu1 = _clock(), time.process_time()
        e1 = self.source.read_joules() if self.source else None
        self.seconds, self.cpu_seconds = t1 - self._t0, cpu1 - self._cpu0
        if self._events is not None:
            self.gpu_seconds = self._events[0].elapsed_time(self._events[1]) / 1000.0
        if self._sampler is not None:
            self.power_trace = self._sampler.stop()
            watts = [w for _, w in self.power_trace]
            if watts:
                self.mean_watts, self.peak_watts = statistics.fmean(watts), max(watts)
        self.window_ok = self.seconds >= self.min_seconds
        if self.source is None:
            return
        self.raw_joules = wrapped_delta(self._e0, e1, self.source.counter_range_joules())
        if not self.window_ok:
            self.reason = (f"window of {self.seconds:.3f} s is shorter than min_seconds={self.min_seconds} s: the "
                           f"{self.source.kind} counter is too coarse; repeat the work (measure()) for a longer window")
            return
        self.joules = self.raw_joules
        if self.mean_watts is None and self.seconds > 0:
            self.mean_watts = self.joules / self.seconds
        if self.idle_watts is not None:
            self.above_idle_joules = self.joules - self.idle_watts * self.seconds

    def to_dict(self) -> dict:
        keys = ("seconds", "cpu_seconds", "gpu_seconds", "joules", "raw_joules", "above_idle_joules", "idle_watts",
                "mean_watts", "peak_watts", "window_ok", "available", "reason", "min_seconds", "power_source", "note")
        return {"device": str(self.device), **{k: getattr(self, k) for k in keys}, **self.device_info}


# ------------------------------------------------------------------------------------------------
@dataclass
class Measurement:
    """Per-call figures of ``measure``: medians over trials, and their spread (relative std)."""

    device: str
    calls: list[int]                       # repetitions in each trial's window
    seconds_per_call: float                # median over trials (wall)
    cpu_seconds_per_call: float
    gpu_seconds_per_call: Optional[float]
    joules_per_call: Optional[float]       # None: energy unavailable or a window too short
    above_idle_joules_per_call: Optional[float]
    idle_watts: Optional[float]
    mean_watts: Optional[float]
    rel_std_seconds: float                 # std / mean over trials (0 for one trial)
    rel_std_joules: Optional[float]
    window_ok: bool                        # every trial's window reached min_seconds
    available: bool
    reason: str
    trials: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _rel_std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mean = statistics.fmean(xs)
    return statistics.stdev(xs) / abs(mean) if mean else math.inf


def measure(fn: Callable[[], object], *, device: Any = "cpu", min_seconds: float = 2.0, trials: int = 3,
            cooldown_seconds: float = 1.0, idle_seconds: float = 0.5, warmup: int = 1,
            max_calls: int = 10_000_000, sample_interval: float = 0.02) -> Measurement:
    """Repeat ``fn`` until each window lasts at least ``min_seconds``, in ``trials`` windows separated
    by ``cooldown_seconds``; report per-call time and energy (medians) and their spread."""
    if not (isinstance(trials, int) and trials >= 1):
        raise ValueError(f"measure: trials must be an int >= 1, got {trials!r}")
    if not min_seconds > 0:
        raise ValueError(f"measure: min_seconds must be > 0, got {min_seconds!r}")
    if not cooldown_seconds >= 0:
        raise ValueError(f"measure: cooldown_seconds must be >= 0, got {cooldown_seconds!r}")
    dev = _device(device)
    for _ in range(warmup):
        fn()
    sync(dev)
    t0 = _clock()
    fn()
    sync(dev)
    per_call = max(_clock() - t0, 1e-9)
    calls = max(1, min(max_calls, math.ceil(1.05 * min_seconds / per_call)))
    meters: list[EnergyMeter] = []
    counts: list[int] = []
    for trial in range(trials):
        if trial:
            _sleep(cooldown_seconds)
        while True:
            with EnergyMeter(dev, min_seconds=min_seconds, idle_seconds=idle_seconds,
                             sample_interval=sample_interval) as m:
                for _ in range(calls):
                    fn()
            if m.window_ok or calls >= max_calls:
                break
            # the first estimate was off (warm-up, contention): scale up and redo this trial
            calls = min(max_calls, math.ceil(calls * 1.1 * min_seconds / max(m.seconds, 1e-9)))
        meters.append(m)
        counts.append(calls)

    def per(values: list[Optional[float]]) -> list[Optional[float]]:
        return [v / n if v is not None else None for v, n in zip(values, counts)]

    secs = per([m.seconds for m in meters])
    joules = per([m.joules for m in meters])
    above = per([m.above_idle_joules for m in meters])
    gpu = per([m.gpu_seconds for m in meters])
    ok_j = None not in joules
    last = meters[-1]
    reason = last.reason if not ok_j else ""
    idles = [m.idle_watts for m in meters if m.idle_watts is not None]
    watts = [m.mean_watts for m in meters if m.mean_watts is not None]
    return Measurement(
        device=str(dev), calls=counts, seconds_per_call=statistics.median(secs),
        cpu_seconds_per_call=statistics.median(per([m.cpu_seconds for m in meters])),
        gpu_seconds_per_call=statistics.median(gpu) if None not in gpu else None,
        joules_per_call=statistics.median(joules) if ok_j else None,
        above_idle_joules_per_call=statistics.median(above) if None not in above else None,
        idle_watts=statistics.median(idles) if idles else None,
        mean_watts=statistics.median(watts) if watts else None,
        rel_std_seconds=_rel_std(secs), rel_std_joules=_rel_std(joules) if ok_j else None,
        window_ok=all(m.window_ok for m in meters), available=last.available, reason=reason,
        trials=[{**m.to_dict(), "calls": n} for m, n in zip(meters, counts)],
    )
