"""Diagnostics of LoRA deltas before merging them: size, agreement, sign conflicts, spectra, shared subspaces,
and a preview of what a merge method keeps of each input. Computed from the factors, never from dense deltas
(except a merge preview of an element-wise method, which needs the dense merged module, as ``merge`` does).

Per module, with ``D_i = scale_i * B_i @ A_i`` the delta of input i (``B_i`` is (m, r_i), ``A_i`` is (r_i, n)):

* **Norms and cosines.** ``<D_i, D_j> = sum((B_i^T B_j) * (A_i A_j^T))``; ``||D_i|| = sqrt(<D_i, D_i>)``;
  ``cos(D_i, D_j) = <D_i, D_j> / (||D_i|| ||D_j||)``. Cost O((m + n) r^2).
* **Spectra.** QR of the stacked factors, ``[B_1 .. B_N] = Q_B R_B`` and ``[A_1; ..; A_N]^T = Q_A R_A``, puts
  every delta in one small coordinate system: ``D_i = Q_B (R_B[:, i] R_A[:, i]^T) Q_A^T`` and the sum
  ``sum_i D_i = Q_B (R_B R_A^T) Q_A^T``. The SVD of each small core gives the exact singular values of the delta
  and its singular vectors in (Q_B, Q_A) coordinates; inner products carry over because Q_B, Q_A are orthonormal.
* **Effective rank** (Roy & Vetterli 2007): ``exp(H(p))`` with ``p_k = s_k / sum_l s_l`` over the non-zero
  singular values; 1 for a rank-1 delta, r for r equal singular values, 0 for a zero delta.
* **Subspace overlap** of two deltas: ``||U_a^T U_b||_F^2 / k`` with ``U`` their top-k left singular vectors
  (``k`` = the smaller numerical rank, or ``subspace_k``); same with right singular vectors. 1 = same subspace,
  0 = orthogonal; two random k-dimensional subspaces of R^m overlap by about k/m.
* **Sign conflicts.** The entries that matter to input i are its top ``top_k_fraction`` entries by magnitude
  (``|x| >= t_i`` with ``t_i`` the k-th largest ``|x|``, ``k = floor(f * numel + 0.5)``; zero entries never
  count). For a pair (a, b): among the entries that matter to a or to b, the fraction where ``x_a * x_b < 0``.
  Unrelated deltas give about 0.5, identical ones 0. The entries are a seeded uniform sample (with replacement)
  of ``samples`` positions (i, j) per module, each value computed exactly as ``B[i, :] . A[:, j]``; thresholds
  are the sample's own quantiles. A module with at most ``samples`` entries is enumerated in full (exact, standard
  error 0). The standard error is the binomial one by the plus-four rule, ``sqrt(p~ (1 - p~) / (n + 4))`` with
  ``p~ = (conflicts + 2) / (n + 4)`` and n the sampled entries that matter, with a Wilson 95% interval.
* **Merge preview.** The merged module as :func:`adaptermerge.merge` produces it (same method, weights, params,
  rank and seed; linear methods in the small core space above, element-wise ones with the engine's own dense
  per-module merge and seeded truncation), then for each input: ``projection = <M, D_i> / ||D_i||^2`` (how much
  of D_i, in units of D_i, is in the merge: 1 = all of it, 0 = none), ``cosine = cos(M, D_i)`` and
  ``norm_ratio = ||M|| / ||D_i||`` (so projection = cosine * norm_ratio).

Aggregates over a layer, a module type or the whole adapter are those of the concatenated deltas (sums of inner
products over modules); sign-conflict rates are pooled with each module weighted by its estimated number of
entries that matter (stratified estimate, standard errors combined accordingly).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .adapter import PEFT_PREFIX, Adapter, load_adapter
from .engine import module_seed
from .errors import IncompatibleInputsError, InputError, ParameterError
from .ops import density_to_k

if TYPE_CHECKING:
    from .engine import MergePlan, ModulePlan

__all__ = [
    "DEFAULT_SAMPLES",
    "ModuleInfo",
    "Preview",
    "analyze",
    "check_options",
    "check_preview",
    "conflict_stats",
    "effective_rank",
    "entry_values",
    "factor_cores",
    "group_keys",
    "inner_products",
    "pairwise_cosine",
    "sample_positions",
    "spectrum",
    "subspace_overlap",
    "wilson_interval",
]

#: Entries sampled per module for the sign statistics (modules with at most this many entries are enumerated).
DEFAULT_SAMPLES = 1 << 15
Z95 = 1.959963984540054
Progress = Callable[[int, int, str], None]


# ------------------------------------------------------------------------------------------------ modules
@dataclass(frozen=True)
class ModuleInfo:
    """One module adapted by at least one input: its shape, which inputs have it, its layer and type."""

    name: str
    shape: tuple[int, int]
    present: tuple[int, ...]
    layer: str
    type: str

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


NO_LAYER = "(no layer)"


def group_keys(name: str) -> tuple[str, str]:
    """(layer, type) of a module name: the name up to its first numeric component, and its last component.

    ``base_model.model.model.layers.3.self_attn.q_proj`` -> (``model.layers.3``, ``q_proj``); a name without a
    numeric component (an embedding, a head) is in layer ``"(no layer)"``.
    """
    key = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1]), parts[-1]
    return NO_LAYER, parts[-1]


def layer_sort_key(layer: str) -> tuple[int, str, int]:
    if layer == NO_LAYER:
        return (1, "", 0)
    prefix, _, idx = layer.rpartition(".")
    return (0, prefix, int(idx))


def align_modules(adapters: Sequence[Adapter]) -> list[ModuleInfo]:
    """Every module of any input, sorted by name, with the inputs that adapt it; shapes must agree."""
    names = sorted({n for a in adapters for n in a.modules})
    out: list[ModuleInfo] = []
    for name in names:
        present = tuple(i for i, a in enumerate(adapters) if name in a.modules)
        first = adapters[present[0]].modules[name]
        for i in present[1:]:
            other = adapters[i].modules[name]
            if other.shape != first.shape:
                raise IncompatibleInputsError(
                    f"module '{name}' is {list(first.shape)} in {adapters[present[0]].name} but {list(other.shape)} "
                    f"in {adapters[i].name} (adapters for different base models?)"
                )
        layer, typ = group_keys(name)
        out.append(ModuleInfo(name, first.shape, present, layer, typ))
    return out


# ------------------------------------------------------------------------------------------------ pure algebra
def inner_products(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor]) -> np.ndarray:
    """Gram matrix ``G[i, j] = <B_i A_i, B_j A_j>`` (float64) without forming any product B_i A_i.

    One Gram of the stacked factors: ``G[i, j] = sum((B_i^T B_j) * (A_i A_j^T))`` read off its (i, j) blocks.
    """
    n = len(bs)
    if n == 0:
        return np.zeros((0, 0))
    b = torch.cat([x.double() for x in bs], dim=1)
    a = torch.cat([x.double() for x in as_], dim=0)
    prod = ((b.T @ b) * (a @ a.T)).numpy()
    edges = np.cumsum([0] + [x.shape[1] for x in bs])
    g = np.empty((n, n))
    for i in range(n):
        for j in range(i, n):
            g[i, j] = g[j, i] = prod[edges[i]:edges[i + 1], edges[j]:edges[j + 1]].sum()
    return g


def factor_cores(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Small cores ``C_i`` with ``B_i A_i = Q_B C_i Q_A^T`` for one pair of orthonormal bases, and ``sum_i C_i``.

    ``Q_B R_B = [B_1 .. B_N]`` and ``Q_A R_A = [A_1; ..; A_N]^T`` (reduced QR, float64); ``C_i = R_B[:, i] R_A[:, i]^T``
    where ``[:, i]`` is input i's block of columns. The cores have the deltas' singular values, inner products and
    (in Q coordinates) singular vectors. Cost O((m + n) R^2) with R the sum of the ranks.
    """
    b = torch.cat([x.double() for x in bs], dim=1)
    a = torch.cat([x.double() for x in as_], dim=0)
    _, rb = torch.linalg.qr(b)
    _, ra = torch.linalg.qr(a.T)
    cores: list[torch.Tensor] = []
    start = 0
    for x in bs:
        stop = start + x.shape[1]
        cores.append(rb[:, start:stop] @ ra[:, start:stop].T)
        start = stop
    return cores, rb @ ra.T


