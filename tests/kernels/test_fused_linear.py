"""Fused (layer-norm +) linear (+ GELU + residual) and the linear goal cost: Triton kernel
(compiled on CUDA, interpreter on CPU) vs the reference, the reference vs the module chain, LayerNorm folding, errors.

Precision expected: the interpreter computes fp32 dots exactly (bf16 tiles are upcast to fp32), so
fp32 outputs match at fp32 tolerance (x4 for summation order); fp16/bf16 outputs differ from the
reference by rounding of the intermediates the reference stores in the storage dtype (layer norm
output, matmul output before GELU/residual): the dtype's tolerance x4. Compiled on a GPU, fp32 dots
are IEEE unless torch allows TF32 matmuls (``tf32=`` below names that case).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jepa_engine.kernels import fold_layernorm, fused_linear, linear_goal_cost, use_backend
from jepa_engine.kernels.fused_linear import fused_linear_reference, linear_goal_cost_reference
from tests.helpers import DTYPES, assert_close

# fp32 dots run as TF32 when compiled only where torch allows TF32 matmuls (``_launch.linear_dot_precision``).
TF32 = torch.backends.cuda.matmul.allow_tf32


def make(M, K, N, dtype=torch.float32, seed=0, G=None, device="cpu"):
    """[x, weight, bias, residual, goal] drawn on CPU from ``seed``, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * 2 + 3).to(dtype)      # a shifted mean: layer norm matters
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    r = torch.randn(M, N, generator=g).to(dtype)
    goal = torch.randn(G, N, generator=g).to(dtype) if G else None
    return tuple(t.to(device) if t is not None else None for t in (x, w, b, r, goal))


def chain(x, w, b, normalize, eps, gelu, r):
    """The naive module chain in fp32: ln, linear, gelu, +."""
    x, w = x.float(), w.float()
    h = F.layer_norm(x, (x.shape[1],), eps=eps) if normalize else x
    y = F.linear(h, w, b.float() if b is not None else None)
    y = torch.nn.GELU()(y) if gelu else y
    return y + r.float() if r is not None else y


def both(fn, *args, **kwargs):
    with torch.no_grad():
        with use_backend("triton"):
            got = fn(*args, **kwargs)
        with use_backend("reference"):
            want = fn(*args, **kwargs)
    return got, want


# --------------------------------------------------------------------------------------------------
# Reference = the module chain
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize,gelu,res,bias", [(True, True, True, True), (False, False, False, False),
                                                     (True, False, False, False), (False, True, True, True)])
def test_reference_matches_chain(normalize, gelu, res, bias):
    x, w, b, r, _ = make(13, 24, 20)
    y = fused_linear_reference(x, w, b if bias else None, normalize=normalize, eps=1e-5,
                               activation="gelu" if gelu else None, residual=r if res else None)
    assert_close(y, chain(x, w, b if bias else None, normalize, 1e-5, gelu, r if res else None), torch.float32,
                 what="reference vs chain", scale=4)


def test_reference_leaves_inputs_alone():
    x, w, b, r, _ = make(6, 8, 5)
    saved = [t.clone() for t in (x, w, b, r)]
    fused_linear_reference(x, w, b, normalize=True, activation="gelu", residual=r)
    assert all(torch.equal(a, s) for a, s in zip((x, w, b, r), saved))


@pytest.mark.parametrize("metric", ["l2", "l1"])
def test_goal_cost_reference(metric):
    x, w, b, _, goal = make(12, 16, 10, G=3)
    z, cost = linear_goal_cost_reference(x, w, b, goal, metric=metric)
    want_z = chain(x, w, b, True, 1e-6, False, None)
    diff = want_z - goal.repeat_interleave(4, dim=0)
    assert_close(z, want_z, torch.float32, what="z", scale=4)
    assert_close(cost, diff.abs().sum(-1) if metric == "l1" else diff.square().sum(-1), torch.float32,
                 what="cost", scale=4)


