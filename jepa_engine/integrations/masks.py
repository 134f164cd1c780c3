"""Attention masks in the user's format -> the fused op's plan: key padding (bool ``[B, N_k]``) plus a
frame length for frame-causal masks (formats: :mod:`jepa_engine.integrations.accelerate`).

``mask_plan`` converts (cached per mask in eager mode), ``causal_plan`` folds in SDPA's
``is_causal``, ``call_plan`` decides (and counts) one call of a patched timm / I-JEPA module (with
``route_reason``: on CUDA the route table may give it to the module's own SDPA code);
``to_key_padding`` / ``to_attention_plan`` are the public conversions. A mask that is
neither key padding nor frame-causal raises :class:`Unsupported` (the caller falls back).
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Optional

import torch

from jepa_engine.integrations.record import count_fallback, count_fused
from jepa_engine.kernels import backend_for, routes
from jepa_engine.kernels._launch import forced_backend


class Unsupported(Exception):
    """The mask is not expressible as key padding / frame-causal (the caller falls back).

    Raised with one argument, the reason, read back as ``e.args[0]``: the fallback decision runs inside
    compiled forwards, and torch.compile (2.11) traces neither an exception's C ``__str__`` nor a
    subclass ``__init__``."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the kernel is told: key padding (bool [B, N_k] or None) and a frame length (0 = none)."""
    key_padding: Optional[torch.Tensor]
    frame_len: int = 0

    def kwargs(self) -> dict:
        kw: dict = {"key_padding": self.key_padding}
        if self.frame_len:
            kw["frame_size"] = self.frame_len
        return kw


NO_MASK = Plan(None, 0)


def _frame_plan(a: torch.Tensor, B: int, N: int) -> Plan:
    """``a`` bool ``[b, h, N, N]`` (b in (1, B)) that is not key padding: is it frame-causal (query i
    sees key j iff ``j // L <= i // L``), AND-ed with a key padding? Two host synchronisations.

    The last query row sees every frame, so it is the key padding; a visible key j is first seen by
    the first query of its frame, ``(j // L) * L``: L is the gcd of those first rows. The candidate
    is then checked against the whole mask (every head, every batch entry)."""
    kp = a[:, 0, -1, :]                                         # [b, N]
    first = a[:, 0].to(torch.uint8).argmax(dim=1)               # [b, N]: first query row seeing key j
    rows = torch.unique(first[kp]).tolist()
    L = 0
    for r in rows:
        L = math.gcd(L, int(r))
    if L == 0:
        raise Unsupported("the mask differs between query rows but is not frame-causal")
    pos = torch.arange(N, device=a.device) // L
    expected = (pos[None, :] <= pos[:, None])[None, None] & kp[:, None, None, :]
    if not bool((a == expected).all()):
        raise Unsupported("the mask differs between query rows and is not frame-causal (not key padding)")
    return Plan(kp.expand(B, N), L)


def _plan_from_4d(m: torch.Tensor, B: int, N_q: int, N_k: int, inspect_values: bool) -> Plan:
    """``m`` bool ``[b, h, n_q, N_k]`` (SDPA broadcasting; True = visible) -> a plan."""
    if m.shape[-1] != N_k or m.shape[0] not in (1, B) or m.shape[2] not in (1, N_q):
        raise Unsupported(f"mask shape {tuple(m.shape)} does not broadcast to [{B}, H, {N_q}, {N_k}]")
    if m.shape[1] != 1 or m.shape[2] != 1:
        if not inspect_values:
            raise Unsupported("a mask varying over queries or heads is not inspected under torch.compile")
        first = m[:, :1, :1, :]
        if not bool((m == first).all()):
            if N_q != N_k or m.shape[2] != N_q:
                raise Unsupported("the mask differs between query rows or heads (not key padding)")
            return _frame_plan(m, B, N_q)
        m = first
    return Plan(m[:, 0, 0, :].expand(B, N_k), 0)


def _masked_entries(mask: torch.Tensor) -> torch.Tensor:
    """Additive mask -> bool "masked": entries at or below the dtype's lowest finite value (-inf, or
    torch.finfo(dtype).min as timm's NaFlex writes it). Raises unless every other entry is 0."""
    masked = mask <= torch.finfo(mask.dtype).min
    if not bool((masked | (mask == 0)).all()):
        raise Unsupported("the additive mask has values other than 0 and -inf / the dtype's lowest "
                           "finite value (a bias, not a mask)")
    return masked


