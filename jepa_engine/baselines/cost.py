"""What one decision costs the decoding baseline: latency, energy, bandwidth use, and success.

`decoding_cost(cfg, L, ...)` times one decision (prefill + L + H*A one-token steps) of a decoder of
config `cfg` (untrained weights are fine: a cost sweep), per cache form, and reports the decode
step's memory-bandwidth utilisation as gpt-fast does:

    bytes read per token = parameter bytes + KV-cache bytes at the mean context length
    achieved GB/s        = bytes per token x decode tokens/s
    utilisation          = achieved / peak (peak known for H100/H200/A100; None elsewhere)

The static cache form reads its whole preallocated cache each step; the figure counts only the
filled part (what any decoder must read), so it is a lower bound on what the static form moves.

`decision_rows(policy, starts, goals, world_config)` runs the MPC episode of every decision of a
decision set and returns one row per decision (success, steps, latency per decide), with energy
per decide from `profiling.measure` when the device meter works (the same figure on every row:
NVML cannot time a single 10 ms call).
"""
from __future__ import annotations

import statistics
import time
from typing import Optional

import torch

from jepa_engine.profiling import measure
from jepa_engine.profiling.hardware import peak_for, percentile, sync, time_calls

from .config import DecoderConfig
from .decoder import Decoder, DynamicKVCache

