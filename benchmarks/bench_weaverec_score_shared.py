"""WeaveRec candidate scoring of several models: per model vs shared lower layers, side by side in one process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_weaverec_score_shared.py --models 8 --users 8

Builds ``--models`` SmolLM2-135M-Instruct variants that differ only in the top 8 of 30 layers (the base with small
seeded perturbations there, standing in for folded top-layer LoRA adapters: same shapes, same cost), then scores
the same MovieLens thriller test users (quick.toml's prompts, 20 candidates) with every model twice: one
``score_candidates_detailed`` call per model, and one ``SharedPrefixScorer`` pass (layers 0-21 once per user, layers
22-29 per model). Prints users x models per second for both, their ratio, the largest score difference, the thread
count and the load average before and after.
"""

from __future__ import annotations

import argparse
import copy
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
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--users", type=int, default=8)
    args = ap.parse_args()

    import torch

    from recipe_common.llm import load_for_eval, load_tokenizer
    from weaverec.config import load_config
    from weaverec.pipeline import base_model_dir, prepare
    from weaverec.scoring import SharedPrefixScorer, score_candidates_detailed

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-weaverec-"))
    try:
        cfg = dataclasses.replace(load_config(args.config), workdir=str(tmp / "run"))
        users = prepare(cfg, log=lambda m: None).target_test[: args.users]
        base_dir = base_model_dir(cfg)
        tok = load_tokenizer(base_dir)
        prompt = cfg.prompt()
        first = min(cfg.train_config().layers)
        base = load_for_eval(base_dir, None)
        gen = torch.Generator().manual_seed(0)
        models = []
        for _ in range(args.models):
            m = copy.deepcopy(base)
            with torch.no_grad():
                for layer in m.model.layers[first:]:
                    for p in layer.parameters():
                        p.add_(torch.randn(p.shape, generator=gen) * 1e-3 * p.abs().mean())
            models.append(m)
        kw = dict(prompt=prompt, batch_size=cfg.eval.batch_size, max_rows=cfg.eval.max_rows,
                  max_seq_len=cfg.train_config().max_seq_len)
        t0 = time.perf_counter()
        plain = [score_candidates_detailed(m, tok, users, **kw) for m in models]
        t_plain = time.perf_counter() - t0
        scorer = SharedPrefixScorer(base, first)
        for i, m in enumerate(models):
            scorer.add(str(i), m)
        t0 = time.perf_counter()
        shared = scorer.score(tok, users, **kw)
        t_shared = time.perf_counter() - t0
        diff = max(float(abs(a.logprob_sum - b.logprob_sum).max())
                   for i, per in enumerate(plain) for a, b in zip(per, shared[str(i)]))
        n = len(users) * len(models)
        print(json.dumps({
            "models": len(models), "users": len(users), "shared_below_layer": first, "threads": torch.get_num_threads(),
            "per_model_s": round(t_plain, 1), "shared_s": round(t_shared, 1),
            "per_model_user_models_per_s": round(n / t_plain, 3), "shared_user_models_per_s": round(n / t_shared, 3),
            "ratio": round(t_plain / t_shared, 2), "max_abs_score_diff": diff,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        }, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