def _convert(mask: Any, B: int, N_q: int, N_k: int, device: torch.device, *, user_format: bool,
             inspect_values: bool) -> Plan:
    if mask is None:
        return NO_MASK
    if isinstance(mask, (list, tuple)):  # I-JEPA masks: kept indices, each [B, K_i]
        kp = torch.zeros(B, N_k, dtype=torch.bool, device=device)
        for idx in mask:
            if not torch.is_tensor(idx) or idx.dim() != 2 or idx.shape[0] != B:
                raise Unsupported(f"index masks must be [B, K] = [{B}, K] tensors")
            kp.scatter_(1, idx.to(device=device, dtype=torch.long), True)
        return Plan(kp)
    if not torch.is_tensor(mask):
        raise Unsupported(f"mask of type {type(mask).__name__}")
    if mask.dtype != torch.bool:
        if not mask.is_floating_point():
            raise Unsupported(f"mask dtype {mask.dtype}")
        if not inspect_values:
            raise Unsupported("additive masks are not inspected under torch.compile")
        mask = ~_masked_entries(mask)
    if user_format and mask.dim() == 2 and tuple(mask.shape) == (B, N_k):
        plan = Plan(mask)
    else:
        if mask.dim() > 4:
            raise Unsupported(f"mask with {mask.dim()} dims")
        m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        plan = _plan_from_4d(m, B, N_q, N_k, inspect_values)
    return Plan(plan.key_padding.to(device).contiguous(), plan.frame_len)


def _tensor_key(t: torch.Tensor) -> tuple:
    """Identifies a tensor's contents while a reference to it is held (its storage cannot be reused):
    a new view of the same memory (``self.mask[:n, :n]`` at every forward) gives the same key."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
            t.device, t._version)


class _MaskCache:
    """A few entries: recent masks (held, so their memory is not reused) and their plans, so a model
    passing the same mask to every block (or a view of one stored mask at every forward) converts
    and inspects it once."""

    SIZE = 4

    def __init__(self):
        self.entries: collections.OrderedDict = collections.OrderedDict()

    def get(self, mask, B, N_q, N_k, device, user_format):
        items = mask if isinstance(mask, (list, tuple)) else (mask,)
        if not all(torch.is_tensor(t) for t in items):
            return _convert(mask, B, N_q, N_k, device, user_format=user_format, inspect_values=True)
        key = (type(mask), tuple(_tensor_key(t) for t in items), B, N_q, N_k, device, user_format)
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
            value = hit[1]
            if isinstance(value, Unsupported):
                raise value
            return value
        try:
            value = _convert(mask, B, N_q, N_k, device, user_format=user_format, inspect_values=True)
        except Unsupported as e:
            value = e
        self.entries[key] = (items, value)
        while len(self.entries) > self.SIZE:
            self.entries.popitem(last=False)
        if isinstance(value, Unsupported):
            raise value
        return value


_CACHE = _MaskCache()


def to_key_padding(mask: Any, batch: int, num_queries: int, num_keys: int, *,
                   device: Optional[torch.device] = None, user_format: bool = True) -> Optional[torch.Tensor]:
    """Convert a mask in any supported format (see :mod:`jepa_engine.integrations.accelerate`) to
    bool key padding ``[batch, num_keys]`` (True = visible), or ``None`` for no mask.

    Raises ``ValueError`` when the mask is not expressible as key padding (a frame-causal mask is
    not: :func:`to_attention_plan` gives its frame length)."""
    plan = _user_plan("to_key_padding", "not expressible as key padding", mask, batch, num_queries, num_keys,
                      device, user_format)
    if plan.frame_len:
        raise ValueError(f"to_key_padding: mask is not expressible as key padding: it is frame-causal "
                         f"with {plan.frame_len} tokens per frame")
    return plan.key_padding


def to_attention_plan(mask: Any, batch: int, num_queries: int, num_keys: int, *,
                      device: Optional[torch.device] = None, user_format: bool = True
                      ) -> tuple[Optional[torch.Tensor], int]:
    """``(key_padding, frame_len)`` of a mask: what :func:`masked_attention` is given for it
    (``key_padding=``, ``frame_size=frame_len``; frame_len 0 = not frame-causal).

    Raises ``ValueError`` when the mask is neither key padding nor frame-causal (with key padding)."""
    plan = _user_plan("to_attention_plan", "neither key padding nor frame-causal", mask, batch, num_queries,
                      num_keys, device, user_format)
    return plan.key_padding, plan.frame_len


def _user_plan(who: str, what: str, mask: Any, batch: int, num_queries: int, num_keys: int,
               device: Optional[torch.device], user_format: bool) -> Plan:
    """The plan of a mask given to the public conversion ``who`` (values inspected); ``ValueError``
    "``who``: mask is ``what``: why" when it has none."""
    device = device or (mask.device if torch.is_tensor(mask) else torch.device("cpu"))
    try:
        return _convert(mask, batch, num_queries, num_keys, torch.device(device), user_format=user_format,
                        inspect_values=True)
    except Unsupported as e:
        raise ValueError(f"{who}: mask is {what}: {e}") from None


def mask_plan(mask, B, N_q, N_k, device, *, user_format: bool, compile_safe: bool) -> Plan:
    """The plan of a mask, or raise Unsupported; cached in eager mode."""
    if mask is None:
        return NO_MASK
    if torch.compiler.is_compiling():
        return _convert(mask, B, N_q, N_k, device, user_format=user_format, inspect_values=not compile_safe)
    return _CACHE.get(mask, B, N_q, N_k, device, user_format)


def causal_plan(plan: Plan, is_causal: bool, N_q: int, N_k: int) -> Plan:
    """SDPA's ``is_causal`` (lower triangle, N_q == N_k) is frame-causal with one token per frame."""
    if not is_causal:
        return plan
    if N_q != N_k:
        raise Unsupported("is_causal with N_q != N_k")
    if plan.key_padding is not None or plan.frame_len:
        raise Unsupported("is_causal together with a mask")
    return Plan(None, 1)


