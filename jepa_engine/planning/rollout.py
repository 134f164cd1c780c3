"""The planners' rollout: a world model's predictor run for N candidate action sequences per environment,
restructured for inference so that no work is repeated.

``WorldModel.rollout`` (the reference; differentiable, what training and the gradient planner use)
runs the whole predictor on the sliding window of ``history`` frames once per step, for every
candidate. For sampling planners (CEM, MPPI: no gradient) three things in that computation are
wasted, and :class:`FusedRollout` skips them:

1. **Shared prefix.** Frame-causal attention means the tokens of window frame ``j`` depend on frames
   ``<= j`` only. Frames whose embedding and action are both observed (the history frames before the
   last one) are the same for all N candidates of an environment: their keys and values are computed
   once per environment (batch E, not E x N) and broadcast. A planner calls the cost with the same
   history at every iteration: these prefixes (and the observed tokens) are kept between calls while
   the history tensors are unmodified.
2. **Last row only in the last block.** The prediction reads the last action token only. The last
   block computes keys and values for every token of the window, but the query, attention output,
   projection and MLP for one row.
3. **Folded parameters.** LayerNorm's scale and shift are folded into the next linear layer (and the
   final norm into the output projection), and each token's position + type embedding into one table,
   so a block is: normalise, linear (+ residual), normalise, linear + GELU, linear + residual.

The linear pieces run through :func:`jepa_engine.kernels.fused_linear` (normalisation prologue,
bias / GELU / residual epilogue: one Triton launch each on CUDA, the fewest torch ops on CPU), and the
last step's output projection and its distance to the goal through
:func:`jepa_engine.kernels.linear_goal_cost` (one pass). Attention over a window of at most
``2 * history`` tokens goes through PyTorch's SDPA with an additive mask; on the CPU, several
candidates' windows run as one sequence with a block-diagonal mask (:meth:`FusedRollout._pack`), which
halves the SDPA kernel's per-sequence overhead. The candidates' token contents are written once into
one buffer and each step's window is one add of the position table.

Per step ``k`` of the horizon (``observed`` history frames, a window of ``window`` frames; one
generator, :func:`windows`, serves the run and the FLOP count)::

    window frames   start .. end-1,  end = observed + k, start = max(0, end - window)
    shared frames   start .. observed-2     (observed embedding and observed action)    batch E, cached
    candidate part  observed-1 .. end-1     (a candidate action or a predicted embedding) batch E*N

The result equals :meth:`WorldModel.rollout` up to floating-point rounding (the tests check this).
The model is read once, through :meth:`WorldModel.rollout_spec` (its layout and folded weights), when
the object is built: build a new one after changing the weights.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F

from jepa_engine.kernels import (_native, backend_for, fused_linear, fused_mlp, linear_goal_cost,
                                 window_attention)
from jepa_engine.kernels._launch import forced_backend
from jepa_engine.kernels.fused_linear import fused_linear_reference, linear_goal_cost_reference
from jepa_engine.kernels.precision import check_precision, matmul_precision, round_tf32, storage_dtype
from jepa_engine.models.world_model import FoldedBlock, WorldModel

__all__ = ["FusedRollout", "Window", "windows"]


def _native_linear(x, weight, bias=None, *, normalize=False, eps=1e-6, activation=None, residual=None):
    return torch.ops.jepa_engine.fused_linear.default(x, weight, bias, normalize, eps, activation == "gelu", residual)


def _native_goal_cost(x, weight, bias, goal, *, normalize=True, eps=1e-6, metric="l2"):
    return torch.ops.jepa_engine.linear_goal_cost.default(x, weight, bias, goal, normalize, eps, metric)


def _tf32_operand(x, normalize: bool, eps: float) -> torch.Tensor:
    """A product's left operand as TF32 reads it: normalised first where asked, then rounded."""
    return round_tf32(F.layer_norm(x, (x.shape[-1],), eps=eps) if normalize else x)


