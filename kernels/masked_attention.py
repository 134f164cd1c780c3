"""Fused masked attention for JEPA models (FlashAttention-2 style forward and backward).

Math, per batch b and head h (``scale`` defaults to ``D ** -0.5``)::

    S[i, j]  = scale * <q[i], k[j]>                        if allowed(b, i, j) else -inf
    P[i, :]  = softmax(S[i, :])                            (a row with no allowed key: P[i, :] = 0)
    out[i]   = sum_j P[i, j] v[j]

``allowed`` is the AND of the mask kinds given:

- dense: every key (no mask argument);
- key padding: ``key_padding[b, j]`` (bool ``[B, N_k]``, True = visible);
- varlen packing: ``cu_seqlens`` (int32 ``[B+1]``, starts at 0, non-decreasing, ends at the token
  total); q, k, v are ``[T, H, D]`` and token ``i`` of sequence b sees only the keys of sequence b;
- frame-causal: frames of ``L = frame_size + frame_extra_tokens`` consecutive tokens (patch tokens
  plus action/state tokens of the same frame); query i sees key j iff ``j // L <= i // L``. Key
  blocks after the last frame a query block can see are never visited (loop bounds), and in the
  backward query blocks before the first frame that sees a key block are never visited;
- index set: ``keep_index[b, s]`` (int ``[B, K]``) names the visible key positions; K/V rows are read
  straight through the index (gathered pointer loads, no gathered copy); ``-1`` marks an unused slot
  so samples can keep different numbers of keys. Indices must be in ``[-1, N_k)`` and the
  non-negative ones distinct per sample (validated), so the mask equals the boolean mask "j is in
  keep_index[b]" and dK/dV are scattered back to the selected rows with plain stores (rows not
  selected get zero gradient).

Combinations: key padding + frame-causal, varlen + frame-causal (frame positions counted from each
sequence's start). A query row whose keys are all masked returns zeros and gets zero gradients.

Shapes and dtypes: q ``[B, H, N_q, D]``, k and v ``[B, H, N_k, D]`` (``[T, H, D]`` with cu_seqlens),
fp16, bf16 or fp32, any head dim D from 1 to 256: D runs in the next power-of-two tile of 16 to 256
columns (``HEAD_DIM_TILES``) with the columns past D masked (96, 80, 88 and 104 in 128, 160 in 256). Any strides with a unit last-dim stride are read in place (the slices of a fused
qkv projection need no copy). Softmax statistics and accumulation are fp32; fp16/bf16 dots run on
tensor cores with fp32 accumulation; fp32 dots use ``input_precision="ieee"`` (no TF32), so fp32
matches the reference at fp32 tolerance. The output of the 4-D form is laid out ``[B, N_q, H, D]`` in
memory (returned as a ``[B, H, N_q, D]`` view) so ``out.transpose(1, 2).reshape(B, N_q, H * D)`` is free.

Forward: grid ``(cdiv(N_q, BLOCK_M), B * H)``; one pass over the allowed key blocks with the online
softmax; saves the log-sum-exp per query row (base 2, +inf for fully masked rows, so the backward
recomputes P = 0 there). Backward: a preprocess kernel computes delta = rowsum(dO * O); one kernel
then computes, per program, dK/dV for one key block (looping over query blocks) and dQ for one query
block (looping over key blocks), recomputing P from the log-sum-exp. No atomics: deterministic.
Batch/head offsets are int64 (B * H * N * D may exceed 2^31); offsets within one sequence are
int32 (one sequence's N * token stride must stay below 2^31).

Precision on a GPU: fp16/bf16 as FlashAttention (P rounded to the input dtype before the PV dot);
fp32 forward exact (IEEE dots), fp32 backward with TF32 dots (IEEE ones spill at every tile size).

``dropout_p`` must be 0.0 (attention dropout is not implemented; JEPA encoders train without it).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import _launch, _native, routes
from ._launch import tl, triton
from ._registry import KernelSpec, LaunchConfig, register_kernel, signature

OP = "masked_attention"
# Head-dim tiles (BLOCK_D): a head dim D in [1, MAX_HEAD_DIM] runs in the smallest tile >= D.
HEAD_DIM_TILES = (16, 32, 64, 128, 256)
MAX_HEAD_DIM = HEAD_DIM_TILES[-1]
INDEX_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _base(ptr, b, h, start, stride_b, stride_h, stride_n):
    """The pointer to (batch b, head h, token start): int64 offsets."""
    return ptr + b * stride_b + h * stride_h + start * stride_n


@triton.jit
def _load_tile(ptr, rows, row_ok, stride_n, offs_d, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """A [rows, BLOCK_D] tile at ``ptr + rows * stride_n + d``; columns >= HEAD_DIM read as 0."""
    ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    x = tl.load(ptr + rows[:, None] * stride_n + offs_d[None, :], mask=ok, other=0.0)
    if UPCAST:  # the interpreter's bf16 arithmetic is wrong: compute on fp32 copies there
        x = x.to(tl.float32)
    return x


@triton.jit
def _key_rows(slots, n_k, kpad_ptr, kidx_ptr, stride_pb, stride_ib, b,
              PAD: tl.constexpr, INDEX: tl.constexpr):
    """Key rows (positions) of a block of key slots and whether each is visible.

    Slots are key positions, except with an index set, where slot s reads position keep_index[b, s].
    """
    in_range = slots < n_k
    if INDEX:
        rows = tl.load(kidx_ptr + b * stride_ib + slots, mask=in_range, other=-1)
        ok = rows >= 0
        rows = tl.where(ok, rows, 0)
    else:
        rows = slots
        ok = in_range
    if PAD:
        ok = ok & (tl.load(kpad_ptr + b * stride_pb + rows, mask=ok, other=0) != 0)
    return rows, ok


@triton.jit
def _allowed(q_pos, q_ok, k_pos, k_ok, frame_len, FRAME: tl.constexpr):
    """[BLOCK_M, BLOCK_N] boolean: query q_pos may attend key k_pos."""
    ok = q_ok[:, None] & k_ok[None, :]
    if FRAME:
        ok = ok & ((k_pos // frame_len)[None, :] <= (q_pos // frame_len)[:, None])
    return ok


@triton.jit
def _batch_head(bh0, H):
    """(batch, head) of this program, int64: bases (B * H * N * D) may exceed 2^31, while offsets
    inside one sequence stay int32, so positions, frame arithmetic and masks stay 32-bit (64-bit
    division would be a slow call). Launches over more than 65535 (batch, head) pairs come in chunks
    starting at ``bh0``."""
    bh = tl.program_id(1) + bh0
    return (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def _seq_bounds(cu_ptr, b, N_Q, N_K, VARLEN: tl.constexpr):
    """(first token, query count, key-slot count) of sequence b."""
    if VARLEN:
        start = tl.load(cu_ptr + b)
        n = tl.load(cu_ptr + b + 1) - start
        return start.to(tl.int64), n, n
    else:
        zero = tl.zeros([], dtype=tl.int32)
        return zero.to(tl.int64), zero + N_Q, zero + N_K


@triton.jit
def _masked_attention_fwd_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, kpad_ptr, cu_ptr, kidx_ptr,
    # strides (elements): batch, head, token; the head-dim stride is 1
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    stride_lb, stride_lh, stride_pb, stride_ib,
    # sizes: heads, queries, key slots (positions, or index-set size), frame length, softmax scale
    H, N_Q, N_K, frame_len, qk_scale, bh0,
    # meta-parameters: mask kinds, precision switches, tiles
    PAD: tl.constexpr, VARLEN: tl.constexpr, FRAME: tl.constexpr, INDEX: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b, h = _batch_head(bh0, H)
    start, n_q, n_k = _seq_bounds(cu_ptr, b, N_Q, N_K, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= n_q:  # varlen: this sequence is shorter than the longest one
        return

    # Base pointers of this (batch, head); tokens are addressed relative to the sequence start.
    q_base = _base(q_ptr, b, h, start, stride_qb, stride_qh, stride_qn)
    k_base = _base(k_ptr, b, h, start, stride_kb, stride_kh, stride_kn)
    v_base = _base(v_ptr, b, h, start, stride_vb, stride_vh, stride_vn)
    o_base = _base(o_ptr, b, h, start, stride_ob, stride_oh, stride_on)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_m < n_q
    q = _load_tile(q_base, offs_m, q_ok, stride_qn, offs_d, HEAD_DIM, UPCAST)

    # Frame-causal: the last key this query block may see ends the frame of its last query.
    hi = n_k
    if FRAME:
        last_q = tl.minimum(m0 + BLOCK_M, n_q) - 1
        hi = tl.minimum(hi, (last_q // frame_len + 1) * frame_len)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        slots = n0 + tl.arange(0, BLOCK_N)
        k_pos, k_ok = _key_rows(slots, hi, kpad_ptr, kidx_ptr, stride_pb, stride_ib, b, PAD, INDEX)
        k = _load_tile(k_base, k_pos, k_ok, stride_kn, offs_d, HEAD_DIM, UPCAST)
        v = _load_tile(v_base, k_pos, k_ok, stride_vn, offs_d, HEAD_DIM, UPCAST)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(_allowed(offs_m, q_ok, k_pos, k_ok, frame_len, FRAME), s, float("-inf"))
        # Online softmax (base 2). A row with nothing visible yet keeps m = -inf; shifting by 0
        # there keeps exp2 finite (exp2(-inf) = 0) instead of producing NaN from -inf - -inf.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # Rows with no visible key: l = 0 -> output 0 and lse = +inf (the backward's P is then 0).
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o_ok = q_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=o_ok)
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + start + offs_m, lse, mask=q_ok)


@triton.jit
def _masked_attention_bwd_preprocess_kernel(
    # pointers
    o_ptr, do_ptr, delta_ptr, cu_ptr,
    # strides (elements)
    stride_ob, stride_oh, stride_on, stride_db, stride_dh, stride_dn, stride_lb, stride_lh,
    # sizes
    H, N_Q, bh0,
    # meta-parameters
    VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[i] = sum_d dO[i, d] * O[i, d] in fp32 (the softmax-backward row term)."""
    pid_m = tl.program_id(0)
    b, h = _batch_head(bh0, H)
    start, n_q, _n_k = _seq_bounds(cu_ptr, b, N_Q, N_Q, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= n_q:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_m < n_q
    ok = q_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    o_base = _base(o_ptr, b, h, start, stride_ob, stride_oh, stride_on)
    do_base = _base(do_ptr, b, h, start, stride_db, stride_dh, stride_dn)
    o = tl.load(o_base + offs_m[:, None] * stride_on + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    do = tl.load(do_base + offs_m[:, None] * stride_dn + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(delta_ptr + b * stride_lb + h * stride_lh + start + offs_m, tl.sum(o * do, axis=1), mask=q_ok)


@triton.jit
def _masked_attention_bwd_kernel(
    # pointers: inputs, saved forward results, gradients (dq, dk, dv share q/k/v's contiguous layout)
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr, kpad_ptr, cu_ptr, kidx_ptr,
    # strides (elements): batch, head, token
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
    stride_gqb, stride_gqh, stride_gqn, stride_gkb, stride_gkh, stride_gkn,
    stride_lb, stride_lh, stride_pb, stride_ib,
    # sizes, frame length, softmax scales (qk_scale = scale * log2(e))
    H, N_Q, N_K, frame_len, qk_scale, sm_scale, bh0,
    # meta-parameters
    PAD: tl.constexpr, VARLEN: tl.constexpr, FRAME: tl.constexpr, INDEX: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (i, bh) computes dK, dV of key block i and dQ of query block i of one (batch, head).

    With P = exp2(qk_scale * q k^T - lse) recomputed and dS = P * (dO v^T - delta):
    dV = P^T dO, dK = sm_scale * dS^T q, dQ = sm_scale * dS k.
    """
    pid = tl.program_id(0)
    b, h = _batch_head(bh0, H)
    start, n_q, n_k = _seq_bounds(cu_ptr, b, N_Q, N_K, VARLEN)

    q_base = _base(q_ptr, b, h, start, stride_qb, stride_qh, stride_qn)
    k_base = _base(k_ptr, b, h, start, stride_kb, stride_kh, stride_kn)
    v_base = _base(v_ptr, b, h, start, stride_vb, stride_vh, stride_vn)
    do_base = _base(do_ptr, b, h, start, stride_db, stride_dh, stride_dn)
    stat_base = b * stride_lb + h * stride_lh + start
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM

    # ---- dK, dV for key block `pid`: loop over the query blocks that can see it ----------------
    n0 = pid * BLOCK_N
    if n0 < n_k:
        slots = n0 + tl.arange(0, BLOCK_N)
        k_pos, k_ok = _key_rows(slots, n_k, kpad_ptr, kidx_ptr, stride_pb, stride_ib, b, PAD, INDEX)
        k = _load_tile(k_base, k_pos, k_ok, stride_kn, offs_d, HEAD_DIM, UPCAST)
        v = _load_tile(v_base, k_pos, k_ok, stride_vn, offs_d, HEAD_DIM, UPCAST)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        lo = 0
        if FRAME:  # queries of frames before this block's first frame never see it
            lo = (n0 // frame_len * frame_len) // BLOCK_M * BLOCK_M
        for qm0 in range(lo, n_q, BLOCK_M):
            offs_m = qm0 + tl.arange(0, BLOCK_M)
            q_ok = offs_m < n_q
            q = _load_tile(q_base, offs_m, q_ok, stride_qn, offs_d, HEAD_DIM, UPCAST)
            do = _load_tile(do_base, offs_m, q_ok, stride_dn, offs_d, HEAD_DIM, UPCAST)
            lse = tl.load(lse_ptr + stat_base + offs_m, mask=q_ok, other=float("inf"))
            delta = tl.load(delta_ptr + stat_base + offs_m, mask=q_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.exp2(s - lse[:, None])
            p = tl.where(_allowed(offs_m, q_ok, k_pos, k_ok, frame_len, FRAME), p, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        dk = dk * sm_scale
        # Index set: scatter to the selected rows (distinct, validated); unused slots write nothing.
        g_ok = k_ok[:, None] & d_ok
        g_off = k_pos[:, None] * stride_gkn + offs_d[None, :]
        dk_base = _base(dk_ptr, b, h, start, stride_gkb, stride_gkh, stride_gkn)
        dv_base = _base(dv_ptr, b, h, start, stride_gkb, stride_gkh, stride_gkn)
        if not INDEX:
            g_ok = (slots < n_k)[:, None] & d_ok  # masked keys in range get their zero gradient
        tl.store(dk_base + g_off, dk.to(dk_ptr.dtype.element_ty), mask=g_ok)
        tl.store(dv_base + g_off, dv.to(dv_ptr.dtype.element_ty), mask=g_ok)

    # ---- dQ for query block `pid`: loop over the key blocks it can see ------------------------
    m0 = pid * BLOCK_M
    if m0 < n_q:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q_ok = offs_m < n_q
        q = _load_tile(q_base, offs_m, q_ok, stride_qn, offs_d, HEAD_DIM, UPCAST)
        do = _load_tile(do_base, offs_m, q_ok, stride_dn, offs_d, HEAD_DIM, UPCAST)
        lse = tl.load(lse_ptr + stat_base + offs_m, mask=q_ok, other=float("inf"))
        delta = tl.load(delta_ptr + stat_base + offs_m, mask=q_ok, other=0.0)
        hi = n_k
        if FRAME:
            last_q = tl.minimum(m0 + BLOCK_M, n_q) - 1
            hi = tl.minimum(hi, (last_q // frame_len + 1) * frame_len)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for kn0 in range(0, hi, BLOCK_N):
            slots = kn0 + tl.arange(0, BLOCK_N)
            k_pos, k_ok = _key_rows(slots, hi, kpad_ptr, kidx_ptr, stride_pb, stride_ib, b, PAD, INDEX)
            k = _load_tile(k_base, k_pos, k_ok, stride_kn, offs_d, HEAD_DIM, UPCAST)
            v = _load_tile(v_base, k_pos, k_ok, stride_vn, offs_d, HEAD_DIM, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.exp2(s - lse[:, None])
            p = tl.where(_allowed(offs_m, q_ok, k_pos, k_ok, frame_len, FRAME), p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        dq = dq * sm_scale
        dq_base = _base(dq_ptr, b, h, start, stride_gqb, stride_gqh, stride_gqn)
        tl.store(dq_base + offs_m[:, None] * stride_gqn + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=q_ok[:, None] & d_ok)


# --------------------------------------------------------------------------------------------------
# Launchers: check constraints, allocate, pick the config, launch.
# --------------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) by dtype class and head-dim tile, chosen from the audit
# (spill-free on sm_90a and sm_80, registers and stack read from the cubin; no GPU timing yet):
# 16-bit forward 128-row query tiles over 8 warps (D <= 64: 147/175 registers on sm_90a/sm_80;
# D = 128 with 32-key tiles: 147/223; 128x64 tiles there spill on sm_80 and 4 warps spill at D = 64
# on sm_90a). The backward holds K, V, dK, dV of a key block in registers: 32x32 tiles over 4 warps in
# two stages (triton 3.9: 128-163 registers at D <= 64, 197-224 at D = 80-128, no stack frame; the one-
# stage form has an 8-byte frame at D = 64 on sm_90a). 32 query rows, not 64: ViT sequences of 196/197
# tokens pad to 224 rows instead of 256, which keeps the backward's launched work (S and dP computed in
# both passes, 1.4x the five products it needs) under 2x its useful work (kernels/ledger.py). fp32
# ("ieee" dots, no tensor cores) uses smaller tiles (the 128-wide forward: 32x16 over 8 warps, two
# stages; 64x32 needs a 648-byte stack frame on sm_90a at D = 80, one stage 8 bytes on sm_80). The 256-wide tile (head dims 129-256) halves the
# query rows: 64x32 forward tiles over 8 warps (4 warps spill on both targets) and 32x32 backward
# tiles over 8 warps in one stage (64-row or 4-warp forms spill or use a stack frame); fp32 at 256:
# 32x16 forward tiles over 8 warps and 16x16 backward tiles over 4 warps, one stage (larger IEEE
# forward tiles need a stack frame on sm_90a). Under the interpreter 16x16 tiles make the
# tests' small shapes span several blocks, so the online softmax, frame skipping and tails run.
_FWD_CONFIGS = {
    ("16bit", 64): LaunchConfig({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    ("16bit", 128): LaunchConfig({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    ("fp32", 64): LaunchConfig({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    ("fp32", 128): LaunchConfig({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=8, num_stages=2),
    ("16bit", 256): LaunchConfig({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    ("fp32", 256): LaunchConfig({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=8, num_stages=1),
}
_BWD_CONFIGS = {
    ("16bit", 64): LaunchConfig({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    ("16bit", 128): LaunchConfig({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    ("fp32", 64): LaunchConfig({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    ("fp32", 128): LaunchConfig({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    ("16bit", 256): LaunchConfig({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=1),
    ("fp32", 256): LaunchConfig({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),
}
_PRE_CONFIG = LaunchConfig({"BLOCK_M": 64}, num_warps=4, num_stages=1)
_INTERP_CONFIG = LaunchConfig({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
# What the tuner (kernels/tuning.py) times on a GPU beside each table entry: every candidate compiles
# for sm_90a and sm_80 without spills or a stack frame (`python -m jepa_engine.kernels.audit
# --search-space`). Rows: BLOCK_M, BLOCK_N, num_warps, num_stages.
_TILES = "BLOCK_M,BLOCK_N"
_FWD_SEARCH = _launch.search_space(_FWD_CONFIGS, {
    ("16bit", 64): _launch.candidates(_TILES, (128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)),
    ("16bit", 128): _launch.candidates(_TILES, (128, 32, 8, 3), (64, 64, 4, 2), (64, 32, 4, 2), (64, 64, 8, 2)),
    ("16bit", 256): _launch.candidates(_TILES, (64, 32, 8, 1), (64, 16, 8, 2), (32, 32, 4, 2)),
    ("fp32", 64): _launch.candidates(_TILES, (32, 32, 4, 2), (64, 16, 8, 2)),
    ("fp32", 128): _launch.candidates(_TILES, (16, 16, 4, 2)),
    ("fp32", 256): _launch.candidates(_TILES, (16, 16, 4, 1), (32, 16, 8, 2)),
})
_BWD_SEARCH = _launch.search_space(_BWD_CONFIGS, {
    ("16bit", 64): _launch.candidates(_TILES, (64, 32, 4, 1), (32, 64, 4, 2)),
    ("16bit", 128): _launch.candidates(_TILES, (64, 32, 8, 2), (32, 64, 8, 1)),
    ("16bit", 256): _launch.candidates(_TILES, (32, 16, 4, 1), (16, 32, 4, 1)),
    ("fp32", 64): _launch.candidates(_TILES, (32, 32, 4, 1), (32, 32, 8, 2), (16, 32, 4, 1)),
    ("fp32", 128): _launch.candidates(_TILES, (32, 32, 4, 1), (16, 16, 4, 1), (32, 32, 8, 1)),
    ("fp32", 256): _launch.candidates(_TILES, (16, 16, 4, 2)),
})
_PRE_SEARCH = _launch.search_space({(): _PRE_CONFIG}, {
    (): _launch.candidates("BLOCK_M", (32, 4, 1), (64, 8, 1)),
})


# CUDA limits the second grid dimension to 65535: more (batch, head) pairs launch in chunks.
_MAX_GRID_Y = 65535


def _bh_chunks(n: int):
    return [(s, min(_MAX_GRID_Y, n - s)) for s in range(0, n, _MAX_GRID_Y)]


def _block_d(head_dim: int) -> int:
    """The head-dim tile of ``head_dim``: the next power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(HEAD_DIM_TILES[0], _launch.next_power_of_2(head_dim))


def _tile_class(head_dim: int) -> int:
    """Launch-config class of a head dim: tiles up to 64 share one config, then 128 and 256."""
    return max(64, _block_d(head_dim))


def supports_head_dim(head_dim: int) -> bool:
    """Whether :func:`masked_attention` runs this head dim (any D in ``[1, MAX_HEAD_DIM]``)."""
    return 1 <= int(head_dim) <= MAX_HEAD_DIM


def _pick_config(table: dict, dtype: torch.dtype, head_dim: int, cuda: bool = False,
                 kernel: Optional[str] = None) -> LaunchConfig:
    """``table``'s config for ``head_dim`` (``cuda``: the CUDA entry, even under the interpreter;
    ``kernel``: the device's tuned config for that kernel first, see ``_launch.tuned``)."""
    return _launch.pick_config(table, dtype, _tile_class(head_dim), interpret=None if cuda else _INTERP_CONFIG,
                               kernel=kernel)


# TF32 for fp32 dots (see _launch.dot_precision): the forward's follow torch's matmul precision as
# ``torch.nn.Linear`` does (``torch.backends.cuda.matmul.allow_tf32``, i.e.
# ``torch.set_float32_matmul_precision("high")``; by default "highest": IEEE fp32, exact against the
# reference; ``FWD_ALLOWS_TF32`` is that default). The backward's are TF32: its five IEEE (FMA) dots per tile spill at every tile size on
# both targets, so fp32 gradients on a GPU carry TF32 rounding (about 1e-3 relative; exact under the
# interpreter).
FWD_ALLOWS_TF32 = False
BWD_ALLOWS_TF32 = True


def _strides3(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides of [B, H, N, D] or of [T, H, D] (batch stride 0)."""
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when the kernels' alignment promise holds (unit last-dim stride, every other
    stride a multiple of 16 elements, 16-byte aligned data), else a contiguous copy (which keeps it,
    since D is a multiple of 16). Slices of a fused qkv projection keep it: no copy there."""
    if t.stride(-1) != 1:
        return t.contiguous()
    if t.shape[-1] % 16:  # a copy would not be aligned either (D = 88, 104, ...): read in place
        return t
    ok = all(s % 16 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0
    return t if ok else t.contiguous()


class _Problem:
    """Sizes and mask arguments of one call, shared by the forward and backward launchers."""

    def __init__(self, q, k, key_padding, cu_seqlens, keep_index, frame_len, max_seqlen):
        self.varlen = cu_seqlens is not None
        if self.varlen:
            self.B = cu_seqlens.numel() - 1
            self.H, self.D = q.shape[1], q.shape[2]
            self.max_q = self.max_k = int(max_seqlen) if max_seqlen > 0 else int(cu_seqlens.diff().max().item())
            self.n_q = self.n_k = 0  # read from cu_seqlens in the kernel
            self.stat_shape = (self.H, q.shape[0])
            self.stat_strides = (0, q.shape[0])
        else:
            self.B, self.H, self.n_q, self.D = q.shape
            self.n_k = keep_index.shape[1] if keep_index is not None else k.shape[2]
            self.max_q, self.max_k = self.n_q, self.n_k
            self.stat_shape = (self.B, self.H, self.n_q)
            self.stat_strides = (self.H * self.n_q, self.n_q)
        dummy = q
        if key_padding is not None:
            key_padding = key_padding.contiguous()  # the kernels read it with a unit key stride
        self.kpad = key_padding.view(torch.uint8) if key_padding is not None else dummy
        self.kidx = keep_index.to(torch.int32).contiguous() if keep_index is not None else dummy
        self.cu = cu_seqlens.contiguous() if cu_seqlens is not None else dummy
        self.stride_pb = key_padding.stride(0) if key_padding is not None else 0
        self.stride_ib = self.kidx.stride(0) if keep_index is not None else 0
        self.frame_len = max(int(frame_len), 1)
        self.flags = dict(PAD=key_padding is not None, VARLEN=self.varlen, FRAME=frame_len > 0,
                          INDEX=keep_index is not None)


def masked_attention_forward(q, k, v, key_padding, cu_seqlens, keep_index, frame_len: int, scale: float,
                             max_seqlen: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel; returns (out, lse) with lse fp32 in base 2."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    pb = _Problem(q, k, key_padding, cu_seqlens, keep_index, frame_len, max_seqlen)
    out = _empty_out(q, pb.varlen)
    lse = torch.empty(pb.stat_shape, device=q.device, dtype=torch.float32)
    cfg = _pick_config(_FWD_CONFIGS, q.dtype, pb.D, kernel="masked_attention_fwd")
    for bh0, n_bh in _bh_chunks(pb.B * pb.H):
        _masked_attention_fwd_kernel[(_launch.cdiv(pb.max_q, cfg.constexprs["BLOCK_M"]), n_bh)](
            q, k, v, out, lse, pb.kpad, pb.cu, pb.kidx,
            *_strides3(q, pb.varlen), *_strides3(k, pb.varlen), *_strides3(v, pb.varlen), *_strides3(out, pb.varlen),
            *pb.stat_strides, pb.stride_pb, pb.stride_ib,
            pb.H, pb.n_q, pb.n_k, pb.frame_len, float(scale) * math.log2(math.e), bh0,
            UPCAST=_launch.upcast_bf16(q.dtype), PRECISION=_launch.linear_dot_precision(q.dtype),
            HEAD_DIM=pb.D, BLOCK_D=_block_d(pb.D), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pb.flags,
            **cfg.constexprs,
        )
    return out, lse


def masked_attention_backward(grad_out, q, k, v, out, lse, key_padding, cu_seqlens, keep_index, frame_len: int,
                              scale: float, max_seqlen: int = 0):
    """Launch the preprocess and backward kernels; returns (dq, dk, dv) in the inputs' dtype."""
    q, k, v, grad_out = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(grad_out)
    pb = _Problem(q, k, key_padding, cu_seqlens, keep_index, frame_len, max_seqlen)
    delta = torch.empty(pb.stat_shape, device=q.device, dtype=torch.float32)
    pre = _INTERP_CONFIG if _launch.interpreting() else _launch.tuned("masked_attention_bwd_preprocess", (),
                                                                       _PRE_CONFIG)
    for bh0, n_bh in _bh_chunks(pb.B * pb.H):
        _masked_attention_bwd_preprocess_kernel[(_launch.cdiv(pb.max_q, pre.constexprs["BLOCK_M"]), n_bh)](
            out, grad_out, delta, pb.cu, *_strides3(out, pb.varlen), *_strides3(grad_out, pb.varlen), *pb.stat_strides,
            pb.H, pb.n_q, bh0, VARLEN=pb.varlen, HEAD_DIM=pb.D, BLOCK_M=pre.constexprs["BLOCK_M"],
            BLOCK_D=_block_d(pb.D), num_warps=pre.num_warps, num_stages=pre.num_stages,
        )
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    # An index set leaves the keys it does not select untouched by the kernel: their gradient is 0.
    alloc = torch.zeros if keep_index is not None else torch.empty
    dk = alloc(k.shape, device=k.device, dtype=k.dtype)
    dv = alloc(v.shape, device=v.device, dtype=v.dtype)
    cfg = _pick_config(_BWD_CONFIGS, q.dtype, pb.D, kernel="masked_attention_bwd")
    bm, bn = cfg.constexprs["BLOCK_M"], cfg.constexprs["BLOCK_N"]
    n_blocks = max(_launch.cdiv(pb.max_q, bm), _launch.cdiv(pb.max_k, bn))
    for bh0, n_bh in _bh_chunks(pb.B * pb.H):
        _masked_attention_bwd_kernel[(n_blocks, n_bh)](
            q, k, v, grad_out, lse, delta, dq, dk, dv, pb.kpad, pb.cu, pb.kidx,
            *_strides3(q, pb.varlen), *_strides3(k, pb.varlen), *_strides3(v, pb.varlen),
            *_strides3(grad_out, pb.varlen), *_strides3(dq, pb.varlen), *_strides3(dk, pb.varlen),
            *pb.stat_strides, pb.stride_pb, pb.stride_ib,
            pb.H, pb.n_q, pb.n_k, pb.frame_len, float(scale) * math.log2(math.e), float(scale), bh0,
            UPCAST=_launch.upcast_bf16(q.dtype), PRECISION=_launch.dot_precision(q.dtype, allow_tf32=BWD_ALLOWS_TF32),
            HEAD_DIM=pb.D, BLOCK_D=_block_d(pb.D), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pb.flags,
            **cfg.constexprs,
        )
    return dq, dk, dv


def _empty_out(q: torch.Tensor, varlen: bool) -> torch.Tensor:
    """The output buffer: [T, H, D] contiguous, or [B, H, N, D] viewed on [B, N, H, D] memory."""
    if varlen:
        return torch.empty(q.shape, device=q.device, dtype=q.dtype)
    B, H, N, D = q.shape
    return torch.empty((B, N, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# Audit registration: every kernel with the configs the launchers pick (head dims 64, 128 and 256
# cover the three tile classes; 16/32 use the 64 class with a narrower D tile; 80, 88, 96 and 104
# run in the 128 tile with masked columns, audited at 80 and 104, as the flagship ViT-H/ViT-G).
# --------------------------------------------------------------------------------------------------
# Mask switches audited: the widest combination of each code path (padding + frame, index set, varlen + frame).
_AUDIT_MASKS = {
    "pad+frame": dict(PAD=True, VARLEN=False, FRAME=True, INDEX=False),
    "index": dict(PAD=False, VARLEN=False, FRAME=False, INDEX=True),
    "varlen+frame": dict(PAD=False, VARLEN=True, FRAME=True, INDEX=False),
}
_AUDIT_CASES = [("fp16", 64, "pad+frame"), ("bf16", 128, "pad+frame"), ("fp16", 128, "index"),
                ("bf16", 64, "varlen+frame"), ("fp32", 64, "pad+frame"), ("fp16", 80, "pad+frame"),
                ("bf16", 104, "varlen+frame"), ("fp32", 80, "pad+frame"), ("fp16", 256, "pad+frame"),
                ("bf16", 256, "index"), ("fp32", 256, "pad+frame")]
# Types of the runtime arguments that are not q's dtype pointers or i32 sizes/strides.
_FWD_TYPES = {"lse_ptr": "*fp32", "kpad_ptr": "*u8", "cu_ptr": "*i32", "kidx_ptr": "*i32", "qk_scale": "fp32"}
_BWD_TYPES = {**_FWD_TYPES, "delta_ptr": "*fp32", "sm_scale": "fp32"}
_PRE_TYPES = {"delta_ptr": "*fp32", "cu_ptr": "*i32"}


def _attention_variants(kernel, types: dict, allow_tf32: bool) -> dict:
    out = {}
    for dt, d, masks in _AUDIT_CASES:
        consts = {**_AUDIT_MASKS[masks], "UPCAST": False,
                  "PRECISION": _launch.dot_precision(_launch.NAMED_DTYPES[dt], allow_tf32=allow_tf32),
                  "HEAD_DIM": d, "BLOCK_D": _block_d(d)}
        out[f"{dt}/d{d}/{masks}"] = (signature(kernel, f"*{dt}", types), consts)
        if dt == "fp32" and not allow_tf32:     # the forward under torch's "high" matmul precision
            out[f"{dt}/d{d}/{masks}/tf32"] = (signature(kernel, f"*{dt}", types), {**consts, "PRECISION": "tf32"})
    return out


def _pre_variants():
    out = {}
    for dt, d, varlen in (("fp16", 64, False), ("bf16", 128, True), ("fp32", 256, False)):
        sig = signature(_masked_attention_bwd_preprocess_kernel, f"*{dt}", _PRE_TYPES)
        out[f"{dt}/d{d}/{'varlen' if varlen else 'dense'}"] = (sig, {"VARLEN": varlen, "HEAD_DIM": d,
                                                                     "BLOCK_D": _block_d(d)})
    return out


def _head_dim_class(variant: str) -> int:
    """The tile class of an audit label ``"<dtype>/d<head dim>/..."``."""
    return _tile_class(int(variant.split("/")[1][1:]))


def _aligned(variants) -> tuple[str, ...]:
    """Arguments compiled 16-divisible, as Triton specializes them at launch: the q/k/v/o/dO/dq/dk/dv
    pointers and their strides (``_unit_last`` guarantees both) and the fresh lse/delta buffers."""
    sig = next(iter(variants.values()))[0]
    return tuple(n for n, t in sig.items() if (t.startswith("*") and n not in ("kpad_ptr", "cu_ptr", "kidx_ptr"))
                 or (n.startswith("stride_") and n not in ("stride_lb", "stride_lh", "stride_pb", "stride_ib")))


if _launch.triton_available():
    for _name, _kernel, _vars, _cfgs, _tc, _space, _keys in (
        ("masked_attention_fwd", _masked_attention_fwd_kernel,
         _attention_variants(_masked_attention_fwd_kernel, _FWD_TYPES, FWD_ALLOWS_TF32),
         _launch.table_configs(_FWD_CONFIGS, _head_dim_class), True, _FWD_SEARCH,
         _launch.table_keys(_FWD_CONFIGS, _head_dim_class)),
        ("masked_attention_bwd_preprocess", _masked_attention_bwd_preprocess_kernel, _pre_variants(),
         [_PRE_CONFIG], False, _PRE_SEARCH, None),
        ("masked_attention_bwd", _masked_attention_bwd_kernel,
         _attention_variants(_masked_attention_bwd_kernel, _BWD_TYPES, BWD_ALLOWS_TF32),
         _launch.table_configs(_BWD_CONFIGS, _head_dim_class), True, _BWD_SEARCH,
         _launch.table_keys(_BWD_CONFIGS, _head_dim_class)),
    ):
        register_kernel(KernelSpec(_name, _kernel, _vars, _cfgs, uses_tensor_cores=_tc, aligned_args=_aligned(_vars),
                                   search_space=_space, search_keys=_keys))


# --------------------------------------------------------------------------------------------------
# Reference (the specification): plain PyTorch softmax attention with an explicit boolean mask
# --------------------------------------------------------------------------------------------------
def attention_mask(B: int, N_q: int, N_k: int, *, key_padding=None, frame_len: int = 0, keep_index=None,
                   device=None) -> torch.Tensor:
    """The boolean mask ``[B, N_q, N_k]`` (True = query i may attend key j) of the non-varlen kinds."""
    mask = torch.ones(B, N_q, N_k, dtype=torch.bool, device=device)
    if key_padding is not None:
        mask &= key_padding[:, None, :]
    if frame_len > 0:
        fq = torch.arange(N_q, device=device) // frame_len
        fk = torch.arange(N_k, device=device) // frame_len
        mask &= fk[None, None, :] <= fq[None, :, None]
    if keep_index is not None:
        idx = keep_index.long()
        sel = torch.zeros(B, N_k + 1, dtype=torch.bool, device=device)
        sel.scatter_(1, torch.where(idx < 0, N_k, idx), True)  # unused slots land in a spare column
        mask &= sel[:, None, :N_k]
    return mask


def _probs(q, k, mask, scale):
    """fp32 P = softmax(scale q k^T) over allowed keys, 0 on rows with none. q [B,H,Nq,D], mask [B,Nq,Nk]."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    m = mask[:, None]
    s = s.masked_fill(~m, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.where(m.any(dim=-1, keepdim=True), p, torch.zeros((), dtype=p.dtype, device=p.device))


def _varlen_split(cu_seqlens):
    cu = cu_seqlens.tolist()
    return [(cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def _lse2(q, k, mask, scale):
    """Base-2 log-sum-exp of the allowed scores per query row (+inf where none is allowed)."""
    s = (torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale).masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1) / math.log(2.0)
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


def _reference_forward(q, k, v, key_padding, cu_seqlens, keep_index, frame_len, scale):
    """(out, lse): the reference output and the forward's base-2 log-sum-exp in the kernel's layout."""
    if cu_seqlens is not None:
        outs, lses = [], []
        for s0, s1 in _varlen_split(cu_seqlens):
            qs, ks, vs = (x[s0:s1].transpose(0, 1)[None] for x in (q, k, v))  # [1, H, n, D]
            mask = attention_mask(1, s1 - s0, s1 - s0, frame_len=frame_len, device=q.device)
            outs.append(torch.matmul(_probs(qs, ks, mask, scale), vs.float())[0].transpose(0, 1))
            lses.append(_lse2(qs, ks, mask, scale)[0])
        return torch.cat(outs, dim=0).to(q.dtype), torch.cat(lses, dim=1)
    B, _, N_q, _ = q.shape
    mask = attention_mask(B, N_q, k.shape[2], key_padding=key_padding, frame_len=frame_len,
                          keep_index=keep_index, device=q.device)
    return torch.matmul(_probs(q, k, mask, scale), v.float()).to(q.dtype), _lse2(q, k, mask, scale)


def _sdpa_masked(q, k, v, mask, scale):
    """SDPA in fp32 with the boolean ``mask [B, N_q, N_k]``; rows with no visible key give 0.

    SDPA gives NaN for a fully masked row, so such rows attend to every key and are then zeroed
    (which also zeroes their gradients)."""
    mask = mask[:, None]                                   # [B, 1, N_q, N_k], broadcast over heads
    visible = mask.any(dim=-1, keepdim=True)               # [B, 1, N_q, 1]
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask | ~visible, scale=scale)
    return (out * visible).to(q.dtype)


def masked_attention_reference(q, k, v, *, key_padding=None, cu_seqlens=None, frame_size=None,
                               frame_extra_tokens=0, keep_index=None, scale=None, **_unused):
    """PyTorch SDPA in fp32 with an explicit boolean mask (fully masked query rows give 0, not NaN),
    cast back to q's dtype.

    The specification of :func:`masked_attention` (same arguments; differentiable with autograd) and
    the path it takes on plain CPU tensors with a gradient where one SDPA call does not (:func:`_plain_sdpa`).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    frame_len = (frame_size + frame_extra_tokens) if frame_size else 0
    if cu_seqlens is not None:
        outs = []
        for s0, s1 in _varlen_split(cu_seqlens):
            qs, ks, vs = (x[s0:s1].transpose(0, 1)[None] for x in (q, k, v))  # [1, H, n, D]
            mask = attention_mask(1, s1 - s0, s1 - s0, frame_len=frame_len, device=q.device)
            outs.append(_sdpa_masked(qs, ks, vs, mask, scale)[0].transpose(0, 1))
        return torch.cat(outs, dim=0)
    mask = attention_mask(q.shape[0], q.shape[2], k.shape[2], key_padding=key_padding, frame_len=frame_len,
                          keep_index=keep_index, device=q.device)
    return _sdpa_masked(q, k, v, mask, scale)


def _reference_grads(g, q, k, v, mask, scale):
    """dq, dk, dv (fp32) of softmax attention written out: dS = P * (dO v^T - rowsum(P * dO v^T))."""
    p = _probs(q, k, mask, scale)
    g = g.float()
    dv = torch.matmul(p.transpose(-1, -2), g)
    dp = torch.matmul(g, v.float().transpose(-1, -2))
    ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
    dq = torch.matmul(ds, k.float()) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.float()) * scale
    return dq, dk, dv


def masked_attention_backward_reference(grad_out, q, k, v, *, key_padding=None, cu_seqlens=None,
                                        frame_len=0, keep_index=None, scale=None):
    """Gradients of :func:`masked_attention_reference` written out (the custom op's body runs below
    autograd, so the reference backward cannot call autograd)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if cu_seqlens is not None:
        parts = []
        for s0, s1 in _varlen_split(cu_seqlens):
            xs = [x[s0:s1].transpose(0, 1)[None] for x in (grad_out, q, k, v)]
            mask = attention_mask(1, s1 - s0, s1 - s0, frame_len=frame_len, device=q.device)
            parts.append([x[0].transpose(0, 1) for x in _reference_grads(*xs, mask, scale)])
        grads = [torch.cat(list(col), dim=0) for col in zip(*parts)]
    else:
        B, _, N_q, _ = q.shape
        mask = attention_mask(B, N_q, k.shape[2], key_padding=key_padding, frame_len=frame_len,
                              keep_index=keep_index, device=q.device)
        grads = _reference_grads(grad_out, q, k, v, mask, scale)
    return tuple(gr.to(x.dtype).contiguous() for gr, x in zip(grads, (q, k, v)))


# --------------------------------------------------------------------------------------------------
# Public op: validation, dispatch, autograd, torch.library registration
# --------------------------------------------------------------------------------------------------
# The forward's schema: defined in C++ (csrc/attention.cpp, with its CPU kernel) when the native library
# is loaded, else here. The backward stays a Python op (a C++ process plans, it does not train).
SCHEMA = ("masked_attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding, Tensor? cu_seqlens, "
          "Tensor? keep_index, SymInt frame_len, float scale, SymInt max_seqlen) -> (Tensor, Tensor)")


def _route_shape(q, k, key_padding, cu_seqlens, keep_index, frame_len: int) -> Optional[tuple]:
    """The call's shape class in the route table (kernels/routes.py) for CUDA tensors, else None."""
    if not q.is_cuda:
        return None
    varlen = cu_seqlens is not None
    return routes.attention_class(q.shape[-1], q.shape[0] if varlen else k.shape[2], q.dtype,
                                  key_padding=key_padding is not None, frame_len=frame_len,
                                  index=keep_index is not None, varlen=varlen)


def _forward_kernel(q, k, v, key_padding, cu_seqlens, keep_index, frame_len, scale, max_seqlen):
    """The Python kernel of the forward op: the Triton kernel, or the reference in the kernel's layout."""
    shape = _route_shape(q, k, key_padding, cu_seqlens, keep_index, frame_len)
    if _launch.backend_for(OP, q.device, shape) == "triton":
        return masked_attention_forward(q, k, v, key_padding, cu_seqlens, keep_index, frame_len, scale, max_seqlen)
    out = _empty_out(q, cu_seqlens is not None)
    ref, lse = _reference_forward(q, k, v, key_padding, cu_seqlens, keep_index, frame_len, scale)
    out.copy_(ref)
    return out, lse


def _stat_shape(q, cu_seqlens):
    return (q.shape[1], q.shape[0]) if cu_seqlens is not None else tuple(q.shape[:3])


def _forward_fake(q, k, v, key_padding, cu_seqlens, keep_index, frame_len, scale, max_seqlen):
    return _empty_out(q, cu_seqlens is not None), q.new_empty(_stat_shape(q, cu_seqlens), dtype=torch.float32)


@torch.library.custom_op("jepa_engine::masked_attention_backward", mutates_args=())
def _masked_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  out: torch.Tensor, lse: torch.Tensor, key_padding: Optional[torch.Tensor],
                                  cu_seqlens: Optional[torch.Tensor], keep_index: Optional[torch.Tensor],
                                  frame_len: int, scale: float, max_seqlen: int
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape = _route_shape(q, k, key_padding, cu_seqlens, keep_index, frame_len)
    if _launch.backend_for(OP, q.device, shape) == "triton":
        return masked_attention_backward(grad_out, q, k, v, out, lse, key_padding, cu_seqlens, keep_index,
                                         frame_len, scale, max_seqlen)
    return masked_attention_backward_reference(grad_out, q, k, v, key_padding=key_padding, cu_seqlens=cu_seqlens,
                                               frame_len=frame_len, keep_index=keep_index, scale=scale)


@_masked_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, key_padding, cu_seqlens, keep_index, frame_len, scale, max_seqlen):
    # Gradients are contiguous on every path (the kernels allocate them so; the reference copies).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding, cu_seqlens, keep_index, frame_len, scale, max_seqlen = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding, cu_seqlens, keep_index)
    ctx.frame_len, ctx.scale, ctx.max_seqlen = frame_len, scale, max_seqlen
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, key_padding, cu_seqlens, keep_index = ctx.saved_tensors
    dq, dk, dv = _masked_attention_backward_op(grad_out, q, k, v, out, lse, key_padding, cu_seqlens, keep_index,
                                               ctx.frame_len, ctx.scale, ctx.max_seqlen)
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            None, None, None, None, None, None)


_masked_attention_op = _native.Op(OP, SCHEMA, _forward_kernel, _forward_fake, backward=_backward,
                                  setup_context=_setup_context)


def _check_values(key_padding, cu_seqlens, keep_index, N_k: int, T: int) -> None:
    """Checks that read tensor values (one host synchronisation); skipped while torch.compile traces."""
    if torch.compiler.is_compiling() or (cu_seqlens is None and keep_index is None):
        return
    facts = []
    if cu_seqlens is not None:
        c = cu_seqlens.long()
        facts += [c[0], c[-1], (c.diff() < 0).any().long()]
    if keep_index is not None:
        srt = keep_index.long().sort(dim=1).values
        dup = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(dim=1)
        first_dup = torch.where(dup, torch.arange(dup.numel(), device=dup.device), dup.numel()).min()
        facts += [srt.min(), srt.max(), first_dup]
    facts = torch.stack(facts).tolist()
    if cu_seqlens is not None:
        first, last, decreasing = facts[:3]
        facts = facts[3:]
        if first != 0 or last != T or decreasing:
            raise ValueError(f"{OP}: cu_seqlens must start at 0, be non-decreasing and end at the token total "
                             f"{T}, got {cu_seqlens.tolist()}")
    if keep_index is not None:
        lo, hi, row = facts
        if lo < -1 or hi >= N_k:
            raise ValueError(f"{OP}: keep_index values must be in [-1, N_k) = [-1, {N_k}) (-1 = unused slot), "
                             f"got min {lo}, max {hi}")
        if row < keep_index.shape[0]:
            raise ValueError(f"{OP}: keep_index must not repeat a key position within a sample "
                             f"(sample {row} does); duplicates would double-count that key")


@functools.lru_cache(maxsize=16)
def _frame_causal_mask(n_q: int, n_k: int, frame_len: int) -> torch.Tensor:
    """The bool frame-causal mask ``[n_q, n_k]`` (CPU), made once per shape: query i sees key j iff
    ``j // frame_len <= i // frame_len``. Shared between calls, never written."""
    return (torch.arange(n_k) // frame_len)[None, :] <= (torch.arange(n_q) // frame_len)[:, None]


def _plain_sdpa(q, k, v, key_padding, frame_len: int, scale: float, keep_index=None) -> Optional[torch.Tensor]:
    """Plain CPU fp32 attention (key padding, a kept-index set, and / or frame-causal) as one SDPA call
    with a bool mask, or None where it does not apply: other dtypes, traced or compiled calls, the
    interpreter or a forced backend, or a query row that may have no visible key (SDPA's result there
    depends on the torch version; the reference gives 0). A kept-index set is key padding: its values are
    checked first (:func:`_check_values`), then scattered into one.

    On the CPU the fused SDPA kernel is the kernel: the reference (an explicit [B, N_q, N_k] mask and a
    zeroing pass) and the C++ op (the same kernel behind the dispatcher, an additive mask and copies into
    the op's layout) spend 25-110 us more per call around it at the shapes of the JEPA encoders and
    predictors ([2, 3, 64, 64]: 75 us for SDPA, 122 us for the op, 130 us for the reference). The
    output is the reference's: the same SDPA on the same mask, rows all visible."""
    if not (q.dtype == torch.float32 and _native.cpu_kernel_runs(q, k, v) and not torch.compiler.is_compiling()):
        return None
    mask = None
    if frame_len:
        mask = _frame_causal_mask(q.shape[2], k.shape[2], frame_len)
    if keep_index is not None:
        N_k = k.shape[2]
        _check_values(None, None, keep_index, N_k, 0)
        idx = keep_index.long()
        key_padding = torch.zeros(idx.shape[0], N_k + 1, dtype=torch.bool).scatter_(
            1, torch.where(idx < 0, N_k, idx), True)[:, :N_k]     # unused slots land in a spare column
    if key_padding is not None:
        # Every row sees a key iff every sample has one among the keys its first rows see.
        if not bool(key_padding[:, :frame_len or None].any(1).all()):
            return None
        kp = key_padding[:, None, None, :]
        mask = kp if mask is None else kp & mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _torch_attention(q, k, v, key_padding, keep_index, frame_len: int, scale: float) -> torch.Tensor:
    """The PyTorch path of a call the route table gives to PyTorch (kernels/routes.py): one
    ``F.scaled_dot_product_attention`` call in q's dtype, which picks its fastest backend (flash for
    dense attention, memory-efficient with a bool mask), traced as such by ``torch.compile``.

    An index set gathers the kept keys and values (SDPA then visits K keys, not N_k; unused slots are
    masked); frame-causal takes a ``[N_q, N_k]`` bool mask. A query row with no visible key attends to
    every key and is then zeroed (SDPA gives NaN there, the reference 0; its gradients are 0 too)."""
    if keep_index is not None:
        idx = keep_index.long()
        key_padding = idx >= 0
        at = idx.clamp_min(0)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        k, v = k.gather(2, at), v.gather(2, at)
    N_q, N_k = q.shape[2], k.shape[2]
    mask = None
    if 0 < frame_len < N_k:
        frames_q = torch.arange(N_q, device=q.device) // frame_len
        mask = (torch.arange(N_k, device=q.device) // frame_len)[None, :] <= frames_q[:, None]
    if key_padding is None:      # every row sees its own frame's keys, or every key
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    kp = key_padding[:, None, None, :]
    mask = kp if mask is None else kp & mask
    visible = mask.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~visible, scale=scale)
    return out * visible


def _cpp_forward_runs(q, k, v) -> bool:
    """Whether a plain CPU call takes the C++ kernel (csrc/attention.cpp): the native library defines it
    and no gradient is asked. It runs the fused CPU attention the reference's SDPA runs, on the same
    fp32 copies, without the Python around it (the encoder and the planner's rollouts call it under
    no_grad); with a gradient, the reference's SDPA backward beats the op's recomputing backward."""
    return (_masked_attention_op.native and _native.cpu_kernel_runs(q, k, v)
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_padding: Optional[torch.Tensor] = None,
                     cu_seqlens: Optional[torch.Tensor] = None, frame_size: Optional[int] = None,
                     frame_extra_tokens: int = 0, keep_index: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, dropout_p: float = 0.0,
                     max_seqlen: Optional[int] = None) -> torch.Tensor:
    """Masked softmax attention, fused (see the module docstring for the math and the mask kinds).

    Args:
        q: ``[B, H, N_q, D]`` queries (fp32, fp16 or bf16), or ``[T, H, D]`` with ``cu_seqlens``.
        k, v: ``[B, H, N_k, D]`` keys and values (``[T, H, D]`` with ``cu_seqlens``); q's dtype/device.
        key_padding: bool ``[B, N_k]``, True = the key is visible.
        cu_seqlens: int32 ``[B + 1]`` sequence offsets of the packed ``[T, H, D]`` form (self-attention:
            q, k and v share them).
        frame_size: tokens per frame for frame-causal attention (query frame t sees key frames <= t).
        frame_extra_tokens: extra (action/state) tokens per frame; a frame spans
            ``frame_size + frame_extra_tokens`` consecutive tokens.
        keep_index: int ``[B, K]``: attend only to these key positions (distinct per sample; -1 = unused).
        scale: softmax scale, default ``D ** -0.5``.
        dropout_p: must be 0.0 (attention dropout is not implemented).
        max_seqlen: optional longest sequence of ``cu_seqlens`` (saves a host synchronisation).

    Returns:
        ``[B, H, N_q, D]`` (or ``[T, H, D]``) in q's dtype; rows with no visible key are 0.
    """
    check = _launch.check_tensor
    varlen = cu_seqlens is not None
    check(OP, "q", q, ndim=3 if varlen else 4, dtypes=_launch.FLOAT_DTYPES)
    check(OP, "k", k, ndim=q.dim(), dtypes=_launch.FLOAT_DTYPES, device=q.device)
    check(OP, "v", v, ndim=q.dim(), dtypes=_launch.FLOAT_DTYPES, device=q.device)
    _launch.check_same_dtype(OP, "k", k, "q", q)
    _launch.check_same_dtype(OP, "v", v, "q", q)
    D = q.shape[-1]
    if not supports_head_dim(D):
        raise ValueError(f"{OP}: head dim (last dim of q) must be in [1, {MAX_HEAD_DIM}], got {D}")
    if varlen:
        T, H = q.shape[0], q.shape[1]
        _launch.check_shape(OP, "k", k, (T, H, D), "[T, H, D]")
        _launch.check_shape(OP, "v", v, (T, H, D), "[T, H, D]")
        check(OP, "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device)
        if cu_seqlens.numel() < 2:
            raise ValueError(f"{OP}: cu_seqlens must be [B + 1] with B >= 1, got [{cu_seqlens.numel()}]")
        if key_padding is not None or keep_index is not None:
            raise ValueError(f"{OP}: cu_seqlens cannot be combined with key_padding or keep_index "
                             "(pack only the visible tokens instead)")
        N_k = T
    else:
        B, H, N_q, _ = q.shape
        N_k = k.shape[2]
        _launch.check_shape(OP, "k", k, (B, H, N_k, D), "[B, H, N_k, D] with q's B, H, D")
        _launch.check_shape(OP, "v", v, (B, H, N_k, D), "[B, H, N_k, D] like k")
        T = 0
    if key_padding is not None:
        check(OP, "key_padding", key_padding, ndim=2, dtypes=(torch.bool,), device=q.device)
        _launch.check_shape(OP, "key_padding", key_padding, (B, N_k), "[B, N_k]")
    frame_len = 0
    if frame_size is not None:
        if int(frame_size) < 1 or int(frame_extra_tokens) < 0:
            raise ValueError(f"{OP}: frame_size must be >= 1 and frame_extra_tokens >= 0, "
                             f"got {frame_size} and {frame_extra_tokens}")
        if not varlen and N_q != N_k:
            raise ValueError(f"{OP}: frame-causal attention needs N_q == N_k (self-attention), got {N_q} and {N_k}")
        if keep_index is not None:
            raise ValueError(f"{OP}: frame_size cannot be combined with keep_index")
        frame_len = int(frame_size) + int(frame_extra_tokens)
    elif frame_extra_tokens:
        raise ValueError(f"{OP}: frame_extra_tokens={frame_extra_tokens} needs frame_size")
    if keep_index is not None:
        check(OP, "keep_index", keep_index, ndim=2, dtypes=INDEX_DTYPES, device=q.device)
        if key_padding is not None:
            raise ValueError(f"{OP}: keep_index cannot be combined with key_padding (mark unused slots with -1)")
        if keep_index.shape[0] != B:
            raise ValueError(f"{OP}: keep_index must be [B, K] = [{B}, K], got {list(keep_index.shape)}")
    if dropout_p != 0.0:
        raise ValueError(f"{OP}: dropout_p must be 0.0 (attention dropout is not implemented), got {dropout_p}")
    scale = D ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"{OP}: scale must be finite, got {scale}")
    if not varlen:
        out = _plain_sdpa(q, k, v, key_padding, frame_len, scale, keep_index)
        if out is not None:
            return out
    cpp = _cpp_forward_runs(q, k, v)
    if not cpp:   # the C++ kernel makes these checks itself, last as here, with the same messages
        _check_values(key_padding, cu_seqlens, keep_index, N_k, T)
    backend = _launch.backend_for(OP, q.device, _route_shape(q, k, key_padding, cu_seqlens, keep_index, frame_len))
    if backend == "reference" and q.is_cuda and not varlen and _launch.forced_backend() is None:
        # The route table's PyTorch path (dense attention, and the masks where SDPA is as fast); a forced
        # reference still runs the specification below.
        return _torch_attention(q, k, v, key_padding, keep_index, frame_len, scale)
    if (backend == "reference" and not torch.compiler.is_compiling()
            and not cpp):
        # Plain CPU tensors: the reference (fused SDPA under autograd) is the fastest PyTorch path
        # when gradients flow (its backward is SDPA's; the op's backward recomputes the probabilities).
        # A traced graph keeps the op, so an exported or compiled model runs the kernel where it
        # later runs on a GPU, and the C++ kernel in a C++ process.
        return masked_attention_reference(q, k, v, key_padding=key_padding, cu_seqlens=cu_seqlens,
                                          frame_size=frame_size, frame_extra_tokens=frame_extra_tokens,
                                          keep_index=keep_index, scale=scale)
    out, _ = _masked_attention_op(q, k, v, key_padding, cu_seqlens, keep_index, frame_len, scale,
                                  int(max_seqlen or 0))
    return out