def route_reason(plan: Plan, device: torch.device, dtype: torch.dtype, head_dim: int, n_k: int) -> str:
    """"" when the fused op takes this call, else why the module's original computation runs instead:
    on CUDA, where the route table (``jepa_engine/kernels/routes.py``) gives the call's shape class to
    PyTorch, SDPA is the faster path, and the original code runs it with the user's own mask. A
    ``use_backend`` block leaves the call to the fused op (which follows it)."""
    if device.type != "cuda" or forced_backend() is not None:
        return ""
    shape = routes.attention_class(head_dim, n_k, dtype, key_padding=plan.key_padding is not None,
                                   frame_len=plan.frame_len)
    if backend_for("masked_attention", device, shape) == "triton":
        return ""
    return f"route table: PyTorch (SDPA) is the faster path on {routes.device_class(device)}"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the attention of a module fed ``x`` runs in: autocast's on CUDA when it is on."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return x.dtype


def call_plan(mod, rec, x: torch.Tensor, mask, *, is_causal: bool = False, reason: str = ""
              ) -> tuple[Optional[Plan], str]:
    """One call of a patched timm / I-JEPA attention ``mod`` on ``x`` ``[B, N, C]``: ``(plan, "")`` when
    the fused op computes it, ``(None, why)`` when the call falls back (``reason`` given: it does);
    counted in the module's record either way."""
    plan = None
    if reason:
        pass
    elif x.dim() != 3:
        reason = "x is not [B, N, C]"
    elif mod.training and mod.attn_drop.p > 0:
        reason = "attention dropout while training"
    else:
        B, N = x.shape[:2]
        try:
            plan = causal_plan(mask_plan(mask, B, N, N, x.device, user_format=True,
                                         compile_safe=rec.compile_safe), is_causal, N, N)
        except Unsupported as e:
            reason = e.args[0]
        else:
            head_dim = getattr(mod, "head_dim", None) or x.shape[-1] // mod.num_heads
            reason = route_reason(plan, x.device, _compute_dtype(x), head_dim, N)
    if reason:
        count_fallback(rec, reason)
        return None, reason
    count_fused(rec)
    return plan, ""
