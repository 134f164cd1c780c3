"""ViT encoder and I-JEPA predictor: preset shapes and sizes, key padding end to end, context
dependence, config round trips, and a few optimizer steps that lower a JEPA-like loss.

Shape and semantics tests force the reference attention (the interpreter is slow on CPU); the
padding-invariance test also runs the fused kernel path on a micro config when Triton can run."""
from __future__ import annotations

import copy

import pytest
import torch

from jepa_engine.kernels import latent_loss, use_backend
from jepa_engine.masks import MaskConfig, MultiBlockMaskCollator, apply_index
from jepa_engine.models import (PREDICTOR_PRESETS, VIT_PRESETS, Predictor, PredictorConfig, VisionTransformer,
                                ViTConfig, sincos_pos_embed_2d)
from tests.helpers import assert_close

MICRO = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)  # 4x4 grid, head dim 16


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _masks(grid, B, seed=0):
    return MultiBlockMaskCollator(MaskConfig(grid=grid, min_keep=2)).sample(B, torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------------
# Presets: sizes and shapes
# ------------------------------------------------------------------------------------------------
# name -> (encoder params, predictor params) in millions, for the default 64x64x1 images, patch 8.
EXPECTED_M = {"tiny": (0.80, 0.17), "small": (21.3, 2.82), "base": (85.1, 21.9)}


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_preset_parameter_counts(name):
    cfg = ViTConfig.from_name(name)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == VIT_PRESETS[name]
    with torch.device("meta" if name == "base" else "cpu"):  # meta: counts without initialising 107M weights
        enc = VisionTransformer(cfg)
        pred = Predictor(PredictorConfig.for_encoder(cfg))
    enc_m, pred_m = _n_params(enc) / 1e6, _n_params(pred) / 1e6
    exp_enc, exp_pred = EXPECTED_M[name]
    assert abs(enc_m - exp_enc) < 0.05 * exp_enc, (name, enc_m)
    assert abs(pred_m - exp_pred) < 0.05 * exp_pred, (name, pred_m)
    assert pred.cfg.predictor_dim < cfg.embed_dim
    # Positions are a fixed buffer, not a parameter (and not saved in the state dict).
    assert "pos_embed" in dict(enc.named_buffers()) and "pos_embed" not in dict(enc.named_parameters())
    assert "pos_embed" not in enc.state_dict()


def test_vit_b16_geometry_has_86m_parameters():
    """ViT-B at the usual 224x224x3, patch 16 geometry: ~86M parameters as published (no cls token)."""
    with torch.device("meta"):
        enc = VisionTransformer(ViTConfig.from_name("base", img_size=224, patch_size=16, in_chans=3))
    assert 85.5e6 < _n_params(enc) < 86.5e6, _n_params(enc)
    assert enc.grid == (14, 14) and enc.num_patches == 196


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_preset_forward_shapes(name):
    cfg = ViTConfig.from_name(name, depth=2) if name != "tiny" else ViTConfig.from_name(name)  # depth: time only
    enc = VisionTransformer(cfg).eval()
    pred = Predictor(PredictorConfig.for_encoder(ViTConfig.from_name(name), depth=1))
    B = 2
    m = _masks(cfg.grid, B)
    x = torch.randn(B, cfg.in_chans, cfg.img_size, cfg.img_size)
    with use_backend("reference"), torch.no_grad():
        full = enc(x)
        ctx = enc(x, m.context_index, m.context_valid)
        out = pred(ctx, m.context_index, m.context_valid, m.target_index, m.target_valid)
    assert full.shape == (B, 64, cfg.embed_dim)
    assert ctx.shape == (B, m.context_index.shape[1], cfg.embed_dim)
    assert out.shape == (B, m.target_index.shape[1], cfg.embed_dim)
    assert torch.isfinite(full).all() and torch.isfinite(out[m.target_valid]).all()


def test_three_channel_images():
    cfg = ViTConfig.from_name("tiny", in_chans=3)
    enc = VisionTransformer(cfg)
    with use_backend("reference"):
        assert enc(torch.randn(2, 3, 64, 64)).shape == (2, 64, 128)
    with pytest.raises(ValueError, match=r"x must be \[B, 3, 64, 64\]"):
        enc(torch.randn(2, 1, 64, 64))


def test_sincos_positions():
    pe = sincos_pos_embed_2d(16, (3, 5))
    assert pe.shape == (15, 16) and pe.dtype == torch.float32
    # row features depend only on the row, column features only on the column
    assert torch.equal(pe[0, :8], pe[4, :8]) and not torch.equal(pe[0, :8], pe[5, :8])
    assert torch.equal(pe[0, 8:], pe[5, 8:]) and not torch.equal(pe[0, 8:], pe[1, 8:])
    assert len({tuple(r.tolist()) for r in pe}) == 15  # every patch has its own position
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(10, (2, 2))


# ------------------------------------------------------------------------------------------------
# Key padding end to end
# ------------------------------------------------------------------------------------------------
def _padding_invariance(enc, grid, in_chans, img, device="cpu"):
    """Inputs drawn on CPU (the same numbers on every device), the encoder run on ``device``."""
    B = 3
    m = _masks(grid, B, seed=5)
    x = torch.randn(B, in_chans, img, img)
    extra = torch.randint(0, grid[0] * grid[1], (B, 5))
    enc, x, extra = enc.to(device), x.to(device), extra.to(device)
    context_index, context_valid = m.context_index.to(device), m.context_valid.to(device)
    with torch.no_grad():
        base = enc(x, context_index, context_valid)
        # grow the padding by 5 entries pointing at arbitrary patches: valid rows must not change
        index = torch.cat([context_index, extra], 1)
        valid = torch.cat([context_valid, torch.zeros(B, 5, dtype=torch.bool, device=device)], 1)
        grown = enc(x, index, valid)
        # and each sample alone, with no padding at all
        alone = [enc(x[b:b + 1], context_index[b:b + 1, :n], None) for b, n in enumerate(m.context_counts.tolist())]
    K = m.context_index.shape[1]
    for b, n in enumerate(m.context_counts.tolist()):
        assert_close(grown[b, :n], base[b, :n], torch.float32, what=f"sample {b}: grown padding", scale=10)
        assert_close(base[b, :n], alone[b][0], torch.float32, what=f"sample {b}: padded vs alone", scale=10)
    assert (m.context_counts < K).any(), "the test needs at least one padded sample"


def test_encoder_padding_invariance_reference():
    cfg = ViTConfig.from_name("tiny")
    enc = VisionTransformer(cfg).eval()
    with use_backend("reference"):
        _padding_invariance(enc, cfg.grid, cfg.in_chans, cfg.img_size)


def test_encoder_padding_invariance_fused_kernel(kernel_device):
    cfg = ViTConfig(**MICRO)
    enc = VisionTransformer(cfg).eval()
    _padding_invariance(enc, cfg.grid, cfg.in_chans, cfg.img_size, kernel_device)


def test_index_of_every_patch_equals_the_full_forward():
    cfg = ViTConfig.from_name("tiny")
    enc = VisionTransformer(cfg).eval()
    x = torch.randn(2, 1, 64, 64)
    index = torch.arange(64).expand(2, -1)
    with use_backend("reference"), torch.no_grad():
        assert_close(enc(x, index, torch.ones(2, 64, dtype=torch.bool)), enc(x), torch.float32, what="all valid")
        # a permuted index gives the permuted tokens (positions travel with the patches)
        perm = torch.randperm(64).expand(2, -1)
        assert_close(enc(x, perm), apply_index(enc(x), perm), torch.float32, what="permuted", scale=10)


# ------------------------------------------------------------------------------------------------
# Predictor
# ------------------------------------------------------------------------------------------------
def test_predictor_shape_context_dependence_and_padding():
    vcfg = ViTConfig.from_name("tiny")
    pred = Predictor(PredictorConfig.for_encoder(vcfg)).eval()
    B = 4
    m = _masks(vcfg.grid, B, seed=1)
    ctx = torch.randn(B, m.context_index.shape[1], vcfg.embed_dim)
    args = (m.context_index, m.context_valid, m.target_index, m.target_valid)
    with use_backend("reference"), torch.no_grad():
        out = pred(ctx, *args)
        assert out.shape == (B, m.target_index.shape[1], vcfg.embed_dim)
        # depends on the context values ...
        ctx2 = ctx.clone()
        ctx2[m.context_valid] += 1.0
        assert (pred(ctx2, *args) - out)[m.target_valid].abs().max() > 1e-3
        # ... but not on padded context rows, nor on padded target entries
        ctx3 = ctx.clone()
        ctx3[~m.context_valid] = 1e3
        t_index = m.target_index.clone()
        t_index[~m.target_valid] = 7
        out3 = pred(ctx3, m.context_index, m.context_valid, t_index, m.target_valid)
        assert_close(out3[m.target_valid], out[m.target_valid], torch.float32, what="padding changed", scale=10)
        # different target positions get different predictions (positions reach the queries)
        b = int(m.target_counts.argmax())
        n = int(m.target_counts[b])
        assert len({tuple(r.round(decimals=5).tolist()) for r in out[b, :n]}) == n


def test_predictor_validates_shapes():
    vcfg = ViTConfig.from_name("tiny")
    pred = Predictor(PredictorConfig.for_encoder(vcfg))
    m = _masks(vcfg.grid, 2)
    ctx = torch.randn(2, m.context_index.shape[1], vcfg.embed_dim)
    with pytest.raises(ValueError, match="target_valid must be"):
        pred(ctx, m.context_index, m.context_valid, m.target_index, m.target_valid[:, :-1])
    with pytest.raises(ValueError, match="ctx must be"):
        pred(ctx[..., :-1], m.context_index, m.context_valid, m.target_index, m.target_valid)


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(VIT_PRESETS))
def test_config_json_round_trip(name, tmp_path):
    v = ViTConfig.from_name(name, in_chans=3, drop_path=0.1)
    p = PredictorConfig.for_encoder(v, name)
    assert ViTConfig.from_json(v.to_json()) == v
    assert ViTConfig.from_dict(v.to_dict()) == v
    assert PredictorConfig.from_json(p.to_json()) == p
    assert isinstance(PredictorConfig.from_json(p.to_json()).grid, tuple)
    path = tmp_path / "predictor.json"
    p.to_json(path)
    assert PredictorConfig.from_json(path) == p
    assert p.embed_dim == v.embed_dim and p.grid == v.grid
    assert (p.predictor_dim, p.depth, p.num_heads) == PREDICTOR_PRESETS[name]


