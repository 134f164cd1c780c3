"""Checkpoints: safetensors for tensors, JSON for everything else; nothing executes on load.

A checkpoint of step ``s`` in a run folder is two files::

    ckpt-{s:08d}.safetensors     every tensor (model, target model, optimizer state, RNG states)
    ckpt-{s:08d}.json            {"format", "step", "sha256", "tensors_file", "meta": {...}}

Both are written atomically (a temp file in the same folder, flush + fsync, ``os.replace``; the files get
the mode of any file the process creates, 0666 less the umask) and the JSON is written LAST, carrying the
sha256 of the safetensors file: a checkpoint is complete exactly when its JSON exists, and
:func:`load_checkpoint` refuses a tensors file whose hash does not match. A process killed while writing
leaves at most a temp file or a tensors file without its JSON (neither is a checkpoint; later saves
remove them), so the newest complete checkpoint is always intact.

A damaged newest checkpoint (truncated, corrupted, its tensors file missing) is never skipped:
:func:`latest_checkpoint`, :func:`load_checkpoint` of a folder and :func:`resume_checkpoint` raise
:class:`CheckpointError` naming the file, what is wrong with it, and the newest intact checkpoint before
it (the way out: move or delete the damaged files). Pruning (``keep_last``) never deletes the checkpoint
just written.

Step numbering: checkpoint ``s`` holds the state after ``s`` training steps; training logs and
``metrics.jsonl`` rows use the same count (row ``"step": s`` describes the ``s``-th step).

The helpers flatten training state into that format and back:

- modules: ``{prefix}{name}`` for every entry of ``state_dict()``;
- AdamW (any ``torch.optim`` optimizer): tensors ``{prefix}state/{param index}/{key}``, param groups and
  non-tensor state values as JSON;
- RNG states: torch CPU / CUDA generator states as uint8 tensors, numpy's MT19937 key as a uint32-valued
  int64 tensor, python ``random`` state as JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

FORMAT = "jepa_engine.checkpoint/1"          # the on-disk format's name and version (not a module path)
_NAME = re.compile(r"^ckpt-(\d{8,})\.json$")
_TENSORS_NAME = re.compile(r"^ckpt-(\d{8,})\.safetensors$")
_TMP_NAME = re.compile(r"^\.ckpt-\d{8,}\.(json|safetensors)\.[^.]+\.tmp$")
PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupted or does not match its metadata."""


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def checkpoint_paths(directory: PathLike, step: int) -> tuple[Path, Path]:
    """(tensors file, JSON file) of step ``step`` in ``directory``."""
    d = Path(directory)
    return d / f"ckpt-{step:08d}.safetensors", d / f"ckpt-{step:08d}.json"


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new hidden temp file next to ``path``, created with mode 0666 less the umask (the mode of any
    file the process writes, e.g. config.json; ``tempfile.mkstemp`` would give 0600)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees either the old file or all of the new one."""
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # Make the rename itself durable.
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write a small text file (config, metrics) atomically: readers see the old or the new content."""
    _atomic_write(Path(path), text.encode())


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    out, seen = {}, set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"save_checkpoint: tensors[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and (ptr in seen or t.untyped_storage().nbytes() != t.nbytes):
            t = t.clone()  # safetensors refuses tensors that share memory
            ptr = t.untyped_storage().data_ptr()
        if t.numel():
            seen.add(ptr)
        out[name] = t
    return save(out)


