"""Action-conditioned JEPA world model: frame encoder, action encoder, frame-causal latent predictor.

    encode:   obs [B, C, H, W] --ViT--> tokens [B, N, De] --mean--> [B, De] --Linear--> z [B, D]
    predict:  z [B, T, D], a [B, T, A] -> tokens [z_0, a_0, z_1, a_1, ...]   [B, 2T, Dp]
              -> blocks, frame-causal (frame t = [embedding token, action token]: it sees frames <= t)
              -> action-token rows --LayerNorm, Linear--> z_next [B, T, D]   (z_next[:, t] ~ z_{t+1})
    rollout:  autoregressive in latent space over a sliding window of `history` frames.

A frame's two tokens share its learned time position (the window's frame index) and carry a learned
type embedding (embedding or action). The prediction at step t reads the action token of frame t, so
it sees z_0..z_t and a_0..a_t and nothing after: one teacher-forced pass predicts every step.

:meth:`WorldModel.rollout_spec` exports what an inference rollout needs (the layout and the weights
with every LayerNorm folded into the next linear layer) as a :class:`RolloutSpec`: the one place that
reads the modules' internals for ``jepa_engine.planning.rollout.FusedRollout``.

Anti-collapse (used by the trainer, `jepa_engine.training.world_model`): an EMA target encoder
(stop-gradient) or SIGReg (:func:`sigreg`, LeJEPA's sketched Epps-Pulley normality statistic), chosen by
``WorldModelConfig.anti_collapse``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from jepa_engine.config import ConfigIO
from jepa_engine.kernels.fused_linear import fold_layernorm
from jepa_engine.models.blocks import Block, init_weights, rescale_residual_weights
from jepa_engine.models.vit import VisionTransformer, ViTConfig

__all__ = ["WorldModelConfig", "WorldModel", "WM_PRESETS", "FrameEncoder", "ActionEncoder", "LatentPredictor",
           "RolloutSpec", "FoldedBlock", "sigreg"]

ANTI_COLLAPSE = ("sigreg", "ema")
POOLS = ("mean", "flat")


@dataclass
class WorldModelConfig(ConfigIO):
    # frames
    img_size: int = 64
    in_chans: int = 1
    patch_size: int = 8
    # encoder: a small ViT, mean-pooled and projected to embed_dim
    enc_dim: int = 64
    enc_depth: int = 2
    enc_heads: int = 4
    embed_dim: int = 32           # D: the world model's latent
    pool: str = "mean"            # "mean" over patches, or "flat": every patch token into the projector
    # actions and predictor
    action_dim: int = 2
    history: int = 3              # frames in the predictor's window
    pred_dim: int = 64
    pred_depth: int = 2
    pred_heads: int = 4
    mlp_ratio: float = 4.0
    # anti-collapse
    anti_collapse: str = "sigreg"  # "sigreg" or "ema"
    sigreg_weight: float = 0.1
    sigreg_projections: int = 256
    sigreg_knots: int = 17
    ema_momentum: float = 0.99

    def __post_init__(self):
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"WorldModelConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        for name in ("img_size", "in_chans", "patch_size", "enc_dim", "enc_depth", "enc_heads", "embed_dim",
                     "action_dim", "history", "pred_dim", "pred_depth", "pred_heads", "sigreg_projections"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise bad(name, "an int >= 1")
        if self.img_size % self.patch_size:
            raise bad("img_size", f"divisible by patch_size = {self.patch_size}")
        if self.enc_dim % self.enc_heads or self.enc_dim % 4:
            raise bad("enc_dim", f"divisible by enc_heads = {self.enc_heads} and by 4")
        if self.pred_dim % self.pred_heads:
            raise bad("pred_dim", f"divisible by pred_heads = {self.pred_heads}")
        if self.pool not in POOLS:
            raise bad("pool", f"one of {POOLS}")
        if self.anti_collapse not in ANTI_COLLAPSE:
            raise bad("anti_collapse", f"one of {ANTI_COLLAPSE}")
        if not (self.sigreg_weight >= 0 and math.isfinite(self.sigreg_weight)):
            raise bad("sigreg_weight", "a finite float >= 0")
        if not (isinstance(self.sigreg_knots, int) and self.sigreg_knots >= 3):
            raise bad("sigreg_knots", "an int >= 3")
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise bad("ema_momentum", "in [0, 1]")

    @classmethod
    def presets(cls) -> dict:
        """:data:`WM_PRESETS`: ``"demo"``, ``"lewm"``, ``"test"``."""
        return WM_PRESETS

    def vit_config(self) -> ViTConfig:
        return ViTConfig(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                         embed_dim=self.enc_dim, depth=self.enc_depth, num_heads=self.enc_heads,
                         mlp_ratio=self.mlp_ratio)


WM_PRESETS: dict[str, dict] = {
    # Trains on 2 CPU cores in a few minutes (64x64 grey frames, 64 patches).
    "demo": dict(pool="flat"),
    # Test-sized: 32x32 frames, 16 patches, one block each; trains in seconds.
    "test": dict(img_size=32, enc_dim=32, enc_depth=1, enc_heads=2, embed_dim=16, pool="flat", pred_dim=32, pred_depth=2,
                 pred_heads=2, sigreg_projections=64),
    # LeWorldModel scale: 192-dim latent, history 3, a ViT-tiny-like encoder (~5.4M parameters) and a
    # ~10.7M-parameter predictor.
    "lewm": dict(enc_dim=192, enc_depth=12, enc_heads=3, embed_dim=192, history=3, pred_dim=384, pred_depth=6,
                 pred_heads=6),
}


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------
class FrameEncoder(nn.Module):
    """``forward(obs [B, C, H, W]) -> z [B, embed_dim]``: ViT, pooling, projector.

    Pooling "mean" averages the patch tokens; "flat" feeds every patch token to the projector (the
    patch layout then reaches the latent directly, which small models learn much faster from).
    The projector is Linear + BatchNorm (LeWorldModel's choice): the pooled ViT outputs of two frames
    differ only in the few patches the mass covers, so without a per-dimension standardisation the
    embeddings start nearly collapsed, where SIGReg's gradient vanishes. In eval mode BatchNorm is
    a fixed affine map (running statistics).
    """

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        self.vit = VisionTransformer(cfg.vit_config())
        self.pool = cfg.pool
        n_in = cfg.enc_dim * (cfg.vit_config().num_patches if cfg.pool == "flat" else 1)
        self.proj = nn.Linear(n_in, cfg.embed_dim)
        self.bn = nn.BatchNorm1d(cfg.embed_dim)
        init_weights(self.proj)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        tokens = self.vit(obs)                                                   # [B, N, De]
        pooled = tokens.flatten(1) if self.pool == "flat" else tokens.mean(dim=1)
        return self.bn(self.proj(pooled))


class ActionEncoder(nn.Module):
    """``forward(a [..., A]) -> [..., pred_dim]``: a two-layer MLP (one token per action)."""

    def __init__(self, action_dim: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(action_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.net.apply(init_weights)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.net(a)


class FrameCausalBlock(Block):
    """A :class:`Block` whose attention is frame-causal over frames of ``frame_len = 2`` tokens."""

    def forward(self, x: torch.Tensor, key_padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), frame_size=1, frame_extra_tokens=1)
        return x + self.mlp(self.norm2(x))


class LatentPredictor(nn.Module):
    """``forward(z [B, T, D], a_tok [B, T, Dp]) -> z_next [B, T, D]`` for ``T <= history``."""

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        self.cfg = cfg
        Dp = cfg.pred_dim
        self.embed = nn.Linear(cfg.embed_dim, Dp)
        self.time_pos = nn.Parameter(torch.zeros(cfg.history, Dp))
        self.type_embed = nn.Parameter(torch.zeros(2, Dp))        # 0: embedding token, 1: action token
        self.blocks = nn.ModuleList(FrameCausalBlock(Dp, cfg.pred_heads, cfg.mlp_ratio) for _ in range(cfg.pred_depth))
        self.norm = nn.LayerNorm(Dp, eps=1e-6)
        self.out = nn.Linear(Dp, cfg.embed_dim)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.time_pos, std=0.02)
        nn.init.trunc_normal_(self.type_embed, std=0.02)
        rescale_residual_weights(self.blocks)

    def forward(self, z: torch.Tensor, a_tok: torch.Tensor) -> torch.Tensor:
        B, T, _ = z.shape
        pos = self.time_pos[:T].to(z.dtype)                                      # [T, Dp]
        ze = self.embed(z) + pos + self.type_embed[0]                            # [B, T, Dp]
        ae = a_tok + pos + self.type_embed[1]                                    # [B, T, Dp]
        x = torch.stack([ze, ae], dim=2).reshape(B, 2 * T, -1)                   # [z_0, a_0, z_1, a_1, ...]
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x[:, 1::2]))                                   # action-token rows


@dataclass(frozen=True)
class FoldedBlock:
    """One predictor block for inference: ``x += proj(attn(qkv(LN0(x))))``, then
    ``x += fc2(gelu(fc1(LN0(x))))``, where LN0 is layer norm without affine (eps ``eps_attn`` /
    ``eps_mlp``): norm1's and norm2's scale and shift are folded into ``qkv`` and ``fc1``. ``w_qkv``
    rows are queries, keys, values (``C`` each, ``C = heads * head_dim``); weights in ``nn.Linear``
    layout, biases None where the layer has none."""

    heads: int
    head_dim: int
    scale: float
    eps_attn: float
    w_qkv: torch.Tensor                  # [3C, C]
    b_qkv: torch.Tensor                  # [3C]
    w_proj: torch.Tensor                 # [C, C]
    b_proj: Optional[torch.Tensor]
    eps_mlp: float
    w_fc1: torch.Tensor                  # [hidden, C]
    b_fc1: torch.Tensor
    w_fc2: torch.Tensor                  # [C, hidden]
    b_fc2: Optional[torch.Tensor]


@dataclass(frozen=True)
class RolloutSpec:
    """A :class:`WorldModel`'s predictor and action encoder as an inference rollout reads them
    (:meth:`WorldModel.rollout_spec`; detached tensors in ``dtype``).

    Layout: a window of at most ``window`` frames; frame t is two tokens, its embedding token
    ``embed(z_t) + pos_type[t, 0]`` then its action token ``act2(gelu(act1(a_t))) + pos_type[t, 1]``;
    ``blocks`` run frame-causal attention (a token sees the tokens of its own and earlier frames);
    the prediction ``z_{t+1}`` is ``out(LN0(x))`` of frame t's action token (the final norm folded into
    ``out``, eps ``eps_out``).
    """

    window: int                          # frames in the predictor's window (WorldModelConfig.history)
    embed_dim: int                       # D: the latent
    action_dim: int                      # A
    width: int                           # C: the predictor's token width
    dtype: torch.dtype
    w_embed: torch.Tensor                # [C, D]: latent -> embedding token
    b_embed: Optional[torch.Tensor]
    w_act1: torch.Tensor                 # [C, A]: the action encoder, Linear -> exact GELU -> Linear
    b_act1: Optional[torch.Tensor]
    w_act2: torch.Tensor                 # [C, C]
    b_act2: Optional[torch.Tensor]
    pos_type: torch.Tensor               # [window, 2, C]: time position + token type (0 embedding, 1 action)
    blocks: tuple[FoldedBlock, ...]
    eps_out: float
    w_out: torch.Tensor                  # [D, C]
    b_out: torch.Tensor                  # [D]


def _expect(module: nn.Module, kind: type, where: str) -> nn.Module:
    if type(module) is not kind or getattr(module, "approximate", "none") != "none":
        raise TypeError(f"WorldModel.rollout_spec: {where} must be a {kind.__name__} (exact, for GELU): the folded "
                        f"rollout computes one, got {module!r}")
    return module


def _linear(module: nn.Module, where: str, dtype: torch.dtype):
    m = _expect(module, nn.Linear, where)
    return m.weight.detach().to(dtype), (m.bias.detach().to(dtype) if m.bias is not None else None)


def _folded(norm: nn.Module, linear: nn.Module, where: str, dtype: torch.dtype):
    """(weight, bias) of ``linear(norm(x))`` with the norm's scale and shift folded into the linear."""
    _expect(norm, nn.LayerNorm, f"the norm before {where}")
    return tuple(t.to(dtype) for t in fold_layernorm(norm, _expect(linear, nn.Linear, where)))