# --------------------------------------------------------------------------------------------------
# Kernel vs reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize,gelu,res,bias", [(True, True, True, True), (False, False, False, False),
                                                     (True, False, True, False), (False, True, False, True)])
def test_kernel_matches_reference(kernel_device, dtype, normalize, gelu, res, bias):
    M, K, N = 37, 40, 48   # M, K, N not multiples of the 16 x 16 x 32 interpreter tiles
    x, w, b, r, _ = make(M, K, N, dtype, device=kernel_device)
    y, want = both(fused_linear, x, w, b if bias else None, normalize=normalize, eps=1e-5,
                   activation="gelu" if gelu else None, residual=r if res else None)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_close(y, want, dtype, what=f"y {dtype} ln={normalize} gelu={gelu} res={res} bias={bias}", scale=4,
                 tf32=TF32)


def test_kernel_strided_views(kernel_device):
    x, w, b, _, _ = make(20, 70, 40, device=kernel_device)
    xs = x[::2, 3:3 + 33]            # row stride 140, offset start: read in place
    ws = w[:, 3:3 + 33]              # weight rows of stride 70
    y, want = both(fused_linear, xs, ws, b, normalize=True, activation="gelu")
    assert_close(y, want, torch.float32, what="strided x/weight", scale=4, tf32=TF32)
    # a residual with column stride 10: copied for the kernel
    r = torch.randn(40, 10, generator=torch.Generator().manual_seed(1)).to(kernel_device).T
    y, want = both(fused_linear, xs, ws, b, residual=r)
    assert_close(y, want, torch.float32, what="transposed residual", scale=4, tf32=TF32)


def test_kernel_single_row_and_tiny_k(kernel_device):
    x, w, b, r, _ = make(1, 3, 5, device=kernel_device)
    y, want = both(fused_linear, x, w, b, normalize=True, activation="gelu", residual=r)
    assert_close(y, want, torch.float32, what="M=1, K=3", scale=4, tf32=TF32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G,metric", [(1, "l2"), (3, "l1"), (3, "l2")])
def test_goal_cost_kernel_matches_reference(kernel_device, dtype, G, metric):
    M, K, D = 33, 24, 40      # G = 3 environments of 11 candidates; D pads to a 64-wide tile
    x, w, b, _, goal = make(M, K, D, dtype, seed=G, G=G, device=kernel_device)
    (z, cost), (want_z, want_cost) = both(linear_goal_cost, x, w, b, goal, metric=metric)
    assert z.dtype == dtype and z.shape == (M, D) and cost.dtype == torch.float32 and cost.shape == (M,)
    assert_close(z, want_z, dtype, what=f"z {dtype}", scale=4, tf32=TF32)
    # The cost is of z as stored: against the reference's cost of the kernel's own z, fp32 math.
    _, cost_of_z = linear_goal_cost_reference(z.float(), torch.eye(D, device=kernel_device), None, goal.float(),
                                              normalize=False, metric=metric)
    assert_close(cost, cost_of_z, torch.float32, what=f"cost of z {dtype}", scale=10)
    assert_close(cost, want_cost, dtype, what=f"cost {dtype}", scale=4, tf32=TF32)


def test_goal_cost_kernel_no_normalize_no_bias_strided(kernel_device):
    x, w, _, _, goal = make(16, 50, 20, G=16, device=kernel_device)
    (z, cost), (want_z, want_cost) = both(linear_goal_cost, x[:, 5:45], w[:, 5:45], None, goal, normalize=False)
    assert_close(z, want_z, torch.float32, what="z", scale=4, tf32=TF32)
    assert_close(cost, want_cost, torch.float32, what="cost", scale=4, tf32=TF32)


# --------------------------------------------------------------------------------------------------
# LayerNorm folding
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fold_layernorm(request, backend):
    # the reference on CPU; the kernel on the kernel device (skipped where none can run)
    device = request.getfixturevalue("kernel_device") if backend == "triton" else "cpu"
    torch.manual_seed(0)
    ln, lin = torch.nn.LayerNorm(24, eps=1e-5), torch.nn.Linear(24, 18)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    ln, lin = ln.to(device), lin.to(device)
    x = (torch.randn(21, 24) * 3 + 1).to(device)
    with torch.no_grad(), use_backend(backend):
        got = fused_linear(x, *fold_layernorm(ln, lin), normalize=True, eps=ln.eps)
        want = lin(ln(x))
    assert_close(got, want, torch.float32, what=f"fold {backend}", scale=10, tf32=TF32)


def test_fold_layernorm_without_affine_and_bias():
    ln, lin = torch.nn.LayerNorm(8, elementwise_affine=False), torch.nn.Linear(8, 4, bias=False)
    w, b = fold_layernorm(ln, lin)
    assert torch.equal(w, lin.weight.detach()) and torch.equal(b, torch.zeros(4))
    with pytest.raises(ValueError, match="normalized_shape"):
        fold_layernorm(torch.nn.LayerNorm(6), lin)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(x=torch.zeros(4, 8, 1)), "x must be 2-D"),
    (dict(weight=torch.zeros(6, 7)), "weight must be \\[N, K\\] with K = 8"),
    (dict(weight=torch.zeros(6, 8, dtype=torch.float16)), "weight must have the dtype of x"),
    (dict(bias=torch.zeros(5)), "bias must be \\[N\\] = \\[6\\]"),
    (dict(bias=torch.zeros(6, dtype=torch.bfloat16)), "bias must have the dtype of x"),
    (dict(residual=torch.zeros(4, 5)), "residual must be \\[M, N\\] = \\[4, 6\\]"),
    (dict(residual=torch.zeros(4, 6, dtype=torch.float16)), "residual must have the dtype of x"),
    (dict(x=torch.zeros(4, 8, dtype=torch.int32)), "x must have dtype"),
    (dict(activation="relu"), "activation must be one of"),
    (dict(eps=0.0), "eps must be a positive float"),
    (dict(x=torch.zeros(4, 8, requires_grad=True)), "x requires grad"),
    (dict(weight=torch.zeros(6, 8, requires_grad=True)), "weight requires grad"),
    (dict(x=torch.zeros(4, 8, device="meta")), "weight must be on meta"),
])
def test_fused_linear_bad_input(kwargs, match):
    args = dict(x=torch.zeros(4, 8), weight=torch.zeros(6, 8), bias=None, residual=None)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_linear(args.pop("x"), args.pop("weight"), args.pop("bias"), **args)


