"""Command-line value parsing shared by the ``merge`` and ``analyze`` commands (standard library only)."""

from __future__ import annotations

import math
from typing import Any

from .errors import ParameterError


def floats(text: str, option: str) -> list[float]:
    """Comma-separated finite numbers, e.g. ``0.5,0.3,0.2``; ParameterError naming ``option`` otherwise."""
    vals = []
    for part in text.split(","):
        part = part.strip()
        try:
            v = float(part)
        except ValueError:
            raise ParameterError(f"{option}: {part!r} is not a number") from None
        if not math.isfinite(v):
            raise ParameterError(f"{option}: {part!r} is not a finite number")
        vals.append(v)
    return vals


def one_or_many(values: list[float]) -> float | list[float]:
    """One value as a scalar, several as a list (a per-input parameter)."""
    return values[0] if len(values) == 1 else values


def operator_params(method: str, pairs: list[str] | None, flags: dict[str, Any]) -> dict[str, Any]:
    """Operator parameters from ``-p NAME=VALUE`` pairs (parsed by each parameter's declared type) and the named
    flags (``--density`` ...; None = not given). A parameter given twice is an error."""
    from .registry import parse_value

    out = {k: v for k, v in flags.items() if v is not None}
    for pair in pairs or []:
        name, sep, text = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ParameterError(f"-p {pair!r}: expected NAME=VALUE, e.g. -p density=0.5")
        if name in out:
            raise ParameterError(f"-p {name}=...: parameter {name} is given twice")
        out[name] = parse_value(method, name, text)
    return out