def save_checkpoint(directory: PathLike, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    keep_last: Optional[int] = None) -> Path:
    """Write checkpoint ``step`` to ``directory`` atomically; keep the newest ``keep_last`` (None = all).

    ``meta`` must be JSON-serialisable. Returns the path of the JSON file (the checkpoint's name).
    """
    if not (isinstance(step, int) and step >= 0):
        raise ValueError(f"save_checkpoint: step must be an int >= 0, got {step!r}")
    if keep_last is not None and not (isinstance(keep_last, int) and keep_last >= 1):
        raise ValueError(f"save_checkpoint: keep_last must be None or an int >= 1, got {keep_last!r}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors_path, json_path = checkpoint_paths(d, step)
    blob = _safetensors_bytes(tensors)
    try:
        header = json.dumps({"format": FORMAT, "step": step, "tensors_file": tensors_path.name,
                             "sha256": hashlib.sha256(blob).hexdigest(), "nbytes": len(blob), "meta": meta},
                            indent=1, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_checkpoint: meta must be JSON-serialisable (finite floats), got {e}") from e
    # A re-save of the same step first invalidates the old JSON, so no reader pairs it with new tensors.
    if json_path.exists():
        json_path.unlink()
    _atomic_write(tensors_path, blob)
    _atomic_write(json_path, header)
    if keep_last is not None:
        prune_checkpoints(d, keep_last, keep=step)
    _remove_leftovers(d, step)
    return json_path


def _remove_leftovers(directory: Path, step: int) -> None:
    """Delete what an interrupted writer left behind: temp files, and tensors files of steps before
    ``step`` that have no JSON (a killed save or prune). One process writes a run folder's checkpoints."""
    for name in os.listdir(directory):
        m = _TENSORS_NAME.match(name)
        if _TMP_NAME.match(name) or (m and int(m.group(1)) < step
                                     and not checkpoint_paths(directory, int(m.group(1)))[1].exists()):
            (directory / name).unlink(missing_ok=True)


def remove_checkpoints(directory: PathLike) -> None:
    """Delete every checkpoint in ``directory``: the JSON files first (so none is left half-valid), then
    every tensors file and the temp files of an interrupted save. What a fresh run that replaces an
    earlier one in the same folder calls before it writes anything."""
    for _, json_path in list_checkpoints(directory):
        json_path.unlink(missing_ok=True)
    d = Path(directory)
    if d.is_dir():
        for name in os.listdir(d):
            if _TMP_NAME.match(name) or _TENSORS_NAME.match(name):
                (d / name).unlink(missing_ok=True)


def list_checkpoints(directory: PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a JSON file) as (step, JSON path), oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), d / name) for name in os.listdir(d) if (m := _NAME.match(name))]
    return sorted(found)


