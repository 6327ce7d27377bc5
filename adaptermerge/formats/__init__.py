"""The format layer: LoRA files of every common format in, any of them out. The engine never sees a format.

* :func:`detect` names a file's format from its keys and metadata; :func:`load` turns it into an
  :class:`~adaptermerge.Adapter` whose modules carry canonical names and scaled low-rank factors (a *source*).
* :func:`align` maps adapters of different formats to one module naming, or fails naming the first module that
  cannot be matched.
* :func:`save` writes any adapter (a source, or a merge result) in a format (a *sink*).

Formats: ``peft`` (PEFT adapter folder or file), ``kohya`` (kohya / A1111 ``lora_unet_…``), ``lycoris`` (LoHa and
LoKr in kohya naming), ``diffusers`` (``unet.`` / ``transformer.`` / ``text_encoder(_2).`` prefixes) and ``gguf``
(llama.cpp LoRA adapters). See docs/formats.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ..adapter import _KEY_RE, Adapter, load_adapter, resolve_output_dtype
from ..errors import IncompatibleInputsError, InputError, ParameterError
from . import names as N
from .sinks import FORMATS, PROFILES, write_diffusers, write_kohya, write_peft
from .source import Coverage, FormatAdapter, load_safetensors_format, parse_key, renamed

INPUT_FORMATS = ("peft", "kohya", "lycoris", "diffusers", "gguf")
__all__ = ["INPUT_FORMATS", "FORMATS", "PROFILES", "detect", "load", "align", "save", "output_format", "needs_sink",
           "merged_layout", "FormatAdapter", "Coverage"]


def detect(path: str | os.PathLike) -> tuple[str, str]:
    """(format, why) of a LoRA file or folder, from its keys and metadata only."""
    from ..safetensors_io import read_header

    p = Path(path)
    if p.is_dir():
        if _pipeline_parts(p):
            return "peft", f"a folder of PEFT adapters per pipeline component ({', '.join(_pipeline_parts(p))})"
        return "peft", "an adapter folder"
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        read_header(p)  # raises the reader's own one-line error (permissions, not a regular file, ...)
        raise InputError(f"{p}: cannot read: {e.strerror or e}") from None
    if magic == b"GGUF":
        return "gguf", "GGUF magic"
    header = read_header(p)
    keys = list(header.tensors)
    parsed = [(k, parse_key(k)) for k in keys]
    lyco = next((k for k, pk in parsed if pk and pk[1].startswith(("hada_", "lokr_"))), None)
    if lyco:
        return "lycoris", f"LyCORIS keys (e.g. '{lyco}')"
    kohya = next((k for k in keys if k.startswith(tuple(N.KOHYA_PREFIXES))), None)
    if kohya:
        return "kohya", f"kohya prefixes (e.g. '{kohya}')"
    diff = next((k for k, pk in parsed if pk and not k.startswith(N.PEFT_PREFIX) and N.split_component(pk[0])[0]), None)
    # (GPT-2-style language models also have a top-level 'transformer' module: transformer.h.N...; their bare PEFT
    # files, like any file carrying PEFT's lora_alpha/r metadata, stay PEFT)
    if diff and (diff.startswith("transformer.h.") or {"lora_alpha", "r"} & set(header.metadata)):
        diff = None
    if diff:
        return "diffusers", f"diffusers component prefixes (e.g. '{diff}')"
    peft = next((k for k in keys if _KEY_RE.match(k)), None)
    if peft:
        return "peft", f"PEFT key names (e.g. '{peft}')"
    other = next((k for k, pk in parsed if pk and pk[1] in ("down", "up")), None)
    if other:
        return "kohya", f"lora_down/lora_up keys (e.g. '{other}')"
    if any(k.startswith("ss_") for k in header.metadata):
        return "kohya", "ss_* training metadata"
    example = f" (e.g. '{keys[0]}')" if keys else " (the file holds no tensors)"
    raise InputError(f"{p}: no LoRA tensors recognised in {len(keys)} keys{example}: not a PEFT, kohya, LyCORIS, diffusers or GGUF LoRA")


def load(path: str | os.PathLike, *, format: str | None = None, base: str | os.PathLike | None = None,
         ignore_unknown: bool = False, alpha: float | None = None, rank: int | None = None,
         require_alpha: bool = True) -> Adapter:
    """Open a LoRA file of any supported format (detected, or forced with ``format``) as an Adapter.

    The result has ``format``, ``coverage`` (:class:`Coverage`: detection, name mapping, recognised and unrecognised
    keys) and ``layout`` (conv kernels by module). PEFT files are opened by :func:`adaptermerge.load_adapter`,
    unchanged. Unrecognised keys are an error unless ``ignore_unknown``.
    """
    p = Path(path)
    if format is not None and format not in INPUT_FORMATS:
        raise ParameterError(f"--format must be one of {', '.join(INPUT_FORMATS)}, got {format!r}")
    if not os.path.lexists(p):  # a Hugging Face Hub id in the local cache (PEFT), or the PEFT reader's own error
        return _as_peft(load_adapter(p, alpha=alpha, rank=rank, require_alpha=require_alpha), "a Hugging Face Hub id in the local cache")
    try:
        fmt, why = (format, "--format") if format else detect(p)
    except OSError:  # e.g. a folder without search permission: the PEFT reader reports it in its own words
        fmt, why = "peft", "unreadable path"
    b = Path(base) if base is not None else None
    if fmt == "peft" and p.is_dir() and _pipeline_parts(p):
        return _load_pipeline(p, why)
    if fmt == "peft" and _has_conv_factors(p):
        return _load_peft_conv(p, why, alpha=alpha)
    if fmt == "peft":
        return _as_peft(load_adapter(p, alpha=alpha, rank=rank, require_alpha=require_alpha), why)
    if fmt == "gguf":
        from .gguf_io import load_gguf

        return load_gguf(p, base=b, ignore_unknown=ignore_unknown)
    if p.is_dir():
        raise InputError(f"{p}: a folder can only be a PEFT adapter; --format {fmt} needs a .safetensors file")
    from ..safetensors_io import read_header

    a = load_safetensors_format(p, read_header(p), fmt, why, base=b, ignore_unknown=ignore_unknown)
    if alpha is not None or rank is not None:
        a.notes.append(f"--alpha/--rank not used: {fmt} files carry their scale per module")
    return a


def _as_peft(a: Adapter, why: str) -> Adapter:
    a.format = "peft"
    a.layout = {}
    a.coverage = Coverage("peft", why, recognised=2 * len(a.modules), kinds={"lora": len(a.modules)})
    return a


def _pipeline_parts(p: Path) -> list[str]:
    """Component sub-folders holding PEFT adapters, for a folder that is not itself an adapter."""
    try:
        if (p / "adapter_config.json").exists():
            return []
        return [c for c in N.COMPONENTS if (p / c / "adapter_config.json").is_file()]
    except OSError:
        return []


def _load_pipeline(p: Path, why: str) -> Adapter:
    """A folder of per-component PEFT adapters (as the PEFT sink writes a pipeline LoRA) as one adapter."""
    parts = {c: load(p / c) for c in _pipeline_parts(p)}
    mods, recipes, layout, notes, recognised = {}, {}, {}, [], 0
    for comp, sub in parts.items():
        mapping = {n: f"{comp}.{N.split_component(n)[1]}" for n in sub.modules}
        view = renamed(sub, mapping, f"component {comp}")
        mods.update(view.modules)
        recipes.update(view._recipes)
        layout.update(view.layout)
        notes += [f"{comp}: {n}" for n in sub.notes]
        recognised += sub.coverage.recognised
    cov = Coverage("peft", why, mapping="component sub-folders", recognised=recognised, kinds={"lora": len(mods)})
    out = FormatAdapter(name=str(p), path=p, fmt="peft", modules=mods, recipes=recipes, getter=lambda k: None,
                        layout=layout, coverage=cov, notes=notes, metadata={})
    import hashlib

    out._sha = hashlib.sha256("".join(f"{c}:{a.sha256()}" for c, a in parts.items()).encode()).hexdigest()
    return out


def _weights_of(p: Path) -> Path:
    return p / "adapter_model.safetensors" if p.is_dir() else p


def _has_conv_factors(p: Path) -> bool:
    """A PEFT adapter with 4-D (conv) factors, which the engine's PEFT reader does not take."""
    from ..safetensors_io import read_header

    try:
        w = _weights_of(p)
        if not w.is_file():
            return False
        h = read_header(w)
    except (OSError, InputError):  # unreadable: the PEFT reader reports it in its own words
        return False
    return any(len(e.shape) == 4 and _KEY_RE.match(k) for k, e in h.tensors.items())


