"""What-if runs of the ``adaptermerge`` CLI with proposed speed-ups applied from outside (nothing in the package
is edited), so ``bench_merge.py`` can measure what each proposal would buy, as a whole process like the real CLI.

    python benchmarks/what_if.py [--fast-error] [--mallopt] [--cache-memlimit] merge A/ B/ C/ --method ties ...

* ``--fast-error``: the engine's randomized truncation (``lowrank.truncate_dense``) computes the relative error with
  two float64 ``vector_norm`` passes over the dense delta plus an explicit residual ``d - b @ a``. Here the factors
  are computed exactly as there (same sketch, same bits), but ``||D||`` comes from float32 row norms summed in
  float64, and the error from ``||D - BA||^2 = ||D||^2 - sum_{j<=k} s_j^2`` (exact for a projection onto an
  orthonormal basis: the residual splits into a part orthogonal to range(Q) and one inside it), with the explicit
  residual kept as a fallback when cancellation could matter (relative error below 1e-3).
* ``--mallopt``: glibc ``mallopt(M_MMAP_MAX, 0)`` and a large ``M_TRIM_THRESHOLD`` at start, so freed dense
  deltas are reused instead of returned to the OS and faulted in again (page faults are expensive in VMs).
* ``--cache-memlimit``: ``memory_limit_bytes()`` (reads /sys and /proc files) is evaluated once, not per module.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import sys
from typing import Any

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def apply_mallopt() -> bool:
    """Keep freed memory in the heap (no mmap for big blocks, no trimming). False where glibc is not available."""
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(name)
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1
    return ok and libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)) == 1


def fast_error_truncate_dense(original):
    """A drop-in for ``lowrank.truncate_dense`` with the same factors and a cheaper error computation."""
    import torch

    from adaptermerge import lowrank

    def frob2(x: "torch.Tensor") -> float:
        """||x||_F^2 from float32 row norms accumulated in float64 (within ~1e-9 of a float64 pass)."""
        rows = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
        return float(torch.linalg.vector_norm(rows, dim=1).double().square().sum())

    def truncate_dense(d, rank, *, method="randomized", niter=2, oversample=8, seed=0) -> tuple[Any, Any, float]:
        if method != "randomized":
            return original(d, rank, method=method, niter=niter, oversample=oversample, seed=seed)
        d = d.float()
        m, n = d.shape
        k = min(rank, m, n)
        ell = min(k + oversample, m, n)
        transpose = m < n
        x = d.T if transpose else d
        q, _ = torch.linalg.qr(x @ lowrank.gaussian(x.shape[1], ell, seed))
        for _ in range(niter):
            z, _ = torch.linalg.qr(x.T @ q)
            q, _ = torch.linalg.qr(x @ z)
        ub, s, vh = torch.linalg.svd(q.T @ x, full_matrices=False)
        bx, ax = lowrank._split(q @ ub[:, :k], s[:k], vh[:k])
        b, a = (ax.T, bx.T) if transpose else (bx, ax)
        b, a = b.contiguous(), a.contiguous()
        total = frob2(d)
        if total == 0.0:
            return b, a, 0.0
        kept = float(s[:k].double().square().sum())
        err = math.sqrt(max(total - kept, 0.0) / total)
        if err < 1e-3:  # cancellation: measure the residual explicitly
            err = math.sqrt(frob2(d - b @ a) / total)
        return b, a, err

    return truncate_dense


def main(argv: list[str]) -> int:
    flags = {"--fast-error", "--mallopt", "--cache-memlimit"}
    chosen = [a for a in argv if a in flags]
    rest = [a for a in argv if a not in flags]
    if "--mallopt" in chosen and not apply_mallopt():
        print("what_if: mallopt is not available here (not glibc); running without it", file=sys.stderr)
    from adaptermerge import cli, engine, safetensors_io

    if "--fast-error" in chosen:
        engine.truncate_dense = fast_error_truncate_dense(engine.truncate_dense)
    if "--cache-memlimit" in chosen:
        cached = functools.cache(safetensors_io.memory_limit_bytes)
        safetensors_io.memory_limit_bytes = cached
        engine.memory_limit_bytes = cached
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
