"""Sinks: an :class:`Adapter` (any source, or a merge result) -> a file in one format, atomically.

Every sink writes the factors with their scale folded in, and the format's scale field set so that the reader
applies exactly ``B A``: kohya ``.alpha = rank``; diffusers no alpha (diffusers then uses alpha = rank); PEFT
``lora_alpha = r`` (plus exact per-module patterns); GGUF ``adapter.lora.alpha`` = the most common rank, with the B
of other ranks pre-multiplied by ``r / alpha``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..adapter import SCALE_FOLDED_KEY, Adapter, LoraModule, OutputTarget, build_peft_config
from ..errors import ParameterError
from ..safetensors_io import SafetensorsWriter
from . import names as N

FORMATS = ("peft", "kohya", "diffusers", "gguf")
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
PROFILES = ("vllm", "llama.cpp")


def _refuse_extras(adapter: Adapter, fmt: str) -> None:
    if adapter.extras:
        raise ParameterError(f"non-LoRA tensor '{sorted(adapter.extras)[0]}' (modules_to_save or similar) has no place in a {fmt} LoRA file; write --to peft")


def _shaped(m: LoraModule, kernel, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv layout: A (r, in, kh, kw), B (out, r, 1, 1); linear unchanged."""
    if kernel is None:
        return b, a
    kh, kw = kernel
    r = a.shape[0]
    if m.in_features % (kh * kw):
        raise ParameterError(f"module '{m.name}': input width {m.in_features} is not a multiple of its {kh}x{kw} kernel")
    return b.reshape(b.shape[0], r, 1, 1), a.reshape(r, m.in_features // (kh * kw), kh, kw)


def _meta(adapter: Adapter, fmt: str) -> dict[str, str]:
    meta = {k: v for k, v in adapter.metadata.items() if k.startswith("adaptermerge.") or k.startswith("ss_")}
    meta["format"] = "pt"
    meta["adaptermerge.output_format"] = fmt
    return meta


def _factors(adapter: Adapter, name: str, dtype: torch.dtype):
    b, a = adapter.factors(name, check_finite=False)
    return b.to(dtype).contiguous(), a.to(dtype).contiguous()


# ------------------------------------------------------------------------------------------------ PEFT
def write_peft(adapter: Adapter, target: Path, *, force: bool, dtype: torch.dtype, layout: dict, inputs: list[Path],
               profile: str | None = None) -> dict[str, Any]:
    comps = {N.split_component(n)[0] for n in adapter.modules}
    if len(comps) > 1:
        return write_peft_pipeline(adapter, target, comps, force=force, dtype=dtype, layout=layout, inputs=inputs, profile=profile)
    report: dict[str, Any] = {"format": "peft", "renamed_from_component": next(iter(comps))}
    mods, factors = {}, {}
    ranks = [m.rank for m in adapter.modules.values()]
    target_rank = None
    if profile == "vllm":
        if adapter.extras:
            raise ParameterError(f"--for vllm: vLLM refuses modules_to_save / non-LoRA tensors ({next(iter(adapter.extras))})")
        top = max(ranks)
        target_rank = next((r for r in VLLM_RANKS if r >= top), VLLM_RANKS[-1])
        report["profile"] = {"name": "vllm", "rank": target_rank, "accepted_ranks": list(VLLM_RANKS), "truncation_errors": {}}
    for name in adapter.modules:
        m = adapter.modules[name]
        path = N.split_component(name)[1]
        new = f"{N.PEFT_PREFIX}{path}"
        b, a = adapter.factors(name, check_finite=False)
        if target_rank is not None:
            if m.rank > target_rank:
                from ..lowrank import truncate_factors

                b, a, err = truncate_factors([b], [a], target_rank)
                report["profile"]["truncation_errors"][new] = err
            elif m.rank < target_rank:  # zero padding: same delta, the one rank vLLM was started with
                b = torch.cat([b, b.new_zeros(b.shape[0], target_rank - m.rank)], 1)
                a = torch.cat([a, a.new_zeros(target_rank - m.rank, a.shape[1])], 0)
        factors[new] = (b.to(dtype).contiguous(), a.to(dtype).contiguous(), layout.get(name), m)
        mods[new] = LoraModule(name=new, kind=m.kind, key_a=f"{new}.lora_A.weight", key_b=f"{new}.lora_B.weight",
                               out_features=m.out_features, in_features=m.in_features, rank=a.shape[0],
                               alpha=float(a.shape[0]), scale=1.0, dtype=m.dtype)
    with OutputTarget(target, force=force, inputs=inputs) as out:
        writer = SafetensorsWriter(out.weights_path, display=out.target)
        with writer:
            for new in sorted(factors):
                b, a, kernel, m = factors[new]
                b, a = _shaped(m, kernel, b, a)
                if m.kind == "embedding":
                    writer.add(f"{new}.lora_embedding_A", a)
                    writer.add(f"{new}.lora_embedding_B", b)
                else:
                    writer.add(f"{new}.lora_A.weight", a)
                    writer.add(f"{new}.lora_B.weight", b)
            for k in sorted(adapter.extras):
                writer.add(k, adapter._extra_tensor(k))
            meta = _meta(adapter, "peft")
            meta[SCALE_FOLDED_KEY] = "true"
            out.commit_weights(writer, meta)
        cfg = build_peft_config(mods.values(), adapter.config, scale_folded=True)
        if profile == "vllm":
            cfg["modules_to_save"] = None
        out.write_config(cfg)
    report["modules"] = len(mods)
    return report


def is_pipeline_folder(target: Path) -> bool:
    """An existing folder holding only component sub-folders (what :func:`write_peft_pipeline` writes)."""
    try:
        entries = list(target.iterdir()) if target.is_dir() and not target.is_symlink() else []
    except OSError:
        return False
    return bool(entries) and all(e.is_dir() and e.name in N.COMPONENTS for e in entries)


def check_pipeline_target(target: Path, *, force: bool, inputs: list[Path]) -> None:
    from ..adapter import check_output_path
    from ..errors import OutputError

    if not os.path.lexists(target) or not is_pipeline_folder(target):
        check_output_path(target, force=force, inputs=inputs)  # PEFT's rules, in their words
        return
    t = target.resolve()
    for i in inputs:
        if t == Path(i).resolve() or t in Path(i).resolve().parents:
            raise ParameterError(f"output {target} contains input {i}; replacing it would delete the input, choose another output path")
    if not force:
        raise OutputError(f"{target} already exists; pass --force (force=True) to replace it")


def write_peft_pipeline(adapter: Adapter, target: Path, comps: set, *, force: bool, dtype: torch.dtype, layout: dict,
                        inputs: list[Path], profile: str | None) -> dict[str, Any]:
    """A pipeline LoRA (several components) as a folder of PEFT adapters, one per component, named like diffusers'
    pipeline sub-folders: ``<target>/unet/``, ``<target>/text_encoder/``, ... The whole folder appears atomically."""
    import shutil
    import tempfile

    from ..adapter import _fsync_dir, _replace_dir
    from ..safetensors_io import apply_umask, temp_prefix
    from .source import renamed

    if None in comps:
        raise ParameterError("modules with and without a pipeline component cannot go into one PEFT output")
    if target.suffix == ".safetensors":
        raise ParameterError(f"a pipeline LoRA ({', '.join(sorted(comps))}) as PEFT is a folder of adapters, one per component; "
                             f"give a folder, not {target.name} (or write --to diffusers / kohya for one file)")
    check_pipeline_target(target, force=force, inputs=inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=target.parent))
    apply_umask(tmp, directory=True)  # mkdtemp makes 0700; the output is an ordinary folder
    reports = {}
    try:
        for comp in sorted(comps):
            names = {n: n for n in adapter.modules if N.split_component(n)[0] == comp}
            sub = renamed(adapter, names, f"component {comp}")
            sub.config = dict(adapter.config)
            sub.metadata = dict(adapter.metadata)
            reports[comp] = write_peft(sub, tmp / comp, force=False, dtype=dtype, layout={n: layout[n] for n in names if n in layout},
                                       inputs=[], profile=profile)
        _fsync_dir(tmp)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"format": "peft", "pipeline": reports, "modules": sum(r["modules"] for r in reports.values())}