def _load_peft_conv(p: Path, why: str, *, alpha: float | None) -> Adapter:
    """A PEFT adapter with conv modules: factors read like any LoRA file, scales by PEFT's rules (lora_alpha / r,
    rank_pattern / alpha_pattern, rsLoRA; scale 1 for adaptermerge outputs, whose scale is folded)."""
    import dataclasses
    import json
    import math

    from ..adapter import SCALE_FOLDED_KEY, pattern_key
    from ..safetensors_io import read_header

    w = _weights_of(p)
    header = read_header(w)
    a = load_safetensors_format(w, header, "peft", why + "; conv factors")
    cfg: dict[str, Any] = {}
    cfg_path = w.parent / "adapter_config.json"
    if p.is_dir() or (w.name == "adapter_model.safetensors" and cfg_path.exists()):
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"{cfg_path}: cannot read: {e}") from None
        if cfg.get("use_dora"):
            raise InputError(f"{cfg_path}: DoRA adapters (use_dora) cannot be merged as LoRA deltas")
    folded = header.metadata.get(SCALE_FOLDED_KEY) == "true" and "lora_alpha" not in cfg and alpha is None
    lora_alpha = alpha if alpha is not None else cfg.get("lora_alpha")
    if lora_alpha is None and not folded:
        raise ParameterError(f"{p}: PEFT conv adapter without lora_alpha (no adapter_config.json, no metadata): pass --alpha")
    for name, m in list(a.modules.items()):
        if folded:
            scale = 1.0
        else:
            key = N.split_component(name)[1]
            rk, ak = pattern_key(cfg.get("rank_pattern") or {}, key), pattern_key(cfg.get("alpha_pattern") or {}, key)
            r = int(cfg["rank_pattern"][rk]) if rk is not None else int(cfg.get("r", m.rank))
            al = float(cfg["alpha_pattern"][ak]) if ak is not None else float(lora_alpha)
            if r != m.rank:
                raise InputError(f"{p}: module '{name}' has rank {m.rank} in its tensors but the config says r={r}")
            scale = al / math.sqrt(r) if cfg.get("use_rslora") else al / r
        a.modules[name] = dataclasses.replace(m, scale=scale, alpha=scale * m.rank)
    a.notes = [n for n in a.notes if "without an alpha" not in n]
    a.config = {**a.config, **{k: v for k, v in cfg.items() if k in ("base_model_name_or_path", "task_type")}}
    return a


