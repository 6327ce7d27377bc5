"""Benchmark: ``adaptermerge analyze`` on three rank-16 LoRA adapters of a Llama-3.2-1B-shaped model.

Setting: 3 PEFT adapters (r=16, lora_alpha=32, fp32) over q,k,v,o,gate,up,down of every decoder layer of a Llama with
hidden 2048, intermediate 8192 and k/v out 512 (Llama-3.2-1B shapes, 16 layers: 112 modules per adapter). The three
adapters are built to look like the WeaveRec setting, so the numbers (and the picture) mean something:

* ``target``: seeded random factors, A ~ N(0, 1/in), B ~ N(0, 0.02^2);
* ``hybrid``: shares the target's A and a layer-dependent part of its B,
  ``B_h = c_l B_t + sqrt(1 - c_l^2) N`` with c_l rising from 0.3 (layer 0) to 0.9 (last layer);
* ``source``: independent seeded random factors.

Every scenario is one whole process, timed from spawn to exit with its peak RSS (``os.wait4``), with
OMP_NUM_THREADS / MKL_NUM_THREADS / OPENBLAS_NUM_THREADS set to ``--threads`` (default 1):

* ``analyze``: ``adaptermerge analyze target hybrid source --json`` (default 32768 sampled entries per module);
* ``analyze_plot``: the same with ``--plot`` (matplotlib import and rendering included);
* ``preview_linear``: with ``--preview-method linear`` on all modules (low-rank, exact);
* ``preview_ties``: with ``--preview-method ties --density 0.5 --preview-modules 14`` (dense per previewed module).

    .venv/bin/python benchmarks/bench_analyze.py                 # 16 layers, 1 thread, 3 repeats
    .venv/bin/python benchmarks/bench_analyze.py --layers 2 --repeats 1
    .venv/bin/python benchmarks/bench_analyze.py --plot docs/img/diagnostics.png   # also (re)make the docs picture
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import LORA_ALPHA, LORA_R, PROJECTIONS, cpu_model  # noqa: E402  (one definition of the Llama-3.2-1B shapes)

NAMES = ("target", "hybrid", "source")
GEN_VERSION = 1
MB = 1_000_000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ inputs
def shared_fraction(layer: int, layers: int) -> float:
    """How much of the target's B the hybrid adapter shares in ``layer``: 0.3 at the first layer, 0.9 at the last."""
    return 0.3 + 0.6 * layer / max(1, layers - 1)


def write_inputs(root: Path, layers: int) -> list[Path]:
    """The three adapters (target, hybrid, source) as PEFT directories, generated once per configuration."""
    import torch
    from safetensors.torch import save_file

    paths = [root / name for name in NAMES]
    stamp = {"gen_version": GEN_VERSION, "layers": layers, "r": LORA_R, "alpha": LORA_ALPHA}
    stamp_file = root / "stamp.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp and all((p / "adapter_model.safetensors").exists() for p in paths):
        return paths
    log(f"writing {len(NAMES)} adapters with {layers} layers under {root}")
    gen = torch.Generator().manual_seed(1234)
    tensors: dict[str, dict[str, torch.Tensor]] = {n: {} for n in NAMES}
    for layer in range(layers):
        c = shared_fraction(layer, layers)
        for proj, out_f, in_f in PROJECTIONS:
            key = f"base_model.model.model.layers.{layer}.{proj}"
            a_t = torch.randn(LORA_R, in_f, generator=gen) / in_f**0.5
            b_t = torch.randn(out_f, LORA_R, generator=gen) * 0.02
            b_h = c * b_t + (1 - c * c) ** 0.5 * torch.randn(out_f, LORA_R, generator=gen) * 0.02
            a_s = torch.randn(LORA_R, in_f, generator=gen) / in_f**0.5
            b_s = torch.randn(out_f, LORA_R, generator=gen) * 0.02
            for name, (a, b) in zip(NAMES, ((a_t, b_t), (a_t.clone(), b_h), (a_s, b_s))):
                tensors[name][f"{key}.lora_A.weight"] = a.contiguous()
                tensors[name][f"{key}.lora_B.weight"] = b.contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "r": LORA_R,
        "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "target_modules": sorted(p.rsplit(".", 1)[-1] for p, _, _ in PROJECTIONS),
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }
    for name, p in zip(NAMES, paths):
        p.mkdir(parents=True, exist_ok=True)
        save_file(tensors[name], str(p / "adapter_model.safetensors"), metadata={"format": "pt"})
        (p / "adapter_config.json").write_text(json.dumps(config, indent=2))
    stamp_file.write_text(json.dumps(stamp))
    return paths


