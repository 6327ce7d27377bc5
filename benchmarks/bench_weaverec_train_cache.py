"""WeaveRec training with and without the prefix cache, side by side in one process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_weaverec_train_cache.py --samples 32 --epochs 2

Trains the same LoRA (quick.toml's settings: SmolLM2-135M-Instruct, r 16 on the top 8 of 30 layers) on the same
MovieLens thriller training samples twice: plain, and with ``cache_prefix`` (layers 0-21 run once per sample, every
step runs layers 22-29 only). Prints samples per CPU-second and per wall-second for both, their ratio, the largest
loss difference, the torch thread count and the load average before and after (state it with any number).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="recipes/quick.toml")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()

    import torch

    from weaverec.config import load_config
    from weaverec.pipeline import base_model_dir, prepare
    from weaverec.train import train_lora

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-weaverec-"))
    try:
        cfg = dataclasses.replace(load_config(args.config), workdir=str(tmp / "run"))
        samples = prepare(cfg, log=lambda m: None).target_train[: args.samples]
        base = base_model_dir(cfg)
        rows = {}
        for cached in (False, True):
            tcfg = dataclasses.replace(cfg.train_config(), cache_prefix=cached, epochs=args.epochs)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            res = train_lora(base, samples, tmp / f"out-{cached}", tcfg, progress=False)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            n = len(samples) * args.epochs
            rows["cached" if cached else "plain"] = {"samples_per_cpu_s": n / cpu, "samples_per_wall_s": n / wall,
                                                     "cpu_s": round(cpu, 1), "wall_s": round(wall, 1), "losses": res.losses}
        a, b = rows["plain"], rows["cached"]
        print(json.dumps({
            "samples": len(samples), "epochs": args.epochs, "threads": torch.get_num_threads(),
            "plain": {k: v for k, v in a.items() if k != "losses"}, "cached": {k: v for k, v in b.items() if k != "losses"},
            "ratio_cpu": round(b["samples_per_cpu_s"] / a["samples_per_cpu_s"], 2),
            "ratio_wall": round(b["samples_per_wall_s"] / a["samples_per_wall_s"], 2),
            "max_loss_diff": max(abs(x - y) for x, y in zip(a["losses"], b["losses"])),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        }, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
