"""The merge engine: validate once (a frozen :class:`MergeRequest`), plan (headers only), then merge module by
module back to low rank, into an adapter.

Per module, with ``dW_i = scale_i * B_i @ A_i`` the delta of input i (zero where an input lacks the module), the
engine asks the operator its form (:mod:`adaptermerge.protocol`) and never looks at its name:

* ``coefficients`` (linear, task_arithmetic, cat): ``dW = sum_i c_i dW_i`` is never formed; the optimal rank-R
  factors come from the stacked factors (QR + small core SVD, exact), or the factors are concatenated (cat).
* ``factors`` (tsv_m, iso_c, iso_cts, knots): the operator gets every input's scaled factors and returns low-rank
  factors, which are truncated optimally to the requested rank (by default kept whole: exact).
* ``dense`` (ties, dare_*, magnitude_prune, breadcrumbs, della*): with ``space = full`` the dense deltas of one
  module are formed, the operator runs on them, and the result is truncated back to rank R by a seeded randomized
  SVD (or an exact one), whose relative error is reported per module. With ``space = core`` the operator runs on
  the inputs' small core matrices (Core Space merging) and the result is exactly low-rank.

The default output rank keeps the merge exact wherever the merged delta is low-rank (everything but dense
operators in full space); where a truncation loses more than ``warn_loss`` of a module's delta norm, the summary
carries a warning with the figure and the ways out. Stochastic operators get a per-module seed derived from
(seed, module name), so results do not depend on module order, thread count or which other modules exist.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch

from ._version import __version__
from .adapter import (
    SCALE_FOLDED_KEY,
    Adapter,
    all_finite,
    LoraModule,
    OutputTarget,
    build_peft_config,
    load_adapter,
    resolve_output_dtype,
)
from .errors import IncompatibleInputsError, InputError, OutputError, ParameterError, option, shorten
from .lowrank import concat_factors, full_rank_factors, truncate_dense, truncate_factors
from .factorops import core_space
from .protocol import Operator
from .registry import resolve
from .safetensors_io import SafetensorsWriter, gib, memory_limit_bytes

RankSpec = int | Literal["full"] | None
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ModulePlan:
    name: str
    kind: str
    shape: tuple[int, int]
    present: tuple[int, ...]  # indices of the inputs that adapt this module
    ranks: tuple[int, ...]  # their ranks
    out_rank: int
    template: LoraModule  # key naming of the output


#: Default of ``warn_loss``: warn when a truncation loses more than 10% of a module's merged delta (Frobenius norm).
DEFAULT_WARN_LOSS = 0.1


@dataclass(frozen=True)
class MergeRequest:
    """Every option of a merge, validated once (by :meth:`build`) before any file is opened.

    ``params`` holds the operator's full resolved parameters (defaults filled in, per-input ones expanded to one
    value per input; read-only). ``plan``, ``merge`` and ``merge_to`` take this object.
    """

    operator: Operator
    n_inputs: int
    weights: tuple[float, ...]
    params: Mapping[str, Any]
    rank: RankSpec = None
    seed: int = 0
    svd: str = "randomized"
    svd_niter: int = 2
    svd_oversample: int = 8
    dtype: str | None = None
    extra_tensors: str = "identical"
    warn_loss: float = DEFAULT_WARN_LOSS
    allow_disjoint: bool = False

    @property
    def method(self) -> Operator:
        return self.operator

    @property
    def space(self) -> str:
        """Where a dense operator runs: ``full`` (dense deltas) or ``core`` (core matrices); ``-`` otherwise."""
        return str(self.params.get("space", "-"))

    @property
    def exact_low_rank(self) -> bool:
        """Whether the merged delta is low-rank (rank <= sum of input ranks) and computed exactly."""
        return self.operator.form != "dense" or self.space == "core"

    @classmethod
    def build(
        cls,
        method: str,
        n_inputs: int,
        weights: Sequence[float] | None = None,
        params: Mapping[str, Any] | None = None,
        *,
        rank: RankSpec = None,
        seed: int = 0,
        svd: str = "randomized",
        svd_niter: int = 2,
        svd_oversample: int = 8,
        dtype: str | None = None,
        extra_tensors: str = "identical",
        warn_loss: float = DEFAULT_WARN_LOSS,
        allow_disjoint: bool = False,
    ) -> "MergeRequest":
        """Check every option of a merge without touching any file; ParameterError naming the option otherwise."""
        if isinstance(n_inputs, bool) or not isinstance(n_inputs, int) or n_inputs < 1:
            raise ParameterError("need at least one input adapter")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ParameterError(f"seed must be a non-negative integer, got {shorten(seed)}")
        if seed >= 2**64:
            raise ParameterError(f"seed must be below 2^64, got {shorten(seed)}")
        if params is not None and not isinstance(params, Mapping):
            raise ParameterError(f"params must be a mapping of parameter names to values, got {shorten(params)}")
        if weights is not None and (isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, Sequence)):
            raise ParameterError(f"weights must be a list of numbers, got {shorten(weights)}")
        for label, v in [("weights", weights), *(params or {}).items()]:  # 10**400 overflows every float conversion
            for x in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(x, int) and not isinstance(x, bool) and abs(x) > 2**63:
                    raise ParameterError(f"{label}: {shorten(x)} is too large")
        if not isinstance(method, str) or len(method) > 200:  # a hostile recipe: no did-you-mean over megabytes
            raise ParameterError(f"unknown method {shorten(method)} (adaptermerge methods lists them)")
        m, w, p = resolve(method, n_inputs, weights, {**dict(params or {}), "seed": seed})
        if rank is not None and rank != "full":
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ParameterError(f"rank must be a positive integer or 'full', got {shorten(rank)}")
        if m.concat and rank is not None:
            raise ParameterError(f"method '{m.name}' is an exact concatenation (rank = sum of input ranks); "
                                 "do not pass rank")
        if not isinstance(svd, str) or svd not in ("randomized", "exact"):
            raise ParameterError(f"svd must be 'randomized' or 'exact', got {shorten(svd)}")
        if isinstance(svd_niter, bool) or not isinstance(svd_niter, int) or not 0 <= svd_niter <= MAX_SVD_NITER:
            raise ParameterError(f"svd_niter must be an integer in [0, {MAX_SVD_NITER}], got {shorten(svd_niter)}")
        if (isinstance(svd_oversample, bool) or not isinstance(svd_oversample, int)
                or not 0 <= svd_oversample <= MAX_SVD_OVERSAMPLE):
            raise ParameterError(f"svd_oversample must be an integer in [0, {MAX_SVD_OVERSAMPLE}], "
                                 f"got {shorten(svd_oversample)}")
        resolve_output_dtype(dtype, "F32")
        if not isinstance(extra_tensors, str) or extra_tensors not in ("identical", "first"):
            raise ParameterError(f"extra_tensors must be 'identical' or 'first', got {shorten(extra_tensors)}")
        if (isinstance(warn_loss, bool) or not isinstance(warn_loss, (int, float)) or not math.isfinite(warn_loss)
                or not 0 <= warn_loss <= 1):
            raise ParameterError(f"warn_loss must be a number in [0, 1] (1 = never warn), got {shorten(warn_loss)}")
        check_flag("allow_disjoint", allow_disjoint)
        frozen = {k: tuple(v) if isinstance(v, list) else v for k, v in p.items()}
        return cls(
            operator=m, n_inputs=n_inputs, weights=tuple(w), params=MappingProxyType(frozen), rank=rank, seed=seed,
            svd=svd, svd_niter=svd_niter, svd_oversample=svd_oversample, dtype=dtype, extra_tensors=extra_tensors,
            warn_loss=float(warn_loss), allow_disjoint=allow_disjoint,
        )


@dataclass
class MergePlan:
    request: MergeRequest
    out_dtype: torch.dtype
    modules: list[ModulePlan]
    extras: dict[str, tuple[int, str]]  # extra tensor key -> (input index to copy from, why)
    notes: list[str] = field(default_factory=list)
    contexts: dict[str, Any] | None = None  # model-wide operators: each module's context (first pass, cached)

    # the request's fields, for code that reads them off the plan
    method = property(lambda self: self.request.operator)
    weights = property(lambda self: list(self.request.weights))
    params = property(lambda self: dict(self.request.params))
    rank = property(lambda self: self.request.rank)
    seed = property(lambda self: self.request.seed)
    svd = property(lambda self: self.request.svd)
    svd_niter = property(lambda self: self.request.svd_niter)
    svd_oversample = property(lambda self: self.request.svd_oversample)


def retain_freed_memory() -> bool:
    """Let this process reuse the memory of freed dense deltas instead of faulting fresh pages in for every module.

    glibc serves allocations above 32 MiB (one 8192 x 2048 float32 delta is 64 MiB) with ``mmap`` and unmaps them on
    free, so an element-wise merge pays a page fault per 4 KiB of every temporary, and on virtual machines that
    costs as much as the merge itself (measured: ``ties`` 25 s of system time out of 58 s; 1 s with this). This sets
    ``M_MMAP_MAX = 0`` and a large ``M_TRIM_THRESHOLD`` for the rest of the process, so freed blocks stay in the heap
    (the process keeps its peak memory until it exits). The CLI calls it; call it yourself before big element-wise
    merges in a long-lived process if that trade suits you. Returns False (and changes nothing) off glibc.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs: nothing to tune
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1)) == 1