# ------------------------------------------------------------------------------------------------ kohya
def _kohya_prefix(comp: str | None, comps: set) -> str:
    if comp in (None, "unet", "transformer"):
        return "lora_unet_"
    if comp == "text_encoder":
        return "lora_te1_" if "text_encoder_2" in comps else "lora_te_"
    return "lora_te2_"


def _flux_groups(adapter: Adapter) -> dict[str, tuple[N.FluxTarget, list[str | None]]]:
    """kohya Flux module -> (table entry, canonical names of its parts or None where absent)."""
    groups = {}
    present = set(adapter.modules)
    for kname, ft in N.FLUX.items():
        parts = [f"transformer.{p}" for p in ft.parts]
        if any(p in present for p in parts):
            groups[kname] = (ft, [p if p in present else None for p in parts])
    return groups


def write_kohya(adapter: Adapter, target: Path, *, force: bool, dtype: torch.dtype, layout: dict, inputs: list[Path]) -> dict[str, Any]:
    if target.suffix != ".safetensors":
        raise ParameterError(f"kohya output must be a file ending in .safetensors, got {target}")
    _refuse_extras(adapter, "kohya")
    comps = {N.split_component(n)[0] for n in adapter.modules}
    # Flux (diffusers-named transformer blocks) goes back to BFL's fused modules
    flux = "transformer" in comps and any(".single_transformer_blocks." in n or ".attn.add_q_proj" in n for n in adapter.modules)
    entries: dict[str, tuple[torch.Tensor, torch.Tensor, Any]] = {}
    names: dict[str, str] = {}
    done: set[str] = set()
    fused: set[str] = set()
    if flux:
        for kname, (ft, parts) in _flux_groups(adapter).items():
            got = {p: _factors(adapter, p, dtype) for p in parts if p is not None}
            first = next(iter(got))
            unit = got[first][0].shape[0] // ft.ratios[parts.index(first)]
            bs, as_ = [], []
            for p, k in zip(parts, ft.ratios):
                if p is None:
                    continue
                b, a = got[p]
                if b.shape[0] != k * unit:
                    raise ParameterError(f"module '{p}' has {b.shape[0]} rows; Flux {kname} expects {k * unit}")
                bs.append((p, b))
                as_.append(a)
            total_r = sum(a.shape[0] for a in as_)
            big_b = torch.zeros(unit * sum(ft.ratios), total_r, dtype=dtype)
            col = 0
            pos = {p: i for i, p in enumerate(parts)}
            for (p, b), a in zip(bs, as_):
                row = unit * sum(ft.ratios[: pos[p]])
                big_b[row: row + b.shape[0], col: col + a.shape[0]] = b
                col += a.shape[0]
            if ft.swap_halves:
                h = big_b.shape[0] // 2
                big_b = torch.cat([big_b[h:], big_b[:h]], 0)
            key = f"lora_unet_{kname}"
            entries[key] = (big_b, torch.cat(as_, 0), None)
            names[key] = "+".join(p for p in parts if p is not None)
            fused.add(key)  # named by the Flux table on reading (it also undoes the final adaLN half swap)
            done.update(p for p in parts if p is not None)
    for name in sorted(adapter.modules):
        if name in done:
            continue
        m = adapter.modules[name]
        if m.kind == "embedding":
            raise ParameterError(f"module '{name}' is an embedding LoRA; kohya files hold linear and conv modules only")
        comp, path = N.split_component(name)
        key = _kohya_prefix(comp, comps) + N.underscored(path)
        if key in entries:
            raise ParameterError(f"modules '{names[key]}' and '{name}' have the same kohya name '{key}'")
        b, a = _factors(adapter, name, dtype)
        entries[key] = (*_shaped(m, layout.get(name), b, a), None)
        names[key] = name
    with OutputTarget(target, force=force, inputs=inputs) as out:
        writer = SafetensorsWriter(out.weights_path, display=out.target)
        with writer:
            for key in sorted(entries):
                b, a, _ = entries[key]
                writer.add(f"{key}.alpha", torch.tensor(float(a.shape[0]), dtype=torch.float32))
                writer.add(f"{key}.lora_down.weight", a)
                writer.add(f"{key}.lora_up.weight", b)
            meta = _meta(adapter, "kohya")
            meta["adaptermerge.module_names"] = json.dumps({k: v for k, v in names.items() if k not in fused}, sort_keys=True, separators=(",", ":"))
            out.commit_weights(writer, meta)
    return {"format": "kohya", "modules": len(entries), "flux_fused": flux}


