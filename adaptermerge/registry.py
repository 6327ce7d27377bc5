"""The merge operators adaptermerge offers, validation of a call before any tensor is read, and their listing.

Every operator declares itself once, next to its function (:func:`adaptermerge.protocol.operator`, in
:mod:`adaptermerge.ops` and :mod:`adaptermerge.factorops`); this module collects those declarations. The engine
and the CLIs use it through :data:`METHODS`, :func:`get_method`, :func:`resolve`, :func:`parse_value` and
:func:`describe`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import torch

from . import factorops, ops  # noqa: F401  (importing them registers their operators)
from .errors import ParameterError, shorten
from .protocol import REGISTRY, Operator, Paper, Param

__all__ = ["Method", "METHODS", "Operator", "Paper", "Param", "describe", "get_method", "parse_value", "resolve"]

_TYPE_NAMES = {float: "float", int: "int", bool: "bool", str: "str"}

#: The older name of :class:`~adaptermerge.protocol.Operator`.
Method = Operator

#: Every operator by name, in declaration order.
METHODS: dict[str, Operator] = REGISTRY

_SEED = ops.SEED


# ----------------------------------------------------------------------------------------------------------------
# Lookup and validation
# ----------------------------------------------------------------------------------------------------------------


def get_method(name: str) -> Method:
    """The method called ``name``; ParameterError with a did-you-mean hint otherwise."""
    if isinstance(name, str) and name in METHODS:
        return METHODS[name]
    hint = ""
    if isinstance(name, str):
        close = difflib.get_close_matches(name.lower().replace("-", "_"), list(METHODS), n=1, cutoff=0.6)
        if close:
            hint = f"; did you mean '{close[0]}'?"
    raise ParameterError(f"unknown method {shorten(name)}{hint} (adaptermerge methods lists them)")


def _coerce(method: Method, p: Param, value: Any, label: str) -> Any:
    """One value of ``p`` coerced to its type and checked against its range/choices."""
    where = f"method '{method.name}': parameter {label}"
    if p.type is bool:
        if isinstance(value, bool):
            return value
        if type(value).__name__ == "bool_":  # numpy bool
            return bool(value)
        raise ParameterError(f"{where}={shorten(value)} must be true or false")
    if p.type is str:
        if not isinstance(value, str):
            raise ParameterError(f"{where}={shorten(value)} must be a string")
        if p.choices is not None and value not in p.choices:
            close = difflib.get_close_matches(value, p.choices, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ParameterError(f"{where}={shorten(value)} must be one of {', '.join(p.choices)}{hint}")
        return value
    if p.type is int:
        if isinstance(value, bool) or not isinstance(value, Integral):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ParameterError(f"{where}={shorten(value)} must be an integer")
        out_i = int(value)
        if not p.in_range(out_i):
            raise ParameterError(f"{where}={shorten(value)} is out of range {p.range_text()}")
        return out_i
    # float
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ParameterError(f"{where}={shorten(value)} must be a number")
    out = float(value)
    if not math.isfinite(out):
        raise ParameterError(f"{where}={shorten(value)} must be finite")
    if not p.in_range(out):
        raise ParameterError(f"{where}={shorten(value)} is out of range {p.range_text()}")
    return out


def _resolve_param(method: Method, p: Param, value: Any, n_inputs: int) -> Any:
    if value is None:
        value = p.default
    if p.per_input:
        if isinstance(value, (list, tuple)):
            if len(value) != n_inputs:
                raise ParameterError(
                    f"method '{method.name}': parameter {p.name} has {len(value)} values for {n_inputs} inputs "
                    "(give one value, or one per input)"
                )
            return [_coerce(method, p, v, f"{p.name}[{i}]") for i, v in enumerate(value)]
        return [_coerce(method, p, value, p.name)] * n_inputs
    if isinstance(value, (list, tuple)):
        raise ParameterError(f"method '{method.name}': parameter {p.name} takes one value, got {shorten(value)}")
    return _coerce(method, p, value, p.name)


def _resolve_weights(method: Method, n_inputs: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * n_inputs
    if isinstance(weights, torch.Tensor) or type(weights).__name__ == "ndarray":
        weights = weights.tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ParameterError(f"method '{method.name}': weights must be a list of numbers, got {shorten(weights)}")
    if len(weights) != n_inputs:
        raise ParameterError(f"method '{method.name}': got {len(weights)} weights for {n_inputs} inputs")
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(float(w)):
            raise ParameterError(f"method '{method.name}': weights[{i}]={shorten(w)} must be a finite number")
        out.append(float(w))
    return out


def resolve(
    name: str, n_inputs: int, weights: Sequence[float] | None, params: Mapping[str, Any]
) -> tuple[Method, list[float], dict[str, Any]]:
    """Validate a method call before any tensor is read.

    Returns the method, the weights (default all 1.0) and the full parameter dict: defaults filled in for
    missing or ``None`` values, values coerced to the parameter type (int -> float is fine, bools are strict),
    per-input parameters expanded to a list of ``n_inputs`` values. ``seed`` is accepted by every method and
    only kept (as an int) for stochastic ones, so ``method.fn(tensors, weights, **params)`` is always a valid
    call. Every problem raises ParameterError with a one-line message naming the parameter and value.
    """
    method = get_method(name)
    if isinstance(n_inputs, bool) or not isinstance(n_inputs, Integral) or n_inputs < 1:
        raise ParameterError(f"method '{method.name}': need at least one input, got {shorten(n_inputs)}")
    names = {p.name for p in method.params}
    for key in params:
        if key == "seed" and not method.stochastic:
            continue
        if key not in names:
            valid = f"valid: {', '.join(p.name for p in method.params)}" if names else "it takes no parameters"
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ParameterError(f"method '{method.name}' has no parameter {shorten(key)}{hint} ({valid})")
    if not method.stochastic and params.get("seed") is not None:
        _coerce(method, _SEED, params["seed"], "seed")  # accepted and ignored, but still a valid seed
    w = _resolve_weights(method, int(n_inputs), weights)
    resolved = {p.name: _resolve_param(method, p, params.get(p.name), int(n_inputs)) for p in method.params}
    if method.check is not None:
        try:
            method.check(resolved)
        except ParameterError as e:
            raise ParameterError(f"method '{method.name}': {str(e).split(': ', 1)[-1]}") from None
    if method.coefficients_fn is not None:  # e.g. linear's normalisation of weights that sum to 0
        try:
            method.coefficients(w, resolved)
        except ParameterError as e:
            raise ParameterError(f"method '{method.name}': {str(e).split(': ', 1)[-1]}") from None
    return method, w, resolved


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def parse_value(name: str, param: str, text: str) -> Any:
    """The value of parameter ``param`` of method ``name`` from command-line text (``-p NAME=VALUE``).

    Numbers and booleans (true/false, yes/no, on/off, 1/0) are parsed by the parameter's declared type; a
    per-input parameter takes one value or a comma-separated list of one value per input. The result is then
    checked by :func:`resolve` like any other value.
    """
    method = get_method(name)
    try:
        p = method.param(param)
    except KeyError:
        if param == "seed":
            raise ParameterError(f"-p {param}=...: the seed is an option of its own: use --seed") from None
        names = [q.name for q in method.params]
        close = difflib.get_close_matches(param, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        valid = f"valid: {', '.join(names)}" if names else "it takes no parameters"
        raise ParameterError(f"method '{method.name}' has no parameter {shorten(param)}{hint} ({valid})") from None
    parts = [x.strip() for x in text.split(",")] if p.per_input else [text.strip()]
    values = [_parse_one(method, p, x) for x in parts]
    return values[0] if len(values) == 1 else values


def _parse_one(method: Operator, p: Param, text: str) -> Any:
    where = f"method '{method.name}': parameter {p.name}"
    if p.type is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ParameterError(f"{where}={shorten(text)} must be true or false")
    if p.type is str:
        return text
    try:
        return int(text) if p.type is int else float(text)
    except ValueError:
        kind = "an integer" if p.type is int else "a number"
        raise ParameterError(f"{where}={shorten(text)} must be {kind}") from None


def describe() -> list[dict[str, Any]]:
    """Every operator as plain data (for ``adaptermerge methods`` and its ``--json``), from its declaration."""
    out = []
    for m in METHODS.values():
        out.append(
            {
                "name": m.name,
                "form": m.form,
                "kind": m.kind,
                "summary": m.summary,
                "paper": m.paper,
                "papers": [{"citation": p.citation, "arxiv": p.arxiv, "url": p.url, "repo": p.repo} for p in m.papers],
                "note": m.note,
                "stochastic": m.stochastic,
                "params": [
                    {
                        "name": p.name,
                        "type": _TYPE_NAMES[p.type],
                        "default": p.default,
                        "range": p.range_text(),
                        "choices": list(p.choices) if p.choices else None,
                        "per_input": p.per_input,
                        "help": p.help,
                    }
                    for p in m.params
                ],
            }
        )
    return out
