"""What every op shares: the one backend switch, argument checks, launch tables and dot precision.

Each op's public function validates its arguments with the checks below (errors name the argument,
the expected and the actual), then asks :func:`backend_for` which implementation runs:

- ``"triton"``: the Triton kernel, compiled on CUDA tensors, or run by the Triton interpreter on CPU
  tensors when ``TRITON_INTERPRET=1`` (how the test suite checks kernels on machines without a GPU);
- ``"reference"``: the op's PyTorch reference, which is its specification (plain CPU tensors), or on
  CUDA tensors the op's PyTorch path where the route table (:mod:`.routes`) says it is the faster one.

:func:`use_backend` forces one of them inside a ``with`` block (benchmarks use it to time the
reference as a peer; tests use it to compare the two on the same inputs).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence

import torch

from . import routes
from . import _configs
from ._registry import LaunchConfig

BACKENDS = ("triton", "reference")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The storage dtypes by the names Triton signatures use ("*bf16") and audit variant labels start with.
TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
NAMED_DTYPES = {name: dtype for dtype, name in TYPE_NAMES.items()}

# The innermost use_backend() block's choice (a plain list: torch.compile traces reads of it).
_forced: list[str] = []


# Looked up once at import: ``torch.compile`` refuses to trace ``importlib.util.find_spec`` (torch 2.11),
# while reading a module constant traces to nothing.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (Linux x86-64 wheels)."""
    return _TRITON_INSTALLED


def interpreting() -> bool:
    """True when Triton kernels run under the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def interpreter_off() -> Iterator[None]:
    """The block runs with ``TRITON_INTERPRET`` unset: CPU calls take the ops' plain-CPU dispatch (the
    native C++ kernels where loaded) instead of Triton's interpreted kernels. Restored on exit."""
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every op called inside the block onto ``"triton"`` or ``"reference"``."""
    if name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {BACKENDS}, got {name!r}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def forced_backend() -> Optional[str]:
    """The backend the innermost :func:`use_backend` block forces, or None outside any."""
    return _forced[-1] if _forced else None


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernel can run on tensors of ``device`` in this process."""
    if not triton_available():
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


class KernelTestDevice(NamedTuple):
    """Where kernel-vs-reference comparisons run: ``device`` is ``"cuda"``, ``"cpu"`` or ``None``
    (no Triton kernel can run in this process), and ``reason`` says why, for a skip or a report."""

    device: str | None
    reason: str


def kernel_test_device() -> KernelTestDevice:
    """The device on which the Triton kernels are checked against their references.

    A CUDA device when one is present (kernels compiled, unless ``TRITON_INTERPRET=1`` is also set);
    else CPU tensors under the Triton interpreter; else none, with the reason. The test suite's
    ``kernel_device`` fixture and ``jepa-engine selfcheck`` both decide by this rule.
    """
    if not triton_available():
        return KernelTestDevice(None, "triton is not installed: every op runs its PyTorch reference")
    if torch.cuda.is_available():
        how = "run by the Triton interpreter" if interpreting() else "compiled"
        return KernelTestDevice("cuda", f"a CUDA device is present: kernels {how} on CUDA tensors")
    if interpreting():
        return KernelTestDevice("cpu", "no CUDA device: kernels run by the Triton interpreter on CPU tensors")
    return KernelTestDevice(None, "no CUDA device and TRITON_INTERPRET is not set: Triton kernels cannot run "
                                  "here (TRITON_INTERPRET=1 runs them on CPU)")


def backend_for(op: str, device: torch.device, shape: Optional[tuple] = None) -> str:
    """The single dispatch decision of an op: ``"triton"`` or ``"reference"`` for tensors on ``device``.

    A forced backend (:func:`use_backend`) wins. Otherwise CUDA tensors follow the route table
    (:mod:`.routes`, one dict lookup): ``shape`` is the call's shape class there (e.g.
    :func:`.routes.attention_class`), None for the op's default row; a ``"torch"`` route is returned as
    ``"reference"``, the branch that runs the op's PyTorch path. CPU tensors take the kernel under the
    Triton interpreter, the reference (or the native C++ kernel, decided by the op) otherwise."""
    forced = _forced[-1] if _forced else None
    if forced == "reference":
        return "reference"
    if triton_runs_on(device):
        if forced is None and device.type == "cuda":
            return routes.backend(op, device, shape)
        return "triton"
    if forced == "triton":
        raise RuntimeError(
            f"{op}: the Triton backend was forced but cannot run on {device} tensors "
            f"(triton installed: {triton_available()}, TRITON_INTERPRET: {interpreting()})"
        )
    return "reference"