def _tf32_linear(x, weight, bias=None, *, normalize=False, eps=1e-6, activation=None, residual=None):
    """:func:`fused_linear_reference` with both operands of the product rounded to TF32 (the CPU's
    emulation of ``precision="tf32"``)."""
    return fused_linear_reference(_tf32_operand(x, normalize, eps), round_tf32(weight), bias, activation=activation,
                                  residual=residual)


def _tf32_goal_cost(x, weight, bias, goal, *, normalize=True, eps=1e-6, metric="l2"):
    """:func:`linear_goal_cost_reference` with both operands of the product rounded to TF32."""
    return linear_goal_cost_reference(_tf32_operand(x, normalize, eps), round_tf32(weight), bias, goal,
                                      normalize=False, metric=metric)


class _Ops(NamedTuple):
    """What one rollout runs: ``linear`` and ``goal_cost`` (fused_linear / linear_goal_cost forms),
    ``attention(block, q, kv, mask, pack)`` and ``kernels``: True on the Triton path, whose blocks run
    as qkv linear, :func:`window_attention`, projection linear and :func:`fused_mlp` (four launches)."""

    linear: object
    goal_cost: object
    attention: object
    kernels: bool


def _ops(device: torch.device, precision: str = "fp32") -> _Ops:
    """The rollout's ops: the fused ops, or where the dispatch would take them anyway, called directly
    (the rollout validates its inputs once, not in each of its ~15 linear calls per step): on plain CPU
    tensors the native library's C++ kernels (1.1-1.8x the reference ops at the rollout's shapes,
    kernels/fused_linear.py), else under ``use_backend("reference")`` or without the library the
    references. The C++ kernels are inference-only: with grad mode on (the gradient planner) the
    references run. ``precision="tf32"`` off CUDA is emulated on the references (:func:`round_tf32`)."""
    if precision == "tf32" and device.type != "cuda":
        return _Ops(_tf32_linear, _tf32_goal_cost, _Block.attention_tf32, False)
    if backend_for("fused_linear", device) == "reference":
        if (device.type == "cpu" and forced_backend() is None and not torch.is_grad_enabled()
                and {"fused_linear", "linear_goal_cost"} <= _native.native_ops()):
            return _Ops(_native_linear, _native_goal_cost, _Block.attention, False)
        return _Ops(fused_linear_reference, linear_goal_cost_reference, _Block.attention, False)
    return _Ops(fused_linear, linear_goal_cost, _Block.attention, True)


class Window(NamedTuple):
    """The predictor's window at one rollout step, in frames: ``start`` is its first frame (counted from
    the first observed one), then ``shared`` frames common to every candidate of an environment
    (observed embedding and observed action) and ``own`` frames of each candidate (a candidate action
    or a predicted embedding; the last one's action token gives the prediction)."""

    step: int
    start: int
    shared: int
    own: int


def windows(observed: int, horizon: int, window: int) -> Iterator[Window]:
    """The :class:`Window` of each of ``horizon`` steps from ``observed`` history frames, with the
    predictor's ``window`` (frames): the window ends at frame ``observed + step`` and slides once full."""
    for step in range(horizon):
        end = observed + step
        start = max(0, end - window)
        shared = max(0, observed - 1 - start)
        yield Window(step, start, shared, end - start - shared)


