"""Published hardware peaks, the device's name and file-name tag, and the small timing helpers shared by
the comparison, the decoding baseline and the benchmarks."""
from __future__ import annotations

import platform
import re
import statistics
import time
from typing import Callable, Optional

import torch

# Published dense peaks, matched against the device name: (bf16/fp16 dense TFLOP/s, HBM TB/s).
PEAKS = {"H100": (989.0, 3.35), "H200": (989.0, 4.8), "A100": (312.0, 2.0)}


def peak_for(device_name: str) -> Optional[tuple[float, float]]:
    """``(TFLOP/s, TB/s)`` of a device named like ``"NVIDIA H100 80GB HBM3"``, or None when unknown."""
    name = device_name.upper()
    for key, peak in PEAKS.items():
        if key in name:
            return peak
    return None


def percentile(xs: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``xs`` with linear interpolation."""
    xs = sorted(xs)
    i = (len(xs) - 1) * q
    lo, hi = int(i), min(int(i) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, min_seconds: float, min_calls: int = 5,
               max_calls: int = 200, warmup: int = 1) -> dict:
    """Call `fn` one at a time (synchronised) until `min_calls` calls and `min_seconds` have passed."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() - start < min_seconds):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"latency_s": med, "latency_p90_s": percentile(times, 0.9), "decisions_per_s": 1.0 / med,
            "timed_calls": len(times)}


def device_name() -> str:
    """The benchmarks' device: the first GPU's name, else ``cpu-<machine>-<threads>threads``."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def device_tag() -> str:
    """A short file-name tag for that device (``h100``, ``cpu``...)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).lower()
        m = re.search(r"\b([a-z]\d{2,4})\b", name)
        return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return "cpu"
