"""Ranking metrics, bootstrap confidence intervals, the authors' generate-top-5 protocol, cold-start buckets.

Pure numpy. Conventions:

* A **rank** is the 0-based position of the true item in the model's ordering of the candidates (0 = first).
  ``HR@K = [rank < K]``, ``NDCG@K = [rank < K] / log2(rank + 2)`` (one relevant item, so IDCG = 1), and
  ``MRR = 1 / (rank + 1)`` over the *whole* candidate list (not truncated).
* **Ties** between the true item's score and other candidates' scores (``ties=``):

  - ``"expected"`` (default): the exact expectation of each metric under uniformly random tie-breaking; a
    constant scorer gets chance-level metrics, never better.
  - ``"pessimistic"``: every tied candidate is ranked before the true item (a constant scorer gets rank C-1).
  - ``"optimistic"``: every tied candidate is ranked after it (inflates results; for diagnosis only).

  NaN scores are an error. With float scores from an LLM, ties are rare; with counts (popularity) they are not.
* The **generate protocol** (the authors'): the model returns a top-5 list of titles; the rank is the first
  position whose title equals the target title exactly (after trimming surrounding whitespace; no case folding),
  and metrics are NDCG@1/3/5 and MRR@5 (``1/(rank+1)`` if found in the top 5, else 0).
* **Bootstrap**: resample users with replacement ``n_boot`` times; the CI is the percentile interval. All metrics
  of one call share the same resamples; :func:`paired_difference` resamples the same users for both systems.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from adaptermerge.errors import IncompatibleInputsError, ParameterError

__all__ = [
    "DEFAULT_BUCKET_EDGES",
    "GENERATE_METRICS",
    "RANK_METRICS",
    "Difference",
    "Summary",
    "bootstrap_indices",
    "bucket_labels",
    "bucket_users",
    "generated_topk_metrics",
    "metrics_from_generations",
    "metrics_from_ranks",
    "metrics_from_scores",
    "paired_difference",
    "rank_of_target",
    "summarize",
    "summarize_by_bucket",
]

#: Metric names produced by :func:`metrics_from_ranks` / :func:`metrics_from_scores` with default cut-offs.
RANK_METRICS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR")
#: Metric names produced by :func:`generated_topk_metrics` (the authors' protocol) with default cut-offs.
GENERATE_METRICS = ("NDCG@1", "NDCG@3", "NDCG@5", "MRR@5")
#: Default cold-start bucket edges: ``<=3``, ``4-10``, ``>10`` earlier items in the domain.
DEFAULT_BUCKET_EDGES = (3, 10)

_TIES = ("expected", "pessimistic", "optimistic")


# --------------------------------------------------------------------------------------------------------------------
# Ranks and per-user metrics
# --------------------------------------------------------------------------------------------------------------------


def _check_ks(name: str, ks: Sequence[int]) -> tuple[int, ...]:
    out = tuple(ks)
    if not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1 for k in out):
        raise ParameterError(f"{name} must be integers >= 1, got {list(out)}")
    return out


def _metric_values(ranks: np.ndarray, hr_ks: Sequence[int], ndcg_ks: Sequence[int], mrr: bool) -> dict[str, np.ndarray]:
    """Metric values at integer ranks (any array shape)."""
    out: dict[str, np.ndarray] = {}
    for k in hr_ks:
        out[f"HR@{k}"] = (ranks < k).astype(np.float64)
    gain = 1.0 / np.log2(ranks + 2.0)
    for k in ndcg_ks:
        out[f"NDCG@{k}"] = np.where(ranks < k, gain, 0.0)
    if mrr:
        out["MRR"] = 1.0 / (ranks + 1.0)
    return out


def metrics_from_ranks(
    ranks: Sequence[int] | np.ndarray,
    *,
    hr_ks: Sequence[int] = (1, 5, 10),
    ndcg_ks: Sequence[int] = (5, 10),
) -> dict[str, np.ndarray]:
    """Per-user HR@K, NDCG@K and MRR from 0-based integer ranks of the true item; one float64 array per metric."""
    hr_ks, ndcg_ks = _check_ks("hr_ks", hr_ks), _check_ks("ndcg_ks", ndcg_ks)
    arr = np.asarray(ranks)
    if arr.ndim != 1:
        raise ParameterError(f"ranks must be one-dimensional, got shape {arr.shape}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0):
        raise ParameterError("ranks must be non-negative integers (0 = the true item is first)")
    return _metric_values(arr.astype(np.float64), hr_ks, ndcg_ks, mrr=True)


def rank_of_target(scores: Sequence[float] | np.ndarray, target_index: int, *, ties: str = "expected") -> float:
    """0-based rank of ``scores[target_index]`` among ``scores`` (higher score = better).

    ``ties="pessimistic"`` counts tied candidates before the target, ``"optimistic"`` after it, ``"expected"``
    returns the mean rank under random tie-breaking (may be fractional: use :func:`metrics_from_scores` for
    metrics, which averages the metrics themselves, not the rank).
    """
    greater, tied = _greater_and_tied(np.asarray(scores, dtype=np.float64), target_index)
    if ties == "pessimistic":
        return float(greater + tied)
    if ties == "optimistic":
        return float(greater)
    if ties == "expected":
        return greater + tied / 2.0
    raise ParameterError(f"ties must be one of {list(_TIES)}, got {ties!r}")


def _greater_and_tied(scores: np.ndarray, target_index: int) -> tuple[int, int]:
    """How many other candidates score strictly higher than the target, and how many exactly equal."""
    if scores.ndim != 1 or scores.size == 0:
        raise ParameterError(f"scores must be a non-empty 1-D array, got shape {scores.shape}")
    if not 0 <= target_index < scores.size:
        raise ParameterError(f"target_index {target_index} is outside the {scores.size} candidate scores")
    if np.isnan(scores).any():
        raise ParameterError("scores contain NaN; cannot rank the candidates")
    t = scores[target_index]
    greater = int((scores > t).sum())
    tied = int((scores == t).sum()) - 1
    return greater, tied


def metrics_from_scores(
    scores: Sequence[Sequence[float] | np.ndarray],
    target_indices: Sequence[int],
    *,
    ties: str = "expected",
    hr_ks: Sequence[int] = (1, 5, 10),
    ndcg_ks: Sequence[int] = (5, 10),
) -> dict[str, np.ndarray]:
    """Per-user metrics from candidate scores (one array per user, higher = better) and the true item's index.

    Candidate lists may differ in length between users. See the module docstring for ``ties``.
    """
    if ties not in _TIES:
        raise ParameterError(f"ties must be one of {list(_TIES)}, got {ties!r}")
    hr_ks, ndcg_ks = _check_ks("hr_ks", hr_ks), _check_ks("ndcg_ks", ndcg_ks)
    if len(scores) != len(target_indices):
        raise IncompatibleInputsError(f"{len(scores)} score arrays but {len(target_indices)} target indices")
    names = [f"HR@{k}" for k in hr_ks] + [f"NDCG@{k}" for k in ndcg_ks] + ["MRR"]
    out = {name: np.zeros(len(scores)) for name in names}
    for u, (s, t) in enumerate(zip(scores, target_indices)):
        greater, tied = _greater_and_tied(np.asarray(s, dtype=np.float64), int(t))
        if ties == "pessimistic" or tied == 0:
            positions = np.array([greater + tied], dtype=np.float64)
        elif ties == "optimistic":
            positions = np.array([greater], dtype=np.float64)
        else:  # uniformly random position among the tie group
            positions = np.arange(greater, greater + tied + 1, dtype=np.float64)
        for name, values in _metric_values(positions, hr_ks, ndcg_ks, mrr=True).items():
            out[name][u] = values.mean()
    return out


def generated_topk_metrics(
    generated_titles: Sequence[str], target_title: str, *, ks: Sequence[int] = (1, 3, 5), topk: int = 5
) -> dict[str, float]:
    """The authors' generate protocol for one user: exact title match within the first ``topk`` generated titles.

    Returns ``NDCG@k`` for ``k`` in ``ks`` and ``MRR@<topk>``; all zero when the target is not among them.
    Titles are compared after trimming surrounding whitespace; the first matching position counts.
    """
    ks = _check_ks("ks", ks)
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ParameterError(f"topk must be an integer >= 1, got {topk!r}")
    if max(ks) > topk:
        raise ParameterError(f"NDCG cut-offs {list(ks)} exceed the top-{topk} list")
    if isinstance(generated_titles, str):
        raise ParameterError("generated_titles must be a list of titles, not one string")
    target = target_title.strip()
    rank = next((i for i, t in enumerate(list(generated_titles)[:topk]) if str(t).strip() == target), None)
    out = {f"NDCG@{k}": (1.0 / np.log2(rank + 2.0) if rank is not None and rank < k else 0.0) for k in ks}
    out[f"MRR@{topk}"] = 1.0 / (rank + 1.0) if rank is not None else 0.0
    return {k: float(v) for k, v in out.items()}


def metrics_from_generations(
    generations: Sequence[Sequence[str]],
    target_titles: Sequence[str],
    *,
    ks: Sequence[int] = (1, 3, 5),
    topk: int = 5,
) -> dict[str, np.ndarray]:
    """:func:`generated_topk_metrics` for many users: ``{metric: per-user values}`` (ready for :func:`summarize`)."""
    if len(generations) != len(target_titles):
        raise IncompatibleInputsError(f"{len(generations)} generated lists but {len(target_titles)} target titles")
    rows = [generated_topk_metrics(g, t, ks=ks, topk=topk) for g, t in zip(generations, target_titles)]
    names = [f"NDCG@{k}" for k in ks] + [f"MRR@{topk}"]
    return {name: np.array([r[name] for r in rows], dtype=np.float64) for name in names}


# --------------------------------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Mean of one metric over users with a percentile-bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "confidence": self.confidence}


@dataclass(frozen=True)
class Difference:
    """Mean paired difference ``a - b`` with a paired bootstrap CI and a two-sided bootstrap p-value."""

    mean: float
    low: float
    high: float
    p_value: float
    n: int
    confidence: float

    def as_dict(self) -> dict[str, float | int]:
        return {
            "mean": self.mean,
            "low": self.low,
            "high": self.high,
            "p_value": self.p_value,
            "n": self.n,
            "confidence": self.confidence,
        }


def _check_boot(n_boot: int, confidence: float, seed: int) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ParameterError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise ParameterError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ParameterError(f"seed must be a non-negative integer, got {seed!r}")


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n)`` user indices resampled with replacement, from a generator seeded by ``seed`` only."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), 0xB007])).integers(0, n, size=(n_boot, n))


def _boot_means(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Bootstrap means of ``values`` over resampled rows, chunked to bound memory."""
    out = np.empty(idx.shape[0])
    step = max(1, 4_000_000 // max(1, idx.shape[1]))
    for start in range(0, idx.shape[0], step):
        out[start : start + step] = values[idx[start : start + step]].mean(axis=1)
    return out


def _as_metric_arrays(per_user: Mapping[str, Sequence[float]] | Sequence[Mapping[str, float]]) -> dict[str, np.ndarray]:
    """Accept ``{metric: per-user values}`` or ``[{metric: value} per user]``; return float arrays of one length."""
    if isinstance(per_user, Mapping):
        arrays = {str(k): np.asarray(v, dtype=np.float64) for k, v in per_user.items()}
    else:
        rows = list(per_user)
        if not rows:
            raise ParameterError("per-user metrics are empty")
        keys = list(rows[0])
        if any(set(r) != set(keys) for r in rows):
            raise IncompatibleInputsError("per-user metric dicts do not all have the same metric names")
        arrays = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in keys}
    if not arrays:
        raise ParameterError("per-user metrics are empty")
    lengths = {k: a.shape for k, a in arrays.items()}
    if any(len(s) != 1 for s in lengths.values()) or len(set(lengths.values())) != 1:
        raise IncompatibleInputsError(f"per-user metrics must be 1-D arrays of one length, got shapes {lengths}")
    if next(iter(arrays.values())).size == 0:
        raise ParameterError("per-user metrics have no users")
    for k, a in arrays.items():
        if not np.isfinite(a).all():
            raise ParameterError(f"metric {k!r} has non-finite per-user values")
    return arrays


