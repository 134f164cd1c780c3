"""The launch/tile-work ledger's accounting (kernels/ledger.py): a hand-computed case per kernel, the
launchers' own configs and grids (recorded from the launchers with the kernels stubbed out), bad input."""
from __future__ import annotations

import importlib

import pytest
import torch

from jepa_engine.kernels import _launch
from jepa_engine.kernels import ledger as kl


def _mod(name: str):
    """The kernel module (the package's attribute of that name is the op)."""
    return importlib.import_module(f"jepa_engine.kernels.{name}")


# --------------------------------------------------------------------------------------------------
# Hand-computed cases
# --------------------------------------------------------------------------------------------------
def test_fused_linear_bf16_64x128_tiles():
    # The lewm rollout's qkv at 300 candidates x 6 tokens: 64 x 128 x 32 tiles, 29 x 9 programs.
    shape = dict(M=1800, K=384, N=1152, dtype=torch.bfloat16)
    cfg = kl.config_of("fused_linear", **shape)
    assert cfg.constexprs == {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}
    assert kl.grid_of("fused_linear", **shape) == (29, 9)
    w = kl.work_of("fused_linear", **shape)
    assert w.useful_flops == 2 * 1800 * 384 * 1152 == 1_592_524_800
    assert w.launched_flops == 2 * 1856 * 384 * 1152 == 1_642_070_016
    assert w.ratio == pytest.approx(1856 / 1800)
    assert w.bytes == 2 * (1800 * 384 + 1152 * 384 + 1800 * 1152 + 1152)
    assert w.precision == "16bit" and w.tensor_cores


def test_fused_linear_fp32_pads_a_two_wide_k_to_the_k_chunk():
    # The action encoder's first layer: K = 2 runs in one 16-deep chunk of the fp32 64 x 64 x 16 tile.
    w = kl.work_of("fused_linear", M=300, K=2, N=384, dtype="fp32", residual=True)
    assert w.useful_flops == 2 * 300 * 2 * 384
    assert w.launched_flops == 2 * 320 * 16 * 384
    assert w.bytes == 4 * (300 * 2 + 384 * 2 + 2 * 300 * 384 + 384)
    assert w.precision == "fp32" and not w.tensor_cores
    assert kl.work_of("fused_linear", M=300, K=2, N=384, dtype="fp32", allow_tf32=True).precision == "tf32"


def test_linear_goal_cost_one_column_tile():
    # D = 192 runs in one 256-wide column tile (32 rows, K chunks of 16 in fp32).
    w = kl.work_of("linear_goal_cost", M=300, K=384, D=192, dtype="fp32", G=1)
    assert kl.grid_of("linear_goal_cost", M=300, K=384, D=192, dtype="fp32") == (10,)
    assert w.useful_flops == 2 * 300 * 384 * 192
    assert w.launched_flops == 2 * 320 * 384 * 256
    assert w.bytes == 4 * (300 * 384 + 192 * 384 + 192 + 192 + 300 * 192) + 4 * 300


def test_attention_forward_dense_pads_197_tokens():
    # bf16, D = 64: 128 x 64 tiles; 197 queries -> 2 blocks, 197 keys -> 4 blocks, per (batch, head).
    shape = dict(B=2, H=3, N_q=197, N_k=197, D=64, dtype="bf16")
    assert kl.grid_of("masked_attention_fwd", **shape) == (2, 6)
    w = kl.work_of("masked_attention_fwd", **shape)
    assert w.useful_flops == 4 * 64 * 197 * 197 * 6
    assert w.launched_flops == 4 * 128 * 64 * 64 * 8 * 6
    assert w.ratio == pytest.approx(256 * 256 / 197**2)
    assert w.bytes == 2 * 6 * 64 * (2 * 197 + 2 * 197) + 4 * 6 * 197


