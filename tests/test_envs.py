"""The built-in world: physics invariants, walls, seeding, rendering, API, controller, data stream, config."""
from __future__ import annotations

import json

import pytest
import torch

from jepa_engine.envs import (Box, GoalController, PointMassEnv, PointMassWorld, TrajectoryStream, WorldConfig,
                              door_band, in_free_space, render)


def _shoot(cfg: WorldConfig, n: int, speed: float, seed: int) -> PointMassWorld:
    """A world of n masses at random free positions with random velocities of about `speed`."""
    world = PointMassWorld(cfg, num_envs=n, seed=seed)
    world.reset()
    g = torch.Generator().manual_seed(seed + 1)
    vel = torch.randn(n, 2, generator=g) * speed
    world.reset(options={"state": torch.cat([world.pos, vel], dim=1)})
    return world


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small batched ops: one intra-op thread avoids spin-waiting on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sampled_positions_are_free():
    cfg = WorldConfig(layout="two_rooms", image_size=8)
    world = PointMassWorld(cfg, num_envs=4096, seed=0)
    pos = world.sample_free_positions(4096)
    assert in_free_space(pos, cfg).all()
    assert (pos[:, 0] < 0.5).float().mean().sub(0.5).abs() < 0.05, "both rooms are sampled evenly"


def _jamb_violation(pos: torch.Tensor, cfg: WorldConfig) -> torch.Tensor:
    """[B] True where a centre lies inside the middle wall (inflated by the radius), outside the door."""
    c, h = cfg.arena_size / 2, cfg.wall_thickness / 2 + cfg.radius
    d_lo, d_hi = door_band(cfg)
    eps = 1e-5
    return ((pos[:, 0] - c).abs() < h - eps) & ((pos[:, 1] < d_lo - eps) | (pos[:, 1] > d_hi + eps))


# ---------------------------------------------------------------- physics
@pytest.mark.parametrize("layout", ["open", "two_rooms"])
def test_energy_conserved_without_friction_and_gravity(layout):
    cfg = WorldConfig(layout=layout, damping=0.0, gravity=0.0, restitution=1.0, image_size=8)
    world = _shoot(cfg, 128, speed=2.0, seed=0)
    speed0 = world.vel.norm(dim=1)
    bounces = torch.zeros(128)
    for _ in range(200):
        before = world.vel.clone()
        world.step(torch.zeros(128, 2))
        bounces += (torch.sign(before) != torch.sign(world.vel)).any(dim=1).float()
    assert bounces.sum() > 500, "the test must include many wall bounces"
    err = ((world.vel.norm(dim=1) - speed0).abs() / speed0).max()
    assert err < 1e-4, f"relative kinetic-energy drift {err:.2e}"


def test_energy_with_gravity_stays_bounded():
    cfg = WorldConfig(damping=0.0, gravity=0.6, restitution=1.0, substeps=8, image_size=8)
    world = _shoot(cfg, 64, speed=1.0, seed=3)
    energy = lambda: 0.5 * world.vel.pow(2).sum(dim=1) + cfg.gravity * world.pos[:, 1]
    e0 = energy()
    for step in range(300):
        world.step(torch.zeros(64, 2))
        if step % 100 == 99:  # semi-implicit Euler: an O(dt) error that oscillates, no growth
            err = ((energy() - e0).abs() / e0).max()
            assert err < 0.1, f"relative energy drift with gravity {err:.3f} after {step + 1} steps"


def test_restitution_and_friction_dissipate():
    for overrides in ({"restitution": 0.5, "damping": 0.0}, {"damping": 1.0}):
        world = _shoot(WorldConfig(image_size=8, **overrides), 64, speed=3.0, seed=1)
        e0 = world.vel.pow(2).sum()
        for _ in range(50):
            world.step(torch.zeros(64, 2))
        assert world.vel.pow(2).sum() < 0.5 * e0, overrides


@pytest.mark.parametrize("substeps", [1, 4])
def test_walls_never_crossed_at_high_speed(substeps):
    cfg = WorldConfig(layout="two_rooms", damping=0.0, substeps=substeps, image_size=8)
    n, c = 512, cfg.arena_size / 2
    world = _shoot(cfg, n, speed=15.0, seed=2)  # ~1.5 arena widths per step
    room_changes = 0
    for _ in range(60):
        side = world.pos[:, 0] > c
        world.step(torch.zeros(n, 2))
        p = world.pos
        assert ((p >= cfg.radius - 1e-6) & (p <= cfg.arena_size - cfg.radius + 1e-6)).all(), "left the arena"
        assert not _jamb_violation(p, cfg).any(), "inside the middle wall"
        room_changes += int((side != (p[:, 0] > c)).sum())
    assert room_changes > 0, "some masses must pass the door"


