"""Linear probe: does the frozen latent encode the world's physical state?

Features are the mean-pooled encoder outputs of two consecutive frames, ``[e(o_t), e(o_{t+1})]`` (one
frame shows where the mass is; two show how fast it moves). Targets are the true state at ``t+1``:
``x, y, vx, vy``. The probe is closed-form ridge regression on standardised features (fp64
``torch.linalg.solve``), its ridge strength picked on a validation split of the training episodes, and
scored by R^2 per target on held-out episodes from another seed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from jepa_engine.envs import TrajectoryStream, WorldConfig

TARGETS = ("x", "y", "vx", "vy")


@dataclass
class ProbeResult:
    r2: dict[str, float]        # per target, on held-out data
    r2_position: float          # mean of x and y
    r2_velocity: float          # mean of vx and vy
    ridge: float                # the chosen ridge strength
    n_train: int
    n_test: int

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        per = ", ".join(f"{k} {v:.3f}" for k, v in self.r2.items())
        return (f"linear probe R^2: position {self.r2_position:.3f}, velocity {self.r2_velocity:.3f} "
                f"({per}; ridge {self.ridge:g}; {self.n_train} train / {self.n_test} held-out pairs)")


@torch.no_grad()
def embed(encoder: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Mean-pooled encoder output: images [N, C, H, W] -> [N, D] fp32."""
    out = []
    use_bf16 = images.device.type == "cuda"
    for i in range(0, images.shape[0], batch_size):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            z = encoder(images[i:i + batch_size])   # [b, N, D]
        out.append(z.float().mean(dim=1))
    return torch.cat(out)


def ridge_fit(x: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression y ~ x @ W + b (the bias is not penalised): x [N, F], y [N, T]."""
    x, y = x.double(), y.double()
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    gram = xc.T @ xc + ridge * x.shape[0] * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    w = torch.linalg.solve(gram, xc.T @ yc)
    return w, ym - xm @ w


def r2_score(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Coefficient of determination per column: 1 - SS_res / SS_tot."""
    pred, y = pred.double(), y.double()
    ss_res = (y - pred).square().sum(0)
    ss_tot = (y - y.mean(0)).square().sum(0).clamp_min(1e-12)
    return 1.0 - ss_res / ss_tot


def _pairs(encoder, world: WorldConfig, n_pairs: int, episode_len: int, seed: int, device) -> tuple:
    envs = -(-n_pairs // episode_len)
    batch = next(iter(TrajectoryStream(world, envs, episode_len, policy="random", seed=seed, device=device,
                                       num_batches=1)))
    obs, states = batch["obs"], batch["states"]          # [E, T+1, C, H, W], [E, T+1, 4]
    e = embed(encoder, obs.flatten(0, 1)).view(envs, episode_len + 1, -1)
    feats = torch.cat([e[:, :-1], e[:, 1:]], dim=-1).flatten(0, 1)   # [E*T, 2D]
    return feats[:n_pairs], states[:, 1:].flatten(0, 1)[:n_pairs].float()


def linear_probe(encoder: nn.Module, world: Optional[WorldConfig] = None, *, n_train: int = 2048,
                 n_test: int = 1024, episode_len: int = 8, seed: int = 12345,
                 ridges: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
                 device: Optional[torch.device] = None) -> ProbeResult:
    """Fit and score the probe for a frozen ``encoder`` (``encoder(images) -> [B, N, D]``)."""
    if n_train < 8 or n_test < 8:
        raise ValueError(f"linear_probe: n_train and n_test must be >= 8, got {n_train} and {n_test}")
    world = world or WorldConfig()
    device = device or next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    try:
        x_tr, y_tr = _pairs(encoder, world, n_train, episode_len, seed, device)
        x_te, y_te = _pairs(encoder, world, n_test, episode_len, seed + 1, device)
    finally:
        encoder.train(was_training)
    mu, sd = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    # Pick the ridge strength on the last fifth of the training pairs, then refit on all of them.
    cut = (4 * x_tr.shape[0]) // 5
    best = max(ridges, key=lambda lam: r2_score(x_tr[cut:].double() @ (fit := ridge_fit(x_tr[:cut], y_tr[:cut], lam))[0]
                                                 + fit[1], y_tr[cut:]).mean().item())
    w, b = ridge_fit(x_tr, y_tr, best)
    r2 = r2_score(x_te.double() @ w + b, y_te).tolist()
    per = dict(zip(TARGETS, r2))
    return ProbeResult(r2=per, r2_position=(per["x"] + per["y"]) / 2, r2_velocity=(per["vx"] + per["vy"]) / 2,
                       ridge=float(best), n_train=int(x_tr.shape[0]), n_test=int(x_te.shape[0]))
