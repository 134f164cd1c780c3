"""The CUDA route table: which implementation each op runs on CUDA tensors when nothing is forced.

A row is ``(op, device, shape) -> route, evidence, note``; for a call, the first row that matches its
op, its device class and its shape class wins, and each op ends with a catch-all row (its default):

- device: a device class (:func:`device_class`: ``"cuda-sm90"`` H100/H200, ``"cuda-sm80"`` A100,
  ``"cuda-other"``) or ``"cuda"`` for every one of them;
- shape: ``"*"``, or a tuple with one value (or ``"*"``) per dimension of the op's shape class
  (:data:`SHAPE_DIMS`; ops without dimensions have only ``"*"`` rows). The classes are computed from
  the call's arguments by the public functions (:func:`attention_class`, :func:`ema_class`,
  :func:`refit_class`);
- route: ``"triton"`` (the kernel) or ``"torch"`` (the op's PyTorch path: its reference ops, except
  ``masked_attention``, whose PyTorch path on CUDA is one ``F.scaled_dot_product_attention`` call in the
  inputs' dtype, and ``ema_update_``: ``torch._foreach_lerp_``);
- evidence: the measurement, ``"<file in benches/results/>: <row>, <numbers>"``, or ``"unmeasured"``.

The rule: where the H100 run of 2026-11-25 measured the PyTorch path faster, it is the default; where
no GPU measured the choice, the PyTorch path is, unless the op has no PyTorch equivalent that is as
fast by construction (then the row says why in its note). CPU tensors are not decided here: they take
the native C++ kernels or the references, or the kernels under ``TRITON_INTERPRET=1``.
``use_backend("triton")`` / ``use_backend("reference")`` override the table.

Every (op, device class, shape class) is resolved once, at import, into :data:`_RESOLVED`: a call costs
one dict lookup (plus the device class, cached per device index), which ``torch.compile`` traces.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple, Optional, Union

import torch

ROUTES = ("triton", "torch")
CUDA_CLASSES = ("cuda-sm90", "cuda-sm80", "cuda-other")
UNMEASURED = "unmeasured"
BENCH = "h100-2026-11-25-bench.json"

# Op -> the dimensions of its shape class, each with its values (the order of the class tuple).
ATTENTION_MASKS = ("none", "key_padding", "index", "frame_causal", "varlen")
HEAD_DIMS = (16, 32, 64, 128, 256)
LONG = 1024   # keys; sequences above are "N>1024"
SHAPE_DIMS: dict[str, tuple[tuple, ...]] = {
    "masked_attention": (ATTENTION_MASKS, HEAD_DIMS, (f"N<={LONG}", f"N>{LONG}"), ("fp32", "16bit")),
    "ema_update_": (("plain", "fused"),),
    "elite_refit": (("E<64", "E>=64"),),
    "latent_loss": (), "latent_cost": (), "fused_linear": (), "linear_goal_cost": (), "sample_actions": (),
    "window_attention": (), "fused_mlp": (),
}
OPS = tuple(SHAPE_DIMS)

Shape = Union[str, tuple]


class Row(NamedTuple):
    op: str
    device: str
    shape: Shape
    route: str
    evidence: str
    note: str = ""


ROWS: tuple[Row, ...] = (
    # masked_attention: (mask kind, head-dim bucket, key count, dtype class).
    Row("masked_attention", "cuda", ("varlen", "*", "*", "*"), "triton", UNMEASURED,
        "SDPA has no packed varlen form: a loop over the sequences (host sync) or a [T, T] mask"),
    Row("masked_attention", "cuda", ("frame_causal", "*", f"N>{LONG}", "*"), "triton", UNMEASURED,
        "SDPA takes frame-causal as a dense mask and visits every key block; the kernel skips the "
        "blocks after each query's frame"),
    Row("masked_attention", "cuda-sm90", ("key_padding", 64, f"N<={LONG}", "16bit"), "torch",
        f"{BENCH}: timm vit_b16 train step B=64 ijepa (key padding, D=64, N=196, bf16 autocast), "
        "accelerated 42.10 vs 35.75 ms with SDPA, 0.85x"),
    Row("masked_attention", "cuda-sm90", ("none", "*", "*", "*"), "torch",
        f"{BENCH}: I-JEPA train step demo B=32 (dense and key-padding attention, latent loss, EMA), "
        "kernels 37.33 vs 25.45 ms on the reference ops, 0.68x",
        "F.scaled_dot_product_attention (flash)"),
    Row("masked_attention", "cuda", ("none", "*", "*", "*"), "torch", UNMEASURED,
        "F.scaled_dot_product_attention (flash)"),
    Row("masked_attention", "cuda", "*", "torch", UNMEASURED,
        "key padding, index sets (gathered keys) and frame-causal up to 1024 keys: one SDPA call with a "
        "bool mask"),
    # ema_update_: "plain" = a float momentum, no distance, one dtype throughout; else "fused".
    Row("ema_update_", "cuda-sm90", ("plain",), "torch",
        f"{BENCH}: ema vit_tiny to vit_huge, fp32 and bf16 (33 MB to 3.8 GB), kernel against "
        "torch._foreach_lerp_ from 0.35 vs 0.15 ms (vit_small bf16, 0.42x) to 3.28 vs 3.00 ms (vit_huge fp32, "
        "0.92x)"),
    Row("ema_update_", "cuda", ("fused",), "triton", UNMEASURED,
        "a device momentum (CUDA graphs), the distance or mixed dtypes: the foreach path reads the "
        "momentum on the host, or takes a pass per tensor or per dtype"),
    Row("ema_update_", "cuda", "*", "torch", UNMEASURED, "torch._foreach_lerp_"),
    Row("latent_loss", "cuda-sm90", "*", "torch",
        f"{BENCH}: latent_loss fwd+bwd bf16, kernels against the reference ops: M x D = 40960 x 768 "
        "1.61 vs 1.17 ms, 0.73x; 20480 x 1280 1.12 vs 0.85 ms, 0.76x"),
    Row("latent_loss", "cuda", "*", "torch", UNMEASURED),
    Row("latent_cost", "cuda", "*", "torch", UNMEASURED,
        "its row kernel is latent_loss's design, which lost on the H100"),
    Row("fused_linear", "cuda-sm90", "*", "torch",
        f"{BENCH}: plan lewm N=300 H=5 I=30 K=30 E=1 (the fused rollout on fused_linear and "
        "linear_goal_cost), 1051.65 vs 762.48 ms for the eager loop, 0.73x"),
    Row("fused_linear", "cuda", "*", "torch", UNMEASURED),
    Row("linear_goal_cost", "cuda-sm90", "*", "torch",
        f"{BENCH}: plan lewm N=300 H=5 I=30 K=30 E=1 (the fused rollout on fused_linear and "
        "linear_goal_cost), 1051.65 vs 762.48 ms for the eager loop, 0.73x"),
    Row("linear_goal_cost", "cuda", "*", "torch", UNMEASURED),
    Row("sample_actions", "cuda", "*", "triton", UNMEASURED,
        "the reference reads rng on the host: a sync per call, no CUDA-graph capture"),
    # elite_refit: environments per call (one kernel program per environment).
    Row("elite_refit", "cuda-sm90", ("E>=64",), "triton",
        f"{BENCH}: CEM plan N=300 H=5 I=30 K=30 E=64 (sample_actions + elite_refit kernels), 5.23 vs "
        "5.76 ms for the eager loop, 1.10x"),
    Row("elite_refit", "cuda-sm90", ("E<64",), "torch",
        f"{BENCH}: CEM plan N=300 H=5 I=30 K=30 E=1 (sample_actions + elite_refit kernels), 9.57 vs "
        "5.95 ms for the eager loop, 0.62x"),
    Row("elite_refit", "cuda", "*", "torch", UNMEASURED),
    Row("window_attention", "cuda", "*", "torch", UNMEASURED,
        "the reference: the window's keys concatenated, SDPA with a mask"),
    Row("fused_mlp", "cuda", "*", "torch", UNMEASURED, "the reference: layer_norm, addmm, gelu, addmm"),
)


# --------------------------------------------------------------------------------------------------
# Shape classes (cheap: attribute reads and comparisons).
# --------------------------------------------------------------------------------------------------
def _dtype_class(dtype: torch.dtype) -> str:
    return "16bit" if dtype in (torch.float16, torch.bfloat16) else "fp32"


def attention_class(head_dim: int, n_k: int, dtype: torch.dtype, *, key_padding: bool = False,
                    frame_len: int = 0, index: bool = False, varlen: bool = False) -> tuple:
    """The shape class of a ``masked_attention`` call with ``n_k`` keys (the token total when packed).

    Frame-causal with one frame (``frame_len >= n_k``) hides nothing: it counts as its other masks."""
    if varlen:
        mask = "varlen"
    elif 0 < frame_len < n_k:
        mask = "frame_causal"
    elif index:
        mask = "index"
    elif key_padding:
        mask = "key_padding"
    else:
        mask = "none"
    d = 16
    while d < head_dim and d < HEAD_DIMS[-1]:
        d *= 2
    return (mask, d, f"N<={LONG}" if n_k <= LONG else f"N>{LONG}", _dtype_class(dtype))


def ema_class(plain: bool) -> tuple:
    """``("plain",)`` for a float momentum, no distance and one dtype throughout, else ``("fused",)``."""
    return ("plain",) if plain else ("fused",)


def refit_class(envs: int) -> tuple:
    return ("E>=64",) if envs >= 64 else ("E<64",)


# --------------------------------------------------------------------------------------------------
# Device classes.
# --------------------------------------------------------------------------------------------------
def cuda_class(index: int) -> str:
    """The class of CUDA device ``index`` by its compute capability (``"cuda-other"`` when no CUDA
    device can be queried, e.g. a ``torch.device("cuda")`` on a machine without one)."""
    if not torch.cuda.is_available():
        return "cuda-other"
    props = torch.cuda.get_device_properties(index)
    return {(9, 0): "cuda-sm90", (8, 0): "cuda-sm80"}.get((props.major, props.minor), "cuda-other")


_CUDA_CLASS: dict = {}   # device index -> class, filled on first use


def device_class(device: torch.device) -> str:
    """``"cpu"`` (or the device type) off CUDA, else the CUDA class of the device (cached per index)."""
    if device.type != "cuda":
        return device.type
    index = device.index
    if index is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    cls = _CUDA_CLASS.get(index)
    if cls is None:
        cls = cuda_class(index)
        _CUDA_CLASS[index] = cls
    return cls


# --------------------------------------------------------------------------------------------------
# Resolution: every (op, device class, shape class) once, at import.
# --------------------------------------------------------------------------------------------------
def _matches(row: Row, op: str, dev: str, shape: Optional[tuple]) -> bool:
    if row.op != op or row.device not in ("cuda", dev):
        return False
    if row.shape == "*":
        return True
    return shape is not None and all(p == "*" or p == s for p, s in zip(row.shape, shape))


def _check_rows(rows) -> None:
    for i, row in enumerate(rows):
        where = f"routes: ROWS[{i}] {row.op!r}"
        if row.op not in SHAPE_DIMS:
            raise ValueError(f"{where}: op must be one of {OPS}")
        if row.device != "cuda" and row.device not in CUDA_CLASSES:
            raise ValueError(f"{where}: device must be 'cuda' or one of {CUDA_CLASSES}, got {row.device!r}")
        if row.route not in ROUTES:
            raise ValueError(f"{where}: route must be one of {ROUTES}, got {row.route!r}")
        dims = SHAPE_DIMS[row.op]
        if row.shape != "*":
            if not isinstance(row.shape, tuple) or len(row.shape) != len(dims):
                raise ValueError(f"{where}: shape must be '*' or a tuple of {len(dims)} values, got {row.shape!r}")
            for value, allowed in zip(row.shape, dims):
                if value != "*" and value not in allowed:
                    raise ValueError(f"{where}: shape value must be '*' or one of {allowed}, got {value!r}")
        if not row.evidence:
            raise ValueError(f"{where}: evidence must cite a measurement or say {UNMEASURED!r}")
    for op in OPS:
        if not any(r.op == op and r.device == "cuda" and r.shape == "*" for r in rows):
            raise ValueError(f"routes: op {op!r} must have a default row (device 'cuda', shape '*')")


def resolve(rows=ROWS) -> dict:
    """``{(op, device class, shape class or None): row}`` for every class (None: the default row)."""
    _check_rows(rows)
    table = {}
    for op, dims in SHAPE_DIMS.items():
        shapes = [None] + (list(itertools.product(*dims)) if dims else [])
        for dev in CUDA_CLASSES:
            for shape in shapes:
                table[(op, dev, shape)] = next(
                    r for r in rows if _matches(r, op, dev, shape) and (shape is not None or r.shape == "*"))
    return table


_ROWS_OF: dict = resolve()
# The backend names the dispatch uses: "torch" routes run the "reference" backend's branch.
_RESOLVED: dict = {key: ("triton" if row.route == "triton" else "reference") for key, row in _ROWS_OF.items()}


def _bad(op: str, shape) -> ValueError:
    if op not in SHAPE_DIMS:
        return ValueError(f"routes: op must be one of {OPS}, got {op!r}")
    dims = SHAPE_DIMS[op]
    want = "None (the op has no shape classes)" if not dims else f"None or a tuple from {dims}"
    return ValueError(f"routes: the shape class of {op} must be {want}, got {shape!r}")


def backend(op: str, device: torch.device, shape: Optional[tuple] = None) -> str:
    """``"triton"`` or ``"reference"`` for a call of ``op`` on CUDA ``device`` with shape class ``shape``
    (None: the op's default row)."""
    got = _RESOLVED.get((op, device_class(device), shape))
    if got is None:
        raise _bad(op, shape)
    return got


def row_for(op: str, device: Union[torch.device, str], shape: Optional[tuple] = None) -> Row:
    """The row that decides ``op`` on ``device`` (a CUDA device or a CUDA class name) for ``shape``."""
    dev = device if isinstance(device, str) else device_class(device)
    if dev not in CUDA_CLASSES:
        raise ValueError(f"routes: device must be a CUDA device or one of {CUDA_CLASSES}, got {dev!r}")
    row = _ROWS_OF.get((op, dev, shape))
    if row is None:
        raise _bad(op, shape)
    return row


def attention_summary(dev: str, head_dim: int, dtype: torch.dtype) -> str:
    """What the table does with a ``masked_attention`` call of ``head_dim`` and ``dtype`` on ``dev``,
    by mask kind: e.g. ``"SDPA: none, key_padding, index, frame_causal N<=1024; kernel: varlen, ..."``."""
    torch_side, kernel_side = [], []
    for mask in ATTENTION_MASKS:
        routes = {n: row_for("masked_attention", dev, attention_class(
            head_dim, LONG if n == 0 else LONG + 1, dtype, varlen=mask == "varlen", index=mask == "index",
            key_padding=mask == "key_padding", frame_len=1 if mask == "frame_causal" else 0)).route
            for n in (0, 1)}
        if routes[0] == routes[1]:
            (kernel_side if routes[0] == "triton" else torch_side).append(mask)
        else:
            for n, length in ((0, f"N<={LONG}"), (1, f"N>{LONG}")):
                (kernel_side if routes[n] == "triton" else torch_side).append(f"{mask} {length}")
    parts = [f"SDPA: {', '.join(torch_side)}" if torch_side else "", f"kernel: {', '.join(kernel_side)}"
             if kernel_side else ""]
    return "; ".join(p for p in parts if p)


def summary(op: str) -> str:
    """One line for ``op`` over every CUDA class: Triton, the PyTorch path, or either by shape."""
    routes = {row.route for key, row in _ROWS_OF.items() if key[0] == op}
    if routes == {"triton"}:
        return "Triton (route table)"
    if routes == {"torch"}:
        return "PyTorch path (route table)"
    return "Triton or PyTorch by shape (route table)"


def format_rows(rows=ROWS) -> list[str]:
    """The table as text lines: op, device, shape, route, evidence (``UNMEASURED`` marked), note."""
    lines = []
    for r in rows:
        shape = r.shape if r.shape == "*" else " ".join(str(s) for s in r.shape)
        measured = "UNMEASURED" if r.evidence == UNMEASURED else r.evidence
        lines.append(f"{r.op:17s} {r.device:10s} {shape:31s} {r.route:7s} {measured}")
        if r.note:
            lines.append(f"{'':17s} {'':10s} {'':31s} {'':7s} ({r.note})")
    return lines
