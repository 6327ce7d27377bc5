"""The operator protocol: one declaration per merge operator.

An operator is one typed function plus one :class:`Operator` declaration, made by the :func:`operator` decorator
next to the function: its name, its papers (title, arXiv id, reference repository), its **form** and its
parameters, each declared **once** (:class:`Param`: type, default, range or choices, global or per input, a one-line
doc). The registry, validation, ``adaptermerge methods``, config keys, the CLI's ``-p NAME=VALUE`` and the
function's own keyword defaults all come from that declaration.

Forms the engine understands (it asks the operator, never its name):

* ``coefficients`` — linear in the inputs: ``fn(T, w) == sum_i c_i T_i`` with ``c_i = coefficients(w, params)``.
  The engine merges the LoRA factors exactly (QR + small core SVD), or concatenates them when ``concat`` is set.
* ``factors`` — ``fn(factors, weights, **params) -> (B, A)``: gets every input's scaled low-rank factors of one
  module (rank 0 where an input lacks the module) and returns low-rank factors; never forms an m x n matrix.
* ``dense`` — element-wise on dense deltas: ``fn(tensors, weights, **params) -> tensor``. The engine forms the
  deltas (or, with ``space = core``, the inputs' small core matrices) and factors the result back to low rank.

This module imports nothing from the rest of the package, so operators (``ops``, ``factorops``) can declare
themselves here and the registry can collect them without an import cycle.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Form", "Operator", "Paper", "Param", "REGISTRY", "SPACE", "operator"]

Form = Literal["coefficients", "factors", "dense"]
FORMS = ("coefficients", "factors", "dense")
_ARXIV = "https://arxiv.org/abs/"


@dataclass(frozen=True)
class Param:
    """One parameter of a merge operator, declared once.

    ``target = "operator"``: passed to the operator function as a keyword argument. ``target = "engine"``: read by
    the engine (for example ``space``); the function never sees it. ``record_default = False``: left out of an
    output's provenance while it has its default value (an engine option added later must not change the bytes
    of outputs made without it).
    """

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
    target: Literal["operator", "engine"] = "operator"
    record_default: bool = True

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
class Paper:
    """A reference: citation (authors, title, venue), arXiv id, reference repository (owner/name or URL)."""

    citation: str
    arxiv: str
    repo: str | None = None

    @property
    def url(self) -> str:
        return _ARXIV + self.arxiv

    def text(self) -> str:
        return f"{self.citation}, {self.url}" + (f" (code: {self.repo})" if self.repo else "")


#: The option every dense (element-wise) operator gets: where the element-wise operation runs.
SPACE = Param(
    "space", str, "full",
    "full: on the dense m x n deltas (result truncated to --rank); core: on the inputs' small core matrices in "
    "the SVD bases of the stacked factors (Core Space merging; exact low-rank result)",
    choices=("full", "core"), target="engine", record_default=False,
)


@dataclass(frozen=True)
class Operator:
    """A merge operator: the function, its form, its parameters (each declared once) and its references."""

    name: str
    fn: Callable[..., Any]
    form: Form
    params: tuple[Param, ...]
    summary: str  # one line
    papers: tuple[Paper, ...]
    coefficients_fn: Callable[[list[float], Mapping[str, Any]], list[float]] | None = None  # form coefficients
    concat: bool = False  # coefficients form: exact concatenation of the factors (rank = sum of ranks), no --rank
    check: Callable[[Mapping[str, Any]], None] | None = None  # cross-parameter constraints on resolved params
    note: str | None = None  # where the paper's recipe had to be adapted; shown by `adaptermerge methods --json`
    # Operators whose result in one module depends on every module (KnOTS' model-wide top-k): when
    # model_wide(params) is true, the engine first calls collect(factors, weights, **params) on every module, then
    # combine(statistics of every module, **params) -> one context per module, passed to fn as `context=`.
    model_wide: Callable[[Mapping[str, Any]], bool] | None = None
    collect: Callable[..., Any] | None = None
    combine: Callable[..., list[Any]] | None = None

    @property
    def paper(self) -> str:
        """Every reference as one line of text."""
        return "; ".join(p.text() for p in self.papers)

    @property
    def stochastic(self) -> bool:
        return any(p.name == "seed" for p in self.params)

    @property
    def kind(self) -> str:
        """The older name of the form: linear, concat, elementwise or factors."""
        if self.form == "coefficients":
            return "concat" if self.concat else "linear"
        return "elementwise" if self.form == "dense" else "factors"

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def operator_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments of ``fn`` among resolved ``params`` (engine-level ones left out)."""
        engine = {p.name for p in self.params if p.target == "engine"}
        return {k: v for k, v in params.items() if k not in engine}

    def coefficients(self, weights: Sequence[float], params: Mapping[str, Any]) -> list[float]:
        """c_i with ``fn(T, weights, **params) == sum_i c_i T_i`` (form ``coefficients`` only)."""
        if self.coefficients_fn is None:
            from .errors import ParameterError

            raise ParameterError(f"method '{self.name}' is {self.form}-form: it has no linear coefficients")
        full = {p.name: p.default for p in self.params}
        full.update(params)
        return self.coefficients_fn([float(x) for x in weights], full)


