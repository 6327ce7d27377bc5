"""The merge methods adaptermerge offers, their parameters, and validation before any tensor is read.

The engine and the CLI use this module only through :data:`METHODS`, :func:`get_method`, :func:`resolve`,
:meth:`Method.coefficients` and :func:`describe`. The operators themselves live in :mod:`adaptermerge.ops`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Literal

import torch

from . import ops
from .errors import ParameterError, option

__all__ = ["Method", "METHODS", "Param", "describe", "get_method", "resolve"]

_TYPE_NAMES = {float: "float", int: "int", bool: "bool", str: "str"}


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method."""

    name: str
    type: type  # float | int | bool | str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    choices: tuple[str, ...] | None = None
    per_input: bool = False  # may be given as one value per input

    def range_text(self) -> str | None:
        """Interval notation of the allowed range, e.g. ``(0, 1]``; None when unbounded."""
        if self.low is None and self.high is None:
            return None
        left = "(-inf" if self.low is None else ("[" if self.low_inclusive else "(") + _num(self.low)
        right = "inf)" if self.high is None else _num(self.high) + ("]" if self.high_inclusive else ")")
        return f"{left}, {right}"

    def in_range(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive)):
            return False
        if self.high is not None and (value > self.high or (value == self.high and not self.high_inclusive)):
            return False
        return True


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass(frozen=True)
class Method:
    """A merge method: the operator, what kind of combination it is, and its parameters."""

    name: str
    fn: Callable[..., torch.Tensor]  # the ops.py function
    kind: Literal["linear", "elementwise", "concat"]
    params: tuple[Param, ...]
    summary: str  # one line
    paper: str  # citation with arXiv id / URL
    stochastic: bool = False  # takes `seed`
    check: Callable[[Mapping[str, Any]], None] | None = None  # cross-parameter constraints (resolved params)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def coefficients(self, weights: list[float], params: dict) -> list[float]:
        """c_i with ``fn(T, weights, **params) == sum_i c_i T_i`` (kinds linear and concat only).

        ``linear``: ``w_i / sum(w)`` if normalize else ``w_i``; ``task_arithmetic``: ``scale * w_i``;
        ``cat``: ``w_i``. The ops compute exactly these coefficients (float64, rounded to float32 once).
        """
        w = [float(x) for x in weights]
        if self.name == "linear":
            return ops.linear_coefficients(w, bool(params.get("normalize", self.param("normalize").default)))
        if self.name == "task_arithmetic":
            scale = float(params.get("scale", self.param("scale").default))
            return [scale * x for x in w]
        if self.name == "cat":
            return w
        raise ParameterError(f"method '{self.name}' is {self.kind}: it has no linear coefficients")


# ----------------------------------------------------------------------------------------------------------------
# Parameter definitions
# ----------------------------------------------------------------------------------------------------------------


def _density(default: float, what: str) -> Param:
    return Param(
        "density", float, default, f"fraction of each input's entries {what}; one value or one per input",
        low=0.0, high=1.0, low_inclusive=False, per_input=True,
    )


_SCALE = Param("scale", float, 1.0, "multiplies the merged result (the lambda of task arithmetic)")
_NORMALIZE_TIES = Param(
    "normalize", bool, True, "divide each entry by the sum of |weight| of the inputs agreeing with the elected sign"
)
_MAJORITY = Param(
    "majority_sign", str, "total",
    "sign election: 'total' = sign of the sum of weighted values, 'frequency' = sign of the sum of their signs",
    choices=("total", "frequency"),
)
_RESCALE = Param("rescale", bool, True, "multiply kept entries by 1/keep-probability (unbiased)")
_SEED = Param("seed", int, 0, "random seed (PCG64 stream per input); equal seeds give byte-identical results",
              low=0)
_GAMMA = Param("gamma", float, 0.01, "fraction of largest-magnitude entries dropped as outliers",
               low=0.0, high=1.0, high_inclusive=False)
_EPSILON = Param("epsilon", float, 0.1,
                 "width of the keep-probability ramp: density -+ epsilon/2 for the smallest/largest entries",
                 low=0.0)