def prune_checkpoints(directory: PathLike, keep_last: int, keep: Optional[int] = None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, JSON first (so none is left half-valid).

    ``keep`` (the step just written) is never deleted, even when checkpoints with higher steps exist.
    """
    if not (isinstance(keep_last, int) and keep_last >= 1):
        raise ValueError(f"prune_checkpoints: keep_last must be an int >= 1, got {keep_last!r}")
    for step, json_path in list_checkpoints(directory)[:-keep_last]:
        if step == keep:
            continue
        tensors_path, _ = checkpoint_paths(directory, step)
        json_path.unlink(missing_ok=True)
        tensors_path.unlink(missing_ok=True)


def latest_checkpoint(directory: PathLike, verify: bool = True) -> Optional[Path]:
    """The newest complete checkpoint in ``directory`` (its JSON path), or None when there is none.

    With ``verify`` (default) its files are checked as :func:`load_checkpoint` checks them; a damaged
    newest checkpoint raises :class:`CheckpointError` naming the file, what is wrong, and the newest
    intact checkpoint before it. It is never skipped silently: whatever resumes or loads from the folder
    would lose the steps since that earlier checkpoint without a word.
    """
    found = list_checkpoints(directory)
    if not found:
        return None
    step, json_path = found[-1]
    if verify:
        try:
            _read_verified(json_path)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; it is the newest checkpoint in {directory} and is not skipped: "
                                  f"{_way_out(directory, found)}") from e
    return json_path


def _way_out(directory: PathLike, found: list[tuple[int, Path]]) -> str:
    step, json_path = found[-1]
    damaged = f"{json_path.name} and {checkpoint_paths(directory, step)[0].name}"
    for prev_step, prev in reversed(found[:-1]):
        try:
            _read_verified(prev)
        except CheckpointError:
            continue
        return f"move or delete {damaged} to continue from the newest intact one, {prev} (step {prev_step})"
    return (f"no earlier checkpoint there is intact; move or delete {damaged} and start a new run "
            f"(without --resume)")


def resume_checkpoint(directory: PathLike, verify: bool = True) -> Path:
    """The checkpoint a resumed run continues from: the newest complete one in ``directory``.

    Raises :class:`CheckpointError` with what is wrong and what to do when the folder does not exist,
    holds no complete checkpoint, or (with ``verify``) its newest checkpoint is damaged.
    """
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"resume: run folder {d} does not exist, so there is nothing to resume; start a "
                              f"new run (without --resume) or name the folder of an existing run")
    latest = latest_checkpoint(d, verify=verify)
    if latest is None:
        raise CheckpointError(f"resume: run folder {d} holds no complete checkpoint (ckpt-*.json), so there is "
                              f"nothing to resume; start a new run (without --resume)")
    return latest


def trim_metrics(path: PathLike, through_step: int) -> list[dict]:
    """Keep the rows of ``path`` (JSON lines) with ``"step" <= through_step``; returns them.

    A resumed run calls it with the step of its checkpoint: the rows an interrupted run logged after
    that checkpoint describe steps that are trained again, and would otherwise appear twice. A line cut
    short by a kill ends the file. The file is rewritten atomically; a missing file stays missing.
    """
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= through_step:
            rows.append(row)
    atomic_write_text(p, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _read_verified(json_path: Path) -> tuple[dict, bytes]:
    try:
        header = json.loads(json_path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {json_path}: file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {json_path}: the JSON is truncated or corrupted ({e})") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {json_path}: format must be {FORMAT!r}, got "
                              f"{header.get('format') if isinstance(header, dict) else type(header).__name__!r}")
    tensors_path = json_path.parent / header["tensors_file"]
    try:
        blob = tensors_path.read_bytes()
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {json_path}: tensors file {tensors_path} is missing") from e
    if len(blob) != header["nbytes"]:
        raise CheckpointError(f"checkpoint {tensors_path}: expected {header['nbytes']} bytes, got {len(blob)} "
                              f"(truncated or overwritten)")
    digest = hashlib.sha256(blob).hexdigest()
    if digest != header["sha256"]:
        raise CheckpointError(f"checkpoint {tensors_path}: sha256 must be {header['sha256']} (from {json_path.name}), "
                              f"got {digest} (corrupted)")
    return header, blob


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint: ``path`` is its JSON file, its tensors file, or a run folder (its newest).

    Returns ``(tensors, meta)``; ``meta["step"]`` is the step. Raises :class:`CheckpointError` naming the
    file when it is missing, truncated, corrupted, or its hash does not match the JSON (for a folder:
    when its newest checkpoint is, see :func:`latest_checkpoint`).
    """
    from safetensors.torch import load

    p = Path(path)
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(f"checkpoint folder {p}: no complete checkpoint (ckpt-*.json) found")
        p = latest
    elif p.suffix == ".safetensors":
        p = p.with_suffix(".json")
    header, blob = _read_verified(p)
    try:
        tensors = load(blob)
    except Exception as e:  # safetensors raises its own error type on a malformed header
        raise CheckpointError(f"checkpoint {p.parent / header['tensors_file']}: not a valid safetensors file ({e})") from e
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    meta = dict(header["meta"])
    meta["step"] = header["step"]
    return tensors, meta


# --------------------------------------------------------------------------------------------------
# Flatten / unflatten training state
# --------------------------------------------------------------------------------------------------
def module_tensors(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Every entry of ``module.state_dict()`` under ``prefix``."""
    return {prefix + k: v for k, v in module.state_dict().items()}


def load_module_tensors(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Load the ``prefix`` entries into ``module`` (strict: names must match exactly)."""
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint: module {prefix!r} must match the model, got missing {missing[:4]} "
                              f"and unexpected {unexpected[:4]}")


def optimizer_state(optimizer: torch.optim.Optimizer, prefix: str = "optim/") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON meta) of ``optimizer.state_dict()``: state tensors flattened, param groups as JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}state/{idx}/{key}"] = v
            else:
                scalars.setdefault(str(idx), {})[key] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars, "tuples": _tuple_keys(sd["param_groups"])}


def _tuple_keys(groups) -> list[str]:
    return sorted({k for g in groups for k, v in g.items() if isinstance(v, tuple)})


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                         prefix: str = "optim/") -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, v in tensors.items():
        if name.startswith(prefix + "state/"):
            idx, key = name[len(prefix) + len("state/"):].split("/", 1)
            state.setdefault(int(idx), {})[key] = v
    for idx, st in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    tuples = set(meta.get("tuples", ()))
    groups = [{k: (tuple(v) if k in tuples else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state(prefix: str = "rng/") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON meta) of every RNG: torch CPU and CUDA generators, numpy, python ``random``."""
    tensors = {f"{prefix}torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{prefix}torch_cuda/{i}"] = s
    kind, key, pos, has_gauss, cached = np.random.get_state()
    tensors[f"{prefix}numpy_key"] = torch.from_numpy(key.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(internal), "gauss_next": gauss_next}}
    return tensors, meta


def load_rng_state(tensors: dict[str, torch.Tensor], meta: dict, prefix: str = "rng/") -> None:
    torch.set_rng_state(tensors[f"{prefix}torch_cpu"].to(torch.uint8))
    cuda = sorted((int(k.rsplit("/", 1)[1]), v) for k, v in tensors.items() if k.startswith(f"{prefix}torch_cuda/"))
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        torch.cuda.set_rng_state_all([v.to(torch.uint8) for _, v in cuda[:n]])
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors[f"{prefix}numpy_key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))

