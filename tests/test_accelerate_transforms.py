"""accelerate() on what the flagship JEPA models run and what users do with a model afterwards:
a V-JEPA 2-AC-style predictor attention with its frame-causal mask (fused on every call, counted by
``stats``), head dims 80/88/104, timm NaFlex-style finfo.min masks, SDPA called by its full path, and
a patched timm ViT through torch.jit.script, torch.fx.symbolic_trace and a pickle round trip. The
README's example runs as written in a subprocess."""
from __future__ import annotations

import copy
import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jepa_engine
from jepa_engine.integrations.accelerate import stats
from jepa_engine.integrations.masks import to_attention_plan
from tests.helpers import assert_close, needs_triton
from tests.test_accelerate import GRAD_SCALE, IJepaAttention, Tree, _compare, _key_padding, tiny_timm_vit

BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# A V-JEPA 2-AC-style predictor (written here): frames of patch tokens plus action/state tokens, a
# rotary-style q/k transform, SDPA with the action-block causal mask built as bool [N, N]
# --------------------------------------------------------------------------------------------------
def action_block_causal_mask(frames: int, tokens_per_frame: int) -> torch.Tensor:
    N = frames * tokens_per_frame
    mask = torch.zeros(N, N, dtype=torch.bool)
    for t1 in range(frames):
        for t2 in range(t1 + 1):
            mask[t1 * tokens_per_frame:(t1 + 1) * tokens_per_frame, t2 * tokens_per_frame:(t2 + 1) * tokens_per_frame] = True
    return mask


class ACStyleAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.use_sdpa = True

    def forward(self, x, mask=None, attn_mask=None, T=None, H=None, W=None, action_tokens=0):
        B, N, C = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = q * torch.cos(q), k.flip(-1)  # stands in for the rotary embedding
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class ACStylePredictor(nn.Module):
    def __init__(self, dim=48, heads=2, depth=2, frames=3, tokens_per_frame=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(ACStyleAttention(dim, heads) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.attn_mask = action_block_causal_mask(frames, tokens_per_frame)

    def forward(self, x):
        attn_mask = self.attn_mask[:x.size(1), :x.size(1)].to(x.device)  # a new view at every forward
        for norm, blk in zip(self.norms, self.blocks):
            x = x + blk(norm(x), mask=None, attn_mask=attn_mask, T=3, H=2, W=2, action_tokens=2)
        return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N", [18, 14])  # whole frames, and a last frame cut short
def test_ac_predictor_frame_causal_mask_fuses_every_call(backend, N, backend_device):
    plain = ACStylePredictor()
    model = copy.deepcopy(plain)
    report = jepa_engine.accelerate(model)
    assert [(e.name, e.kind) for e in report.patched] == [("blocks.0", "sdpa"), ("blocks.1", "sdpa")]
    x = torch.randn(2, N, 48, generator=torch.Generator().manual_seed(3))
    _compare(model, plain, x, backend=backend, device=backend_device)
    _compare(model, plain, x, backend=backend, device=backend_device)
    st = stats(model)
    assert st.fallen_back == 0, str(st)
    assert st.fused == 4 and all(m.fused == 2 for m in st.modules.values())


def test_frame_causal_detection():
    m = action_block_causal_mask(4, 18)
    kp, L = to_attention_plan(m, 2, 72, 72)
    assert L == 18 and kp.shape == (2, 72) and bool(kp.all())
    # AND-ed with key padding, per sample, as a [B, 1, N, N] additive mask with finfo.min
    pad = _key_padding(2, 72, seed=4)
    full = m[None, None] & pad[:, None, None, :]
    additive = torch.zeros(2, 1, 72, 72).masked_fill(~full, torch.finfo(torch.float32).min)
    kp, L = to_attention_plan(additive, 2, 72, 72)
    assert L == 18 and torch.equal(kp, pad)
    # Not frame-causal: frames of unequal size, and a plain causal mask shifted by one.
    odd = action_block_causal_mask(4, 18)
    odd[18, 18:36] = False
    with pytest.raises(ValueError, match="not frame-causal"):
        to_attention_plan(odd, 1, 72, 72)
    causal = torch.ones(8, 8, dtype=torch.bool).tril(-1)
    causal[0, 0] = True
    with pytest.raises(ValueError):
        to_attention_plan(causal, 1, 8, 8)


def test_is_causal_runs_frame_causal_with_one_token_frames():
    class Causal(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(32, 96)

        def forward(self, x):
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)

    plain = Causal()
    model = copy.deepcopy(plain)
    jepa_engine.accelerate(model)
    x = torch.randn(2, 9, 32)
    assert_close(model(x), plain(x), what="is_causal")
    assert stats(model).fused == 1


# --------------------------------------------------------------------------------------------------
# Head dims of the flagship ViTs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", [80, 88, 104])
def test_flagship_head_dims_fuse_and_match(backend, head_dim, backend_device):
    plain = Tree(lambda dim: IJepaAttention(dim, num_heads=2), dim=2 * head_dim, depth=1)
    model = copy.deepcopy(plain)
    report = jepa_engine.accelerate(model)
    assert [e.kind for e in report.patched] == ["ijepa"] and not report.skipped
    x = torch.randn(2, 11, 2 * head_dim, generator=torch.Generator().manual_seed(5))
    _compare(model, plain, x, _key_padding(2, 11), backend=backend, device=backend_device)
    assert stats(model).fused == 1 and stats(model).fallen_back == 0


# --------------------------------------------------------------------------------------------------
# Masks: finfo.min (timm NaFlex), key-only [B, 1, 1, N]
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_finfo_min_masks_are_masks(backend, backend_device):
    plain = tiny_timm_vit().blocks[0].attn
    attn = copy.deepcopy(plain)
    jepa_engine.accelerate(attn)
    B, N = 3, 17
    x = torch.randn(B, N, 64, generator=torch.Generator().manual_seed(6))
    kp = _key_padding(B, N, seed=7)
    lowest = torch.finfo(torch.float32).min
    key_only = torch.zeros(B, 1, 1, N).masked_fill(~kp[:, None, None, :], lowest)
    full = torch.zeros(B, 1, N, N).masked_fill(~kp[:, None, None, :], lowest)
    _compare(attn, plain, x, key_only, backend=backend, device=backend_device)
    _compare(attn, plain, x, full, backend=backend, device=backend_device)
    st = stats(attn)
    assert st.fallen_back == 0 and st.fused == 2, str(st)
    x, kp = x.to(backend_device), kp.to(backend_device)  # _compare moved the modules there
    bias = torch.zeros(B, 1, 1, N, device=backend_device).masked_fill(~kp[:, None, None, :], -1e4)  # falls back
    assert_close(attn(x, bias), plain(x, bias), what="bias")
    reasons = stats(attn).reasons()
    assert len(reasons) == 1 and "a bias, not a mask" in next(iter(reasons)), reasons


# --------------------------------------------------------------------------------------------------
# SDPA by its full path
# --------------------------------------------------------------------------------------------------
class FullPathSdpa(nn.Module):
    def __init__(self, dim=64):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x, attn_mask=None):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return torch.nn.functional.gelu(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_path_sdpa_is_rerouted(backend, backend_device):
    plain = FullPathSdpa()
    model = copy.deepcopy(plain)
    report = jepa_engine.accelerate(model)
    assert [(e.name, e.kind) for e in report.patched] == [("", "sdpa")]
    x = torch.randn(2, 13, 64, generator=torch.Generator().manual_seed(8))
    _compare(model, plain, x, _key_padding(2, 13)[:, None, None, :], backend=backend, device=backend_device)
    assert stats(model).fused == 1 and stats(model).fallen_back == 0
    jepa_engine.restore(model)
    assert "forward" not in model.__dict__


# --------------------------------------------------------------------------------------------------
# TorchScript, FX, pickle
# --------------------------------------------------------------------------------------------------
def _patched_vit():
    plain = tiny_timm_vit()
    model = copy.deepcopy(plain)
    jepa_engine.accelerate(model)
    return plain, model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))