def _check_breadcrumbs(p: Mapping[str, Any]) -> None:
    ops.check_breadcrumbs("breadcrumbs", p["density"], p["gamma"])


def _make_della_check(name: str) -> Callable[[Mapping[str, Any]], None]:
    def check(p: Mapping[str, Any]) -> None:
        ops.check_della(name, p["density"], p["epsilon"])

    return check


_ARXIV = "https://arxiv.org/abs/"
_TIES_PAPER = (
    "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023, " + _ARXIV + "2306.01708"
)
_DARE_PAPER = "Yu et al., Language Models are Super Mario (DARE), ICML 2024, " + _ARXIV + "2311.03099"
_DELLA_PAPER = (
    "Deep et al., DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling, 2024, "
    + _ARXIV + "2406.11617"
)
_TA_PAPER = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023, " + _ARXIV + "2212.04089"

_ALL: tuple[Method, ...] = (
    Method(
        "linear", ops.linear, "linear",
        (Param("normalize", bool, True, "divide by the sum of the weights (weighted average)"),),
        "weighted average sum_i w_i dW_i / sum_i w_i (exact, computed in low-rank form)",
        "Wortsman et al., Model soups, ICML 2022, " + _ARXIV + "2203.05482",
    ),
    Method(
        "task_arithmetic", ops.task_arithmetic, "linear", (_SCALE,),
        "scale * sum_i w_i dW_i, negative weights allowed (exact, computed in low-rank form)",
        _TA_PAPER,
    ),
    Method(
        "ties", ops.ties, "elementwise",
        (_density(0.2, "kept by magnitude"), _MAJORITY, _NORMALIZE_TIES, _SCALE),
        "trim each delta to its top-k magnitudes, elect a sign per entry, average the agreeing inputs",
        _TIES_PAPER,
    ),
    Method(
        "dare_linear", ops.dare_linear, "elementwise",
        (_density(0.5, "kept at random"), _RESCALE, _SCALE, _SEED),
        "drop entries at random (keep prob. density), rescale by 1/density, weighted sum",
        _DARE_PAPER, stochastic=True,
    ),
    Method(
        "dare_ties", ops.dare_ties, "elementwise",
        (_density(0.5, "kept at random"), _MAJORITY, _RESCALE, _NORMALIZE_TIES, _SCALE, _SEED),
        "DARE random drop and rescale, then TIES sign election and disjoint merge",
        _DARE_PAPER + "; " + _TIES_PAPER, stochastic=True,
    ),
    Method(
        "magnitude_prune", ops.magnitude_prune, "elementwise",
        (_density(0.2, "kept by magnitude"), _SCALE),
        "keep each delta's top-k magnitudes, weighted sum (TIES without sign election)",
        _TIES_PAPER + " (trim step)",
    ),
    Method(
        "breadcrumbs", ops.breadcrumbs, "elementwise",
        (_density(0.9, "kept after the outliers"), _GAMMA, _SCALE),
        "drop the largest (gamma) and the smallest magnitudes of each delta, weighted sum",
        "Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, ECCV 2024, "
        + _ARXIV + "2312.06795",
        check=_check_breadcrumbs,
    ),
    Method(
        "della", ops.della, "elementwise",
        (_density(0.7, "kept on average"), _EPSILON, _MAJORITY, _RESCALE, _NORMALIZE_TIES, _SCALE, _SEED),
        "drop entries with probability falling with magnitude rank (MagPrune), then TIES election and merge",
        _DELLA_PAPER, stochastic=True, check=_make_della_check("della"),
    ),
    Method(
        "della_linear", ops.della_linear, "elementwise",
        (_density(0.7, "kept on average"), _EPSILON, _RESCALE, _SCALE, _SEED),
        "DELLA's MagPrune drop, then weighted sum (no sign election)",
        _DELLA_PAPER, stochastic=True, check=_make_della_check("della_linear"),
    ),
    Method(
        "cat", ops.cat, "concat", (),
        "exact concatenation of the weighted LoRA factors, rank = sum of ranks (= sum_i w_i dW_i)",
        "Prabhakar et al., LoRA Soups, 2024, " + _ARXIV + "2410.13025",
    ),
)