def test_attention_forward_frame_causal_skips_later_frames():
    # Two frames of 256: query blocks of frame 0 visit 4 key blocks, those of frame 1 all 8.
    w = kl.work_of("masked_attention_fwd", B=1, H=1, N_q=512, N_k=512, D=64, dtype="bf16", frame_len=256)
    assert w.useful_flops == 4 * 64 * (256 * 256 + 256 * 512)
    assert w.launched_flops == 4 * 128 * 64 * 64 * (2 * 4 + 2 * 8)
    # A partial last frame: rows 8-9 of 10 see every key; one block of each.
    small = kl.work_of("masked_attention_fwd", B=1, H=1, N_q=10, N_k=10, D=16, dtype="bf16", frame_len=4)
    assert small.useful_flops == 4 * 16 * (4 * 4 + 4 * 8 + 2 * 10)
    assert small.launched_flops == 4 * 128 * 64 * 16   # D = 16 runs in a 16-wide tile, the 64 class's config


def test_attention_index_set_and_key_padding():
    idx = kl.work_of("masked_attention_fwd", B=2, H=1, N_q=4, N_k=5, D=64, dtype="bf16", mask="index",
                     k_counts=[3, 5])
    assert idx.useful_flops == 4 * 64 * (4 * 3 + 4 * 5)
    assert idx.launched_flops == 4 * 128 * 64 * 64 * 2
    assert idx.bytes == 2 * 64 * (2 * 8 + 2 * 8) + 4 * 8       # only the 8 kept keys are read
    pad = kl.work_of("masked_attention_fwd", B=2, H=1, N_q=4, N_k=300, D=64, dtype="bf16", mask="key_padding",
                     k_counts=[3, 5], q_counts=[4, 2])
    assert pad.useful_flops == 4 * 64 * (4 * 3 + 2 * 5)
    assert pad.launched_flops == 4 * 128 * 64 * 64 * 5 * 2     # every one of 300 positions: 5 key blocks


def test_attention_varlen_programs_past_a_sequence_return():
    w = kl.work_of("masked_attention_fwd", B=2, H=1, N_q=200, N_k=200, D=64, dtype="bf16", mask="varlen",
                   seqlens=[200, 30])
    assert kl.grid_of("masked_attention_fwd", B=2, H=1, N_q=200, N_k=200, D=64, dtype="bf16", mask="varlen",
                      seqlens=[200, 30]) == (2, 2)
    assert w.useful_flops == 4 * 64 * (200 * 200 + 30 * 30)
    assert w.launched_flops == 4 * 128 * 64 * 64 * (2 * 4 + 1 * 1)   # sequence 2's second block returns


def test_attention_backward_two_passes():
    # bf16, D = 64: 32 x 32 tiles; per program 4 products per (key block, query block) for dK/dV and 3 per
    # (query block, key block) for dQ; useful is the 10 D per pair of a FlashAttention-2 backward.
    shape = dict(B=1, H=2, N_q=197, N_k=197, D=64, dtype="bf16")
    assert kl.config_of("masked_attention_bwd", **shape).constexprs == {"BLOCK_M": 32, "BLOCK_N": 32}
    assert kl.grid_of("masked_attention_bwd", **shape) == (7, 2)
    w = kl.work_of("masked_attention_bwd", **shape)
    assert w.useful_flops == 10 * 64 * 197 * 197 * 2
    assert w.launched_flops == 2 * 32 * 32 * 64 * (4 * 7 * 7 + 3 * 7 * 7) * 2
    assert w.ratio == pytest.approx(1.4 * 224 * 224 / 197**2)
    # Frames: key blocks of frame 1 skip the query blocks of frame 0, query blocks of frame 0 its keys.
    f = kl.work_of("masked_attention_bwd", B=1, H=1, N_q=512, N_k=512, D=64, dtype="bf16", frame_len=256)
    assert f.launched_flops == 2 * 32 * 32 * 64 * (4 * (8 * 16 + 8 * 8) + 3 * (8 * 8 + 8 * 16))
    assert f.ratio == pytest.approx(1.4)
    pre = kl.work_of("masked_attention_bwd_pre", **shape)
    assert pre.useful_flops == 2 * 64 * 197 * 2 and pre.launched_flops == 2 * 64 * 256 * 2