def _opt_extra_first() -> str:
    return option("--extra-tensors first", "extra_tensors='first'")


def _opt_method_cat() -> str:
    return option("--method cat", "method='cat'")


def _opt_rank_full() -> str:
    return option("--rank full", "rank='full'")


#: Power iterations beyond a handful change nothing measurable (2 is the default, 4-7 for slowly decaying spectra);
#: the bound keeps a shared recipe from spinning for hours.
MAX_SVD_NITER = 100
#: Extra sketch columns are capped by the module's size anyway; the bound only refuses nonsense.
MAX_SVD_OVERSAMPLE = 1 << 20


def check_flag(name: str, value: Any) -> None:
    """A yes/no option must be a real bool: ``"false"`` is a non-empty string, i.e. true, and must not replace an
    output or let NaN through."""
    if not isinstance(value, bool):
        raise ParameterError(f"{name} must be true or false, got {shorten(value)}")


def validate_options(
    method: str,
    n_inputs: int,
    weights: Sequence[float] | None,
    params: Mapping[str, Any],
    **opts: Any,
) -> MergeRequest:
    """Check every option of a merge without touching any file: :meth:`MergeRequest.build`."""
    return MergeRequest.build(method, n_inputs, weights, params, **opts)


def module_seed(seed: int, name: str) -> int:
    """A per-module seed that depends only on the global seed and the module's name."""
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def plan(
    adapters: Sequence[Adapter],
    method: "str | MergeRequest" = "linear",
    weights: Sequence[float] | None = None,
    **options: Any,
) -> MergePlan:
    """Check the inputs against each other from their headers and decide every module's output rank. Reads no
    tensor data (except non-LoRA extra tensors, compared byte for byte). ``method`` is a :class:`MergeRequest`, or
    a method name with the same arguments as :meth:`MergeRequest.build` (validated here)."""
    req = _request(method, len(adapters), weights, options)
    m, rank = req.operator, req.rank
    names = sorted({n for a in adapters for n in a.modules})
    if not req.allow_disjoint:
        _check_overlap(adapters, m, req.params)
    max_rank = max(mod.rank for a in adapters for mod in a.modules.values())
    modules: list[ModulePlan] = []
    notes: list[str] = []
    for name in names:
        present = tuple(i for i, a in enumerate(adapters) if name in a.modules)
        first = adapters[present[0]].modules[name]
        for i in present[1:]:
            other = adapters[i].modules[name]
            if other.shape != first.shape or other.kind != first.kind:
                raise IncompatibleInputsError(
                    f"module '{name}' is {first.kind} {list(first.shape)} in {adapters[present[0]].name} but "
                    f"{other.kind} {list(other.shape)} in {adapters[i].name} (adapters for different base models?)"
                )
        ranks = tuple(adapters[i].modules[name].rank for i in present)
        mm, nn = first.shape
        exact = min(sum(ranks), mm, nn)  # the rank bound of every low-rank result
        if m.concat:
            out_rank = sum(ranks)
        elif req.exact_low_rank:
            out_rank = exact if rank is None or rank == "full" else min(rank, exact)
        elif rank == "full":
            out_rank = min(mm, nn)
        else:
            out_rank = min(max_rank if rank is None else rank, mm, nn)
        _check_memory(name, first.shape, len(adapters), req, [adapters[i].modules[name] for i in present])
        modules.append(ModulePlan(name, first.kind, first.shape, present, ranks, out_rank, first))
        if len(present) < len(adapters):
            missing = [adapters[i].name for i in range(len(adapters)) if i not in present]
            notes.append(f"module '{name}' is missing from {', '.join(missing)}: treated as a zero delta there")
    dtypes = {a.dtype for a in adapters}
    in_dtype = dtypes.pop() if len(dtypes) == 1 else "F32"
    return MergePlan(
        request=req, out_dtype=resolve_output_dtype(req.dtype, in_dtype), modules=modules,
        extras=_plan_extras(adapters, req.extra_tensors), notes=notes,
    )