class _Block:
    """One predictor block (:class:`FoldedBlock`, norms folded) and the pieces the rollout runs it by."""

    def __init__(self, f: FoldedBlock):
        self.heads, self.head_dim, self.scale = f.heads, f.head_dim, f.scale
        self.eps1, self.eps2 = f.eps_attn, f.eps_mlp
        self.w_qkv, self.b_qkv = f.w_qkv, f.b_qkv
        C = self.w_qkv.shape[1]
        self.w_q, self.b_q = self.w_qkv[:C], self.b_qkv[:C]
        self.w_kv, self.b_kv = self.w_qkv[C:], self.b_qkv[C:]
        self.w_proj, self.b_proj = f.w_proj, f.b_proj
        self.w_fc1, self.b_fc1, self.w_fc2, self.b_fc2 = f.w_fc1, f.b_fc1, f.w_fc2, f.b_fc2

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, L, C]`` (any row stride) -> the view ``[B, heads, L, head_dim]``."""
        return t.unflatten(2, (self.heads, self.head_dim)).transpose(1, 2)

    def attention(self, q: torch.Tensor, kv: torch.Tensor, mask: Optional[torch.Tensor], pack: int = 1) -> torch.Tensor:
        """Multi-head attention of ``q [B, L, C]`` over ``kv [B, S, 2C]`` (keys, then values) -> ``[B, L, C]``;
        ``mask``: additive ``[L, S]`` (None: every key) or, with ``pack = G > 1``, the block-diagonal
        ``[G L, G S]`` one (both from :meth:`FusedRollout._mask`).

        ``pack = G`` runs G consecutive sequences as one (views, no copies): the CPU's SDPA spends most
        of its time per (sequence, head) on windows of a few tokens, and G times fewer, G times larger
        blocks (each query still attends to its own sequence only) take about half the time."""
        B, L, C = q.shape
        S = kv.shape[1]
        if pack > 1:
            q, kv = q.view(B // pack, pack * L, C), kv.view(B // pack, pack * S, 2 * C)
        o = F.scaled_dot_product_attention(self._heads(q), self._heads(kv[..., :C]), self._heads(kv[..., C:]),
                                           attn_mask=mask, scale=self.scale)
        return o.transpose(1, 2).reshape(B, L, C)

    def attention_tf32(self, q: torch.Tensor, kv: torch.Tensor, mask: Optional[torch.Tensor], pack: int = 1
                       ) -> torch.Tensor:
        """:meth:`attention` with the operands of both products rounded to TF32 (CPU emulation)."""
        B, L, C = q.shape
        S = kv.shape[1]
        if pack > 1:
            q, kv = q.reshape(B // pack, pack * L, C), kv.reshape(B // pack, pack * S, 2 * C)
        qh, kh, vh = (round_tf32(self._heads(t).contiguous()) for t in (q, kv[..., :C], kv[..., C:]))
        s = torch.matmul(qh, kh.transpose(-1, -2)) * self.scale
        if mask is not None:
            s = s + mask
        o = torch.matmul(round_tf32(s.softmax(-1)), vh)
        return o.transpose(1, 2).reshape(B, L, C)

    def finish(self, lin, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The block's output for tokens ``x [R, C]`` from their attention output ``o [R, C]``:
        projection + residual, MLP + residual."""
        x = lin(o, self.w_proj, self.b_proj, residual=x)
        hidden = lin(x, self.w_fc1, self.b_fc1, normalize=True, eps=self.eps2, activation="gelu")
        return lin(hidden, self.w_fc2, self.b_fc2, residual=x)


