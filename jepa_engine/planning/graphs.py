"""A whole CEM / MPPI plan (every iteration) captured once in a CUDA graph and replayed per call.

``GraphedPlanner(planner, cost_fn, num_envs, device)`` wraps a sampling planner (``CEMPlanner`` /
``MPPIPlanner``) and one cost function. On CUDA, the first call:

1. allocates static buffers: the starting ``mean`` / ``std [E, H*A]``, the action bounds and the
   Philox state ``rng = [seed, offset]``;
2. warms up on a side stream (compiles the Triton kernels, fills the allocator's pools);
3. captures ``planner.iterate`` (all ``iterations`` rounds of sample -> cost -> elite refit, which
   never reads a tensor back to the host and keeps every shape fixed) in one ``torch.cuda.CUDAGraph``.

Every call then copies its inputs into the static buffers (the warm-start mean, the rng offset),
replays the graph (one launch for the whole plan) and returns copies of the outputs. On any other
device it runs the plain planner: the same ops, the same random stream, identical results.

The cost function is captured together with the tensors it reads: to plan from a new state, update
those tensors in place (``z_hist.copy_(...)``, ``z_goal.copy_(...)``) and call again; rebinding them
(building a new closure) is not seen by the graph. Build a new ``GraphedPlanner`` for a new
``num_envs`` or planner config (the shapes are baked into the graph).
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import CostFn, Plan
from .sampling import _SamplingPlanner


class GraphedPlanner:
    """``GraphedPlanner(planner, cost_fn, num_envs, device).plan(warm_start=None, offset=0) -> Plan``."""

    def __init__(self, planner: _SamplingPlanner, cost_fn: CostFn, num_envs: int = 1, device="cuda",
                 warmup: int = 2):
        if not isinstance(planner, _SamplingPlanner):
            raise TypeError(f"GraphedPlanner: planner must be a CEMPlanner or MPPIPlanner, "
                            f"got {type(planner).__name__}")
        if not (isinstance(num_envs, int) and num_envs >= 1):
            raise ValueError(f"GraphedPlanner: num_envs must be an int >= 1, got {num_envs!r}")
        self.planner, self.cost_fn, self.num_envs = planner, cost_fn, num_envs
        self.device = torch.device(device)
        self.config = planner.config
        self.warmup = warmup
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.uses_graph = self.device.type == "cuda"

    # ---------------------------------------------------------------------------------------------
    def _allocate(self) -> None:
        c, E = self.config, self.num_envs
        P = c.horizon * c.action_dim
        dev = self.device
        self.mean_in = torch.zeros(E, P, device=dev)
        self.std_in = torch.full((E, P), c.init_std, device=dev)
        self.rng_in = torch.tensor([c.seed, 0], dtype=torch.int64, device=dev)
        self.low, self.high = self.planner.bounds(dev)

    def _body(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The loop advances its rng in place: work on a copy so a replay starts from rng_in.
        rng = self.rng_in.clone()
        return self.planner.iterate(self.cost_fn, self.mean_in.clone(), self.std_in.clone(), self.low,
                                    self.high, rng)

    def capture(self) -> None:
        """Allocate, warm up on a side stream and capture the whole plan (CUDA only; done by the first plan)."""
        if not self.uses_graph:
            raise RuntimeError(f"GraphedPlanner.capture: CUDA graphs need a CUDA device, got {self.device}")
        self._allocate()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(self.warmup):
                self._body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.mean_out, self.std_out, self.best_out = self._body()

    # ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def plan(self, warm_start: Optional[Plan] = None, offset: int = 0) -> Plan:
        """One plan from ``warm_start`` (or the config's initial distribution); ``offset`` starts the
        Philox stream further along (the plain planner always starts at 0)."""
        c, E = self.config, self.num_envs
        H, A = c.horizon, c.action_dim
        mean, std = self.planner.initial(E, self.device, warm_start)
        if not self.uses_graph:
            low, high = self.planner.bounds(self.device)
            rng = torch.tensor([c.seed, offset], dtype=torch.int64, device=self.device)
            mean, std, best = self.planner.iterate(self.cost_fn, mean, std, low, high, rng)
            return Plan(actions=mean.clamp(c.low, c.high).view(E, H, A), cost=best, mean=mean, std=std)
        if self.graph is None:
            self.capture()
        self.mean_in.copy_(mean)
        self.std_in.copy_(std)
        self.rng_in[1].fill_(offset)
        self.graph.replay()
        mean, std, best = self.mean_out.clone(), self.std_out.clone(), self.best_out.clone()
        return Plan(actions=mean.clamp(c.low, c.high).view(E, H, A), cost=best, mean=mean, std=std)