def _request(method: "str | MergeRequest", n_inputs: int, weights: Any, options: Mapping[str, Any]) -> MergeRequest:
    """The request of a call that passes either a :class:`MergeRequest` or a method name with its options."""
    if isinstance(method, MergeRequest):
        given = [k for k, v in options.items() if v is not None] + (["weights"] if weights is not None else [])
        if given:
            raise ParameterError(f"pass a MergeRequest alone, or a method name with options; got both ({', '.join(given)})")
        if method.n_inputs != n_inputs:
            raise ParameterError(f"the request is for {method.n_inputs} inputs but {n_inputs} adapters were given")
        return method
    opts = {k: options.pop(k) for k in list(options) if k in _REQUEST_OPTIONS}
    return MergeRequest.build(method, n_inputs, weights, options, **{k: v for k, v in opts.items() if v is not None})


_REQUEST_OPTIONS = ("rank", "seed", "svd", "svd_niter", "svd_oversample", "dtype", "extra_tensors", "warn_loss",
                    "allow_disjoint")


def _check_overlap(adapters: Sequence[Adapter], method: Operator, params: Mapping[str, Any]) -> None:
    """Refuse inputs that share no module with the others: such a "merge" combines nothing, and under linear's
    default normalisation it silently shrinks every module by its weight share. It is almost always a mistake
    (adapters of different base models, or of different target modules); ``allow_disjoint`` says it is not."""
    if len(adapters) < 2:
        return
    counts: dict[str, int] = {}
    for a in adapters:
        for n in a.modules:
            counts[n] = counts.get(n, 0) + 1
    alone = [a for a in adapters if not any(counts[n] > 1 for n in a.modules)]
    if not alone:
        return
    flag = option("--allow-disjoint", "allow_disjoint=True")
    shrink = (f"; with {method.name}'s normalisation each module would also be scaled by its input's weight share"
              if method.form == "coefficients" and params.get("normalize") else "")
    if len(alone) == len(adapters):
        sizes = ", ".join(f"{a.name}: {len(a.modules)}" for a in adapters)
        first = [next(iter(sorted(a.modules)), "-").removeprefix("base_model.model.") for a in adapters[:2]]
        raise IncompatibleInputsError(
            f"the inputs have no module in common (modules per input: {sizes}; e.g. '{first[0]}' only in "
            f"{adapters[0].name}, '{first[1]}' only in {adapters[1].name}), so there is nothing to merge: each output "
            f"module would be one input's module{shrink}. Adapters for different base models or target modules? "
            f"To put them into one adapter anyway, pass {flag}"
        )
    raise IncompatibleInputsError(
        f"{', '.join(a.name for a in alone)} {'shares' if len(alone) == 1 else 'share'} no module with the other "
        f"inputs, so {'it' if len(alone) == 1 else 'they'} would not be merged with anything{shrink}. Adapters for "
        f"another base model or other target modules? To merge anyway, pass {flag}"
    )


