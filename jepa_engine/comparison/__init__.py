"""The planner-vs-decoding comparison (`jepa-engine profile`): one decision made two ways, its cost and its
success, as JSON, markdown and a plot.

The decision: from the current frame of the built-in open world to a goal, an H-step action plan.

    planner rows   the JEPA world model planning in latent space (CEM / MPPI at several budgets
                   N x I; eager = model.rollout stepped per candidate on reference ops, fused =
                   FusedRollout with the default dispatch, Triton on CUDA)
    decoder rows   a decoder-only transformer writing the plan token by token with a KV cache
                   (eager dynamic cache; static cache with the decode step compiled)
    cost sweeps    untrained decoders: L reasoning tokens before the plan, and decoder size
                   (matched, ~10x, ~100x the world model's parameters); timing and energy only

Success comes from receding-horizon episodes on a fixed set of seeded (start, goal) pairs, all
planned at once; latency from single decisions (one environment), timed call by call after a
warm-up. Energy comes from `profiling.measure` (NVML on a GPU, RAPL on the CPU) over windows of at
least `energy_seconds`; where no meter is readable the row says why, nothing is estimated.

FLOPs are counted, not measured (multiply-adds x 2, biases and norms ignored):

    planner  = N x I x sum_k predictor(window of `history` frames)  +  encoder(current frame)   (eager)
             = I x FusedRollout.flops(N, H)                          +  encoder(current frame)   (fused)
    decoder  = prefill(P + 1 tokens) + (L + H*A - 1) one-token steps, each 2 x matmul params + attention

Modules: config (ProfileConfig, planner budgets, option checks), flops (the counts above), models (the
world model and the matched decoder: loaded, trained or untrained), rows (timed and metered rows, cost
sweeps, ratios), render (markdown, plot, terminal lines), run (`run_profile`, the command's body).
"""
from .config import PlannerBudget, ProfileConfig
from .run import run_profile
from .render import summary_lines

__all__ = ["PlannerBudget", "ProfileConfig", "run_profile", "summary_lines"]