def summarize(
    per_user: Mapping[str, Sequence[float]] | Sequence[Mapping[str, float]],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Summary]:
    """Mean and percentile-bootstrap CI over users for every metric (all metrics share the same resamples)."""
    _check_boot(n_boot, confidence, seed)
    arrays = _as_metric_arrays(per_user)
    n = next(iter(arrays.values())).size
    idx = bootstrap_indices(n, n_boot, seed)
    alpha = (1.0 - confidence) / 2.0
    out: dict[str, Summary] = {}
    for name, values in arrays.items():
        boots = _boot_means(values, idx)
        lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
        out[name] = Summary(float(values.mean()), float(lo), float(hi), n, float(confidence))
    return out


def paired_difference(
    a: Mapping[str, Sequence[float]] | Sequence[float],
    b: Mapping[str, Sequence[float]] | Sequence[float],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Difference | dict[str, Difference]:
    """Mean of ``a - b`` over the same users (same order) with a paired bootstrap CI.

    ``a`` and ``b`` are per-user values of one metric (returns a :class:`Difference`) or ``{metric: values}``
    dicts with the same metrics (returns ``{metric: Difference}``). The p-value is two-sided:
    ``min(1, 2 * min(P*(diff <= 0), P*(diff >= 0)))`` over the bootstrap distribution.
    """
    _check_boot(n_boot, confidence, seed)
    single = not isinstance(a, Mapping)
    if single != (not isinstance(b, Mapping)):
        raise ParameterError("a and b must both be per-user arrays or both be {metric: values} dicts")
    da = _as_metric_arrays({"value": a} if single else a)
    db = _as_metric_arrays({"value": b} if single else b)
    if set(da) != set(db):
        raise IncompatibleInputsError(f"a and b have different metrics: {sorted(da)} vs {sorted(db)}")
    n = next(iter(da.values())).size
    if next(iter(db.values())).size != n:
        raise IncompatibleInputsError(f"a has {n} users but b has {next(iter(db.values())).size}; pair the same users")
    idx = bootstrap_indices(n, n_boot, seed)
    alpha = (1.0 - confidence) / 2.0
    out: dict[str, Difference] = {}
    for name in da:
        diff = da[name] - db[name]
        boots = _boot_means(diff, idx)
        lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
        p = min(1.0, 2.0 * min(float((boots <= 0).mean()), float((boots >= 0).mean())))
        out[name] = Difference(float(diff.mean()), float(lo), float(hi), p, n, float(confidence))
    return out["value"] if single else out


# --------------------------------------------------------------------------------------------------------------------
# Cold-start buckets
# --------------------------------------------------------------------------------------------------------------------


def _check_edges(edges: Sequence[int]) -> tuple[int, ...]:
    out = tuple(edges)
    if not all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) and e >= 0 for e in out):
        raise ParameterError(f"bucket edges must be non-negative integers, got {list(out)}")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ParameterError(f"bucket edges must be strictly increasing, got {list(out)}")
    return out


