"""Benchmark harness: correct timing on CUDA and CPU, and the numbers every row records.

``run_bench(benchmark, fn, *, impl, group, flops=None, bytes=None, flush_l2=False, **info)`` times
``fn`` with pytest-benchmark. On CUDA each round launches ``fn`` several times and then
synchronises (so the time is the GPU's, not the launch's); with ``flush_l2`` a 256 MB buffer is
written before every single-call round so bandwidth-bound kernels are not measured from the cache.
Every row records the device, torch/triton versions, the implementation (``impl``; ``"jepa_engine"``
is ours) and its ``group`` (the same problem solved by every peer). At the end of the session the
JSON hook adds, per row: median and 20th/80th percentile per call, achieved TFLOP/s or GB/s, the
fraction of the device's roofline where it is known, and for our row the speed-up against every peer
of the same group measured in the same run.

Every suite puts its ``impl`` parametrization on top, so the peers of one group run one after
another: a run cut short (``make gpu-report`` gives each file a time share and then SIGINT) keeps
whole groups; a row whose rounds were cut off is left out of the JSON, not written with part of them.
Under the report (``JEPA_BENCH_QUICK=1``) a slow function gets fewer calls: about ``QUICK_ROUNDS_S``
of timed rounds (3 at least; no warm-up round beyond the warm-up calls), and its row says ``quick``.
"""
from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from typing import Callable

import pytest
import torch

from jepa_engine.profiling.hardware import device_name, peak_for, percentile
from jepa_engine.profiling.pytest_energy import add_energy_info, energy_info  # noqa: F401 (fixture)

OURS = "jepa_engine"
QUICK = os.environ.get("JEPA_BENCH_QUICK") == "1"
QUICK_ROUNDS_S = 2.0


def _versions() -> dict:
    out = {"torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


_L2_FLUSH: torch.Tensor | None = None


def _flush_l2() -> None:
    global _L2_FLUSH
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    _L2_FLUSH.zero_()


@pytest.fixture
def run_bench():
    def _run(benchmark, fn: Callable[[], object], *, impl: str, group: str, flops: float | None = None,
             bytes: float | None = None, flush_l2: bool = False, device: str | None = None, energy: bool = False,
             warmup: int = 3, **info):
        cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        for _ in range(warmup):  # warm-up: compilation, autotuning, CUDA graph capture, allocator
            fn()
        warmup_rounds = 1
        if cuda:
            torch.cuda.synchronize()
            if flush_l2:
                calls, rounds = 1, 20

                def setup():
                    _flush_l2()
                    torch.cuda.synchronize()
            else:
                # Enough calls per round that one synchronisation is noise (about 1 ms per round).
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                calls = max(1, min(1000, int(1.0 / max(start.elapsed_time(end), 1e-3))))
                setup = None
                rounds, warmup_rounds = _rounds(calls * start.elapsed_time(end) / 1e3, 10, 10)

            def target():
                for _ in range(calls):
                    fn()
                torch.cuda.synchronize()

            _pedantic(benchmark, target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
        else:
            calls = 1
            t0 = time.perf_counter()
            fn()
            # about one second of rounds: 5 to 30 of them (CPU timings on shared cores are noisy)
            rounds, warmup_rounds = _rounds(time.perf_counter() - t0, 5, 30, target_s=1.0)
            _pedantic(benchmark, fn, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
        benchmark.group = group
        benchmark.extra_info.update(
            impl=impl, group=group, flops=flops, bytes=bytes, calls_per_round=calls, quick=QUICK,
            device=device_name() if (cuda or device is None) else device, **_versions(), **info,
        )
        if energy:  # joules and watts per call, measured in windows of their own after the timing
            add_energy_info(benchmark, fn, device="cuda" if cuda else "cpu")

    return _run


def _rounds(round_s: float, least: int, most: int, target_s: float = 0.0) -> tuple[int, int]:
    """Timed rounds and warm-up rounds for rounds of ``round_s`` seconds: ``target_s`` of them within
    [least, most] (``most`` when 0); under the report, about QUICK_ROUNDS_S of them (at least 3) and no
    warm-up round for a slow function (its warm-up calls and the calibration call came before)."""
    rounds = max(least, min(most, int(target_s / max(round_s, 1e-6)))) if target_s else most
    if QUICK:
        return max(3, min(rounds, int(QUICK_ROUNDS_S / max(round_s, 1e-6)))), int(round_s < 0.05)
    return rounds, 1


def _pedantic(benchmark, target, **kw) -> None:
    try:
        benchmark.pedantic(target, **kw)
    except KeyboardInterrupt:   # cut off inside its rounds: keep the partial row out of the JSON
        benchmark.has_error = True
        raise


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """SIGINT is ignored from here on: the JSON is written now (pytest-benchmark's machine info alone
    takes a second or more), and a run cut off at its time share (SIGINT, SIGKILL later) must not lose
    it to a SIGINT that arrives after the last test."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Per-call statistics, throughput, roofline fraction, and speed-ups against same-group peers."""
    rows = output_json["benchmarks"]
    benchmarks = [b for b in benchmarks if not getattr(b, "has_error", False)]   # the rows written, in order
    for bench, row in zip(benchmarks, rows):
        info = row["extra_info"]
        calls = info.get("calls_per_round") or 1
        data = [t / calls for t in (bench.stats.data if hasattr(bench, "stats") else [])] or [row["stats"]["median"]]
        med = statistics.median(data)
        info["median_s"], info["p20_s"], info["p80_s"] = med, percentile(data, 0.2), percentile(data, 0.8)
        if info.get("images"):
            info["images_per_s"] = info["images"] / med
        peak = peak_for(info.get("device", ""))
        if info.get("flops"):
            info["tflops"] = info["flops"] / med / 1e12
            if peak:
                info["roofline_fraction"] = info["tflops"] / peak[0]
        if info.get("bytes"):
            info["gbps"] = info["bytes"] / med / 1e9
            if peak:
                info["roofline_fraction"] = info["gbps"] / (peak[1] * 1e3)
    by_group: dict[str, list[dict]] = {}
    for row in rows:
        by_group.setdefault(row["extra_info"].get("group", row.get("group") or ""), []).append(row["extra_info"])
    for infos in by_group.values():
        ours = [i for i in infos if i.get("impl") == OURS]
        for mine in ours:
            mine["speedup_vs"] = {i["impl"]: i["median_s"] / mine["median_s"] for i in infos
                                  if i.get("impl") != OURS and "median_s" in i}