def test_attention_head_dim_80_pads_to_128():
    w = kl.work_of("masked_attention_fwd", B=1, H=1, N_q=256, N_k=256, D=80, dtype="bf16")
    assert w.ratio == pytest.approx(128 / 80)


def test_attention_launches_split_like_the_launcher():
    one = kl.attention_launches("fwd+bwd", "x", 3, B=2, H=4, N_q=8, N_k=8, D=16, dtype="bf16")
    assert [x.kernel for x in one] == ["masked_attention_fwd", "masked_attention_bwd_pre", "masked_attention_bwd"]
    assert all(x.count == 3 and kl.launches_of(x) == 3 for x in one)
    many = kl.attention_launches("fwd", B=70000, H=1, N_q=8, N_k=8, D=16, dtype="bf16")   # > 65535 (b, h) pairs
    assert kl.launches_of(many[0]) == 2
    assert kl.account(many[0]) == kl.work_of("masked_attention_fwd", B=70000, H=1, N_q=8, N_k=8, D=16, dtype="bf16")


def test_ema_blocks_of_each_tensor():
    w = kl.work_of("ema", numels=[4096, 1, 5000], dtype="fp32")
    assert w.useful_flops == kl.EMA_FLOPS * 9097
    assert w.launched_flops == kl.EMA_FLOPS * 4096 * (1 + 1 + 2)
    assert w.bytes == 9097 * 12
    assert kl.work_of("ema", numels=[10], dtype="fp32", online_dtype="bf16").bytes == 10 * (4 + 4 + 2)


def test_row_kernels():
    # D = 192 and 768 take the 4 x 256 row tile.
    loss = kl.work_of("latent_loss_fwd", M=10, D=192, dtype="bf16")
    assert loss.useful_flops == kl.LOSS_FWD_FLOPS * 10 * 192
    assert loss.launched_flops == kl.LOSS_FWD_FLOPS * 12 * 256
    assert loss.bytes == 2 * 2 * 10 * 192 + 10 * 5
    assert kl.work_of("latent_loss_bwd", M=40960, D=768, dtype="bf16").ratio == 1.0
    final = kl.work_of("latent_cost", B=300, H=5, D=192, dtype="fp32")
    assert final.launched_flops == kl.COST_FLOPS * 300 * 256 and final.ratio == pytest.approx(256 / 192)
    summed = kl.work_of("latent_cost", B=300, H=5, D=192, dtype="fp32", final=False)
    assert summed.useful_flops == 5 * final.useful_flops and summed.bytes == 4 * (1500 + 1) * 192 + 4 * 300


def test_planner_kernels():
    s = kl.work_of("sample_actions", E=2, N=300, P=10)
    assert kl.grid_of("sample_actions", E=2, N=300, P=10) == (2, 3)
    assert s.useful_flops == kl.SAMPLE_FLOPS * 2 * 3000 and s.launched_flops == kl.SAMPLE_FLOPS * 2 * 3072
    # P = 10 takes the 16-wide moment tile; N = 300 runs in 64-candidate blocks.
    assert kl.config_of("elite_refit", E=1, N=300, P=10).constexprs == {"BLOCK_N": 64, "BLOCK_P": 16}
    r = kl.work_of("elite_refit", E=1, N=300, P=10)
    assert r.useful_flops == kl.REFIT_RANK_FLOPS * 300**2 + kl.REFIT_MOMENT_FLOPS * 300 * 10
    assert r.launched_flops == kl.REFIT_RANK_FLOPS * 320**2 + kl.REFIT_MOMENT_FLOPS * 320 * 16
    assert kl.config_of("elite_refit", E=1, N=300, P=60).constexprs["BLOCK_P"] == 64


