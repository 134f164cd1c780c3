"""Tiny world models trained once per test process (shared by test_world_model.py and test_mpc.py)."""
from __future__ import annotations

import functools

import torch

from jepa_engine.kernels import use_backend
from jepa_engine.training.world_model import WMTrainConfig, train_world_model


@functools.lru_cache(maxsize=None)
def trained(world: str = "open") -> dict:
    """The "test" preset trained on ``world`` (150 steps on "open", 120 on "two_rooms"; about 10-20 s on
    one CPU thread).

    Returns the training summary (``model`` in eval mode, ``losses``, ``config``)."""
    torch.set_num_threads(1)
    cfg = WMTrainConfig.from_name("test", world=world, steps=150 if world == "open" else 120)
    with use_backend("reference"):
        summary = train_world_model(cfg, None, log=None)
    summary["config"] = cfg
    return summary