@pytest.mark.parametrize("kwargs,match", [
    (dict(goal=torch.zeros(3, 6)), "goal rows G = 3 must divide the rows M = 4"),
    (dict(goal=torch.zeros(2, 5)), "goal must be \\[G, D\\] with D = 6"),
    (dict(goal=torch.zeros(1, 6, dtype=torch.float16)), "goal must have the dtype of x"),
    (dict(metric="cos"), "metric must be one of"),
    (dict(goal=torch.zeros(1, 6, requires_grad=True)), "goal requires grad"),
])
def test_goal_cost_bad_input(kwargs, match):
    args = dict(x=torch.zeros(4, 8), weight=torch.zeros(6, 8), bias=torch.zeros(6), goal=torch.zeros(2, 6))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        linear_goal_cost(args.pop("x"), args.pop("weight"), args.pop("bias"), args.pop("goal"), **args)


def test_goal_cost_kernel_rejects_wide_embeddings(kernel_device):
    x, w, b, _, goal = make(4, 8, 300, G=1, device=kernel_device)
    with use_backend("triton"), pytest.raises(ValueError, match="D <= 256"):
        linear_goal_cost(x, w, b, goal)
    with use_backend("reference"):          # the reference has no width limit
        z, cost = linear_goal_cost(x, w, b, goal)
    assert z.shape == (4, 300) and cost.shape == (4,)


def test_requires_grad_allowed_without_grad_mode():
    x, w, b, r, _ = make(4, 8, 6)
    w.requires_grad_(True)
    with torch.no_grad():
        y = fused_linear(x, w, b, residual=r)
    assert y.shape == (4, 6) and not y.requires_grad
