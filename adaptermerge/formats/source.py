"""Sources: a LoRA file in any supported format -> an :class:`Adapter` of modules of scaled low-rank factors.

Every source yields the same thing the engine already merges: per canonical module name a :class:`LoraModule`
(shape of the flattened delta, factor rank, scale) and, read lazily one module at a time, factors ``(B, A)`` with
``delta = scale * B @ A``. How the factors are obtained is the format's business:

* LoRA (kohya ``lora_down/lora_up``, diffusers ``lora_A/lora_B`` and legacy forms): ``B = up``, ``A = down``.
* Conv LoRA: the delta of a ``(out, in, kh, kw)`` kernel is flattened to ``(out, in*kh*kw)`` in PyTorch's memory
  order, so ``A = down.reshape(r, in*kh*kw)`` and ``B = up.reshape(out, r)`` (``up`` is a 1x1 kernel); a Tucker
  middle factor (``lora_mid``, ``(r, r, kh, kw)`` with a 1x1 ``down``) is folded into A.
* LoHa: ``dW = (w1a w1b) * (w2a w2b)`` element-wise equals ``B A`` with ``B = w1a (row-wise Khatri-Rao) w2a``
  (``B[i, a*r+b] = w1a[i,a] w2a[i,b]``) and ``A[a*r+b, j] = w1b[a,j] w2b[b,j]``: rank r^2, exact.
* LoKr: ``dW = kron(W1, W2)`` with each side a product ``B_k A_k`` (its low-rank pair, or the full matrix times an
  identity) equals ``kron(B1, B2) kron(A1, A2)``, exact.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..adapter import Adapter, LoraModule, all_finite, file_sha256
from ..errors import InputError
from ..safetensors_io import FLOAT_DTYPES, SafetensorsHeader, read_tensor
from . import names as N

Getter = Callable[[str], torch.Tensor]
Recipe = Callable[[Getter], tuple[torch.Tensor, torch.Tensor]]

#: key suffix -> part name. Longest suffixes first (".lora.down.weight" before ".down.weight"-like overlaps).
_PARTS: list[tuple[str, str]] = sorted([
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".hada_w1_a", "hada_w1_a"), (".hada_w1_b", "hada_w1_b"), (".hada_w2_a", "hada_w2_a"), (".hada_w2_b", "hada_w2_b"),
    (".hada_t1", "hada_t1"), (".hada_t2", "hada_t2"),
    (".lokr_w1", "lokr_w1"), (".lokr_w1_a", "lokr_w1_a"), (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2", "lokr_w2"), (".lokr_w2_a", "lokr_w2_a"), (".lokr_w2_b", "lokr_w2_b"), (".lokr_t2", "lokr_t2"),
    (".alpha", "alpha"), (".dora_scale", "dora"), (".lora_magnitude_vector", "dora"),
], key=lambda x: -len(x[0]))
_PROCESSOR_RE = re.compile(r"^(?P<mod>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<p>down|up)\.weight$")
#: module-name endings of diffusers UNet convolutions and their kernels (used when a flattened LyCORIS factor
#: does not carry the kernel shape itself).
_CONV_3x3 = re.compile(r"(^|\.)(conv1|conv2|conv_in|conv_out|downsamplers\.0\.conv|upsamplers\.0\.conv)$")
_CONV_1x1 = re.compile(r"(^|\.)conv_shortcut$")


@dataclass
class Coverage:
    """What a load recognised: reported by ``inspect`` and ``merge``, never silent."""

    format: str
    detected_by: str
    mapping: str = "none needed (module paths are in the key names)"
    recognised: int = 0
    unrecognised: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"format": self.format, "detected_by": self.detected_by, "mapping": self.mapping,
                "recognised_keys": self.recognised, "unrecognised_keys": list(self.unrecognised), "kinds": dict(self.kinds)}


class FormatAdapter(Adapter):
    """An adapter read from a non-PEFT file: modules under canonical names, factors computed by a per-module
    recipe from the file's tensors (read one module at a time)."""

    def __init__(self, *, name: str, path: Path, fmt: str, modules: dict[str, LoraModule], recipes: dict[str, Recipe],
                 getter: Getter, layout: dict[str, tuple[int, int]], coverage: Coverage, notes: list[str],
                 metadata: dict[str, str], header: SafetensorsHeader | None = None, extra_config: dict | None = None):
        ranks = [m.rank for m in modules.values()]
        r = max(set(ranks), key=lambda x: (ranks.count(x), x)) if ranks else 1
        super().__init__(name=name, modules=modules, config={"r": r, "lora_alpha": r, **(extra_config or {})},
                         metadata=metadata, notes=notes, path=path, header=header)
        self.format = fmt
        self.layout = dict(layout)  # module -> conv kernel (kh, kw); absent = linear
        self.coverage = coverage
        self._recipes = recipes
        self._get = getter

    def sha256(self) -> str:
        if self._sha is None and self._header is None and self.path is not None:
            self._sha = file_sha256(self.path)
        return super().sha256()

    def factors(self, name: str, *, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.modules[name]
        b, a = self._recipes[name](self._get)
        if check_finite:
            for what, t in (("B", b), ("A", a)):
                if not all_finite(t):
                    raise InputError(f"{self.name}: module '{name}' ({what} factor) contains NaN or Inf (pass allow_nonfinite / --allow-nonfinite to merge anyway)")
        return b.float() * m.scale, a.float()


def renamed(adapter: Adapter, mapping: dict[str, str], why: str) -> FormatAdapter:
    """A view of ``adapter`` with its modules renamed (old -> new); factors carry the original scale."""
    mods, recipes = {}, {}
    for old, new in mapping.items():
        m = adapter.modules[old]
        mods[new] = LoraModule(name=new, kind=m.kind, key_a=f"{new}.lora_A.weight", key_b=f"{new}.lora_B.weight",
                               out_features=m.out_features, in_features=m.in_features, rank=m.rank, alpha=float(m.rank),
                               scale=1.0, dtype=m.dtype)
        recipes[new] = (lambda _g, o=old: adapter.factors(o, check_finite=False))
    layout = {mapping[k]: v for k, v in getattr(adapter, "layout", {}).items() if k in mapping}
    cov = getattr(adapter, "coverage", None) or Coverage("peft", "PEFT key names")
    a = FormatAdapter(name=adapter.name, path=adapter.path, fmt=getattr(adapter, "format", "peft"), modules=mods,
                      recipes=recipes, getter=lambda k: torch.empty(0), layout=layout, coverage=cov,
                      notes=adapter.notes + [why], metadata=adapter.metadata, header=adapter._header)
    a._sha = adapter.sha256()
    orig = getattr(adapter, "reported_scales", {})
    a.reported_scales = {new: orig.get(old, adapter.modules[old].scale) for old, new in mapping.items()}  # the file's own
    return a


# ------------------------------------------------------------------------------------------------ parsing
def parse_key(key: str) -> tuple[str, str] | None:
    """(module key, part) of a LoRA-family tensor name, or None."""
    m = _PROCESSOR_RE.match(key)
    if m:
        proj = "to_out.0" if m.group("proj") == "to_out" else m.group("proj")
        return f"{m.group('mod')}.{proj}", m.group("p")
    for suffix, part in _PARTS:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], part
    return None


