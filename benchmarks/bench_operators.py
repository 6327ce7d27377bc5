"""Benchmark: our merge operators side by side, this checkout against a baseline checkout, interleaved in one run.

Same inputs as ``bench_merge.py`` (3 LoRA adapters, r=16, Llama-3.2-1B shapes, 16 layers = 112 modules; generated
once under ``--workdir``). Every scenario is a whole ``python -m adaptermerge merge`` process, timed from spawn to
exit (``os.wait4``), with the merge's own in-process seconds from its ``--json`` summary. Each round runs every
scenario once; the baseline and the current code of one operator run back to back, in alternating order from one
round to the next, so a machine whose load drifts affects both alike. PEFT is not run.

* existing operators, baseline vs current: linear / task_arithmetic / ties / dare_ties at ``--rank 16`` (weights
  0.5,0.3,0.2; density 0.5), and cat;
* current only: the factor-form operators (tsv_m, iso_c, iso_cts, knots with per-module and model-wide top-k)
  and ties / dare_ties with ``-p space=core``, all at the default (exact) rank, plus linear at its new default
  (exact) rank.

    git archive <baseline-rev> adaptermerge | tar -x -C /tmp/am-baseline     # the baseline's package
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_operators.py --baseline /tmp/am-baseline --rounds 3

Prints a markdown table (medians over the rounds, ratios) and writes ``results-<only>.json`` under the work dir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_merge import DENSITY, RANK, WEIGHTS, ensure_inputs  # noqa: E402

EXISTING = [
    ("linear", ["--rank", str(RANK)]),
    ("task_arithmetic", ["--rank", str(RANK)]),
    ("ties", ["--density", f"{DENSITY:g}", "--rank", str(RANK)]),
    ("dare_ties", ["--density", f"{DENSITY:g}", "--rank", str(RANK)]),
    ("cat", []),
]
NEW = [
    ("linear", []),  # the new default rank: exact (sum of ranks, 48)
    ("tsv_m", []),
    ("iso_c", []),
    ("iso_cts", []),
    ("knots", ["-p", f"density={DENSITY:g}"]),
    ("knots", ["-p", f"density={DENSITY:g}", "-p", "topk=model"]),
    ("ties", ["--density", f"{DENSITY:g}", "-p", "space=core"]),
    ("dare_ties", ["--density", f"{DENSITY:g}", "-p", "space=core"]),
]


def label(method: str, args: list[str]) -> str:
    return " ".join([method, *args])


def run(version: str, method: str, args: list[str], inputs: list[Path], out: Path, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "adaptermerge", "merge", *map(str, inputs), "--method", method, "--weights",
           ",".join(f"{w:g}" for w in WEIGHTS), *args, "-o", str(out), "--force", "--json", "-q"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{version} {method} {args} failed ({proc.returncode}): {stderr.decode()[-2000:]}")
    summary = json.loads(stdout)
    return {"version": version, "method": method, "args": args, "wall_s": round(wall, 3),
            "merge_s": summary["seconds"], "max_rel_error": summary["max_rel_error"],
            "ranks": sorted({m["rank"] for m in summary["modules"].values()}), "load1": round(os.getloadavg()[0], 2),
            "cmd": " ".join(cmd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, required=True, help="a folder holding the baseline's adaptermerge package")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/am-bench-ops"))
    ap.add_argument("--only", choices=("all", "existing", "new"), default="all",
                    help="existing: baseline vs current of the existing operators only; new: current's new scenarios and "
                         "the linear / ties references they are compared with")
    args = ap.parse_args()
    if not (args.baseline / "adaptermerge" / "__init__.py").exists():
        raise SystemExit(f"--baseline {args.baseline}: no adaptermerge package there")
    inputs = ensure_inputs(args.workdir, args.layers)
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    here = str(HERE.parent)
    envs = {"baseline": {**env, "PYTHONPATH": str(args.baseline)}, "current": {**env, "PYTHONPATH": here}}
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    runs: list[dict[str, Any]] = []
    existing = EXISTING if args.only != "new" else [EXISTING[0], EXISTING[2]]  # linear and ties: the references
    new = NEW if args.only != "existing" else []
    for r in range(args.rounds):
        order = ("baseline", "current") if r % 2 == 0 else ("current", "baseline")
        for method, margs in existing:
            for version in order:
                runs.append(run(version, method, margs, inputs, args.workdir / "out" / version, envs[version]))
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "cmd"}), flush=True)
        for method, margs in new:
            runs.append(run("current", method, margs, inputs, args.workdir / "out" / "current", envs["current"]))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "cmd"}), flush=True)
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    (args.workdir / f"results-{args.only}.json").write_text(json.dumps(
        {"runs": runs, "uptime_before": uptime_before, "uptime_after": uptime_after, "threads": threads}, indent=1))

    def med(version: str, method: str, margs: list[str], key: str = "wall_s") -> float:
        return statistics.median(x[key] for x in runs if x["version"] == version and x["method"] == method
                                 and x["args"] == margs)

    print(f"\n{args.rounds} rounds, OMP_NUM_THREADS={threads}; before: {uptime_before}; after: {uptime_after}\n")
    print("| operator | baseline wall (s) | current wall (s) | current / baseline | merge s, baseline -> current |")
    print("|---|---|---|---|---|")
    for method, margs in existing:
        b, c = med("baseline", method, margs), med("current", method, margs)
        bm, cm = med("baseline", method, margs, "merge_s"), med("current", method, margs, "merge_s")
        print(f"| {label(method, margs)} | {b:.2f} | {c:.2f} | {c / b:.2f} | {bm:.2f} -> {cm:.2f} |")
    if not new:
        return
    lin = med("current", "linear", ["--rank", str(RANK)])
    ties_full = med("current", "ties", ["--density", f"{DENSITY:g}", "--rank", str(RANK)])
    print("\n| operator (current) | wall (s) | / linear --rank 16 | full-space ties / this | output ranks | max rel. error |")
    print("|---|---|---|---|---|---|")
    for method, margs in new:
        c = med("current", method, margs)
        last = next(x for x in reversed(runs) if x["method"] == method and x["args"] == margs)
        print(f"| {label(method, margs)} | {c:.2f} | {c / lin:.2f} | {ties_full / c:.1f} | "
              f"{','.join(map(str, last['ranks']))} | {last['max_rel_error']:.1e} |")


if __name__ == "__main__":
    main()
