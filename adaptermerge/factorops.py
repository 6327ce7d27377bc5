"""Factor-form merge operators: every input's low-rank factors of one module in, low-rank factors out.

Each operator here gets ``factors[i] = (B_i, A_i)`` with the input's scale folded into ``B_i`` (``dW_i = B_i @ A_i``;
an input that lacks the module has rank 0: ``B_i`` is (m, 0), ``A_i`` is (0, n)), one weight per input, and returns
factors ``(B, A)`` of the merged delta. No m x n matrix is ever formed: every SVD is of a matrix with at most
``sum_i r_i`` columns, or of a ``sum r x sum r`` core. All arithmetic is float64; the engine truncates the result
optimally to the requested rank (by default it keeps it whole, so the result is exact).

* :func:`core_space` — the reference bases and core matrices of Core Space merging (Panariello et al. 2025), used by
  the engine for ``space = core`` of every element-wise operator and here for Iso-C / Iso-CTS / TSV-M.
* :func:`tsv_m`, :func:`iso_c`, :func:`iso_cts`, :func:`knots` — the operators (formulas in ``docs/operators.md``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from . import ops
from .errors import ParameterError
from .protocol import Paper, Param, operator

__all__ = ["core_space", "iso_c", "iso_cts", "joint_svd", "knots", "numerical_rank", "polar", "tsv_m"]

Factors = Sequence[tuple[torch.Tensor, torch.Tensor]]

_EPS32 = float(np.finfo(np.float32).eps)

CORE_PAPER = Paper("Panariello et al., Accurate and Efficient Low-Rank Model Merging in Core Space, NeurIPS 2025",
                   "2509.17786", "apanariello4/core-space-merging")
TSV_PAPER = Paper("Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025",
                  "2412.00081", "AntoAndGar/task_singular_vectors")
ISO_PAPER = Paper("Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
                  "Subspaces, ICML 2025", "2502.04959", "danielm1405/iso-merging")
KNOTS_PAPER = Paper("Stoica et al., Model merging with SVD to tie the KnOTS, ICLR 2025", "2410.19735",
                    "gstoica27/KnOTS")

_ALPHA = Param("alpha", float, 1.0, "multiplies the merged delta (the papers' alpha, tuned on validation data)")


# ----------------------------------------------------------------------------------------------------------------
# Helpers (float64 throughout)
# ----------------------------------------------------------------------------------------------------------------


def _check_factors(op: str, factors: Factors, weights: Sequence[float] | None) -> tuple[list, list[float], int, int]:
    if isinstance(factors, torch.Tensor) or not isinstance(factors, Sequence) or len(factors) == 0:
        raise ParameterError(f"{op}: factors must be a non-empty sequence of (B, A) pairs")
    out = []
    shape = None
    for i, pair in enumerate(factors):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ParameterError(f"{op}: factors[{i}] must be a (B, A) pair")
        b, a = pair
        if not (isinstance(b, torch.Tensor) and isinstance(a, torch.Tensor) and b.ndim == 2 and a.ndim == 2):
            raise ParameterError(f"{op}: factors[{i}] must be two 2-D tensors")
        if b.shape[1] != a.shape[0]:
            raise ParameterError(f"{op}: factors[{i}]: B is {tuple(b.shape)} but A is {tuple(a.shape)}")
        here = (b.shape[0], a.shape[1])
        if shape is not None and here != shape:
            raise ParameterError(f"{op}: factors[{i}] is {here[0]}x{here[1]} but factors[0] is {shape[0]}x{shape[1]}")
        shape = here
        out.append((b.detach().to("cpu", torch.float64), a.detach().to("cpu", torch.float64)))
    w = ops.check_weights(op, weights, len(out))
    return out, w, shape[0], shape[1]


def numerical_rank(s: torch.Tensor, m: int, n: int) -> int:
    """Singular values above ``s_max * max(m, n) * eps(float32)`` (numpy's ``matrix_rank`` rule at float32 precision:
    the deltas come from float32 factors, so anything smaller is round-off, not a direction)."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > float(s[0]) * max(m, n) * _EPS32).sum())


