"""GGUF LoRA adapters of llama.cpp, read and written with the ``gguf`` package (optional extra ``gguf``).

Layout (llama.cpp ``llama-adapter.cpp`` and ``convert_lora_to_gguf.py``): metadata ``general.type = adapter``,
``adapter.type = lora``, ``general.architecture`` (must equal the base model's), ``adapter.lora.alpha`` (one float
for the whole file); tensors ``<gguf tensor name>.lora_a`` of numpy shape (r, in) and ``.lora_b`` of shape (out, r),
e.g. ``blk.0.attn_q.weight.lora_a``. llama.cpp applies ``scale = alpha / r`` per tensor pair (r from the tensor),
or scale 1 when alpha is 0 / absent. For the ``llama`` architecture llama.cpp's converter permutes the rows of
``attn_q`` / ``attn_k`` (rotary pairs interleaved -> halves): the same permutation is applied to B here, and undone
on reading, which needs the head counts (stored by adaptermerge in ``adaptermerge.n_head`` / ``n_head_kv``, or taken
from ``--base``'s config.json).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapter import Adapter, LoraModule, check_output_path
from ..errors import InputError, OutputError, ParameterError
from ..safetensors_io import apply_umask, temp_prefix
from . import names as N
from .sinks import _refuse_extras
from .source import Coverage, FormatAdapter

#: architectures whose tensor names map 1:1 and whose q/k rows llama.cpp permutes (True) or keeps (False)
ARCHS = {"llama": True, "qwen2": False, "qwen3": False}


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise ParameterError("GGUF support needs the 'gguf' package: pip install 'adaptermerge[gguf]'") from None
    return gguf


def _tensor_map(gguf, arch: str, n_blocks: int):
    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise ParameterError(f"GGUF architecture {arch!r} is unknown to the gguf package")
    return gguf.get_tensor_name_map(by_name[arch], n_blocks)


def permute_rows(b: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """llama.cpp's q/k row permutation (``convert_hf_to_gguf`` ``LlamaModel.permute``) applied to B's rows."""
    rows = b.shape[0]
    if rows % (2 * n_head):
        raise InputError(f"cannot permute {rows} rows into {n_head} heads of rotary pairs")
    if inverse:
        return b.reshape(n_head, rows // n_head // 2, 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)
    return b.reshape(n_head, 2, rows // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def _field(reader, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    if hasattr(f, "contents"):
        return f.contents()
    v = f.parts[f.data[0]]
    return bytes(v).decode() if v.dtype == np.uint8 else v.tolist()[0]


def load_gguf(path: Path, *, base: Path | None = None, ignore_unknown: bool = False) -> FormatAdapter:
    gguf = import_gguf()
    where = str(path)
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the gguf package raises ValueError/struct errors on malformed files
        raise InputError(f"{where}: not a readable GGUF file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    gtype, atype = _field(reader, "general.type"), _field(reader, "adapter.type")
    if gtype != "adapter" or atype != "lora":
        raise InputError(f"{where}: GGUF general.type={gtype!r}, adapter.type={atype!r}: not a LoRA adapter (a base model?)")
    arch = _field(reader, "general.architecture")
    alpha = float(_field(reader, "adapter.lora.alpha") or 0.0)
    tensors = {t.name: t for t in reader.tensors}
    blocks = [int(n.split(".")[1]) for n in tensors if n.startswith("blk.") and n.split(".")[1].isdigit()]
    tmap = _tensor_map(gguf, arch, max(blocks, default=0) + 1)
    reverse: dict[str, str] = {}
    for hf, (_, gname) in tmap.mapping.items():
        if "." in hf and not hf.startswith("blk.") and "_no_perm" not in hf:
            cur = reverse.get(gname)
            if cur is None or (hf.startswith("model.") and not cur.startswith("model.")):
                reverse[gname] = hf
    heads = None
    if _field(reader, "adaptermerge.n_head") is not None:
        heads = (int(_field(reader, "adaptermerge.n_head")), int(_field(reader, "adaptermerge.n_head_kv")))
    heads = heads or N.base_heads(base)

    def get(key: str) -> torch.Tensor:
        t = tensors[key]
        qt = gguf.GGMLQuantizationType(int(t.tensor_type))
        if qt == gguf.GGMLQuantizationType.F32:
            arr = np.asarray(t.data, dtype=np.float32)
        elif qt == gguf.GGMLQuantizationType.F16:
            arr = np.asarray(t.data, dtype=np.float16).astype(np.float32)
        else:
            arr = gguf.quants.dequantize(t.data, qt)
        return torch.from_numpy(np.array(arr, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)]))

    cov = Coverage("gguf", "GGUF magic and general.type=adapter", mapping=f"gguf tensor-name map of architecture {arch!r}")
    modules: dict[str, LoraModule] = {}
    recipes, unknown = {}, []
    for name in sorted(tensors):
        if not name.endswith(".lora_a"):
            if not name.endswith(".lora_b"):
                unknown.append(name)
            continue
        stem = name[: -len(".lora_a")]
        if stem + ".lora_b" not in tensors:
            raise InputError(f"{where}: tensor '{name}' has no '{stem}.lora_b'")
        ta, tb = tensors[name], tensors[stem + ".lora_b"]
        sa, sb = [int(x) for x in reversed(ta.shape)], [int(x) for x in reversed(tb.shape)]
        if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
            raise InputError(f"{where}: '{name}' {sa} and '{stem}.lora_b' {sb} are not (r, in) and (out, r)")
        gname = stem.removesuffix(".weight")
        if gname == "token_embd":
            raise InputError(f"{where}: '{name}' is an embedding LoRA (token_embd), stored transposed by llama.cpp's converter; not supported")
        hf = reverse.get(gname)
        if hf is None:
            unknown += [name, stem + ".lora_b"]
            continue
        r = sa[0]
        perm = None
        if ARCHS.get(arch) and gname.rsplit(".", 1)[-1] in ("attn_q", "attn_k"):
            if heads is None:
                raise InputError(f"{where}: '{gname}': llama.cpp permutes the q/k rows of '{arch}' by attention head; "
                                 f"pass --base <HF model folder> (config.json with num_attention_heads) to undo it")
            perm = heads[0] if gname.endswith("attn_q") else heads[1]
        canon = f"{N.PEFT_PREFIX}{hf}"
        scale = alpha / r if alpha else 1.0
        modules[canon] = LoraModule(name=canon, kind="linear", key_a=f"{canon}.lora_A.weight", key_b=f"{canon}.lora_B.weight",
                                    out_features=sb[0], in_features=sa[1], rank=r, alpha=scale * r, scale=scale,
                                    dtype="F16" if int(ta.tensor_type) == int(gguf.GGMLQuantizationType.F16) else "F32")

        def recipe(g, ka=name, kb=stem + ".lora_b", perm=perm):
            b = g(kb)
            return (permute_rows(b, perm, inverse=True) if perm else b), g(ka)

        recipes[canon] = recipe
        cov.recognised += 2
    cov.unrecognised = unknown
    if not modules:
        raise InputError(f"{where}: no LoRA tensor pair recognised in {len(tensors)} GGUF tensors (architecture {arch!r})")
    if unknown and not ignore_unknown:
        raise InputError(f"{where}: {len(unknown)} GGUF tensors not recognised, e.g. '{unknown[0]}'; pass --ignore-unknown to load the rest")
    cov.kinds = {"lora": len(modules)}
    notes = [f"format gguf (architecture {arch}, adapter.lora.alpha={alpha:g}); {cov.recognised} tensors recognised, {len(unknown)} not"]
    if unknown:
        notes.append(f"unrecognised tensors ignored (--ignore-unknown): {', '.join(unknown[:20])}")
    meta = {"gguf.architecture": str(arch), "adapter.lora.alpha": f"{alpha:g}"}
    extra = {"gguf_architecture": arch}
    if heads:
        extra["gguf_heads"] = list(heads)
    return FormatAdapter(name=where, path=path, fmt="gguf", modules=modules, recipes=recipes, getter=get, layout={},
                         coverage=cov, notes=notes, metadata=meta, extra_config=extra)


def check_file_output(target: Path, *, force: bool, inputs: list[Path], create_parent: bool = True) -> None:
    """Output checks for a single-file output of any extension (PEFT's rules for the rest)."""
    if not os.path.lexists(target):
        check_output_path(target, force=force, inputs=inputs)
    else:
        if any(Path(i).resolve() == target.resolve() for i in inputs):
            raise ParameterError(f"output {target} is input {target}; choose another output path")
        if not force:
            raise OutputError(f"{target} already exists; pass --force (force=True) to replace it")
        if target.is_dir():
            raise OutputError(f"{target} is a directory; cannot replace it with a file")
    if not create_parent:
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{target.parent}: cannot create output folder: {e.strerror or e}") from None


def write_gguf(adapter: Adapter, target: Path, *, force: bool, arch: str | None, heads: tuple[int, int] | None,
               out_dtype: torch.dtype, inputs: list[Path]) -> dict[str, Any]:
    """Write ``adapter`` (scale folded into its factors) as a llama.cpp GGUF LoRA adapter, atomically."""
    gguf = import_gguf()
    _refuse_extras(adapter, "gguf")
    arch = arch or adapter.config.get("gguf_architecture") or "llama"
    if arch not in ARCHS:
        raise ParameterError(f"--gguf-arch {arch!r}: GGUF export supports architectures {', '.join(sorted(ARCHS))}")
    heads = heads or (tuple(adapter.config["gguf_heads"]) if adapter.config.get("gguf_heads") else None)
    paths = {}
    for name in adapter.modules:
        comp, path = N.split_component(name)
        if comp is not None:
            raise ParameterError(f"module '{name}' belongs to a diffusion pipeline ({comp}); GGUF LoRA adapters are for llama.cpp language models")
        paths[name] = path
    blocks = [int(p.split(".")[2]) for p in paths.values() if p.startswith("model.layers.") and p.split(".")[2].isdigit()]
    tmap = _tensor_map(gguf, arch, max(blocks, default=0) + 1)
    ranks = Counter(m.rank for m in adapter.modules.values())
    alpha = float(max(ranks, key=lambda x: (ranks[x], x)))
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16}.get(out_dtype)
    if np_dtype is None:
        raise ParameterError("GGUF output supports --dtype float32 or float16")
    check_file_output(target, force=force, inputs=inputs)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), suffix=".gguf", dir=target.parent)
    apply_umask(fd)  # mkstemp makes 0600; the output is an ordinary file
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        if heads:
            w.add_uint32("adaptermerge.n_head", int(heads[0]))
            w.add_uint32("adaptermerge.n_head_kv", int(heads[1]))
        for k in ("adaptermerge.version", "adaptermerge.method", "adaptermerge.inputs"):
            if k in adapter.metadata:
                w.add_string(k, adapter.metadata[k])
        written = {}
        for name, path in sorted(paths.items()):
            m = adapter.modules[name]
            if m.kind != "linear" or name in getattr(adapter, "layout", {}):
                raise ParameterError(f"module '{name}' is a {m.kind if m.kind != 'linear' else 'conv'} LoRA; GGUF export supports linear modules only")
            gname = tmap.get_name(path)
            if gname is None:
                raise ParameterError(f"module '{name}' has no GGUF tensor name for architecture {arch!r}")
            b, a = adapter.factors(name, check_finite=False)
            if m.rank != alpha:  # llama.cpp applies alpha / r: pre-divide so that the applied delta is exactly B A
                b = b * (m.rank / alpha)
            leaf = gname.rsplit(".", 1)[-1]
            if ARCHS[arch] and leaf in ("attn_q", "attn_k"):
                if heads is None:
                    raise ParameterError(f"module '{name}': llama.cpp permutes q/k rows by attention head for '{arch}'; pass --base <HF model folder> (config.json) to give the head counts")
                b = permute_rows(b, heads[0] if leaf == "attn_q" else heads[1])
            w.add_tensor(f"{gname}.weight.lora_a", a.numpy().astype(np_dtype))
            w.add_tensor(f"{gname}.weight.lora_b", b.contiguous().numpy().astype(np_dtype))
            written[name] = f"{gname}.weight"
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"format": "gguf", "architecture": arch, "alpha": alpha, "tensors": written,
            "metadata": json.dumps({"n_head": heads[0], "n_head_kv": heads[1]}) if heads else None}
