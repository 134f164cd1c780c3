"""Two pieces of a world model's predictor step for batches of planning candidates, one launch each.

``window_attention`` (attention over a few-token window, many candidates)::

    qkv [B*L, 3C]  rows (candidate b, token i) = (b, i): queries, keys, values of C = heads * head_dim
    prefix [E, P, 2C] or None: keys, values of the P tokens every candidate of environment e shares
                   (candidate b belongs to environment b // (B // E))
    o[b, i] = softmax(q[b, i] . [prefix_k[e]; k[b, j <= i's frame]] * scale) @ [prefix_v[e]; v[b, ...]]

Token i belongs to frame ``i // frame_tokens``; a query sees every prefix key and the keys of its own
candidate whose frame is not later than its own (frame-causal). ``last_only`` computes the last query
row of each candidate only (``o [B, C]``). Every query sees at least its candidate's first key, so
no row is empty.

``fused_mlp`` (a transformer block's MLP with its residual)::

    y = x + gelu(LN0(x) @ w1.T + b1) @ w2.T + b2        x [M, C], w1 [F, C], w2 [C, F]

with ``LN0`` the layer norm without affine (fold gamma/beta into w1, b1 with ``fold_layernorm``).
The hidden activations never leave the chip; they are rounded to x's dtype before the second product,
as two ``fused_linear`` calls round them.

Why these kernels: the planners' rollout (``jepa_engine.planning.rollout``) runs one predictor step
for E x N candidates over windows of at most ``2 * history`` tokens. Through PyTorch that step is a
concatenation of shared and own keys, a head transpose, SDPA with a mask tensor, a copy back and two
MLP launches per block; here it is two launches per block besides the qkv and projection linears.

Work per launch. A window holds a handful of tokens (6 for LeWorldModel's history of 3), far below a
tensor-core tile (16 on each side): packing candidates into one tile would compute a block-diagonal
score matrix whose useful part is L / 16 or less. The window kernel therefore flattens (candidate,
token) query rows into ``BLOCK_R``-row tiles and walks the keys one at a time on the FMA units (score
= a row-wise product and sum, online softmax), so the launched work is the useful work plus the
frame-causal keys a query skips (at most ``L / 2`` of them: launched/useful < 2) and the tail tile.
Its FLOPs are about 2% of a step's (the linears run on tensor cores). The MLP kernel runs both
products on tensor cores (``tl.dot``, fp32 as IEEE or TF32 as the caller's precision asks, fp16/bf16
with fp32 accumulation); its launched work is the useful work up to the padding of C to a power of 2.

Inference only (no backward); both raise when an input requires grad in grad mode. The references
are the specification and the CPU path.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from . import _launch, _native
from ._launch import tl, triton
from ._registry import KernelSpec, LaunchConfig, register_kernel, signature

OP_ATTN = "window_attention"
OP_MLP = "fused_mlp"
MAX_WINDOW = 64          # tokens per candidate window (the key loop is unrolled by nothing; any L works)
MAX_MLP_WIDTH = 512      # C of fused_mlp: one program holds a [BLOCK_M, next_pow2(C)] fp32 accumulator


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _online_step(s, v, m, l_sum, acc):
    """One key of an online softmax: scores ``s [R]`` (log2 units), value rows ``v [R, D]``."""
    m_new = tl.maximum(m, s)
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new)
    return m_new, l_sum * alpha + p, acc * alpha[:, None] + p[:, None] * v


@triton.jit
def _window_attention_kernel(
    qkv_ptr, pre_ptr, o_ptr,
    R, L, P, per_env, C, HD, stride_qkv, stride_pre_e, stride_pre_p, stride_o, scale_log2,
    FRAME: tl.constexpr, LAST_ONLY: tl.constexpr, HAS_PREFIX: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)     # query rows of the output
    h = tl.program_id(1)
    row_ok = rows < R
    if LAST_ONLY:
        cand = rows
        qi = tl.zeros([BLOCK_R], dtype=tl.int64) + (L - 1)
    else:
        cand = rows // L
        qi = rows - cand * L
    d = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (d < HD)[None, :]
    col = h * HD + d[None, :]
    own = qkv_ptr + (cand * L)[:, None] * stride_qkv + col                      # key/value row 0 of the candidate
    q = tl.load(qkv_ptr + (cand * L + qi)[:, None] * stride_qkv + col, mask=ok, other=0.0).to(tl.float32)
    q = q * scale_log2                                                            # scores in log2 units
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    if HAS_PREFIX:
        pre = pre_ptr + (cand // per_env)[:, None] * stride_pre_e + col
        for j in range(P):
            k = tl.load(pre + j * stride_pre_p, mask=ok, other=0.0).to(tl.float32)
            v = tl.load(pre + j * stride_pre_p + C, mask=ok, other=0.0).to(tl.float32)
            m, l_sum, acc = _online_step(tl.sum(q * k, axis=1), v, m, l_sum, acc)
    q_frame = qi // FRAME
    for j in range(L):
        k = tl.load(own + j * stride_qkv + C, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(own + j * stride_qkv + 2 * C, mask=ok, other=0.0).to(tl.float32)
        s = tl.where(q_frame >= j // FRAME, tl.sum(q * k, axis=1), float("-inf"))
        m, l_sum, acc = _online_step(s, v, m, l_sum, acc)
    o = acc / l_sum[:, None]
    tl.store(o_ptr + rows[:, None] * stride_o + col, o.to(o_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _fused_mlp_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, y_ptr,
    M, C, FH, stride_xm, stride_ym, eps,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    r = tl.arange(0, BLOCK_M)
    row_ok = r < M - row0
    x_tile = x_ptr + row0 * stride_xm + r * stride_xm
    # Row statistics of x over its C columns (fp32, sums about the row's first element).
    c0 = tl.load(x_tile, mask=row_ok, other=0.0).to(tl.float32)
    s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a_ok = row_ok[:, None] & (ks < C)[None, :]
        dx = tl.where(a_ok, tl.load(x_tile[:, None] + ks[None, :], mask=a_ok, other=0.0).to(tl.float32)
                      - c0[:, None], 0.0)
        s1 += tl.sum(dx, axis=1)
        s2 += tl.sum(dx * dx, axis=1)
    m1 = s1 / C
    mean = c0 + m1
    rstd = 1.0 / tl.sqrt(tl.maximum(s2 / C - m1 * m1, 0.0) + eps)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for h0 in range(0, FH, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < FH
        hid = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < C
            a_ok = row_ok[:, None] & k_ok[None, :]
            a = tl.load(x_tile[:, None] + ks[None, :], mask=a_ok, other=0.0)
            # w1^T tile [BLOCK_K, BLOCK_H]: element (k, f) is w1[f, k].
            w = tl.load(w1_ptr + hs[None, :] * C + ks[:, None], mask=k_ok[:, None] & h_ok[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            an = tl.where(a_ok, (a.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0).to(w.dtype)
            hid += tl.dot(an, w, input_precision=PRECISION)
        hid += tl.load(b1_ptr + hs, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        hid = 0.5 * hid * (1.0 + tl.math.erf(hid * 0.7071067811865476))
        # w2^T tile [BLOCK_H, BLOCK_C]: element (f, c) is w2[c, f]; the hidden rounded to the storage dtype.
        w2 = tl.load(w2_ptr + cols[None, :] * FH + hs[:, None], mask=h_ok[:, None] & col_ok[None, :], other=0.0)
        hq = hid.to(y_ptr.dtype.element_ty)
        if UPCAST:
            w2 = w2.to(tl.float32)
            hq = hq.to(tl.float32)
        acc += tl.dot(hq.to(w2.dtype), w2, input_precision=PRECISION)
    ok = row_ok[:, None] & col_ok[None, :]
    acc += tl.load(b2_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc += tl.load(x_tile[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row0 * stride_ym + (r[:, None] * stride_ym + cols[None, :]),
             acc.to(y_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------
# Launch tables
# --------------------------------------------------------------------------------------------------
# window_attention, by head-dim tile: BLOCK_R query rows x BLOCK_D head columns, fp32 registers
# (q, the running output and one key/value row each: 4 x BLOCK_R x BLOCK_D / threads values).
_ATTN_CONFIGS = {
    ("fp32", 32): LaunchConfig({"BLOCK_R": 64}, num_warps=4, num_stages=1),
    ("fp32", 64): LaunchConfig({"BLOCK_R": 16}, num_warps=4, num_stages=1),
    ("fp32", 128): LaunchConfig({"BLOCK_R": 16}, num_warps=4, num_stages=1),
    ("16bit", 32): LaunchConfig({"BLOCK_R": 64}, num_warps=4, num_stages=1),
    ("16bit", 64): LaunchConfig({"BLOCK_R": 16}, num_warps=4, num_stages=1),
    ("16bit", 128): LaunchConfig({"BLOCK_R": 16}, num_warps=4, num_stages=1),
}
# fused_mlp, by the output tile BLOCK_C = next_pow2(C) (>= 32): the [BLOCK_M, BLOCK_C] fp32 accumulator
# stays in registers across the hidden loop, so wide rows take narrower hidden chunks and 8 warps.
# Chosen from the compiles that neither spill nor use a stack frame on sm_90a and sm_80.
_MLP_CONFIGS = {
    ("16bit", 64): LaunchConfig({"BLOCK_M": 64, "BLOCK_H": 32, "BLOCK_K": 32}, num_warps=8, num_stages=2),
    ("16bit", 128): LaunchConfig({"BLOCK_M": 64, "BLOCK_H": 32, "BLOCK_K": 32}, num_warps=8, num_stages=2),
    ("16bit", 256): LaunchConfig({"BLOCK_M": 64, "BLOCK_H": 32, "BLOCK_K": 32}, num_warps=8, num_stages=2),
    ("16bit", 512): LaunchConfig({"BLOCK_M": 32, "BLOCK_H": 16, "BLOCK_K": 32}, num_warps=8, num_stages=2),
    ("fp32", 64): LaunchConfig({"BLOCK_M": 32, "BLOCK_H": 32, "BLOCK_K": 16}, num_warps=4, num_stages=2),
    ("fp32", 128): LaunchConfig({"BLOCK_M": 32, "BLOCK_H": 32, "BLOCK_K": 16}, num_warps=4, num_stages=2),
    ("fp32", 256): LaunchConfig({"BLOCK_M": 32, "BLOCK_H": 32, "BLOCK_K": 16}, num_warps=8, num_stages=2),
    ("fp32", 512): LaunchConfig({"BLOCK_M": 32, "BLOCK_H": 16, "BLOCK_K": 16}, num_warps=8, num_stages=2),
}


# The tuner's candidates beside each table entry (kernels/tuning.py): fewer values per thread than the
# entry (smaller tiles or more warps), so that none spills where the entry does not.
_ATTN_SEARCH = _launch.search_space(_ATTN_CONFIGS, {
    (cls, d): _launch.candidates("BLOCK_R", *rows) for cls in ("fp32", "16bit") for d, rows in (
        (32, ((32, 4, 1), (64, 8, 1))), (64, ((32, 8, 1), (8, 4, 1))), (128, ((8, 4, 1), (16, 8, 1))))})
_MLP_SEARCH = _launch.search_space(_MLP_CONFIGS, {
    **{("16bit", c): _launch.candidates("BLOCK_M,BLOCK_H,BLOCK_K", (32, 32, 32, 4, 2), (64, 32, 32, 8, 3))
       for c in (64, 128)},
    ("16bit", 256): _launch.candidates("BLOCK_M,BLOCK_H,BLOCK_K", (64, 32, 32, 8, 3)),   # 32 x 32 x 32 w4 spills
    **{("fp32", c): _launch.candidates("BLOCK_M,BLOCK_H,BLOCK_K", (16, 32, 16, 4, 2), (32, 16, 16, 4, 2))
       for c in (64, 128)},
})


def _attn_config(dtype: torch.dtype, head_dim: int, cuda: bool = False) -> tuple[LaunchConfig, int]:
    """``(config, BLOCK_D)`` of a head dim (``cuda``: the CUDA table's, even under the interpreter)."""
    block_d = max(16, _launch.next_power_of_2(head_dim))
    interp = None if cuda else LaunchConfig({"BLOCK_R": 16}, num_warps=4, num_stages=1)
    return _launch.pick_config(_ATTN_CONFIGS, dtype, max(32, block_d), interpret=interp,
                               kernel="window_attention"), block_d


def _mlp_config(dtype: torch.dtype, C: int, cuda: bool = False) -> tuple[LaunchConfig, int]:
    """``(config, BLOCK_C)`` of a width C (``cuda``: the CUDA table's, even under the interpreter)."""
    block_c = max(32, _launch.next_power_of_2(C))
    interp = None if cuda else LaunchConfig({"BLOCK_M": 16, "BLOCK_H": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)
    return _launch.pick_config(_MLP_CONFIGS, dtype, max(64, block_c), interpret=interp, kernel="fused_mlp"), block_c


def window_attention_forward(qkv, prefix, heads: int, per_env: int, frame_tokens: int, L: int, last_only: bool,
                             scale: float) -> torch.Tensor:
    C = qkv.shape[1] // 3
    B = qkv.shape[0] // L
    R = B if last_only else B * L
    hd = C // heads
    o = torch.empty((R, C), device=qkv.device, dtype=qkv.dtype)
    cfg, block_d = _attn_config(qkv.dtype, hd)
    grid = (_launch.cdiv(R, cfg.constexprs["BLOCK_R"]), heads)
    P = prefix.shape[1] if prefix is not None else 0
    _window_attention_kernel[grid](
        qkv, prefix if prefix is not None else qkv, o,
        R, L, P, per_env, C, hd, _launch.row_stride(qkv),
        prefix.stride(0) if prefix is not None else 0, prefix.stride(1) if prefix is not None else 0, C,
        float(scale) * 1.4426950408889634,
        FRAME=int(frame_tokens), LAST_ONLY=bool(last_only), HAS_PREFIX=prefix is not None and P > 0,
        UPCAST=_launch.upcast_bf16(qkv.dtype), BLOCK_D=block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.constexprs,
    )
    return o


def fused_mlp_forward(x, w1, b1, w2, b2, eps: float) -> torch.Tensor:
    M, C = x.shape
    FH = w1.shape[0]
    y = torch.empty((M, C), device=x.device, dtype=x.dtype)
    cfg, block_c = _mlp_config(x.dtype, C)
    grid = (_launch.cdiv(M, cfg.constexprs["BLOCK_M"]),)
    _fused_mlp_kernel[grid](
        x, w1, b1, w2, b2, y, M, C, FH, _launch.row_stride(x), C, float(eps),
        UPCAST=_launch.upcast_bf16(x.dtype), PRECISION=_launch.linear_dot_precision(x.dtype), BLOCK_C=block_c,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.constexprs,
    )
    return y


# --------------------------------------------------------------------------------------------------
# Audit registration: every dtype; the MLP at fp32 IEEE and TF32 (tensor cores), fp16/bf16.
# --------------------------------------------------------------------------------------------------
def _attn_variants():
    out = {}
    for dtype, name in _launch.TYPE_NAMES.items():
        sig = signature(_window_attention_kernel, f"*{name}", {"scale_log2": "fp32"})
        for bd in (32, 64, 128):
            out[f"{name}/d{bd}/prefix"] = (sig, {"FRAME": 2, "LAST_ONLY": False, "HAS_PREFIX": True,
                                                  "UPCAST": False, "BLOCK_D": bd})
        out[f"{name}/d64/last"] = (sig, {"FRAME": 2, "LAST_ONLY": True, "HAS_PREFIX": False, "UPCAST": False,
                                         "BLOCK_D": 64})
    return out


def _attn_variant_keys(variant: str) -> list[tuple]:
    """The table key of an audit label ``"<dtype>/d<BLOCK_D>/..."``."""
    cls = _launch.dtype_class(_launch.NAMED_DTYPES[variant.split("/")[0]])
    return [(cls, max(32, int(variant.split("/")[1][1:])))]


def _attn_variant_configs(variant: str) -> list[LaunchConfig]:
    return [_ATTN_CONFIGS[key] for key in _attn_variant_keys(variant)]


def _mlp_variants():
    out = {}
    for dtype, name in _launch.TYPE_NAMES.items():
        sig = signature(_fused_mlp_kernel, f"*{name}", {"eps": "fp32"})
        for bc in (64, 128, 256, 512):
            out[f"{name}/c{bc}"] = (sig, {"UPCAST": False, "BLOCK_C": bc,
                                          "PRECISION": _launch.dot_precision(dtype, allow_tf32=False)})
            if dtype == torch.float32:
                out[f"fp32/tf32/c{bc}"] = (sig, {"UPCAST": False, "BLOCK_C": bc, "PRECISION": "tf32"})
    return out


def _mlp_variant_keys(variant: str) -> list[tuple]:
    """The table key of an audit label ``"<dtype>[/tf32]/c<BLOCK_C>"``."""
    cls = _launch.dtype_class(_launch.NAMED_DTYPES[variant.split("/")[0]])
    return [(cls, int(variant.split("/")[-1][1:]))]


def _mlp_variant_configs(variant: str) -> list[LaunchConfig]:
    return [_MLP_CONFIGS[key] for key in _mlp_variant_keys(variant)]


if _launch.triton_available():
    register_kernel(KernelSpec("window_attention", _window_attention_kernel, _attn_variants(),
                               _attn_variant_configs, uses_tensor_cores=False, aligned_args=("o_ptr",),
                               search_space=_ATTN_SEARCH, search_keys=_attn_variant_keys))
    register_kernel(KernelSpec("fused_mlp", _fused_mlp_kernel, _mlp_variants(), _mlp_variant_configs,
                               uses_tensor_cores=True, aligned_args=("y_ptr",), search_space=_MLP_SEARCH,
                               search_keys=_mlp_variant_keys))


# --------------------------------------------------------------------------------------------------
# References (the specification and the CPU path)
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _window_mask(L: int, P: int, frame_tokens: int, last_only: bool, device: torch.device) -> torch.Tensor:
    f = torch.arange(L, device=device) // frame_tokens
    own = f[None, :] <= f[:, None]
    m = torch.cat([own.new_ones(L, P), own], dim=1)
    return m[-1:] if last_only else m


def window_attention_reference(qkv: torch.Tensor, prefix: Optional[torch.Tensor], heads: int, per_env: int,
                               frame_tokens: int, L: int, last_only: bool = False,
                               scale: Optional[float] = None) -> torch.Tensor:
    """SDPA over each candidate's window with the frame-causal mask (see the module docstring)."""
    C = qkv.shape[1] // 3
    B = qkv.shape[0] // L
    hd = C // heads
    scale = hd ** -0.5 if scale is None else scale
    t = qkv.view(B, L, 3, heads, hd)
    q, k, v = (t[:, :, i].transpose(1, 2) for i in range(3))                      # [B, heads, L, hd]
    P = prefix.shape[1] if prefix is not None else 0
    if P:
        pk = prefix[..., :C].reshape(-1, P, heads, hd).transpose(1, 2).repeat_interleave(per_env, 0)
        pv = prefix[..., C:].reshape(-1, P, heads, hd).transpose(1, 2).repeat_interleave(per_env, 0)
        k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    if last_only:
        q = q[:, :, -1:]
    mask = _window_mask(L, P, frame_tokens, last_only, qkv.device)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return o.transpose(1, 2).reshape(-1, C)


def fused_mlp_reference(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                        eps: float = 1e-6) -> torch.Tensor:
    """``x + gelu(LN0(x) @ w1.T + b1) @ w2.T + b2``, the hidden in x's dtype."""
    hidden = F.gelu(torch.addmm(b1, F.layer_norm(x, (x.shape[1],), eps=eps), w1.t()))
    return torch.addmm(b2, hidden, w2.t()).add_(x)


# --------------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------------
SCHEMA_ATTN = ("window_attention(Tensor qkv, Tensor? prefix, int heads, int per_env, int frame_tokens, int L, "
               "bool last_only, float scale) -> Tensor")
SCHEMA_MLP = "fused_mlp(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, float eps) -> Tensor"


def _attn_kernel(qkv, prefix, heads, per_env, frame_tokens, L, last_only, scale):
    if _launch.backend_for(OP_ATTN, qkv.device) == "triton":
        return window_attention_forward(qkv, prefix, heads, per_env, frame_tokens, L, last_only, scale)
    return window_attention_reference(qkv, prefix, heads, per_env, frame_tokens, L, last_only, scale)


def _attn_fake(qkv, prefix, heads, per_env, frame_tokens, L, last_only, scale):
    B = qkv.shape[0] // L
    return qkv.new_empty((B if last_only else B * L, qkv.shape[1] // 3))


def _mlp_kernel(x, w1, b1, w2, b2, eps):
    if _launch.backend_for(OP_MLP, x.device) == "triton":
        return fused_mlp_forward(x, w1, b1, w2, b2, eps)
    return fused_mlp_reference(x, w1, b1, w2, b2, eps)


def _mlp_fake(x, w1, b1, w2, b2, eps):
    return x.new_empty(x.shape)


_window_attention_op = _native.Op(OP_ATTN, SCHEMA_ATTN, _attn_kernel, _attn_fake)
_fused_mlp_op = _native.Op(OP_MLP, SCHEMA_MLP, _mlp_kernel, _mlp_fake)


def window_attention(qkv: torch.Tensor, prefix: Optional[torch.Tensor], *, heads: int, window: int,
                     frame_tokens: int = 2, last_only: bool = False, scale: Optional[float] = None) -> torch.Tensor:
    """Frame-causal attention of many candidates over their own few-token windows and a shared prefix.

    Args:
        qkv: ``[B * window, 3C]`` (fp32, fp16, bf16; column stride 1, any row stride): each candidate's
            ``window`` consecutive rows, queries in columns ``[0, C)``, keys ``[C, 2C)``, values ``[2C, 3C)``.
        prefix: ``[E, P, 2C]`` keys then values of tokens shared by ``B // E`` consecutive candidates
            (E dividing B; column stride 1, any row and batch stride), or None.
        heads: C = heads * head_dim.
        window: L, the tokens per candidate (at most 64).
        frame_tokens: tokens per frame of the frame-causal mask.
        last_only: compute the last query row of each candidate only.
        scale: the score scale (default ``head_dim ** -0.5``).

    Returns:
        ``[B * L, C]`` (``[B, C]`` with ``last_only``) in qkv's dtype. Inference only.
    """
    op, check = OP_ATTN, _launch.check_tensor
    check(op, "qkv", qkv, ndim=2, dtypes=_launch.FLOAT_DTYPES)
    for name, v, lo, hi in (("heads", heads, 1, None), ("window", window, 1, MAX_WINDOW),
                            ("frame_tokens", frame_tokens, 1, None)):
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)):
            raise ValueError(f"{op}: {name} must be an int >= {lo}" + (f" and <= {hi}" if hi else "") + f", got {v!r}")
    rows, width = qkv.shape
    if width % 3 or (width // 3) % heads:
        raise ValueError(f"{op}: qkv must be [B * window, 3C] with C divisible by heads = {heads}, got "
                         f"{list(qkv.shape)}")
    if rows % window:
        raise ValueError(f"{op}: qkv's rows must be a multiple of window = {window}, got {list(qkv.shape)}")
    if qkv.stride(1) != 1:
        raise ValueError(f"{op}: qkv must have column stride 1, got strides {list(qkv.stride())}")
    C, B = width // 3, rows // window
    per_env = B
    if prefix is not None:
        check(op, "prefix", prefix, ndim=3, dtypes=_launch.FLOAT_DTYPES, device=qkv.device)
        _launch.check_same_dtype(op, "prefix", prefix, "qkv", qkv)
        E = prefix.shape[0]
        if prefix.shape[2] != 2 * C or B % E or prefix.stride(2) != 1:
            raise ValueError(f"{op}: prefix must be [E, P, 2C] = [E, P, {2 * C}] with E dividing B = {B} and column "
                             f"stride 1, got {list(prefix.shape)} (strides {list(prefix.stride())})")
        per_env = B // E
    if scale is None:
        scale = (C // heads) ** -0.5
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"{op}: scale must be a positive float, got {scale!r}")
    _launch.check_inference_only(op, {"qkv": qkv, "prefix": prefix})
    if _launch.backend_for(op, qkv.device) == "reference":
        return window_attention_reference(qkv, prefix, heads, per_env, frame_tokens, window, last_only, float(scale))
    return _window_attention_op(qkv, prefix, heads, per_env, frame_tokens, window, bool(last_only), float(scale))


def fused_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, *,
              eps: float = 1e-6) -> torch.Tensor:
    """``x + gelu(LN0(x) @ w1.T + b1) @ w2.T + b2`` in one kernel (see the module docstring).

    Args:
        x: ``[M, C]`` (fp32, fp16, bf16; column stride 1, any row stride), C <= 512.
        w1: ``[F, C]``, b1 ``[F]``, w2 ``[C, F]``, b2 ``[C]``: contiguous, x's dtype and device.
        eps: the layer norm's epsilon.

    Returns:
        ``[M, C]`` in x's dtype. Inference only.
    """
    op, check = OP_MLP, _launch.check_tensor
    check(op, "x", x, ndim=2, dtypes=_launch.FLOAT_DTYPES)
    M, C = x.shape
    check(op, "w1", w1, ndim=2, dtypes=_launch.FLOAT_DTYPES, device=x.device)
    FH = w1.shape[0]
    for name, t, shape, what in (("w1", w1, (FH, C), "[F, C]"), ("b1", b1, (FH,), "[F]"),
                                 ("w2", w2, (C, FH), "[C, F]"), ("b2", b2, (C,), "[C]")):
        check(op, name, t, dtypes=_launch.FLOAT_DTYPES, device=x.device)
        _launch.check_same_dtype(op, name, t, "x", x)
        _launch.check_shape(op, name, t, shape, what)
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous, got strides {list(t.stride())}")
    if x.stride(1) != 1 and C > 1:
        raise ValueError(f"{op}: x must have column stride 1, got strides {list(x.stride())}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"{op}: eps must be a positive float, got {eps!r}")
    _launch.check_inference_only(op, {"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2})
    if _launch.backend_for(op, x.device) == "reference":
        return fused_mlp_reference(x, w1, b1, w2, b2, float(eps))
    if C > MAX_MLP_WIDTH:
        raise ValueError(f"{op}: the kernel takes C <= {MAX_MLP_WIDTH} columns (one output tile), got x "
                         f"{list(x.shape)}")
    return _fused_mlp_op(x, w1, b1, w2, b2, float(eps))