def polar(x: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns to ``x`` (m x k, m >= k) in Frobenius norm: ``P Q^T`` from
    ``x = P S Q^T``."""
    if x.shape[1] == 0:
        return x
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def _svd_of_product(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U, s, Vh`` of ``b @ a`` (m x r times r x n) without forming it: QR of both sides, SVD of the
    r x r core. Only the numerically non-zero singular triplets are returned."""
    m, n = b.shape[0], a.shape[1]
    if b.shape[1] == 0:
        return b.new_zeros(m, 0), b.new_zeros(0), b.new_zeros(0, n)
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    k = numerical_rank(s, m, n)
    return qb @ u[:, :k], s[:k], vh[:k] @ qa.T


def core_space(factors: Factors) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Core Space (Panariello et al. 2025): ``U_ref`` = left singular vectors of ``[B_1 ... B_T]`` (m x p),
    ``V_ref`` = right singular vectors of ``[A_1; ...; A_T]`` (q x n), both thin (p = min(m, R), q = min(R, n),
    R = sum r_i), and each input's core ``M_i = (U_ref^T B_i)(A_i V_ref^T)`` (p x q), so that
    ``B_i A_i = U_ref M_i V_ref`` exactly. Inputs are the (scaled) float factors; everything is float64."""
    bs = [b.double() for b, _ in factors]
    as_ = [a.double() for _, a in factors]
    u_ref = torch.linalg.svd(torch.cat(bs, 1), full_matrices=False)[0]
    v_ref = torch.linalg.svd(torch.cat(as_, 0), full_matrices=False)[2]
    cores = [(u_ref.T @ b) @ (a @ v_ref.T) for b, a in zip(bs, as_)]
    return u_ref, cores, v_ref


def _span_bases(fs: Factors, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases of the joint column span of the B's and the joint row span of the A's (numerical rank)."""
    bcat = torch.cat([b for b, _ in fs], 1)
    acat = torch.cat([a for _, a in fs], 0)
    if bcat.shape[1] == 0:
        return bcat.new_zeros(m, 0), bcat.new_zeros(0, n)
    ub, sb, _ = torch.linalg.svd(bcat, full_matrices=False)
    _, sa, va = torch.linalg.svd(acat, full_matrices=False)
    return ub[:, : numerical_rank(sb, m, bcat.shape[1])], va[: numerical_rank(sa, acat.shape[0], n)]


# ----------------------------------------------------------------------------------------------------------------
# TSV-M
# ----------------------------------------------------------------------------------------------------------------


@operator(
    "tsv_m", form="factors", papers=(TSV_PAPER,), params=(_ALPHA,),
    summary="Task Singular Vectors: each delta's singular vectors, decorrelated by the nearest orthogonal matrix",
    note="each input keeps min(rank, floor(min(m, n) / T)) singular triplets (all of a LoRA's, in practice); an "
         "input that lacks the module contributes no directions",
)
def tsv_m(factors: Factors, weights: Sequence[float] | None = None, *, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TSV-M (Gargiulo et al. 2025, arXiv:2412.00081) on low-rank deltas ``w_i B_i A_i``.

    Each input's SVD ``U_i S_i V_i^T`` keeps its top ``k = floor(min(m, n) / T)`` triplets (T inputs); the kept
    ``U_i``, ``S_i``, ``V_i`` are concatenated, ``U`` and ``V`` replaced by their polar factors (nearest matrices
    with orthonormal columns), and the result is ``alpha * U_perp diag(S) V_perp^T``. Returns (B, A) float64.
    """
    op = "tsv_m"
    fs, w, m, n = _check_factors(op, factors, weights)
    lam = ops.check_scalar(op, "alpha", alpha)
    k = max(1, min(m, n) // len(fs))
    us, ss, vhs = [], [], []
    for (b, a), wi in zip(fs, w):
        u, s, vh = _svd_of_product(b * wi, a)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    u_cat, s_cat, vh_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0)
    u_perp = polar(u_cat)
    v_perp = polar(vh_cat.T)
    return u_perp * (lam * s_cat), v_perp.T


# ----------------------------------------------------------------------------------------------------------------
# Iso-C and Iso-CTS
# ----------------------------------------------------------------------------------------------------------------


@operator(
    "iso_c", form="factors", papers=(ISO_PAPER,), params=(_ALPHA,),
    summary="Isotropic merging: the weighted sum's singular values all set to their mean, on the sum's span",
    note="the mean is over the sum's non-zero singular values, and the flat spectrum stays on the sum's span "
         "(the full-space recipe also spreads it over arbitrary null directions)",
)
def iso_c(factors: Factors, weights: Sequence[float] | None = None, *, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Iso-C (Marczak et al. 2025, arXiv:2502.04959): ``D = sum_i w_i B_i A_i = U S V^T`` (rank rho, its
    non-zero singular values), result ``alpha * mean(S) * U V^T``. Returns (B, A) float64."""
    op = "iso_c"
    fs, w, m, n = _check_factors(op, factors, weights)
    lam = ops.check_scalar(op, "alpha", alpha)
    u, s, vh = _svd_of_product(torch.cat([b * wi for (b, _), wi in zip(fs, w)], 1), torch.cat([a for _, a in fs], 0))
    if s.numel() == 0:
        return u, vh
    return u * (lam * float(s.mean())), vh


@operator(
    "iso_cts", form="factors", papers=(ISO_PAPER,),
    params=(
        _ALPHA,
        Param("common_fraction", float, 0.8, "share of the span kept as the common subspace (top singular "
              "directions of the sum); the rest is split evenly between the inputs' own directions",
              low=0.0, high=1.0, low_inclusive=False),
    ),
    summary="Isotropic merging in common and task-specific subspaces, computed in the inputs' joint span",
    note="computed on the joint span of the inputs (dimension d = its rank) instead of min(m, n): the full-space "
         "recipe would fill most of the common subspace with null directions of the low-rank sum",
)
def iso_cts(
    factors: Factors, weights: Sequence[float] | None = None, *, alpha: float, common_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Iso-CTS (Marczak et al. 2025, arXiv:2502.04959) in the joint span of the inputs.

    With ``Q_L``, ``Q_R`` orthonormal bases of the joint column / row spans (dimensions p, q; ``d = min(p, q)``)
    and ``C_i = w_i Q_L^T B_i A_i Q_R`` (p x q): ``c = d - round((d - floor(f d)) / T) * T`` common directions are
    the top left/right singular vectors of ``sum_i C_i``; each input adds the top ``(d - c) / T`` singular
    vectors of ``C_i - U_c U_c^T C_i``; the concatenated U and V are replaced by their polar factors, every
    singular value by the mean of the concatenated ones, and ``dW = alpha Q_L U_perp (mean S) V_perp^T Q_R^T``.
    Directions whose singular value is zero (arbitrary) are never added.
    Returns (B, A) float64.
    """
    op = "iso_cts"
    fs, w, m, n = _check_factors(op, factors, weights)
    lam = ops.check_scalar(op, "alpha", alpha)
    frac = ops.check_scalar(op, "common_fraction", common_fraction)
    if not 0.0 < frac <= 1.0:
        raise ParameterError(f"{op}: common_fraction must be in (0, 1], got {common_fraction!r}")
    q_l, q_r = _span_bases(fs, m, n)
    d = min(q_l.shape[1], q_r.shape[0])
    if d == 0:
        return q_l.new_zeros(m, 0), q_l.new_zeros(0, n)
    cores = [wi * ((q_l.T @ b) @ (a @ q_r.T)) for (b, a), wi in zip(fs, w)]
    t = len(cores)
    common = int(d * frac)
    common = d - round((d - common) / t) * t
    per_task = (d - common) // t
    u, s, vh = torch.linalg.svd(sum(cores[1:], cores[0]), full_matrices=False)
    # Directions with a zero singular value are arbitrary (any orthonormal completion would do) and carry no
    # input: they are not added, neither to the common part nor from an input whose residual vanishes.
    tol = max([float(torch.linalg.matrix_norm(c, 2)) for c in cores] + [float(s[0])]) * max(m, n) * _EPS32
    c_dim = min(common, int((s > tol).sum()))
    us, ss, vhs = [u[:, :c_dim]], [s[:c_dim]], [vh[:c_dim]]
    proj = torch.eye(u.shape[0], dtype=u.dtype) - us[0] @ us[0].T
    for c in cores:
        ui, si, vhi = torch.linalg.svd(proj @ c, full_matrices=False)
        keep = min(per_task, int((si > tol).sum()))
        us.append(ui[:, :keep])
        ss.append(si[:keep])
        vhs.append(vhi[:keep])
    u_perp = polar(torch.cat(us, 1))
    v_perp = polar(torch.cat(vhs, 0).T)
    mean = float(torch.cat(ss).mean())
    return q_l @ (u_perp * (lam * mean)), v_perp.T @ q_r


# ----------------------------------------------------------------------------------------------------------------
# KnOTS
# ----------------------------------------------------------------------------------------------------------------


def joint_svd(factors: Factors) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """KnOTS' joint SVD of ``[dW_1 | ... | dW_T] = U S [V_1^T ... V_T^T]`` from the factors: returns ``U`` (m x rho)
    and each input's block ``S V_i^T`` (rho x n), rho = the numerical rank of the concatenation.

    ``[B_1 A_1 | ... | B_T A_T] = [B_1 ... B_T] blockdiag(A_i)``; with ``[B_1 ... B_T] = Q R`` and
    ``A_i^T = Q_i R_i``, it is ``Q (R blockdiag(R_i^T)) blockdiag(Q_i)^T``, so the SVD of the small middle matrix
    gives the whole decomposition."""
    fs = [(b.double(), a.double()) for b, a in factors]
    m, n = fs[0][0].shape[0], fs[0][1].shape[1]
    bcat = torch.cat([b for b, _ in fs], 1)
    if bcat.shape[1] == 0:
        return bcat.new_zeros(m, 0), [bcat.new_zeros(0, n) for _ in fs]
    q, r = torch.linalg.qr(bcat)
    qs, cols, start = [], [], 0
    for _, a in fs:  # A_i^T = Q_i R_i, Q_i is n x k_i with k_i = min(n, r_i)
        ri = a.shape[0]
        if ri:
            qi, rri = torch.linalg.qr(a.T)
            qs.append(qi)
            cols.append(r[:, start : start + ri] @ rri.T)
        else:
            qs.append(None)
        start += ri
    u, s, vh = torch.linalg.svd(torch.cat(cols, 1), full_matrices=False)
    rho = numerical_rank(s, m, len(fs) * n)
    u, s, vh = u[:, :rho], s[:rho], vh[:rho]
    blocks, start = [], 0
    for qi in qs:
        if qi is None:
            blocks.append(u.new_zeros(rho, n))
            continue
        ki = qi.shape[1]
        blocks.append(s[:, None] * (vh[:, start : start + ki] @ qi.T))
        start += ki
    return q @ u, blocks


_KNOTS_MERGES = ("ties", "dare_ties")


def _knots_model_wide(p: Mapping[str, Any]) -> bool:
    return p["topk"] == "model"


def _knots_check(p: Mapping[str, Any]) -> None:
    if p["topk"] == "model" and p["merge"] != "ties":
        raise ParameterError("knots: topk=model is the top-k of merge=ties (dare_ties drops at random)")


def _knots_collect(factors: Factors, weights: Sequence[float] | None = None, **_: Any) -> list[np.ndarray]:
    """Each input's |S V_i^T| entries (float32, as the merge will see them), for the model-wide top-k."""
    _, blocks = joint_svd([(b.double(), a.double()) for b, a in factors])
    return [np.abs(x.float().numpy()).reshape(-1) for x in blocks]


def _knots_combine(stats: Sequence[list[np.ndarray]], *, density: Sequence[float], **_: Any) -> list[list[Any]]:
    """One exact top-k per input over every module (the paper's model-wide top-k): per module, each input's
    selection."""
    n_inputs = len(stats[0]) if stats else 0
    per_input = [
        ops.model_topk_selections([s[i] for s in stats], density[i], f"knots: input {i}") for i in range(n_inputs)
    ]
    return [[per_input[i][j] for i in range(n_inputs)] for j in range(len(stats))]


@operator(
    "knots", form="factors", papers=(KNOTS_PAPER, ops.TIES_PAPER, ops.DARE_PAPER),
    params=(
        Param("merge", str, "ties", "how the per-input S V_i^T blocks are merged", choices=_KNOTS_MERGES),
        Param("density", float, 1.0, "fraction of each input's S V_i^T entries kept (ties: by magnitude, "
              "dare_ties: at random); one value or one per input", low=0.0, high=1.0, low_inclusive=False,
              per_input=True),
        Param("topk", str, "module", "merge=ties: where each input's top-k is taken: per module, or over the whole "
              "model (the paper's)", choices=("module", "model")),
        ops.MAJORITY, ops.RESCALE, ops.NORMALIZE_TIES, ops.SCALE, ops.SEED,
    ),
    check=_knots_check, model_wide=_knots_model_wide, collect=_knots_collect, combine=_knots_combine,
    summary="KnOTS: joint SVD of the deltas, TIES or DARE-TIES on the per-input S V_i^T blocks, dW = U merged",
    note="default density 1.0 (the reference repository's LoRA setting, topK 100); rescale applies to dare_ties",
)
def knots(
    factors: Factors,
    weights: Sequence[float] | None = None,
    *,
    merge: str,
    density: float | Sequence[float],
    topk: str,
    majority_sign: str,
    rescale: bool,
    normalize: bool,
    scale: float,
    seed: int,
    context: Sequence[Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KnOTS (Stoica et al. 2025, arXiv:2410.19735): ``[dW_1 | ... | dW_T] = U S [V_1^T ... V_T^T]`` (joint SVD,
    :func:`joint_svd`); ``ops.ties`` (or ``ops.dare_ties``) on the blocks ``S V_i^T`` with the weights and
    parameters given; result ``U @ merged``. With ``topk="model"`` the engine passes ``context``: each input's
    trim selection from one top-k over the whole model. Returns (B, A) float64."""
    op = "knots"
    fs, w, m, n = _check_factors(op, factors, weights)
    ops.check_choice(op, "merge", merge, _KNOTS_MERGES)
    ops.check_choice(op, "topk", topk, ("module", "model"))
    if topk == "model" and context is None:
        raise ParameterError(f"{op}: topk=model needs every module's statistics: merge with the engine "
                             "(adaptermerge.merge), which makes a first pass over the model")
    u, blocks = joint_svd(fs)
    if u.shape[1] == 0:
        return u, u.new_zeros(0, n)
    tensors = [x.float() for x in blocks]
    if merge == "ties":
        if topk == "model":
            merged = ops.ties_selected(tensors, w, context, majority_sign=majority_sign, normalize=normalize,
                                       scale=scale)
        else:
            merged = ops.ties(tensors, w, density=density, majority_sign=majority_sign, normalize=normalize,
                              scale=scale)
    else:
        merged = ops.dare_ties(tensors, w, density=density, majority_sign=majority_sign, rescale=rescale,
                               normalize=normalize, scale=scale, seed=seed)
    return u, merged.double()
