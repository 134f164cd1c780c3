"""Planning a world model of h > 1 frames inside stable-worldmodel with the history it was trained on.

stable-worldmodel's ``WorldModelPolicy`` hands its solver the current observation only;
``HistoryWorldModelPolicy`` keeps each environment's last ``history_len`` frames (``action_block`` env
steps apart) and the actions between them, and ``WorldModelCost`` rolls every environment out from its
own history. Checked here: the windows and their alignment, that the cost reads the earlier frames and
actions, that the policy passes exactly the frames and actions the env showed and took, that the
history starts afresh with every episode, and that with ``history_len = 1`` nothing changes.

Needs stable-worldmodel (`make envs`): skipped, with the reason, where it cannot be imported.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

swm = pytest.importorskip("stable_worldmodel", reason="stable-worldmodel is not importable (`make envs` installs it)",
                          exc_type=ImportError)

from jepa_engine.integrations import swm_eval  # noqa: E402
from jepa_engine.integrations.stable_worldmodel import (  # noqa: E402
    CACHE_KEY, HISTORY_KEY, PAST_ACTION_KEY, CEMSolver, FrameHistory, HistoryWorldModelPolicy, WorldModelCost,
    frames_for_model,
)
from jepa_engine.models.world_model import WM_PRESETS, WorldModel, WorldModelConfig  # noqa: E402
from jepa_engine.planning.latent_cost import latent_cost  # noqa: E402
from tests.helpers import reference_ops_one_thread  # noqa: E402

ENV = "swm/TwoRoom-v1"
BLOCK = 5


@pytest.fixture(autouse=True)
def _reference_ops():
    with reference_ops_one_thread():
        yield


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from jepa_engine.integrations.swm_data import collect

    out = tmp_path_factory.mktemp("tworoom-history") / "data"
    with reference_ops_one_thread():
        collect(ENV, "expert", episodes=4, steps=60, out=out, size=32, seed=0, log=None)
    return out


def tiny_model(history: int, block: int = BLOCK, seed: int = 0) -> WorldModel:
    torch.manual_seed(seed)
    cfg = {**WM_PRESETS["test"], "action_dim": 2 * block, "in_chans": 3, "history": history}
    return WorldModel(WorldModelConfig(**cfg)).eval()


def frames_of(dataset, rows) -> torch.Tensor:
    """uint8 [len(rows), 32, 32, 3]: frame ``r`` of episode ``e`` for each (e, r)."""
    from jepa_engine.integrations.swm_data import TrajectoryDataset

    data = TrajectoryDataset(dataset)
    return torch.from_numpy(np.stack([data.rows(e, r, r + 1, ["pixels"])["pixels"][0] for e, r in rows]))


def expand(v: torch.Tensor, S: int) -> torch.Tensor:
    """[B, ...] -> [B, S, ...] as a solver broadcasts the info dict."""
    return v[:, None].expand(v.shape[0], S, *v.shape[1:])


# --------------------------------------------------------------------------------------------------
# The windows
# --------------------------------------------------------------------------------------------------
def test_frame_history_windows_and_resets():
    """history 3, action block 2: frames s-4, s-2, s (fewer early on, left-padded), the two env actions
    after each of the first two concatenated; reset and a missing action start afresh."""
    h = FrameHistory(2, history=3, action_block=2, action_dim=1)
    seen = []
    for s in range(7):
        h.observe(np.array([[s], [10 + s]]))
        seen.append(h.stacked())
        h.record(np.array([[100 + s], [200 + s]]))
    assert [p[2].tolist() for p in seen] == [[1, 1], [1, 1], [2, 2], [2, 2], [3, 3], [3, 3], [3, 3]]
    pixels, past, lengths = seen[6]
    assert pixels[:, :, 0].tolist() == [[2, 4, 6], [12, 14, 16]]
    assert past.tolist() == [[[102, 103], [104, 105]], [[202, 203], [204, 205]]]
    pixels, past, _ = seen[3]
    assert pixels[:, :, 0].tolist() == [[1, 3], [11, 13]] and past.tolist() == [[[101, 102]], [[201, 202]]]
    assert seen[0][1].shape == (2, 0, 2)
    h.reset([True, False])
    h.observe(np.array([[50], [60]]))
    pixels, past, lengths = h.stacked()
    assert lengths.tolist() == [1, 3]
    assert pixels[:, :, 0].tolist() == [[50, 50, 50], [13, 15, 60]]          # row 0 padded with its one frame
    assert past.tolist() == [[[0, 0], [0, 0]], [[203, 204], [205, 206]]]
    h.observe(np.array([[51], [61]]))                                         # no action recorded in between
    assert h.lengths().tolist() == [1, 1]
    with pytest.raises(ValueError, match=r"actions must be \[2, 1\], got \[2, 3\]"):
        h.record(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="action_block must be an int >= 1, got 0"):
        FrameHistory(2, 3, 0)


# --------------------------------------------------------------------------------------------------
# The cost reads the history
# --------------------------------------------------------------------------------------------------
def test_cost_depends_on_earlier_frames_and_actions(dataset):
    model = tiny_model(history=3)
    B, S, H, A = 3, 6, 4, 2 * BLOCK
    g = torch.Generator().manual_seed(0)
    pix = frames_of(dataset, [(e, r) for e in range(B) for r in (0, 5, 10)]).view(B, 3, 32, 32, 3)
    goal = frames_of(dataset, [(e, 35) for e in range(B)])
    past = torch.rand(B, 2, A, generator=g) * 2 - 1
    cand = torch.rand(B, S, H, A, generator=g) * 2 - 1

    def info(p=pix, a=past, lengths=None):
        d = {"pixels": expand(p, S), "goal": expand(goal[:, None], S), PAST_ACTION_KEY: expand(a, S)}
        if lengths is not None:
            d[HISTORY_KEY] = expand(torch.tensor(lengths)[:, None], S)
        return d

    cost = WorldModelCost(model)
    got = cost.get_cost(info(), cand)
    with torch.no_grad():
        z = model.encode(frames_for_model(torch.cat([pix.flatten(0, 1), goal]), model))
        want = latent_cost(model, z[:3 * B].view(B, 3, -1), past, z[3 * B:])(cand)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # another oldest frame for env 0 (its negative): env 0's costs of a one-step plan (the prediction
    # that reads the whole history) change, the others' do not
    one = cand[:, :, :1]
    base = WorldModelCost(model).get_cost(info(), one)
    other = pix.clone()
    other[0, 0] = 255 - other[0, 0]
    moved = WorldModelCost(model).get_cost(info(other), one)
    assert float((moved[0] - base[0]).abs().min()) > 2e-4          # 8e-3 measured; fp32 noise ~1e-6
    torch.testing.assert_close(moved[1:], base[1:], rtol=0, atol=0)
    # another first past action for env 1: env 1's costs change
    a2 = past.clone()
    a2[1, 0] = -a2[1, 0]
    moved = WorldModelCost(model).get_cost(info(a=a2), one)
    assert float((moved[1] - base[1]).abs().min()) > 2e-4          # 2e-3 measured
    # ragged histories, one encoder pass: each row rolled out from its own last t frames and t-1 actions
    lengths = [3, 1, 2]
    cost = WorldModelCost(model)
    d = info(lengths=lengths)
    ragged = cost.get_cost(d, cand)
    assert cost.encodes == 1 and len(d[CACHE_KEY]["groups"]) == 3
    for b, t in enumerate(lengths):
        ref = latent_cost(model, z[3 * b + 3 - t:3 * b + 3][None], past[b:b + 1, 2 - (t - 1):], z[3 * B + b][None])
        torch.testing.assert_close(ragged[b], ref(cand[b:b + 1])[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ragged[0], got[0], rtol=1e-5, atol=1e-6)
    # row 1 plans from its current frame alone: its earlier frames and actions are not read
    other = pix.clone()
    other[1, :2] = 0
    torch.testing.assert_close(WorldModelCost(model).get_cost(info(other, past * 0, lengths), cand)[1], ragged[1])
    with pytest.raises(ValueError, match=r"history_len.*must be >= 1"):
        WorldModelCost(model).get_cost(info(lengths=[3, 0, 2]), cand)
    with pytest.raises(KeyError, match="a history of 3 frames needs info_dict\\['past_action'\\]"):
        d = info()
        del d[PAST_ACTION_KEY]
        WorldModelCost(model).get_cost(d, cand)


# --------------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------------
class RecordingSolver(CEMSolver):
    """Our CEM solver that keeps a copy of what each solve is given."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.given = []

    def solve(self, info_dict, init_action=None):
        self.given.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in info_dict.items()})
        return super().solve(info_dict, init_action)


