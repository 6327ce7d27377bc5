"""How close is the engine's per-module memory estimate (``engine.module_memory``, used to refuse merges that cannot
fit) to the real peak? Each (method, size) runs in a fresh child process: four random rank-64 adapters of one square
module are opened, the current RSS is read, the merge runs, and the growth of the peak RSS (``ru_maxrss``) is set
against the estimate. The growth includes a fixed ~20 MB of first-call allocations (LAPACK, torch's allocator), so
compare the *slopes* across sizes: the estimate should grow at least as fast as the measured peak.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory_estimate.py            # ~1 minute
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys
from pathlib import Path
import torch
sys.path.insert(0, "tests")
from conftest import write_adapter
import adaptermerge as am
from adaptermerge.engine import MergeRequest, module_memory

method, params, size, folder = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
torch.set_num_threads(1)
paths = []
for i in range(4):
    p = folder / f"{size}-{i}"
    if not p.exists():
        write_adapter(p, {"m.q": (size, size)}, r=64, alpha=64, seed=i)
    paths.append(p)
ads = [am.load_adapter(p) for p in paths]
req = MergeRequest.build(method, len(ads), None, params)
est = module_memory((size, size), len(ads), req, [next(iter(a.modules.values())) for a in ads])
rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
before = max(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
am.merge(ads, method, **params)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"estimate_MB": est / 2**20, "peak_growth_MB": (peak - before) / 2**20}))
"""

CASES = [("linear", {}), ("tsv_m", {}), ("iso_c", {}), ("iso_cts", {}), ("knots", {}), ("ties", {"space": "core"})]


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    rows = []
    for method, params in CASES:
        res = {}
        for size in (2048, 4096, 8192):
            out = subprocess.run([sys.executable, "-c", CHILD, method, json.dumps(params), str(size), str(folder)],
                                 capture_output=True, text=True, check=True)
            res[size] = json.loads(out.stdout.strip().splitlines()[-1])
        est_slope = (res[8192]["estimate_MB"] - res[2048]["estimate_MB"]) / 6144
        got_slope = (res[8192]["peak_growth_MB"] - res[2048]["peak_growth_MB"]) / 6144
        rows.append((method + ("" if not params else f" {params}"), res, got_slope / est_slope))
    print("| method | estimate MB (2048 / 4096 / 8192) | peak growth MB | measured slope / estimated slope |")
    print("|---|---|---|---|")
    for name, res, ratio in rows:
        e = " / ".join(f"{res[s]['estimate_MB']:.0f}" for s in (2048, 4096, 8192))
        g = " / ".join(f"{res[s]['peak_growth_MB']:.0f}" for s in (2048, 4096, 8192))
        print(f"| {name} | {e} | {g} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
