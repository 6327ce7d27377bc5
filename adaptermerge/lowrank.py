"""Delta algebra: low-rank sums, their optimal truncation, and fast truncation of dense deltas.

* :func:`truncate_factors` — the optimal rank-R approximation of ``sum_i B_i @ A_i`` without forming it:
  QR of the stacked B's and of the stacked A's transposed, then the SVD of the small (sum r) x (sum r) core.
  Cost O((m + n) * R_total^2) instead of O(m * n * min(m, n)); the result is exact (Eckart-Young) up to float64
  round-off, and the relative error is read off the discarded singular values.
* :func:`truncate_dense` — the rank-R approximation of a dense matrix by a seeded randomized SVD with power
  iterations (Halko, Martinsson & Tropp 2011), or by an exact SVD. Its relative Frobenius error follows from the
  singular values (exactly, see the function), with the residual formed only when that error is tiny.
* :func:`full_rank_factors` — an exact factorisation ``D = B @ A`` of rank min(m, n) with no SVD at all.

Factors returned are balanced: the singular values are split as sqrt(S) between B and A.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np
import torch


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    root = s.clamp_min(0).sqrt()
    return u * root, root[:, None] * vh


def truncate_factors(
    bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors (B, A) of ``sum_i bs[i] @ as_[i]``, and the relative Frobenius error.

    ``bs[i]`` is (m, r_i), ``as_[i]`` is (r_i, n). The output rank is ``min(rank, sum r_i, m, n)``; singular values
    that are zero stay in as zero columns so the output shape depends only on the input shapes.
    """
    b = torch.cat([x.double() for x in bs], dim=1)
    a = torch.cat([x.double() for x in as_], dim=0)
    m, total = b.shape
    n = a.shape[1]
    k = min(rank, total, m, n)
    qb, rb = torch.linalg.qr(b)  # (m, p), (p, total) with p = min(m, total)
    qa, ra = torch.linalg.qr(a.T)  # (n, q), (q, total)
    core = rb @ ra.T  # (p, q): the whole delta is qb @ core @ qa.T
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    energy = float((s * s).sum())
    dropped = float((s[k:] * s[k:]).sum())
    err = math.sqrt(dropped / energy) if energy > 0 else 0.0
    bu, av = _split(u[:, :k], s[:k], vh[:k])
    return (qb @ bu).float(), (av @ qa.T).float(), err


def concat_factors(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of ``sum_i bs[i] @ as_[i]``: the concatenation, rank = sum of ranks."""
    return torch.cat([x.float() for x in bs], dim=1), torch.cat([x.float() for x in as_], dim=0)


def full_rank_factors(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of a dense (m, n) delta with rank min(m, n) and no SVD: (D, I) or (I, D)."""
    m, n = d.shape
    if m >= n:
        return d.float().clone(), torch.eye(n, dtype=torch.float32)
    return torch.eye(m, dtype=torch.float32), d.float().clone()


def gaussian(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A seeded standard normal matrix, identical across platforms and thread counts (numpy PCG64)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, rows, cols])))
    return torch.from_numpy(rng.standard_normal((rows, cols), dtype=np.float32))


def truncate_dense(
    d: torch.Tensor,
    rank: int,
    *,
    method: Literal["randomized", "exact"] = "randomized",
    niter: int = 2,
    oversample: int = 8,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-``rank`` factors (B, A) of the dense matrix ``d`` and the relative Frobenius error ||D - BA|| / ||D||.

    ``randomized``: sketch with ``rank + oversample`` seeded Gaussian columns, ``niter`` power iterations with QR
    re-orthonormalisation, SVD of the small projected matrix. It holds O((m + n) * (rank + oversample)) extra
    memory. ``exact``: LAPACK's thin SVD of ``d`` (slow for large modules, for reference).
    """
    d = d.float()
    m, n = d.shape
    k = min(rank, m, n)
    if method == "exact":
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        b, a = _split(u[:, :k], s[:k], vh[:k])
    else:
        ell = min(k + oversample, m, n)
        # Work on the orientation with the smaller side as the sketch dimension to keep temporaries small.
        transpose = m < n
        x = d.T if transpose else d  # (M, N) with M >= N
        q, _ = torch.linalg.qr(x @ gaussian(x.shape[1], ell, seed))
        for _ in range(niter):
            z, _ = torch.linalg.qr(x.T @ q)
            q, _ = torch.linalg.qr(x @ z)
        small = q.T @ x  # (ell, N)
        ub, s, vh = torch.linalg.svd(small, full_matrices=False)
        bx, ax = _split(q @ ub[:, :k], s[:k], vh[:k])
        b, a = (ax.T, bx.T) if transpose else (bx, ax)
    b, a = b.contiguous(), a.contiguous()
    total = frobenius2(d)
    if total == 0.0:
        return b, a, 0.0
    # ||D - B A||^2 = ||D||^2 - sum_{j<=k} s_j^2 exactly: the residual splits into (I - QQ^T) D and
    # Q (Q^T D - U_k S_k V_k^T), orthogonal to each other (Q = I for the exact SVD). No residual is formed
    # unless the difference is too small to trust (float32 singular values carry ~1e-7 relative error).
    kept = float(s[:k].double().square().sum())
    err2 = max(total - kept, 0.0) / total
    if err2 < _CLOSED_FORM_MIN_ERR2:
        err2 = frobenius2(d - b @ a) / total
    return b, a, math.sqrt(err2)


#: Below a relative error of 1e-3 the closed form is dominated by round-off; the residual is measured instead.
_CLOSED_FORM_MIN_ERR2 = 1e-6


def frobenius2(x: torch.Tensor) -> float:
    """||x||_F^2 of a 2-D float32 tensor: float32 row norms (one pass, no copy) squared and summed in float64;
    a float64 pass where a row's norm overflows float32."""
    if x.numel() == 0:
        return 0.0
    out = float(torch.linalg.vector_norm(x, dim=1).double().square().sum())
    return out if math.isfinite(out) else float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2


def delta_inner(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """Frobenius inner product <B1 A1, B2 A2> = sum((B1^T B2) * (A1 A2^T)), without forming either product."""
    return float(((b1.double().T @ b2.double()) * (a1.double() @ a2.double().T)).sum())


def delta_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """Frobenius norm of B @ A from the factors alone."""
    return math.sqrt(max(delta_inner(b, a, b, a), 0.0))
