"""A trained world model's decision step as an AOTInductor package: plan in a process with no Python.

:class:`DecisionStep` is one receding-horizon decision of :class:`jepa_engine.evaluation.mpc.MPC` as an
``nn.Module`` of fixed shapes::

    frames [E, T, C, S, S]   the last T observed frames (T = the model's history, or ``history``)
    past   [E, T-1, A]       the actions taken between them
    goal   [E, C, S, S]      the goal frame
    prev   [E, H*A]          the previous decision's mean (zeros: a cold start)
    -> action [E, A], plan [E, H, A], cost [E], mean [E, H*A]

It encodes the frames and the goal, then runs the planner's ``I`` iterations (CEM or MPPI) as one
``torch.while_loop`` body (the compile time of one iteration, whatever ``I``):
``jepa_engine::sample_actions`` draws the candidates (the planner's Philox stream for the same seed),
the fused rollout scores them (the reference ops: plain aten, which AOTInductor compiles), and
``jepa_engine::elite_refit`` refits the Gaussian. The two planning ops stay in the graph as calls of
the native library's C++ kernels (csrc/), so a C++ program that loads ``jepa_engine/_C.so`` runs them.
``prev`` is shifted by one step as :meth:`Planner.initial` shifts a warm start, so a cold start is
zeros and a warm start is the last decision's ``mean``.

:func:`export_decision` exports it with ``torch.export`` and compiles it with AOTInductor for the CPU
or CUDA, by default once per history length 1..T into one package (models ``model`` for T frames and
``history1`` ... for fewer): the Python MPC plans an episode's first decisions from the frames it has,
and so does the C++ planner. ``cpp/jepa_plan.cpp`` (and the one-header API
``cpp/include/jepa_engine/planner.h``) loads the package with ``torch::inductor::AOTIModelPackageLoader``.
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from torch._higher_order_ops.while_loop import while_loop
from torch._inductor.package import package_aoti

from jepa_engine.kernels import _launch, _native, use_backend
from jepa_engine.kernels.masked_attention import masked_attention_reference
from jepa_engine.models.world_model import WorldModel
from jepa_engine.planning import PlannerConfig
from jepa_engine.planning.latent_cost import COSTS, REDUCTIONS
from jepa_engine.planning.rollout import FusedRollout

__all__ = ["DecisionStep", "ExportError", "ExportReport", "decision_inputs", "export_decision", "model_name",
           "HISTORIES", "MODES"]

MODES = ("cem", "mppi")


class ExportError(ValueError):
    """A bad argument of the export (names the argument, what was expected and what was given)."""


class _ExportRollout(FusedRollout):
    """The fused rollout whose observed tokens and shared prefixes, computed at the first call, are
    reused as they are by every later call (one history per decision): the loop body reads them and
    writes no state (a traced loop body may not)."""

    _fixed = None

    def __init__(self, model: WorldModel):
        # fp32 models plan in IEEE fp32, as the compiled package computes by default (not the CUDA default
        # TF32), so that the eager decision step and the package agree.
        super().__init__(model, precision="fp32" if next(model.parameters()).dtype == torch.float32 else None)
        for b in self.blocks:        # no two inputs of a loop body may share memory: copy the slices
            b.w_q, b.b_q, b.w_kv, b.b_kv = (t.clone() for t in (b.w_q, b.b_q, b.w_kv, b.b_kv))

    def _observed(self, lin, z_hist, past_actions):
        if self._fixed is None:
            self._fixed = super()._observed(lin, z_hist, past_actions)
        return self._fixed


class DecisionStep(nn.Module):
    """``DecisionStep(model, config, mode="cem", num_envs=1, cost="l2", reduce="final", loop=True,
    history=None)``: see the module docstring. ``loop=False`` runs the iterations as a Python loop (the
    same ops; eager use and tests, no tracing). ``history``: the frames it plans from, 1 to the model's
    history T (default T), as the MPC at an episode's first steps."""

    def __init__(self, model: WorldModel, config: PlannerConfig, mode: str = "cem", num_envs: int = 1,
                 cost: str = "l2", reduce: str = "final", loop: bool = True, history: Optional[int] = None):
        super().__init__()
        T = model.cfg.history
        history = T if history is None else history
        if not (isinstance(history, int) and not isinstance(history, bool) and 1 <= history <= T):
            raise ExportError(f"DecisionStep: history must be an int in [1, {T}] (the model's history), got "
                              f"{history!r}")
        self.history = history
        if mode not in MODES:
            raise ExportError(f"DecisionStep: mode must be one of {MODES}, got {mode!r}")
        if cost not in COSTS:
            raise ExportError(f"DecisionStep: cost must be one of {COSTS}, got {cost!r}")
        if reduce not in REDUCTIONS:
            raise ExportError(f"DecisionStep: reduce must be one of {REDUCTIONS}, got {reduce!r}")
        if config.action_dim != model.cfg.action_dim:
            raise ExportError(f"DecisionStep: config.action_dim must be the model's {model.cfg.action_dim}, "
                              f"got {config.action_dim}")
        if not (isinstance(num_envs, int) and num_envs >= 1):
            raise ExportError(f"DecisionStep: num_envs must be an int >= 1, got {num_envs!r}")
        self.model, self.config, self.mode, self.num_envs = model.eval(), config, mode, num_envs
        self.cost, self.reduce = cost, reduce
        c = config
        E, P = num_envs, c.horizon * c.action_dim
        step = E * c.samples * P
        # rng = [seed, offset]; each iteration advances the offset by E*N*P, as the planner does.
        self.register_buffer("rng0", torch.tensor([c.seed, 0], dtype=torch.int64), persistent=False)
        self.register_buffer("advance", torch.tensor([0, step], dtype=torch.int64), persistent=False)
        self.end = c.iterations * step
        self.loop = loop
        self.register_buffer("low", torch.full((c.action_dim,), c.low), persistent=False)
        self.register_buffer("high", torch.full((c.action_dim,), c.high), persistent=False)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return decision_inputs(self.model, self.config, self.num_envs, history=self.history)

    def forward(self, frames: torch.Tensor, past: torch.Tensor, goal: torch.Tensor, prev: torch.Tensor):
        c, m = self.config, self.model
        E, H, A, N = self.num_envs, c.horizon, c.action_dim, c.samples
        with torch.no_grad():
            z_hist = m.encode_frames(frames)                       # [E, T, D]
            z_goal = m.encode(goal)                                # [E, D]
            # Planner.initial with a warm start: drop the executed first action, repeat the last one.
            mean = torch.cat([prev[:, A:], prev[:, -A:]], dim=1)
            std = torch.full_like(mean, c.init_std)
            best = mean.new_zeros(E)

            rollout = _ExportRollout(m)

            def body(rng, mean, std, best):
                samples = torch.ops.jepa_engine.sample_actions.default(mean, std, self.low, self.high, rng, N, True)
                costs = rollout.cost(z_hist, past, samples.view(E, N, H, A), z_goal, self.cost, self.reduce)
                mean, std, best, _ = torch.ops.jepa_engine.elite_refit.default(
                    costs.float(), samples, mean, std, self.mode, c.elites, float(c.temperature), float(c.momentum),
                    float(c.min_std))
                return rng + self.advance, mean, std, best

            if self.loop:
                # A call whose costs are never read fills the rollout's observed tokens, shared prefixes
                # and masks (what the loop body reads; it may not write them); the export drops its rest.
                rollout.cost(z_hist, past, mean.new_zeros(E, N, H, A), z_goal, self.cost, self.reduce)
                _, mean, std, best = while_loop(lambda rng, *_: rng[1] < self.end, body,
                                                (self.rng0.clone(), mean, std, best))
            else:
                rng = self.rng0
                for _ in range(c.iterations):
                    rng, mean, std, best = body(rng, mean, std, best)
            plan = torch.minimum(torch.maximum(mean.view(E, H, A), self.low), self.high)
        return plan[:, 0], plan, best, mean