def _plan_extras(adapters: Sequence[Adapter], policy: str) -> dict[str, tuple[int, str]]:
    keys = sorted({k for a in adapters for k in a.extras})
    out: dict[str, tuple[int, str]] = {}
    for key in keys:
        holders = [i for i, a in enumerate(adapters) if key in a.extras]
        if policy == "first":
            out[key] = (holders[0], "copied from the first input that has it (extra_tensors='first')")
            continue
        # A saved copy of a base layer (PEFT saves the embedding when it is targeted) is base weight, not a delta:
        # copying it from whichever inputs have it is faithful when they agree. Anything else must be in every input.
        base_copy = key.endswith(".base_layer.weight")
        same = base_copy or len(holders) == len(adapters)
        if same:
            ref = adapters[holders[0]]._extra_tensor(key)
            for i in holders[1:]:
                t = adapters[i]._extra_tensor(key)
                if t.dtype != ref.dtype or t.shape != ref.shape or not torch.equal(t, ref):
                    same = False
                    break
        if not same:
            raise IncompatibleInputsError(
                f"non-LoRA tensor '{key}' (e.g. modules_to_save or trainable tokens) is not identical in every input; "
                f"full weights cannot be merged as deltas: pass {_opt_extra_first()} to copy "
                f"it from the first input that has it"
            )
        out[key] = (holders[0], "identical in every input that has it" if base_copy else "identical in every input")
    return out


def _merge_module(p: ModulePlan, mp: MergePlan, adapters: Sequence[Adapter], check_finite: bool):
    """Merged factors (B, A) with scale 1 and the relative truncation error of one module."""
    req = mp.request
    op = req.operator
    factors = {i: adapters[i].factors(p.name, check_finite=check_finite) for i in p.present}
    kwargs = {k: v for k, v in op.operator_params(req.params).items() if k != "seed"}
    if op.stochastic:
        kwargs["seed"] = module_seed(req.seed, p.name)
    if op.form == "coefficients":
        coeffs = op.coefficients(req.weights, req.params)
        bs = [factors[i][0] * coeffs[i] for i in p.present]
        as_ = [factors[i][1] for i in p.present]
        if op.concat:
            b, a = concat_factors(bs, as_)
            return b, a, 0.0
        if req.rank == "full":
            return (*full_rank_factors(torch.cat(bs, 1) @ torch.cat(as_, 0)), 0.0)
        return truncate_factors(bs, as_, p.out_rank)
    if op.form == "factors":
        if op.model_wide is not None and op.model_wide(req.params):
            kwargs["context"] = _model_contexts(mp, adapters, check_finite)[p.name]
        b, a = op.fn(_all_factors(p, factors, len(adapters)), list(req.weights), **kwargs)
        return truncate_factors([b], [a], p.out_rank)
    if req.space == "core":
        u_ref, cores, v_ref = core_space(_all_factors(p, factors, len(adapters)))
        merged = op.fn([c.float() for c in cores], list(req.weights), **kwargs)
        return truncate_factors([u_ref @ merged.double()], [v_ref], p.out_rank)
    deltas = []
    for i in range(len(adapters)):
        if i in factors:
            b, a = factors.pop(i)
            deltas.append(b @ a)
        else:
            deltas.append(torch.zeros(p.shape, dtype=torch.float32))
    merged = op.fn(deltas, list(req.weights), **kwargs)
    del deltas
    if req.rank == "full":
        return (*full_rank_factors(merged), 0.0)
    return truncate_dense(
        merged, p.out_rank, method=req.svd, niter=req.svd_niter, oversample=req.svd_oversample,
        seed=module_seed(req.seed, "svd:" + p.name),
    )


def _model_contexts(mp: MergePlan, adapters: Sequence[Adapter], check_finite: bool) -> dict[str, Any]:
    """First pass of a model-wide operator: its statistics of every module, combined into one context per module
    (computed once per plan)."""
    if mp.contexts is None:
        req = mp.request
        op = req.operator
        kwargs = {k: v for k, v in op.operator_params(req.params).items() if k != "seed"}
        stats = []
        for p in mp.modules:
            factors = {i: adapters[i].factors(p.name, check_finite=check_finite) for i in p.present}
            stats.append(op.collect(_all_factors(p, factors, len(adapters)), list(req.weights), **kwargs))
        mp.contexts = dict(zip((p.name for p in mp.modules), op.combine(stats, **kwargs)))
    return mp.contexts