#: Every declared operator by name, in declaration order.
REGISTRY: dict[str, Operator] = {}


def operator(
    name: str,
    *,
    form: Form,
    summary: str,
    papers: Sequence[Paper],
    params: Sequence[Param] = (),
    coefficients: Callable[[list[float], Mapping[str, Any]], list[float]] | None = None,
    concat: bool = False,
    check: Callable[[Mapping[str, Any]], None] | None = None,
    note: str | None = None,
    model_wide: Callable[[Mapping[str, Any]], bool] | None = None,
    collect: Callable[..., Any] | None = None,
    combine: Callable[..., list[Any]] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare ``fn`` as the merge operator ``name`` and register it.

    The function lists its operator parameters as keyword-only arguments **without defaults**, in the order of
    ``params``; the decorator fills the defaults in from the declaration (the returned function's signature shows
    them), so a default is written once. Dense operators get the engine option :data:`SPACE` appended.
    """
    if form not in FORMS:
        raise ValueError(f"operator {name}: form must be one of {FORMS}, got {form!r}")
    if (form == "coefficients") != (coefficients is not None):
        raise ValueError(f"operator {name}: exactly the coefficients form declares coefficients")
    all_params = tuple(params) + ((SPACE,) if form == "dense" else ())

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        # `context` (model-wide operators only) is the engine's per-module result of `combine`, not a parameter
        kwonly = [p for p in sig.parameters.values()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY and not (p.name == "context" and model_wide)]
        declared = [p for p in all_params if p.target == "operator"]
        if [p.name for p in kwonly] != [p.name for p in declared]:
            raise TypeError(f"operator {name}: keyword-only arguments {[p.name for p in kwonly]} differ from the "
                            f"declared parameters {[p.name for p in declared]}")
        if any(p.default is not inspect.Parameter.empty for p in kwonly):
            raise TypeError(f"operator {name}: declare defaults once, in the Param, not in the signature")
        defaults = {p.name: p.default for p in declared}
        new_params = [
            p.replace(default=defaults[p.name]) if p.name in defaults else p for p in sig.parameters.values()
        ]

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            for key, value in defaults.items():
                kwargs.setdefault(key, value)
            return fn(*args, **kwargs)

        call.__signature__ = sig.replace(parameters=new_params)  # type: ignore[attr-defined]
        if name in REGISTRY:
            raise ValueError(f"operator {name} is declared twice")
        op = Operator(
            name=name, fn=call, form=form, params=all_params, summary=summary, papers=tuple(papers),
            coefficients_fn=coefficients, concat=concat, check=check, note=note, model_wide=model_wide,
            collect=collect, combine=combine,
        )
        call.operator = op  # type: ignore[attr-defined]
        REGISTRY[name] = op
        return call

    return wrap

