"""Run-config reading shared by the recipes: a TOML/YAML file to a mapping, and one config section to a dataclass."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from adaptermerge.errors import InputError, ParameterError


def section_from_dict(cls, values: Mapping[str, Any] | None, where: str):
    """``cls(**values)``, refusing keys that ``cls`` does not declare (named, with the known ones)."""
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ParameterError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    return cls(**values)


def read_run_file(path: str | Path) -> dict:
    """Read a run config (.toml, .yaml or .yml) into a mapping; every failure is a one-line :class:`InputError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{p}: cannot read config: {e.strerror or e}") from None
    try:
        if p.suffix == ".toml":
            raw = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raise InputError(f"{p}: a run config must be .toml, .yaml or .yml")
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{p}: cannot parse: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{p}: a run config must be a mapping")
    return raw