def decision_inputs(model: WorldModel, config: PlannerConfig, num_envs: int = 1,
                    generator: Optional[torch.Generator] = None, history: Optional[int] = None
                    ) -> tuple[torch.Tensor, ...]:
    """Random inputs of the decision step's shapes: ``(frames, past, goal, prev)`` (prev = zeros), from
    ``history`` frames (default the model's history)."""
    mc, E = model.cfg, num_envs
    T, C, S, A = history or mc.history, mc.in_chans, mc.img_size, mc.action_dim
    frames = torch.rand(E, T, C, S, S, generator=generator)
    past = torch.rand(E, T - 1, A, generator=generator) * 2 - 1
    goal = torch.rand(E, C, S, S, generator=generator)
    prev = torch.zeros(E, config.horizon * A)
    return frames, past, goal, prev


def _attention_reference(q, k, v, key_padding, cu_seqlens, keep_index, frame_len, scale, max_seqlen):
    """``jepa_engine::masked_attention`` as the aten ops of the reference the eager model runs on the CPU,
    where the native library does not define it; its second output (the log-sum-exp the backward reads)
    is never read here."""
    out = masked_attention_reference(q, k, v, key_padding=key_padding, cu_seqlens=cu_seqlens,
                                     frame_size=frame_len or None, keep_index=keep_index, scale=scale)
    if cu_seqlens is not None:
        return out.contiguous(), q.new_zeros((q.shape[1], q.shape[0]), dtype=torch.float32)
    # the op's layout: [B, H, N, D] on [B, N, H, D] memory (what the traced graph's views were made on)
    return out.transpose(1, 2).contiguous().transpose(1, 2), q.new_zeros(tuple(q.shape[:3]), dtype=torch.float32)


