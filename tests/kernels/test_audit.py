"""The ahead-of-time audit: every registered kernel compiles for sm_90a and sm_80 without spills."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jepa_engine.kernels._launch import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def run_audit(*kernels: str) -> list[dict]:
    """Run the audit in a fresh process (it must not see TRITON_INTERPRET) and return its rows."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    args = [sys.executable, "-m", "jepa_engine.kernels.audit", "--json"]
    for k in kernels:
        args += ["--kernel", k]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.stdout.strip(), f"audit printed nothing; stderr:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def test_latent_loss_kernels_compile_without_spills():
    rows = run_audit("latent_loss_fwd", "latent_loss_bwd")
    assert {r["target"] for r in rows} == {"sm_90a", "sm_80"}
    assert {r["kernel"] for r in rows} == {"latent_loss_fwd", "latent_loss_bwd"}
    bad = [r for r in rows if r["error"] or r["spill_bytes"] != 0 or not r["ok"]]
    assert not bad, f"kernels that spill or fail: {bad}"
    # Bandwidth-bound elementwise tiles: registers far from the 255 limit keep occupancy high.
    assert max(r["registers"] for r in rows) <= 128, max(rows, key=lambda r: r["registers"])


def test_planner_kernels_compile_without_spills():
    rows = run_audit("elite_refit", "sample_actions")
    assert {r["kernel"] for r in rows} == {"elite_refit", "sample_actions"}
    bad = [r for r in rows if r["error"] or r["spill_bytes"] != 0 or not r["ok"]]
    assert not bad, f"kernels that spill or fail: {bad}"


def test_rollout_kernels_compile_without_spills():
    rows = run_audit("fused_linear", "linear_goal_cost")
    assert {r["kernel"] for r in rows} == {"fused_linear", "linear_goal_cost"}
    assert {r["target"] for r in rows} == {"sm_90a", "sm_80"}
    bad = [r for r in rows if r["error"] or r["spill_bytes"] != 0 or not r["ok"]]
    assert not bad, f"kernels that spill or fail: {bad}"
