"""The planners by name: ``PLANNERS["cem" | "mppi" | "gradient"]`` is the planner class (MPC, the
command line and the comparison pick planners here)."""
from __future__ import annotations

from .base import Planner
from .gradient import GradientPlanner
from .sampling import CEMPlanner, MPPIPlanner

PLANNERS: dict[str, type[Planner]] = {"cem": CEMPlanner, "mppi": MPPIPlanner, "gradient": GradientPlanner}