def _sample_actions_triton(mean, std, low, high, rng, n, include_mean=True):
    """``jepa_engine::sample_actions`` on CUDA as its Triton op (compiled into the package)."""
    return torch.ops.jepa_engine.sample_actions_triton.default(mean, std, low, high, rng, n, include_mean)


def _elite_refit_triton(costs, samples, mean, std, mode="cem", k=1, temperature=1.0, momentum=0.0, min_std=0.0):
    """``jepa_engine::elite_refit`` on CUDA as its Triton op (compiled into the package)."""
    return torch.ops.jepa_engine.elite_refit_triton.default(costs, samples, mean, std, mode, int(k),
                                                            float(temperature), float(momentum), float(min_std))


# Ops a traced model keeps that the loaded native library may not define (a library built from part of
# csrc/): decomposed into their reference's aten ops, which AOTInductor compiles.
_PYTHON_ONLY = {"masked_attention": _attention_reference}
# On CUDA every op's kernel is Python (Triton, registered from Python), which a C++ process cannot call:
# the planning ops become their ``triton_op`` twins, which AOTInductor compiles into the package as the
# Triton kernels themselves, and the attention its reference's aten ops (AOTInductor's own CUDA kernels).
TRITON_OPS = ("sample_actions_triton", "elite_refit_triton")
_CUDA_DECOMPOSITIONS = {"sample_actions": _sample_actions_triton, "elite_refit": _elite_refit_triton,
                        "masked_attention": _attention_reference}


def decompositions(device: torch.device) -> dict:
    """``{op: decomposition}`` for a decision step exported for ``device``: on the CPU the ops the native
    library does not define, on CUDA every ``jepa_engine`` op in the graph."""
    if device.type == "cuda":
        chosen = _CUDA_DECOMPOSITIONS
    else:
        chosen = {k: v for k, v in _PYTHON_ONLY.items() if k not in _native.native_ops()}
    return {getattr(torch.ops.jepa_engine, name).default: fn for name, fn in chosen.items()}


def export_program(step: DecisionStep, example: tuple[torch.Tensor, ...],
                   target: Optional[torch.device] = None) -> torch.export.ExportedProgram:
    """``torch.export`` of the decision step with the reference backend. The graph holds aten ops and ops of
    the native library only: the encoder's masked attention stays the native op when the library defines
    it (its C++ kernel runs in the package), else it is decomposed into its reference's aten ops. On CUDA
    (``target``, default the inputs' device) the graph holds no ``jepa_engine`` op: see :func:`decompositions`."""
    with use_backend("reference"), torch.no_grad():
        ep = torch.export.export(step, example, strict=False)
        table = torch.export.default_decompositions()
        # SDPA stays one op (AOTInductor runs ATen's CPU kernel): its decomposition has other output
        # strides than the traced graph's views were made on.
        table.pop(torch.ops.aten.scaled_dot_product_attention.default, None)
        device = torch.device(target) if target is not None else example[0].device
        table.update(decompositions(device))
        ep = ep.run_decompositions(table)
    allowed = _native.native_ops() if device.type == "cpu" else frozenset(TRITON_OPS)
    python_only = sorted({str(n.target) for n in graph_nodes(ep) if n.op == "call_function"
                          and str(n.target).startswith("jepa_engine.") and str(n.target).split(".")[1] not in allowed})
    if python_only:
        raise ExportError(f"export: the graph still calls ops with no C++ kernel on {device}: {python_only}")
    return ep


def graph_nodes(ep: torch.export.ExportedProgram):
    """Every node of the program, those of its loop body and condition (submodules) included."""
    for module in ep.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            yield from module.graph.nodes


