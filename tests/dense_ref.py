"""Dense float64 reference implementations of the element-wise operators, written from the papers and the
conventions of docs/operators.md, without adaptermerge. Tests compare the engine's outputs against these."""

from __future__ import annotations

import math

import numpy as np
import torch


def k_of(density: float, numel: int) -> int:
    return min(max(math.floor(density * numel + 0.5), 0), numel)


def order_desc(x: torch.Tensor) -> torch.Tensor:
    """Flat indices by descending |x|, ties by lowest index (stable sort)."""
    return x.flatten().abs().argsort(descending=True, stable=True)


def topk_keep(x: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    keep[order_desc(x)[:k]] = True
    return keep.reshape(x.shape)


def uniforms(seed: int, index: int, n: int) -> np.ndarray:
    """The documented per-input stream: PCG64(SeedSequence([seed, i])) raw 64-bit draws, low then high 32 bits."""
    bg = np.random.PCG64(np.random.SeedSequence([seed, index]))
    raw = bg.random_raw((n + 1) // 2).astype(np.uint64)
    u = np.empty(2 * raw.size, np.uint64)
    u[0::2] = raw & np.uint64(0xFFFFFFFF)
    u[1::2] = raw >> np.uint64(32)
    return u[:n]


def keep_threshold(p) -> np.ndarray:
    return np.floor(np.asarray(p, dtype=np.float64) * 2.0**32).astype(np.uint64)


def elect(taus, w, normalize=True, rule="total"):
    """TIES steps 3-5: sign election, disjoint merge divided by the sum of the agreeing |w_i|."""
    sign = torch.sign(sum(taus)) if rule == "total" else torch.sign(sum(torch.sign(t) for t in taus))
    agree = [(torch.sign(t) == sign) & (t != 0) for t in taus]
    num = sum(torch.where(a, t, 0.0) for a, t in zip(agree, taus))
    if not normalize:
        return num
    den = sum(a.double() * abs(wi) for a, wi in zip(agree, w))
    return torch.where(den > 0, num / den.clamp_min(1e-300), 0.0)


def ties(xs, w, density=0.2, majority_sign="total", normalize=True, scale=1.0, masks=None):
    """TIES (Yadav et al. 2023): top-k trim, weights before the election, disjoint mean."""
    xs = [x.double() for x in xs]
    if masks is None:
        masks = [topk_keep(x, k_of(density, x.numel())) for x in xs]
    taus = [wi * torch.where(m, x, 0.0) for x, wi, m in zip(xs, w, masks)]
    return scale * elect(taus, w, normalize, majority_sign)


def magnitude_prune(xs, w, density=0.2, scale=1.0):
    return scale * sum(wi * torch.where(topk_keep(x, k_of(density, x.numel())), x.double(), 0.0)
                       for x, wi in zip(xs, w))


def breadcrumbs(xs, w, density=0.9, gamma=0.01, scale=1.0):
    """Model Breadcrumbs (Davari & Belilovsky 2023): drop the top g by |x|, keep the next k."""
    out = 0
    for x, wi in zip(xs, w):
        n = x.numel()
        g, k = k_of(gamma, n), k_of(density, n)
        keep = torch.zeros(n, dtype=torch.bool)
        keep[order_desc(x)[g : g + k]] = True
        out = out + wi * torch.where(keep.reshape(x.shape), x.double(), 0.0)
    return scale * out


def dare_dropped(x, density, seed, index, rescale=True):
    """DARE (Yu et al. 2024): keep entry j iff u_j < floor(density * 2^32), rescaled by 1/density."""
    u = torch.from_numpy((uniforms(seed, index, x.numel()) < keep_threshold(density)).reshape(x.shape))
    return torch.where(u, x.double() / (density if rescale else 1.0), 0.0)


def dare_linear(xs, w, density=0.5, seed=0, scale=1.0):
    return scale * sum(wi * dare_dropped(x, density, seed, i) for i, (x, wi) in enumerate(zip(xs, w)))


def dare_ties(xs, w, density=0.5, seed=0, scale=1.0, majority_sign="total"):
    taus = [wi * dare_dropped(x, density, seed, i) for i, (x, wi) in enumerate(zip(xs, w))]
    return scale * elect(taus, w, True, majority_sign)


def della_dropped(x, density, epsilon, seed, index):
    """DELLA MagPrune (Deep et al. 2024): per row, keep probability density + eps/2 - eps * r / (L - 1) at
    descending-magnitude position r, kept entries scaled by 1/p."""
    rows = x.reshape(x.shape[0], -1).double()
    length = rows.shape[1]
    u = uniforms(seed, index, rows.numel()).reshape(rows.shape)
    out = torch.zeros_like(rows)
    for r in range(rows.shape[0]):
        pos = torch.empty(length, dtype=torch.long)
        pos[rows[r].abs().argsort(descending=True, stable=True)] = torch.arange(length)
        p = density + epsilon / 2 - epsilon * (pos.double() / (length - 1)) if length > 1 else torch.full((1,), density)
        keep = torch.from_numpy(u[r] < keep_threshold(p.numpy()))
        out[r] = torch.where(keep, rows[r] / p, 0.0)
    return out.reshape(x.shape)


def della(xs, w, density=0.7, epsilon=0.1, seed=0, scale=1.0):
    taus = [wi * della_dropped(x, density, epsilon, seed, i) for i, (x, wi) in enumerate(zip(xs, w))]
    return scale * elect(taus, w, True, "total")
