"""``jepa-engine ledger``: the launch/tile-work ledger of each benchmark group.

A group is the kernel launches of one benchmark file's problems on a GPU (shapes from
:mod:`jepa_engine.profiling.bench_shapes`), one case per problem. For each case and kernel the ledger
lists the launches, the useful and the launched FLOPs (:mod:`jepa_engine.kernels.ledger`, from the
launchers' own tables and grids), their ratio, the minimum HBM bytes, whether the FLOPs run on tensor
cores, and the H100 roofline time they imply (the larger of launched FLOPs at the precision's peak and
bytes at HBM bandwidth, per launch; :data:`jepa_engine.profiling.hardware.H100_SXM`). The goal: no
kernel launches more than :data:`MAX_RATIO` times its useful work at a benchmark shape; the exceptions
that no launch-table change can remove are declared in :data:`OVER_BUDGET` with the reason.

The planning group's fused-rollout launches come from :data:`ROLLOUT_CALLS`, a declarative list of the
rollout's kernel calls on its Triton path (``FusedRollout._steps``); a rollout module that defines its own
``KERNEL_CALLS`` (the same :class:`~jepa_engine.kernels.ledger.Call` format and scopes) replaces it.
tests/test_ledger.py records a run's calls and compares them with the list.
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from jepa_engine.kernels import ledger as kl
from jepa_engine.profiling import bench_shapes as shapes
from jepa_engine.profiling.hardware import H100_SXM, Roofline

MAX_RATIO = 2.0
GROUPS = ("planning", "cem", "masked_attention", "encoders", "ema", "latent_loss", "train")
GROUP_SOURCES = {"planning": "bench_plan.py", "cem": "bench_planning.py",
                 "masked_attention": "bench_masked_attention.py", "encoders": "JEPA encoder attention (no bench file)",
                 "ema": "bench_ema.py", "latent_loss": "bench_latent_loss.py", "train": "bench_train.py"}
SDPA = "torch SDPA"   # the rollout's attention: a torch op, not a kernel of this package

# (group, case pattern, kernel pattern) -> why those rows stay above MAX_RATIO with the launch tables as
# they are (fnmatch patterns over the case and kernel names). tests/test_ledger.py checks that every
# other row is within budget and that each entry still matches a row over it (a fix removes the entry).
_FWD_BWD = "masked_attention_[fb]wd"
OVER_BUDGET: dict[tuple[str, str, str], str] = {
    ("masked_attention", "context * key_padding *", _FWD_BWD):
        "key padding visits every key position, visible or not (1/frac of the useful pairs), on top of the "
        "197-token tile padding; the same problem as an index set (keep_index) visits only the kept keys",
    ("masked_attention", "context * frac=0.25 index *", _FWD_BWD):
        "the index set is as wide as the largest sample's (counts spread +-0.1 about 0.25 N: the widest is "
        "1.4x the mean), padded to whole key blocks, and 197 queries pad to 224-256 rows; per-sample loop "
        "bounds (a kernel change) would remove the first factor",
    ("masked_attention", "context * frac=0.5 index fwd+bwd", "masked_attention_bwd"):
        "the two-pass backward computes S and dP in both passes (7 products per (query block, key block) "
        "pair against the 5 a FlashAttention-2 backward needs, 1.4x) times the index set's width (1.2x the "
        "mean count) and the 197-token padding",
    ("encoders", "vit_h14 *", "masked_attention_bwd"):
        "head dim 80 runs in the 128-wide tile (1.6x) and the two-pass backward recomputes S and dP (1.4x); "
        "neither is a launch-table choice",
    ("train", "* context encoder, key padding *", _FWD_BWD):
        "the collator pads the context to the batch's largest (about half the slots valid) and 46 slots run "
        "in the forward's 128-row query tiles; varlen packing (cu_seqlens) of the valid tokens would remove both",
    ("train", "* predictor, key padding *", _FWD_BWD):
        "context and target slots padded to the batch's largest (about 2/3 valid) in 128-row forward tiles and "
        "the two-pass backward (1.4x); varlen packing (cu_seqlens) of the valid tokens would remove the padding",
}


@dataclass
class Case:
    """One benchmark problem of a group and the kernel launches it makes."""

    group: str
    name: str
    launches: list[kl.Launch]
    notes: list[str] = field(default_factory=list)


@dataclass
class Row:
    """One kernel of one case, its launches summed."""

    group: str
    case: str
    kernel: str
    launches: int
    useful_flops: Optional[float]
    launched_flops: Optional[float]
    bytes: Optional[float]
    precision: Optional[str]
    roofline_s: Optional[float]
    worst_label: str = ""
    worst_ratio: Optional[float] = None

    @property
    def ratio(self) -> Optional[float]:
        if self.useful_flops is None:
            return None
        return kl.Work(self.useful_flops, self.launched_flops, 0.0, "fp32").ratio

    @property
    def tensor_cores(self) -> Optional[bool]:
        return None if self.precision is None else self.precision in ("16bit", "tf32")

    @property
    def counted(self) -> bool:
        """Whether the ledger accounts for this kernel (torch ops are listed by count only)."""
        return self.useful_flops is not None

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "tensor_cores": self.tensor_cores}


# --------------------------------------------------------------------------------------------------
# The fused rollout's calls (jepa_engine/planning/rollout.py, FusedRollout._steps on the Triton path), declared
# --------------------------------------------------------------------------------------------------
# Symbols: E environments, N candidates, EN = E*N, H horizon, C predictor width, D embedding, A action
# dim, F MLP hidden width, HEADS and HD (head dim), DEPTH blocks, DEPTH1 = DEPTH - 1; per scope: OBS /
# OBS1 observed frames (minus one), L = 2 * own frames (candidate tokens), P = 2 * shared frames (prefix
# tokens), S = P + L keys. Scopes: "history" (the observed frames' tokens; skipped while the history is
# cached), "history_actions" (observed > 1), "candidates" (once per call), "prefix" (each new shared
# prefix, batch E, through torch attention), "step" (each horizon step), "predict" (each step before the
# last: the output projection composed with the next step's embedding), "final" (the goal cost).
_LN = dict(normalize=True)
ROLLOUT_CALLS: tuple[kl.Call, ...] = (
    kl.Call("history", "fused_linear", dict(M="E*OBS", K="D", N="C"), "embed observed"),
    kl.Call("history_actions", "fused_linear", dict(M="E*OBS1", K="A", N="C", gelu=True), "action fc1 observed"),
    kl.Call("history_actions", "fused_linear", dict(M="E*OBS1", K="C", N="C"), "action fc2 observed"),
    kl.Call("candidates", "fused_linear", dict(M="EN*H", K="A", N="C", gelu=True), "action fc1"),
    kl.Call("candidates", "fused_linear", dict(M="EN*H", K="C", N="C"), "action fc2"),
    kl.Call("prefix", "fused_linear", dict(M="E*P", K="C", N="3*C", **_LN), "prefix qkv", "DEPTH1"),
    kl.Call("prefix", SDPA, dict(B="E", H="HEADS", L="P", S="P"), "prefix attention", "DEPTH1"),
    kl.Call("prefix", "fused_linear", dict(M="E*P", K="C", N="C", residual=True), "prefix proj", "DEPTH1"),
    kl.Call("prefix", "fused_linear", dict(M="E*P", K="C", N="F", gelu=True, **_LN), "prefix fc1", "DEPTH1"),
    kl.Call("prefix", "fused_linear", dict(M="E*P", K="F", N="C", residual=True), "prefix fc2", "DEPTH1"),
    kl.Call("prefix", "fused_linear", dict(M="E*P", K="C", N="2*C", **_LN), "prefix last kv"),
    kl.Call("step", "fused_linear", dict(M="EN*L", K="C", N="3*C", **_LN), "qkv", "DEPTH"),
    kl.Call("step", "window_attention", dict(B="EN", L="L", P="P", E="E", H="HEADS", HD="HD"), "attention", "DEPTH1"),
    kl.Call("step", "fused_linear", dict(M="EN*L", K="C", N="C", residual=True), "proj", "DEPTH1"),
    kl.Call("step", "fused_mlp", dict(M="EN*L", C="C", F="F"), "mlp", "DEPTH1"),
    kl.Call("step", "window_attention", dict(B="EN", L="L", P="P", E="E", H="HEADS", HD="HD", last_only=True),
            "last attention"),
    kl.Call("step", "fused_linear", dict(M="EN", K="C", N="C", residual=True), "last proj"),
    kl.Call("step", "fused_mlp", dict(M="EN", C="C", F="F"), "last mlp"),
    kl.Call("predict", "fused_linear", dict(M="EN", K="C", N="C", **_LN), "output x next embedding"),
    kl.Call("final", "linear_goal_cost", dict(M="EN", K="C", D="D", G="E"), "output + goal cost"),
)


def _rollout_calls() -> tuple[kl.Call, ...]:
    from jepa_engine.planning import rollout

    return tuple(getattr(rollout, "KERNEL_CALLS", ROLLOUT_CALLS))


def rollout_launches(preset: str, E: int, N: int, H: int, observed: Optional[int] = None,
                     dtype: torch.dtype = torch.float32, allow_tf32: bool = True,
                     history_cached: bool = False) -> list[kl.Launch]:
    """The kernel launches of one ``FusedRollout.cost`` call of world-model ``preset`` (reduce="final") on
    the Triton path: E environments x N candidates, horizon H, ``observed`` history frames (default: a
    full window); ``dtype`` and ``allow_tf32`` as the rollout's precision sets them (default: "tf32",
    the CUDA default: fp32 storage, TF32 dots)."""
    from jepa_engine.models.world_model import WorldModelConfig
    from jepa_engine.planning.rollout import windows

    c = WorldModelConfig.from_name(preset)
    observed = c.history if observed is None else observed
    if not 1 <= observed <= c.history:
        raise ValueError(f"rollout_launches: observed must be in [1, {c.history}] (the {preset} window), "
                         f"got {observed}")
    base = dict(E=E, N=N, EN=E * N, H=H, C=c.pred_dim, D=c.embed_dim, A=c.action_dim,
                F=int(c.pred_dim * c.mlp_ratio), HEADS=c.pred_heads, HD=c.pred_dim // c.pred_heads,
                DEPTH=c.pred_depth, DEPTH1=c.pred_depth - 1, OBS=observed, OBS1=observed - 1)
    scopes: dict[str, list[dict]] = {"candidates": [base], "step": [], "predict": [], "prefix": [], "final": []}
    if not history_cached:
        scopes["history"] = [base]
        scopes["history_actions"] = [base] if observed > 1 else []
    seen = set()
    for k, start, s, t in windows(observed, H, c.history):
        sym = dict(base, L=2 * t, P=2 * s, S=2 * s + 2 * t)
        scopes["step"].append(sym)
        scopes["final" if k == H - 1 else "predict"].append(sym)
        if s and (start, s) not in seen:
            seen.add((start, s))
            if not history_cached:
                scopes["prefix"].append(sym)
    out = []
    for x in kl.expand(_rollout_calls(), scopes):
        if kl.has_entry(x.kernel):
            fields = kl.KERNEL_WORK[x.kernel].fields
            x = kl.Launch(x.kernel, {**x.shape, "dtype": dtype,
                                     **({"allow_tf32": allow_tf32} if "allow_tf32" in fields else {})}, x.count, x.label)
        out.append(x)
    return out


# --------------------------------------------------------------------------------------------------
# The groups
# --------------------------------------------------------------------------------------------------
def _planning_cases() -> list[Case]:
    from jepa_engine.models.world_model import WorldModelConfig

    b = shapes.PLAN_BUDGET
    A = WorldModelConfig.from_name(shapes.PLAN_PRESET).action_dim
    cases = []
    for E in shapes.PLAN_ENVS:
        launches = [kl.Launch("sample_actions", dict(E=E, N=b["N"], P=b["H"] * A), label="candidates")]
        launches += rollout_launches(shapes.PLAN_PRESET, E, b["N"], b["H"])
        launches.append(kl.Launch("elite_refit", dict(E=E, N=b["N"], P=b["H"] * A), label="CEM refit"))
        cases.append(Case("planning", f"{shapes.PLAN_PRESET} CEM iteration N={b['N']} H={b['H']} E={E} tf32", launches, [
            "one CEM iteration of the captured plan (GraphedPlanner): the history's tokens and shared prefixes "
            "are recomputed in every replay (no cache while capturing)",
            "the bench's fp32 model at the rollout's CUDA default precision, tf32: fp32 storage, TF32 dots",
            f"{SDPA}: the shared prefix's attention runs through torch, not a kernel of this package (count only)"]))
    return cases


def _cem_cases() -> list[Case]:
    b = shapes.CEM_BUDGET
    P = b["H"] * b["A"]
    return [Case("cem", f"CEM iteration N={b['N']} H={b['H']} A={b['A']} E={E}",
                 [kl.Launch("sample_actions", dict(E=E, N=b["N"], P=P)),
                  kl.Launch("elite_refit", dict(E=E, N=b["N"], P=P))],
                 [f"a plan is {b['I']} iterations; the analytic cost is torch ops"])
            for E in shapes.CEM_ENVS]


def _attention_cases() -> list[Case]:
    cases = []
    dt = torch.bfloat16
    for name, B, H, N, D in shapes.ATTENTION_CONTEXT:
        for frac in shapes.ATTENTION_FRACTIONS:
            counts = shapes.visible_counts(B, N, frac, torch.Generator().manual_seed(0)).tolist()
            forms = {"index": dict(mask="index", N_k=max(counts), k_counts=counts),
                     "key_padding": dict(mask="key_padding", N_k=N, k_counts=counts)}
            for form, mask in forms.items():
                for direction in ("fwd", "fwd+bwd"):
                    shape = dict(B=B, H=H, N_q=N, D=D, dtype=dt, **mask)
                    cases.append(Case("masked_attention", f"context {name} B={B} frac={frac} {form} {direction}",
                                      kl.attention_launches(direction, **shape)))
    B, H, T, P, X, D = shapes.ATTENTION_FRAME
    N = T * (P + X)
    cases.append(Case("masked_attention", f"frame-causal {T}x({P}+{X}) B={B} fwd",
                      kl.attention_launches("fwd", B=B, H=H, N_q=N, N_k=N, D=D, dtype=dt, frame_len=P + X)))
    for N, B in shapes.ATTENTION_LONG:
        H, D = shapes.ATTENTION_LONG_HEADS, shapes.ATTENTION_LONG_HEAD_DIM
        cases.append(Case("masked_attention", f"dense N={N} D={D} B={B} fwd",
                          kl.attention_launches("fwd", B=B, H=H, N_q=N, N_k=N, D=D, dtype=dt)))
    return cases


def _encoder_cases() -> list[Case]:
    return [Case("encoders", f"{name} N={N} D={D} B={B} fwd+bwd",
                 kl.attention_launches("fwd+bwd", B=B, H=H, N_q=N, N_k=N, D=D, dtype=torch.bfloat16),
                 ["training attention of a JEPA encoder: dense, bf16"])
            for name, B, H, N, D in shapes.ENCODER_ATTENTION]


def _ema_cases() -> list[Case]:
    cases = []
    for model, dims in shapes.VITS.items():
        numels = [math.prod(s) for s in shapes.vit_param_shapes(*dims)]
        for dt in shapes.EMA_DTYPES:
            cases.append(Case("ema", f"{model} {dt}", [kl.Launch("ema", dict(numels=numels, dtype=dt))],
                              ["the bench's jepa_engine_kernel row (a device momentum); with a float momentum "
                               "on CUDA the op takes torch._foreach_lerp_"]))
    return cases


DISPATCH_NOTE = ("the rows are the kernels' launches, as use_backend('triton') runs them; the op's CUDA dispatch "
                 "(kernels/_launch.py backend_for) may give such a call to torch ops instead")


def _latent_loss_cases() -> list[Case]:
    return [Case("latent_loss", f"M={M} D={D} bf16 fwd+bwd",
                 [kl.Launch("latent_loss_fwd", dict(M=M, D=D, dtype="bf16")),
                  kl.Launch("latent_loss_bwd", dict(M=M, D=D, dtype="bf16"))], [DISPATCH_NOTE])
            for M, D in shapes.LATENT_LOSS_SHAPES]


def _train_cases() -> list[Case]:
    from jepa_engine.masks import MultiBlockMaskCollator
    from jepa_engine.models import VisionTransformer
    from jepa_engine.training.configs import TrainConfig
    from jepa_engine.training.ijepa import derived_seed

    cases = []
    for name, overrides in shapes.TRAIN_CONFIGS.items():
        cfg = TrainConfig.from_name(name, device="cpu", **overrides)
        _, enc, pred, mask_cfg = cfg.nested_configs()
        B, N = cfg.batch_size, enc.num_patches
        # The bench's masks: step 0 of the run's mask stream (ijepa.make_masks).
        masks = MultiBlockMaskCollator(mask_cfg).sample(B, torch.Generator().manual_seed(derived_seed(cfg.seed, 0, 1)))
        ctx, tgt = masks.context_valid.sum(1), masks.target_valid.sum(1)
        Kc, Kt = masks.context_index.shape[1], masks.target_index.shape[1]
        both = (ctx + tgt).tolist()
        enc_shape = dict(B=B, H=enc.num_heads, D=enc.embed_dim // enc.num_heads, dtype=torch.bfloat16)
        pred_shape = dict(B=B, H=pred.num_heads, D=pred.predictor_dim // pred.num_heads, dtype=torch.bfloat16)
        with torch.device("meta"):
            encoder = VisionTransformer(enc)
        numels = [t.numel() for t in (*encoder.parameters(), *encoder.buffers()) if t.is_floating_point()]
        step = f"I-JEPA step {name} B={B}:"
        cases += [
            Case("train", f"{step} target encoder, dense N={N}",
                 kl.attention_launches("fwd", "target encoder", enc.depth, N_q=N, N_k=N, **enc_shape),
                 ["attention under bf16 autocast, one call per block"]),
            Case("train", f"{step} context encoder, key padding over {Kc} slots",
                 kl.attention_launches("fwd+bwd", "context encoder", enc.depth, N_q=Kc, N_k=Kc, mask="key_padding",
                                       q_counts=ctx.tolist(), k_counts=ctx.tolist(), **enc_shape),
                 [f"the collator pads each sample's context to {Kc} slots ({int(ctx.min())}-{int(ctx.max())} valid): "
                  f"useful pairs are valid x valid"]),
            Case("train", f"{step} predictor, key padding over {Kc}+{Kt} slots",
                 kl.attention_launches("fwd+bwd", "predictor", pred.depth, N_q=Kc + Kt, N_k=Kc + Kt, mask="key_padding",
                                       q_counts=both, k_counts=both, **pred_shape),
                 [f"context and target slots ({min(both)}-{max(both)} valid of {Kc + Kt}): useful pairs are valid x valid"]),
            Case("train", f"{step} loss and EMA",
                 [kl.Launch("latent_loss_fwd", dict(M=B * Kt, D=enc.embed_dim, dtype="fp32"), label="loss"),
                  kl.Launch("latent_loss_bwd", dict(M=B * Kt, D=enc.embed_dim, dtype="fp32"), label="loss"),
                  kl.Launch("ema", dict(numels=numels, dtype="fp32"), label="target encoder")],
                 ["the EMA step passes a float momentum without the distance: on CUDA the op takes "
                  "torch._foreach_lerp_", DISPATCH_NOTE]),
        ]
    return cases


_BUILDERS = {"planning": _planning_cases, "cem": _cem_cases, "masked_attention": _attention_cases,
             "encoders": _encoder_cases, "ema": _ema_cases, "latent_loss": _latent_loss_cases, "train": _train_cases}


def group_cases(group: str) -> list[Case]:
    """The cases of benchmark group ``group`` (one of :data:`GROUPS`)."""
    if group not in _BUILDERS:
        raise ValueError(f"ledger: group must be one of {list(GROUPS)}, got {group!r}")
    return _BUILDERS[group]()


# --------------------------------------------------------------------------------------------------
# Rows, budget, rendering
# --------------------------------------------------------------------------------------------------
def case_rows(case: Case, roofline: Roofline = H100_SXM) -> list[Row]:
    """One row per kernel of ``case`` (in order of first launch), its launches summed."""
    rows: dict[str, Row] = {}
    for launch in case.launches:
        work = kl.account(launch)
        row = rows.setdefault(launch.kernel, Row(case.group, case.name, launch.kernel, 0, None, None, None, None, None))
        row.launches += kl.launches_of(launch)
        if work is None:
            continue
        seconds = roofline.seconds(work.launched_flops / launch.count, work.precision,
                                   work.bytes / launch.count) * launch.count
        row.useful_flops = (row.useful_flops or 0.0) + work.useful_flops
        row.launched_flops = (row.launched_flops or 0.0) + work.launched_flops
        row.bytes = (row.bytes or 0.0) + work.bytes
        row.roofline_s = (row.roofline_s or 0.0) + seconds
        row.precision = work.precision if row.precision in (None, work.precision) else "mixed"
        if row.worst_ratio is None or work.ratio > row.worst_ratio:
            row.worst_ratio, row.worst_label = work.ratio, launch.label
    return list(rows.values())


def over_budget_key(row: Row) -> Optional[tuple[str, str, str]]:
    """The :data:`OVER_BUDGET` entry that covers ``row``, or None."""
    for key in OVER_BUDGET:
        group, case, kernel = key
        if row.group == group and fnmatch.fnmatchcase(row.case, case) and fnmatch.fnmatchcase(row.kernel, kernel):
            return key
    return None


def ledger(groups=GROUPS, roofline: Roofline = H100_SXM) -> dict[str, list[tuple[Case, list[Row]]]]:
    """``{group: [(case, rows)]}`` for ``groups``."""
    return {g: [(c, case_rows(c, roofline)) for c in group_cases(g)] for g in groups}


def _fmt(x: Optional[float], scale: float, digits: int) -> str:
    """``x / scale`` with ``digits`` decimals, or in e-notation where that would show no digit."""
    if x is None:
        return "-"
    v = x / scale
    return f"{v:.{digits}f}" if v == 0 or abs(v) >= 10 ** -digits * 10 else f"{v:.1e}"


HEADER = ("kernel", "launches", "useful GFLOP", "launched GFLOP", "ratio", "MB moved", "tensor cores", "roofline us")


def render(result: dict[str, list[tuple[Case, list[Row]]]], roofline: Roofline = H100_SXM) -> str:
    """The ledger as text: per group, per case a table (kernel, launches, useful / launched GFLOP, ratio,
    MB moved, tensor cores, roofline us), the launches over budget and the case's notes."""
    out = [f"Launch/tile-work ledger: launched vs useful FLOPs per kernel (goal: ratio <= {MAX_RATIO:g}); "
           f"roofline on {roofline.name} ({roofline.tflops_16bit:g} TFLOP/s 16-bit, {roofline.tflops_tf32:g} TF32, "
           f"{roofline.tflops_fp32:g} fp32 FMA, {roofline.hbm_tbps:g} TB/s; launch latency not included)"]
    for group, cases in result.items():
        out.append(f"\n== {group} ({GROUP_SOURCES[group]}) ==")
        for case, rows in cases:
            out.append(f"\n{case.name}")
            table = [HEADER]
            for r in rows:
                table.append((r.kernel, str(r.launches), _fmt(r.useful_flops, 1e9, 3), _fmt(r.launched_flops, 1e9, 3),
                              "-" if r.ratio is None else f"{r.ratio:.2f}", _fmt(r.bytes, 1e6, 2),
                              "-" if r.precision is None else ("y" if r.tensor_cores else "n") + f" ({r.precision})",
                              _fmt(r.roofline_s, 1e-6, 2)))
            counted = [r for r in rows if r.counted]
            table.append(("total", str(sum(r.launches for r in rows)),
                          _fmt(sum(r.useful_flops for r in counted), 1e9, 3),
                          _fmt(sum(r.launched_flops for r in counted), 1e9, 3), "", _fmt(sum(r.bytes for r in counted), 1e6, 2),
                          "", _fmt(sum(r.roofline_s for r in counted), 1e-6, 2)))
            widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
            for row in table:
                out.append("  " + "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in
                                            enumerate(zip(row, widths))))
            over: dict = {}
            for r in rows:
                if r.ratio is not None and r.ratio > MAX_RATIO:
                    over.setdefault(over_budget_key(r), []).append(r.kernel)
                elif r.worst_ratio is not None and r.worst_ratio > MAX_RATIO:
                    out.append(f"  . {r.kernel}: its launch '{r.worst_label}' alone is {r.worst_ratio:.1f}x "
                               f"(small in the sum)")
            for key, kernels in over.items():
                out.append(f"  ! over {MAX_RATIO:g}x: {', '.join(kernels)}: "
                           + (OVER_BUDGET[key] if key else "not declared in jepa_engine.ledger.OVER_BUDGET"))
            out.extend(f"  note: {n}" for n in case.notes)
    return "\n".join(out) + "\n"


def as_json(result: dict[str, list[tuple[Case, list[Row]]]], roofline: Roofline = H100_SXM) -> str:
    doc = {"max_ratio": MAX_RATIO, "roofline": asdict(roofline), "groups": {
        g: [{"case": c.name, "notes": c.notes, "rows": [r.as_dict() for r in rows],
             "launches": [{"kernel": x.kernel, "label": x.label, "count": x.count,
                           "shape": {k: str(v) if isinstance(v, torch.dtype) else v for k, v in x.shape.items()}}
                          for x in c.launches]}
            for c, rows in cases] for g, cases in result.items()}}
    return json.dumps(doc, indent=1)


def run(group: Optional[str] = None, json_out: bool = False) -> int:
    """The ``jepa-engine ledger`` command: print the ledger of ``group`` (all groups when None)."""
    result = ledger(GROUPS if group is None else (group,))
    print(as_json(result) if json_out else render(result), end="" if not json_out else "\n")
    return 0
