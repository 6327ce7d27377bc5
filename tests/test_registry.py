"""Method registry: lookup, validation before any tensor is read, coefficients, describe()."""

from __future__ import annotations

import json

import pytest
import torch

from adaptermerge import factorops, ops, registry
from adaptermerge.errors import ParameterError
from adaptermerge.registry import METHODS, describe, get_method, resolve

EXPECTED = {
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs", "della",
    "della_linear", "cat", "tsv_m", "iso_c", "iso_cts", "knots",
}
DENSE = {"ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs", "della", "della_linear"}


def test_methods_listed_with_their_operators():
    assert set(METHODS) == EXPECTED
    for name, m in METHODS.items():
        assert m.name == name
        module = factorops if m.form == "factors" else ops
        assert m.fn is getattr(module, name) and m.fn.operator is m
        assert m.stochastic == ("seed" in {p.name for p in m.params})
        assert "arxiv.org/abs/" in m.paper and all(p.arxiv and p.citation for p in m.papers)
        assert "\n" not in m.summary
        assert ({p.name for p in m.params if p.target == "engine"} == {"space"}) == (m.form == "dense")
    assert {m for m, v in METHODS.items() if v.form == "coefficients"} == {"linear", "task_arithmetic", "cat"}
    assert {m for m, v in METHODS.items() if v.form == "dense"} == DENSE
    assert {m for m, v in METHODS.items() if v.form == "factors"} == {"tsv_m", "iso_c", "iso_cts", "knots"}
    assert [m for m, v in METHODS.items() if v.concat] == ["cat"]
    assert {m for m, v in METHODS.items() if v.stochastic} == {"dare_linear", "dare_ties", "della", "della_linear",
                                                               "knots"}
    assert METHODS["knots"].papers[0].repo == "gstoica27/KnOTS"


def test_param_defaults_match_the_operator_signatures():
    """Defaults are declared once (in the Param); the function's signature shows exactly those."""
    import inspect

    for m in METHODS.values():
        sig = inspect.signature(m.fn)
        declared = {p.name: p.default for p in m.params if p.target == "operator"}
        accepted = {k: v.default for k, v in sig.parameters.items()
                    if v.kind is inspect.Parameter.KEYWORD_ONLY and k != "context"}  # context: model-wide ops' pass
        assert declared == accepted, m.name
        assert ("context" in sig.parameters) == (m.model_wide is not None)
        assert inspect.signature(inspect.unwrap(m.fn)).parameters.keys() == sig.parameters.keys()
        assert all(v.default is inspect.Parameter.empty for k, v in inspect.signature(inspect.unwrap(m.fn)).parameters.items()
                   if v.kind is inspect.Parameter.KEYWORD_ONLY and k != "context"), m.name


def test_a_default_written_twice_is_refused():
    from adaptermerge.protocol import Paper, Param, operator

    with pytest.raises(TypeError, match="declare defaults once"):
        @operator("twice_test", form="dense", summary="s", papers=(Paper("c", "0000.00000"),),
                  params=(Param("x", float, 1.0, "h"),))
        def twice(tensors, weights=None, *, x=1.0):
            return tensors[0]
    with pytest.raises(TypeError, match="differ from the declared"):
        @operator("missing_test", form="dense", summary="s", papers=(Paper("c", "0000.00000"),),
                  params=(Param("x", float, 1.0, "h"),))
        def missing(tensors, weights=None, *, y):
            return tensors[0]
    assert "twice_test" not in METHODS and "missing_test" not in METHODS


def test_parse_value_uses_the_declared_type():
    assert registry.parse_value("ties", "density", "0.5") == 0.5
    assert registry.parse_value("ties", "density", "0.5, 0.25") == [0.5, 0.25]
    assert registry.parse_value("ties", "normalize", "no") is False
    assert registry.parse_value("ties", "space", "core") == "core"
    assert registry.parse_value("iso_cts", "common_fraction", "0.6") == 0.6
    with pytest.raises(ParameterError, match=r"parameter scale='x' must be a number"):
        registry.parse_value("ties", "scale", "x")
    with pytest.raises(ParameterError, match=r"parameter normalize='maybe' must be true or false"):
        registry.parse_value("ties", "normalize", "maybe")
    with pytest.raises(ParameterError, match=r"has no parameter 'densty'; did you mean 'density'"):
        registry.parse_value("ties", "densty", "0.5")


def test_unknown_method_did_you_mean():
    with pytest.raises(ParameterError, match=r"^unknown method 'tie'; did you mean 'ties'\? \(adaptermerge methods lists them\)$"):
        get_method("tie")
    with pytest.raises(ParameterError, match=r"did you mean 'dare_ties'"):
        resolve("dare-ties", 2, None, {})
    with pytest.raises(ParameterError, match=r"^unknown method 'zzz' \(adaptermerge methods lists them\)$"):
        get_method("zzz")