def test_calls_expand_by_scope():
    calls = [kl.Call("step", "fused_linear", dict(M="EN*L", K="C", N="3*C", dtype="fp32"), "qkv", "DEPTH1"),
             kl.Call("final", "linear_goal_cost", dict(M="EN", K="C", D="D", dtype="fp32"), "cost")]
    step = dict(EN=4, C=8, D=2, DEPTH1=2)
    launches = kl.expand(calls, {"step": [dict(step, L=2), dict(step, L=2), dict(step, L=6)], "final": [step]})
    assert [(x.kernel, x.shape.get("M"), x.count) for x in launches] == [
        ("fused_linear", 8, 4), ("fused_linear", 24, 2), ("linear_goal_cost", 4, 1)]
    assert launches[0].shape["N"] == 24
    with pytest.raises(ValueError, match=r"unknown symbol 'Q' in 'Q\*C'; known: \['C', 'D', 'DEPTH1', 'EN'\]"):
        kl.expand([kl.Call("final", "x", dict(M="Q*C"))], {"final": [step]})
    assert kl.account(kl.Launch("torch SDPA", dict(B=1))) is None


def test_bad_shapes_name_the_field_expected_and_actual():
    with pytest.raises(KeyError, match="no entry for kernel 'nope'"):
        kl.work_of("nope", M=1)
    with pytest.raises(ValueError, match=r"fused_linear shape has no field\(s\) \['Q'\]"):
        kl.work_of("fused_linear", M=1, K=1, N=1, dtype="fp32", Q=3)
    with pytest.raises(ValueError, match=r"fused_linear shape needs field\(s\) \['K', 'dtype'\], got \['M', 'N'\]"):
        kl.work_of("fused_linear", M=1, N=1)
    with pytest.raises(ValueError, match=r"fused_linear shape field 'M' must be an int >= 1, got 0"):
        kl.work_of("fused_linear", M=0, K=1, N=1, dtype="fp32")
    with pytest.raises(ValueError, match=r"field 'dtype' must be a float dtype or one of .*, got torch.int32"):
        kl.work_of("fused_linear", M=1, K=1, N=1, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"field 'mask' must be one of \('dense', 'key_padding', 'index', "
                                         r"'varlen'\), got 'causal'"):
        kl.work_of("masked_attention_fwd", B=1, H=1, N_q=4, N_k=4, D=16, dtype="bf16", mask="causal")
    with pytest.raises(ValueError, match=r"field 'k_counts' must hold B = 2 counts in \[0, 4\], got 1 values"):
        kl.work_of("masked_attention_fwd", B=2, H=1, N_q=4, N_k=4, D=16, dtype="bf16", mask="index", k_counts=[2])
    with pytest.raises(ValueError, match=r"field 'mode' must be one of \('cem', 'mppi'\), got 'top'"):
        kl.work_of("elite_refit", E=1, N=4, P=2, mode="top")
    with pytest.raises(ValueError, match="grid is not a formula"):
        kl.grid_of("ema", numels=[4], dtype="fp32")


