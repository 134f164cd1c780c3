"""pytest-benchmark integration: joules and watts in a benchmark row's ``extra_info``.

    def test_x(benchmark, energy_info):
        benchmark(fn)
        energy_info(benchmark, fn, device="cuda")   # adds joules_per_call, mean_watts, ... to extra_info

``add_energy_info(benchmark, fn, device)`` is the same without the fixture. It runs ``fn`` in its own
windows (``measure``: at least ``min_seconds`` per window, ``trials`` windows), after the timing, so
the timed rounds are not disturbed by the power-sampling thread. Where energy is unavailable the row
says so (``energy_available=False`` and ``energy_reason``) instead of holding a number.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest

from .meters import measure


def add_energy_info(benchmark, fn: Callable[[], object], device: Any = "cpu", *, min_seconds: float = 2.0,
                    trials: int = 3, cooldown_seconds: float = 1.0, idle_seconds: float = 0.5) -> dict:
    """Measure ``fn``'s energy per call and add it to ``benchmark.extra_info``; returns the added keys."""
    m = measure(fn, device=device, min_seconds=min_seconds, trials=trials, cooldown_seconds=cooldown_seconds,
                idle_seconds=idle_seconds, warmup=0)
    info = {
        "energy_available": m.joules_per_call is not None,
        "energy_reason": m.reason,
        "joules_per_call": m.joules_per_call,
        "above_idle_joules_per_call": m.above_idle_joules_per_call,
        "mean_watts": m.mean_watts,
        "idle_watts": m.idle_watts,
        "energy_rel_std": m.rel_std_joules,
        "energy_window_calls": m.calls,
        "energy_window_ok": m.window_ok,
        "energy_seconds_per_call": m.seconds_per_call,
        "energy_device_info": {k: v for k, v in m.trials[-1].items()
                               if k in ("gpu_name", "sm_clock_mhz", "mem_clock_mhz", "temperature_c",
                                        "power_limit_w", "power_source", "rapl_domains")},
    }
    benchmark.extra_info.update(info)
    return info


@pytest.fixture
def energy_info():
    """The fixture form of :func:`add_energy_info`."""
    return add_energy_info