def record_steps(policy):
    """Wrap ``policy.get_action``: the frame shown and the action returned at every env step."""
    steps, get = [], policy.get_action

    def get_action(info_dict, **kw):
        frame = np.asarray(info_dict["pixels"])[:, -1].copy()
        action = get(info_dict, **kw)
        steps.append((frame, np.asarray(action).copy()))
        return action

    policy.get_action = get_action
    return steps


def test_policy_passes_the_frames_and_actions_of_each_episode(dataset):
    """history 3, action block 5, one model step executed per plan: plans at env steps 0, 5, 10 see
    1, 2 and 3 frames, exactly those the env showed 5 steps apart, with the actions it took between
    them; a second evaluation starts every history afresh."""
    from jepa_engine.integrations.swm_data import swm_dataset

    model = tiny_model(history=3)
    solver = RecordingSolver(WorldModelCost(model), num_samples=8, n_steps=1, topk=2, seed=0)
    plan = swm.PlanConfig(horizon=2, receding_horizon=1, action_block=BLOCK, history_len=3)
    world = swm.World(ENV, num_envs=2, image_shape=(32, 32), max_episode_steps=100)
    try:
        policy = HistoryWorldModelPolicy(solver=solver, config=plan)
        world.set_policy(policy)
        steps = record_steps(policy)
        kw = dict(dataset=swm_dataset(dataset), episodes_idx=[0, 1], start_steps=[0, 4], goal_offset=25,
                  eval_budget=15, callables=swm_eval.ENV_SETUP[ENV])
        world.evaluate(**kw)
        first = len(solver.given)
        world.evaluate(**{**kw, "start_steps": [2, 6]})         # same policy, not re-attached
    finally:
        world.close()
    assert first == 3 and len(solver.given) == 6
    frames = np.stack([f for f, _ in steps[:15]], 1)             # [2, 15, 32, 32, 3]
    actions = np.stack([a for _, a in steps[:15]], 1)            # [2, 15, 2]
    # An env whose episode ends (success) is frozen: NaN actions from then on, and no more plans.
    alive = np.isfinite(actions).all(-1)                          # [2, 15]
    assert alive[:, 0].all() and (np.diff(alive.astype(int), axis=1) <= 0).all()
    assert np.abs(actions[alive]).max() <= 1.0
    for j, s in enumerate((0, 5, 10)):
        given = solver.given[j]                                   # the envs alive at step s, in order
        rows = np.flatnonzero(alive[:, s])
        t = j + 1
        assert given[HISTORY_KEY].flatten().tolist() == [t] * len(rows)
        pix = given["pixels"]                                     # [envs, T, 32, 32, 3]
        assert pix.shape[1] == t
        want = frames[rows][:, [s - 5 * i for i in range(t - 1, -1, -1)]]
        assert np.array_equal(pix.numpy(), want)
        past = given[PAST_ACTION_KEY]                             # [envs, t-1, 10]
        assert past.shape == (len(rows), t - 1, 2 * BLOCK)
        for i in range(t - 1):
            lo = s - 5 * (t - 1 - i)
            assert np.array_equal(past[:, i].numpy(), actions[rows, lo:lo + BLOCK].reshape(len(rows), -1))
    # the second evaluation: new episodes (a frozen env's queued actions dropped), so its first plan, for
    # both envs, sees the start frame alone
    assert solver.given[3][HISTORY_KEY].flatten().tolist() == [1, 1]
    assert solver.given[3]["pixels"].shape[1] == 1
    assert np.array_equal(solver.given[3]["pixels"][:, 0].numpy(), steps[15][0])
    assert set(solver.given[5][HISTORY_KEY].flatten().tolist()) == {3}