def test_crossings_only_through_door():
    # Small dt so that a step moves less than the narrowest gap (the door, 0.2 between its faces):
    # a step whose velocity keeps its signs then had no bounce and is one straight segment, and
    # where that segment crosses x = c, its y must be in the door.
    cfg = WorldConfig(layout="two_rooms", damping=0.0, substeps=1, dt=0.01, image_size=8)
    n, c = 256, cfg.arena_size / 2
    world = _shoot(cfg, n, speed=15.0, seed=2)
    world.reset(options={"state": torch.cat([world.pos, world.vel.clamp(-19.0, 19.0)], dim=1)})
    door0, door1 = cfg.door_center - cfg.door_width / 2, cfg.door_center + cfg.door_width / 2
    checked = 0
    for _ in range(150):
        p0, v0 = world.pos.clone(), world.vel.clone()
        world.step(torch.zeros(n, 2))
        p1, v1 = world.pos, world.vel
        straight = (torch.sign(v0) == torch.sign(v1)).all(dim=1)
        sel = straight & (torch.sign(p0[:, 0] - c) != torch.sign(p1[:, 0] - c))
        y_at = p0[sel, 1] + (c - p0[sel, 0]) / (p1[sel, 0] - p0[sel, 0]) * (p1[sel, 1] - p0[sel, 1])
        assert ((y_at >= door0) & (y_at <= door1)).all(), f"crossed outside the door at y = {y_at}"
        assert not _jamb_violation(p1, cfg).any(), "inside the middle wall"
        checked += int(sel.sum())
    assert checked > 20, f"only {checked} door crossings were checked"


def test_horizontal_shots_outside_door_bounce_back():
    cfg = WorldConfig(layout="two_rooms", damping=0.0, substeps=1, image_size=8)
    speeds = torch.linspace(1.0, 200.0, 64)
    ys = torch.where(torch.arange(64) % 2 == 0, torch.tensor(0.15), torch.tensor(0.85))
    state = torch.stack([torch.full((64,), 0.2), ys, speeds, torch.zeros(64)], dim=1)
    world = PointMassWorld(cfg, num_envs=64, seed=0)
    world.reset(options={"state": state})
    for _ in range(30):
        world.step(torch.zeros(64, 2))
        assert (world.pos[:, 0] < cfg.arena_size / 2).all(), "a horizontal shot went through the wall"
    torch.testing.assert_close(world.vel.abs(), state[:, 2:].abs())


def test_action_clipping():
    cfg = WorldConfig(damping=0.0, image_size=8)
    a = PointMassWorld(cfg, num_envs=8, seed=0)
    b = PointMassWorld(cfg, num_envs=8, seed=0)
    a.reset(), b.reset()
    big = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)) * 10
    a.step(big)
    b.step(big.clamp(-1, 1))
    assert torch.equal(a.state, b.state)
    assert (a.vel.abs() <= cfg.max_force / cfg.mass * cfg.dt + 1e-6).all()


# ---------------------------------------------------------------- seeding and API
def _rollout(world: PointMassWorld, seed: int, steps: int = 20) -> torch.Tensor:
    world.reset(seed=seed)
    g = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(steps):
        world.step(torch.rand(world.num_envs, 2, generator=g) * 2 - 1)
        states.append(world.state)
    return torch.stack(states)


