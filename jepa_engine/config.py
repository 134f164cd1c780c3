"""Dict/JSON round trip shared by every config dataclass of the engine."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, TypeVar, Union

T = TypeVar("T", bound="ConfigIO")


class ConfigIO:
    """Mixin for dataclass configs: ``to_dict``/``from_dict``, ``to_json``/``from_json``, and named
    presets (``from_name``, ``load``) for a class that lists them in :meth:`presets`.

    JSON turns tuples into lists; ``from_dict`` turns them back for fields whose default is a tuple.
    Unknown fields are an error (a typo in a run's config must not be ignored silently).
    """

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        """Named presets: field values over the defaults (none unless the class lists some)."""
        return {}

    @classmethod
    def from_name(cls: type[T], name: str, **overrides: Any) -> T:
        """A named preset with field overrides."""
        presets = cls.presets()
        if name not in presets:
            raise ValueError(f"{cls.__name__}.from_name: name must be one of {sorted(presets)}, got {name!r}")
        return cls(**{**presets[name], **overrides})

    @classmethod
    def load(cls: type[T], name_or_file: str, **overrides: Any) -> T:
        """A preset name or a JSON file, with field overrides."""
        presets = cls.presets()
        if name_or_file in presets:
            return cls.from_name(name_or_file, **overrides)
        if not Path(name_or_file).is_file():
            raise ValueError(f"{cls.__name__}.load: config must be a preset {sorted(presets)} or a JSON file, "
                             f"got {name_or_file!r}")
        return dataclasses.replace(cls.from_json(name_or_file), **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown fields {unknown}, expected a subset of {sorted(known)}")
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