@dataclass(frozen=True)
class Spectrum:
    """Singular values (descending, numerically non-zero only) and the matching singular vectors of a core."""

    values: np.ndarray
    left: torch.Tensor  # (p, k) orthonormal columns, in Q_B coordinates
    right: torch.Tensor  # (q, k) orthonormal columns, in Q_A coordinates


def spectrum(core: torch.Tensor, shape: tuple[int, int]) -> Spectrum:
    """SVD of a core, keeping the singular values above ``s_max * max(m, n) * eps(float64)``.

    ``shape`` is the (m, n) shape of the delta the core stands for (it sets the tolerance, as numpy's matrix_rank).
    """
    if core.numel() == 0:
        return Spectrum(np.zeros(0), core.new_zeros((core.shape[0], 0)), core.new_zeros((core.shape[1], 0)))
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    sv = s.numpy()
    tol = (sv[0] if sv.size else 0.0) * max(shape) * np.finfo(np.float64).eps
    k = int(np.count_nonzero(sv > tol)) if sv.size and sv[0] > 0 else 0
    return Spectrum(sv[:k].copy(), u[:, :k], vh[:k].T)


def effective_rank(values: np.ndarray) -> float:
    """Entropy effective rank ``exp(-sum p log p)``, ``p = s / sum(s)`` over the positive singular values; 0 if none."""
    s = np.asarray(values, dtype=np.float64)
    s = s[s > 0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(math.exp(-float(np.sum(p * np.log(p)))))


def subspace_overlap(u: torch.Tensor, v: torch.Tensor, k: int) -> float | None:
    """``||U[:, :k]^T V[:, :k]||_F^2 / k`` for orthonormal columns U, V; None when k is 0."""
    if k <= 0:
        return None
    m = u[:, :k].T @ v[:, :k]
    return float((m * m).sum()) / k


def sample_positions(shape: tuple[int, int], samples: int, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Row and column indices of the entries to evaluate, and whether they are the whole matrix.

    At most ``samples`` entries: the whole matrix in row-major order (exact); otherwise ``samples`` positions drawn
    uniformly with replacement from a PCG64 stream seeded with ``seed``.
    """
    m, n = shape
    if m * n <= samples:
        idx = np.arange(m * n, dtype=np.int64)
        return idx // n, idx % n, True
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, m, n])))
    return rng.integers(0, m, samples, dtype=np.int64), rng.integers(0, n, samples, dtype=np.int64), False


def entry_values(b: torch.Tensor, a: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``(B @ A)[rows[s], cols[s]]`` for every s, computed as ``B[rows[s], :] . A[:, cols[s]]`` (float64)."""
    bt = b.double().numpy()
    at = a.double().T.contiguous().numpy()  # (n, r): one contiguous row per column of A
    return np.einsum("ij,ij->i", bt[rows], at[cols])


def important_mask(values: np.ndarray, fraction: float) -> np.ndarray:
    """Entries among the ``floor(fraction * N + 0.5)`` largest ``|x|`` of ``values`` (ties at the threshold all
    included), excluding zeros."""
    mag = np.abs(values)
    k = density_to_k(fraction, mag.size)
    if k == 0:
        return np.zeros(mag.size, dtype=bool)
    t = np.partition(mag, mag.size - k)[mag.size - k]
    return (mag >= t) & (mag > 0)


@dataclass
class ConflictCounts:
    """Sign-conflict counts of one module over one set of evaluated entries."""

    n_sampled: int
    exact: bool
    important: dict[tuple[int, int], int]  # pair -> entries that matter to a or b
    conflicts: dict[tuple[int, int], int]  # pair -> of those, entries with opposite signs
    important_all: int = 0  # entries that matter to any input
    conflicts_all: int = 0  # of those, entries where the inputs' non-zero signs are mixed


def conflict_stats(values: Mapping[int, np.ndarray], fraction: float, *, exact: bool) -> ConflictCounts:
    """Pairwise and all-input sign-conflict counts from the values of each present input at the same entries."""
    idx = sorted(values)
    n = values[idx[0]].size if idx else 0
    masks = {i: important_mask(values[i], fraction) for i in idx}
    signs = {i: np.sign(values[i]) for i in idx}
    cc = ConflictCounts(n_sampled=n, exact=exact, important={}, conflicts={})
    for x, a in enumerate(idx):
        for b in idx[x + 1:]:
            union = masks[a] | masks[b]
            cc.important[(a, b)] = int(np.count_nonzero(union))
            cc.conflicts[(a, b)] = int(np.count_nonzero(union & (signs[a] * signs[b] < 0)))
    if len(idx) >= 2:
        union = np.logical_or.reduce([masks[i] for i in idx])
        pos = np.logical_or.reduce([signs[i] > 0 for i in idx])
        neg = np.logical_or.reduce([signs[i] < 0 for i in idx])
        cc.important_all = int(np.count_nonzero(union))
        cc.conflicts_all = int(np.count_nonzero(union & pos & neg))
    return cc


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (the whole [0, 1] when n is 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def plus_four_variance(successes: int, n: int) -> float:
    """Variance of a sampled proportion by the plus-four rule: ``p~ (1 - p~) / (n + 4)``, ``p~ = (x + 2) / (n + 4)``.

    Unlike the plug-in ``p (1 - p) / n`` it does not collapse to 0 when few or no conflicts are sampled.
    """
    pt = (successes + 2) / (n + 4)
    return pt * (1 - pt) / (n + 4)


def _rate(conf: int, imp: int, exact: bool) -> dict[str, Any]:
    """Rate, standard error (plus-four) and Wilson 95% interval of one module's conflict count."""
    if imp == 0:
        return {"rate": None, "se": None, "ci95": None, "n_important": 0}
    p = conf / imp
    if exact:
        return {"rate": p, "se": 0.0, "ci95": [p, p], "n_important": imp}
    lo, hi = wilson_interval(conf, imp)
    return {"rate": p, "se": math.sqrt(plus_four_variance(conf, imp)), "ci95": [lo, hi], "n_important": imp}


# ------------------------------------------------------------------------------------------------ preview spec
@dataclass(frozen=True)
class Preview:
    """A merge to preview: method, weights (default 1 each), operator params, output rank (as ``merge``: default
    the largest input rank, ``"full"`` for the untruncated operator output) and how many modules to preview
    (None = all; else a seeded sample of that many modules, for element-wise methods on big models)."""

    method: str
    weights: Sequence[float] | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    rank: int | str | None = None
    modules: int | None = None

    @classmethod
    def from_any(cls, spec: "Preview | Mapping[str, Any]") -> "Preview":
        """A Preview, or a mapping with ``method`` and optionally ``weights``, ``rank``, ``modules``, ``params``;
        any other key is an operator parameter (``{"method": "ties", "density": 0.5}``)."""
        if isinstance(spec, Preview):
            return spec
        if not isinstance(spec, Mapping) or "method" not in spec:
            raise ParameterError(f"preview must be a Preview or a mapping with a 'method', got {spec!r}")
        d = dict(spec)
        params = dict(d.pop("params", None) or {})
        kw = {k: d.pop(k) for k in ("method", "weights", "rank", "modules") if k in d}
        params.update(d)
        return cls(params=params, **kw)


def check_options(n: int, top_k_fraction: float, samples: int, seed: int, subspace_k: int | None) -> None:
    """Validate :func:`analyze`'s options (no file is touched); ParameterError naming the option otherwise."""
    if n < 1:
        raise ParameterError("analyze needs at least one input adapter")
    if isinstance(top_k_fraction, bool) or not isinstance(top_k_fraction, (int, float)) or not 0 < top_k_fraction <= 1:
        raise ParameterError(f"top_k_fraction must be in (0, 1], got {top_k_fraction!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ParameterError(f"samples must be a positive integer, got {samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ParameterError(f"seed must be a non-negative integer, got {seed!r}")
    if subspace_k is not None and (isinstance(subspace_k, bool) or not isinstance(subspace_k, int) or subspace_k < 1):
        raise ParameterError(f"subspace_k must be a positive integer, got {subspace_k!r}")


def check_preview(spec: Preview | Mapping[str, Any], n_inputs: int, seed: int) -> Preview:
    """Validate a preview spec for ``n_inputs`` inputs without touching any file (method, weights, params, rank)."""
    from .engine import validate_options

    p = Preview.from_any(spec)
    if p.modules is not None and (isinstance(p.modules, bool) or not isinstance(p.modules, int) or p.modules < 1):
        raise ParameterError(f"preview modules must be a positive integer, got {p.modules!r}")
    if "seed" in p.params:
        raise ParameterError("preview: do not pass a seed among the params; the preview merge uses analyze's seed")
    validate_options(p.method, n_inputs, p.weights, dict(p.params), rank=p.rank, seed=seed)
    return p


def _prepare_preview(p: Preview | None, adapters: Sequence[Adapter], seed: int) -> "MergePlan | None":
    """Plan a preview already validated by :func:`check_preview` with the merge engine."""
    if p is None:
        return None
    from .engine import MergeRequest, plan

    req = MergeRequest.build(p.method, len(adapters), p.weights, dict(p.params), rank=p.rank, seed=seed,
                             extra_tensors="first", allow_disjoint=True)
    return plan(list(adapters), req)


def _preview_names(names: list[str], limit: int | None, seed: int) -> list[str]:
    if limit is None or limit >= len(names):
        return list(names)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, len(names), limit, 0x5EED])))
    return sorted(names[i] for i in rng.choice(len(names), size=limit, replace=False))


# ------------------------------------------------------------------------------------------------ per module
@dataclass
class _ModuleResult:
    info: ModuleInfo
    gram: np.ndarray  # (N, N) over all inputs, zero rows/cols where absent
    spectra: dict[int, np.ndarray]
    sum_values: np.ndarray
    overlaps: dict[tuple[int, int], tuple[float | None, float | None, int]]
    counts: ConflictCounts
    preview: dict[str, Any] | None = None
    preview_inner: np.ndarray | None = None  # <M, D_i> per input
    preview_sq: float = 0.0  # ||M||^2


def _analyze_module(
    info: ModuleInfo, adapters: Sequence[Adapter], n: int, fraction: float, samples: int, seed: int,
    subspace_k: int | None,
) -> tuple[_ModuleResult, dict[int, tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    factors = {i: adapters[i].factors(info.name) for i in info.present}
    bs = [factors[i][0] for i in info.present]
    as_ = [factors[i][1] for i in info.present]
    cores, total = factor_cores(bs, as_)
    gram = np.zeros((n, n))
    for x, i in enumerate(info.present):
        for y, j in enumerate(info.present):
            if y >= x:
                gram[i, j] = gram[j, i] = float((cores[x] * cores[y]).sum())
    specs = {i: spectrum(c, info.shape) for i, c in zip(info.present, cores)}
    overlaps: dict[tuple[int, int], tuple[float | None, float | None, int]] = {}
    for x, a in enumerate(info.present):
        for b in info.present[x + 1:]:
            k = min(specs[a].values.size, specs[b].values.size)
            if subspace_k is not None:
                k = min(k, subspace_k)
            overlaps[(a, b)] = (
                subspace_overlap(specs[a].left, specs[b].left, k), subspace_overlap(specs[a].right, specs[b].right, k), k,
            )
    rows, cols, exact = sample_positions(info.shape, samples, module_seed(seed, "sample:" + info.name))
    values = {i: entry_values(factors[i][0], factors[i][1], rows, cols) for i in info.present}
    counts = conflict_stats(values, fraction, exact=exact)
    res = _ModuleResult(
        info=info, gram=gram, spectra={i: s.values for i, s in specs.items()},
        sum_values=spectrum(total, info.shape).values, overlaps=overlaps, counts=counts,
    )
    return res, factors, cores


def _module_failure(info: ModuleInfo, adapters: Sequence[Adapter], e: BaseException) -> InputError:
    """A one-line InputError naming the input whose (finite but huge) factors broke a module's analysis."""
    if isinstance(e, MemoryError):
        return InputError(f"module '{info.name}' ({info.shape[0]}x{info.shape[1]}): out of memory while analyzing it")
    from .engine import _nonfinite_inputs

    _, overflow, biggest = _nonfinite_inputs(info, adapters)  # type: ignore[arg-type]  (uses .name and .present)

    def size(i: int) -> float:
        b, a = adapters[i].factors(info.name, check_finite=False)
        return float(b.abs().max()) * float(a.abs().max()) if b.numel() and a.numel() else 0.0

    culprit = overflow[0] if overflow else adapters[max(info.present, key=size)].name
    return InputError(f"{culprit}: module '{info.name}': its factors are too large to analyze (the SVD fails; "
                      f"deltas reach {biggest:.3g}); the adapter is corrupt or hostile")


def _linear_preview(
    cores: Sequence[torch.Tensor], present: Sequence[int], plan_mod: "ModulePlan", mp: "MergePlan"
) -> tuple[torch.Tensor, float]:
    """Core of the merged module for linear / concat methods, from the inputs' cores, and its truncation error.

    ``M = sum_i c_i C_i``, truncated to the plan's output rank by the SVD of the small core (what
    :func:`adaptermerge.lowrank.truncate_factors` does for ``merge``); ``cat`` and rank ``"full"`` are exact.
    """
    coeffs = mp.method.coefficients(mp.weights, mp.params)
    core = sum((coeffs[i] * c for i, c in zip(present, cores)), torch.zeros_like(cores[0]))
    if mp.method.concat or mp.rank == "full":
        return core, 0.0
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    k = plan_mod.out_rank
    energy = float((s * s).sum())
    err = math.sqrt(float((s[k:] * s[k:]).sum()) / energy) if energy > 0 else 0.0
    return (u[:, :k] * s[:k]) @ vh[:k], err


def _dense_merge(info: ModuleInfo, mp: "MergePlan", factors: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The untruncated output of an element-wise operator on one module, exactly as the engine calls it
    (zero deltas for absent inputs, the per-module seed of :func:`adaptermerge.engine.module_seed`)."""
    deltas = [factors[i][0] @ factors[i][1] if i in factors else torch.zeros(info.shape) for i in range(len(mp.weights))]
    kwargs = {k: v for k, v in mp.method.operator_params(mp.params).items() if k != "seed"}
    if mp.method.stochastic:
        kwargs["seed"] = module_seed(mp.seed, info.name)
    return mp.method.fn(deltas, mp.weights, **kwargs)


def _preview_module(
    res: _ModuleResult, plan_mod: "ModulePlan", mp: "MergePlan", adapters: Sequence[Adapter],
    factors: Mapping[int, tuple[torch.Tensor, torch.Tensor]], cores: Sequence[torch.Tensor], n: int,
) -> None:
    """The merged module as ``merge`` makes it, and its inner products with each input's delta.

    Coefficients-form methods stay in the small core space of :func:`factor_cores`. Every other method runs the
    engine's public per-module merge (:func:`adaptermerge.engine.merge_module`) and takes the inner products from
    the merged factors.
    """
    inner = np.zeros(n)
    if mp.method.form == "coefficients":
        core, err = _linear_preview(cores, res.info.present, plan_mod, mp)
        sq = float((core * core).sum())
        for x, i in enumerate(res.info.present):
            inner[i] = float((core * cores[x]).sum())
        rank = plan_mod.out_rank
    elif mp.rank == "full" and not mp.request.exact_low_rank:
        merged = _dense_merge(res.info, mp, factors).double()
        err, sq, rank = 0.0, float((merged * merged).sum()), min(res.info.shape)
        for i in res.info.present:
            b_i, a_i = factors[i]
            inner[i] = float(((b_i.double().T @ merged) * a_i.double()).sum())  # trace(B^T M A^T)
    else:
        from .engine import merge_module
        from .lowrank import delta_inner

        b, a, err = merge_module(plan_mod, mp, adapters)
        sq = max(delta_inner(b, a, b, a), 0.0)
        for i in res.info.present:
            inner[i] = delta_inner(b, a, factors[i][0], factors[i][1])
        rank = int(a.shape[0])
    res.preview_inner, res.preview_sq = inner, sq
    res.preview = {"merged_norm": math.sqrt(sq), "rank": rank, "rel_error": float(err),
                   **_preview_numbers(inner, sq, np.diag(res.gram), res.info.present, n)}


def _preview_numbers(inner: np.ndarray, sq: float, norms_sq: np.ndarray, present: Sequence[int], n: int) -> dict[str, list]:
    proj: list[float | None] = [None] * n
    cos: list[float | None] = [None] * n
    ratio: list[float | None] = [None] * n
    for i in present:
        if norms_sq[i] > 0:
            proj[i] = float(inner[i] / norms_sq[i])
            ratio[i] = math.sqrt(sq / norms_sq[i])
            cos[i] = float(inner[i] / math.sqrt(sq * norms_sq[i])) if sq > 0 else None
    return {"projection": proj, "cosine": cos, "norm_ratio": ratio}


# ------------------------------------------------------------------------------------------------ reporting
def _pairs(n: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(n) for b in range(a + 1, n)]


def _cos(g: np.ndarray, a: int, b: int) -> float | None:
    d = g[a, a] * g[b, b]
    return float(g[a, b] / math.sqrt(d)) if d > 0 else None


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(sum(vals) / len(vals)) if vals else None


def _pooled_conflict(items: Sequence[tuple[int, int, int, int, bool]]) -> dict[str, Any]:
    """Stratified pooling of (numel, n_sampled, important, conflicts, exact) over modules.

    Module m stands for ``S_m = numel_m * important_m / n_sampled_m`` entries that matter; the pooled rate is
    ``sum S_m p_m / sum S_m`` and its standard error ``sqrt(sum w_m^2 var_m)``, ``w_m = S_m / sum S_m``, with
    ``var_m`` the plus-four variance of module m's proportion (0 for enumerated modules).
    """
    sizes = [numel * imp / ns for numel, ns, imp, _, _ in items if imp > 0]
    total = sum(sizes)
    if total <= 0:
        return {"rate": None, "se": None, "ci95": None, "n_important": 0, "n_sampled": sum(i[1] for i in items)}
    rate = 0.0
    var = 0.0
    for (numel, ns, imp, conf, exact), size in zip([i for i in items if i[2] > 0], sizes):
        p = conf / imp
        w = size / total
        rate += w * p
        if not exact:
            var += w * w * plus_four_variance(conf, imp)
    se = math.sqrt(var)
    return {
        "rate": rate, "se": se, "ci95": [max(0.0, rate - Z95 * se), min(1.0, rate + Z95 * se)],
        "n_important": sum(i[2] for i in items), "n_sampled": sum(i[1] for i in items),
    }


def _module_record(res: _ModuleResult, n: int, labels: list[str]) -> dict[str, Any]:
    info, g, cc = res.info, res.gram, res.counts
    pairs = _pairs(n)
    conflict = []
    for pr in pairs:
        if pr in cc.important:
            conflict.append({**_rate(cc.conflicts[pr], cc.important[pr], cc.exact)})
        else:
            conflict.append(None)
    rec = {
        "name": info.name,
        "layer": info.layer,
        "type": info.type,
        "shape": list(info.shape),
        "present": [labels[i] for i in info.present],
        "norm": [math.sqrt(max(g[i, i], 0.0)) if i in info.present else None for i in range(n)],
        "cosine": [_cos(g, a, b) for a, b in pairs],
        "conflict": conflict,
        "conflict_all": _rate(cc.conflicts_all, cc.important_all, cc.exact) if len(info.present) >= 2 else None,
        "n_sampled": cc.n_sampled,
        "exact": cc.exact,
        "effective_rank": [effective_rank(res.spectra[i]) if i in res.spectra else None for i in range(n)],
        "singular_values": [res.spectra[i].tolist() if i in res.spectra else None for i in range(n)],
        "subspace_overlap": {
            "left": [res.overlaps.get(pr, (None, None, 0))[0] for pr in pairs],
            "right": [res.overlaps.get(pr, (None, None, 0))[1] for pr in pairs],
            "k": [res.overlaps.get(pr, (None, None, 0))[2] for pr in pairs],
        },
        "sum": _sum_record(res.sum_values, g, info, res.spectra),
        "preview": res.preview,
    }
    return rec


def _sum_record(values: np.ndarray, g: np.ndarray, info: ModuleInfo, spectra: Mapping[int, np.ndarray]) -> dict[str, Any]:
    energy = float(np.sum(values**2))
    r = max((s.size for s in spectra.values()), default=0)
    top = float(np.sum(values[:r] ** 2)) / energy if energy > 0 else None
    sep = float(np.trace(g))
    return {
        "norm": math.sqrt(energy),
        "effective_rank": effective_rank(values),
        "singular_values": values.tolist(),
        "energy_at_rank": {"rank": r, "fraction": top},
        # ||sum D_i||^2 / sum ||D_i||^2: 1 = orthogonal, > 1 reinforcing, < 1 cancelling
        "energy_ratio": float(g.sum()) / sep if sep > 0 else None,
    }


def _aggregate(results: Sequence[_ModuleResult], n: int) -> dict[str, Any]:
    g = sum((r.gram for r in results), np.zeros((n, n)))
    pairs = _pairs(n)
    conflict = []
    for pr in pairs:
        items = [(r.info.numel, r.counts.n_sampled, r.counts.important[pr], r.counts.conflicts[pr], r.counts.exact)
                 for r in results if pr in r.counts.important]
        conflict.append(_pooled_conflict(items) if items else None)
    multi = [(r.info.numel, r.counts.n_sampled, r.counts.important_all, r.counts.conflicts_all, r.counts.exact)
             for r in results if len(r.info.present) >= 2]
    sep = float(np.trace(g))
    out: dict[str, Any] = {
        "n_modules": len(results),
        "norm": [math.sqrt(max(g[i, i], 0.0)) for i in range(n)],
        "cosine": [_cos(g, a, b) for a, b in pairs],
        "conflict": conflict,
        "conflict_all": _pooled_conflict(multi) if multi else None,
        "effective_rank_mean": [_mean([effective_rank(r.spectra[i]) for r in results if i in r.spectra]) for i in range(n)],
        "subspace_overlap_mean": {
            "left": [_mean([r.overlaps[pr][0] for r in results if pr in r.overlaps]) for pr in pairs],
            "right": [_mean([r.overlaps[pr][1] for r in results if pr in r.overlaps]) for pr in pairs],
        },
        "energy_ratio": float(g.sum()) / sep if sep > 0 else None,
    }
    prev = [r for r in results if r.preview_inner is not None]
    if prev:
        inner = sum((r.preview_inner for r in prev), np.zeros(n))
        norms_sq = np.zeros(n)
        present: set[int] = set()
        for r in prev:
            for i in r.info.present:
                norms_sq[i] += r.gram[i, i]
                present.add(i)
        sq = sum(r.preview_sq for r in prev)
        out["preview"] = {"n_modules": len(prev), **_preview_numbers(inner, sq, norms_sq, sorted(present), n)}
    return out


def _group(results: Sequence[_ModuleResult], key: Callable[[ModuleInfo], str]) -> dict[str, list[_ModuleResult]]:
    groups: dict[str, list[_ModuleResult]] = {}
    for r in results:
        groups.setdefault(key(r.info), []).append(r)
    return groups


def labels_for(n: int) -> list[str]:
    """Short input labels: A, B, C, ... then I27, I28, ..."""
    return [chr(65 + i) if i < 26 else f"I{i + 1}" for i in range(n)]


def _as_adapters(inputs: Sequence[Adapter | str | os.PathLike]) -> list[Adapter]:
    return [x if isinstance(x, Adapter) else load_adapter(x) for x in inputs]


# ------------------------------------------------------------------------------------------------ public API
def analyze(
    adapters: Sequence[Adapter | str | os.PathLike],
    *,
    top_k_fraction: float = 0.2,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    subspace_k: int | None = None,
    preview: Preview | Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Diagnose how LoRA adapters relate, module by module, before merging them. Returns plain (JSON-ready) data.

    ``top_k_fraction``: the fraction of each delta's entries (largest magnitudes) that count for sign conflicts.
    ``samples``: entries evaluated per module for the sign statistics (modules with fewer are enumerated exactly).
    ``seed``: seeds the entry sample (per module, from the module's name), the preview's module sample, and the
    preview merge itself (as ``merge(seed=...)``). ``subspace_k``: number of singular vectors compared (default:
    the smaller numerical rank of the two deltas). ``preview``: a :class:`Preview` or a mapping such as
    ``{"method": "ties", "density": 0.5, "weights": [1, 1], "rank": 16, "modules": 20}``.

    The result has ``inputs`` (label, name, ...), ``pairs`` (index pairs, in the order of every per-pair list),
    ``modules`` (one record per module), ``layers`` and ``types`` (aggregates), ``overall`` (aggregate of all
    modules), ``cosine_matrix`` (N x N, over all modules), ``settings``, ``preview`` and ``notes``. Values that are
    undefined (a cosine with a zero delta, a pair where one input lacks the module) are None.
    """
    check_options(len(adapters), top_k_fraction, samples, seed, subspace_k)
    spec = check_preview(preview, len(adapters), seed) if preview is not None else None  # before any file is opened
    t0 = time.perf_counter()
    ads = _as_adapters(adapters)
    n = len(ads)
    mods = align_modules(ads)
    if n >= 2 and not any(len(m.present) >= 2 for m in mods):
        raise IncompatibleInputsError("the inputs have no module in common, so there is nothing to compare "
                                      "(adapters for different models or target modules?)")
    mp = _prepare_preview(spec, ads, seed)
    preview_set = set(_preview_names([m.name for m in mods], spec.modules, seed)) if spec is not None else set()
    plans = {p.name: p for p in mp.modules} if mp is not None else {}
    labels = labels_for(n)
    results: list[_ModuleResult] = []
    for k, info in enumerate(mods):
        if progress:
            progress(k, len(mods), info.name)
        try:
            res, factors, cores = _analyze_module(info, ads, n, float(top_k_fraction), samples, seed, subspace_k)
        except (torch.linalg.LinAlgError, MemoryError) as e:
            raise _module_failure(info, ads, e) from None
        if info.name in preview_set:
            _preview_module(res, plans[info.name], mp, ads, factors, cores, n)
        del factors, cores
        results.append(res)
    if progress:
        progress(len(mods), len(mods), "")
    pairs = _pairs(n)
    g = sum((r.gram for r in results), np.zeros((n, n)))
    cos_matrix = [[(1.0 if g[a, a] > 0 else None) if a == b else _cos(g, a, b) for b in range(n)] for a in range(n)]
    layers = _group(results, lambda i: i.layer)
    types = _group(results, lambda i: i.type)
    notes = [f"{labels[i]}: {note}" for i, a in enumerate(ads) for note in a.notes]
    missing = [m for m in mods if len(m.present) < n]
    if missing:
        notes.append(f"{len(missing)} module(s) are missing from some inputs (e.g. '{missing[0].name}' lacks "
                     f"{', '.join(labels[i] for i in range(n) if i not in missing[0].present)}): pair statistics "
                     "skip them, norms count them as zero")
    out: dict[str, Any] = {
        "inputs": [
            {"label": labels[i], "name": a.name, "modules": len(a.modules),
             "ranks": sorted({m.rank for m in a.modules.values()}), "dtype": a.dtype}
            for i, a in enumerate(ads)
        ],
        "pairs": [list(p) for p in pairs],
        "pair_labels": [f"{labels[a]}·{labels[b]}" for a, b in pairs],
        "settings": {
            "top_k_fraction": float(top_k_fraction), "samples": samples, "seed": seed, "subspace_k": subspace_k,
            "sampling": "uniform with replacement, per module; modules with at most `samples` entries enumerated",
        },
        "overall": _aggregate(results, n),
        "cosine_matrix": cos_matrix,
        "layers": {k: _aggregate(v, n) for k, v in sorted(layers.items(), key=lambda kv: layer_sort_key(kv[0]))},
        "types": {k: _aggregate(v, n) for k, v in sorted(types.items())},
        "modules": [_module_record(r, n, labels) for r in results],
        "preview": None,
        "notes": notes,
    }
    if spec is not None:
        out["preview"] = {
            "method": mp.method.name, "kind": mp.method.kind, "weights": mp.weights,
            "params": {k: v for k, v in mp.params.items() if k != "seed"}, "rank": mp.rank, "seed": seed,
            "modules_previewed": len(preview_set), "modules_total": len(mods),
            "module_sample": len(preview_set) < len(mods),
        }
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def pairwise_cosine(adapters: Sequence[Adapter | str | os.PathLike]) -> np.ndarray:
    """N x N cosine similarity of the adapters' whole deltas (all modules concatenated), from the factors.

    ``C[a, b] = sum_m <D_a,m, D_b,m> / sqrt(sum_m ||D_a,m||^2 * sum_m ||D_b,m||^2)``; a module missing from an
    input counts as a zero delta there. NaN where an adapter's delta is zero. Shapes must agree per module.
    """
    if len(adapters) < 1:
        raise ParameterError("pairwise_cosine needs at least one input adapter")
    ads = _as_adapters(adapters)
    n = len(ads)
    g = np.zeros((n, n))
    for info in align_modules(ads):
        f = [ads[i].factors(info.name) for i in info.present]
        sub = inner_products([x[0] for x in f], [x[1] for x in f])
        idx = np.array(info.present)
        g[np.ix_(idx, idx)] += sub
    d = np.sqrt(np.clip(np.diag(g), 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        c = g / np.outer(d, d)
    c[np.outer(d, d) == 0] = np.nan
    return c