def dot_precision(dtype: torch.dtype, *, allow_tf32: bool) -> str:
    """The ``input_precision`` constexpr of a kernel's ``tl.dot`` calls on operands of ``dtype``.

    The contract, the same for every op: fp32 operands run ``"ieee"`` (exact fp32 FMA dots, no tensor
    cores) unless the op allows TF32 (``"tf32"``: tensor cores, inputs rounded to a 10-bit mantissa,
    about 1e-3 relative); fp16/bf16 operands always run on tensor cores with fp32 accumulation, where
    the value is not read (``"tf32"``, Triton's default, so every 16-bit launch compiles the same
    variant). The interpreter computes every dot in IEEE fp32 whatever the value.

    Only the ``allow_tf32`` decision differs between ops, and each states why where it calls this:
    ``fused_linear`` follows ``torch.backends.cuda.matmul.allow_tf32`` as ``torch.nn.Linear`` does;
    ``masked_attention`` never allows TF32 in its forward (exact against the reference) and always in
    its backward (five IEEE dots per tile spill at every tile size on sm_90a and sm_80).
    """
    return "ieee" if dtype == torch.float32 and not allow_tf32 else "tf32"


def linear_dot_precision(dtype: torch.dtype) -> str:
    """:func:`dot_precision` of fp32 dots as ``torch.nn.Linear`` computes them: TF32 exactly where torch
    allows TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32``, read at launch)."""
    return dot_precision(dtype, allow_tf32=torch.backends.cuda.matmul.allow_tf32)


def row_stride(t: torch.Tensor) -> int:
    """The row stride a kernel takes for 2-D ``t`` (a one-row tensor: its width, whatever torch reports)."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def upcast_bf16(dtype: torch.dtype) -> bool:
    """The constexpr that makes kernels upcast bf16 tiles to fp32 right after loading.

    The Triton interpreter computes bf16 arithmetic and bf16 ``tl.dot`` wrongly without an error, so
    under the interpreter bf16 tiles are upcast; compiled kernels keep bf16 tensor-core dots.
    """
    return dtype == torch.bfloat16 and interpreting()


# --------------------------------------------------------------------------------------------------
# Argument checks. Each raises before any kernel runs, naming the op, the argument, expected, actual.
# --------------------------------------------------------------------------------------------------
def _fmt_shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    min_ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    nonempty: bool = True,
) -> torch.Tensor:
    """Check that ``t`` is a tensor with the given rank, dtype and device; return it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(f"{n}-D" for n in allowed)
            raise ValueError(f"{op}: {name} must be {want}, got {t.dim()}-D with shape {_fmt_shape(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dims, got shape {_fmt_shape(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({want}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} must be on {device} like the other inputs, got {t.device}")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{op}: {name} must not be empty, got shape {_fmt_shape(t.shape)}")
    return t


def check_inference_only(op: str, tensors: dict) -> None:
    """For an op without a backward: refuse, in grad mode, any of ``tensors`` (name -> tensor or None)
    that requires grad, so a training loop cannot silently get a graph that stops at the op."""
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if t is not None and t.requires_grad:
                raise ValueError(f"{op}: inference-only op (no backward), but {name} requires grad while grad "
                                 f"mode is on; call it under torch.no_grad() / torch.inference_mode() or pass "
                                 f"{name}.detach()")


def check_shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    """Check ``t.shape == expected``; ``what`` names the expected dims, e.g. ``"[B, N_k]"``."""
    if tuple(t.shape) != tuple(int(s) for s in expected):
        label = f"{what} = " if what else ""
        raise ValueError(f"{op}: {name} must be {label}{_fmt_shape(expected)}, got {_fmt_shape(t.shape)}")


def check_same_dtype(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{op}: {name} must have the dtype of {ref_name} ({str(ref.dtype).replace('torch.', '')}), "
            f"got {str(t.dtype).replace('torch.', '')}"
        )