# ------------------------------------------------------------------------------------------------ running
def cli() -> list[str]:
    exe = Path(sys.executable).parent / "adaptermerge"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "adaptermerge"]


def scenarios(inputs: Sequence[Path], work: Path, plot: Path | None) -> dict[str, list[str]]:
    base = cli() + ["analyze", *map(str, inputs), "--json"]
    return {
        "analyze": base,
        "analyze_plot": base + ["--plot", str(plot or work / "diagnostics.png")],
        "preview_linear": base + ["--preview-method", "linear"],
        "preview_ties": base + ["--preview-method", "ties", "--density", "0.5", "--preview-modules", "14"],
    }


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def run_process(cmd: Sequence[str], env: dict[str, str], out_path: Path) -> dict[str, Any]:
    """Wall seconds from spawn to reaping and peak RSS of exactly this child (``os.wait4``)."""
    with open(out_path, "wb") as fo, open(out_path.with_suffix(".stderr"), "wb") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), env=env, stdout=fo, stderr=fe)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        tail = out_path.with_suffix(".stderr").read_text(errors="replace").strip().splitlines()[-3:]
        raise SystemExit(f"{' '.join(cmd)} exited {rc}: {' | '.join(tail)}")
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"wall_s": round(wall, 3), "peak_rss_mb": round(rss / MB, 1), "user_s": round(usage.ru_utime, 2),
            "sys_s": round(usage.ru_stime, 2), "loadavg_after": round(os.getloadavg()[0], 2)}


def machine(threads: int) -> dict[str, Any]:
    cpu = cpu_model()
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads(), torch.__version__)"],
                           env=child_env(threads), capture_output=True, text=True).stdout.split()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": probe[1] if len(probe) > 1 else None, "torch_threads": int(probe[0]) if probe else None}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/am-bench-analyze"))
    ap.add_argument("--plot", type=Path, default=None, help="where analyze_plot writes its picture")
    ap.add_argument("--only", default=None, help="comma-separated scenario names")
    args = ap.parse_args(argv)
    work = args.workdir / f"L{args.layers}"
    inputs = write_inputs(work / "inputs", args.layers)
    env = child_env(args.threads)
    todo = scenarios(inputs, work, args.plot)
    if args.only:
        todo = {k: v for k, v in todo.items() if k in set(args.only.split(","))}
    results: dict[str, Any] = {}
    for name, cmd in todo.items():
        runs = []
        for rep in range(args.repeats):
            log(f"{name} #{rep + 1}: {' '.join(cmd)}")
            runs.append(run_process(cmd, env, work / f"{name}.json"))
        report = json.loads((work / f"{name}.json").read_text())
        walls = [r["wall_s"] for r in runs]
        results[name] = {
            "median_wall_s": statistics.median(walls), "walls_s": walls,
            "median_cpu_s": statistics.median(r["user_s"] + r["sys_s"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "in_process_s": report["seconds"],
            "modules": len(report["modules"]), "command": " ".join(cmd),
        }
    info = {"layers": args.layers, "threads": args.threads, "machine": machine(args.threads), "results": results}
    (work / "bench.json").write_text(json.dumps(info, indent=2))
    print(f"{args.layers} layers x 7 projections, 3 adapters r={LORA_R}, threads={args.threads}, {info['machine']['cpu']}")
    print(f"| scenario | wall (s, median of {args.repeats}) | CPU user+sys (s) | analysis in-process (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['median_wall_s']:.2f} | {r['median_cpu_s']:.2f} | {r['in_process_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} logical CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