def _fold_block(block: nn.Module, where: str, dtype: torch.dtype) -> FoldedBlock:
    if type(block) is not FrameCausalBlock:
        raise TypeError(f"WorldModel.rollout_spec: {where} must be a FrameCausalBlock (pre-norm, frame-causal over "
                        f"2-token frames) for the folded rollout, got {type(block).__name__}")
    attn, mlp = block.attn, block.mlp
    _expect(mlp.act, nn.GELU, f"{where}.mlp.act")
    return FoldedBlock(attn.num_heads, attn.head_dim, attn.scale,
                       block.norm1.eps, *_folded(block.norm1, attn.qkv, f"{where}.attn.qkv", dtype),
                       *_linear(attn.proj, f"{where}.attn.proj", dtype),
                       block.norm2.eps, *_folded(block.norm2, mlp.fc1, f"{where}.mlp.fc1", dtype),
                       *_linear(mlp.fc2, f"{where}.mlp.fc2", dtype))


class WorldModel(nn.Module):
    """Encoder + action encoder + frame-causal predictor. See the module docstring for the shapes."""

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = FrameEncoder(cfg)
        self.action_encoder = ActionEncoder(cfg.action_dim, cfg.pred_dim)
        self.predictor = LatentPredictor(cfg)

    # ---- validation
    def _check_history(self, method: str, dim: str, z_hist: torch.Tensor) -> tuple[int, int]:
        """Check z_hist [B, T, D] with 1 <= T <= history; return (B, T)."""
        self._check("z_hist", z_hist, (None, None, self.cfg.embed_dim))
        B, T, _ = z_hist.shape
        if not 1 <= T <= self.cfg.history:
            raise ValueError(f"WorldModel.{method}: z_hist must have 1 <= {dim} <= history = {self.cfg.history} "
                             f"frames, got {T}")
        return B, T

    def _check(self, name: str, x: torch.Tensor, shape: tuple) -> None:
        """shape entries: an int (must match) or None (any)."""
        ok = x.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, x.shape))
        if not ok:
            want = ", ".join("*" if s is None else str(s) for s in shape)
            raise ValueError(f"WorldModel: {name} must be [{want}], got {list(x.shape)}")

    # ---- API
    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        """obs [B, C, H, W] in [0, 1] -> z [B, D]."""
        c = self.cfg
        self._check("obs", obs, (None, c.in_chans, c.img_size, c.img_size))
        return self.encoder(obs)

    def encode_frames(self, obs: torch.Tensor) -> torch.Tensor:
        """obs [B, T, C, H, W] -> z [B, T, D] (all frames in one encoder batch)."""
        B, T = obs.shape[:2]
        return self.encode(obs.flatten(0, 1)).view(B, T, -1)

    def predict(self, z_hist: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Teacher-forced: z_hist [B, T, D], actions [B, T, A] -> z_next [B, T, D], T <= history.

        ``z_next[:, t]`` predicts the embedding after ``actions[:, t]`` from frames ``<= t`` only.
        """
        c = self.cfg
        B, T = self._check_history("predict", "T", z_hist)
        self._check("actions", actions, (B, T, c.action_dim))
        return self.predictor(z_hist, self.action_encoder(actions.to(z_hist.dtype)))

    @torch.no_grad()
    def rollout_spec(self, dtype: Optional[torch.dtype] = None) -> RolloutSpec:
        """The predictor and action encoder as a :class:`RolloutSpec` (detached, in ``dtype``, default the
        predictor's). The one reader of their internals: a structural change fails here, naming the part."""
        c, p = self.cfg, self.predictor
        dt = dtype or p.embed.weight.dtype
        net = self.action_encoder.net
        if len(net) != 3 or tuple(p.type_embed.shape) != (2, c.pred_dim):
            raise TypeError(f"WorldModel.rollout_spec: the folded rollout needs action_encoder.net = Linear, GELU, "
                            f"Linear ({len(net)} layers) and 2 token types ({list(p.type_embed.shape)})")
        _expect(net[1], nn.GELU, "action_encoder.net[1]")
        return RolloutSpec(
            c.history, c.embed_dim, c.action_dim, c.pred_dim, dt, *_linear(p.embed, "predictor.embed", dt),
            *_linear(net[0], "action_encoder.net[0]", dt), *_linear(net[2], "action_encoder.net[2]", dt),
            (p.time_pos[:, None, :] + p.type_embed[None]).detach().to(dt),
            tuple(_fold_block(b, f"predictor.blocks[{i}]", dt) for i, b in enumerate(p.blocks)),
            p.norm.eps, *_folded(p.norm, p.out, "predictor.out", dt))

    def rollout(self, z_hist: torch.Tensor, actions: torch.Tensor,
                past_actions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Autoregressive latent rollout: z_hist [B, h, D], actions [B, H, A] -> z [B, H, D].

        ``past_actions [B, h-1, A]`` are the actions taken between the history frames (zeros when
        None). ``z[:, k]`` is the embedding after ``actions[:, k]``. The window keeps the last
        ``history`` frames; the action tokens are encoded once for the whole sequence.
        """
        c = self.cfg
        B, h = self._check_history("rollout", "h", z_hist)
        self._check("actions", actions, (B, None, c.action_dim))
        H = actions.shape[1]
        if H < 1:
            raise ValueError(f"WorldModel.rollout: actions must have a horizon H >= 1, got {H}")
        if past_actions is None:
            past_actions = actions.new_zeros(B, h - 1, c.action_dim)
        self._check("past_actions", past_actions, (B, h - 1, c.action_dim))
        a_tok = self.action_encoder(torch.cat([past_actions, actions], dim=1).to(z_hist.dtype))  # [B, h-1+H, Dp]
        z_win, outs = z_hist, []
        for k in range(H):
            end = h + k                                         # frames so far: z_0 .. z_{end-1}
            start = max(0, end - c.history)
            z_next = self.predictor(z_win, a_tok[:, start:end])[:, -1]      # [B, D]
            outs.append(z_next)
            z_win = torch.cat([z_win, z_next[:, None]], dim=1)[:, -c.history:]
        return torch.stack(outs, dim=1)


# --------------------------------------------------------------------------------------------------
# SIGReg (LeJEPA): sketched isotropic Gaussian regularisation
# --------------------------------------------------------------------------------------------------
def sigreg(z: torch.Tensor, num_projections: int = 256, knots: int = 17, t_max: float = 3.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Epps-Pulley normality statistic of ``z [N, D]`` along random 1-D projections, averaged.

    For each unit direction ``u`` (``num_projections`` of them, drawn fresh), ``x = z @ u`` is
    compared with N(0, 1) through the characteristic function::

        EP(x) = N * integral_{-t_max}^{t_max} |phi_x(t) - exp(-t^2/2)|^2 exp(-t^2/2) dt

    with ``phi_x(t) = mean_n exp(i t x_n)`` (trapezoid rule on ``knots`` points over [0, t_max],
    doubled by symmetry). It is O(1) for N(0, I) samples and grows with N when the embeddings
    collapse or drift from zero mean / unit variance. Differentiable in ``z``.
    """
    if z.dim() != 2:
        raise ValueError(f"sigreg: z must be [N, D], got {list(z.shape)}")
    N, D = z.shape
    u = torch.randn(D, num_projections, device=z.device, dtype=torch.float32, generator=generator)
    u = u / u.norm(dim=0, keepdim=True)
    x = z.float() @ u                                                        # [N, P]
    t = torch.linspace(0.0, t_max, knots, device=z.device)                   # [K]
    tx = x[:, :, None] * t                                                   # [N, P, K]
    cos_m, sin_m = tx.cos().mean(0), tx.sin().mean(0)                        # [P, K]
    gauss = torch.exp(-0.5 * t * t)                                          # [K]
    err = ((cos_m - gauss) ** 2 + sin_m ** 2) * gauss                        # [P, K]
    dt = t_max / (knots - 1)
    w = torch.full((knots,), dt, device=z.device)
    w[0] = w[-1] = dt / 2
    return N * 2.0 * (err * w).sum(-1).mean()
