"""Quickstart: train two small real LoRA adapters with PEFT, merge them with adaptermerge, load the result in PEFT.

    python examples/quickstart.py [--workdir /tmp/adaptermerge-quickstart] [--steps 60]

A tiny Llama (random init) stands in for a base model; adapter A learns to continue sequences by +1 (3 4 5 -> 6),
adapter B by +2 (3 5 7 -> 9). Each is trained on its own task only. The script then merges them four ways
(linear, ties, dare_ties, cat), loads every merged adapter with ``peft.PeftModel.from_pretrained`` and prints each
model's loss on both tasks, checking on the way that the PEFT-loaded model equals base + merged delta.
Runs in well under a minute on one CPU thread.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import adaptermerge as am

VOCAB, SEQ = 48, 12
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def task_batch(step: int, n: int, seed: int, count: int = 64) -> torch.Tensor:
    """Arithmetic progressions with difference ``step`` (mod VOCAB)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (count, 1), generator=g)
    return (start + step * torch.arange(n)) % VOCAB


def loss_on(model, batch: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(batch, labels=batch).loss)


def train_adapter(base, step: int, out: Path, steps: int, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=PROJ, lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for i in range(steps):
        batch = task_batch(step, SEQ, seed=1000 * seed + i, count=32)
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/adaptermerge-quickstart"))
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from peft import PeftModel

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = base_model()
    a = train_adapter(base, 1, work / "adapter_plus1", args.steps, seed=1)
    b = train_adapter(base, 2, work / "adapter_plus2", args.steps, seed=2)
    eval_a, eval_b = task_batch(1, SEQ, seed=99), task_batch(2, SEQ, seed=98)
    rows = {"base": (loss_on(base, eval_a), loss_on(base, eval_b))}
    for name, path in (("adapter +1", a), ("adapter +2", b)):
        m = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
        rows[name] = (loss_on(m, eval_a), loss_on(m, eval_b))
    merges = {
        "linear": dict(method="linear", weights=[0.5, 0.5], rank=16),
        "ties": dict(method="ties", weights=[1.0, 1.0], density=0.5, rank=8),
        "dare_ties": dict(method="dare_ties", weights=[1.0, 1.0], density=0.5, rank=8, seed=0),
        "cat": dict(method="cat", weights=[0.5, 0.5]),
    }
    for name, kw in merges.items():
        out = work / f"merged_{name}"
        merged = am.merge([a, b], **kw)
        merged.save(out, force=True)
        m = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
        rows[f"merged {name}"] = (loss_on(m, eval_a), loss_on(m, eval_b))
        # the PEFT-loaded model must equal base + merged delta, which we add by hand here
        manual = copy.deepcopy(base)
        sd = manual.state_dict()
        for mod_name in merged.modules:
            sd[mod_name.removeprefix("base_model.model.") + ".weight"] += merged.delta(mod_name)
        with torch.no_grad():
            diff = (m(eval_a).logits - manual(eval_a).logits).abs().max().item()
        assert diff < 1e-4, f"{name}: PEFT-loaded logits differ from base + delta by {diff}"
    print(f"{'model':<18} {'loss task +1':>13} {'loss task +2':>13}")
    for name, (la, lb) in rows.items():
        print(f"{name:<18} {la:>13.3f} {lb:>13.3f}")
    print(f"merged adapters in {work}; inspect one with: adaptermerge inspect {work / 'merged_ties'}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
