"""The I/O floor of a ``cat`` merge: start Python, import torch + safetensors, read the inputs, write one output.

This is the least work any tool can do to produce a concatenation of LoRA adapters from files: it reads every
input's factors, concatenates them per module (``[w_1 B_1 ... w_n B_n]`` and ``[A_1; ...; A_n]``, each input's
``lora_alpha / r`` folded into B) and writes one safetensors file plus an ``adapter_config.json`` with
``r = lora_alpha = sum of ranks``. No validation, no provenance, no error handling beyond what the libraries do.
``benchmarks/bench_merge.py`` times it as a whole process; adaptermerge's ``cat`` is meant to stay within 1.5x.

    python benchmarks/floor_io.py OUT_DIR IN_DIR [IN_DIR ...] --weights 0.5,0.3,0.2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def concat_adapters(inputs: list[Path], weights: list[float]) -> tuple[dict[str, torch.Tensor], dict, int]:
    """Concatenated factors of all inputs (B scaled by weight * alpha / r), the first config, and the total rank."""
    configs = [json.loads((p / CONFIG).read_text()) for p in inputs]
    states = [load_file(str(p / WEIGHTS)) for p in inputs]
    out: dict[str, torch.Tensor] = {}
    for key_a in (k for k in states[0] if k.endswith(".lora_A.weight")):
        key_b = key_a[: -len("lora_A.weight")] + "lora_B.weight"
        scales = [w * cfg["lora_alpha"] / cfg["r"] for w, cfg in zip(weights, configs)]
        out[key_a] = torch.cat([s[key_a] for s in states], dim=0)
        out[key_b] = torch.cat([s[key_b] * c for s, c in zip(states, scales)], dim=1)
    return out, configs[0], sum(int(cfg["r"]) for cfg in configs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", type=Path)
    ap.add_argument("inputs", type=Path, nargs="+")
    ap.add_argument("--weights", default=None, help="comma-separated weights (default 1 each)")
    args = ap.parse_args()
    weights = [float(x) for x in args.weights.split(",")] if args.weights else [1.0] * len(args.inputs)
    tensors, config, rank = concat_adapters(args.inputs, weights)
    args.output.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.output / WEIGHTS), metadata={"format": "pt"})
    (args.output / CONFIG).write_text(json.dumps({**config, "r": rank, "lora_alpha": rank}, indent=2))


if __name__ == "__main__":
    main()
