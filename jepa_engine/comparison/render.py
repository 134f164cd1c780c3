"""The comparison's report for people: the markdown page, the 2 x 2 plot (latency and energy against the two
cost sweeps, planner budgets dashed) and the terminal summary."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from .config import LLM_REFERENCE, SWEEP_LABEL


def _reference_planner(rows: list[dict]) -> Optional[dict]:
    """The headline planner row: the fastest form of the first (reference) budget (graphed on CUDA,
    else fused)."""
    planners = [r for r in rows if r["kind"] == "planner"]
    return next((r for r in planners if r["impl"] == "planner-graphed"),
                next((r for r in planners if r["impl"] == "planner-fused"), planners[0] if planners else None))


def fmt_number(v, spec: str = ".3g", none: str = "-") -> str:
    if v is None:
        return none
    if isinstance(v, float) and not math.isfinite(v):
        return none
    return format(v, spec)


def fmt_ms(v) -> str:
    return fmt_number(None if v is None else 1e3 * v, ".3g")


def markdown(report: dict) -> str:
    env, m, cfg = report["environment"], report["models"], report["config"]
    rows = report["rows"]
    dev = env.get("gpu") or f"CPU ({env['processor']}, {env['cpu_threads']} threads)"
    mode = "quick run, " if cfg.get("quick") else ""
    lines = [f"# Planner vs token-by-token decoding: one decision, two ways ({mode}{cfg['preset']} preset, {dev})", ""]
    ref = _reference_planner(rows)
    eager = next((r for r in rows if r["impl"] == "planner-eager"), None)
    dec = next((r for r in rows if r["kind"] == "decoder" and r.get("sweep") == "decision"), None)
    lines += ["## What is compared", "",
              f"The same {cfg['decisions']} seeded decisions (start, goal) in the built-in open world, each an "
              f"{cfg['horizon']}-step action plan from the current frame. (a) The JEPA world model "
              f"({m['wm_params']:,} parameters; predictor {m['wm_predictor_params']:,}, encoder "
              f"{m['wm_encoder_params']:,}; {m['wm_state']}) plans in latent space with CEM / MPPI at several "
              f"budgets N x I (each candidate rolled H = {cfg['horizon']} steps through the predictor). (b) A "
              f"decoder-only transformer ({m['decoder_params']:,} parameters, dim {m['decoder_dim']}, depth "
              f"{m['decoder_depth']}; {m['decoder_state']}) writes the plan as {m['action_tokens']} action tokens "
              f"with a KV cache after a prompt of {m['prefix_tokens']} patch embeddings of the current and goal "
              f"frames. Success: the fraction of the decisions' episodes (receding horizon, <= {cfg['max_steps']} "
              f"steps) that reach the goal. Latency: one decision, one environment, wall clock, median and p90 "
              f"after a warm-up. FLOPs are counted (2 x multiply-adds), not measured.", ""]
    if ref and dec:
        lines += [f"Headline: the reference planner ({ref['name']}) takes {fmt_ms(ref['latency_s'])} ms per decision "
                  f"against {fmt_ms(dec['latency_s'])} ms for the matched decoder ({dec['name']}), a ratio of "
                  f"{ref['latency_s'] / dec['latency_s']:.3g}x; in counted FLOPs "
                  f"{ref['flops_per_decision'] / dec['flops_per_decision']:.3g}x "
                  f"({ref['predictor_evaluations']:,} predictor evaluations against {dec['tokens_per_decision']} "
                  f"decoded tokens).", ""]
    if ref and eager and ref is not eager:
        form = ("fused rollout replayed from one CUDA graph" if ref["impl"] == "planner-graphed"
                else "fused rollout")
        lines += [f"The planner's forms at that budget: the eager loop ({eager['name']}: `model.rollout` "
                  f"stepped per candidate) takes {fmt_ms(eager['latency_s'])} ms, the {form} "
                  f"{fmt_ms(ref['latency_s'])} ms ({eager['latency_s'] / ref['latency_s']:.3g}x faster, "
                  f"{eager['flops_per_decision'] / ref['flops_per_decision']:.3g}x fewer counted FLOPs).", ""]
    lines += ["## Caveats", ""]
    lines += [f"- {c}" for c in report["caveats"]]
    lines += ["", "## Decisions (same start/goal pairs)", "",
              "| row | params | success | latency median (ms) | p90 (ms) | decisions/s | GFLOPs/decision | J/decision | J/token |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["kind"] == "decoder" and r.get("sweep") != "decision":
            continue
        lines.append(_table_row(r))
    lines += ["", f"## Cost sweeps ({SWEEP_LABEL})", "",
              "| sweep | row | params | L | tokens | latency median (ms) | p90 (ms) | decisions/s | tokens/s (decision) | "
              "GFLOPs/decision | J/decision | J/token |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["kind"] == "decoder" and r.get("sweep") in ("reasoning_tokens", "size"):
            sweep = f"L = {r['reasoning_tokens']}" if r["sweep"] == "reasoning_tokens" else f"size {r['size']}"
            lines.append(f"| {sweep} | {r['name']} | {r['params']:,} | {r['reasoning_tokens']} | "
                         f"{r['tokens_per_decision']} | {fmt_ms(r['latency_s'])} | {fmt_ms(r['latency_p90_s'])} | "
                         f"{fmt_number(r['decisions_per_s'])} | {fmt_number(r['decision_tokens_per_s'])} | "
                         f"{fmt_number(r['flops_per_decision'] / 1e9)} | {fmt_number(r.get('joules_per_decision'))} | "
                         f"{fmt_number(r.get('joules_per_token'))} |")
    decoders = [r for r in rows if r["kind"] == "decoder" and r.get("bytes_per_token") is not None]
    if decoders:
        lines += ["", "## Decode step memory bandwidth (as gpt-fast reports it)", "",
                  "Bytes read per generated token (parameters + KV cache at the mean context) x decode tokens/s, "
                  "against the device's peak where it is known.", "",
                  "| row | sweep | params | bytes/token (MB) | achieved GB/s | peak GB/s | utilisation |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in decoders:
            sweep = {"decision": "decision", "reasoning_tokens": f"L = {r.get('reasoning_tokens')}",
                     "size": f"size {r.get('size')}"}.get(r.get("sweep"), "")
            util = r.get("bandwidth_utilisation")
            lines.append(f"| {r['name']} | {sweep} | {r['params']:,} | {fmt_number(r['bytes_per_token'] / 1e6)} | "
                         f"{fmt_number(r.get('achieved_gbps'))} | {fmt_number(r.get('peak_gbps'))} | "
                         f"{'n/a (peak unknown)' if util is None else f'{util:.1%}'} |")
    lines += ["", "## Ratios (planner / matched decoder, L = 0)", "",
              "| planner | decoder | latency | FLOPs | params | joules |", "|---|---|---:|---:|---:|---:|"]
    for q in report["ratios"]:
        lines.append(f"| {q['planner']} | {q['decoder']} | {q['latency']:.3g} | {q['flops']:.3g} | "
                     f"{q['params']:.3g} | {fmt_number(q['joules'])} |")
    lines += ["", "## Energy", "", f"- {report['energy']['status']}",
              f"- For scale (public reference, not measured here): LLM decoding costs {LLM_REFERENCE}."]
    jt = [r for r in rows if r.get("joules_per_token") is not None]
    if jt:
        lines.append("- Measured here, J per token: " + "; ".join(
            f"{r['name']} ({r['params']:,} params, L = {r['reasoning_tokens']}): {r['joules_per_token']:.3g}"
            for r in jt))
    lines += ["", "## Capped or skipped", ""] + ([f"- {n}" for n in report["notes"]] or ["- nothing"])
    lines += ["", f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, python {env['python']}; "
              f"{env['platform']}. Total run time {report['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def _table_row(r: dict) -> str:
    if r.get("success_rate") is None:
        success = "not measured (latency only)" if "not measured" in r.get("success_note", "") else "n/a (untrained)"
    else:
        success = f"{r['success_rate']:.0%} ({r['successes']}/{r['episodes']})"
    return (f"| {r['name']} | {r['params']:,} | {success} | {fmt_ms(r['latency_s'])} | {fmt_ms(r['latency_p90_s'])} | "
            f"{fmt_number(r['decisions_per_s'])} | {fmt_number(r['flops_per_decision'] / 1e9)} | "
            f"{fmt_number(r.get('joules_per_decision'))} | {fmt_number(r.get('joules_per_token'))} |")


PLOT_SIZE = (12.0, 8.0)   # inches; at PLOT_DPI: 1200 x 800 pixels
PLOT_DPI = 100


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, axes = plt.subplots(2, 2, figsize=PLOT_SIZE, dpi=PLOT_DPI)
    planners = [r for r in rows if r["kind"] == "planner"]
    sweeps = {"reasoning_tokens": ("reasoning tokens L (matched size)", "reasoning_tokens"),
              "size": ("decoder parameters (L = 0)", "params")}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, (sweep, (xlabel, xkey)) in enumerate(sweeps.items()):
        for row_i, (metric, ylabel) in enumerate((("latency_s", "latency per decision (s)"),
                                                  ("joules_per_decision", "energy per decision (J)"))):
            ax = axes[row_i][col]
            pts = [r for r in rows if r["kind"] == "decoder" and r.get("sweep") == sweep]
            have = [r for r in pts if r.get(metric) is not None] + [p for p in planners if p.get(metric) is not None]
            if not have:
                reason = next((r.get("energy_reason") for r in rows if r.get("energy_reason")), "no rows")
                ax.text(0.5, 0.5, _wrap(reason), ha="center", va="center",
                        transform=ax.transAxes, fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{ylabel}: not measured")
                continue
            for j, impl in enumerate(sorted({r["impl"] for r in pts})):
                sel = sorted((r for r in pts if r["impl"] == impl and r.get(metric) is not None), key=lambda r: r[xkey])
                xs = [max(r[xkey], 0.5) if xkey == "reasoning_tokens" else r[xkey] for r in sel]
                ax.plot(xs, [r[metric] for r in sel], "o-", color=colours[j % len(colours)], label=impl)
            for j, p in enumerate(planners):
                if p.get(metric) is not None:
                    ax.axhline(p[metric], ls="--", lw=1, color=colours[(j + 3) % len(colours)], label=p["name"])
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel + (" (L = 0 drawn at 0.5)" if xkey == "reasoning_tokens" else ""))
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6, loc="best")
    fig.suptitle(f"JEPA planner vs token-by-token decoding ({report['config']['preset']}, "
                 f"{report['environment'].get('gpu') or 'CPU'}); dashed: planner budgets", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)


def _wrap(text: str, width: int = 60) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(str(text), width))


def summary_lines(report: dict) -> list[str]:
    """A few lines for the terminal."""
    out = []
    for r in report["rows"]:
        if r["kind"] == "decoder" and r.get("sweep") != "decision":
            continue
        s = "n/a" if r.get("success_rate") is None else f"{r['success_rate']:.0%}"
        out.append(f"{r['name']:<40s} params {r['params']:>11,}  success {s:>4s}  "
                   f"latency {fmt_ms(r['latency_s']):>7s} ms (p90 {fmt_ms(r['latency_p90_s'])})  "
                   f"{fmt_number(r['flops_per_decision'] / 1e9)} GFLOP  "
                   f"J {fmt_number(r.get('joules_per_decision'), '.3g', 'n/a')}")
    return out