def bucket_labels(edges: Sequence[int] = DEFAULT_BUCKET_EDGES) -> list[str]:
    """Labels of the buckets cut at ``edges`` (inclusive upper bounds): ``(3, 10)`` -> ``<=3``, ``4-10``, ``>10``."""
    edges = _check_edges(edges)
    if not edges:
        return ["all"]
    labels = [f"<={edges[0]}"]
    for lo, hi in zip(edges, edges[1:]):
        labels.append(str(hi) if hi == lo + 1 else f"{lo + 1}-{hi}")
    labels.append(f">{edges[-1]}")
    return labels


def bucket_users(
    full_history_lens: Sequence[int] | np.ndarray, edges: Sequence[int] = DEFAULT_BUCKET_EDGES
) -> dict[str, np.ndarray]:
    """Group users (by position) by how many earlier items they have in the domain (``Sample.full_history_len``).

    Returns ``{label: indices}`` for every bucket of :func:`bucket_labels`, in order, empty buckets included.
    """
    edges = _check_edges(edges)
    lens = np.asarray(full_history_lens)
    if lens.ndim != 1 or (lens.size and (not np.issubdtype(lens.dtype, np.integer) or lens.min() < 0)):
        raise ParameterError("full_history_lens must be a 1-D sequence of non-negative integers")
    which = np.searchsorted(np.asarray(edges), lens, side="left") if edges else np.zeros(lens.size, dtype=np.int64)
    return {label: np.flatnonzero(which == b) for b, label in enumerate(bucket_labels(edges))}


def summarize_by_bucket(
    per_user: Mapping[str, Sequence[float]],
    full_history_lens: Sequence[int] | np.ndarray,
    edges: Sequence[int] = DEFAULT_BUCKET_EDGES,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, dict[str, Summary] | None]:
    """:func:`summarize` within each cold-start bucket; ``None`` for an empty bucket."""
    arrays = _as_metric_arrays(per_user)
    n = next(iter(arrays.values())).size
    if len(full_history_lens) != n:
        raise IncompatibleInputsError(f"{n} users have metrics but {len(full_history_lens)} have history lengths")
    out: dict[str, dict[str, Summary] | None] = {}
    for label, idx in bucket_users(full_history_lens, edges).items():
        out[label] = (
            summarize({k: v[idx] for k, v in arrays.items()}, n_boot=n_boot, seed=seed, confidence=confidence)
            if idx.size
            else None
        )
    return out
