"""Training: config, steps that learn, exact resume, NaN stop, Ctrl-C, DDP (2 gloo processes) == 1 process.

Kernels run on their PyTorch reference here (they are tested against it elsewhere), and the models are a
small configuration of the real encoder/predictor, so every test stays within seconds on 2 CPU cores.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket

import pytest
import torch

from jepa_engine.kernels import use_backend
from jepa_engine.training import checkpoint as ckpt
from jepa_engine.training import ijepa as T
from jepa_engine.training.configs import PRESETS

TINY = dict(encoder="tiny", encoder_overrides=dict(embed_dim=32, depth=1, num_heads=2),
            predictor_overrides=dict(predictor_dim=32, depth=1, num_heads=2),
            world_overrides=dict(image_size=32), batch_size=8, episode_len=3, steps=6, warmup=2, lr=3e-3,
            checkpoint_every=3, keep_last=2, log_every=1, probe=False, device="cpu",
            collapse_std_min=0.0, collapse_rank_min=0.0)


def tiny_config(**kw) -> T.TrainConfig:
    return T.TrainConfig(**{**TINY, **kw})


# ---- stand-in models with the interface of jepa_engine.models, used while that package is incomplete
class _Encoder(torch.nn.Module):
    def __init__(self, img_size: int, embed_dim: int, patch: int = 8):
        super().__init__()
        self.patch = torch.nn.Conv2d(1, embed_dim, patch, patch)
        self.pos = torch.nn.Parameter(0.02 * torch.randn((img_size // patch) ** 2, embed_dim))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(embed_dim, 2 * embed_dim), torch.nn.GELU(),
                                       torch.nn.Linear(2 * embed_dim, embed_dim))
        self.norm = torch.nn.LayerNorm(embed_dim)

    def forward(self, images, index=None, valid=None):
        x = self.patch(images).flatten(2).transpose(1, 2) + self.pos       # [B, N, D]
        if index is not None:
            x = T.apply_index(x, index)
        return self.norm(x + self.mlp(x))


class _Predictor(torch.nn.Module):
    def __init__(self, num_patches: int, dim: int, width: int):
        super().__init__()
        self.inp, self.out = torch.nn.Linear(dim, width), torch.nn.Linear(width, dim)
        self.pos = torch.nn.Parameter(0.02 * torch.randn(num_patches, width))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width, width))

    def forward(self, ctx, ctx_index, ctx_valid, target_index, target_valid):
        w = ctx_valid.unsqueeze(-1).float()
        pooled = (self.inp(ctx) * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
        q = pooled + self.pos[target_index]                                  # [B, Kt, width]
        return self.out(q + self.mlp(q))


def _standin_models(cfg: T.TrainConfig):
    from types import SimpleNamespace

    size = T.build_world(cfg).image_size
    dim = cfg.encoder_overrides.get("embed_dim", 32)
    enc_cfg = SimpleNamespace(img_size=size, patch_size=8, in_chans=1, embed_dim=dim)
    return _Encoder(size, dim), _Predictor((size // 8) ** 2, dim, cfg.predictor_overrides.get("predictor_dim", 16)), enc_cfg


def _use_standins_if_needed(monkeypatch=None) -> None:
    try:
        from jepa_engine.models import Predictor, VisionTransformer  # noqa: F401
    except ImportError:
        if monkeypatch is not None:
            monkeypatch.setattr(T, "build_models", _standin_models)
        else:
            T.build_models = _standin_models


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    _use_standins_if_needed(monkeypatch)
    with use_backend("reference"):
        yield


def _params(trainer: T.Trainer) -> dict[str, torch.Tensor]:
    sd = {f"model/{k}": v.clone() for k, v in trainer.jepa.state_dict().items()}
    sd.update({f"target/{k}": v.clone() for k, v in trainer.target.state_dict().items()})
    return sd


def _assert_identical(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k].float() - b[k].float()).abs()
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max {diff.max().item():.3g}, mean {diff.mean().item():.3g})"


# ---- config
def test_config_json_round_trip(tmp_path):
    for name in PRESETS:
        cfg = T.TrainConfig.from_name(name)
        assert T.TrainConfig.from_json(cfg.to_json()) == cfg
    cfg = tiny_config(seed=7)
    cfg.to_json(tmp_path / "c.json")
    assert T.TrainConfig.load(str(tmp_path / "c.json")) == cfg
    assert T.TrainConfig.load(str(tmp_path / "c.json"), steps=9).steps == 9


@pytest.mark.parametrize("field,value", [("lr", -1.0), ("batch_size", 0), ("batch_size", 10), ("loss", "l3"),
                                         ("ema_start", 1.5), ("ema_schedule", "step"), ("grad_clip", float("nan")),
                                         ("steps", 2.5), ("world", "mars"), ("min_lr", 1.0), ("device", "tpu")])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        tiny_config(**{field: value})
    with pytest.raises(ValueError, match="unknown field"):
        T.TrainConfig.from_dict({"lr": 1e-3, "learning_rate": 1.0})
    with pytest.raises(ValueError, match=r"one of.*'huge'|'huge'.*one of"):
        T.TrainConfig.from_name("huge")


def test_schedules():
    cfg = tiny_config(steps=100, warmup=10, lr=1e-3, min_lr=1e-5, weight_decay=0.04, weight_decay_end=0.4)
    assert T.lr_at(cfg, 0) == pytest.approx(1e-4) and T.lr_at(cfg, 9) == pytest.approx(1e-3)
    assert T.lr_at(cfg, 100) == pytest.approx(1e-5)
    assert all(T.lr_at(cfg, s) >= T.lr_at(cfg, s + 1) for s in range(10, 100))
    assert T.weight_decay_at(cfg, 0) == pytest.approx(0.04) and T.weight_decay_at(cfg, 100) == pytest.approx(0.4)


# ---- learning
def test_steps_reduce_loss_on_a_fixed_batch(tmp_path):
    cfg = tiny_config(steps=40, warmup=1, lr=3e-3, ema_start=1.0, ema_end=1.0, weight_decay=0.0, weight_decay_end=0.0)
    tr = T.Trainer(cfg, tmp_path, progress=False)
    batch = T.make_batch(cfg, tr.world, 0, tr.device)
    masks = T.make_masks(cfg, tr.masker, 0, tr.device)
    losses = [T.train_step(tr.model, tr.target, tr.ema, tr.optimizer, batch["images"], masks, cfg=cfg,
                           step=s).loss.item() for s in range(40)]
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-5:]) < 0.5 * losses[0], f"loss did not fall: {losses[0]:.4f} -> {losses[-5:]}"


def test_fit_writes_config_metrics_checkpoints(tmp_path):
    cfg = tiny_config(steps=7, checkpoint_every=2, keep_last=2)
    summary = T.Trainer(cfg, tmp_path, progress=False).fit()
    assert summary["step"] == 7
    assert T.TrainConfig.from_json(tmp_path / "config.json") == cfg
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert {"loss", "lr", "images_per_s", "emb_std", "eff_rank", "ema_momentum"} <= rows[0].keys()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [6, 7]


def test_collapse_monitor_warns(tmp_path):
    cfg = tiny_config(steps=1, collapse_std_min=1e9)
    with pytest.warns(RuntimeWarning, match="collapse"):
        T.Trainer(cfg, tmp_path, progress=False).fit()
    z = torch.randn(64, 16)
    std, rank = T.collapse_stats(z)
    assert 0.7 < std < 1.3 and rank > 10
    std, rank = T.collapse_stats(torch.ones(64, 1) * torch.randn(1, 16) + 1e-6 * z)
    assert std < 0.01 and rank < 1.5


# ---- checkpoints and resume
def test_resume_is_exact(tmp_path):
    cfg = tiny_config(steps=6, checkpoint_every=3)
    straight = T.Trainer(cfg, tmp_path / "a", progress=False)
    straight.fit()

    first = T.Trainer(cfg, tmp_path / "b", progress=False)
    first.fit(max_steps=3)
    torch.manual_seed(999)  # disturb every RNG the resumed run must restore
    resumed = T.Trainer(cfg, tmp_path / "b", resume=True, progress=False)
    assert resumed.step == 3 and resumed.ema.steps == 3
    resumed.fit()
    assert resumed.step == 6
    _assert_identical(_params(straight), _params(resumed), "2N straight vs N + resume + N")
    a, b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in a:
        for k in a[i]:
            assert torch.equal(a[i][k], b[i][k]), f"optimizer state {i}/{k}"


def test_corrupted_latest_is_reported_not_skipped(tmp_path):
    cfg = tiny_config(steps=6, checkpoint_every=3, keep_last=3)
    T.Trainer(cfg, tmp_path, progress=False).fit()
    tensors_path, json_path = ckpt.checkpoint_paths(tmp_path, 6)
    tensors_path.write_bytes(tensors_path.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="ckpt-00000006"):
        ckpt.load_checkpoint(json_path)
    with pytest.raises(ckpt.CheckpointError, match="ckpt-00000006.safetensors: expected .* got 100.*ckpt-00000003"):
        T.Trainer(cfg, tmp_path, resume=True, progress=False)
    json_path.unlink()
    tensors_path.unlink()
    resumed = T.Trainer(cfg, tmp_path, resume=True, progress=False)
    assert resumed.step == 3


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(steps=8, checkpoint_every=2, log_every=4)
    real = T.latent_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 4 else loss

    monkeypatch.setattr(T, "latent_loss", poisoned)
    tr = T.Trainer(cfg, tmp_path, progress=False)
    with pytest.raises(T.NonFiniteLossError, match=r"loss became nan at step 4.*ckpt-00000002"):
        tr.fit()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]
    tensors, _ = ckpt.load_checkpoint(tmp_path)
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if v.is_floating_point())


def test_ctrl_c_writes_a_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(steps=10, checkpoint_every=100)
    real = T.train_step

    def interrupted(*args, step, **kwargs):
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # the handler defers it to the end of the step
        return real(*args, step=step, **kwargs)

    monkeypatch.setattr(T, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        T.Trainer(cfg, tmp_path, progress=False).fit()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3]
    assert T.Trainer(cfg, tmp_path, resume=True, progress=False).step == 3


# ---- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str, cfg_json: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    _use_standins_if_needed()
    with use_backend("reference"):
        tr = T.Trainer(T.TrainConfig.from_json(cfg_json), out_dir, progress=False)
        tr.fit()
        if rank == 1:
            torch.save(_params(tr), os.path.join(out_dir, "rank1.pt"))
        tr.close()


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    cfg = tiny_config(steps=3, checkpoint_every=3, log_every=3)
    one = T.Trainer(cfg, tmp_path / "one", progress=False)
    one.fit()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "two"), cfg.to_json()), nprocs=2, join=True)
    tensors, meta = ckpt.load_checkpoint(tmp_path / "two")
    assert meta["world_size"] == 2 and meta["step"] == 3
    ref = _params(one)
    rank1 = torch.load(tmp_path / "two" / "rank1.pt")
    for k, v in ref.items():
        for what, got in (("rank 0 checkpoint", tensors[k]), ("rank 1", rank1[k])):
            torch.testing.assert_close(got, v, atol=2e-5, rtol=1e-4, msg=lambda m: f"{what} {k}: {m}")
    # Only rank 0 writes metrics.
    rows = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1
    ref_loss = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert json.loads(rows[0])["loss"] == pytest.approx(ref_loss, rel=1e-4)


def test_cli_train_and_resume(tmp_path, capsys):
    from jepa_engine import cli

    cfg_path = tmp_path / "tiny.json"
    tiny_config(steps=4, checkpoint_every=2).to_json(cfg_path)
    assert cli.main(["train", "--config", str(cfg_path), "--out", str(tmp_path / "run"), "--steps", "2"]) == 0
    assert "loss: first" in capsys.readouterr().out
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--resume", "--steps", "4"]) == 0
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [2, 4]
    assert cli.main(["train", "--config", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "TrainConfig.load" in capsys.readouterr().err
