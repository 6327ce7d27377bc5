"""WeaveRec training with and without the prefix cache, side by side in one process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_weaverec_train_cache.py --samples 32 --epochs 2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_weaverec_train_cache.py --samples 32 --epochs 1 --weave

Trains the same LoRA (quick.toml's settings: SmolLM2-135M-Instruct, r 16 on the top 8 of 30 layers) on the same
MovieLens thriller training samples twice: plain, and with ``cache_prefix`` (layers 0-21 run once per sample, every
step runs layers 22-29 only). Prints samples per CPU-second and per wall-second for both, their ratio, the largest
loss difference, the torch thread count and the load average before and after (state it with any number).

``--weave``: instead of one LoRA, the three modules of a one-source WeaveRec run, as the train stage trains them:
target-only (``--samples`` target samples), hybrid (those plus as many source samples) and source-only; cached, the
three share one prefix memo, so each distinct sample runs through layers 0-21 once for all modules and epochs.
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
    ap.add_argument("--weave", action="store_true", help="train the three modules of a one-source run (shared memo)")
    args = ap.parse_args()

    import torch

    from weaverec.config import load_config
    from weaverec.pipeline import base_model_dir, prepare
    from weaverec.train import train_lora

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-weaverec-"))
    try:
        cfg = dataclasses.replace(load_config(args.config), workdir=str(tmp / "run"))
        prep = prepare(cfg, log=lambda m: None)
        target = prep.target_train[: args.samples]
        source = next(iter(prep.source_train.values()))[: args.samples]
        modules = {"target": target, "hybrid": target + source, "source": source} if args.weave else {"target": target}
        base = base_model_dir(cfg)
        rows = {}
        for cached in (False, True):
            tcfg = dataclasses.replace(cfg.train_config(), cache_prefix=cached, epochs=args.epochs)
            memo: dict | None = {} if cached else None
            cpu0, wall0 = time.process_time(), time.perf_counter()
            losses = []
            for name, samples in modules.items():
                res = train_lora(base, samples, tmp / f"out-{cached}-{name}", tcfg, progress=False, prefix_memo=memo)
                losses += res.losses
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            n = sum(len(v) for v in modules.values()) * args.epochs
            rows["cached" if cached else "plain"] = {"samples_per_cpu_s": n / cpu, "samples_per_wall_s": n / wall,
                                                     "cpu_s": round(cpu, 1), "wall_s": round(wall, 1), "losses": losses}
        a, b = rows["plain"], rows["cached"]
        print(json.dumps({
            "modules": {k: len(v) for k, v in modules.items()}, "epochs": args.epochs, "threads": torch.get_num_threads(),
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
