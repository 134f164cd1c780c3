"""`WorldConfig`: every parameter of the built-in point-mass world, with named presets.

Units: the arena is the square [0, arena_size]^2 with y pointing up; time in seconds; the mass is a
disc of `radius` (it collides with its edge, so its centre stays `radius` away from every wall).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jepa_engine.config import ConfigIO

LAYOUTS = ("open", "two_rooms")


@dataclass
class WorldConfig(ConfigIO):
    layout: str = "open"            # "open" or "two_rooms" (a vertical wall at x = arena_size/2 with a door)
    arena_size: float = 1.0         # side of the square arena
    radius: float = 0.05            # radius of the mass (collision and drawing)
    mass: float = 1.0
    max_force: float = 1.5          # action in [-1, 1]^2 is scaled by this (force units)
    damping: float = 1.0            # linear friction: acceleration -damping * velocity (1/s)
    restitution: float = 1.0        # normal velocity kept at a bounce (1.0 = elastic)
    gravity: float = 0.0            # acceleration pulling towards -y
    dt: float = 0.1                 # seconds per environment step
    substeps: int = 4               # semi-implicit Euler substeps per step
    wall_thickness: float = 0.04    # middle wall of "two_rooms"
    door_center: float = 0.5        # y of the door's centre
    door_width: float = 0.3         # height of the gap in the middle wall
    goal_radius: float = 0.08       # success when the centre is this close to the goal
    max_episode_steps: int = 200    # `truncated` after this many steps
    image_size: int = 64            # rendered observations are image_size x image_size
    channels: int = 1               # 1 (grey) or 3 (RGB)
    render_goal: bool = False       # draw the goal marker in the observation

    def __post_init__(self) -> None:
        def bad(field: str, expected: str, actual: Any) -> ValueError:
            return ValueError(f"WorldConfig.{field} must be {expected}, got {actual!r}")

        if self.layout not in LAYOUTS:
            raise bad("layout", f"one of {LAYOUTS}", self.layout)
        for name in ("arena_size", "radius", "mass", "dt"):
            if not getattr(self, name) > 0:
                raise bad(name, "> 0", getattr(self, name))
        for name in ("max_force", "damping", "gravity", "goal_radius"):
            if not getattr(self, name) >= 0:
                raise bad(name, ">= 0", getattr(self, name))
        if not 0.0 <= self.restitution <= 1.0:
            raise bad("restitution", "in [0, 1]", self.restitution)
        if not (isinstance(self.substeps, int) and self.substeps >= 1):
            raise bad("substeps", "an int >= 1", self.substeps)
        if not (isinstance(self.max_episode_steps, int) and self.max_episode_steps >= 1):
            raise bad("max_episode_steps", "an int >= 1", self.max_episode_steps)
        if not (isinstance(self.image_size, int) and self.image_size >= 8):
            raise bad("image_size", "an int >= 8", self.image_size)
        if self.channels not in (1, 3):
            raise bad("channels", "1 or 3", self.channels)
        if not 2 * self.radius < self.arena_size:
            raise bad("radius", f"< arena_size / 2 = {self.arena_size / 2}", self.radius)
        if self.layout == "two_rooms":
            self._check_two_rooms(bad)

    def _check_two_rooms(self, bad) -> None:
        half_room = self.arena_size / 2 - self.wall_thickness / 2
        if not (0 < self.wall_thickness and 2 * self.radius < half_room):
            raise bad("wall_thickness", f"in (0, {self.arena_size - 4 * self.radius}) so the mass fits in a room",
                      self.wall_thickness)
        if not 2 * self.radius < self.door_width <= self.arena_size:
            raise bad("door_width", f"in (2 * radius, arena_size] = ({2 * self.radius}, {self.arena_size}] "
                      "(wider than the mass, not wider than the wall)", self.door_width)
        lo, hi = self.door_width / 2, self.arena_size - self.door_width / 2
        if not lo <= self.door_center <= hi:
            raise bad("door_center", f"in [{lo}, {hi}] so the door lies inside the wall", self.door_center)

    # ---- presets and serialisation
    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        """"open", "two_rooms", "gravity"."""
        return PRESETS



PRESETS: dict[str, dict[str, Any]] = {
    "open": {},
    "two_rooms": {"layout": "two_rooms"},
    "gravity": {"gravity": 0.6, "restitution": 0.9},
}
