"""Checkpoints: round trip, atomic files, pruning, and clear errors on damaged files."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from jepa_engine.training.checkpoint import (CheckpointError, checkpoint_paths, latest_checkpoint, list_checkpoints,
                                    load_checkpoint, load_module_tensors, load_optimizer_state, load_rng_state,
                                    module_tensors, optimizer_state, prune_checkpoints, resume_checkpoint,
                                    rng_state, save_checkpoint, trim_metrics)


def _trained_model(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 5)).square().mean().backward()
        opt.step()
    return model, opt


def _state(model, opt):
    ot, om = optimizer_state(opt)
    rt, rm = rng_state()
    return {**module_tensors(model, "model/"), **ot, **rt}, {"optim": om, "rng": rm, "note": "x"}


def test_round_trip_restores_model_optimizer_and_rngs(tmp_path):
    model, opt = _trained_model()
    tensors, meta = _state(model, opt)
    path = save_checkpoint(tmp_path, 12, tensors, meta)
    assert path == checkpoint_paths(tmp_path, 12)[1] and path.exists()
    expected = (torch.rand(3).tolist(), random.random(), float(np.random.rand()))

    loaded, lmeta = load_checkpoint(path)
    assert lmeta["step"] == 12 and lmeta["note"] == "x"
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), k
    model2, opt2 = _trained_model(seed=1)
    load_module_tensors(model2, loaded, "model/")
    load_optimizer_state(opt2, loaded, lmeta["optim"])
    load_rng_state(loaded, lmeta["rng"])
    assert (torch.rand(3).tolist(), random.random(), float(np.random.rand())) == expected
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    # Both optimizers take the same next step.
    x = torch.randn(4, 5)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95)


def test_rng_states_round_trip(tmp_path):
    tensors, meta = rng_state()
    save_checkpoint(tmp_path, 0, tensors, {"rng": meta})
    expected = (torch.rand(3).tolist(), random.random(), float(np.random.rand()))
    loaded, lmeta = load_checkpoint(tmp_path)
    load_rng_state(loaded, lmeta["rng"])
    assert (torch.rand(3).tolist(), random.random(), float(np.random.rand())) == expected


def test_keep_last_prunes_oldest(tmp_path):
    for step in range(0, 50, 10):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, {}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000030.json", "ckpt-00000030.safetensors",
                                                          "ckpt-00000040.json", "ckpt-00000040.safetensors"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_newest_checkpoint_is_named_never_skipped(tmp_path, damage):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(64)}, {})
    save_checkpoint(tmp_path, 2, {"w": torch.full((64,), 2.0)}, {})
    tensors_path, json_path = checkpoint_paths(tmp_path, 2)
    blob = tensors_path.read_bytes()
    what = {"truncate": f"expected {len(blob)} bytes, got {len(blob) // 2}", "flip": "sha256 must be",
            "delete": "is missing"}[damage]
    if damage == "truncate":
        tensors_path.write_bytes(blob[: len(blob) // 2])
    elif damage == "flip":
        tensors_path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0xFF]))
    else:
        tensors_path.unlink()
    with pytest.raises(CheckpointError, match=f"ckpt-00000002.*{what}"):
        load_checkpoint(json_path)
    # The folder gives the same message as the file, plus the way out: the newest intact checkpoint.
    for call in (latest_checkpoint, load_checkpoint, resume_checkpoint):
        with pytest.raises(CheckpointError, match=f"ckpt-00000002.*{what}.*newest checkpoint.*not skipped.*"
                                                  f"ckpt-00000001.json \\(step 1\\)") as info:
            call(tmp_path)
        assert str(info.value).startswith(f"checkpoint {tmp_path / 'ckpt-00000002'}"), str(info.value)
    assert latest_checkpoint(tmp_path, verify=False) == json_path
    # Following the advice works.
    json_path.unlink()
    tensors_path.unlink(missing_ok=True)
    assert latest_checkpoint(tmp_path) == checkpoint_paths(tmp_path, 1)[1]
    tensors, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 1 and torch.equal(tensors["w"], torch.ones(64))


def test_truncated_json_is_named_not_skipped(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, {})
    save_checkpoint(tmp_path, 2, {"w": torch.ones(3)}, {})
    json_path = checkpoint_paths(tmp_path, 2)[1]
    json_path.write_text(json_path.read_text()[:40])
    with pytest.raises(CheckpointError, match="ckpt-00000002.json: the JSON is truncated or corrupted"):
        load_checkpoint(json_path)
    with pytest.raises(CheckpointError, match="ckpt-00000002.json: the JSON is truncated.*ckpt-00000001.json"):
        latest_checkpoint(tmp_path)


def test_only_checkpoint_damaged_says_so(tmp_path):
    save_checkpoint(tmp_path, 4, {"w": torch.ones(3)}, {})
    tensors_path = checkpoint_paths(tmp_path, 4)[0]
    tensors_path.write_bytes(tensors_path.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="expected .* bytes, got 10.*no earlier checkpoint there is intact"):
        resume_checkpoint(tmp_path)


def test_resume_checkpoint_needs_a_folder_with_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=f"run folder {tmp_path / 'nope'} does not exist"):
        resume_checkpoint(tmp_path / "nope")
    checkpoint_paths(tmp_path, 3)[0].write_bytes(b"partial")     # a tensors file alone is no checkpoint
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        resume_checkpoint(tmp_path)
    save_checkpoint(tmp_path, 5, {"w": torch.ones(3)}, {})
    assert resume_checkpoint(tmp_path) == checkpoint_paths(tmp_path, 5)[1]


def test_tensors_without_json_is_incomplete(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, {})
    # A crash between the two writes leaves a tensors file and no JSON: not a checkpoint.
    checkpoint_paths(tmp_path, 2)[0].write_bytes(b"partial")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert latest_checkpoint(tmp_path) == checkpoint_paths(tmp_path, 1)[1]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_no_pickle_and_meta_must_be_json(tmp_path):
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path, 0, {"w": torch.ones(1)}, {"bad": float("nan")})
    with pytest.raises(TypeError, match="tensors\\['w'\\]"):
        save_checkpoint(tmp_path, 0, {"w": [1.0]}, {})
    path = save_checkpoint(tmp_path, 0, {"w": torch.ones(1), "v": torch.ones(4)[1:3]}, {"a": [1, 2]})
    header = json.loads(path.read_text())
    assert header["meta"] == {"a": [1, 2]} and len(header["sha256"]) == 64
    assert load_checkpoint(tmp_path)[0]["v"].shape == (2,)


def test_empty_folder(tmp_path):
    assert latest_checkpoint(tmp_path / "nothing") is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path)


def test_files_get_the_umask_mode_like_any_other_file(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        (tmp_path / "config.json").write_text("{}")
        path = save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, {})
        os.umask(0o027)
        path2 = save_checkpoint(tmp_path, 2, {"w": torch.ones(3)}, {})
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(tmp_path / "config.json") == 0o644
    assert mode(path) == mode(checkpoint_paths(tmp_path, 1)[0]) == 0o644
    assert mode(path2) == mode(checkpoint_paths(tmp_path, 2)[0]) == 0o640


def test_pruning_keeps_the_checkpoint_just_written_and_removes_leftovers(tmp_path):
    save_checkpoint(tmp_path, 30, {"w": torch.ones(3)}, {})   # e.g. a later step of an earlier run
    save_checkpoint(tmp_path, 40, {"w": torch.ones(3)}, {})
    save_checkpoint(tmp_path, 10, {"w": torch.ones(3)}, {}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 30, 40]
    prune_checkpoints(tmp_path, 1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [40]
    # What a killed writer leaves: a temp file, a tensors file whose JSON never came (or was pruned first).
    (tmp_path / ".ckpt-00000050.safetensors.0a1b2c.tmp").write_bytes(b"half")
    checkpoint_paths(tmp_path, 45)[0].write_bytes(b"orphan")
    checkpoint_paths(tmp_path, 70)[0].write_bytes(b"orphan of a later step")
    save_checkpoint(tmp_path, 50, {"w": torch.ones(3)}, {}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-00000040.json", "ckpt-00000040.safetensors", "ckpt-00000050.json", "ckpt-00000050.safetensors",
        "ckpt-00000070.safetensors"]


def test_trim_metrics_keeps_rows_through_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert trim_metrics(path, 3) == [] and not path.exists()
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4, 5))
                    + '{"step": 6, "lo')                      # a line cut short by a kill
    rows = trim_metrics(path, 3)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3]
