"""The comparison's two models: the world model and the matched decoder, loaded from checkpoints, trained
within the time budget (the decoder by imitation of the expert) or untrained; the seeded decisions."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from jepa_engine.baselines import Decoder, DecoderConfig, ImitationConfig, train_imitation
from jepa_engine.evaluation.mpc import MPC, MPCConfig
from jepa_engine.models.world_model import WorldModel
from jepa_engine.training import checkpoint as ckpt
from jepa_engine.training.world_model import WMTrainConfig, load_world_model, save_world_model, train_world_model

from .config import ProfileConfig


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_decoder(out_dir: Path, model, steps: int) -> Path:
    meta = {"kind": "decoder", "config": model.config.to_dict(), "imitation_steps": steps}
    return ckpt.save_checkpoint(out_dir, steps, ckpt.module_tensors(model, "model/"), meta, keep_last=1)


def load_decoder(path: str, device: torch.device):
    tensors, meta = ckpt.load_checkpoint(path, device=device)
    if meta.get("kind") != "decoder":
        raise ValueError(f"--decoder-checkpoint: {path} must be a decoder checkpoint (meta kind 'decoder'), "
                         f"got {meta.get('kind')!r}")
    model = Decoder(DecoderConfig.from_dict(meta["config"])).to(device)
    ckpt.load_module_tensors(model, tensors, "model/")
    return model.eval()


# The imitation recipe of the matched decoder (see `jepa_engine.demo.demo_decoder`); the profile
# trains with it for a step count set by --budget-minutes, the demo for DEMO_DECODER_STEPS.
DECODER_IMITATION: dict[str, Any] = dict(batch_size=64, episodes=16, episode_len=16, lr=3e-3, warmup=20,
                                         goal_noise=0.5, labels="observable")
DEMO_DECODER_STEPS = 4000


def train_decoder(dcfg, world, steps: int, device: torch.device, out_dir: Optional[Path], seed: int = 0,
                  max_seconds: float = 0.0, log: Optional[Callable[[str], None]] = None):
    """A `Decoder(dcfg)` trained by imitation of the expert with `DECODER_IMITATION` for `steps` steps
    (or `max_seconds`); saved under `out_dir` when given. Returns (model, state line)."""
    torch.manual_seed(seed)
    dec = Decoder(dcfg).to(device)
    icfg = ImitationConfig(steps=steps, seed=seed, max_seconds=max_seconds, **DECODER_IMITATION)
    t0 = time.perf_counter()
    done = len(train_imitation(dec, world, icfg, device=device))
    seconds = time.perf_counter() - t0
    state = f"trained here: {done} imitation steps in {seconds:.0f} s"
    if done < steps:
        state += f" (stopped by the {max_seconds:g} s limit; {steps} planned)"
    if out_dir is not None:
        save_decoder(out_dir, dec, done)
        state += f" (saved to {out_dir})"
    if log:
        log(f"decoder: {state}")
    return dec.eval(), state


def _wm_preset(preset: str) -> str:
    return {"tiny": "test", "demo": "demo", "lewm": "lewm"}[preset]


def build_models(cfg: ProfileConfig, device: torch.device, notes: list[str], log: Callable[[str], None]) -> dict:
    """The world model and the matched decoder: loaded, trained within the budget, or untrained."""
    out = Path(cfg.out)
    trainable = cfg.preset != "lewm" and cfg.budget_minutes > 0
    torch.manual_seed(cfg.seed)
    # ---- world model
    if cfg.wm_checkpoint:
        try:
            wm, wm_train = load_world_model(cfg.wm_checkpoint, device=device)
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"--wm-checkpoint: {e}") from e
        wm_state = f"loaded from {cfg.wm_checkpoint}"
    elif trainable:
        share = cfg.budget_minutes * 0.5
        wm_train = WMTrainConfig.from_name(_wm_preset(cfg.preset), max_minutes=share, device=str(device),
                                           log_every=10_000, checkpoint_every=10_000)
        log(f"training the world model ({wm_train.model}, <= {wm_train.steps} steps, <= {share:.2g} min)")
        summary = train_world_model(wm_train, None, log=None)
        wm = summary["model"]
        save_world_model(out / "wm", summary["steps"], wm, wm_train)
        wm_state = f"trained here: {summary['steps']} steps in {summary['seconds']:.0f} s (saved to {out / 'wm'})"
    else:
        wm_train = WMTrainConfig.from_name(_wm_preset(cfg.preset), device=str(device))
        wm = WorldModel(wm_train.model_config()).to(device).eval()
        wm_state = "untrained (timing only)"
    wm.eval()
    world = wm_train.world_config()
    world_trained = not wm_state.startswith("untrained")
    wm_params = num_params(wm)
    # ---- decoder, matched in size and in the decision it makes
    dec_kw = dict(image_size=world.image_size, channels=world.channels, horizon=cfg.horizon)
    if cfg.decoder_checkpoint:
        try:
            dec = load_decoder(cfg.decoder_checkpoint, device)
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"--decoder-checkpoint: {e}") from e
        dec_state = f"loaded from {cfg.decoder_checkpoint}"
    else:
        dcfg = DecoderConfig.from_name("lewm", **dec_kw) if cfg.preset == "lewm" else DecoderConfig.matched(wm_params, **dec_kw)
        dec = Decoder(dcfg).to(device)
        if trainable:
            icfg = ImitationConfig(steps=5, **DECODER_IMITATION)
            t0 = time.perf_counter()
            train_imitation(dec, world, icfg, device=device)  # calibration
            per_step = (time.perf_counter() - t0) / 5
            # the decoder gets 40% of the budget (the world model 50%; the rest is slack)
            steps = int(max(20, min(DEMO_DECODER_STEPS, 0.4 * cfg.budget_minutes * 60 / per_step)))
            log(f"training the decoder by imitation ({steps} steps, ~{steps * per_step:.0f} s)")
            dec, dec_state = train_decoder(dcfg, world, steps, device, out / "decoder", seed=cfg.seed)
        else:
            dec_state = "untrained (timing only)"
    dec.eval()
    if (dec.config.image_size, dec.config.channels) != (world.image_size, world.channels):
        raise ValueError(f"--decoder-checkpoint: the decoder sees {dec.config.channels}x{dec.config.image_size}^2 frames, "
                         f"the world model's world {world.channels}x{world.image_size}^2")
    if dec.config.horizon != cfg.horizon:
        notes.append(f"the decoder emits a {dec.config.horizon}-step plan, the planner plans {cfg.horizon} steps")
    return {"wm": wm, "world": world, "wm_state": wm_state, "wm_trained": world_trained, "wm_params": wm_params,
            "wm_predictor_params": num_params(wm.predictor), "wm_encoder_params": num_params(wm.encoder),
            "decoder": dec, "decoder_state": dec_state, "decoder_trained": not dec_state.startswith("untrained"),
            "decoder_params": num_params(dec)}


def decision_set(wm, world, cfg: ProfileConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded (start [n, 4], goal [n, 2]) pairs every row is asked to solve."""
    mpc = MPC(wm, world, MPCConfig(horizon=cfg.horizon, seed=cfg.seed), device=device)
    return mpc.episode_starts(0, cfg.decisions)