def _fmt(a: Adapter) -> str:
    return getattr(a, "format", "peft")


def align(adapters: Sequence[Adapter]) -> list[Adapter]:
    """Map the inputs of a merge to one module naming (the first input's).

    Inputs that already share a naming are returned unchanged. Otherwise PEFT-rooted names
    (``base_model.model.X``) and single-component pipeline names (``unet.X``) are mapped onto each other; a module
    that cannot be placed in the first input's naming, or (for inputs of another format than the first) that has no
    counterpart in the first input, is a one-line error naming it. (Inputs sharing no module at all are left to the
    engine's overlap check, which ``allow_disjoint`` relaxes.)
    """
    ads = list(adapters)
    if len(ads) < 2:
        return ads
    comps = [{N.split_component(n)[0] for n in a.modules} for a in ads]
    fmts = [_fmt(a) for a in ads]
    same_naming = all(c == comps[0] for c in comps)
    if same_naming and len(set(fmts)) == 1:
        return ads
    target = comps[0]
    out = [ads[0]]
    for a, c, f in zip(ads[1:], comps[1:], fmts[1:]):
        mapping = {}
        for name in a.modules:
            comp, path = N.split_component(name)
            if comp in target:
                new = name
            elif comp is None and len(target) == 1:
                new = f"{next(iter(target))}.{path}"
            elif comp is not None and target == {None} and len(c) == 1:
                new = f"{N.PEFT_PREFIX}{path}"
            else:
                raise IncompatibleInputsError(
                    f"module '{name}' of {a.name} ({f}) cannot be matched to the module naming of {ads[0].name} "
                    f"({fmts[0]}: {_naming(target)}); convert the inputs to one format first")
            if f != fmts[0] and new not in ads[0].modules:
                raise IncompatibleInputsError(
                    f"module '{name}' of {a.name} ({f}) has no counterpart in {ads[0].name} ({fmts[0]}) "
                    f"(looked for '{new}'); inputs of different formats must adapt the same modules")
            mapping[name] = new
        out.append(a if all(k == v for k, v in mapping.items()) else renamed(a, mapping, f"module names mapped to the naming of {ads[0].name}"))
    merged_layout(out)  # checks that conv kernels agree (inputs sharing no module: the engine's overlap check)
    return out


