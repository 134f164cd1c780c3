"""Published hardware peaks, the device's name and file-name tag, and the small timing helpers shared by
the comparison, the decoding baseline and the benchmarks."""
from __future__ import annotations

import platform
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Roofline:
    """A GPU's published dense peaks by where the FLOPs run, and its HBM bandwidth."""

    name: str
    tflops_16bit: float   # fp16/bf16 dots on tensor cores (dense)
    tflops_tf32: float    # fp32 dots at TF32 on tensor cores (dense)
    tflops_fp32: float    # IEEE fp32 on the FMA units (an FMA counts 2 FLOPs)
    hbm_tbps: float

    def tflops(self, precision: str) -> float:
        """The peak of ``"16bit"``, ``"tf32"`` or ``"fp32"`` FLOPs."""
        peaks = {"16bit": self.tflops_16bit, "tf32": self.tflops_tf32, "fp32": self.tflops_fp32}
        if precision not in peaks:
            raise ValueError(f"Roofline.tflops: precision must be one of {sorted(peaks)}, got {precision!r}")
        return peaks[precision]

    def seconds(self, flops: float, precision: str, moved_bytes: float) -> float:
        """The roofline time of ``flops`` at ``precision`` and ``moved_bytes`` of HBM traffic: the larger
        of the compute time at peak and the transfer time at full bandwidth."""
        return max(flops / (self.tflops(precision) * 1e12), moved_bytes / (self.hbm_tbps * 1e12))


# H100 SXM5 (80 GB HBM3), NVIDIA's datasheet: dense bf16/fp16 989 TFLOP/s, TF32 495, fp32 67; 3.35 TB/s.
H100_SXM = Roofline("H100 SXM", 989.0, 495.0, 67.0, 3.35)

# Published dense peaks, matched against the device name: (bf16/fp16 dense TFLOP/s, HBM TB/s).
PEAKS = {"H100": (H100_SXM.tflops_16bit, H100_SXM.hbm_tbps), "H200": (989.0, 4.8), "A100": (312.0, 2.0)}


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
