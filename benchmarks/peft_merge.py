"""The PEFT baseline: merge LoRA adapters with ``PeftModel.add_weighted_adapter`` and save the merged adapter.

PEFT merges adapters only inside a model with the adapters injected, so this builds the base model
(``LlamaForCausalLM(config)``, random init, Llama-3.2-1B shapes with ``--layers`` decoder layers), loads every
input adapter, calls ``add_weighted_adapter`` once and saves the result with ``save_pretrained``. The phases are
timed and printed as one JSON line on stdout (``{"phases": {...}}``); ``benchmarks/bench_merge.py`` times the
whole process around it.

    python benchmarks/peft_merge.py OUT_DIR IN_DIR [IN_DIR ...] --combination-type svd --svd-rank 16 \\
        --weights 0.5,0.3,0.2 [--density 0.5] --layers 16

The merged adapter lands in ``OUT_DIR/merged/`` (PEFT's layout for a non-default adapter name).
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

SVD_TYPES = {"svd", "ties_svd", "dare_ties_svd", "dare_linear_svd", "magnitude_prune_svd"}
DENSITY_TYPES = {"ties", "ties_svd", "dare_ties", "dare_ties_svd", "dare_linear", "dare_linear_svd", "magnitude_prune",
                 "magnitude_prune_svd"}


def llama_1b_config(layers: int) -> LlamaConfig:
    """Llama-3.2-1B shapes: hidden 2048, intermediate 8192, 32 heads, 8 KV heads, vocab 128256, tied embeddings."""
    return LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=True,
    )


def check_loaded(model: PeftModel, name: str, adapter_dir: Path) -> None:
    """Fail loudly if PEFT did not load the adapter's factors (it only warns about mismatched keys)."""
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        expected = f.get_tensor(key)
    got = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A[name].weight.detach()
    if not torch.equal(got, expected):
        raise SystemExit(f"error: PEFT did not load {adapter_dir} correctly ({key} differs)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", type=Path)
    ap.add_argument("inputs", type=Path, nargs="+")
    ap.add_argument("--combination-type", required=True)
    ap.add_argument("--weights", required=True, help="comma-separated, one per input")
    ap.add_argument("--density", type=float, default=None)
    ap.add_argument("--svd-rank", type=int, default=None)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--seed", type=int, default=0, help="torch.manual_seed before merging (DARE draws)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = [float(x) for x in args.weights.split(",")]
    ct = args.combination_type
    phases: dict[str, float] = {"import": time.perf_counter() - T_START}

    t = time.perf_counter()
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_1b_config(args.layers))
    model.eval()
    phases["build_model"] = time.perf_counter() - t

    t = time.perf_counter()
    names = [f"in{i}" for i in range(len(args.inputs))]
    peft_model = PeftModel.from_pretrained(model, str(args.inputs[0]), adapter_name=names[0])
    for name, path in zip(names[1:], args.inputs[1:]):
        peft_model.load_adapter(str(path), adapter_name=name)
    for name, path in zip(names, args.inputs):
        check_loaded(peft_model, name, path)
    phases["load_adapters"] = time.perf_counter() - t

    t = time.perf_counter()
    torch.manual_seed(args.seed)
    kwargs: dict = {}
    if ct in SVD_TYPES:
        kwargs["svd_rank"] = args.svd_rank
    if ct in DENSITY_TYPES:
        kwargs["density"] = args.density
    with torch.no_grad():
        peft_model.add_weighted_adapter(names, weights, "merged", combination_type=ct, **kwargs)
    phases["add_weighted_adapter"] = time.perf_counter() - t

    t = time.perf_counter()
    if args.output.exists():
        shutil.rmtree(args.output)
    peft_model.save_pretrained(str(args.output), selected_adapters=["merged"])
    phases["save"] = time.perf_counter() - t
    phases["total_in_process"] = time.perf_counter() - T_START
    print(json.dumps({"phases": {k: round(v, 3) for k, v in phases.items()}, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
