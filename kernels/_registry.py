"""The kernels the audit compiles ahead of time (filled by each op module as it is imported), and
the reader of their argument lists that types each variant's signature.

An op module describes each of its Triton kernels once with :func:`register_kernel`: the kernel, the
types of its runtime arguments (Triton signature strings such as ``"*fp16"`` or ``"i32"``) for each
dtype variant it is launched with, and every launch config (constexprs + ``num_warps`` /
``num_stages``) its launcher or autotuner can pick. The argument types come from the kernel's own
argument list (:func:`signature`): an op names only the exceptions to "a pointer holds the variant's
storage type, anything else is an ``i32``". ``python -m jepa_engine.kernels.audit`` compiles
every (kernel, variant, config) for sm_90a and sm_80 and reads registers, spills, shared memory and
tensor-core instructions from the cubin.

A kernel may also declare a ``search_space``: for each key of its launch table, the candidate configs
the tuner (``python -m jepa_engine.kernels.tuning``) times on a GPU, the table's own config first. A
tuned file (``kernels/configs/<device>.json``, read by ``kernels/_configs.py``) can only pick one of
these candidates, and ``audit --search-space`` compiles them all.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional


@dataclass(frozen=True)
class LaunchConfig:
    """One launch config a kernel can run with: its constexprs and the warp/stage counts."""

    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2

    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in self.constexprs.items()]
        return ",".join(parts + [f"w{self.num_warps}", f"s{self.num_stages}"])

    def __hash__(self) -> int:  # the constexprs dict is unhashable: hash what label() shows
        return hash((tuple(self.constexprs.items()), self.num_warps, self.num_stages))

    def to_json(self) -> dict:
        return {"constexprs": dict(self.constexprs), "num_warps": self.num_warps, "num_stages": self.num_stages}


def key_label(key: tuple) -> str:
    """A launch-table key as written in a tuned configs file: ``("16bit", 64)`` -> ``"16bit/64"``; the
    empty key of a kernel with one config -> ``"default"``."""
    return "/".join(str(k) for k in key) if key else "default"


@dataclass(frozen=True)
class KernelSpec:
    """A Triton kernel as the audit sees it.

    ``variants`` maps a label (usually the dtype) to ``(signature, constexprs)``: the signature gives
    the Triton type of every runtime argument, the constexprs are the switches fixed for that variant.
    ``configs`` lists every launch config the launcher can pick (a callable receives the variant label
    when the configs depend on it). ``uses_tensor_cores`` says whether HMMA/HGMMA are expected.
    ``search_space`` maps each launch-table key (the key the launcher looks up, ``()`` for a kernel
    with one config) to its candidate configs, the table's config first (``_launch.search_space``
    builds it); empty: the kernel is not tuned.
    """

    name: str
    fn: Any
    variants: dict[str, tuple[dict[str, str], dict[str, Any]]]
    configs: list[LaunchConfig] | Callable[[str], list[LaunchConfig]]
    uses_tensor_cores: bool = False
    targets: tuple[int, ...] = field(default=(90, 80))
    # Runtime arguments the launcher guarantees 16-divisible (16-byte aligned pointers, strides that are
    # multiples of 16): compiled with the same ``tt.divisibility=16`` specialization Triton applies at launch.
    aligned_args: tuple[str, ...] = ()
    search_space: Mapping[tuple, tuple[LaunchConfig, ...]] = field(default_factory=dict)
    # The search-space keys a variant's launches look up (``_launch.table_keys``); None: every key whose
    # table config the variant is launched with.
    search_keys: Optional[Callable[[str], list[tuple]]] = None

    def configs_for(self, variant: str) -> list[LaunchConfig]:
        return self.configs(variant) if callable(self.configs) else list(self.configs)

    def search_keys_for(self, variant: str) -> list[tuple]:
        if self.search_keys is not None:
            return list(self.search_keys(variant))
        fixed = self.configs_for(variant)
        return [k for k, space in self.search_space.items() if space and space[0] in fixed]

    def search_configs_for(self, variant: str) -> list[LaunchConfig]:
        """The search space's candidates a tuned file could give this variant's launches, beyond
        :meth:`configs_for`: those of every key the variant's launches look up."""
        fixed = self.configs_for(variant)
        out: list[LaunchConfig] = []
        for key in self.search_keys_for(variant):
            out += [c for c in self.search_space[key][1:] if c not in fixed and c not in out]
        return out


KERNELS: dict[str, KernelSpec] = {}


def register_kernel(spec: KernelSpec) -> KernelSpec:
    KERNELS[spec.name] = spec
    return spec


def python_function(kernel: Any) -> Callable:
    """The Python function under a kernel object: through an Autotuner or Heuristics wrapper and the
    ``JITFunction`` (compiled) or ``InterpretedFunction`` (``TRITON_INTERPRET=1``); a plain function
    (no Triton installed) is returned as is."""
    fn = kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def runtime_args(kernel: Any) -> list[str]:
    """The kernel's runtime arguments (every argument not annotated ``tl.constexpr``), in order."""
    params = inspect.signature(python_function(kernel)).parameters.values()
    return [p.name for p in params if "constexpr" not in str(p.annotation)]


def signature(kernel: Any, pointer: Optional[str] = None, types: Optional[Mapping[str, str]] = None
              ) -> dict[str, str]:
    """The Triton type of each runtime argument of ``kernel``, read from its own argument list.

    ``types[name]`` where given; otherwise a pointer argument (a name ending in ``_ptr``) holds
    ``pointer`` (the variant's storage type, e.g. ``"*bf16"``; with ``pointer=None`` every pointer must
    be in ``types``) and any other argument (sizes, strides, offsets) is ``"i32"``: float scalars are
    listed in ``types``. A name in ``types`` that is not a runtime argument raises, so renaming a
    kernel argument fails here instead of auditing a stale signature.
    """
    types = types or {}
    args = runtime_args(kernel)
    name = python_function(kernel).__name__
    unknown = sorted(set(types) - set(args))
    if unknown:
        raise KeyError(f"signature: {name} has no runtime arguments {unknown} (it has {args})")
    untyped = [a for a in args if a not in types and a.endswith("_ptr") and pointer is None]
    if untyped:
        raise KeyError(f"signature: {name}: pointers {untyped} need a type (pass pointer= or list them in types)")
    return {a: types.get(a, pointer if a.endswith("_ptr") else "i32") for a in args}