def test_patched_timm_vit_scripts_like_the_original():
    plain, model, x = _patched_vit()
    scripted = torch.jit.script(model)
    assert_close(scripted(x), plain(x), what="scripted")
    assert "forward" in model.blocks[0].attn.__dict__  # the eager model keeps its patch
    model(x)
    assert stats(model).fused == 2


def test_patched_timm_vit_fx_traces_like_the_original():
    plain, model, x = _patched_vit()
    gm = torch.fx.symbolic_trace(model)
    ref = torch.fx.symbolic_trace(plain)
    assert [n.target for n in gm.graph.nodes] == [n.target for n in ref.graph.nodes]
    assert_close(gm(x), plain(x), what="fx")


def test_patched_timm_vit_pickles_and_loads_patched():
    plain, model, x = _patched_vit()
    model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert_close(loaded(x), plain(x), what="loaded")
    st = stats(loaded)
    assert st.fused == 2 and st.fallen_back == 0  # patched, counting anew
    assert [e.name for e in jepa_engine.accelerate(loaded).already] == ["blocks.0.attn", "blocks.1.attn"]
    jepa_engine.restore(loaded)
    assert all("forward" not in m.__dict__ and "__getstate__" not in m.__dict__ for m in loaded.modules())
    assert_close(loaded(x), plain(x), what="restored")


def test_pickled_sdpa_module_stays_rerouted():
    model = ACStylePredictor()
    jepa_engine.accelerate(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    loaded(torch.randn(1, 18, 48))
    assert stats(loaded).fused == 2 and stats(loaded).fallen_back == 0


# --------------------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                    reason="timm is not installed (make install adds it; a GPU machine may lack it)")
def test_readme_accelerate_example_runs_as_written():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Accelerating an existing model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "12 patched" in out.stdout and "24 fused calls, 0 fallen back" not in out.stdout
    assert "12 fused calls, 0 fallen back" in out.stdout, out.stdout