def peak_bandwidth(device: torch.device) -> Optional[float]:
    """Peak memory bandwidth in GB/s where known, else None."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    peak = peak_for(torch.cuda.get_device_name(device))
    return peak[1] * 1e3 if peak else None



def decoding_cost(cfg: DecoderConfig, reasoning_tokens: int = 0, device="cpu", cache: str = "static",
                  compile: bool = False, batch: int = 1, dtype: torch.dtype = torch.float32, repeats: int = 10,
                  energy: bool = False, min_seconds: float = 2.0, trials: int = 3,
                  model: Optional[Decoder] = None) -> dict:
    """Per-decision cost of decoding with `cfg` after L = `reasoning_tokens` reasoning tokens.

    Returns a row: params, tokens per decision, latency median/p90 (s), prefill and decode-step times,
    tokens/s, bytes per token, achieved GB/s and utilisation, joules per decision (None with the
    reason when energy is off or unmeasurable)."""
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"decoding_cost: repeats must be an int >= 1, got {repeats!r}")
    if not (isinstance(batch, int) and batch >= 1):
        raise ValueError(f"decoding_cost: batch must be an int >= 1, got {batch!r}")
    device = torch.device(device)
    if cfg.reasoning_tokens < reasoning_tokens:
        cfg = DecoderConfig.from_dict({**cfg.to_dict(), "reasoning_tokens": reasoning_tokens})
    model = model if model is not None else Decoder(cfg)
    model = model.to(device=device, dtype=dtype).eval()
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (batch, cfg.channels, cfg.image_size, cfg.image_size)
    obs, goal = torch.rand(shape, generator=g).to(device, dtype), torch.rand(shape, generator=g).to(device, dtype)

    def decide():
        return model.generate(obs, goal, reasoning_tokens, cache=cache, compile=compile)

    # two warm-up calls (the first compiles), then `repeats` synchronised calls
    timed = time_calls(decide, device, min_seconds=0.0, min_calls=repeats, max_calls=repeats, warmup=2)
    # prefill alone: the same call with no token after the first (a decision of one token)
    with torch.no_grad():
        prefix = model.embed_prompt(obs, goal)
        P = prefix.shape[1]
        x = torch.cat([prefix, model.tok_embed.weight[:1].expand(batch, 1, -1)], dim=1)
        pos = torch.arange(P + 1, device=device)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model.trunk(x, pos, None if cache == "static" else [DynamicKVCache() for _ in model.blocks])
        sync(device)
        prefill_s = (time.perf_counter() - t0) / repeats
    n_tokens = reasoning_tokens + cfg.action_tokens
    latency = timed["latency_s"]
    steps = max(n_tokens - 1, 1)
    step_s = max(latency - prefill_s, 1e-12) / steps
    elem = torch.empty((), dtype=dtype).element_size()
    n_params = sum(p.numel() for p in model.parameters())
    mean_ctx = P + 1 + (n_tokens - 1) / 2
    kv_bytes = 2 * cfg.depth * batch * mean_ctx * cfg.dim * elem
    bytes_per_step = n_params * elem + kv_bytes
    achieved = bytes_per_step / step_s / 1e9
    peak = peak_bandwidth(device)
    row = {
        "impl": f"decoder-{cache}" + ("-compiled" if compile else ""), "device": str(device),
        "params": n_params, "dim": cfg.dim, "depth": cfg.depth, "batch": batch, "dtype": str(dtype).split(".")[-1],
        "reasoning_tokens": reasoning_tokens, "tokens_per_decision": n_tokens, "prefix_tokens": P,
        "latency_s": latency, "latency_p90_s": timed["latency_p90_s"], "decisions_per_s": 1.0 / latency,
        "prefill_s": prefill_s, "decode_step_s": step_s, "tokens_per_s": batch / step_s,
        "bytes_per_token": bytes_per_step / batch, "achieved_gbps": achieved, "peak_gbps": peak,
        "bandwidth_utilisation": achieved / peak if peak else None,
        "joules_per_decision": None, "energy_reason": "energy not requested",
    }
    if energy:
        m = measure(decide, device=device, min_seconds=min_seconds, trials=trials, warmup=0)
        row.update(joules_per_decision=m.joules_per_call, above_idle_joules_per_decision=m.above_idle_joules_per_call,
                   idle_watts=m.idle_watts, energy_rel_std=m.rel_std_joules, energy_reason=m.reason,
                   joules_per_token=m.joules_per_call / n_tokens if m.joules_per_call is not None else None)
    return row


def decision_rows(policy, starts: torch.Tensor, goals: torch.Tensor, world_config, max_steps: int = 60,
                  device="cpu", energy: bool = False, min_seconds: float = 2.0, trials: int = 3) -> list[dict]:
    """One row per decision (start [4], goal [2]) of a decision set: the MPC episode's success and
    steps, and the latency of its decides (median, p90). `policy` is a `DecoderPolicy` (anything with
    `decide(obs [1, C, H, W], goal [1, 2]) -> [1, H, A]` and `tokens_per_decision`)."""
    from .imitation import rollout_success

    if starts.shape[0] != goals.shape[0] or starts.shape[1:] != (4,) or goals.shape[1:] != (2,):
        raise ValueError(f"decision_rows: starts must be [N, 4] and goals [N, 2], got {list(starts.shape)} "
                         f"and {list(goals.shape)}")
    rows = []
    for i in range(starts.shape[0]):
        r = rollout_success(policy, world_config, 1, max_steps, starts=starts[i:i + 1], goals=goals[i:i + 1],
                            device=device)
        lat = r["decide_seconds"]
        rows.append({"decision": i, "success": bool(r["success"][0]), "steps": int(r["steps"][0]),
                     "final_distance": float(r["final_distance"][0]), "latency_s": statistics.median(lat),
                     "latency_p90_s": percentile(lat, 0.9), "decides": len(lat),
                     "tokens_per_decision": getattr(policy, "tokens_per_decision", None),
                     "joules_per_decision": None, "energy_reason": "energy not requested"})
    if energy and rows:
        from jepa_engine.envs import PointMassWorld

        world = PointMassWorld(world_config, 1, device)
        obs, _ = world.reset(options={"state": starts[:1], "goal": goals[:1]})
        m = measure(lambda: policy.decide(obs, goals[:1].to(device)), device=device, min_seconds=min_seconds,
                    trials=trials, warmup=1)
        for row in rows:
            row.update(joules_per_decision=m.joules_per_call, above_idle_joules_per_decision=m.above_idle_joules_per_call,
                       energy_rel_std=m.rel_std_joules, energy_reason=m.reason)
    return rows