# --------------------------------------------------------------------------------------------------
# Launch arithmetic.
# --------------------------------------------------------------------------------------------------
def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def candidates(names: str, *rows: Sequence[int]) -> list[LaunchConfig]:
    """Launch configs written compactly: ``names`` lists the constexprs (comma-separated), each row
    gives their values, then ``num_warps`` and ``num_stages``:
    ``candidates("BLOCK_M,BLOCK_N", (128, 64, 8, 3), (64, 64, 4, 2))``."""
    keys = [n.strip() for n in names.split(",") if n.strip()]
    out = []
    for row in rows:
        if len(row) != len(keys) + 2:
            raise ValueError(f"candidates: each row must give {keys} then num_warps and num_stages "
                             f"({len(keys) + 2} values), got {tuple(row)}")
        out.append(LaunchConfig(dict(zip(keys, row[:-2])), num_warps=row[-2], num_stages=row[-1]))
    return out


# Tiles of the bandwidth-bound row kernels (latent loss, latent cost): ``BLOCK_M`` rows x ``BLOCK_D``
# features, 1k elements (8 per thread per operand keeps registers under ~100, for occupancy); wide
# rows get a wide BLOCK_D so each row is swept in few steps, narrow rows more rows per program.
ROW_TILES = [
    LaunchConfig({"BLOCK_M": 16, "BLOCK_D": 64}, num_warps=4, num_stages=1),
    LaunchConfig({"BLOCK_M": 8, "BLOCK_D": 128}, num_warps=4, num_stages=1),
    LaunchConfig({"BLOCK_M": 4, "BLOCK_D": 256}, num_warps=4, num_stages=1),
]


# The same tiles as a launch table keyed by width class (rows of D <= 64, <= 128, wider features).
ROW_TABLE = {(64,): ROW_TILES[0], (128,): ROW_TILES[1], (256,): ROW_TILES[2]}


# The row kernels' search space beside ROW_TABLE (rows: BLOCK_M, BLOCK_D, num_warps, num_stages): more or
# fewer rows per program, wider feature chunks for wide rows; each kernel registers
# ``search_space(ROW_TABLE, ROW_CANDIDATES)`` (all compile spill-free: ``audit --search-space``; 8 x 256
# over 4 warps gives latent_cost's fp16 form a 32-byte stack frame on sm_90a).
ROW_CANDIDATES = {
    (64,): candidates("BLOCK_M,BLOCK_D", (32, 64, 4, 1), (8, 64, 2, 1), (32, 64, 8, 1)),
    (128,): candidates("BLOCK_M,BLOCK_D", (16, 128, 4, 1), (4, 128, 2, 1), (16, 128, 8, 1)),
    (256,): candidates("BLOCK_M,BLOCK_D", (2, 512, 4, 1), (4, 512, 8, 1), (8, 256, 8, 1)),
}


def row_key(D: int) -> tuple[int]:
    """The :data:`ROW_TABLE` key of rows of ``D`` features."""
    return (64,) if D <= 64 else (128,) if D <= 128 else (256,)


def row_tile(D: int, kernel: str | None = None) -> LaunchConfig:
    """The :data:`ROW_TILES` entry for rows of ``D`` features; with ``kernel``, the device's tuned
    config for that kernel and width class first (:func:`tuned`)."""
    key = row_key(D)
    return tuned(kernel, key, ROW_TABLE[key]) if kernel is not None else ROW_TABLE[key]


# Launch tables of the tensor-core ops (fused_linear, masked_attention) are dicts keyed by
# ``(dtype class, width class)``: the dtype class is below, the width class is the op's (output
# columns, head-dim tile).
def dtype_class(dtype: torch.dtype) -> str:
    """``"fp32"`` (FMA or TF32 dots, smaller tiles) or ``"16bit"`` (fp16/bf16 on tensor cores)."""
    return "fp32" if dtype == torch.float32 else "16bit"


def pick_config(table: dict[tuple[str, int], LaunchConfig], dtype: torch.dtype, width: int,
                interpret: LaunchConfig | None = None, kernel: str | None = None) -> LaunchConfig:
    """``table[(dtype_class(dtype), width)]``, or ``interpret`` under the Triton interpreter when given
    (small tiles there: each program runs in numpy, and the tests' small shapes then span several
    tiles, so loops, tails and masks run). With ``kernel``, the device's tuned config for that key
    comes before the table's (:func:`tuned`)."""
    if interpret is not None and interpreting():
        return interpret
    key = (dtype_class(dtype), width)
    return tuned(kernel, key, table[key]) if kernel is not None else table[key]


