"""Where an element-wise merge (ties / dare_ties) spends its time: per-step timings of one module of each shape.

Runs the same steps as the engine, one at a time, on real modules of the benchmark's inputs, and scales each
shape's timings by how many modules of that shape the adapter has (7 projections per layer: 3 of 8192x2048 or
2048x8192, 2 of 2048x2048, 2 of 512x2048):

    python benchmarks/profile_steps.py /tmp/am-bench/inputs-L16/adapter_{a,b,c} --method ties [--no-retain]

Steps: read factors (``Adapter.factors``), dense deltas ``B @ A``, the operator (``adaptermerge.ops``), and the
randomized truncation (``lowrank.truncate_dense``) split into its parts: sketch + power iterations, small SVD and
``||D||^2`` for the closed-form error. Like the CLI it first calls ``engine.retain_freed_memory()``;
``--no-retain`` leaves glibc's defaults, to see what page faults on fresh temporaries cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable



def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median seconds over ``repeats`` calls, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def profile_module(adapters, name: str, method: str, weights: list[float], density: float, repeats: int) -> dict[str, float]:
    import torch

    import adaptermerge as am
    from adaptermerge import lowrank
    from adaptermerge.engine import module_seed

    t: dict[str, float] = {}
    t["read factors (x3)"], fac = timed(lambda: [a.factors(name) for a in adapters], repeats)
    t["B @ A (x3)"], deltas = timed(lambda: [b @ a for b, a in fac], repeats)
    op = getattr(am.ops, method)
    kwargs = {"density": density, **({"seed": module_seed(0, name)} if method.startswith("dare") else {})}
    t[f"ops.{method}"], merged = timed(lambda: op(deltas, weights, **kwargs), repeats)
    t["truncate_dense (whole)"], (b, a, _) = timed(lambda: lowrank.truncate_dense(merged, 16, seed=1), repeats)
    x = merged.T if merged.shape[0] < merged.shape[1] else merged

    def sketch():
        q, _ = torch.linalg.qr(x @ lowrank.gaussian(x.shape[1], 24, 1))
        for _ in range(2):
            z, _ = torch.linalg.qr(x.T @ q)
            q, _ = torch.linalg.qr(x @ z)
        return q

    t["  sketch + 2 power iterations"], q = timed(sketch, repeats)
    t["  q.T @ x + small SVD"], _ = timed(lambda: torch.linalg.svd(q.T @ x, full_matrices=False), repeats)
    t["  ||D||^2 (lowrank.frobenius2)"], _ = timed(lambda: lowrank.frobenius2(merged), repeats)
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", type=Path)
    ap.add_argument("--method", default="ties", choices=["ties", "dare_ties"])
    ap.add_argument("--weights", default="0.5,0.3,0.2")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-retain", action="store_true", help="do not call engine.retain_freed_memory() first")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()
    if not args.no_retain:
        from adaptermerge.engine import retain_freed_memory

        retain_freed_memory()
    import torch

    import adaptermerge as am

    torch.set_num_threads(1)  # what the engine does while merging
    adapters = [am.load_adapter(p) for p in args.inputs]
    weights = [float(w) for w in args.weights.split(",")]
    by_shape: dict[tuple[int, int], list[str]] = defaultdict(list)
    for n, m in adapters[0].modules.items():
        by_shape[m.shape].append(n)
    totals: dict[str, float] = defaultdict(float)
    per_shape = {}
    for shape, names in sorted(by_shape.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
        t = profile_module(adapters, names[-1], args.method, weights, args.density, args.repeats)
        per_shape[f"{shape[0]}x{shape[1]}"] = {"modules": len(names), **{k: round(v, 4) for k, v in t.items()}}
        for k, v in t.items():
            totals[k] += v * len(names)
    steps = [k for k in totals if not k.startswith("  ")]
    whole = sum(totals[k] for k in steps)
    print(f"{args.method}: {sum(len(v) for v in by_shape.values())} modules, 1 torch thread, median of {args.repeats}"
          f"{', glibc defaults (--no-retain)' if args.no_retain else ''}")
    for shape, d in per_shape.items():
        print(f"  per {shape} module (x{d['modules']}): " + ", ".join(f"{k.strip()} {v:.3f}" for k, v in d.items() if k != "modules"))
    print(f"estimated total of the merge steps: {whole:.1f} s")
    for k, v in totals.items():
        share = f"{100 * v / whole:5.1f}%"
        print(f"  {k:45s} {v:7.2f} s  {share}")
    if args.json:
        args.json.write_text(json.dumps({"per_shape": per_shape, "totals": totals, "retained_heap": not args.no_retain}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