class FusedRollout:
    """``FusedRollout(model)``: the inference rollout of ``model``'s predictor for batches of candidates.

    ``rollout(z_hist [E, observed, D], past_actions [E, observed-1, A], actions [E, N, horizon, A])
    -> z [E, N, horizon, D]``
    ``cost(z_hist, past_actions, actions, z_goal [E, D], metric, reduce) -> [E, N]`` (fp32)

    ``z[e, n, k]`` is the embedding after ``actions[e, n, k]``, as ``model.rollout`` computes it for
    the history of environment e. Inference only (no autograd graph is recorded). ``dtype`` (default:
    the model's) is the precision of the weights and activations; the cost is fp32. The model is read
    through :meth:`WorldModel.rollout_spec` only.
    """

    def __init__(self, model: WorldModel, dtype: Optional[torch.dtype] = None, precision: Optional[str] = None):
        device = next(model.parameters()).device
        if precision is not None:
            precision = check_precision("FusedRollout", precision, device)
            if dtype is not None and dtype != storage_dtype(precision):
                raise ValueError(f"FusedRollout: dtype {dtype} contradicts precision {precision!r} (which stores "
                                 f"{storage_dtype(precision)}); pass one of them")
            dtype = storage_dtype(precision)
        self.spec = spec = model.rollout_spec(dtype)
        self.dtype = spec.dtype
        # Without an explicit precision: the device's default for fp32 models, bf16 for bf16 ones, and
        # fp16 models run as they are (tensor cores, as bf16).
        self.precision = precision or ("bf16" if self.dtype != torch.float32 else check_precision(
            "FusedRollout", None, device))
        self.blocks = [_Block(b) for b in spec.blocks]
        self.masks: dict = {}
        self._obs_cache: Optional[tuple] = None
        self._out_embed: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def out_embed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The output projection and the next step's embedding as one linear ``(weight [C, C], bias [C])``
        (fp32 products, stored in the rollout's dtype): the Triton path's cost runs it where the
        prediction itself is not read. Computed at its first use."""
        if self._out_embed is None:
            sp = self.spec
            w_e = sp.w_embed.float()
            self._out_embed = ((w_e @ sp.w_out.float()).to(self.dtype),
                               (w_e @ sp.b_out.float() + sp.b_embed.float()).to(self.dtype))
        return self._out_embed

    # ---------------------------------------------------------------------------------------------
    def _mask(self, prefix: int, frames: int, device, pack: int = 1) -> Optional[torch.Tensor]:
        """The attention mask ``[2 * frames, prefix + 2 * frames]``: candidate token i (frame i // 2)
        sees the whole shared prefix and the candidate tokens of frames <= its own; ``frames = 0``: one
        query row that sees all ``prefix`` keys. None where every query sees every key. ``pack = G > 1``:
        the block-diagonal mask of G such sequences run as one. Additive (0 / -inf, in the rollout's
        dtype): SDPA would convert a bool mask at every call."""
        key = (prefix, frames, device, pack)
        if key not in self.masks:
            f = torch.arange(2 * frames, device=device) // 2
            own = f[None, :] <= f[:, None]
            m = torch.cat([own.new_ones(2 * frames, prefix), own], dim=1) if frames else own.new_ones(1, prefix)
            if pack > 1:
                m = torch.block_diag(*[m.to(torch.uint8)] * pack).bool()
            every = pack == 1 and frames <= 1                  # told without reading m back (CUDA graphs)
            self.masks[key] = None if every else \
                torch.zeros(m.shape, dtype=self.dtype, device=device).masked_fill_(~m, float("-inf"))
        return self.masks[key]

    @staticmethod
    def _pack(device: torch.device, batch: int, rows: int) -> int:
        """How many sequences :meth:`_Block.attention` runs as one: on the CPU 6 for one or two query
        rows, else 3 (measured best of 1-12 for windows of 6 tokens, 16- and 64-wide heads, 2 cores),
        falling back to a divisor of ``batch``; 1 elsewhere (CUDA's SDPA kernels tile many sequences
        per block already)."""
        if device.type != "cpu":
            return 1
        for g in ((6, 3, 4) if rows <= 2 else (3, 4, 6)):
            if batch % g == 0:
                return g
        return 1

    def _prefix_kv(self, ops: _Ops, tokens: torch.Tensor) -> list[torch.Tensor]:
        """The shared frames ``tokens [E, 2s, Dp]`` through every block: keys and values ``[E, 2s, 2 Dp]``
        per block."""
        E, P, C = tokens.shape
        lin = ops.linear
        out = []
        x = tokens.reshape(E * P, C)
        mask = self._mask(0, P // 2, tokens.device)
        for blk in self.blocks[:-1]:
            qkv = lin(x, blk.w_qkv, blk.b_qkv, normalize=True, eps=blk.eps1).view(E, P, 3 * C)
            out.append(qkv[..., C:])
            x = blk.finish(lin, x, ops.attention(blk, qkv[..., :C], qkv[..., C:], mask).view(E * P, C))
        blk = self.blocks[-1]
        out.append(lin(x, blk.w_kv, blk.b_kv, normalize=True, eps=blk.eps1).view(E, P, 2 * C))
        return out

    def _action_tokens(self, lin, a: torch.Tensor) -> torch.Tensor:
        """The action encoder: ``a [B, T, A] -> [B, T, Dp]``."""
        B, T, A = a.shape
        sp = self.spec
        hidden = lin(a.reshape(B * T, A), sp.w_act1, sp.b_act1, activation="gelu")
        return lin(hidden, sp.w_act2, sp.b_act2).view(B, T, -1)

    # ---------------------------------------------------------------------------------------------
    def _observed(self, lin, z_hist: torch.Tensor, past_actions: torch.Tensor):
        """``(emb_obs [E, observed, C], act_obs [E, observed-1, C] or None, prefixes)``: the tokens of the observed
        history, and a dict ``(start, s) -> per-block keys/values`` of the shared prefixes, filled by
        :meth:`_run`. A planner calls the cost with the same history at every iteration, so these are
        kept for the tensors of the last call while neither was modified (same objects, same version
        counters). Never kept while a CUDA graph is being captured (a cached prefix would be baked into
        the graph and go stale when the history is updated in place), nor for inference-mode tensors
        (no version counter)."""
        cacheable = not (z_hist.is_inference() or past_actions.is_inference()
                         or (z_hist.is_cuda and torch.cuda.is_current_stream_capturing()))
        key = (z_hist._version, past_actions._version) if cacheable else None
        c = self._obs_cache
        if key is not None and c is not None and c[0] is z_hist and c[1] is past_actions and c[2] == key:
            return c[3]
        E, observed, D = z_hist.shape
        emb_obs = lin(z_hist.to(self.dtype).reshape(E * observed, D), self.spec.w_embed, self.spec.b_embed)
        emb_obs = emb_obs.view(E, observed, -1)
        act_obs = self._action_tokens(lin, past_actions.to(self.dtype)) if observed > 1 else None
        out = (emb_obs, act_obs, {})
        self._obs_cache = (z_hist, past_actions, key, out) if key is not None else None
        return out

    def _run(self, z_hist, past_actions, actions, z_goal=None, metric="l2", reduce="final"):
        if torch.compiler.is_compiling():      # traced (export): the precision flag is the caller's
            return self._steps(z_hist, past_actions, actions, z_goal, metric, reduce)
        with matmul_precision(self.precision):
            return self._steps(z_hist, past_actions, actions, z_goal, metric, reduce)

    def _steps(self, z_hist, past_actions, actions, z_goal, metric, reduce):
        sp = self.spec
        E, observed, _ = z_hist.shape
        _, N, horizon, A = actions.shape
        dt, dev = self.dtype, z_hist.device
        EN = E * N
        C = sp.width
        ops = _ops(dev, self.precision)
        lin, goal_cost = ops.linear, ops.goal_cost
        emb_obs, act_obs, prefixes = self._observed(lin, z_hist, past_actions)
        actions = actions.to(dt)
        # The candidates' frames observed-1 .. observed+horizon-2 without positions, [E*N, horizon, 2, C]:
        # (embedding, action) token contents, written once (the predicted embeddings as the rollout
        # reaches them).
        # One copy: the last observed embedding (broadcast to every frame; frames 1.. are overwritten by
        # the predictions) beside the action tokens.
        act_tok = self._action_tokens(lin, actions.reshape(EN, horizon, A)).view(E, N, horizon, C)
        cand = torch.stack([emb_obs[:, None, None, observed - 1].expand(E, N, horizon, C), act_tok], 3)
        cand = cand.view(EN, horizon, 2, C)
        last = len(self.blocks) - 1
        # Triton path, cost of the final step only: the predictions before it are not read, so their
        # output projection and the next step's embedding run as one linear.
        composed = ops.kernels and z_goal is not None and reduce == "final"
        outs, cost = [], None
        for k, start, s, t in windows(observed, horizon, sp.window):   # s shared frames, t own frames
            L, P = 2 * t, 2 * s
            prefix = None
            if s:
                if (start, s) not in prefixes:
                    shared = torch.stack([emb_obs[:, start:start + s], act_obs[:, start:start + s]], 2)  # [E, s, 2, C]
                    prefixes[start, s] = self._prefix_kv(ops, (shared + sp.pos_type[:s]).view(E, P, C))
                prefix = prefixes[start, s]
            x = (cand[:, k + 1 - t:k + 1] + sp.pos_type[s:s + t]).view(EN * L, C)       # [E*N*L, C]
            if ops.kernels:
                x = self._blocks_kernels(x, prefix, L)
            else:
                x = self._blocks_torch(ops, x, prefix, EN, L, P, t, dev)
            final = k == horizon - 1                           # x: [E*N, C]
            if z_goal is not None and (final or reduce == "sum"):
                z, c = goal_cost(x, sp.w_out, sp.b_out, z_goal.to(dt), normalize=True, eps=sp.eps_out, metric=metric)
                cost = c if cost is None else cost + c
            elif composed:
                cand[:, k + 1, 0] = lin(x, *self.out_embed(), normalize=True, eps=sp.eps_out)
                continue
            else:
                z = lin(x, sp.w_out, sp.b_out, normalize=True, eps=sp.eps_out)
            outs.append(z)
            if not final:
                cand[:, k + 1, 0] = lin(z, sp.w_embed, sp.b_embed)
        return outs, cost

    def _blocks_torch(self, ops: _Ops, x, prefix, EN: int, L: int, P: int, t: int, dev) -> torch.Tensor:
        """The blocks on torch ops / the C++ kernels: SDPA with a mask over the concatenated shared and own
        keys (several candidates per sequence on the CPU), the last block's queries for its last row only.
        ``x [E*N*L, C]`` -> the last rows' outputs ``[E*N, C]``."""
        lin = ops.linear
        C = self.spec.width
        E = EN if prefix is None else prefix[0].shape[0]
        N = EN // E
        pack = self._pack(dev, EN, L)                      # block 0 .. last-1: L query rows
        mask = self._mask(P, t, dev, pack)
        pack1 = self._pack(dev, EN, 1)                     # the last block: one row
        mask1 = self._mask(P + L, 0, dev, pack1)
        last = len(self.blocks) - 1
        for bi, blk in enumerate(self.blocks):
            if bi < last:
                qkv = lin(x, blk.w_qkv, blk.b_qkv, normalize=True, eps=blk.eps1).view(EN, L, 3 * C)
                q, kv = qkv[..., :C], qkv[..., C:]
            else:
                kv = lin(x, blk.w_kv, blk.b_kv, normalize=True, eps=blk.eps1).view(EN, L, 2 * C)
                x = x.view(EN, L, C)[:, -1]               # the last action token: the only row read
                q = lin(x, blk.w_q, blk.b_q, normalize=True, eps=blk.eps1)
            if prefix is not None:                         # shared keys/values, broadcast to the candidates
                kv = torch.cat([prefix[bi][:, None].expand(E, N, P, 2 * C), kv.view(E, N, L, 2 * C)], 2)
                kv = kv.view(EN, P + L, 2 * C)
            if bi < last:
                o = ops.attention(blk, q, kv, mask, pack).view(EN * L, C)
            else:
                o = ops.attention(blk, q[:, None], kv, mask1, pack1).view(EN, C)
            x = blk.finish(lin, x, o)
        return x

    def _blocks_kernels(self, x, prefix, L: int) -> torch.Tensor:
        """The blocks on the Triton path, four launches each: qkv linear (layer norm folded),
        :func:`window_attention` (the shared prefix read in place, the frame-causal mask computed, the last
        block's last row only), projection linear + residual, :func:`fused_mlp` (+ residual).
        ``x [E*N*L, C]`` -> the last rows' outputs ``[E*N, C]``."""
        C = self.spec.width
        last = len(self.blocks) - 1
        for bi, blk in enumerate(self.blocks):
            qkv = fused_linear(x, blk.w_qkv, blk.b_qkv, normalize=True, eps=blk.eps1)
            pre = prefix[bi] if prefix is not None else None
            o = window_attention(qkv, pre, heads=blk.heads, window=L, last_only=bi == last, scale=blk.scale)
            res = x if bi < last else x.view(-1, L, C)[:, -1]
            x = fused_linear(o, blk.w_proj, blk.b_proj, residual=res)
            x = fused_mlp(x, blk.w_fc1, blk.b_fc1, blk.w_fc2, blk.b_fc2, eps=blk.eps2)
        return x

    def _check(self, z_hist, past_actions, actions, z_goal=None):
        sp = self.spec
        D, A = sp.embed_dim, sp.action_dim
        if z_hist.dim() != 3 or z_hist.shape[2] != D or not 1 <= z_hist.shape[1] <= sp.window:
            raise ValueError(f"FusedRollout: z_hist must be [E, observed, {D}] with 1 <= observed <= history = "
                             f"{sp.window}, got {list(z_hist.shape)}")
        E, observed, _ = z_hist.shape
        if actions.dim() != 4 or actions.shape[0] != E or actions.shape[3] != A or actions.shape[2] < 1:
            raise ValueError(f"FusedRollout: actions must be [E, N, horizon, A] with E = {E}, horizon >= 1, A = {A}, "
                             f"got {list(actions.shape)}")
        if tuple(past_actions.shape) != (E, observed - 1, A):
            raise ValueError(f"FusedRollout: past_actions must be [E, observed-1, A] = [{E}, {observed - 1}, {A}], "
                             f"got {list(past_actions.shape)}")
        if z_goal is not None and tuple(z_goal.shape) != (E, D):
            raise ValueError(f"FusedRollout: z_goal must be [E, D] = [{E}, {D}], got {list(z_goal.shape)}")

    def flops(self, envs: int, samples: int, horizon: int, observed: Optional[int] = None) -> int:
        """Counted FLOPs (2 x multiply-adds; norms, biases, activations and softmax ignored) of one
        :meth:`cost` call for ``envs`` environments x ``samples`` candidates, ``horizon`` steps, from
        ``observed`` history frames (default: a full window). This is a first call with that history;
        later calls with the same, unmodified history tensors skip the shared prefixes (``E x`` a few
        tokens through the predictor)."""
        sp = self.spec
        E, N = envs, samples
        observed = sp.window if observed is None else observed
        C, D, A = sp.width, sp.embed_dim, sp.action_dim
        hidden = self.blocks[0].w_fc1.shape[0]
        full = 4 * C * C + 2 * C * hidden                      # qkv, proj, fc1, fc2 per token
        macs = (E * (observed - 1) + E * N * horizon) * (A * C + C * C)     # action tokens
        macs += (E * observed + E * N * (horizon - 1)) * D * C               # embedding tokens
        macs += E * N * horizon * C * D                                      # output projection
        last = len(self.blocks) - 1
        prefixes = set()
        for _, start, s, t in windows(observed, horizon, sp.window):
            L, P = 2 * t, 2 * s
            if s and (start, s) not in prefixes:   # each shared prefix once, batch E: full blocks, then
                prefixes.add((start, s))           # keys/values of the last one
                macs += E * (last * (P * full + P * P * 2 * C) + P * 2 * C * C)
            rows = E * N
            macs += rows * last * (L * full + L * (P + L) * 2 * C)
            macs += rows * (L * 2 * C * C + full - 2 * C * C + (P + L) * 2 * C)   # last block: kv, one row
        return 2 * macs

    @torch.no_grad()
    def rollout(self, z_hist: torch.Tensor, past_actions: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """z_hist [E, observed, D], past_actions [E, observed-1, A], actions [E, N, horizon, A]
        -> z [E, N, horizon, D]."""
        self._check(z_hist, past_actions, actions)
        outs, _ = self._run(z_hist, past_actions, actions)
        E, N = actions.shape[:2]
        return torch.stack(outs, 1).view(E, N, len(outs), -1)

    @torch.no_grad()
    def cost(self, z_hist: torch.Tensor, past_actions: torch.Tensor, actions: torch.Tensor, z_goal: torch.Tensor,
             metric: str = "l2", reduce: str = "final") -> torch.Tensor:
        """The planners' cost ``[E, N]`` (fp32): the distance of the last predicted embedding
        (``reduce="final"``) or the sum over the horizon (``"sum"``) to ``z_goal [E, D]``."""
        self._check(z_hist, past_actions, actions, z_goal)
        _, cost = self._run(z_hist, past_actions, actions, z_goal, metric, reduce)
        return cost.view(actions.shape[0], actions.shape[1])
