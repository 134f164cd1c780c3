"""The planners' restructured rollout (shared prefix, last-row-only last block, folded norms) against
``WorldModel.rollout``, the reference. fp32 everywhere.

The restructuring is checked with every op on its torch reference (fast, every case); the cases
marked ``kernels`` run the default dispatch, which under TRITON_INTERPRET=1 (``make test``) puts the
fused_linear / linear_goal_cost kernels in the interpreter (fp32, exact dots) inside a whole rollout.
Both must match the reference rollout to rounding."""
from __future__ import annotations

import contextlib

import pytest
import torch

from jepa_engine.kernels import use_backend
from jepa_engine.models.world_model import WorldModel, WorldModelConfig
from jepa_engine.planning import CEMPlanner, PlannerConfig, latent_cost
from jepa_engine.planning.rollout import FusedRollout, Window, windows

from torch.testing import assert_close


def _model(**overrides) -> WorldModel:
    torch.manual_seed(0)
    cfg = WorldModelConfig.from_name("test", **overrides)
    model = WorldModel(cfg).eval().requires_grad_(False)
    with torch.no_grad():   # non-trivial norms, so that folding them is tested
        for name, p in model.predictor.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _inputs(model: WorldModel, E: int, h: int, N: int, H: int, seed: int = 1):
    c = model.cfg
    g = torch.Generator().manual_seed(seed)
    z_hist = torch.randn(E, h, c.embed_dim, generator=g)
    past = torch.rand(E, h - 1, c.action_dim, generator=g) * 2 - 1
    actions = torch.rand(E, N, H, c.action_dim, generator=g) * 2 - 1
    z_goal = torch.randn(E, c.embed_dim, generator=g)
    return z_hist, past, actions, z_goal


def _reference(model, z_hist, past, actions):
    E, N, H, A = actions.shape
    with torch.no_grad():
        z = model.rollout(z_hist.repeat_interleave(N, 0), actions.reshape(E * N, H, A),
                          past_actions=past.repeat_interleave(N, 0))
    return z.view(E, N, H, -1)