class FakePool:
    """What a policy reads of World's env pool: the env count and the action spaces."""

    def __init__(self, n: int):
        import gymnasium as gym

        self.num_envs = n
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(n, 2), dtype=np.float32)


def test_policy_episode_starts():
    """An env's history restarts when its episode id changes (not after its first frame: the dataset's
    columns overwrite the first observation) or World flags it in a new ``_needs_flush`` (not in the one
    World leaves behind)."""
    model = tiny_model(history=2, block=1)
    solver = RecordingSolver(WorldModelCost(model), num_samples=4, n_steps=1, topk=2, seed=0)
    policy = HistoryWorldModelPolicy(solver=solver, config=swm.PlanConfig(horizon=1, receding_horizon=1,
                                                                            history_len=2))
    policy.set_env(FakePool(2))
    g = np.random.default_rng(0)
    goal = g.integers(0, 255, (2, 1, 32, 32, 3), dtype=np.uint8)

    def step(ids, flush=None):
        info = {"pixels": g.integers(0, 255, (2, 1, 32, 32, 3), dtype=np.uint8), "goal": goal,
                "id": np.array(ids)[:, None], "terminated": np.zeros((2, 1), bool)}
        if flush is not None:
            info["_needs_flush"] = flush
        policy.get_action(info)
        return solver.given[-1][HISTORY_KEY].flatten().tolist()

    assert step([7, 8]) == [1, 1]
    assert step([1, 2]) == [2, 2]          # ids changed after the first frame only: kept
    assert step([1, 2]) == [2, 2]
    assert step([1, 3]) == [2, 1]          # env 1 reset
    flush = np.array([True, False])
    assert step([1, 3], flush) == [1, 2]   # World's flag for env 0
    assert step([1, 3], flush) == [2, 2]   # the same flag, left in the info dict: not a new episode
    policy.set_env(FakePool(2))
    assert step([1, 3]) == [1, 1]


