"""The ahead-of-time audit: every registered kernel compiles for sm_90a and sm_80 without spills."""
from __future__ import annotations

import pytest

from jepa_engine.kernels._launch import triton_available
from tests.helpers import run_audit

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@pytest.mark.audit
def test_latent_loss_kernels_compile_without_spills():
    rows = run_audit("latent_loss_fwd", "latent_loss_bwd")
    assert {r["target"] for r in rows} == {"sm_90a", "sm_80"}
    assert {r["kernel"] for r in rows} == {"latent_loss_fwd", "latent_loss_bwd"}
    bad = [r for r in rows if r["error"] or r["spill_bytes"] != 0 or not r["ok"]]
    assert not bad, f"kernels that spill or fail: {bad}"
    # Bandwidth-bound elementwise tiles: registers far from the 255 limit keep occupancy high.
    assert max(r["registers"] for r in rows) <= 128, max(rows, key=lambda r: r["registers"])


@pytest.mark.audit
def test_planner_kernels_compile_without_spills():
    rows = run_audit("elite_refit", "sample_actions")
    assert {r["kernel"] for r in rows} == {"elite_refit", "sample_actions"}
    bad = [r for r in rows if r["error"] or r["spill_bytes"] != 0 or not r["ok"]]
    assert not bad, f"kernels that spill or fail: {bad}"


@pytest.mark.audit
def test_rollout_kernels_compile_without_spills():
    rows = run_audit("fused_linear", "linear_goal_cost")
    assert {r["kernel"] for r in rows} == {"fused_linear", "linear_goal_cost"}
    assert {r["target"] for r in rows} == {"sm_90a", "sm_80"}
    bad = [r for r in rows if r["error"] or r["spill_bytes"] != 0 or not r["ok"]]
    assert not bad, f"kernels that spill or fail: {bad}"


def test_signatures_are_read_from_the_kernels():
    """Every audited variant types exactly the kernel's runtime arguments, and its constexprs plus each
    launch config give every ``tl.constexpr`` argument a value (what ``compile_one`` needs)."""
    import inspect

    import jepa_engine.kernels  # noqa: F401  (registers the kernels)
    from jepa_engine.kernels._registry import KERNELS, python_function, runtime_args

    for spec in KERNELS.values():
        args = list(inspect.signature(python_function(spec.fn)).parameters)
        runtime = runtime_args(spec.fn)
        assert runtime and set(runtime) < set(args), spec.name
        for variant, (sig, consts) in spec.variants.items():
            assert list(sig) == runtime, (spec.name, variant)
            assert all(t.startswith("*") == n.endswith("_ptr") for n, t in sig.items()), (spec.name, variant, sig)
            for cfg in spec.configs_for(variant):
                assert set(args) - set(runtime) == set(consts) | set(cfg.constexprs), (spec.name, variant)


def test_signature_rejects_names_the_kernel_does_not_have():
    from jepa_engine.kernels._registry import signature
    from jepa_engine.kernels.latent_cost import _latent_cost_fwd_kernel as kernel

    assert signature(kernel, "*bf16", {"cost_ptr": "*fp32"})["z_ptr"] == "*bf16"
    assert signature(kernel, "*bf16", {"cost_ptr": "*fp32"})["cost_ptr"] == "*fp32"
    assert signature(kernel, "*bf16")["stride_zh"] == "i32"
    with pytest.raises(KeyError, match="stride_z"):
        signature(kernel, "*fp32", {"stride_z": "i64"})
    with pytest.raises(KeyError, match="z_ptr"):
        signature(kernel, None, {"goal_ptr": "*fp32"})


def test_dot_precision_contract():
    import torch

    from jepa_engine.kernels._launch import dot_precision

    assert dot_precision(torch.float32, allow_tf32=False) == "ieee"
    assert dot_precision(torch.float32, allow_tf32=True) == "tf32"
    for dt in (torch.float16, torch.bfloat16):
        assert dot_precision(dt, allow_tf32=False) == dot_precision(dt, allow_tf32=True) == "tf32"