# history 3: every start (1, 2, 3 observed frames), horizons shorter and longer than the window;
# history 1 (no shared prefix ever) and a 3-block predictor (blocks between the first and the last).
@pytest.mark.parametrize("overrides,h,H,kernels", [
    ({}, 1, 5, False), ({}, 2, 4, False), ({}, 3, 5, False), ({}, 3, 1, False), ({}, 3, 2, False),
    ({"history": 1}, 1, 3, False), ({"pred_depth": 3, "history": 4}, 3, 6, False), ({"pred_depth": 1}, 2, 3, False),
    ({}, 3, 4, True),
])
def test_rollout_equals_reference(request, overrides, h, H, kernels):
    model = _model(**overrides)
    z_hist, past, actions, _ = _inputs(model, E=2, h=h, N=5 if kernels else 3, H=H)
    if kernels:     # on the kernel device (compiled on CUDA); skipped where no kernel can run
        device = request.getfixturevalue("kernel_device")
        model, z_hist, past, actions = (t.to(device) for t in (model, z_hist, past, actions))
    # kernels: the Triton path whatever the route table says (window_attention, fused_mlp, fused_linear), in
    # IEEE fp32 (not the CUDA default TF32) so that it matches the reference to fp32 rounding
    with use_backend("triton" if kernels else "reference"):
        got = FusedRollout(model, precision="fp32").rollout(z_hist, past, actions)
    assert got.shape == (2, actions.shape[1], H, model.cfg.embed_dim)
    assert_close(got, _reference(model, z_hist, past, actions), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("metric", ["l2", "l1"])
@pytest.mark.parametrize("reduce", ["final", "sum"])
def test_cost_equals_distance_of_reference_rollout(metric, reduce):
    model = _model()
    z_hist, past, actions, z_goal = _inputs(model, E=3, h=3, N=4, H=3)
    z = _reference(model, z_hist, past, actions)
    diff = z - z_goal[:, None, None]
    dist = diff.square().sum(-1) if metric == "l2" else diff.abs().sum(-1)      # [E, N, H]
    want = dist[..., -1] if reduce == "final" else dist.sum(-1)
    with contextlib.nullcontext() if metric == "l2" else use_backend("reference"):
        got = FusedRollout(model).cost(z_hist, past, actions, z_goal, metric, reduce)
    assert got.dtype == torch.float32 and got.shape == (3, 4)
    assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_latent_cost_uses_it_without_grad_and_model_rollout_with_grad():
    """The sampling planners' cost (no grad) and the gradient planner's (actions require grad) agree."""
    model = _model()
    z_hist, past, actions, z_goal = _inputs(model, E=2, h=2, N=3, H=3)
    fn = latent_cost(model, z_hist, past, z_goal, "l2", "sum")
    with torch.no_grad(), use_backend("reference"):
        fast = fn(actions)
    a = actions.clone().requires_grad_(True)
    slow = fn(a)
    assert slow.requires_grad
    slow.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    assert_close(fast, slow.detach(), atol=1e-4, rtol=1e-5)
    with torch.no_grad(), use_backend("reference"):
        plain = latent_cost(model, z_hist, past, z_goal, "l2", "sum", fused=False)(actions)
    assert_close(fast, plain, atol=1e-4, rtol=1e-5)


def test_reference_backend_gives_the_same_plan():
    """A CEM plan through the fused pieces equals the same plan with every op forced to its reference."""
    model = _model()
    z_hist, past, _, z_goal = _inputs(model, E=2, h=3, N=1, H=1)
    planner = CEMPlanner(PlannerConfig(horizon=3, samples=8, iterations=2, elites=3, seed=3))
    fn = latent_cost(model, z_hist, past, z_goal)
    with torch.no_grad():
        fused = planner.plan(fn, num_envs=2)
        with use_backend("reference"):
            ref = planner.plan(latent_cost(model, z_hist, past, z_goal), num_envs=2)
    assert_close(fused.mean, ref.mean, atol=1e-5, rtol=1e-5)


def test_bf16_rollout_is_close():
    model = _model()
    z_hist, past, actions, _ = _inputs(model, E=1, h=3, N=8, H=3)
    want = _reference(model, z_hist, past, actions)
    with use_backend("reference"):
        got = FusedRollout(model, dtype=torch.bfloat16).rollout(z_hist, past, actions)
    assert got.dtype == torch.bfloat16
    assert_close(got.float(), want, atol=0.1, rtol=0.05)


def test_history_cache_follows_in_place_updates():
    """The observed history's tokens and shared prefixes are kept between calls with the same tensors;
    modifying either tensor in place (as an MPC loop does) must be seen by the next call. (The cache is
    FusedRollout's own, whichever backend runs its ops: here the references, not the interpreter.)"""
    model = _model()
    z_hist, past, actions, z_goal = _inputs(model, E=2, h=3, N=4, H=4)
    fr = FusedRollout(model)
    with use_backend("reference"):
        first = fr.rollout(z_hist, past, actions)
        assert_close(fr.rollout(z_hist, past, actions), first, rtol=0, atol=0)      # kept: same result
        assert fr._obs_cache is not None
        for t in (z_hist, past):
            t.mul_(0.5)
            assert_close(fr.rollout(z_hist, past, actions), _reference(model, z_hist, past, actions),
                         rtol=1e-5, atol=1e-5)
        other = z_hist.clone()
        other[0, 0, 0] += 1.0
        assert_close(fr.rollout(other, past, actions), _reference(model, other, past, actions), rtol=1e-5, atol=1e-5)


def test_inference_mode_tensors_are_not_cached():
    model = _model()
    z_hist, past, actions, _ = _inputs(model, E=1, h=3, N=3, H=2)
    fr = FusedRollout(model)
    with torch.inference_mode():
        zi, pi_ = z_hist.clone(), past.clone()
        got = fr.rollout(zi, pi_, actions)
    assert fr._obs_cache is None
    assert_close(got, _reference(model, z_hist, past, actions), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix,frames", [(0, 3), (4, 1), (2, 2), (5, 0)])
@pytest.mark.parametrize("pack", [2, 3, 6])
def test_packed_attention_equals_one_sequence_each(prefix, frames, pack):
    """G sequences run as one attention with the block-diagonal mask give each sequence's own result."""
    model = _model()
    fr = FusedRollout(model)
    blk = fr.blocks[0]
    C = blk.heads * blk.head_dim
    L = max(2 * frames, 1)
    S = prefix + 2 * frames
    g = torch.Generator().manual_seed(3)
    q, kv = torch.randn(12, L, C, generator=g), torch.randn(12, S, 2 * C, generator=g)
    want = blk.attention(q, kv, fr._mask(prefix, frames, q.device))
    got = blk.attention(q, kv, fr._mask(prefix, frames, q.device, pack), pack)
    assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_windows_split_shared_and_own_frames():
    """One generator gives every step's window (run and FLOP count): the window ends at frame
    observed + step, keeps at most `window` frames, and shares the observed frames before the last."""
    assert list(windows(3, 4, 3)) == [Window(0, 0, 2, 1), Window(1, 1, 1, 2), Window(2, 2, 0, 3), Window(3, 3, 0, 3)]
    assert list(windows(1, 3, 3)) == [Window(0, 0, 0, 1), Window(1, 0, 0, 2), Window(2, 0, 0, 3)]
    assert list(windows(2, 2, 4)) == [Window(0, 0, 1, 1), Window(1, 0, 1, 2)]
    assert all(w.shared + w.own <= 3 for w in windows(3, 9, 3))


def test_rollout_spec_is_the_one_reader_of_the_model():
    """FusedRollout reads the model through ``WorldModel.rollout_spec``; a structural change the folded
    rollout cannot compute fails there, naming the part."""
    model = _model(pred_depth=3)
    c = model.cfg
    spec = model.rollout_spec(torch.bfloat16)
    assert (spec.window, spec.embed_dim, spec.action_dim, spec.width) == (c.history, 16, 2, 32)
    assert len(spec.blocks) == 3 and spec.pos_type.shape == (c.history, 2, 32)
    assert spec.blocks[0].w_qkv.shape == (96, 32) and spec.blocks[0].w_fc1.shape == (128, 32)
    assert spec.w_out.dtype == torch.bfloat16 and not spec.w_out.requires_grad
    model.predictor.blocks[1].mlp.act = torch.nn.GELU(approximate="tanh")
    with pytest.raises(TypeError, match=r"predictor\.blocks\[1\]\.mlp\.act"):
        FusedRollout(model)
    model = _model()
    model.action_encoder.net[1] = torch.nn.ReLU()
    with pytest.raises(TypeError, match=r"action_encoder\.net\[1\]"):
        FusedRollout(model)
    model = _model()
    model.predictor.blocks[0] = torch.nn.Identity()
    with pytest.raises(TypeError, match=r"predictor\.blocks\[0\] must be a FrameCausalBlock"):
        FusedRollout(model)


def test_pack_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert FusedRollout._pack(cpu, 300, 6) == 3 and FusedRollout._pack(cpu, 300, 1) == 6
    assert FusedRollout._pack(cpu, 8, 6) == 4 and FusedRollout._pack(cpu, 7, 1) == 1
    assert FusedRollout._pack(cuda, 300, 6) == 1


@pytest.mark.parametrize("which,shape,match", [
    ("z_hist", (2, 4, 16), "z_hist"),             # h > history
    ("z_hist", (2, 3, 15), "z_hist"),             # wrong D
    ("past", (2, 1, 2), "past_actions"),
    ("actions", (2, 4, 3, 3), "actions"),         # wrong A
    ("actions", (3, 4, 3, 2), "actions"),         # wrong E
    ("actions", (2, 4, 0, 2), "actions"),         # horizon 0
    ("goal", (2, 15), "z_goal"),
])
def test_bad_input(which, shape, match):
    model = _model()
    z_hist, past, actions, z_goal = _inputs(model, E=2, h=3, N=4, H=3)
    args = dict(z_hist=z_hist, past=past, actions=actions, goal=z_goal)
    args[which] = torch.zeros(shape)
    with pytest.raises(ValueError, match=match):
        FusedRollout(model).cost(args["z_hist"], args["past"], args["actions"], args["goal"])


def _count_attention_flops(monkeypatch):
    """The flop counter does not see the CPU's fused SDPA kernel: attention runs written out. The
    CPU runs several sequences as one attention (block-diagonal mask, :meth:`FusedRollout._pack`);
    the count is of the unpacked computation, so packing is switched off here."""
    monkeypatch.setattr(FusedRollout, "_pack", staticmethod(lambda device, batch, rows: 1))

    def sdpa_written_out(q, k, v, attn_mask=None, scale=None, **_):
        s = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
        return torch.matmul(s.softmax(-1), v)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa_written_out)


@pytest.mark.parametrize("overrides,h,H", [({}, 3, 5), ({}, 1, 2), ({"pred_depth": 3, "history": 4}, 2, 6)])
def test_flop_count_matches_torch_flop_counter(overrides, h, H, monkeypatch):
    """``flops()`` counts exactly the matmuls and attention that a cost call runs."""
    from torch.utils.flop_counter import FlopCounterMode

    _count_attention_flops(monkeypatch)
    model = _model(**overrides)
    z_hist, past, actions, z_goal = _inputs(model, E=2, h=h, N=3, H=H)
    fr = FusedRollout(model)
    with use_backend("reference"), FlopCounterMode(display=False) as counter:
        fr.cost(z_hist, past, actions, z_goal)
    assert counter.get_total_flops() == fr.flops(2, 3, H, h)


def test_latent_cost_takes_the_fused_rollout_unless_told_not_to(monkeypatch):
    """Counted work tells the paths apart: the fused cost runs exactly ``FusedRollout.flops``, the
    ``fused=False`` cost (``model.rollout``) about 1.9x more for this model at a full window."""
    from torch.utils.flop_counter import FlopCounterMode

    _count_attention_flops(monkeypatch)
    model = _model()
    z_hist, past, actions, z_goal = _inputs(model, E=2, h=3, N=4, H=5)
    counted = {}
    for fused in (True, False):
        fn = latent_cost(model, z_hist, past, z_goal, fused=fused)
        with torch.no_grad(), use_backend("reference"), FlopCounterMode(display=False) as counter:
            fn(actions)
        counted[fused] = counter.get_total_flops()
    assert counted[True] == FusedRollout(model).flops(2, 4, 5, 3)
    assert counted[False] > 1.5 * counted[True], counted