# ------------------------------------------------------------------------------------------------ diffusers
def write_diffusers(adapter: Adapter, target: Path, *, force: bool, dtype: torch.dtype, layout: dict, inputs: list[Path]) -> dict[str, Any]:
    if target.suffix != ".safetensors":
        raise ParameterError(f"diffusers output must be a file ending in .safetensors, got {target}")
    _refuse_extras(adapter, "diffusers")
    for name, m in adapter.modules.items():
        if m.kind == "embedding":
            raise ParameterError(f"module '{name}' is an embedding LoRA; the diffusers writer handles linear and conv modules only")
        if N.split_component(name)[0] is None:
            raise ParameterError(f"module '{name}' has no diffusers component (unet., transformer., text_encoder.); "
                                 f"diffusers LoRA files are for diffusion pipelines: write --to peft")
    with OutputTarget(target, force=force, inputs=inputs) as out:
        writer = SafetensorsWriter(out.weights_path, display=out.target)
        with writer:
            for name in sorted(adapter.modules):
                m = adapter.modules[name]
                b, a = _shaped(m, layout.get(name), *_factors(adapter, name, dtype))
                writer.add(f"{name}.lora_A.weight", a)
                writer.add(f"{name}.lora_B.weight", b)
            out.commit_weights(writer, _meta(adapter, "diffusers"))
    return {"format": "diffusers", "modules": len(adapter.modules)}
