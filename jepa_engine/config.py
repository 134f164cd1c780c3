"""Dict/JSON round trip shared by every config dataclass of the engine, and its errors."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Iterable, TypeVar, Union

T = TypeVar("T", bound="ConfigIO")


class ConfigError(ValueError):
    """A config names a field, preset or file that does not exist (the command line reports it in one line)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'depth'?)`` for the closest of ``choices`` to ``word``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_fields(names: Iterable[str], known: Iterable[str]) -> str:
    """``"unknown fields ['dept'] (did you mean 'depth'?)"``; the known fields are listed when some name
    has no close match."""
    names, known = sorted(names), sorted(known)
    hints = [(n, difflib.get_close_matches(n, known, n=1)) for n in names]
    text = f"unknown fields {names}"
    if len(names) == 1 and hints[0][1]:
        return text + f" (did you mean {hints[0][1][0]!r}?)"
    close = [f"{close[0]!r} for {n!r}" for n, close in hints if close]
    if close:
        text += f" (did you mean {', '.join(close)}?)"
    if len(close) < len(names):
        text += f", expected a subset of {known}"
    return text


@functools.lru_cache(maxsize=None)
def _init_names(cls: type) -> frozenset[str] | None:
    """The keyword arguments ``cls.__init__`` takes (None when it takes any)."""
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) - {"self"}


class ConfigIO:
    """Mixin for dataclass configs: ``to_dict``/``from_dict``, ``to_json``/``from_json``, and named
    presets (``from_name``, ``load``) for a class that lists them in :meth:`presets`.

    JSON turns tuples into lists; ``from_dict`` turns them back for fields whose default is a tuple.
    Unknown fields are an error (a typo in a run's config must not be ignored silently): every way of
    building a config (the constructor, ``from_name``, a subclass's own preset factory, ``from_dict``,
    ``dataclasses.replace``) raises :class:`ConfigError` naming the field and the closest known one,
    where a dataclass would raise a bare ``TypeError``. The check runs in ``__new__``, which sees the
    keyword arguments before the dataclass ``__init__`` does.
    """

    def __new__(cls, *args: Any, **kwargs: Any):
        known = _init_names(cls)
        if known is not None and not known.issuperset(kwargs):
            raise ConfigError(f"{cls.__name__}: {unknown_fields(set(kwargs) - known, known)}")
        return super().__new__(cls)

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        """Named presets: field values over the defaults (none unless the class lists some)."""
        return {}

    @classmethod
    def from_name(cls: type[T], name: str, **overrides: Any) -> T:
        """A named preset with field overrides."""
        presets = cls.presets()
        if name not in presets:
            raise ConfigError(f"{cls.__name__}.from_name: name must be one of {sorted(presets)}, got {name!r}"
                              f"{did_you_mean(name, presets)}")
        return cls(**{**presets[name], **overrides})

    @classmethod
    def load(cls: type[T], name_or_file: str, **overrides: Any) -> T:
        """A preset name or a JSON file, with field overrides."""
        presets = cls.presets()
        if name_or_file in presets:
            return cls.from_name(name_or_file, **overrides)
        if not Path(name_or_file).is_file():
            hint = did_you_mean(name_or_file, presets)
            raise ConfigError(f"{cls.__name__}.load: config must be a preset {sorted(presets)} or a JSON file, "
                              f"got {name_or_file!r}{hint or ' (no such file)'}")
        return dataclasses.replace(cls.from_json(name_or_file), **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}.from_dict: expected a JSON object of fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__}.from_dict: {unknown_fields(unknown, known)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kwargs)

    def to_json(self, path: Union[str, os.PathLike, None] = None) -> str:
        """The config as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_json(cls: type[T], text_or_path: Union[str, os.PathLike]) -> T:
        """A config from JSON text, or from a file when the argument is not JSON text."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            with open(text_or_path) as f:
                text = f.read()
        return cls.from_dict(json.loads(text))
