"""Latent-space planners sharing one interface (``planner.plan(cost_fn, num_envs, device) -> Plan``),
the registry that names them, and the world model's latent cost they minimise."""
from .base import CostFn, Plan, Planner, PlannerConfig
from .gradient import GradientPlanner
from .latent_cost import latent_cost
from .registry import PLANNERS
from .sampling import CEMPlanner, MPPIPlanner

__all__ = ["CEMPlanner", "CostFn", "GradientPlanner", "MPPIPlanner", "PLANNERS", "Plan", "Planner", "PlannerConfig",
           "latent_cost"]
