"""Shared fixtures: write small random LoRA adapters in PEFT's on-disk format, and read deltas back *independently*
of adaptermerge (with the safetensors library and the scaling rules written out here)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

PREFIX = "base_model.model."
LLAMA_MODULES = {
    "model.layers.0.self_attn.q_proj": (16, 16),
    "model.layers.0.self_attn.v_proj": (8, 16),
    "model.layers.0.mlp.down_proj": (16, 24),
    "model.layers.1.self_attn.q_proj": (16, 16),
    "model.layers.1.mlp.up_proj": (24, 16),
}


def write_adapter(
    path: Path,
    modules: dict[str, tuple[int, int]] = LLAMA_MODULES,
    *,
    r: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    embedding: dict[str, tuple[int, int]] | None = None,
    bare: bool = False,
    metadata: dict[str, str] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a PEFT-format LoRA adapter (directory, or bare .safetensors file when ``bare``) with random factors.

    ``modules`` maps model keys to (out_features, in_features). ``embedding`` maps model keys to
    (num_embeddings, embedding_dim) for lora_embedding_A/B pairs. Returns the path written.
    """
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for key, (out_f, in_f) in modules.items():
        rr = _pattern(rank_pattern or {}, key, r)
        tensors[f"{PREFIX}{key}.lora_A.weight"] = torch.randn(rr, in_f, generator=g).to(dtype)
        tensors[f"{PREFIX}{key}.lora_B.weight"] = torch.randn(out_f, rr, generator=g).to(dtype)
    for key, (num, dim) in (embedding or {}).items():
        rr = _pattern(rank_pattern or {}, key, r)
        tensors[f"{PREFIX}{key}.lora_embedding_A"] = torch.randn(rr, num, generator=g).to(dtype)
        tensors[f"{PREFIX}{key}.lora_embedding_B"] = torch.randn(dim, rr, generator=g).to(dtype)
    tensors.update(extra or {})
    if bare:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)
        return path
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata=metadata or {"format": "pt"})
    targets = sorted({k.rsplit(".", 1)[-1] for k in list(modules) + list(embedding or {})})
    cfg = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": use_rslora, "target_modules": targets,
        "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {}, "lora_dropout": 0.0,
        "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny",
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def _pattern(patterns: dict, key: str, default):
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?({p})$", key):
            return v
    return default


def read_deltas(path: Path, *, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """Dense float64 deltas {model key: scale * B @ A} read with the safetensors library, not adaptermerge."""
    path = Path(path)
    wfile = path / "adapter_model.safetensors" if path.is_dir() else path
    cfg = json.loads((path / "adapter_config.json").read_text()) if path.is_dir() else {"r": None, "lora_alpha": alpha}
    out = {}
    with safe_open(str(wfile), framework="pt") as f:
        keys = list(f.keys())
        for k in keys:
            for a_suffix, b_suffix in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
                if k.endswith(a_suffix):
                    name = k[: -len(a_suffix)]
                    a = f.get_tensor(k).double()
                    b = f.get_tensor(name + b_suffix).double()
                    key = name[len(PREFIX):]
                    r = _pattern(cfg.get("rank_pattern") or {}, key, cfg.get("r") or a.shape[0])
                    al = _pattern(cfg.get("alpha_pattern") or {}, key, cfg.get("lora_alpha"))
                    assert r == a.shape[0], (key, r, a.shape)
                    s = al / math.sqrt(r) if cfg.get("use_rslora") else al / r
                    out[key] = s * (b @ a)
    return out


@pytest.fixture
def adapters(tmp_path):
    """Two rank-4 adapters over the same modules, different seeds."""
    a = write_adapter(tmp_path / "a", seed=1)
    b = write_adapter(tmp_path / "b", seed=2, alpha=16.0)
    return a, b