def _all_factors(p: ModulePlan, factors: Mapping[int, tuple[torch.Tensor, torch.Tensor]], n_inputs: int):
    """One (B, A) pair per input, rank 0 for the inputs that lack the module."""
    m, n = p.shape
    empty = (torch.zeros(m, 0), torch.zeros(0, n))
    return [factors.get(i, empty) for i in range(n_inputs)]


def merge_module(
    module: ModulePlan, plan: MergePlan, adapters: Sequence[Adapter], *, check_finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Merge one planned module exactly as :func:`merge` does: float32 factors (B, A) with scale 1 (``B @ A`` is
    the merged delta) and the relative truncation error ``||D - B A||_F / ||D||_F``. Non-finite inputs and
    float32 overflow are reported as one-line InputErrors naming the module and the input."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with np.errstate(all="ignore"):
            return _merge_module_checked(module, plan, adapters, check_finite)
    finally:
        torch.set_num_threads(threads)


def _output_module(p: ModulePlan, rank: int, dtype: torch.dtype) -> LoraModule:
    from .safetensors_io import TORCH_TO_ST

    t = p.template
    return LoraModule(
        name=p.name, kind=t.kind, key_a=t.key_a, key_b=t.key_b, out_features=t.out_features,
        in_features=t.in_features, rank=rank, alpha=float(rank), scale=1.0, dtype=TORCH_TO_ST[dtype],
    )


#: bytes per element of an input factor, beyond its own bytes, while a module is merged: the float32 scaled copy
FACTOR_COPY_BYTES = 4
#: bytes per element of the stacked factors (sum of ranks x (m + n)): coefficients-form methods hold a weighted
#: float32 copy, the float64 stack and its float64 QR factors; cat holds the float32 concatenation; factor-form
#: methods and dense methods in core space hold float64 copies, their concatenation, its float64 QR/SVD factors and
#: the output's float64 factors (measured peaks, 4 inputs of rank 64 at 2048-8192 square: 1.2-1.4x the earlier
#: 32-byte figure, knots the highest; benchmarks in docs/reliability.md)
STACK_BYTES = {"linear": 4 + 8 + 8 + 4, "concat": 4, "factors": 6 * 8, "core": 6 * 8, "elementwise": 0}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def module_memory(shape: tuple[int, int], n_inputs: int, req: MergeRequest, modules: Sequence[LoraModule]) -> int:
    """Bytes one module's merge holds at its peak, from the headers: every input's factors as read and as scaled
    float32 copies (all inputs of the module are held together), the stacked factors of low-rank methods (float64,
    with their QR/SVD factors) or of cat, and the dense deltas of dense methods in full space (one per input plus
    about three more: result, SVD work, residual) or of an exact full-rank output (about three)."""
    m, n = shape
    op = req.operator
    kind = "core" if op.form == "dense" and req.space == "core" else op.kind
    factors = sum((m + n) * mod.rank * (_ITEMSIZE.get(mod.dtype, 4) + FACTOR_COPY_BYTES) for mod in modules)
    stacked = (m + n) * sum(mod.rank for mod in modules) * STACK_BYTES.get(kind, 4)
    dense = m * n * 4
    full_space = op.form == "dense" and req.space == "full"
    rank_full = op.form == "coefficients" and not op.concat and req.rank == "full"
    copies = n_inputs + 3 if full_space else 3 if rank_full else 0
    return factors + stacked + copies * dense


def _check_memory(name: str, shape: tuple[int, int], n_inputs: int, req: MergeRequest,
                  modules: Sequence[LoraModule] = ()) -> None:
    """Refuse, from the headers alone, a module whose merge can never fit in this machine's memory
    (:func:`module_memory`: the whole operation, not one tensor). A crafted header (two small factors of a
    10^6 x 10^6 module, or a sparse file whose factor is most of the memory) must fail here, not make the merge
    allocate what cannot exist.
    """
    need, limit = module_memory(shape, n_inputs, req, modules), memory_limit_bytes()
    full_space = req.operator.form == "dense" and req.space == "full"
    dense_part = full_space or (req.operator.form == "coefficients" and not req.operator.concat and req.rank == "full")
    if need > limit and not dense_part:
        raise InputError(
            f"module '{name}' ({shape[0]}x{shape[1]}, ranks {','.join(str(mod.rank) for mod in modules)}) needs about "
            f"{gib(need)} of memory for method '{req.operator.name}' (its factors, as read and in float32/float64 "
            f"copies), more than the {gib(limit)} this process can have"
        )
    if need > limit:
        raise InputError(
            f"module '{name}' ({shape[0]}x{shape[1]}) needs about {gib(need)} of memory for method "
            f"'{req.operator.name}'{'' if full_space else ' with rank full'} (dense deltas), more than the "
            f"{gib(limit)} this process can have; use a low-rank method (linear, factor-form, space=core) or a "
            f"machine with more memory"
        )


def _nonfinite_inputs(p: ModulePlan, adapters: Sequence[Adapter]) -> tuple[list[str], list[str], float]:
    """(inputs whose factors hold NaN/Inf, inputs whose finite factors overflow float32 in scale * B @ A,
    the largest finite |scale * B @ A| entry). Only called on an error path: recomputes the deltas by row blocks."""
    bad_factors, overflow, biggest = [], [], 0.0
    for i in p.present:
        b, a = adapters[i].factors(p.name, check_finite=False)
        if not (torch.isfinite(b).all() and torch.isfinite(a).all()):
            bad_factors.append(adapters[i].name)
            continue
        for r in range(0, b.shape[0], 1024):
            block = (b[r : r + 1024] @ a).abs()
            if not torch.isfinite(block).all():
                overflow.append(adapters[i].name)
                break
            biggest = max(biggest, float(block.max()) if block.numel() else 0.0)
    return bad_factors, overflow, biggest


def _merge_module_checked(p: ModulePlan, mp: MergePlan, adapters: Sequence[Adapter], check_finite: bool):
    """:func:`_merge_module`, with non-finite values (allowed NaN/Inf, or float32 overflow of huge factors) reported
    as one-line InputErrors naming the module and the input instead of an operator or LAPACK error."""
    try:
        b, a, err = _merge_module(p, mp, adapters, check_finite)
    except MemoryError:
        raise InputError(
            f"module '{p.name}' ({p.shape[0]}x{p.shape[1]}): out of memory while merging it with method "
            f"'{mp.method.name}' (the machine has less free memory than this module needs)"
        ) from None
    except (ParameterError, torch.linalg.LinAlgError) as e:
        bad_factors, overflow, biggest = _nonfinite_inputs(p, adapters)
        if overflow:
            raise InputError(
                f"{overflow[0]}: module '{p.name}': scale * B @ A overflows float32 (|values| > 3.4e38); "
                f"the adapter is corrupt or hostile"
            ) from None
        if bad_factors:
            step = ("magnitude selection and the SVD back to low rank need" if mp.method.form == "dense"
                    else "the SVD back to low rank needs")
            raise InputError(
                f"module '{p.name}': method '{mp.method.name}' cannot merge the NaN/Inf values of {bad_factors[0]} "
                f"(allowed by {option('--allow-nonfinite', 'allow_nonfinite=True')}): {step} finite values; use "
                f"{_opt_method_cat()}, or a linear method with {_opt_rank_full()}"
            ) from None
        if isinstance(e, torch.linalg.LinAlgError) and biggest > 1e30:  # finite, but the float32 SVD overflows
            raise InputError(
                f"module '{p.name}': the SVD back to rank {p.out_rank} overflows float32: the inputs' deltas reach "
                f"{biggest:.3g}; the adapters are corrupt or hostile"
            ) from None
        raise
    if check_finite and not (all_finite(b) and all_finite(a)):
        overflow = _nonfinite_inputs(p, adapters)[1]
        culprit = f"{overflow[0]}: " if overflow else ""
        raise InputError(f"{culprit}module '{p.name}': the merged factors overflow float32 (the inputs hold values too large to merge)")
    return b, a, err


def _cast_checked(name: str, key: str, t: torch.Tensor, dtype: torch.dtype, check_finite: bool) -> torch.Tensor:
    out = t.to(dtype).contiguous()
    if check_finite and dtype != torch.float32 and not all_finite(out):
        biggest = float(t.abs().max())
        raise OutputError(
            f"module '{name}': merged '{key}' holds values up to {biggest:.3g}, which do not fit "
            f"{str(dtype).removeprefix('torch.')} (max {torch.finfo(dtype).max:.3g}); use " + option("--dtype float32 or bfloat16", "dtype='float32' or 'bfloat16'")
        )
    return out


def _run(
    mp: MergePlan,
    adapters: Sequence[Adapter],
    emit: Callable[[str, torch.Tensor], None],
    *,
    check_finite: bool,
    progress: Progress | None,
) -> tuple[list[LoraModule], dict[str, float]]:
    """:func:`_run_modules` with torch's intra-op threads pinned to 1: MKL's QR/SVD/GEMM give different bits for
    different thread counts, and the output must be byte-identical on every machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with np.errstate(all="ignore"):  # overflow/NaN are checked explicitly and reported as one-line errors
            return _run_modules(mp, adapters, emit, check_finite=check_finite, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _run_modules(
    mp: MergePlan,
    adapters: Sequence[Adapter],
    emit: Callable[[str, torch.Tensor], None],
    *,
    check_finite: bool,
    progress: Progress | None,
) -> tuple[list[LoraModule], dict[str, float]]:
    out_modules: list[LoraModule] = []
    errors: dict[str, float] = {}
    total = len(mp.modules)
    for idx, p in enumerate(mp.modules):
        if progress:
            progress(idx, total, p.name)
        b, a, err = _merge_module_checked(p, mp, adapters, check_finite)
        mod = _output_module(p, a.shape[0], mp.out_dtype)
        emit(mod.key_a, _cast_checked(p.name, mod.key_a, a, mp.out_dtype, check_finite))
        emit(mod.key_b, _cast_checked(p.name, mod.key_b, b, mp.out_dtype, check_finite))
        out_modules.append(mod)
        errors[p.name] = err
    if progress:
        progress(total, total, "")
    return out_modules, errors


def _recorded_params(req: MergeRequest) -> dict[str, Any]:
    """The parameters an output records: all but the seed (recorded on its own) and engine options still at their
    default (an option added later must not change the bytes of outputs made without it)."""
    op = req.operator
    return {
        k: v for k, v in req.params.items()
        if k != "seed" and (op.param(k).record_default or v != op.param(k).default)
    }


def _provenance(mp: MergePlan, adapters: Sequence[Adapter], errors: Mapping[str, float]) -> dict[str, str]:
    params = _recorded_params(mp.request)
    settings = {
        "method": mp.method.name,
        "weights": mp.weights,
        "params": params,
        "seed": mp.seed,
        "rank": mp.rank,
        "svd": mp.svd if not mp.request.exact_low_rank else None,
        "svd_niter": mp.svd_niter,
        "svd_oversample": mp.svd_oversample,
        "dtype": str(mp.out_dtype).removeprefix("torch."),
    }
    inputs = [{"name": Path(a.name).name, "sha256": a.sha256()} for a in adapters]
    return {
        "format": "pt",
        SCALE_FOLDED_KEY: "true",
        "adaptermerge.version": __version__,
        "adaptermerge.method": mp.method.name,
        "adaptermerge.settings": json.dumps(settings, sort_keys=True, separators=(",", ":")),
        "adaptermerge.inputs": json.dumps(inputs, sort_keys=True, separators=(",", ":")),
        "adaptermerge.rel_errors": json.dumps({k: round(v, 9) for k, v in errors.items()}, sort_keys=True, separators=(",", ":")),
    }


def loss_warning(mp: MergePlan, errors: Mapping[str, float]) -> str | None:
    """The warning for truncations that lose more than ``warn_loss`` of a module's delta norm (None if none do)."""
    req = mp.request
    over = [e for e in errors.values() if e > req.warn_loss]
    if not over or req.warn_loss >= 1:
        return None
    errs = list(errors.values())
    ranks = sorted({p.out_rank for p in mp.modules})
    rank_text = ",".join(map(str, ranks)) if len(ranks) <= 3 else f"{ranks[0]}-{ranks[-1]}"
    ways = [option("a larger --rank", "a larger rank")]
    if req.operator.form == "dense" and req.space == "full":
        ways += [f"{_opt_rank_full()} (exact, dense factors)", option("-p space=core", "space='core'") + " (exact and low-rank)"]
    elif req.rank is not None:
        ways += [option("no --rank", "no rank") + " (the default keeps this merge exact)"]
    ways += [f"{_opt_method_cat()} (exact concatenation)"]
    return (
        f"truncating to rank {rank_text} lost more than {req.warn_loss:.0%} of the merged delta in {len(over)} of "
        f"{len(errs)} modules (relative error max {max(errs):.2f}, mean {sum(errs) / len(errs):.2f}); keep more "
        f"with {', '.join(ways[:-1])} or {ways[-1]}"
    )


def _summary(mp: MergePlan, adapters: Sequence[Adapter], out_modules: list[LoraModule], errors: Mapping[str, float], seconds: float) -> dict[str, Any]:
    errs = list(errors.values())
    warning = loss_warning(mp, errors)
    return {
        "method": mp.method.name,
        "kind": mp.method.kind,
        "form": mp.method.form,
        "weights": mp.weights,
        "params": _recorded_params(mp.request),
        "seed": mp.seed,
        "rank": mp.rank,
        "output_dtype": str(mp.out_dtype).removeprefix("torch."),
        "inputs": [
            {"name": a.name, "sha256": a.sha256(), "modules": len(a.modules), "ranks": sorted({m.rank for m in a.modules.values()}),
             "dtype": a.dtype, "notes": a.notes}
            for a in adapters
        ],
        "modules": {
            m.name: {"rank": m.rank, "shape": list(m.shape), "rel_error": errors[m.name],
                     "missing_in": [adapters[i].name for i in range(len(adapters)) if i not in p.present]}
            for m, p in zip(out_modules, mp.modules)
        },
        "n_modules": len(out_modules),
        "max_rel_error": max(errs) if errs else 0.0,
        "mean_rel_error": sum(errs) / len(errs) if errs else 0.0,
        "extra_tensors": {k: why for k, (_, why) in mp.extras.items()},
        "notes": mp.notes,
        "warnings": [warning] if warning else [],
        "seconds": round(seconds, 3),
    }


def _as_adapters(inputs: Sequence[Adapter | str | os.PathLike]) -> list[Adapter]:
    return [x if isinstance(x, Adapter) else load_adapter(x) for x in inputs]


def _open_and_plan(adapters, method, weights, params, options) -> tuple[list[Adapter], MergePlan]:
    """Validate every option (once) before any file is opened, then open the inputs' headers and plan the merge."""
    if isinstance(method, MergeRequest):
        changed = [k for k, v in options.items() if v != _DEFAULTS[k]] + [k for k in params]
        if weights is not None or changed:
            raise ParameterError(f"pass a MergeRequest alone, or a method name with options; got both "
                                 f"({', '.join((['weights'] if weights is not None else []) + changed)})")
        req = method
    else:
        req = MergeRequest.build(method, len(adapters), weights, params, **options)
    ads = _as_adapters(adapters)
    return ads, plan(ads, req)


_DEFAULTS = {"rank": None, "seed": 0, "svd": "randomized", "svd_niter": 2, "svd_oversample": 8, "dtype": None,
             "extra_tensors": "identical", "warn_loss": DEFAULT_WARN_LOSS, "allow_disjoint": False}


def _warn(summary: dict[str, Any]) -> None:
    for w in summary["warnings"]:
        warnings.warn(w, MergeLossWarning, stacklevel=3)


class MergeLossWarning(UserWarning):
    """A truncation back to low rank lost more than ``warn_loss`` of a merged delta."""


def merge(
    adapters: Sequence[Adapter | str | os.PathLike],
    method: "str | MergeRequest" = "linear",
    weights: Sequence[float] | None = None,
    *,
    rank: RankSpec = None,
    seed: int = 0,
    svd: Literal["randomized", "exact"] = "randomized",
    svd_niter: int = 2,
    svd_oversample: int = 8,
    dtype: str | None = None,
    extra_tensors: Literal["identical", "first"] = "identical",
    warn_loss: float = DEFAULT_WARN_LOSS,
    allow_nonfinite: bool = False,
    allow_disjoint: bool = False,
    progress: Progress | None = None,
    **params: Any,
) -> Adapter:
    """Merge LoRA adapters into one LoRA adapter held in memory (call ``.save(path)`` to write it).

    ``method`` is an operator name (see :func:`adaptermerge.methods`) or a :class:`MergeRequest`; ``weights`` one
    float per input (default 1.0 each); operator parameters (``density``, ``majority_sign``, ``scale``, ``space``,
    ...) are keyword arguments. ``rank`` is the output rank: by default exact wherever the merged delta is low-rank
    (rank <= sum of input ranks: linear and factor-form methods, ``space="core"``), else the largest input rank;
    ``"full"`` for an exact full-rank output. A truncation that loses more than ``warn_loss`` of a module's delta
    issues a :class:`MergeLossWarning` (also in ``summary["warnings"]``). The result's ``summary`` holds per-module
    ranks and relative truncation errors; its metadata records the provenance. Inputs that share no module with
    the other inputs are refused unless ``allow_disjoint=True``. For outputs too large to hold in memory use
    :func:`merge_to`.
    """
    t0 = time.perf_counter()
    check_flag("allow_nonfinite", allow_nonfinite)
    check_flag("allow_disjoint", allow_disjoint)
    options = dict(rank=rank, seed=seed, svd=svd, svd_niter=svd_niter, svd_oversample=svd_oversample, dtype=dtype,
                   extra_tensors=extra_tensors, warn_loss=warn_loss, allow_disjoint=allow_disjoint)
    ads, mp = _open_and_plan(adapters, method, weights, params, options)
    tensors: dict[str, torch.Tensor] = {}
    out_modules, errors = _run(mp, ads, tensors.__setitem__, check_finite=not allow_nonfinite, progress=progress)
    extras = {k: ads[i]._extra_tensor(k) for k, (i, _) in mp.extras.items()}
    tensors.update(extras)
    summary = _summary(mp, ads, out_modules, errors, time.perf_counter() - t0)
    _warn(summary)
    return Adapter(
        name=f"merge:{mp.method.name}",
        modules={m.name: m for m in out_modules},
        config=dict(ads[0].config),
        metadata=_provenance(mp, ads, errors),
        extras=extras,
        tensors=tensors,
        summary=summary,
    )


def merge_to(
    output: str | os.PathLike,
    adapters: Sequence[Adapter | str | os.PathLike],
    method: "str | MergeRequest" = "linear",
    weights: Sequence[float] | None = None,
    *,
    force: bool = False,
    rank: RankSpec = None,
    seed: int = 0,
    svd: Literal["randomized", "exact"] = "randomized",
    svd_niter: int = 2,
    svd_oversample: int = 8,
    dtype: str | None = None,
    extra_tensors: Literal["identical", "first"] = "identical",
    warn_loss: float = DEFAULT_WARN_LOSS,
    allow_nonfinite: bool = False,
    allow_disjoint: bool = False,
    progress: Progress | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Like :func:`merge` but streams each merged module to ``output`` (a PEFT directory, or a file ending in
    ``.safetensors``) so memory stays bounded by one module. The output appears atomically. Returns the summary."""
    t0 = time.perf_counter()
    check_flag("force", force)
    check_flag("allow_nonfinite", allow_nonfinite)
    check_flag("allow_disjoint", allow_disjoint)
    options = dict(rank=rank, seed=seed, svd=svd, svd_niter=svd_niter, svd_oversample=svd_oversample, dtype=dtype,
                   extra_tensors=extra_tensors, warn_loss=warn_loss, allow_disjoint=allow_disjoint)
    ads, mp = _open_and_plan(adapters, method, weights, params, options)
    inputs = [a.path for a in ads if a.path is not None]
    with OutputTarget(Path(output), force=force, inputs=inputs) as out:
        writer = SafetensorsWriter(out.weights_path, display=out.target)
        with writer:
            out_modules, errors = _run(mp, ads, writer.add, check_finite=not allow_nonfinite, progress=progress)
            for k, (i, _) in mp.extras.items():
                writer.add(k, ads[i]._extra_tensor(k))
            out.commit_weights(writer, _provenance(mp, ads, errors))
        out.write_config(build_peft_config(out_modules, ads[0].config, scale_folded=True))
    summary = _summary(mp, ads, out_modules, errors, time.perf_counter() - t0)
    _warn(summary)
    return summary
