"""Latent-space planners sharing one interface: ``planner.plan(cost_fn, num_envs, device) -> Plan``."""
from .base import CostFn, Plan, Planner, PlannerConfig
from .gradient import GradientPlanner
from .sampling import CEMPlanner, MPPIPlanner

PLANNERS = {"cem": CEMPlanner, "mppi": MPPIPlanner, "gradient": GradientPlanner}

__all__ = ["CEMPlanner", "CostFn", "GradientPlanner", "MPPIPlanner", "PLANNERS", "Plan", "Planner", "PlannerConfig"]

from .mpc import MPC, MPCConfig, MPCResult, latent_cost  # noqa: E402  (mpc looks planners up in PLANNERS)

__all__ += ["MPC", "MPCConfig", "MPCResult", "latent_cost"]