def test_resolve_fills_defaults_and_expands_per_input():
    m, w, p = resolve("ties", 3, None, {"density": None, "seed": 5})
    assert m is METHODS["ties"]
    assert w == [1.0, 1.0, 1.0]
    assert p == {"density": [0.2, 0.2, 0.2], "majority_sign": "total", "normalize": True, "scale": 1.0, "space": "full"}
    _, w, p = resolve("dare_ties", 2, [1, 2], {"density": [0.3, 1], "seed": 7, "scale": 2})
    assert w == [1.0, 2.0] and all(isinstance(x, float) for x in w)
    assert p["density"] == [0.3, 1.0] and isinstance(p["density"][1], float)
    assert p["seed"] == 7 and p["scale"] == 2.0 and isinstance(p["scale"], float)
    assert resolve("cat", 2, None, {"seed": 3})[2] == {}


def test_resolved_params_call_the_operator():
    """The resolved parameters reach the operator: a non-default value of each changes the result exactly as
    calling the function with that keyword does, and the defaults equal a bare call."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)]
    fs = [(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)) for _ in range(2)]
    other = {"density": 0.37, "scale": 1.7, "majority_sign": "frequency", "normalize": False, "rescale": False,
             "gamma": 0.05, "epsilon": 0.05, "alpha": 0.6, "common_fraction": 0.5, "merge": "dare_ties", "seed": 3}
    for name, m in METHODS.items():
        arg = fs if m.form == "factors" else xs
        _, w, p = resolve(name, 2, [0.6, 0.9], {"seed": 1})
        kw = m.operator_params(p)
        base = m.fn(arg, w, **kw)
        assert _same(base, m.fn(arg, w, **({"seed": 1} if m.stochastic else {}))), name  # defaults = a bare call
        for q in m.params:
            if q.target != "operator" or q.name not in other:
                continue
            extra = {}  # knots: at density 1 DARE keeps everything; rescale and seed act only in its dare_ties
            if name == "knots" and q.name in ("merge", "rescale", "seed"):
                extra = {"density": 0.5, **({} if q.name == "merge" else {"merge": "dare_ties"})}
            _, w2, p2 = resolve(name, 2, [0.6, 0.9], {"seed": 1, q.name: other[q.name], **extra})
            got = m.fn(arg, w2, **m.operator_params(p2))
            want = m.fn(arg, w, **{**kw, q.name: other[q.name], **extra})
            assert _same(got, want), (name, q.name)
            assert not _same(got, m.fn(arg, w, **{**kw, **extra})), (name, q.name)  # the parameter does something


def _same(x, y) -> bool:
    if isinstance(x, tuple):
        return all(torch.equal(a, b) for a, b in zip(x, y))
    return torch.equal(x, y)


@pytest.mark.parametrize(
    "name,params,weights,message",
    [
        ("ties", {"densty": 0.3}, None, r"method 'ties' has no parameter 'densty'; did you mean 'density'\? \(valid: density, majority_sign, normalize, scale, space\)"),
        ("ties", {"space": "cor"}, None, r"parameter space='cor' must be one of full, core; did you mean 'core'\?"),
        ("knots", {"merge": "linear"}, None, r"parameter merge='linear' must be one of ties, dare_ties"),
        ("iso_cts", {"common_fraction": 0.0}, None, r"parameter common_fraction=0.0 is out of range \(0, 1\]"),
        ("linear", {"density": 0.3}, None, r"method 'linear' has no parameter 'density' \(valid: normalize\)"),
        ("cat", {"scale": 2.0}, None, r"method 'cat' has no parameter 'scale' \(it takes no parameters\)"),
        ("ties", {"density": 0.0}, None, r"method 'ties': parameter density=0.0 is out of range \(0, 1\]"),
        ("ties", {"density": 1.01}, None, r"parameter density=1.01 is out of range \(0, 1\]"),
        ("ties", {"density": [0.5, 1.5]}, None, r"parameter density\[1\]=1.5 is out of range \(0, 1\]"),
        ("ties", {"density": [0.5, 0.5, 0.5]}, None, r"parameter density has 3 values for 2 inputs"),
        ("ties", {"density": "0.5"}, None, r"parameter density='0.5' must be a number"),
        ("ties", {"density": float("nan")}, None, r"parameter density=nan must be finite"),
        ("ties", {"scale": float("inf")}, None, r"parameter scale=inf must be finite"),
        ("ties", {"scale": [1.0, 2.0]}, None, r"parameter scale takes one value"),
        ("ties", {"majority_sign": "totl"}, None, r"majority_sign='totl' must be one of total, frequency; did you mean 'total'\?"),
        ("ties", {"normalize": "yes"}, None, r"parameter normalize='yes' must be true or false"),
        ("ties", {"normalize": 1}, None, r"parameter normalize=1 must be true or false"),
        ("dare_ties", {"seed": -1}, None, r"parameter seed=-1 is out of range \[0, inf\)"),
        ("dare_ties", {"seed": 1.5}, None, r"parameter seed=1.5 must be an integer"),
        ("dare_ties", {"seed": True}, None, r"parameter seed=True must be an integer"),
        ("linear", {"seed": -3}, None, r"parameter seed=-3 is out of range"),
        ("breadcrumbs", {"gamma": 1.0}, None, r"parameter gamma=1.0 is out of range \[0, 1\)"),
        ("breadcrumbs", {"gamma": 0.2}, None, r"method 'breadcrumbs': gamma \+ density must be <= 1, got 0.2 \+ 0.9"),
        ("breadcrumbs", {"gamma": 0.2, "density": [0.5, 0.9]}, None, r"gamma \+ density\[1\] must be <= 1"),
        ("della", {"epsilon": -0.1}, None, r"parameter epsilon=-0.1 is out of range \[0, inf\)"),
        ("della", {"epsilon": 0.8}, None, r"method 'della': density \+ epsilon/2 must be <= 1, got 0.7 \+ 0.8/2"),
        ("della_linear", {"density": 0.1, "epsilon": 0.4}, None, r"method 'della_linear': density - epsilon/2 must be > 0"),
        ("ties", {}, [1.0], r"method 'ties': got 1 weights for 2 inputs"),
        ("ties", {}, [1.0, float("inf")], r"weights\[1\]=inf must be a finite number"),
        ("ties", {}, [1.0, "2"], r"weights\[1\]='2' must be a finite number"),
        ("ties", {}, "1,2", r"weights must be a list of numbers"),
        ("linear", {}, [1.0, -1.0], r"method 'linear': the weights sum to 0"),
    ],
)
def test_resolve_errors(name, params, weights, message):
    with pytest.raises(ParameterError, match=message):
        resolve(name, 2, weights, params)


def test_resolve_accepts_edges():
    assert resolve("ties", 1, None, {"density": 1})[2]["density"] == [1.0]
    assert resolve("breadcrumbs", 2, None, {"gamma": 0.1, "density": 0.9})[2]["gamma"] == 0.1
    assert resolve("della", 2, None, {"density": 0.5, "epsilon": 0.99})[2]["epsilon"] == 0.99
    assert resolve("linear", 2, [1.0, -1.0], {"normalize": False})[1] == [1.0, -1.0]
    assert resolve("dare_linear", 2, None, {"seed": 2**40})[2]["seed"] == 2**40
    with pytest.raises(ParameterError, match="need at least one input"):
        resolve("ties", 0, None, {})


def test_coefficients():
    lin = METHODS["linear"]
    assert lin.coefficients([1.0, 3.0], {"normalize": True}) == [0.25, 0.75]
    assert lin.coefficients([1.0, 3.0], {"normalize": False}) == [1.0, 3.0]
    assert lin.coefficients([2.0, 2.0], {}) == [0.5, 0.5]  # default normalize
    assert METHODS["task_arithmetic"].coefficients([1.0, -0.5], {"scale": 2.0}) == [2.0, -1.0]
    assert METHODS["cat"].coefficients([0.3, 0.7], {}) == [0.3, 0.7]
    with pytest.raises(ParameterError, match="no linear coefficients"):
        METHODS["ties"].coefficients([1.0, 1.0], {})


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "cat"])
def test_coefficients_reproduce_the_operator_exactly(name):
    xs = [torch.randn(6, 7) for _ in range(3)]
    m, w, p = resolve(name, 3, [0.7, -0.2, 0.9], {"scale": 1.7} if name == "task_arithmetic" else {})
    c = m.coefficients(w, p)
    expected = (xs[0] * torch.tensor(c[0], dtype=torch.float32))
    for x, ci in zip(xs[1:], c[1:]):
        expected = expected + x * torch.tensor(ci, dtype=torch.float32)
    assert torch.equal(m.fn(xs, w, **p), expected)


def test_describe_is_json_and_complete():
    info = describe()
    json.dumps(info)
    assert [d["name"] for d in info] == list(METHODS)
    ties = next(d for d in info if d["name"] == "ties")
    assert ties["kind"] == "elementwise" and ties["stochastic"] is False
    density = next(p for p in ties["params"] if p["name"] == "density")
    assert density == {
        "name": "density", "type": "float", "default": 0.2, "range": "(0, 1]", "choices": None, "per_input": True,
        "help": density["help"],
    }
    majority = next(p for p in ties["params"] if p["name"] == "majority_sign")
    assert majority["choices"] == ["total", "frequency"] and majority["range"] is None
    gamma = next(p for p in next(d for d in info if d["name"] == "breadcrumbs")["params"] if p["name"] == "gamma")
    assert gamma["range"] == "[0, 1)"
    assert next(d for d in info if d["name"] == "cat")["params"] == []


def test_param_range_text():
    P = registry.Param
    assert P("x", float, 0.0, "h").range_text() is None
    assert P("x", float, 0.0, "h", low=0.0).range_text() == "[0, inf)"
    assert P("x", float, 0.0, "h", high=2.5, high_inclusive=False).range_text() == "(-inf, 2.5)"


def test_architecture_doc_shows_the_real_code_of_an_operator():
    """docs/architecture.md shows iso_c's declaration and function as they are in the source."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "architecture.md").read_text()
    block = doc.split("## Adding an operator", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    source = (root / "adaptermerge" / "factorops.py").read_text()
    for part in block.split("\n\n\n"):
        assert part.strip() in source, part[:80]
