"""Published hardware peaks and the small timing helpers shared by the profiler, the decoding
baseline and the benchmarks."""
from __future__ import annotations

from typing import Optional

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