# --------------------------------------------------------------------------------------------------
# The ledger's configs and grids are the launchers' (kernels replaced by recorders, CUDA tables)
# --------------------------------------------------------------------------------------------------
class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **meta)`` records (grid, meta)."""

    def __init__(self):
        self.launches: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((tuple(grid), meta))


@pytest.fixture
def record(monkeypatch):
    """``record(module, kernel name)`` -> its recorder; the launchers pick their CUDA configs."""
    monkeypatch.setattr(_launch, "interpreting", lambda: False)

    def patch(module: str, name: str) -> _Recorder:
        rec = _Recorder()
        monkeypatch.setattr(_mod(module), name, rec)
        return rec
    return patch


def _same_launch(rec: _Recorder, kernel: str, **shape) -> None:
    assert len(rec.launches) == 1, rec.launches
    grid, meta = rec.launches[0]
    cfg = kl.config_of(kernel, **shape)
    assert grid == kl.grid_of(kernel, **shape), (kernel, grid)
    assert {k: meta[k] for k in cfg.constexprs} == cfg.constexprs, (kernel, meta)
    assert (meta["num_warps"], meta["num_stages"]) == (cfg.num_warps, cfg.num_stages), kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M, K, N", [(70, 40, 100), (5, 2, 48), (300, 16, 192)])
def test_fused_linear_launch_is_the_ledgers(record, dtype, M, K, N):
    rec = record("fused_linear", "_fused_linear_kernel")
    x, w, b = torch.zeros(M, K, dtype=dtype), torch.zeros(N, K, dtype=dtype), torch.zeros(N, dtype=dtype)
    _mod("fused_linear").fused_linear_forward(x, w, b, True, 1e-6, False, None)
    _same_launch(rec, "fused_linear", M=M, K=K, N=N, dtype=dtype)


@pytest.mark.parametrize("D", [16, 100, 192])
def test_linear_goal_cost_launch_is_the_ledgers(record, D):
    rec = record("fused_linear", "_linear_goal_cost_kernel")
    x, w, goal = torch.zeros(90, 24), torch.zeros(D, 24), torch.zeros(3, D)
    _mod("fused_linear").linear_goal_cost_forward(x, w, None, goal, True, 1e-6, "l2")
    _same_launch(rec, "linear_goal_cost", M=90, K=24, D=D, dtype=torch.float32, G=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [16, 80, 128, 256])
@pytest.mark.parametrize("mask", ["dense", "index", "key_padding"])
def test_attention_launches_are_the_ledgers(record, dtype, D, mask):
    ma = _mod("masked_attention")
    fwd, pre, bwd = (record("masked_attention", f"_masked_attention_{k}_kernel") for k in ("fwd", "bwd_preprocess", "bwd"))
    B, H, N = 2, 3, 197
    q, k, v = (torch.zeros(B, H, N, D, dtype=dtype) for _ in range(3))
    idx = torch.arange(60, dtype=torch.int32).repeat(B, 1) if mask == "index" else None
    pad = torch.ones(B, N, dtype=torch.bool) if mask == "key_padding" else None
    out, lse = ma.masked_attention_forward(q, k, v, pad, None, idx, 0, 0.125)
    ma.masked_attention_backward(q, q, k, v, q, lse, pad, None, idx, 0, 0.125)
    shape = dict(B=B, H=H, N_q=N, N_k=60 if mask == "index" else N, D=D, dtype=dtype, mask=mask)
    for rec, kernel in ((fwd, "masked_attention_fwd"), (pre, "masked_attention_bwd_pre"), (bwd, "masked_attention_bwd")):
        _same_launch(rec, kernel, **shape)


@pytest.mark.parametrize("D", [48, 128, 768])
def test_row_kernel_launches_are_the_ledgers(record, D):
    fwd = record("latent_loss", "_latent_loss_fwd_kernel")
    bwd = record("latent_loss", "_latent_loss_bwd_kernel")
    cost = record("latent_cost", "_latent_cost_fwd_kernel")
    ll, lc = _mod("latent_loss"), _mod("latent_cost")
    pred, mask = torch.zeros(37, D), torch.ones(37, dtype=torch.bool)
    ll.latent_loss_forward(pred, pred, mask, "smooth_l1", 1.0)
    ll.latent_loss_backward(torch.ones(()), pred, pred, mask, "smooth_l1", 1.0, False)
    lc.latent_cost_forward(torch.zeros(37, 5, D), torch.zeros(1, D), None, "l2", "final")
    _same_launch(fwd, "latent_loss_fwd", M=37, D=D, dtype="fp32")
    _same_launch(bwd, "latent_loss_bwd", M=37, D=D, dtype="fp32")
    _same_launch(cost, "latent_cost", B=37, H=5, D=D, dtype="fp32")


@pytest.mark.parametrize("P", [1, 10, 30, 67])
def test_planner_kernel_launches_are_the_ledgers(record, P):
    sample = record("sample_actions", "_sample_actions_kernel")
    refit = record("elite_refit", "_elite_refit_kernel")
    E, N = 3, 300
    mean, std = torch.zeros(E, P), torch.ones(E, P)
    _mod("sample_actions").sample_actions_forward(mean, std, torch.zeros(1), torch.ones(1),
                                                  torch.zeros(2, dtype=torch.int64), N, True)
    _mod("elite_refit").elite_refit_forward(torch.zeros(E, N), torch.zeros(E, N, P), mean, std, "cem", 30, 1.0,
                                            0.0, 0.0)
    _same_launch(sample, "sample_actions", E=E, N=N, P=P)
    _same_launch(refit, "elite_refit", E=E, N=N, P=P)