#: Every method by name.
METHODS: dict[str, Method] = {m.name: m for m in _ALL}


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
    raise ParameterError(f"unknown method {name!r}{hint} (adaptermerge methods lists them)")


def _coerce(method: Method, p: Param, value: Any, label: str) -> Any:
    """One value of ``p`` coerced to its type and checked against its range/choices."""
    where = f"method '{method.name}': parameter {label}"
    if p.type is bool:
        if isinstance(value, bool):
            return value
        if type(value).__name__ == "bool_":  # numpy bool
            return bool(value)
        raise ParameterError(f"{where}={value!r} must be true or false")
    if p.type is str:
        if not isinstance(value, str):
            raise ParameterError(f"{where}={value!r} must be a string")
        if p.choices is not None and value not in p.choices:
            close = difflib.get_close_matches(value, p.choices, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ParameterError(f"{where}={value!r} must be one of {', '.join(p.choices)}{hint}")
        return value
    if p.type is int:
        if isinstance(value, bool) or not isinstance(value, Integral):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ParameterError(f"{where}={value!r} must be an integer")
        out_i = int(value)
        if not p.in_range(out_i):
            raise ParameterError(f"{where}={value!r} is out of range {p.range_text()}")
        return out_i
    # float
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ParameterError(f"{where}={value!r} must be a number")
    out = float(value)
    if not math.isfinite(out):
        raise ParameterError(f"{where}={value!r} must be finite")
    if not p.in_range(out):
        raise ParameterError(f"{where}={value!r} is out of range {p.range_text()}")
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
        raise ParameterError(f"method '{method.name}': parameter {p.name} takes one value, got {value!r}")
    return _coerce(method, p, value, p.name)


def _resolve_weights(method: Method, n_inputs: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * n_inputs
    if isinstance(weights, torch.Tensor) or type(weights).__name__ == "ndarray":
        weights = weights.tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ParameterError(f"method '{method.name}': weights must be a list of numbers, got {weights!r}")
    if len(weights) != n_inputs:
        raise ParameterError(f"method '{method.name}': got {len(weights)} weights for {n_inputs} inputs")
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(float(w)):
            raise ParameterError(f"method '{method.name}': weights[{i}]={w!r} must be a finite number")
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
        raise ParameterError(f"method '{method.name}': need at least one input, got {n_inputs!r}")
    names = {p.name for p in method.params}
    for key in params:
        if key == "seed" and not method.stochastic:
            continue
        if key not in names:
            valid = f"valid: {', '.join(p.name for p in method.params)}" if names else "it takes no parameters"
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ParameterError(f"method '{method.name}' has no parameter {key!r}{hint} ({valid})")
    if not method.stochastic and params.get("seed") is not None:
        _coerce(method, _SEED, params["seed"], "seed")  # accepted and ignored, but still a valid seed
    w = _resolve_weights(method, int(n_inputs), weights)
    resolved = {p.name: _resolve_param(method, p, params.get(p.name), int(n_inputs)) for p in method.params}
    if method.check is not None:
        try:
            method.check(resolved)
        except ParameterError as e:
            raise ParameterError(f"method '{method.name}': {str(e).split(': ', 1)[-1]}") from None
    if method.name == "linear" and resolved["normalize"]:
        if math.fsum(w) == 0.0:
            raise ParameterError("method 'linear': the weights sum to 0, so they cannot be normalized "
                                 f"(pass {option('--no-normalize', 'normalize=False')}, or use task_arithmetic)")
    return method, w, resolved


def describe() -> list[dict[str, Any]]:
    """Every method as plain data (for ``adaptermerge methods`` and its ``--json``)."""
    out = []
    for m in _ALL:
        out.append(
            {
                "name": m.name,
                "kind": m.kind,
                "summary": m.summary,
                "paper": m.paper,
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