def _entry_dims(e) -> list[int]:
    return list(e.shape)


def _alpha_value(where: str, key: str, get: Getter, shape: list[int]) -> float:
    if math.prod(shape) != 1 or len(shape) > 1:
        raise InputError(f"{where}: tensor '{key}' is an alpha of shape {shape}; alpha must be a scalar (shape [] or [1])")
    v = float(get(key).reshape(-1)[0])
    if not math.isfinite(v):
        raise InputError(f"{where}: tensor '{key}' (alpha) is {v}; alpha must be finite")
    return v


@dataclass
class ModuleSpec:
    """A module parsed from a file, before naming: its parts (tensor keys), factor shapes and recipe."""

    key: str  # module key in the file
    kind: str  # lora | locon | loha | lokr
    out: int
    inp: int  # flattened input width
    rank: int  # factor rank (after conversion)
    scale: float
    alpha: float | None
    nominal_rank: int  # rank the format's alpha refers to
    kernel: tuple[int, int] | None
    dtype: str
    recipe: Recipe
    keys: list[str]


def build_module(where: str, mkey: str, parts: dict[str, Any], get: Getter) -> ModuleSpec:
    """One module from its parts (``part -> TensorEntry``). Raises a one-line InputError on anything malformed."""
    if "dora" in parts:
        raise InputError(f"{where}: module '{mkey}' is DoRA ({parts['dora'].name}); the magnitude rescales the whole weight, not a delta: refused")
    for e in parts.values():
        if e.dtype not in FLOAT_DTYPES:
            raise InputError(f"{where}: tensor '{e.name}' has dtype {e.dtype}; LoRA tensors must be floating point")
    alpha = _alpha_value(where, parts["alpha"].name, get, _entry_dims(parts["alpha"])) if "alpha" in parts else None
    keys = [e.name for e in parts.values()]
    names = set(parts) - {"alpha"}
    families = {("lora" if n in ("down", "up", "mid") else n.split("_")[0]) for n in names}
    if len(families) > 1:
        raise InputError(f"{where}: module '{mkey}' mixes {' and '.join(sorted(families))} tensors ({', '.join(sorted(keys))})")
    if names & {"down", "up", "mid"}:
        return _lora_module(where, mkey, parts, alpha, keys)
    if names & {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}:
        return _loha_module(where, mkey, parts, alpha, keys)
    if any(n.startswith("lokr_") for n in names):
        return _lokr_module(where, mkey, parts, alpha, keys)
    raise InputError(f"{where}: module '{mkey}' has only an alpha ('{parts['alpha'].name}') and no factors")


