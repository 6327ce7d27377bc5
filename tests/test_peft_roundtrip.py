"""Merged adapters load in PEFT unchanged, and the loaded model equals the base model plus the merged delta."""

from __future__ import annotations

import copy

import pytest
import torch

import adaptermerge as am
from conftest import read_deltas

import peft  # noqa: E402  (test extra: a missing install must fail, not skip)
import transformers  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0):
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def peft_adapter(base, path, seed, **kw):
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kw))
    model.save_pretrained(str(path))
    return path


def logits_with_deltas(base, deltas: dict[str, torch.Tensor], ids):
    model = copy.deepcopy(base)
    sd = model.state_dict()
    for key, d in deltas.items():
        w = sd[key + ".weight"]
        w += (d.T if "embed_tokens" in key else d).to(w.dtype)  # embedding LoRA deltas are stored transposed
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("method,params,rank", [
    ("linear", {}, 16),
    ("ties", {"density": 0.5}, 6),
    ("dare_ties", {"density": 0.7}, "full"),
])
def test_merged_adapter_loads_in_peft(tmp_path, method, params, rank):
    base = tiny_llama()
    a = peft_adapter(base, tmp_path / "a", 1, r=4, lora_alpha=8, target_modules=PROJ + ["embed_tokens"])
    b = peft_adapter(base, tmp_path / "b", 2, r=8, lora_alpha=8, use_rslora=True, target_modules=PROJ,
                     rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 4})
    out = tmp_path / "merged"
    am.merge([a, b], method, [0.6, 0.4], rank=rank, seed=0, **params).save(out)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    with torch.no_grad():
        got = loaded(ids).logits
    merged_deltas = read_deltas(out)
    want = logits_with_deltas(base, merged_deltas, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        plain = base(ids).logits
    assert (got - plain).abs().max() > 1e-3  # the adapter does something
    if method == "linear":  # exact: rank 16 >= 4 + 8, so the merged delta is the weighted sum of the inputs'
        da, db = read_deltas(a), read_deltas(b)
        total = {k: 0.6 * da.get(k, 0) + 0.4 * db.get(k, 0) for k in set(da) | set(db)}
        for k, d in total.items():
            torch.testing.assert_close(merged_deltas[k], d, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, logits_with_deltas(base, total, ids), rtol=1e-4, atol=1e-5)