def test_new_episode_drops_the_queued_actions():
    """An env whose episode ended while the others ran on is frozen with the rest of its action block
    queued (``World.evaluate(dataset=...)``); when its next episode starts (a new id, no flush) it plans
    afresh instead of running that queue, at the same step as the others."""
    model = tiny_model(history=2, block=3)
    solver = RecordingSolver(WorldModelCost(model), num_samples=4, n_steps=1, topk=2, seed=0)
    policy = HistoryWorldModelPolicy(solver=solver, config=swm.PlanConfig(horizon=1, receding_horizon=1,
                                                                            action_block=3, history_len=2))
    policy.set_env(FakePool(2))
    g = np.random.default_rng(1)
    goal = g.integers(0, 255, (2, 1, 32, 32, 3), dtype=np.uint8)

    def step(ids, terminated=(False, False)):
        info = {"pixels": g.integers(0, 255, (2, 1, 32, 32, 3), dtype=np.uint8), "goal": goal,
                "id": np.array(ids)[:, None], "terminated": np.array(terminated)[:, None]}
        return policy.get_action(info)

    step([7, 8])
    assert len(solver.given) == 1 and solver.given[0][HISTORY_KEY].numel() == 2
    for _ in range(3):                      # env 0 done after one action: two of its block stay queued
        action = step([7, 8], terminated=(True, False))
        assert np.isnan(action[0]).all() and np.isfinite(action[1]).all()
    assert len(solver.given) == 2 and solver.given[1][HISTORY_KEY].flatten().tolist() == [2]   # env 1 alone
    assert len(policy._action_buffer[0]) == 2
    step([9, 10])                           # the next evaluation: both envs in new episodes
    assert len(solver.given) == 3
    assert solver.given[2][HISTORY_KEY].flatten().tolist() == [1, 1]
    assert [len(b) for b in policy._action_buffer] == [2, 2]


def test_history_1_is_worldmodelpolicy(dataset):
    """With history_len = 1 the policy is WorldModelPolicy: the same plans and results on the same
    evaluation, no history keys in the solver's info."""
    from jepa_engine.integrations.swm_data import swm_dataset

    kw = dict(dataset=swm_dataset(dataset), episodes_idx=[0, 1, 2], start_steps=[0, 3, 6], goal_offset=25,
              eval_budget=20, callables=swm_eval.ENV_SETUP[ENV])
    plan = swm.PlanConfig(horizon=3, receding_horizon=2, action_block=BLOCK)
    runs = {}
    for name, Policy in (("swm", swm.policy.WorldModelPolicy), ("ours", HistoryWorldModelPolicy)):
        solver = RecordingSolver(WorldModelCost(tiny_model(history=1)), num_samples=8, n_steps=2, topk=2, seed=3)
        world = swm.World(ENV, num_envs=3, image_shape=(32, 32), max_episode_steps=100)
        try:
            policy = Policy(solver=solver, config=plan)
            world.set_policy(policy)
            steps = record_steps(policy)
            res = world.evaluate(**kw)
        finally:
            world.close()
        runs[name] = (solver.given, steps, res)
    (g1, s1, r1), (g2, s2, r2) = runs["swm"], runs["ours"]
    assert len(g1) == len(g2) == 2 and len(s1) == len(s2) == 20
    for a, b in zip(g1, g2):
        assert set(a) == set(b) and HISTORY_KEY not in b and PAST_ACTION_KEY not in b
        assert torch.equal(a["pixels"], b["pixels"])
    for (f1, a1), (f2, a2) in zip(s1, s2):
        assert np.array_equal(f1, f2) and np.array_equal(a1, a2)
    assert np.array_equal(r1["episode_successes"], r2["episode_successes"])
