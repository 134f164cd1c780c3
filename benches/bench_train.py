"""I-JEPA training step throughput (images/s): fused kernels vs the PyTorch reference ops vs torch.compile.

One step = target encoder on the full images, context encoder on the visible patches (variable
counts, key padding), predictor, fused latent loss, backward, AdamW, EMA. On a CPU machine the
``jepa_engine`` row runs the reference ops too (Triton needs a GPU), so the CPU rows compare eager
with torch.compile only.
"""
from __future__ import annotations

import pytest
import torch

from jepa_engine.kernels import use_backend
from jepa_engine.profiling.bench_shapes import TRAIN_CONFIGS
from jepa_engine.training.configs import TrainConfig
from jepa_engine.training.ema import EMA
from jepa_engine.training.ijepa import (JEPA, build_masker, build_models, build_world, make_batch, make_masks,
                                        make_optimizer, train_step)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
CONFIGS = TRAIN_CONFIGS if CUDA else {**TRAIN_CONFIGS, "small": dict(batch_size=8)}
NAMES = ["demo", "small"]


def _setup(name: str, compiled: bool):
    cfg = TrainConfig.from_name(name, device=str(DEVICE), **CONFIGS[name])
    enc, pred, enc_cfg = build_models(cfg)
    model = JEPA(enc, pred).to(DEVICE)
    ema = EMA.from_model(model.encoder, momentum=cfg.ema_start)
    opt = make_optimizer(model, cfg)
    images = make_batch(cfg, build_world(cfg), 0, DEVICE)["images"]
    masks = make_masks(cfg, build_masker(cfg, enc_cfg), 0, DEVICE)
    if compiled:
        model = torch.compile(model)
    return lambda: train_step(model, ema.target, ema, opt, images, masks, cfg=cfg, step=10), images.shape[0]


@pytest.mark.parametrize("impl", ["jepa_engine", "reference", "torch_compile"])
@pytest.mark.parametrize("name", NAMES)
def test_train_step(benchmark, run_bench, impl, name):
    if impl == "jepa_engine":
        step, n = _setup(name, compiled=False)
        fn = step
    else:
        step, n = _setup(name, compiled=impl == "torch_compile")

        def fn():
            with use_backend("reference"):
                return step()
    run_bench(benchmark, fn, impl=impl, group=f"I-JEPA train step {name} B={n}", images=n)