def test_seeding_reproduces_and_differs():
    cfg = WorldConfig.from_name("two_rooms")
    a = _rollout(PointMassWorld(cfg, num_envs=16), seed=5)
    b = _rollout(PointMassWorld(cfg, num_envs=16), seed=5)
    c = _rollout(PointMassWorld(cfg, num_envs=16), seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    w1, w2 = PointMassWorld(cfg, num_envs=4, seed=9), PointMassWorld(cfg, num_envs=4, seed=9)
    assert torch.equal(w1.reset()[0], w2.reset()[0]) and torch.equal(w1.goal, w2.goal)


def test_step_outputs_and_spaces():
    world = PointMassWorld(WorldConfig(), num_envs=6, seed=0)
    obs, info = world.reset()
    assert world.observation_space.contains(obs)
    action = world.action_space.sample(torch.Generator().manual_seed(0))
    assert world.action_space.contains(action) and not world.action_space.contains(action * 3)
    assert not world.action_space.contains(torch.zeros(5, 2))
    obs, reward, terminated, truncated, info = world.step(action)
    assert reward.shape == terminated.shape == truncated.shape == (6,)
    assert terminated.dtype == truncated.dtype == torch.bool
    assert info["state"].shape == (6, 4) and info["goal"].shape == (6, 2)
    torch.testing.assert_close(reward, -(info["state"][:, :2] - info["goal"]).norm(dim=1))
    assert torch.equal(info["success"], terminated)
    with pytest.raises(ValueError, match=r"action must be \[6, 2\], got \[6, 3\]"):
        world.step(torch.zeros(6, 3))


def test_goal_termination_and_truncation():
    cfg = WorldConfig(max_episode_steps=3, image_size=8)
    world = PointMassWorld(cfg, num_envs=2, seed=0)
    state = torch.tensor([[0.3, 0.3, 0.0, 0.0], [0.7, 0.7, 0.0, 0.0]])
    goal = torch.tensor([[0.3, 0.32], [0.2, 0.2]])
    world.reset(options={"state": state, "goal": goal})
    for i in range(3):
        _, reward, terminated, truncated, info = world.step(torch.zeros(2, 2))
        assert terminated.tolist() == [True, False] and info["success"].tolist() == [True, False]
        assert truncated.tolist() == [i == 2, i == 2]
    world.reset()
    assert world.steps.sum() == 0


def test_single_env_matches_batched_world():
    cfg = WorldConfig.from_name("two_rooms")
    env = PointMassEnv(cfg, seed=11)
    world = PointMassWorld(cfg, num_envs=1, seed=11)
    obs_e, info_e = env.reset()
    obs_w, info_w = world.reset()
    assert env.observation_space.contains(obs_e) and torch.equal(obs_e, obs_w[0])
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        a = env.action_space.sample(g)
        oe, re, te, tre, ie = env.step(a)
        ow, rw, tw, trw, iw = world.step(a.unsqueeze(0))
        assert torch.equal(oe, ow[0]) and torch.equal(ie["state"], iw["state"][0])
        assert re == float(rw[0]) and te == bool(tw[0]) and tre == bool(trw[0])
        assert isinstance(re, float) and isinstance(ie["success"], bool)


# ---------------------------------------------------------------- rendering
@pytest.mark.parametrize("channels", [1, 3])
def test_render_shape_dtype_range(channels):
    cfg = WorldConfig(layout="two_rooms", channels=channels, image_size=48, render_goal=True)
    world = PointMassWorld(cfg, num_envs=5, seed=0)
    obs, _ = world.reset()
    assert obs.shape == (5, channels, 48, 48) and obs.dtype == torch.float32
    assert obs.min() >= 0 and obs.max() <= 1
    assert (obs.std(dim=0) > 0).any(), "different states must render differently"


def test_render_centroid_and_antialiasing():
    cfg = WorldConfig(radius=0.06)
    n = cfg.image_size
    g = torch.Generator().manual_seed(0)
    pos = cfg.radius + torch.rand(32, 2, generator=g) * (cfg.arena_size - 2 * cfg.radius)
    img = render(pos, cfg)[:, 0]                                           # [B, H, W]
    idx = torch.arange(n, dtype=torch.float32) + 0.5
    mass = img.sum(dim=(1, 2))
    col = (img.sum(dim=1) * idx).sum(dim=1) / mass                          # pixel units
    row = (img.sum(dim=2) * idx).sum(dim=1) / mass
    est = torch.stack([col / n * cfg.arena_size, cfg.arena_size - row / n * cfg.arena_size], dim=1)
    err_px = ((est - pos).abs() * n / cfg.arena_size).max()
    assert err_px < 0.1, f"centroid off by {err_px:.3f} px"
    edge = ((img > 0.02) & (img < 0.98)).sum(dim=(1, 2))
    assert (edge >= 8).all(), "the disc edge must be anti-aliased"
    area_px = torch.pi * (cfg.radius * n / cfg.arena_size) ** 2
    torch.testing.assert_close(mass, torch.full_like(mass, area_px), rtol=0.03, atol=0)


def test_render_walls_and_goal_marker():
    cfg = WorldConfig(layout="two_rooms", render_goal=True)
    pos, goal = torch.tensor([[0.2, 0.2]]), torch.tensor([[0.8, 0.8]])
    img = render(pos, cfg, goal)[0, 0]
    n = cfg.image_size
    col = int(0.5 * n)
    door_row = int((1 - cfg.door_center) * n)
    assert img[5, col] > 0.3 and img[n - 5, col] > 0.3, "the wall is drawn"
    assert img[door_row, col] == 0, "the door is open"
    assert 0.2 < img[int(0.2 * n), int(0.8 * n)] < 0.5, "the goal is drawn dimmer than the mass"


# ---------------------------------------------------------------- controller
@pytest.mark.parametrize("name", ["open", "two_rooms", "gravity"])
def test_controller_reaches_goal(name):
    cfg = WorldConfig.from_name(name, image_size=8)
    n = 128
    world = PointMassWorld(cfg, num_envs=n, seed=4)
    world.reset()
    if name == "two_rooms":  # every goal in the other room, so each route needs the door
        goal = world.goal.clone()
        same = torch.sign(goal[:, 0] - 0.5) == torch.sign(world.pos[:, 0] - 0.5)
        goal[same, 0] = cfg.arena_size - goal[same, 0]
        world.reset(options={"state": world.state, "goal": goal})
    controller = GoalController(cfg)
    reached = torch.zeros(n, dtype=torch.bool)
    for _ in range(80):
        *_, terminated, _, _ = world.step(controller(world.state, world.goal))
        reached |= terminated
    rate = reached.float().mean()
    assert rate >= 0.9, f"{name}: success rate {rate:.2f}"


# ---------------------------------------------------------------- data stream
@pytest.mark.parametrize("policy", ["random", "goal", "mixed"])
def test_stream_shapes_and_reproducibility(policy):
    cfg = WorldConfig(layout="two_rooms", image_size=32, channels=3)
    stream = TrajectoryStream(cfg, batch_size=4, episode_len=6, policy=policy, seed=1, num_batches=2)
    batches = list(stream)
    assert len(batches) == 2
    b = batches[0]
    assert b["obs"].shape == (4, 7, 3, 32, 32) and b["actions"].shape == (4, 6, 2)
    assert b["states"].shape == (4, 7, 4) and b["goals"].shape == (4, 2)
    assert b["actions"].abs().max() <= 1
    assert not torch.equal(batches[0]["states"], batches[1]["states"])
    again = list(stream)
    for x, y in zip(batches, again):
        assert all(torch.equal(x[k], y[k]) for k in x)
    # the states are the ones the observations show
    torch.testing.assert_close(b["obs"][:, 3], render(b["states"][:, 3, :2], cfg))


def test_random_actions_are_temporally_correlated():
    stream = TrajectoryStream(WorldConfig(image_size=8), batch_size=64, episode_len=40, seed=0, num_batches=1)
    a = next(iter(stream))["actions"]
    corr = torch.corrcoef(torch.stack([a[:, :-1].flatten(), a[:, 1:].flatten()]))[0, 1]
    assert corr > 0.7, f"lag-1 action correlation {corr:.2f}"


# ---------------------------------------------------------------- config
def test_config_presets_and_json_round_trip():
    for name in ("open", "two_rooms", "gravity"):
        cfg = WorldConfig.from_name(name)
        again = WorldConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg
    assert WorldConfig.from_name("two_rooms").layout == "two_rooms"
    assert WorldConfig.from_name("gravity").gravity > 0
    assert WorldConfig.from_name("open", dt=0.05).dt == 0.05
    with pytest.raises(ValueError, match="name must be one of"):
        WorldConfig.from_name("three_rooms")
    with pytest.raises(ValueError, match="unknown fields"):
        WorldConfig.from_dict({"dtt": 0.1})


@pytest.mark.parametrize("overrides, field, actual", [
    ({"dt": -0.1}, "dt", "-0.1"),
    ({"image_size": 4}, "image_size", "4"),
    ({"channels": 2}, "channels", "2"),
    ({"restitution": 1.5}, "restitution", "1.5"),
    ({"substeps": 0}, "substeps", "0"),
    ({"damping": -1.0}, "damping", "-1.0"),
    ({"layout": "maze"}, "layout", "'maze'"),
    ({"layout": "two_rooms", "door_width": 1.5}, "door_width", "1.5"),
    ({"layout": "two_rooms", "door_width": 0.05}, "door_width", "0.05"),
    ({"layout": "two_rooms", "door_center": 0.95}, "door_center", "0.95"),
    ({"radius": 0.6}, "radius", "0.6"),
])
def test_bad_config_raises(overrides, field, actual):
    with pytest.raises(ValueError, match=rf"WorldConfig\.{field} must be .*, got {actual}") as err:
        WorldConfig(**overrides)
    assert "must be" in str(err.value)


def test_bad_stream_and_world_arguments():
    with pytest.raises(ValueError, match="policy must be one of"):
        TrajectoryStream(WorldConfig(), 2, 3, policy="expert")
    with pytest.raises(ValueError, match="num_envs must be an int >= 1, got 0"):
        PointMassWorld(WorldConfig(), num_envs=0)
    assert Box(-1.0, 1.0, (3,)).sample().shape == (3,)
    world = PointMassWorld(WorldConfig(layout="two_rooms"), num_envs=2)
    with pytest.raises(ValueError, match="must lie in the free space .*got 1 of 2 outside"):
        world.reset(options={"state": torch.tensor([[0.2, 0.2, 0.0, 0.0], [0.5, 0.1, 0.0, 0.0]])})