def test_config_errors():
    with pytest.raises(ValueError, match="name must be one of"):
        ViTConfig.from_name("huge")
    with pytest.raises(ValueError, match="unknown fields"):
        ViTConfig.from_dict({"embed_dims": 128})
    with pytest.raises(ValueError, match="divisible by patch_size"):
        ViTConfig(img_size=60, patch_size=8)
    with pytest.raises(ValueError, match="no preset matches"):
        PredictorConfig.for_encoder(ViTConfig(embed_dim=64, depth=2, num_heads=2))


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def test_a_few_steps_reduce_a_jepa_loss():
    """Encoder on the context, predictor at the targets, a frozen target encoder on the full image."""
    vcfg = ViTConfig.from_name("tiny", embed_dim=64, depth=2)
    enc = VisionTransformer(vcfg)
    pred = Predictor(PredictorConfig.for_encoder(vcfg, "tiny", depth=2))
    target_enc = copy.deepcopy(enc).requires_grad_(False)
    B = 4
    m = _masks(vcfg.grid, B, seed=2)
    x = torch.randn(B, 1, 64, 64)
    with use_backend("reference"), torch.no_grad():
        h = torch.nn.functional.layer_norm(target_enc(x), (vcfg.embed_dim,))
        target = apply_index(h, m.target_index)
    opt = torch.optim.AdamW([*enc.parameters(), *pred.parameters()], lr=1e-3)
    losses = []
    with use_backend("reference"):
        for _ in range(8):
            z = enc(x, m.context_index, m.context_valid)
            p = pred(z, m.context_index, m.context_valid, m.target_index, m.target_valid)
            loss = latent_loss(p, target, m.target_valid)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert pred.mask_token.grad is not None and pred.mask_token.grad.abs().sum() > 0


def test_drop_path_is_stochastic_in_training_only():
    cfg = ViTConfig.from_name("tiny", depth=2, drop_path=0.5)
    enc = VisionTransformer(cfg)
    x = torch.randn(4, 1, 64, 64)
    with use_backend("reference"), torch.no_grad():
        enc.train()
        assert not torch.equal(enc(x), enc(x))
        enc.eval()
        assert torch.equal(enc(x), enc(x))
