"""Fused latent cost to the goal: Triton kernel (compiled on CUDA, interpreter on CPU) vs the reference,
gradients, errors."""
from __future__ import annotations

import pytest
import torch

from jepa_engine.kernels import latent_cost, latent_cost_reference, use_backend
from jepa_engine.kernels._launch import triton_available
from tests.helpers import DTYPES, assert_close, run_audit


def make(B, H, D, G, dtype=torch.float32, seed=0, weights=False, device="cpu"):
    """[z, goal, weights or None] drawn on CPU from ``seed``, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, H, D, generator=g).to(device, dtype)
    goal = torch.randn(G, D, generator=g).to(device, dtype)
    w = torch.rand(H, generator=g).to(device) if weights else None
    return z, goal, w


def direct(z, goal, metric, reduce, w):
    """The cost written the obvious way (expanded goal), a second check of the reference."""
    B, H, D = z.shape
    gl = goal.float().repeat_interleave(B // goal.shape[0], dim=0)[:, None, :]
    diff = z.float() - gl
    d = (diff.abs() if metric == "l1" else diff.square()).sum(-1)
    if reduce == "final":
        return d[:, -1]
    return (d * (w if w is not None else 1.0)).sum(-1)


@pytest.mark.parametrize("metric,reduce,weights", [("l2", "final", False), ("l1", "sum", False),
                                                   ("l2", "sum", True), ("l1", "final", False)])
def test_reference_matches_direct(metric, reduce, weights):
    z, goal, w = make(12, 4, 7, 3, weights=weights)
    assert_close(latent_cost_reference(z, goal, metric=metric, reduce=reduce, weights=w),
                 direct(z, goal, metric, reduce, w), torch.float32, what="reference vs direct")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric,reduce,weights", [("l2", "final", False), ("l1", "sum", False),
                                                   ("l2", "sum", True)])
@pytest.mark.parametrize("B,H,D,G", [(1, 1, 1, 1), (5, 3, 123, 5), (37, 5, 192, 1), (30, 2, 67, 3)])
def test_kernel_matches_reference(kernel_device, dtype, metric, reduce, weights, B, H, D, G):
    z, goal, w = make(B, H, D, G, dtype=dtype, weights=weights, device=kernel_device)
    with use_backend("triton"):
        got = latent_cost(z, goal, metric=metric, reduce=reduce, weights=w)
    want = latent_cost_reference(z, goal, metric=metric, reduce=reduce, weights=w)
    assert got.dtype == torch.float32 and got.shape == (B,)
    # fp32 math on both sides: only the summation order differs, whatever the storage dtype.
    assert_close(got, want, torch.float32, what=f"cost {metric}/{reduce} {dtype} {B, H, D, G}", scale=10)


def test_kernel_strided_z(kernel_device):
    z, goal, _ = make(9, 6, 40, 9, device=kernel_device)
    zs = z[:, ::2]                       # a step stride of 2 * D: read in place
    with use_backend("triton"):
        got = latent_cost(zs, goal, reduce="sum")
    assert_close(got, latent_cost_reference(zs, goal, reduce="sum"), torch.float32, what="strided", scale=10)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("metric,reduce,weights", [("l2", "final", False), ("l1", "sum", True)])
def test_gradients(request, backend, metric, reduce, weights):
    # the reference on CPU; the kernel on the kernel device (skipped where none can run)
    device = request.getfixturevalue("kernel_device") if backend == "triton" else "cpu"
    z, goal, w = make(6, 3, 10, 2, weights=weights, seed=3, device=device)
    g_out = torch.randn(6, generator=torch.Generator().manual_seed(1)).to(device)
    z1, goal1 = z.clone().requires_grad_(), goal.clone().requires_grad_()
    with use_backend(backend):
        (latent_cost(z1, goal1, metric=metric, reduce=reduce, weights=w) * g_out).sum().backward()
    z2, goal2 = z.clone().requires_grad_(), goal.clone().requires_grad_()
    (direct(z2, goal2, metric, reduce, w) * g_out).sum().backward()
    assert_close(z1.grad, z2.grad, torch.float32, what=f"grad z {backend}")
    assert_close(goal1.grad, goal2.grad, torch.float32, what=f"grad goal {backend}")


def test_custom_op_gradcheck():
    z, goal, w = make(4, 3, 5, 2, weights=True)
    z, goal = z.double(), goal.double()
    # fp64 is not a kernel dtype: exercise the registered backward itself against finite differences.
    from jepa_engine.kernels.latent_cost import latent_cost_backward, latent_cost_reference as ref

    zz = z.clone().requires_grad_()
    ref(zz, goal, metric="l2", reduce="sum", weights=w).sum().backward()
    g_z, g_goal = latent_cost_backward(torch.ones(4, dtype=torch.float64), z, goal, w, "l2", "sum", True)
    assert_close(g_z, zz.grad, torch.float32, what="written-out backward")
    assert g_goal.shape == goal.shape


@pytest.mark.parametrize("kwargs,match", [
    (dict(z=torch.zeros(4, 5)), "z must be 3-D"),
    (dict(goal=torch.zeros(2, 7)), "goal must be \\[G, D\\] with D = 8"),
    (dict(goal=torch.zeros(3, 8)), "must divide the batch B = 4"),
    (dict(goal=torch.zeros(1, 8, dtype=torch.float16)), "dtype of z"),
    (dict(metric="cos"), "metric must be one of"),
    (dict(reduce="mean"), "reduce must be one of"),
    (dict(weights=torch.ones(2)), "weights apply to reduce='sum' only"),
    (dict(reduce="sum", weights=torch.ones(3)), "weights must be \\[H\\] = \\[2\\]"),
    (dict(z=torch.zeros(4, 2, 8, dtype=torch.int32)), "z must have dtype"),
])
def test_bad_input(kwargs, match):
    args = dict(z=torch.zeros(4, 2, 8), goal=torch.zeros(1, 8), metric="l2", reduce="final", weights=None)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        latent_cost(args.pop("z"), args.pop("goal"), **args)


@pytest.mark.audit
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_audit_no_spills_no_stack():
    rows = run_audit("latent_cost_fwd")
    assert {r["kernel"] for r in rows} == {"latent_cost_fwd"}
    assert {r["target"] for r in rows} == {"sm_90a", "sm_80"}
    bad = [r for r in rows if r["error"] or r["spill_bytes"] or r["stack_bytes"] or not r["ok"]]
    assert not bad, f"latent_cost_fwd spills, uses a stack frame or fails: {bad}"
    assert max(r["registers"] for r in rows) <= 128, max(rows, key=lambda r: r["registers"])