def package_metadata(step: DecisionStep, device: torch.device = torch.device("cpu"),
                     histories: Optional[list[int]] = None) -> dict[str, str]:
    """What the C++ planner reads from the package (strings): the shape of each input
    (``jepa_engine.input.<name>``: comma-separated sizes, in call order), the output names, the planning
    budget, the frames this model plans from (``jepa_engine.history``) and the history lengths the
    package holds a model for (``jepa_engine.histories``; default: this one)."""
    mc, c, E, T = step.model.cfg, step.config, step.num_envs, step.history
    shapes = {"frames": [E, T, mc.in_chans, mc.img_size, mc.img_size],
              "past": [E, T - 1, mc.action_dim],
              "goal": [E, mc.in_chans, mc.img_size, mc.img_size], "prev": [E, c.horizon * mc.action_dim]}
    meta = {f"jepa_engine.input.{k}": ",".join(map(str, v)) for k, v in shapes.items()}
    meta.update({"jepa_engine.inputs": ",".join(shapes), "jepa_engine.outputs": "action,plan,cost,mean",
                 "jepa_engine.planner": step.mode, "jepa_engine.cost": step.cost, "jepa_engine.reduce": step.reduce,
                 "jepa_engine.config": json.dumps(c.to_dict(), sort_keys=True), "jepa_engine.device": device.type,
                 "jepa_engine.history": str(T),
                 "jepa_engine.histories": ",".join(map(str, histories or [T]))})
    return meta


HISTORIES = ("all", "full")


def model_name(history: int, full: int) -> str:
    """The name of the package's model that plans from ``history`` of the ``full`` history's frames:
    ``model`` (what a loader opens by default) for the full history, ``history<h>`` for fewer."""
    return "model" if history == full else f"history{history}"


def _aoti_files(ep: torch.export.ExportedProgram, configs: dict) -> list:
    """AOTInductor's compiled files of one program, to be packaged with others (what
    ``torch._inductor.aoti_compile_and_package`` does for one)."""
    try:
        gm = ep.module(check_guards=False)
    except TypeError:            # torch < 2.12: no guard nodes to leave out
        gm = ep.module()
    args, kwargs = ep.example_inputs
    return torch._inductor.aot_compile(gm, args, kwargs, options={**configs, "aot_inductor.package": True})


@dataclass
class ExportReport:
    path: Path
    export_s: float
    compile_s: float
    meta: dict


def export_decision(model: WorldModel, config: PlannerConfig, out: Union[str, os.PathLike], mode: str = "cem",
                    num_envs: int = 1, cost: str = "l2", reduce: str = "final",
                    device: Union[str, torch.device] = "cpu", histories: str = "all") -> ExportReport:
    """Export :class:`DecisionStep` and compile it with AOTInductor for ``device`` (the CPU, or a CUDA
    device, where the planning ops' Triton kernels are compiled into the package) into ``out`` (a
    ``.pt2`` file, written atomically). ``histories="all"`` (default) compiles one model per history
    length 1..T (:func:`model_name`), so an episode's first decisions plan from the frames there are, as
    the Python MPC does; ``"full"`` only the T-frame one (1/T of the compile time). The package's
    metadata (:func:`package_metadata`) gives the shapes of the inputs, the history lengths and the
    device, which the C++ planner (cpp/include/jepa_engine/planner.h) reads.

    A CPU package calls the native library's C++ kernels, so it needs ``jepa_engine/_C.so``; a CUDA package
    calls no ``jepa_engine`` op (the Triton kernels are compiled into it), so it does not."""
    out = Path(out)
    if out.suffix != ".pt2":
        raise ExportError(f"export: out must be a .pt2 file name, got {str(out)!r}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ExportError(f"export: device must be cpu or cuda, got {str(device)!r}")
    if device.type == "cpu" and not _native.available():
        raise ExportError(f"export: a CPU package calls the planning ops' C++ kernels, which need the native "
                          f"library jepa_engine/_C.so; {_native.status()}")
    if device.type == "cuda" and not _launch.triton_available():
        raise ExportError("export: device cuda asked, but triton is not installed: a CUDA package compiles the "
                          "Triton kernels into it")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExportError("export: device cuda asked, but no CUDA device is available here")
    if histories not in HISTORIES:
        raise ExportError(f"export: histories must be one of {HISTORIES}, got {histories!r}")
    if any(p.device != device for p in model.parameters()):
        model = copy.deepcopy(model).to(device)    # the caller's model stays where it is
    T = model.cfg.history
    lengths = list(range(1, T + 1)) if histories == "all" else [T]
    programs, export_s = {}, 0.0
    for h in lengths:
        step = DecisionStep(model, config, mode, num_envs, cost, reduce, history=h).to(device)
        example = tuple(t.to(device) for t in step.example_inputs())
        t0 = time.perf_counter()
        programs[h] = (export_program(step, example), package_metadata(step, device, lengths))
        export_s += time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.pt2")
    t1 = time.perf_counter()
    try:
        files = {model_name(h, T): _aoti_files(ep, {"aot_inductor.metadata": meta})
                 for h, (ep, meta) in programs.items()}
        package_aoti(str(tmp), files)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(out, export_s, time.perf_counter() - t1, programs[T][1])