def _naming(comps: set) -> str:
    return ", ".join(sorted(f"{c}.*" if c else f"{N.PEFT_PREFIX}*" for c in comps))


def merged_layout(adapters: Sequence[Adapter]) -> dict[str, tuple[int, int]]:
    """Conv kernels by module over all inputs; a disagreement is an error."""
    lay: dict[str, tuple[int, int]] = {}
    src: dict[str, str] = {}
    for a in adapters:
        for k, v in getattr(a, "layout", {}).items():
            if k in lay and lay[k] != tuple(v):
                raise IncompatibleInputsError(f"module '{k}' is a {lay[k][0]}x{lay[k][1]} conv in {src[k]} but {v[0]}x{v[1]} in {a.name}")
            lay[k], src[k] = tuple(v), a.name
    return lay


def output_format(output: str | os.PathLike, to: str | None, input_formats: Sequence[str], profile: str | None = None) -> str:
    """The output format: ``to``, else the profile's, else from the output name (a folder: PEFT; ``.gguf``: GGUF;
    ``.safetensors``: the inputs' format when they all are kohya/LyCORIS (-> kohya) or diffusers, else PEFT)."""
    if profile is not None and profile not in PROFILES:
        raise ParameterError(f"--for must be one of {', '.join(PROFILES)}, got {profile!r}")
    want = {"vllm": "peft", "llama.cpp": "gguf"}.get(profile or "")
    if to is not None:
        if to not in FORMATS:
            raise ParameterError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
        if want and to != want:
            raise ParameterError(f"--for {profile} writes {want}, not {to}")
        return to
    if want:
        return want
    suffix = Path(output).suffix
    if suffix == ".gguf":
        return "gguf"
    if suffix == ".safetensors":
        fam = {"lycoris": "kohya"}
        kinds = [fam.get(f, f) for f in input_formats]
        if kinds and kinds[0] in ("kohya", "diffusers"):
            return kinds[0]  # the first input's format (kohya in, kohya out)
    return "peft"


def needs_sink(adapters: Sequence[Adapter], fmt: str, profile: str | None) -> bool:
    """False when the engine's own PEFT writer applies (PEFT inputs, PEFT output, no profile): byte-identical."""
    return fmt != "peft" or profile is not None or any(isinstance(a, FormatAdapter) for a in adapters)


def save(adapter: Adapter, output: str | os.PathLike, *, to: str = "peft", force: bool = False, dtype: str | None = None,
         layout: dict | None = None, inputs: Sequence[str | os.PathLike] = (), profile: str | None = None,
         gguf_arch: str | None = None, base: str | os.PathLike | None = None,
         heads: tuple[int, int] | None = None) -> dict[str, Any]:
    """Write ``adapter`` as ``to`` (peft | kohya | diffusers | gguf) at ``output``, atomically. Returns a report."""
    target = Path(output)
    lay = dict(getattr(adapter, "layout", {}) if layout is None else layout)
    out_dtype = resolve_output_dtype(dtype, adapter.dtype)
    ins = [Path(i) for i in inputs]
    if profile == "llama.cpp" and to != "gguf":
        raise ParameterError("--for llama.cpp writes gguf")
    if to == "peft":
        return write_peft(adapter, target, force=force, dtype=out_dtype, layout=lay, inputs=ins, profile=profile)
    if to == "kohya":
        return write_kohya(adapter, target, force=force, dtype=out_dtype, layout=lay, inputs=ins)
    if to == "diffusers":
        return write_diffusers(adapter, target, force=force, dtype=out_dtype, layout=lay, inputs=ins)
    if to == "gguf":
        from .gguf_io import write_gguf

        heads = heads or (N.base_heads(Path(base)) if base is not None else None)
        if out_dtype not in (__import__("torch").float32, __import__("torch").float16):
            out_dtype = __import__("torch").float32
        return write_gguf(adapter, target, force=force, arch=gguf_arch, heads=heads, out_dtype=out_dtype, inputs=ins)
    raise ParameterError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
