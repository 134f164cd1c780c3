"""The built-in 2-D physical world: a batched point mass in an arena (open, two rooms, gravity).

    world = PointMassWorld(WorldConfig.from_name("two_rooms"), num_envs=1024, seed=0)
    obs, info = world.reset()                 # obs [B, C, H, W], info["state"] [B, 4]
    obs, reward, terminated, truncated, info = world.step(actions)   # actions [B, 2] in [-1, 1]
"""
from .config import PRESETS, WorldConfig
from .controller import GoalController
from .data import TrajectoryBatches, TrajectoryStream
from .physics import build_faces, door_band, in_free_space, step_physics
from .render import render, render_background
from .spaces import Box
from .world import PointMassEnv, PointMassWorld

__all__ = ["Box", "GoalController", "PRESETS", "PointMassEnv", "PointMassWorld", "TrajectoryBatches", "TrajectoryStream", "WorldConfig",
           "build_faces", "door_band", "in_free_space", "render", "render_background", "step_physics"]
