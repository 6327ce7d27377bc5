"""Tensor-level merge operators: plain tensors in, one float32 tensor out.

Every operator has the same shape::

    fn(tensors, weights=None, *, <params>) -> torch.Tensor

* ``tensors``: a non-empty sequence of tensors of one shape (any real dtype; they are read as float32).
* ``weights``: one finite float per tensor, default all ``1.0``.
* Per-input parameters (``density``) take one float or a sequence of one float per tensor.
* The result is a new float32 tensor of the common shape, on the device of ``tensors[0]``. Inputs are never
  modified.

Numerics (identical results across runs, platforms and thread counts):

* All arithmetic is element-wise IEEE float32 done by NumPy ufuncs, one operation at a time (no fused
  multiply-add), over blocks of :data:`BLOCK` elements so the working set stays in cache. Sums over inputs are
  accumulated in input order: ``acc = c0*T0; acc += c1*T1; ...``. Python-float coefficients (a weight, a weight
  divided by a density, ...) are computed in float64 and rounded to float32 once before they multiply a tensor.
* Random drops (DARE, DELLA) use one PCG64 stream per input, seeded with ``SeedSequence([seed, i])``; see
  :func:`uniform_u32` for the exact definition. ``torch.bernoulli`` is never used.
* Magnitude selection is exact: :func:`topk_mask` keeps exactly ``k`` entries, ties at the threshold broken by
  lowest flat index first, and ``k = floor(density * numel + 0.5)`` (:func:`density_to_k`).

The formulas, conventions and the differences from PEFT and mergekit are documented in ``docs/operators.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch

from .errors import ParameterError, option
from .protocol import Paper, Param, operator

__all__ = [
    "BLOCK",
    "breadcrumbs",
    "cat",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "della_probabilities",
    "density_to_k",
    "linear",
    "magnitude_prune",
    "task_arithmetic",
    "ties",
    "topk_mask",
    "uniform_u32",
]

#: Elements processed per block. Any value gives bit-identical results; this one keeps the per-block buffers
#: (about a dozen of at most 512 KiB) in cache.
BLOCK = 1 << 17

_SAMPLE_SIZE = 1 << 16  # entries sampled to bracket the top-k threshold
_EXACT_BELOW = 1 << 17  # smaller tensors are selected exactly, without sampling
_TWO32 = 1 << 32
_MAJORITY_SIGNS = ("total", "frequency")


# ----------------------------------------------------------------------------------------------------------------
# Validation helpers (shared with adaptermerge.registry)
# ----------------------------------------------------------------------------------------------------------------


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, (bool, np.bool_))


def check_scalar(op: str, name: str, value: Any) -> float:
    """Return ``value`` as a finite float, or raise ParameterError naming ``op`` and ``name``."""
    if not _is_real(value):
        raise ParameterError(f"{op}: {name} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ParameterError(f"{op}: {name} must be finite, got {value!r}")
    return out


def check_bool(op: str, name: str, value: Any) -> bool:
    """Return ``value`` as a bool; only ``True``/``False`` are accepted."""
    if not isinstance(value, (bool, np.bool_)):
        raise ParameterError(f"{op}: {name} must be true or false, got {value!r}")
    return bool(value)


def check_seed(op: str, value: Any) -> int:
    """Return ``value`` as a non-negative int seed."""
    if not isinstance(value, Integral) or isinstance(value, (bool, np.bool_)) or int(value) < 0:
        raise ParameterError(f"{op}: seed must be a non-negative integer, got {value!r}")
    return int(value)


def check_choice(op: str, name: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ParameterError(f"{op}: {name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_density(op: str, name: str, value: float) -> float:
    """Densities live in (0, 1]."""
    if not 0.0 < value <= 1.0:
        raise ParameterError(f"{op}: {name} must be in (0, 1], got {value!r}")
    return value


def check_breadcrumbs(op: str, densities: Sequence[float], gamma: float) -> None:
    """gamma in [0, 1) and gamma + density <= 1 for every input."""
    if not 0.0 <= gamma < 1.0:
        raise ParameterError(f"{op}: gamma must be in [0, 1), got {gamma!r}")
    for i, d in enumerate(densities):
        if gamma + d > 1.0 + 1e-12:
            where = f"density[{i}]" if len(set(densities)) > 1 else "density"
            raise ParameterError(f"{op}: gamma + {where} must be <= 1, got {gamma!r} + {d!r}")


def check_della(op: str, densities: Sequence[float], epsilon: float) -> None:
    """epsilon >= 0 and every keep probability density +- epsilon/2 in (0, 1]."""
    if epsilon < 0.0:
        raise ParameterError(f"{op}: epsilon must be >= 0, got {epsilon!r}")
    for i, d in enumerate(densities):
        where = f"density[{i}]" if len(set(densities)) > 1 else "density"
        if not d - epsilon / 2 > 0.0:
            raise ParameterError(f"{op}: {where} - epsilon/2 must be > 0, got {d!r} - {epsilon!r}/2")
        if d + epsilon / 2 > 1.0 + 1e-12:
            raise ParameterError(f"{op}: {where} + epsilon/2 must be <= 1, got {d!r} + {epsilon!r}/2")


def check_weights(op: str, weights: Sequence[float] | None, count: int) -> list[float]:
    """Default all 1.0; otherwise one finite number per input."""
    if weights is None:
        return [1.0] * count
    if isinstance(weights, (str, bytes)) or not isinstance(weights, (Sequence, np.ndarray, torch.Tensor)):
        raise ParameterError(f"{op}: weights must be a sequence of numbers, got {weights!r}")
    values = weights.tolist() if isinstance(weights, (np.ndarray, torch.Tensor)) else list(weights)
    if len(values) != count:
        raise ParameterError(f"{op}: got {len(values)} weights for {count} tensors")
    return [check_scalar(op, f"weights[{i}]", w) for i, w in enumerate(values)]


def per_input(op: str, name: str, value: Any, count: int, check: Callable[[str, str, float], float]) -> list[float]:
    """Expand a float or a sequence of one float per input into a checked list of ``count`` floats."""
    if _is_real(value):
        one = check(op, name, check_scalar(op, name, value))
        return [one] * count
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray, torch.Tensor)):
        raise ParameterError(f"{op}: {name} must be a number or one number per input, got {value!r}")
    values = value.tolist() if isinstance(value, (np.ndarray, torch.Tensor)) else list(value)
    if len(values) != count:
        raise ParameterError(f"{op}: {name} has {len(values)} values for {count} tensors")
    return [check(op, f"{name}[{i}]", check_scalar(op, f"{name}[{i}]", v)) for i, v in enumerate(values)]


def density_to_k(density: float, numel: int) -> int:
    """Number of entries a density keeps: ``floor(density * numel + 0.5)`` clamped to ``[0, numel]``."""
    return min(max(math.floor(density * numel + 0.5), 0), numel)


# ----------------------------------------------------------------------------------------------------------------
# Declarations: every parameter once (type, default, range, doc); the operators below take them from here
# ----------------------------------------------------------------------------------------------------------------


def _density(default: float, what: str) -> Param:
    return Param(
        "density", float, default, f"fraction of each input's entries {what}; one value or one per input",
        low=0.0, high=1.0, low_inclusive=False, per_input=True,
    )


SCALE = Param("scale", float, 1.0, "multiplies the merged result (the lambda of task arithmetic)")
NORMALIZE_TIES = Param(
    "normalize", bool, True, "divide each entry by the sum of |weight| of the inputs agreeing with the elected sign"
)
MAJORITY = Param(
    "majority_sign", str, "total",
    "sign election: 'total' = sign of the sum of weighted values, 'frequency' = sign of the sum of their signs",
    choices=("total", "frequency"),
)
RESCALE = Param("rescale", bool, True, "multiply kept entries by 1/keep-probability (unbiased)")
SEED = Param("seed", int, 0, "random seed (PCG64 stream per input); equal seeds give byte-identical results", low=0)
GAMMA = Param("gamma", float, 0.01, "fraction of largest-magnitude entries dropped as outliers",
              low=0.0, high=1.0, high_inclusive=False)
EPSILON = Param("epsilon", float, 0.1,
                "width of the keep-probability ramp: density -+ epsilon/2 for the smallest/largest entries", low=0.0)

TIES_PAPER = Paper("Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023",
                   "2306.01708", "prateeky2806/ties-merging")
DARE_PAPER = Paper("Yu et al., Language Models are Super Mario (DARE), ICML 2024", "2311.03099",
                   "yule-BUAA/MergeLM")
DELLA_PAPER = Paper("Deep et al., DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based "
                    "Sampling, 2024", "2406.11617", "declare-lab/della")
TA_PAPER = Paper("Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023", "2212.04089",
                 "mlfoundations/task_vectors")
SOUPS_PAPER = Paper("Wortsman et al., Model soups, ICML 2022", "2203.05482", "mlfoundations/model-soups")
LORA_SOUPS_PAPER = Paper("Prabhakar et al., LoRA Soups, 2024", "2410.13025")
BREADCRUMBS_PAPER = Paper("Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse "
                          "Masks, ECCV 2024", "2312.06795", "rezazzr/breadcrumbs")


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    flats: list[np.ndarray]  # read-only float32 1-D views (or copies) of the inputs
    shape: torch.Size
    device: torch.device
    numel: int


def _flat_f32(t: torch.Tensor, op: str, index: int) -> np.ndarray:
    if t.is_complex() or t.dtype == torch.bool:
        raise ParameterError(f"{op}: tensors[{index}] has unsupported dtype {t.dtype}")
    flat = t.detach().to(device="cpu", dtype=torch.float32).reshape(-1).numpy()
    flat = flat.view()  # a fresh ndarray object so the flag below never touches a shared one
    flat.flags.writeable = False
    return flat


def _prepare(op: str, tensors: Sequence[torch.Tensor]) -> _Inputs:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise ParameterError(f"{op}: tensors must be a sequence of tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ParameterError(f"{op}: at least one tensor is required")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ParameterError(f"{op}: tensors[{i}] is a {type(t).__name__}, not a torch.Tensor")
    shape = tensors[0].shape
    for i, t in enumerate(tensors[1:], start=1):
        if t.shape != shape:
            raise ParameterError(
                f"{op}: tensors[{i}] has shape {tuple(t.shape)} but tensors[0] has shape {tuple(shape)}"
            )
    flats = [_flat_f32(t, op, i) for i, t in enumerate(tensors)]
    return _Inputs(flats=flats, shape=shape, device=tensors[0].device, numel=int(flats[0].size))


def _result(inputs: _Inputs, flat: np.ndarray) -> torch.Tensor:
    out = torch.from_numpy(flat).reshape(inputs.shape)
    return out if inputs.device.type == "cpu" else out.to(inputs.device)


def _blocks(n: int) -> range:
    return range(0, n, BLOCK)


def _f32(value: float) -> np.float32:
    return np.float32(value)


class _Workspace:
    """Per-call scratch buffers of one block each."""

    def __init__(self, n: int):
        size = max(1, min(n, BLOCK))
        self.a = np.empty(size, np.float32)
        self.f = np.empty(size, np.float32)
        self.keep = np.empty(size, np.bool_)
        self.keep2 = np.empty(size, np.bool_)


# ----------------------------------------------------------------------------------------------------------------
# Exact top-k selection
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Selection:
    """Keeps ``|x| > t``, plus entries with ``|x| == t`` whose flat index is ``< cut``."""

    t: np.float32
    cut: int


def _fill_keep(a: np.ndarray, start: int, sel: _Selection, keep: np.ndarray) -> None:
    """keep[j] = entry start+j (magnitude a[j]) is selected by sel."""
    end = start + a.size
    if sel.cut >= end:
        np.greater_equal(a, sel.t, out=keep)
    elif sel.cut <= start:
        np.greater(a, sel.t, out=keep)
    else:
        m = sel.cut - start
        np.greater_equal(a[:m], sel.t, out=keep[:m])
        np.greater(a[m:], sel.t, out=keep[m:])


def _not_finite(what: str) -> ParameterError:
    return ParameterError(f"{what} contains NaN or infinite values; magnitude selection needs finite values")


def _band_select(flat: np.ndarray, k: int, lo: float, hi: float, ws: _Workspace, what: str) -> _Selection | None:
    """Exact k-th largest |x| if it lies in [lo, hi]; None when the bracket misses."""
    n = flat.size
    above = 0
    values: list[np.ndarray] = []
    indices: list[np.ndarray] = []
    for s in _blocks(n):
        x = flat[s : s + BLOCK]
        a = np.abs(x, out=ws.a[: x.size])
        if not math.isfinite(a.max()):
            raise _not_finite(what)
        keep = ws.keep[: x.size]
        if hi != math.inf:
            above += int(np.count_nonzero(np.greater(a, hi, out=keep)))
        if lo == -math.inf and hi == math.inf:
            idx = np.arange(x.size)
        else:
            np.greater_equal(a, lo, out=keep)
            np.logical_and(keep, np.less_equal(a, hi, out=ws.keep2[: x.size]), out=keep)
            idx = np.flatnonzero(keep)
        if idx.size:
            values.append(a[idx])
            indices.append(idx + s)
    band = np.concatenate(values) if values else np.empty(0, np.float32)
    need = k - above
    if need <= 0 or need > band.size:
        return None
    j = band.size - need
    t = np.partition(band, j)[j]
    band_idx = np.concatenate(indices)
    greater = above + int(np.count_nonzero(band > t))
    equal_idx = band_idx[band == t]  # ascending: blocks are scanned in order
    r = k - greater
    cut = n if r == equal_idx.size else int(equal_idx[r - 1]) + 1
    return _Selection(t=np.float32(t), cut=cut)


def _sample_stride(n: int) -> int:
    """A stride near n/_SAMPLE_SIZE that is coprime with n, so it never aliases with a row length."""
    s = max(1, n // _SAMPLE_SIZE)
    while math.gcd(s, n) != 1:
        s += 1
    return s


def _select_topk(flat: np.ndarray, k: int, ws: _Workspace, what: str) -> _Selection:
    """Exact selection of the k entries of largest |x| (ties: lowest flat index first)."""
    n = flat.size
    if k <= 0:
        return _Selection(t=np.float32(np.inf), cut=0)
    if k >= n:
        if n and not math.isfinite(float(np.abs(flat).max())):
            raise _not_finite(what)
        return _Selection(t=np.float32(-np.inf), cut=0)
    if n > _EXACT_BELOW:
        sample = np.abs(flat[:: _sample_stride(n)])
        m = sample.size
        q = (n - k) / n
        pos = q * m
        for widen in (1, 8):
            d = widen * (4 * math.ceil(math.sqrt(m * q * (1 - q))) + 16)
            ilo, ihi = math.floor(pos) - d, math.ceil(pos) + d
            kth = [i for i in (ilo, ihi) if 0 <= i < m]
            part = np.partition(sample, kth) if kth else sample
            lo = float(part[ilo]) if ilo >= 0 else -math.inf
            hi = float(part[ihi]) if ihi < m else math.inf
            sel = _band_select(flat, k, lo, hi, ws, what)
            if sel is not None:
                return sel
    sel = _band_select(flat, k, -math.inf, math.inf, ws, what)
    assert sel is not None  # the full band always contains the threshold
    return sel


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (shape of ``x``) of exactly ``k`` entries with the largest ``|x|``.

    Entries tied at the threshold magnitude are taken in increasing flat (row-major) index order, so the result
    is unique. ``x`` must be finite when ``0 < k < numel``. Runs in O(numel): a strided sample brackets the
    threshold, one pass counts the entries above the bracket and gathers the (small) band inside it, and a
    partial sort of the band gives the exact threshold; if the bracket misses it widens, then falls back to the
    whole tensor.
    """
    if not isinstance(x, torch.Tensor):
        raise ParameterError(f"topk_mask: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(k, Integral) or isinstance(k, (bool, np.bool_)):
        raise ParameterError(f"topk_mask: k must be an integer, got {k!r}")
    flat = _flat_f32(x, "topk_mask", 0)
    n = flat.size
    if not 0 <= int(k) <= n:
        raise ParameterError(f"topk_mask: k={k} is out of range [0, {n}]")
    ws = _Workspace(n)
    sel = _select_topk(flat, int(k), ws, "topk_mask: x")
    out = np.empty(n, np.bool_)
    for s in _blocks(n):
        xb = flat[s : s + BLOCK]
        _fill_keep(np.abs(xb, out=ws.a[: xb.size]), s, sel, out[s : s + xb.size])
    mask = torch.from_numpy(out).reshape(x.shape)
    return mask if x.device.type == "cpu" else mask.to(x.device)


# ----------------------------------------------------------------------------------------------------------------
# Deterministic random numbers
# ----------------------------------------------------------------------------------------------------------------


class _U32Stream:
    """The uint32 sequence of :func:`uniform_u32`, drawn incrementally (block sizes never change it)."""

    def __init__(self, seed: int, index: int):
        self._bits = np.random.PCG64(np.random.SeedSequence([seed, index]))
        self._pending: np.ndarray | None = None  # the unused high half of the last 64-bit draw

    def take(self, count: int) -> np.ndarray:
        head = 0
        out_parts = []
        if count and self._pending is not None:
            out_parts.append(self._pending)
            self._pending = None
            head = 1
        rest = count - head
        if rest > 0:
            raw = self._bits.random_raw((rest + 1) // 2)
            halves = raw.astype("<u8", copy=False).view("<u4")  # low half first, on any byte order
            out_parts.append(halves[:rest])
            if rest % 2:
                self._pending = halves[rest:].copy()
        if len(out_parts) == 1:
            return out_parts[0]
        return np.concatenate(out_parts) if out_parts else np.empty(0, np.uint32)


def uniform_u32(seed: int, index: int, count: int) -> np.ndarray:
    """The first ``count`` uint32 draws of input ``index`` under ``seed``.

    Definition: PCG64 seeded by ``numpy.random.SeedSequence([seed, index])``; raw 64-bit outputs ``r_0, r_1, ...``
    (``PCG64.random_raw``); draw ``j`` is the low 32 bits of ``r_{j//2}`` when ``j`` is even and the high 32 bits
    when it is odd. Entry ``j`` of a tensor (row-major flat index) is kept with probability ``p`` iff
    ``u_j < floor(p * 2**32)``.
    """
    return _U32Stream(check_seed("uniform_u32", seed), index).take(count)


def _u32_threshold(p: float) -> int:
    return math.floor(p * _TWO32)


# ----------------------------------------------------------------------------------------------------------------
# Per-input terms: tau_i = coef_i * mask_i * T_i (optionally times a per-entry factor)
# ----------------------------------------------------------------------------------------------------------------


class _Term:
    """One input's contribution, written block by block (blocks are requested in increasing order)."""

    def __init__(self, flat: np.ndarray, coef: float):
        self.flat = flat
        self.coef = _f32(coef)

    def write(self, start: int, out: np.ndarray, ws: _Workspace) -> None:
        np.multiply(self.flat[start : start + out.size], self.coef, out=out)


class _TopKTerm(_Term):
    def __init__(self, flat: np.ndarray, coef: float, sel: _Selection):
        super().__init__(flat, coef)
        self.sel = sel

    def write(self, start: int, out: np.ndarray, ws: _Workspace) -> None:
        x = self.flat[start : start + out.size]
        keep = ws.keep[: x.size]
        _fill_keep(np.abs(x, out=ws.a[: x.size]), start, self.sel, keep)
        np.multiply(x, self.coef, out=out)
        np.multiply(out, keep, out=out)


class _BandTerm(_Term):
    """Keeps the entries selected by ``outer`` but not by ``inner`` (Model Breadcrumbs)."""

    def __init__(self, flat: np.ndarray, coef: float, outer: _Selection, inner: _Selection):
        super().__init__(flat, coef)
        self.outer, self.inner = outer, inner

    def write(self, start: int, out: np.ndarray, ws: _Workspace) -> None:
        x = self.flat[start : start + out.size]
        a, keep, inner = ws.a[: x.size], ws.keep[: x.size], ws.keep2[: x.size]
        np.abs(x, out=a)
        _fill_keep(a, start, self.outer, keep)
        _fill_keep(a, start, self.inner, inner)
        np.greater(keep, inner, out=keep)  # keep and not inner
        np.multiply(x, self.coef, out=out)
        np.multiply(out, keep, out=out)


class _BernoulliTerm(_Term):
    """DARE: keep each entry with probability ``density`` using the input's uint32 stream."""

    def __init__(self, flat: np.ndarray, coef: float, density: float, seed: int, index: int):
        super().__init__(flat, coef)
        self.threshold = _u32_threshold(density)
        self.stream = _U32Stream(seed, index)
        self.next_start = 0

    def write(self, start: int, out: np.ndarray, ws: _Workspace) -> None:
        assert start == self.next_start, "random terms must be written in block order"
        self.next_start = start + out.size
        x = self.flat[start : start + out.size]
        np.multiply(x, self.coef, out=out)
        if self.threshold >= _TWO32:
            return  # density 1 keeps everything
        u = self.stream.take(x.size)
        keep = np.less(u, np.uint32(self.threshold), out=ws.keep[: x.size])
        np.multiply(out, keep, out=out)


class _DellaTerm(_Term):
    """DELLA MagPrune: keep probability linear in the within-row magnitude rank, kept entries scaled by 1/p."""

    def __init__(
        self,
        flat: np.ndarray,
        coef: float,
        positions: np.ndarray,
        row_len: int,
        density: float,
        epsilon: float,
        rescale: bool,
        seed: int,
        index: int,
    ):
        super().__init__(flat, coef)
        self.positions = positions  # 0 = largest magnitude of its row
        p = della_probabilities(density, epsilon, row_len)
        # p depends only on the position, so thresholds and factors are tables indexed by it
        self.thresholds = np.floor(p * _TWO32).astype(np.uint64)
        self.factors = ((float(coef) / p) if rescale else np.full(row_len, float(coef))).astype(np.float32)
        self.stream = _U32Stream(seed, index)
        self.next_start = 0

    def write(self, start: int, out: np.ndarray, ws: _Workspace) -> None:
        assert start == self.next_start, "random terms must be written in block order"
        self.next_start = start + out.size
        x = self.flat[start : start + out.size]
        pos = self.positions[start : start + out.size]
        keep = np.less(self.stream.take(x.size), self.thresholds[pos], out=ws.keep[: x.size])
        np.multiply(x, self.factors[pos], out=out)
        np.multiply(out, keep, out=out)


def della_probabilities(density: float, epsilon: float, row_len: int) -> np.ndarray:
    """Keep probability (float64) of the entry at each descending-magnitude position 0..row_len-1 of a row.

    ``p_r = density + epsilon/2 - epsilon * r / (row_len - 1)``: from ``density + epsilon/2`` for the largest
    entry down to ``density - epsilon/2`` for the smallest (``density`` for a row of one entry).
    """
    if row_len <= 1:
        return np.full(row_len, float(density))
    r = np.arange(row_len, dtype=np.float64)
    return (density + epsilon / 2) - epsilon * (r / (row_len - 1))


# ----------------------------------------------------------------------------------------------------------------
# Merge kernels
# ----------------------------------------------------------------------------------------------------------------


def _sum_terms(terms: Sequence[_Term], n: int) -> np.ndarray:
    """sum_i tau_i, accumulated in input order."""
    out = np.empty(n, np.float32)
    ws = _Workspace(n)
    for s in _blocks(n):
        acc = out[s : s + BLOCK]
        tmp = ws.f[: acc.size]
        terms[0].write(s, acc, ws)
        for term in terms[1:]:
            term.write(s, tmp, ws)
            np.add(acc, tmp, out=acc)
    return out


def _ties_terms(
    terms: Sequence[_Term], abs_weights: Sequence[float], n: int, majority_sign: str, normalize: bool, scale: float
) -> np.ndarray:
    """Sign election and disjoint merge of already weighted, sparsified terms tau_i.

    g = sign(sum_i tau_i) ("total") or sign(sum_i sign(tau_i)) ("frequency"), 0 where that sum is 0; input i
    agrees where tau_i * g > 0; merged = sum of agreeing tau_i (input order) / sum of agreeing |w_i| (input
    order; divisor 1 without normalize), 0 where nothing agrees; times scale.
    """
    out = np.empty(n, np.float32)
    size = max(1, min(n, BLOCK))
    taus = [np.empty(size, np.float32) for _ in terms]
    g = np.empty(size, np.float32)
    g8 = np.empty(size, np.int8)
    den = np.empty(size, np.float32)
    pos = np.empty(size, np.bool_)
    neg = np.empty(size, np.bool_)
    ws = _Workspace(n)
    weights32 = [_f32(w) for w in abs_weights]
    scale32 = _f32(scale)
    zero = np.float32(0)
    for s in _blocks(n):
        num = out[s : s + BLOCK]
        m = num.size
        tau = [t[:m] for t in taus]
        gb, g8b, db, pb, nb, tmp = g[:m], g8[:m], den[:m], pos[:m], neg[:m], ws.f[:m]
        for term, t in zip(terms, tau):
            term.write(s, t, ws)
        # elect the sign: g = (S > 0) - (S < 0), S the sum of the values or of their signs
        if majority_sign == "total":
            np.copyto(gb, tau[0])
            for t in tau[1:]:
                np.add(gb, t, out=gb)
            np.greater(gb, zero, out=pb)
            np.less(gb, zero, out=nb)
        else:
            pos0 = np.greater(tau[0], zero, out=pb).view(np.int8)
            np.subtract(pos0, np.less(tau[0], zero, out=nb).view(np.int8), out=g8b)
            for t in tau[1:]:
                np.add(g8b, np.greater(t, zero, out=pb).view(np.int8), out=g8b)
                np.subtract(g8b, np.less(t, zero, out=nb).view(np.int8), out=g8b)
            np.greater(g8b, 0, out=pb)
            np.less(g8b, 0, out=nb)
        np.subtract(pb.view(np.int8), nb.view(np.int8), out=g8b)
        np.copyto(gb, g8b)
        # disjoint merge: sum the agreeing values and |weights| in input order
        for i, (t, w) in enumerate(zip(tau, weights32)):
            agree = np.greater(np.multiply(t, gb, out=tmp), zero, out=pb)
            if i == 0:
                np.multiply(t, agree, out=num)
                if normalize:
                    np.multiply(agree.view(np.uint8), w, out=db)
            else:
                np.add(num, np.multiply(t, agree, out=tmp), out=num)
                if normalize:
                    np.add(db, np.multiply(agree.view(np.uint8), w, out=tmp), out=db)
        if normalize:
            np.equal(db, zero, out=pb)
            np.add(db, pb.view(np.uint8), out=db)  # 0 -> 1 where nothing agrees (num is 0 there)
            np.divide(num, db, out=num)
        if scale != 1.0:
            np.multiply(num, scale32, out=num)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Linear operators
# ----------------------------------------------------------------------------------------------------------------


def linear_coefficients(weights: Sequence[float], normalize: bool) -> list[float]:
    """c_i of ``linear``: w_i / sum(w) with normalize, else w_i."""
    if not normalize:
        return [float(w) for w in weights]
    total = math.fsum(weights)
    if total == 0.0:
        raise ParameterError(f"linear: the weights sum to 0, so they cannot be normalized "
                             f"(pass {option('--no-normalize', 'normalize=False')}, or use task_arithmetic)")
    return [w / total for w in weights]


def _weighted_sum(inputs: _Inputs, coefficients: Sequence[float]) -> torch.Tensor:
    terms = [_Term(f, c) for f, c in zip(inputs.flats, coefficients)]
    return _result(inputs, _sum_terms(terms, inputs.numel))


@operator(
    "linear", form="coefficients", papers=(SOUPS_PAPER,),
    params=(Param("normalize", bool, True, "divide by the sum of the weights (weighted average)"),),
    summary="weighted average sum_i w_i dW_i / sum_i w_i (exact, computed in low-rank form)",
    coefficients=lambda w, p: linear_coefficients(w, bool(p["normalize"])),
)
def linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *, normalize: bool
) -> torch.Tensor:
    """Weighted average: ``sum_i w_i T_i / sum_i w_i`` (``normalize=False``: just ``sum_i w_i T_i``).

    Computed as ``sum_i c_i T_i`` with ``c_i = w_i / sum(w)`` (float64, rounded to float32 once), accumulated
    in input order. Raises ParameterError when normalizing weights that sum to 0.
    """
    op = "linear"
    inputs = _prepare(op, tensors)
    w = check_weights(op, weights, len(inputs.flats))
    return _weighted_sum(inputs, linear_coefficients(w, check_bool(op, "normalize", normalize)))


@operator(
    "task_arithmetic", form="coefficients", papers=(TA_PAPER,), params=(SCALE,),
    summary="scale * sum_i w_i dW_i, negative weights allowed (exact, computed in low-rank form)",
    coefficients=lambda w, p: [float(p["scale"]) * x for x in w],
)
def task_arithmetic(
    tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *, scale: float
) -> torch.Tensor:
    """Task arithmetic: ``scale * sum_i w_i T_i`` (negative weights allowed; ``scale`` is the papers' lambda).

    Ilharco et al., Editing Models with Task Arithmetic, arXiv:2212.04089. Computed as ``sum_i (scale*w_i) T_i``.
    """
    op = "task_arithmetic"
    inputs = _prepare(op, tensors)
    w = check_weights(op, weights, len(inputs.flats))
    lam = check_scalar(op, "scale", scale)
    return _weighted_sum(inputs, [lam * x for x in w])


@operator(
    "cat", form="coefficients", papers=(LORA_SOUPS_PAPER,), concat=True,
    summary="exact concatenation of the weighted LoRA factors, rank = sum of ranks (= sum_i w_i dW_i)",
    coefficients=lambda w, p: list(w),
)
def cat(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Concatenation merge at tensor level: exactly ``sum_i w_i T_i``.

    On LoRA factors the engine realizes this as the exact concatenation ``[w_1 B_1 ... w_n B_n] [A_1; ...; A_n]``
    (rank = sum of ranks); on dense tensors the two are the same thing.
    """
    op = "cat"
    inputs = _prepare(op, tensors)
    return _weighted_sum(inputs, check_weights(op, weights, len(inputs.flats)))


# ----------------------------------------------------------------------------------------------------------------
# Sparsifying operators
# ----------------------------------------------------------------------------------------------------------------


def _what(op: str, i: int) -> str:
    return f"{op}: tensors[{i}]"


def _topk_selections(op: str, inputs: _Inputs, densities: Sequence[float]) -> list[_Selection]:
    ws = _Workspace(inputs.numel)
    return [
        _select_topk(f, density_to_k(d, inputs.numel), ws, _what(op, i))
        for i, (f, d) in enumerate(zip(inputs.flats, densities))
    ]


@operator(
    "ties", form="dense", papers=(TIES_PAPER,),
    params=(_density(0.2, "kept by magnitude"), MAJORITY, NORMALIZE_TIES, SCALE),
    summary="trim each delta to its top-k magnitudes, elect a sign per entry, average the agreeing inputs",
)
def ties(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    density: float | Sequence[float],
    majority_sign: str,
    normalize: bool,
    scale: float,
) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023, arXiv:2306.01708): trim, elect sign, disjoint merge.

    1. Trim: keep exactly ``k_i = floor(density_i * numel + 0.5)`` entries of largest ``|T_i|`` (ties broken by
       lowest flat index), zero the rest.
    2. Weight *before* the election (mergekit convention): ``tau_i = w_i * trimmed_i``.
    3. Elect ``g = sign(sum_i tau_i)`` (``"total"``) or ``sign(sum_i sign(tau_i))`` (``"frequency"``).
    4. Disjoint merge: ``sum_i m_i tau_i / sum_i m_i |w_i|`` where ``m_i = [sign(tau_i) == g != 0]``; the divisor
       is 1 without ``normalize``; 0 where no input agrees. Result times ``scale``.
    """
    op = "ties"
    inputs = _prepare(op, tensors)
    count = len(inputs.flats)
    w = check_weights(op, weights, count)
    dens = per_input(op, "density", density, count, check_density)
    sign_rule = check_choice(op, "majority_sign", majority_sign, _MAJORITY_SIGNS)
    norm = check_bool(op, "normalize", normalize)
    lam = check_scalar(op, "scale", scale)
    sels = _topk_selections(op, inputs, dens)
    terms = [_TopKTerm(f, wi, sel) for f, wi, sel in zip(inputs.flats, w, sels)]
    return _result(inputs, _ties_terms(terms, [abs(x) for x in w], inputs.numel, sign_rule, norm, lam))


def model_topk_selections(magnitudes: Sequence[np.ndarray], density: float, what: str) -> list[_Selection]:
    """Exact top-k over the concatenation of several flat float32 arrays (``k = density_to_k(density, total)``;
    ties at the threshold by position in the concatenation), returned as one selection per array. This is the
    model-wide top-k of KnOTS' TIES: one threshold per input over every module."""
    flat = np.concatenate([x.reshape(-1) for x in magnitudes]) if magnitudes else np.empty(0, np.float32)
    sel = _select_topk(flat, density_to_k(density, flat.size), _Workspace(flat.size), what)
    out, start = [], 0
    for x in magnitudes:
        out.append(_Selection(t=sel.t, cut=min(max(sel.cut - start, 0), x.size)))
        start += x.size
    return out


def ties_selected(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None,
    selections: Sequence[_Selection],
    *,
    majority_sign: str = "total",
    normalize: bool = True,
    scale: float = 1.0,
) -> torch.Tensor:
    """:func:`ties` with the trim step's selections given (one per input, e.g. from
    :func:`model_topk_selections`) instead of each input's own top-k."""
    op = "ties"
    inputs = _prepare(op, tensors)
    w = check_weights(op, weights, len(inputs.flats))
    if len(selections) != len(inputs.flats):
        raise ParameterError(f"{op}: got {len(selections)} selections for {len(inputs.flats)} tensors")
    sign_rule = check_choice(op, "majority_sign", majority_sign, _MAJORITY_SIGNS)
    norm = check_bool(op, "normalize", normalize)
    lam = check_scalar(op, "scale", scale)
    terms = [_TopKTerm(f, wi, sel) for f, wi, sel in zip(inputs.flats, w, selections)]
    return _result(inputs, _ties_terms(terms, [abs(x) for x in w], inputs.numel, sign_rule, norm, lam))


@operator(
    "magnitude_prune", form="dense", papers=(TIES_PAPER,),
    params=(_density(0.2, "kept by magnitude"), SCALE),
    summary="keep each delta's top-k magnitudes, weighted sum (TIES without sign election)",
)
def magnitude_prune(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    density: float | Sequence[float],
    scale: float,
) -> torch.Tensor:
    """Magnitude pruning then task arithmetic: ``sum_i (scale*w_i) * topk(T_i, k_i)``, no sign election."""
    op = "magnitude_prune"
    inputs = _prepare(op, tensors)
    count = len(inputs.flats)
    w = check_weights(op, weights, count)
    dens = per_input(op, "density", density, count, check_density)
    lam = check_scalar(op, "scale", scale)
    sels = _topk_selections(op, inputs, dens)
    terms = [_TopKTerm(f, lam * wi, sel) for f, wi, sel in zip(inputs.flats, w, sels)]
    return _result(inputs, _sum_terms(terms, inputs.numel))


@operator(
    "breadcrumbs", form="dense", papers=(BREADCRUMBS_PAPER,),
    params=(_density(0.9, "kept after the outliers"), GAMMA, SCALE),
    summary="drop the largest (gamma) and the smallest magnitudes of each delta, weighted sum",
    check=lambda p: check_breadcrumbs("breadcrumbs", p["density"], p["gamma"]),
)
def breadcrumbs(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    density: float | Sequence[float],
    gamma: float,
    scale: float,
) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795): drop outliers and small entries.

    Ranking ``|T_i|`` descending (ties: lowest flat index first), drop the top ``g = floor(gamma*numel + 0.5)``
    entries, keep the next ``k_i = floor(density_i*numel + 0.5)``, zero everything else; then
    ``sum_i (scale*w_i) * kept_i``. Requires ``gamma`` in [0, 1) and ``gamma + density_i <= 1``.
    """
    op = "breadcrumbs"
    inputs = _prepare(op, tensors)
    count = len(inputs.flats)
    w = check_weights(op, weights, count)
    dens = per_input(op, "density", density, count, check_density)
    gam = check_scalar(op, "gamma", gamma)
    check_breadcrumbs(op, dens, gam)
    lam = check_scalar(op, "scale", scale)
    n = inputs.numel
    drop = density_to_k(gam, n)
    ws = _Workspace(n)
    terms: list[_Term] = []
    for i, (f, wi, d) in enumerate(zip(inputs.flats, w, dens)):
        outer = _select_topk(f, min(n, drop + density_to_k(d, n)), ws, _what(op, i))
        inner = _select_topk(f, drop, ws, _what(op, i))
        terms.append(_BandTerm(f, lam * wi, outer, inner))
    return _result(inputs, _sum_terms(terms, n))


def _dare_terms(
    inputs: _Inputs, coefs: Sequence[float], dens: Sequence[float], rescale: bool, seed: int
) -> list[_Term]:
    return [
        _BernoulliTerm(f, (c / d) if rescale else c, d, seed, i)
        for i, (f, c, d) in enumerate(zip(inputs.flats, coefs, dens))
    ]


@operator(
    "dare_linear", form="dense", papers=(DARE_PAPER,),
    params=(_density(0.5, "kept at random"), RESCALE, SCALE, SEED),
    summary="drop entries at random (keep prob. density), rescale by 1/density, weighted sum",
)
def dare_linear(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    density: float | Sequence[float],
    rescale: bool,
    scale: float,
    seed: int,
) -> torch.Tensor:
    """DARE (Yu et al. 2024, arXiv:2311.03099) then task arithmetic.

    Each entry of ``T_i`` is kept independently with probability ``density_i`` (input ``i``'s own seeded stream,
    see :func:`uniform_u32`), kept entries are multiplied by ``1/density_i`` if ``rescale``; the result is
    ``scale * sum_i w_i * dropped_i``, computed as ``sum_i c_i * kept_i * T_i`` with
    ``c_i = scale * w_i / density_i``.
    """
    op = "dare_linear"
    inputs = _prepare(op, tensors)
    count = len(inputs.flats)
    w = check_weights(op, weights, count)
    dens = per_input(op, "density", density, count, check_density)
    resc = check_bool(op, "rescale", rescale)
    lam = check_scalar(op, "scale", scale)
    sd = check_seed(op, seed)
    terms = _dare_terms(inputs, [lam * x for x in w], dens, resc, sd)
    return _result(inputs, _sum_terms(terms, inputs.numel))


@operator(
    "dare_ties", form="dense", papers=(DARE_PAPER, TIES_PAPER),
    params=(_density(0.5, "kept at random"), MAJORITY, RESCALE, NORMALIZE_TIES, SCALE, SEED),
    summary="DARE random drop and rescale, then TIES sign election and disjoint merge",
)
def dare_ties(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    density: float | Sequence[float],
    majority_sign: str,
    rescale: bool,
    normalize: bool,
    scale: float,
    seed: int,
) -> torch.Tensor:
    """DARE drop (as in :func:`dare_linear`), then TIES sign election and disjoint merge (as in :func:`ties`).

    ``tau_i = (w_i / density_i) * kept_i * T_i`` (``w_i * kept_i * T_i`` without ``rescale``); divisor
    ``sum_i m_i |w_i|`` with ``normalize``.
    """
    op = "dare_ties"
    inputs = _prepare(op, tensors)
    count = len(inputs.flats)
    w = check_weights(op, weights, count)
    dens = per_input(op, "density", density, count, check_density)
    sign_rule = check_choice(op, "majority_sign", majority_sign, _MAJORITY_SIGNS)
    resc = check_bool(op, "rescale", rescale)
    norm = check_bool(op, "normalize", normalize)
    lam = check_scalar(op, "scale", scale)
    sd = check_seed(op, seed)
    terms = _dare_terms(inputs, w, dens, resc, sd)
    return _result(inputs, _ties_terms(terms, [abs(x) for x in w], inputs.numel, sign_rule, norm, lam))


def _row_positions(flat: np.ndarray, shape: torch.Size, what: str) -> tuple[np.ndarray, int]:
    """Descending magnitude position of every entry within its row (0 = largest; ties: lowest index first).

    Rows: ``T.reshape(shape[0], -1)`` for tensors with 2+ dimensions, the whole tensor otherwise. Each row is
    ranked by sorting unique uint64 keys ``bits(|x|) << 32 | (row_len - 1 - column)`` (the bit pattern of a
    finite non-negative float32 orders like its value), a few rows at a time.
    """
    n = flat.size
    rows = int(shape[0]) if len(shape) >= 2 and n else 1
    row_len = n // rows if rows else 0
    positions = np.empty(n, np.int32)
    if n == 0:
        return positions, row_len
    step = max(1, BLOCK // row_len)
    width = min(rows, step) * row_len
    col = np.tile(np.arange(row_len, dtype=np.uint64), width // row_len)
    low = np.uint64(row_len - 1) - col  # tie-break: a lower column sorts later, i.e. counts as larger
    # after sorting, (row start + row_len - 1) - low is the flat index (within the block) of each sorted key
    base = np.repeat(np.arange(0, width, row_len, dtype=np.uint64) + np.uint64(row_len - 1), row_len)
    desc = (np.int32(row_len - 1) - col.astype(np.int32))  # ascending rank -> descending position
    a = np.empty(width, np.float32)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        xb = flat[r0 * row_len : r1 * row_len]
        m = xb.size
        ab = np.abs(xb, out=a[:m])
        if not math.isfinite(ab.max()):
            raise _not_finite(what)
        keys = ab.view(np.uint32).astype(np.uint64)
        np.left_shift(keys, np.uint64(32), out=keys)
        np.bitwise_or(keys, low[:m], out=keys)
        keys.reshape(r1 - r0, row_len).sort(axis=1)
        np.bitwise_and(keys, np.uint64(0xFFFFFFFF), out=keys)
        np.subtract(base[:m], keys, out=keys)
        positions[r0 * row_len : r1 * row_len][keys.view(np.int64)] = desc[:m]
    return positions, row_len


def _della_terms(
    op: str,
    inputs: _Inputs,
    coefs: Sequence[float],
    dens: Sequence[float],
    epsilon: float,
    rescale: bool,
    seed: int,
) -> list[_Term]:
    terms: list[_Term] = []
    for i, (f, c, d) in enumerate(zip(inputs.flats, coefs, dens)):
        positions, row_len = _row_positions(f, inputs.shape, _what(op, i))
        terms.append(_DellaTerm(f, c, positions, row_len, d, epsilon, rescale, seed, i))
    return terms


def _della_params(
    op: str, inputs: _Inputs, weights: Any, density: Any, epsilon: Any, rescale: Any, scale: Any, seed: Any
) -> tuple[list[float], list[float], float, bool, float, int]:
    count = len(inputs.flats)
    w = check_weights(op, weights, count)
    dens = per_input(op, "density", density, count, check_density)
    eps = check_scalar(op, "epsilon", epsilon)
    check_della(op, dens, eps)
    return w, dens, eps, check_bool(op, "rescale", rescale), check_scalar(op, "scale", scale), check_seed(op, seed)


@operator(
    "della", form="dense", papers=(DELLA_PAPER,),
    params=(_density(0.7, "kept on average"), EPSILON, MAJORITY, RESCALE, NORMALIZE_TIES, SCALE, SEED),
    summary="drop entries with probability falling with magnitude rank (MagPrune), then TIES election and merge",
    check=lambda p: check_della("della", p["density"], p["epsilon"]),
)
def della(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    density: float | Sequence[float],
    epsilon: float,
    majority_sign: str,
    rescale: bool,
    normalize: bool,
    scale: float,
    seed: int,
) -> torch.Tensor:
    """DELLA-Merging (Deep et al. 2024, arXiv:2406.11617): MagPrune drop, then TIES election and disjoint merge.

    Within each row (``T.reshape(shape[0], -1)``; 0-/1-D tensors are one row) of ``L`` entries, the entry at
    descending-magnitude position ``r`` (0 = largest, ties: lowest index first) is kept with probability
    ``p = density + epsilon/2 - epsilon * r / (L - 1)`` (``density`` when ``L == 1``), i.e. linearly from
    ``density + epsilon/2`` (largest) down to ``density - epsilon/2`` (smallest); kept entries are multiplied by
    ``1/p`` if ``rescale``. Then ``tau_i = w_i * dropped_i`` and sign election + disjoint merge as in
    :func:`ties`. Requires ``density - epsilon/2 > 0`` and ``density + epsilon/2 <= 1``.
    """
    op = "della"
    inputs = _prepare(op, tensors)
    w, dens, eps, resc, lam, sd = _della_params(op, inputs, weights, density, epsilon, rescale, scale, seed)
    sign_rule = check_choice(op, "majority_sign", majority_sign, _MAJORITY_SIGNS)
    norm = check_bool(op, "normalize", normalize)
    terms = _della_terms(op, inputs, w, dens, eps, resc, sd)
    return _result(inputs, _ties_terms(terms, [abs(x) for x in w], inputs.numel, sign_rule, norm, lam))


@operator(
    "della_linear", form="dense", papers=(DELLA_PAPER,),
    params=(_density(0.7, "kept on average"), EPSILON, RESCALE, SCALE, SEED),
    summary="DELLA's MagPrune drop, then weighted sum (no sign election)",
    check=lambda p: check_della("della_linear", p["density"], p["epsilon"]),
)
def della_linear(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    density: float | Sequence[float],
    epsilon: float,
    rescale: bool,
    scale: float,
    seed: int,
) -> torch.Tensor:
    """DELLA's MagPrune drop (as in :func:`della`), then ``scale * sum_i w_i * dropped_i`` (no sign election)."""
    op = "della_linear"
    inputs = _prepare(op, tensors)
    w, dens, eps, resc, lam, sd = _della_params(op, inputs, weights, density, epsilon, rescale, scale, seed)
    terms = _della_terms(op, inputs, [lam * x for x in w], dens, eps, resc, sd)
    return _result(inputs, _sum_terms(terms, inputs.numel))