def _need(where: str, mkey: str, parts: dict, *need: str) -> None:
    for n in need:
        if n not in parts:
            have = ", ".join(sorted(p for p in parts if p != "alpha"))
            raise InputError(f"{where}: module '{mkey}' has {have} but no {n}")


def _lora_module(where, mkey, parts, alpha, keys) -> ModuleSpec:
    _need(where, mkey, parts, "down", "up")
    down, up, mid = parts["down"], parts["up"], parts.get("mid")
    d, u = list(down.shape), list(up.shape)
    r = d[0] if d else 0
    kernel = None
    if mid is None and len(d) == 2 and len(u) == 2:
        out, inp = u[0], d[1]
    elif len(d) == 4 and len(u) == 4 and u[2:] == [1, 1] and mid is None:
        out, inp, kernel = u[0], d[1] * d[2] * d[3], (d[2], d[3])
    elif mid is not None and len(d) == 4 and d[2:] == [1, 1] and len(u) == 4 and u[2:] == [1, 1] and len(mid.shape) == 4:
        m = list(mid.shape)
        if m[0] != u[1] or m[1] != d[0]:
            raise InputError(f"{where}: module '{mkey}': lora_mid {m} does not fit lora_down {d} and lora_up {u}")
        out, inp, kernel, r = u[0], d[1] * m[2] * m[3], (m[2], m[3]), m[0]
    else:
        shapes = f"lora_down {d}, lora_up {u}" + (f", lora_mid {list(mid.shape)}" if mid is not None else "")
        raise InputError(f"{where}: module '{mkey}': unknown LoRA/conv kernel shapes ({shapes}); expected linear "
                         f"(r,in)/(out,r), conv (r,in,kh,kw)/(out,r,1,1), or Tucker conv with lora_mid (r,r,kh,kw)")
    if mid is None and (u[1] if len(u) > 1 else -1) != r:
        raise InputError(f"{where}: module '{mkey}': lora_down has rank {r} but lora_up has rank {u[1] if len(u) > 1 else u}")
    if r == 0:
        raise InputError(f"{where}: module '{mkey}' has rank 0")
    kd, ku, km = down.name, up.name, mid.name if mid is not None else None

    def recipe(get: Getter, kd=kd, ku=ku, km=km, out=out, r=r):
        a = get(kd).float()
        b = get(ku).float().reshape(out, r)
        if km is not None:
            a = torch.einsum("abhw,bi->aihw", get(km).float(), a.reshape(a.shape[0], a.shape[1]))
        return b, a.reshape(r, -1)

    scale = (alpha if alpha is not None else r) / r
    kind = "locon" if kernel is not None else "lora"
    return ModuleSpec(mkey, kind, out, inp, r, scale, alpha, r, kernel, up.dtype, recipe, keys)


