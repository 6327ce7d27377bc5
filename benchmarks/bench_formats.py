"""Overhead of the format layer: the same two LoRAs (N <= 640 SD-UNet attention modules, each 1280x1280, rank 16, float16) stored as PEFT and as
kohya, merged with the same method; wall time of each, side by side in one run.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_formats.py [N] [method]``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_pair(root: Path, n: int, seed: int) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(seed)
    peft, kohya = {}, {}
    paths = [f"down_blocks.{lv}.attentions.{j}.transformer_blocks.{t}.{att}.{proj}" for lv in range(4) for j in range(2)
             for t in range(10) for att in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")]
    for path in paths[:n]:
        a = (torch.randn(16, 1280, generator=g) * 0.05).half()
        b = (torch.randn(1280, 16, generator=g) * 0.05).half()
        peft[f"base_model.model.{path}.lora_A.weight"], peft[f"base_model.model.{path}.lora_B.weight"] = a, b
        k = "lora_unet_" + path.replace(".", "_")
        kohya[f"{k}.lora_down.weight"], kohya[f"{k}.lora_up.weight"], kohya[f"{k}.alpha"] = a, b, torch.tensor(16.0)
    (root / f"p{seed}").mkdir()
    save_file(peft, str(root / f"p{seed}" / "adapter_model.safetensors"))
    (root / f"p{seed}" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 16, "target_modules": ["to_q"]}))
    save_file(kohya, str(root / f"k{seed}.safetensors"))
    return root / f"p{seed}", root / f"k{seed}.safetensors"


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    method = sys.argv[2] if len(sys.argv) > 2 else "ties"
    root = Path(tempfile.mkdtemp(prefix="bench-formats-"))
    (p1, k1), (p2, k2) = write_pair(root, n, 1), write_pair(root, n, 2)
    cli = [sys.executable, "-m", "adaptermerge", "merge", "--method", method, "-q"]
    extra = ["--density", "0.5"] if method != "linear" else []
    times = {}
    for rep in range(2):
        for label, ins, out in (("peft", [p1, p2], root / "out_p"), ("kohya", [k1, k2], root / "out_k.safetensors")):
            t0 = time.perf_counter()
            subprocess.run(cli + [str(x) for x in ins] + extra + ["-o", str(out), "--force"], check=True)
            times.setdefault(label, []).append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    print(json.dumps({"modules": n, "method": method, "seconds_best_of_2": best, "kohya_over_peft": best["kohya"] / best["peft"]}, indent=2))
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