def tuned(kernel: str, key: tuple, fixed: LaunchConfig) -> LaunchConfig:
    """The launch config of ``kernel`` for table key ``key``: the device's tuned file
    (``kernels/configs/<device>.json``, read once; see ``kernels/_configs.py``) where it names one,
    else ``fixed``. Under the Triton interpreter always ``fixed``."""
    return _configs.tuned(kernel, key, fixed)


def search_space(table: dict[tuple, LaunchConfig], extra: dict[tuple, Sequence[LaunchConfig]]
                 ) -> dict[tuple, tuple[LaunchConfig, ...]]:
    """A kernel's search space: for every key of its launch ``table``, the table's config followed by
    the ``extra`` candidates of that key (keys without extras are searched over their table config
    alone; a candidate equal to the table's config, or to an earlier one, is dropped). Each candidate
    must set the table config's constexprs."""
    unknown = [k for k in extra if k not in table]
    if unknown:
        raise KeyError(f"search_space: keys {unknown} are not in the launch table (its keys: {list(table)})")
    out = {}
    for key, fixed in table.items():
        space = [fixed]
        for cfg in extra.get(key, ()):
            if set(cfg.constexprs) != set(fixed.constexprs):
                raise ValueError(f"search_space: {key}: candidate {cfg.label()} must set the constexprs "
                                 f"{sorted(fixed.constexprs)} of the table's config")
            if cfg not in space:
                space.append(cfg)
        out[key] = tuple(space)
    return out


def table_configs(table: dict[tuple[str, int], LaunchConfig], width_of=None):
    """For the audit: a function from a variant label (``"<type name>/..."``, e.g. ``"bf16/d128/index"``)
    to the configs of ``table`` its launcher can pick: the entry of width ``width_of(label)``, or with
    ``width_of=None`` every entry of the label's dtype class."""
    def configs(variant: str) -> list[LaunchConfig]:
        cls = dtype_class(NAMED_DTYPES[variant.split("/")[0]])
        if width_of is not None:
            return [table[(cls, width_of(variant))]]
        return [cfg for (c, _), cfg in table.items() if c == cls]
    return configs


def table_keys(table: dict[tuple[str, int], LaunchConfig], width_of=None):
    """For the audit of a search space: a function from a variant label to the keys of ``table`` its
    launcher looks up (the key of width ``width_of(label)``, or every key of the label's dtype class)."""
    def keys(variant: str) -> list[tuple]:
        cls = dtype_class(NAMED_DTYPES[variant.split("/")[0]])
        return [(c, w) for c, w in table if c == cls and (width_of is None or w == width_of(variant))]
    return keys


def launchable(kernel, traced: bool = False):
    """``kernel`` to launch as ``launchable(kernel, traced)[grid](...)``: itself, or with ``traced`` wrapped by
    ``torch.library.wrap_triton``, so that a graph traced through the launch (an op's decomposition in
    ``torch.export``) holds the kernel itself, which AOTInductor compiles into its package, instead of a
    call to an op whose CUDA kernel exists only in Python. An interpreted kernel (``TRITON_INTERPRET=1``
    makes ``@triton.jit`` an ``InterpretedFunction``) is launched as it is, as torch 2.13's ``wrap_triton``
    does (torch 2.11's raises on it): the interpreter's launches run eagerly, nothing traces them."""
    if not traced or type(kernel).__name__ == "InterpretedFunction":
        return kernel
    return torch.library.wrap_triton(kernel)


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int = 0) -> int:
    """Streaming multiprocessors of a CUDA device (a small fixed number under the interpreter)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    return 4


# --------------------------------------------------------------------------------------------------
# Triton, or a stand-in on machines without it (kernels are then defined but never launched).
# --------------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover - exercised only where no triton wheel exists (macOS, Windows, aarch64)

    class _NoTritonLanguage:
        constexpr = object

    class _NoTriton:
        language = _NoTritonLanguage()

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = _NoTriton()
    tl = _NoTriton.language