def _loha_module(where, mkey, parts, alpha, keys) -> ModuleSpec:
    if "hada_t1" in parts or "hada_t2" in parts:
        raise InputError(f"{where}: module '{mkey}': LoHa with Tucker cores (hada_t1/hada_t2) is not supported")
    _need(where, mkey, parts, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    s = {k: list(parts[k].shape) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    if any(len(v) != 2 for v in s.values()):
        raise InputError(f"{where}: module '{mkey}': LoHa factors must be 2-D, got {s}")
    out, r1 = s["hada_w1_a"]
    r1b, inp = s["hada_w1_b"]
    out2, r2 = s["hada_w2_a"]
    r2b, inp2 = s["hada_w2_b"]
    if r1 != r1b or r2 != r2b or out != out2 or inp != inp2 or r1 == 0 or r2 == 0:
        raise InputError(f"{where}: module '{mkey}': LoHa factor shapes do not fit together: {s}")
    ks = {k: parts[k].name for k in s}

    def recipe(get: Getter, ks=ks):
        w1a, w1b, w2a, w2b = (get(ks[k]).float() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        b = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1)
        a = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])
        return _capped(b, a)

    scale = (alpha if alpha is not None else r1) / r1
    return ModuleSpec(mkey, "loha", out, inp, min(r1 * r2, out, inp), scale, alpha, r1, None, parts["hada_w1_a"].dtype, recipe, keys)


def _capped(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of rank at most min(m, n): a product of rank above that (LoHa r^2, LoKr r1*r2) is replaced by the exact
    full-rank factorisation (delta, I) or (I, delta), which is smaller and equal."""
    m, k = b.shape
    n = a.shape[1]
    if k <= min(m, n):
        return b, a
    d = b @ a
    return (d, torch.eye(n)) if n <= m else (torch.eye(m), d)


def _lokr_module(where, mkey, parts, alpha, keys) -> ModuleSpec:
    if "lokr_t2" in parts:
        raise InputError(f"{where}: module '{mkey}': LoKr with a Tucker core (lokr_t2) is not supported")
    sides = []
    kernel = None
    for side in ("1", "2"):
        full, a_, b_ = parts.get(f"lokr_w{side}"), parts.get(f"lokr_w{side}_a"), parts.get(f"lokr_w{side}_b")
        if full is not None:
            shp = list(full.shape)
            if side == "2" and len(shp) == 4:
                kernel = (shp[2], shp[3])
            elif len(shp) != 2:
                raise InputError(f"{where}: module '{mkey}': lokr_w{side} has shape {shp}; expected 2-D (or 4-D lokr_w2 for conv)")
            sides.append(("full", full.name, None, shp[0], math.prod(shp[1:]), None))
        elif a_ is not None and b_ is not None:
            sa, sb = list(a_.shape), list(b_.shape)
            if len(sa) != 2 or len(sb) != 2 or sa[1] != sb[0] or sa[1] == 0:
                raise InputError(f"{where}: module '{mkey}': lokr_w{side}_a {sa} and lokr_w{side}_b {sb} do not fit together")
            sides.append(("lowrank", a_.name, b_.name, sa[0], sb[1], sa[1]))
        else:
            raise InputError(f"{where}: module '{mkey}' has no lokr_w{side} (nor lokr_w{side}_a/_b)")
    (k1, x1, y1, a1, c1, r1), (k2, x2, y2, a2, c2, r2) = sides
    out, inp = a1 * a2, c1 * c2
    ranks = [r for r in (r1, r2) if r is not None]
    nominal = ranks[0] if ranks else 1

    def side_factors(kind, x, y, rows, cols, get):
        if kind == "lowrank":
            return get(x).float(), get(y).float()
        w = get(x).float().reshape(rows, cols)
        return (w, torch.eye(cols)) if cols <= rows else (torch.eye(rows), w)

    def recipe(get: Getter):
        b1, a1_ = side_factors(k1, x1, y1, a1, c1, get)
        b2, a2_ = side_factors(k2, x2, y2, a2, c2, get)
        return _capped(torch.kron(b1, b2), torch.kron(a1_, a2_))

    rank = min((r1 if r1 is not None else min(a1, c1)) * (r2 if r2 is not None else min(a2, c2)), out, inp)
    # LyCORIS: scale = alpha / lora_dim when a side is low-rank; both sides full matrices means scale 1
    scale = 1.0 if not ranks else (alpha if alpha is not None else nominal) / nominal
    main = parts.get("lokr_w2") or parts.get("lokr_w2_a")
    return ModuleSpec(mkey, "lokr", out, inp, rank, scale, alpha, nominal, kernel, main.dtype, recipe, keys)


def guess_kernel(name: str, inp: int) -> tuple[int, int] | None:
    """Kernel of a flattened module from its (diffusers UNet) name, when the factors do not say."""
    if _CONV_3x3.search(name) and inp % 9 == 0:
        return (3, 3)
    if _CONV_1x1.search(name):
        return (1, 1)
    return None


# ------------------------------------------------------------------------------------------------ loading
def group_keys(header: SafetensorsHeader) -> tuple[dict[str, dict[str, Any]], list[str]]:
    groups: dict[str, dict[str, Any]] = {}
    unknown: list[str] = []
    for key, entry in header.tensors.items():
        pk = parse_key(key)
        if pk is None:
            unknown.append(key)
            continue
        mkey, part = pk
        slot = groups.setdefault(mkey, {})
        if part in slot:
            raise InputError(f"{header.path}: module '{mkey}' has two '{part}' tensors ({slot[part].name}, {key})")
        slot[part] = entry
    return groups, sorted(unknown)


def load_safetensors_format(path: Path, header: SafetensorsHeader, fmt: str, detected_by: str, *,
                            base: Path | None = None, ignore_unknown: bool = False) -> FormatAdapter:
    """Read a kohya / LyCORIS / diffusers LoRA file (PEFT files go through :func:`adaptermerge.load_adapter`)."""
    where = str(path)
    get: Getter = lambda k: read_tensor(header, k)  # noqa: E731
    groups, unknown = group_keys(header)
    cov = Coverage(fmt, detected_by)
    specs: list[ModuleSpec] = []
    for mkey in sorted(groups):
        specs.append(build_module(where, mkey, groups[mkey], get))
    if not specs:
        raise InputError(f"{where}: no LoRA tensors recognised in {len(header.tensors)} keys (e.g. '{next(iter(header.tensors), '')}'): not a kohya, LyCORIS, diffusers or PEFT LoRA")
    naming = resolve_names([s.key for s in specs], header.metadata, base, where)
    cov.mapping = naming.description
    modules: dict[str, LoraModule] = {}
    recipes: dict[str, Recipe] = {}
    layout: dict[str, tuple[int, int]] = {}
    notes: list[str] = []
    no_alpha = 0
    for s in specs:
        target = naming.targets.get(s.key)
        if target is None:
            unknown.extend(s.keys)
            continue
        cov.recognised += len(s.keys)
        cov.kinds[s.kind] = cov.kinds.get(s.kind, 0) + 1
        no_alpha += s.alpha is None and s.kind != "lokr"
        for canon, rows, swap in _split(s, target, where):
            if canon in modules:
                raise InputError(f"{where}: two modules of the file map to '{canon}' (second: '{s.key}')")
            kernel = s.kernel or guess_kernel(canon, s.inp)
            modules[canon] = LoraModule(
                name=canon, kind="linear", key_a=f"{canon}.lora_A.weight", key_b=f"{canon}.lora_B.weight",
                out_features=rows.stop - rows.start if rows is not None else s.out, in_features=s.inp,
                rank=s.rank, alpha=s.scale * s.rank, scale=s.scale, dtype=s.dtype)
            recipes[canon] = _row_slice(s.recipe, rows, swap)
            if kernel is not None:
                layout[canon] = kernel
    unknown = sorted(set(unknown))
    cov.unrecognised = unknown
    if not modules:
        raise InputError(f"{where}: no module could be named ({len(specs)} LoRA modules found, e.g. '{specs[0].key}', "
                         f"none in the {naming.description} mapping); pass --base with the base model")
    if unknown and not ignore_unknown:
        raise InputError(f"{where}: {len(unknown)} of {len(header.tensors)} keys not recognised, e.g. '{unknown[0]}' "
                         f"(format {fmt}, mapping {naming.description}); pass --ignore-unknown to load the rest")
    if unknown:
        notes.append(f"{len(unknown)} unrecognised keys ignored (--ignore-unknown): {', '.join(unknown[:20])}" + (" …" if len(unknown) > 20 else ""))
    if no_alpha:
        notes.append(f"{no_alpha} module(s) without an alpha tensor: scale 1 (alpha = rank)")
    notes.append(f"format {fmt} (detected by {detected_by}); module names: {naming.description}; "
                 f"{cov.recognised} keys recognised, {len(unknown)} not")
    return FormatAdapter(name=str(path), path=path, fmt=fmt, modules=modules, recipes=recipes, getter=get,
                         layout=layout, coverage=cov, notes=notes, metadata=header.metadata, header=header)


def _split(s: ModuleSpec, target, where: str):
    """[(canonical name, row slice or None, swap halves)] for one file module."""
    if isinstance(target, str):
        return [(target, None, False)]
    comp, ft = target  # a Flux fused module
    total = sum(ft.ratios)
    if s.out % total:
        raise InputError(f"{where}: module '{s.key}' has {s.out} output rows, not divisible into {ft.ratios} parts for {', '.join(ft.parts)}")
    unit, start, out = s.out // total, 0, []
    for part, k in zip(ft.parts, ft.ratios):
        out.append((f"{comp}.{part}", slice(start, start + k * unit), ft.swap_halves))
        start += k * unit
    if len(out) == 1 and not ft.swap_halves:
        return [(out[0][0], None, False)]
    return out


def _row_slice(recipe: Recipe, rows: slice | None, swap: bool) -> Recipe:
    if rows is None and not swap:
        return recipe

    def sliced(get: Getter):
        b, a = recipe(get)
        if rows is not None:
            b = b[rows]
        if swap:
            h = b.shape[0] // 2
            b = torch.cat([b[h:], b[:h]], 0)
        return b.contiguous(), a

    return sliced


# ------------------------------------------------------------------------------------------------ naming
@dataclass
class Naming:
    targets: dict[str, Any]  # file module key -> canonical name, or (component, FluxTarget)
    description: str


def resolve_names(keys: list[str], metadata: dict[str, str], base: Path | None, where: str) -> Naming:
    """Canonical names for the module keys of a file (see :mod:`adaptermerge.formats.names`)."""
    targets: dict[str, Any] = {}
    used: dict[str, int] = {}
    stored = metadata.get("adaptermerge.module_names")
    table: dict[str, str] = {}
    if stored:
        try:
            table = dict(json.loads(stored))
        except (ValueError, TypeError):
            raise InputError(f"{where}: metadata adaptermerge.module_names is not a JSON object") from None
    kohya = [k for k in keys if k.startswith(tuple(N.KOHYA_PREFIXES))]
    base_paths = N.base_module_paths(base) if base is not None and kohya else None
    unet_names = [k[len("lora_unet_"):] for k in kohya if k.startswith("lora_unet_")]
    flux = N.is_flux(unet_names)

    def hit(k: str, target: Any, how: str) -> None:
        targets[k] = target
        used[how] = used.get(how, 0) + 1

    for k in keys:
        if k in table:
            hit(k, table[k], "the file's adaptermerge.module_names metadata")
            continue
        comp, path = N.split_component(k)
        if comp is not None:
            hit(k, k, "diffusers component prefixes")
            continue
        if k.startswith(N.PEFT_PREFIX):
            hit(k, k, "PEFT prefixes")
            continue
        prefix = next((p for p in N.KOHYA_PREFIXES if k.startswith(p)), None)
        if prefix is None:
            continue
        rest = k[len(prefix):]
        comp = N.KOHYA_PREFIXES[prefix]
        if comp == "unet" and flux:
            comp = "transformer"
        if base_paths is not None:
            pool = base_paths.get(comp) if comp in base_paths else base_paths.get(None)
            found = {N.underscored(p): p for p in (pool or ())}.get(rest)
            if found is not None:
                hit(k, f"{comp}.{found}" if None not in base_paths else f"{N.PEFT_PREFIX}{found}", f"module paths of --base {base}")
            continue
        if comp == "transformer":
            ft = N.FLUX.get(rest)
            if ft is not None:
                hit(k, (comp, ft), "architecture table Flux (BFL names; fused qkv / linear1 split)")
            continue
        path = (N.UNET if comp == "unet" else N.CLIP).get(rest)
        if path is not None:
            hit(k, f"{comp}.{path}", "architecture table SD1.x/SDXL UNet" if comp == "unet" else "architecture table CLIP text encoder")
        elif comp == "unet" and (path := N.ldm_unet_path(rest)) is not None:
            hit(k, f"{comp}.{path}", "Stable Diffusion LDM UNet names (layers_per_block 2)")
    desc = "; ".join(f"{how} ({n})" for how, n in used.items())
    if base_paths is not None and not any(h.startswith("module paths of --base") for h in used):
        desc += f"; --base {base} matched no module"
    return Naming(targets, desc.strip("; ") or "no mapping matched")
