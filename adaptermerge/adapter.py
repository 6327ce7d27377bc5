"""LoRA adapters as merge inputs and outputs: loading (lazy), scaling, and saving PEFT-loadable results.

An :class:`Adapter` knows its modules from the file header alone; factors are read one module at a time when the
engine asks for them, so memory is bounded by one module (times the number of inputs).

Conventions (PEFT's): for a linear layer ``lora_A.weight`` is (r, in) and ``lora_B.weight`` is (out, r); for an
embedding ``lora_embedding_A`` is (r, num_embeddings) and ``lora_embedding_B`` is (dim, r). In both cases the module's
delta is ``scale * B @ A`` with ``scale = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA), r and alpha taken per module
from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches (first matching key, as PEFT does).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from .errors import InputError, OutputError, ParameterError, option
from .safetensors_io import (
    FLOAT_DTYPES,
    SafetensorsHeader,
    SafetensorsWriter,
    apply_umask,
    canonical_sha256,
    clean_stale_temps,
    read_header,
    read_tensor,
    temp_prefix,
)

WEIGHTS_NAME = "adapter_model.safetensors"
#: Metadata key adaptermerge writes: every module's scale is 1 (alpha = r), the scale lives in lora_B.
SCALE_FOLDED_KEY = "adaptermerge.scale_folded"
CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."

_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$|^(?P<emodule>.+)\.(?P<epart>lora_embedding_A|lora_embedding_B)$")

OUTPUT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN or Inf. A plain sum decides in one pass without a mask: NaN and Inf always
    propagate into it; only a finite tensor whose sum overflows needs the element-wise check."""
    if t.numel() == 0:
        return True
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its factors are and how they scale."""

    name: str  # key prefix in the file, e.g. base_model.model.model.layers.0.self_attn.q_proj
    kind: Literal["linear", "embedding"]
    key_a: str
    key_b: str
    out_features: int  # rows of the delta (B's rows)
    in_features: int  # columns of the delta (A's columns)
    rank: int
    alpha: float
    scale: float
    dtype: str  # safetensors dtype of the factors

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def model_key(self) -> str:
        """The module's name inside the base model (what PEFT matches rank_pattern against)."""
        return self.name[len(PEFT_PREFIX):] if self.name.startswith(PEFT_PREFIX) else self.name


def pattern_key(patterns: Mapping[str, Any], key: str) -> str | None:
    """PEFT's rule: the first pattern p with ``re.match(rf"(.*\\.)?({p})$", key)``."""
    for p in patterns:
        try:
            if re.match(rf"(.*\.)?({p})$", key):
                return p
        except re.error:
            raise InputError(f"pattern {p!r} in rank_pattern/alpha_pattern is not a valid regular expression") from None
    return None


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class Adapter:
    """A LoRA adapter: a PEFT directory or a bare safetensors file on disk, or factors held in memory.

    Use :func:`load_adapter` to open one. ``modules`` maps module names to :class:`LoraModule`; :meth:`factors`
    reads one module's (B, A) in float32 with the scale folded into B; :meth:`delta` forms ``scale * B @ A``.
    """

    def __init__(
        self,
        *,
        name: str,
        modules: dict[str, LoraModule],
        config: dict[str, Any],
        metadata: dict[str, str] | None = None,
        extras: dict[str, Any] | None = None,
        notes: list[str] | None = None,
        path: Path | None = None,
        header: SafetensorsHeader | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
        summary: dict[str, Any] | None = None,
    ):
        self.name = name
        self.modules = dict(sorted(modules.items()))
        self.config = config
        self.metadata = dict(metadata or {})
        self.extras = dict(extras or {})  # non-LoRA tensors: name -> TensorEntry (file) or Tensor (memory)
        self.notes = list(notes or [])
        self.path = path
        self._header = header
        self._tensors = tensors
        self.summary = summary or {}
        self._sha: str | None = None

    # ---------------------------------------------------------------- reading
    def __repr__(self) -> str:
        ranks = sorted({m.rank for m in self.modules.values()})
        return f"Adapter({self.name!r}, modules={len(self.modules)}, ranks={ranks}, dtype={self.dtype})"

    @property
    def dtype(self) -> str:
        kinds = {m.dtype for m in self.modules.values()}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def weights_file(self) -> Path | None:
        return self._header.path if self._header is not None else None

    def sha256(self) -> str:
        """sha256 of the weights file's canonical form (:func:`canonical_sha256`: independent of the order of its
        tensors and header keys, equal to ``sha256sum`` for canonically laid out files), or of the tensors of an
        in-memory adapter."""
        if self._sha is None:
            if self._header is not None:
                self._sha = canonical_sha256(self._header)
            else:
                h = hashlib.sha256()
                for k in sorted(self._tensors or {}):
                    t = self._tensors[k].contiguous()
                    h.update(k.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
                    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
                self._sha = h.hexdigest()
        return self._sha

    def raw_tensor(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        return read_tensor(self._header, key)

    def factors(self, name: str, *, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale * B, A) of one module in float32, so that the module's delta is their product."""
        m = self.modules[name]
        a = self.raw_tensor(m.key_a)
        b = self.raw_tensor(m.key_b)
        if check_finite:
            for key, t in ((m.key_a, a), (m.key_b, b)):
                if not all_finite(t):
                    raise InputError(f"{self.name}: tensor '{key}' contains NaN or Inf "
                                     f"(pass {option('--allow-nonfinite', 'allow_nonfinite=True')} to merge anyway)")
        return b.float() * m.scale, a.float()

    def delta(self, name: str) -> torch.Tensor:
        """The dense delta ``scale * B @ A`` of one module, float32."""
        b, a = self.factors(name, check_finite=False)
        return b @ a

    # ---------------------------------------------------------------- writing
    def save(self, path: str | os.PathLike, *, force: bool = False, dtype: str | None = None) -> Path:
        """Write as a PEFT adapter directory, or as one ``.safetensors`` file when ``path`` ends in ``.safetensors``.

        The output appears atomically; an existing output is replaced only with ``force=True``.
        """
        target = Path(path)
        out_dtype = resolve_output_dtype(dtype, self.dtype)
        with OutputTarget(target, force=force, inputs=[]) as out:
            writer = SafetensorsWriter(out.weights_path, display=out.target)
            with writer:
                for m in self.modules.values():
                    b, a = self.factors(m.name, check_finite=False)
                    # the scale is folded into B; the saved config says scale 1 for every module
                    writer.add(m.key_a, a.to(out_dtype))
                    writer.add(m.key_b, b.to(out_dtype))
                for k in sorted(self.extras):
                    writer.add(k, self._extra_tensor(k))
                meta = dict(self.metadata)
                meta.setdefault("format", "pt")
                meta[SCALE_FOLDED_KEY] = "true"
                out.commit_weights(writer, meta)
            out.write_config(build_peft_config(self.modules.values(), self.config, scale_folded=True))
        return target

    def _extra_tensor(self, key: str) -> torch.Tensor:
        v = self.extras[key]
        return v if isinstance(v, torch.Tensor) else read_tensor(self._header, key)


def resolve_output_dtype(dtype: str | None, input_dtype: str) -> torch.dtype:
    if dtype is None:
        return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(input_dtype, torch.float32)
    if dtype not in OUTPUT_DTYPES:
        raise ParameterError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    return OUTPUT_DTYPES[dtype]


# -------------------------------------------------------------------------------------------------- loading
def _read_config(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (ValueError, RecursionError):  # integers past the digit limit, absurd nesting
        raise InputError(f"{path}: not valid JSON (a number too long or nesting too deep)") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: expected a JSON object")
    return cfg


def _short(v: Any, limit: int = 60) -> str:
    """repr of a config value, cut short: a hostile file must not turn an error message into megabytes."""
    try:
        text = repr(v)
    except ValueError:  # an int past the digit limit cannot even be printed
        text = f"<int of {v.bit_length()} bits>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _sane_number(v: Any) -> bool:
    """A JSON number usable as r/alpha: not a bool, finite, and (for ints) exactly representable as a float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return abs(v) <= 2**53 if isinstance(v, int) else math.isfinite(v)


def _number(cfg: Mapping[str, Any], key: str, where: str, *, positive: bool, integer: bool = False) -> float:
    v = cfg[key]
    if not _sane_number(v):
        raise InputError(f"{where}: {key} must be a number, got {_short(v)}")
    if integer and int(v) != v:
        raise InputError(f"{where}: {key} must be an integer, got {_short(v)}")
    if positive and v <= 0:
        raise InputError(f"{where}: {key} must be > 0, got {_short(v)}")
    return v


def _locate(p: Path) -> tuple[Path, Path | None]:
    """(weights file, adapter_config.json or None) of an adapter path. May raise OSError (permissions)."""
    if p.is_dir():
        weights, cfg_path = p / WEIGHTS_NAME, p / CONFIG_NAME
        if not weights.exists():
            others = sorted(x.name for x in p.iterdir() if x.suffix in {".bin", ".pt", ".pth", ".ckpt"})
            hint = f" (found {', '.join(others)}: pickle files are never unpickled; convert to safetensors)" if others else ""
            raise InputError(f"{p}: no {WEIGHTS_NAME} in this directory{hint}")
        if not cfg_path.exists():
            raise InputError(f"{p}: no {CONFIG_NAME} in this directory")
        return weights, cfg_path
    if p.exists() or p.suffix:
        cfg_path = p.parent / CONFIG_NAME if p.name == WEIGHTS_NAME else None
        return p, cfg_path if cfg_path is not None and cfg_path.exists() else None
    raise InputError(f"{p}: no such file or directory")


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def hf_hub_cache() -> Path:
    """The local Hugging Face hub cache, as huggingface_hub finds it: $HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub. Only read, never written or fetched into."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")
    return Path(home).expanduser() / "hub"


def _hub_snapshot(repo_id: str) -> tuple[Path, str] | None:
    """(snapshot folder, revision) of ``repo_id`` in the local Hugging Face cache when it holds a LoRA adapter:
    the revision ``refs/main`` points to, else the most recently written snapshot. Offline: no network."""
    repo = hf_hub_cache() / f"models--{repo_id.replace('/', '--')}"
    snaps = repo / "snapshots"
    try:
        ref = (repo / "refs" / "main").read_text().strip() if (repo / "refs" / "main").is_file() else ""
        candidates = [snaps / ref] if ref and (snaps / ref).is_dir() else sorted(
            (d for d in snaps.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)[:1]
    except OSError:
        return None
    for snap in candidates:
        if (snap / WEIGHTS_NAME).is_file() and (snap / CONFIG_NAME).is_file():
            return snap, snap.name
    return None


def _resolve_hub_id(p: Path, notes: list[str]) -> Path:
    """A path that does not exist but reads like a Hugging Face Hub id ("org/name"): the local cache's snapshot
    when there is one (with a note), else a one-line error saying that inputs are local and how to get one."""
    text = str(p)
    if p.exists() or not _HUB_ID.fullmatch(text) or text.endswith(".safetensors"):
        return p
    found = _hub_snapshot(text)
    if found is not None:
        snap, rev = found
        notes.append(f"'{text}' is not a local path: using the Hugging Face cache's copy {snap} (revision {rev[:12]}; "
                     "nothing is downloaded)")
        return snap
    raise InputError(
        f"{text}: no such file or directory. Inputs are local adapter folders or .safetensors files; adaptermerge "
        f"never downloads. If '{text}' is a Hugging Face Hub id, download it first, e.g. "
        f"`huggingface-cli download {text} --local-dir {text.rsplit('/', 1)[1]}`, and pass that folder "
        f"(the local Hugging Face cache {hf_hub_cache()} has no copy of it)"
    )


def load_adapter(
    path: str | os.PathLike, *, alpha: float | None = None, rank: int | None = None, require_alpha: bool = True
) -> Adapter:
    """Open a LoRA adapter without reading its tensors.

    ``path`` is a PEFT adapter directory (``adapter_model.safetensors`` + ``adapter_config.json``) or a bare
    ``.safetensors`` file of PEFT-named LoRA tensors. A bare file takes ``lora_alpha`` from ``alpha``, else from its
    safetensors metadata (``lora_alpha``), and r from ``rank``, its metadata (``r``) or the factor shapes; where each
    came from is recorded in ``adapter.notes``. ``alpha``/``rank`` given for a directory override its config.
    With ``require_alpha=False`` a bare file without alpha is opened with alpha = r (scale 1), and a note says so.
    A Hugging Face Hub id ("org/name") that is not a local path is taken from the local Hugging Face cache when it
    is there (never downloaded); otherwise the error says how to get the adapter.
    """
    notes: list[str] = []
    p = _resolve_hub_id(Path(path), notes)
    try:
        weights, cfg_path = _locate(p)
    except OSError as e:  # e.g. a folder without search (x) permission
        raise InputError(f"{e.filename or p}: cannot access: {e.strerror or e}") from None
    header = read_header(weights)
    if cfg_path is not None:
        cfg = _read_config(cfg_path)
        peft_type = cfg.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise InputError(f"{cfg_path}: peft_type {peft_type!r} is not LORA; only LoRA adapters can be merged")
        if cfg.get("use_dora"):
            raise InputError(f"{cfg_path}: DoRA adapters (use_dora) cannot be merged as LoRA deltas: the magnitude vector rescales the whole weight, not the delta")
        for key in ("r", "lora_alpha"):
            if key not in cfg:
                raise InputError(f"{cfg_path}: missing '{key}'")
    else:
        cfg = {}
        md = header.metadata
        if "r" in md:
            try:
                cfg["r"] = int(md["r"])
            except ValueError:
                raise InputError(f"{weights}: metadata r={md['r']!r} is not an integer") from None
            notes.append(f"r={cfg['r']} taken from the file's metadata")
        for k in ("lora_alpha", "alpha"):
            if k in md and "lora_alpha" not in cfg:
                try:
                    cfg["lora_alpha"] = float(md[k])
                except ValueError:
                    raise InputError(f"{weights}: metadata {k}={md[k]!r} is not a number") from None
                notes.append(f"lora_alpha={cfg['lora_alpha']:g} taken from the file's metadata")
        if md.get(SCALE_FOLDED_KEY) == "true" and alpha is None:
            cfg["scale_folded"] = True
            notes.append("scale 1 for every module (an adaptermerge output: the scale is folded into lora_B)")
        if md.get("use_rslora", "").lower() == "true":
            cfg["use_rslora"] = True
            notes.append("use_rslora=true taken from the file's metadata")
    if rank is not None:
        cfg["r"] = rank
        notes.append(f"r={rank} given explicitly")
    if alpha is not None:
        cfg["lora_alpha"] = alpha
        notes.append(f"lora_alpha={alpha:g} given explicitly")
    return _build_adapter(p, header, cfg, notes, bare=cfg_path is None, require_alpha=require_alpha)


def _build_adapter(
    p: Path, header: SafetensorsHeader, cfg: dict[str, Any], notes: list[str], *, bare: bool, require_alpha: bool = True
) -> Adapter:
    where = str(p)
    pairs: dict[str, dict[str, Any]] = {}
    extras: dict[str, Any] = {}
    for key, entry in header.tensors.items():
        if "lora_magnitude_vector" in key:
            raise InputError(f"{where}: tensor '{key}' is a DoRA magnitude vector; DoRA adapters cannot be merged as LoRA deltas")
        m = _KEY_RE.match(key)
        if m is None:
            extras[key] = entry
            continue
        name = m.group("module") or m.group("emodule")
        part = m.group("part") or m.group("epart")
        slot = pairs.setdefault(name, {"kind": "embedding" if part.startswith("lora_embedding") else "linear"})
        slot["A" if part.endswith("A") else "B"] = entry
    if not pairs:
        raise InputError(f"{where}: no LoRA tensors found (expected keys like '<module>.lora_A.weight' / '<module>.lora_B.weight')")
    if "r" not in cfg and bare:
        ranks = {s["A"].shape[0] for s in pairs.values() if "A" in s and len(s["A"].shape) == 2}
        if len(ranks) == 1:
            cfg["r"] = ranks.pop()
            notes.append(f"r={cfg['r']} read from the factor shapes")
    scale_folded = bool(cfg.pop("scale_folded", False)) and "lora_alpha" not in cfg
    if scale_folded:
        cfg["lora_alpha"] = 1.0  # placeholder: overridden per module below
    if "lora_alpha" not in cfg and not require_alpha and "r" in cfg:
        cfg["lora_alpha"] = cfg["r"]
        notes.append(f"lora_alpha unknown (no metadata, no {option('--alpha', 'alpha=')}): assuming alpha = r, i.e. scale 1")
    if "lora_alpha" not in cfg:
        raise ParameterError(f"{where}: bare safetensors file has no lora_alpha in its metadata; "
                             f"pass {option('--alpha', 'alpha=... to load_adapter')}")
    r = int(_number(cfg, "r", where, positive=True, integer=True)) if "r" in cfg else None
    lora_alpha = float(_number(cfg, "lora_alpha", where, positive=False))
    use_rslora = bool(cfg.get("use_rslora", False))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    for label, pat in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(pat, dict):
            raise InputError(f"{where}: {label} must be an object")
        for k, v in pat.items():
            try:
                re.compile(k)
            except (re.error, RecursionError, OverflowError, ValueError):
                raise InputError(f"{where}: {label} key {_short(k)} is not a valid regular expression") from None
            if not _sane_number(v) or (label == "rank_pattern" and (v <= 0 or int(v) != v)):
                raise InputError(f"{where}: {label}[{_short(k)}] = {_short(v)} is not a valid {'rank' if label == 'rank_pattern' else 'alpha'}")
    used_patterns: set[tuple[str, str]] = set()
    modules: dict[str, LoraModule] = {}
    for name in sorted(pairs):
        s = pairs[name]
        ka, kb = ("lora_embedding_A", "lora_embedding_B") if s["kind"] == "embedding" else ("lora_A.weight", "lora_B.weight")
        if "A" not in s or "B" not in s:
            have, missing = ("A", "B") if "A" in s else ("B", "A")
            raise InputError(f"{where}: module '{name}' has lora_{have} but no lora_{missing}")
        a, b = s["A"], s["B"]
        for e in (a, b):
            if len(e.shape) != 2:
                raise InputError(f"{where}: tensor '{e.name}' has shape {list(e.shape)}, expected 2 dimensions")
            if e.dtype not in FLOAT_DTYPES:
                raise InputError(f"{where}: tensor '{e.name}' has dtype {e.dtype}; LoRA factors must be floating point")
        if a.shape[0] != b.shape[1]:
            raise InputError(f"{where}: module '{name}': lora_A has rank {a.shape[0]} but lora_B has rank {b.shape[1]}")
        if a.dtype != b.dtype:
            raise InputError(f"{where}: module '{name}': lora_A is {a.dtype} but lora_B is {b.dtype}")
        actual = a.shape[0]
        key = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        rk, ak = pattern_key(rank_pattern, key), pattern_key(alpha_pattern, key)
        if rk is not None:
            used_patterns.add(("rank_pattern", rk))
        if ak is not None:
            used_patterns.add(("alpha_pattern", ak))
        mr = int(rank_pattern[rk]) if rk is not None else (r if r is not None and not scale_folded else actual)
        malpha = float(alpha_pattern[ak]) if ak is not None else (float(actual) if scale_folded else lora_alpha)
        if mr != actual:
            raise InputError(f"{where}: module '{name}' has rank {actual} in its tensors but the config says r={mr}")
        if actual == 0:
            raise InputError(f"{where}: module '{name}' has rank 0")
        scale = malpha / math.sqrt(mr) if use_rslora else malpha / mr
        modules[name] = LoraModule(
            name=name,
            kind=s["kind"],
            key_a=f"{name}.{ka}",
            key_b=f"{name}.{kb}",
            out_features=b.shape[0],
            in_features=a.shape[1],
            rank=actual,
            alpha=malpha,
            scale=scale,
            dtype=a.dtype,
        )
    for label, pat in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for k in pat:
            if (label, k) not in used_patterns:
                notes.append(f"{label} key {k!r} matches no module in this adapter")
    config = {k: v for k, v in cfg.items()}
    config.setdefault("r", r)
    return Adapter(
        name=str(p),
        modules=modules,
        config=config,
        metadata=header.metadata,
        extras=extras,
        notes=notes,
        path=p,
        header=header,
    )


# -------------------------------------------------------------------------------------------------- saving
def build_peft_config(modules, base_config: Mapping[str, Any], *, scale_folded: bool) -> dict[str, Any]:
    """An ``adapter_config.json`` for ``modules`` whose factors already carry their scale (alpha = r everywhere).

    The most common rank is ``r``; every module with another rank gets an exact (escaped, anchored by PEFT) entry
    in ``rank_pattern`` and ``alpha_pattern``.
    """
    modules = list(modules)
    ranks = [m.rank for m in modules]
    r = max(set(ranks), key=lambda x: (ranks.count(x), x)) if ranks else 1
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for m in modules:
        if m.rank != r:
            rank_pattern[re.escape(m.model_key)] = m.rank
            alpha_pattern[re.escape(m.model_key)] = m.rank
    targets = sorted({m.model_key.rsplit(".", 1)[-1] for m in modules})
    keep = ("base_model_name_or_path", "revision", "task_type", "fan_in_fan_out", "lora_dropout", "layers_to_transform", "layers_pattern")
    cfg: dict[str, Any] = {k: base_config[k] for k in keep if base_config.get(k) is not None}
    cfg.update(
        peft_type="LORA",
        r=r,
        lora_alpha=r,
        use_rslora=False,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        target_modules=targets,
        bias="none",
        use_dora=False,
        inference_mode=True,
        init_lora_weights=True,
        modules_to_save=base_config.get("modules_to_save") or None,
    )
    cfg.setdefault("lora_dropout", 0.0)
    cfg.setdefault("fan_in_fan_out", False)
    return {k: cfg[k] for k in sorted(cfg)}


class OutputTarget:
    """Atomic creation of an output (a PEFT directory or a single ``.safetensors`` file).

    Everything is written into a temporary sibling (``.adaptermerge-tmp-*``) and renamed onto the target at the end;
    on any error the temporary is removed and an existing target is left untouched.
    """

    def __init__(self, target: Path, *, force: bool, inputs: list[Path]):
        self.target = Path(target)
        self.is_file = self.target.suffix == ".safetensors"
        self.force = force
        check_output_path(self.target, force=force, inputs=inputs)
        self._tmpdir: Path | None = None
        self._config: dict[str, Any] | None = None
        self._metadata: Mapping[str, str] = {}
        self._weights_tmp: Path | None = None

    def __enter__(self) -> "OutputTarget":
        parent = self.target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            blocker = next((q for q in (parent, *parent.parents) if os.path.lexists(q) and not q.is_dir()), parent)
            raise OutputError(f"{blocker}: is a file, not a folder: cannot create the output folder {parent}") from None
        except OSError as e:
            raise OutputError(f"{parent}: cannot create output folder: {e.strerror or e}") from None
        if not os.access(parent, os.W_OK):
            raise OutputError(f"{parent}: output folder is not writable")
        self.cleaned = clean_stale_temps(parent)  # leftovers of killed runs (dead pids on this host only)
        if not self.is_file:
            try:
                self._tmpdir = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=parent))
                apply_umask(self._tmpdir, directory=True)  # mkdtemp makes 0700; the output is an ordinary folder
            except OSError as e:
                raise OutputError(f"{parent}: cannot create a folder there: {e.strerror or e}") from None
        return self

    @property
    def weights_path(self) -> Path:
        return self.target if self.is_file else self._tmpdir / WEIGHTS_NAME

    def commit_weights(self, writer: SafetensorsWriter, metadata: Mapping[str, str]) -> None:
        # For a file target keep the finished temporary until the whole output is ready; inside a temp dir rename.
        self._metadata = dict(metadata)
        self._weights_tmp = writer.commit(metadata, rename=not self.is_file)

    def write_config(self, config: dict[str, Any]) -> None:
        self._config = config

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._cleanup()
            return
        try:
            if self.is_file:
                os.replace(self._weights_tmp, self.target)
                self._weights_tmp = None
                _fsync_dir(self.target.parent)
            else:
                cfg_path = self._tmpdir / CONFIG_NAME
                with open(cfg_path, "w", encoding="utf-8") as f:
                    json.dump(self._config, f, indent=2, sort_keys=True)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                from .card import CARD_NAME, model_card

                card = model_card(self._metadata, self._config)  # a merge's provenance in words (README.md)
                if card is not None:
                    with open(self._tmpdir / CARD_NAME, "w", encoding="utf-8") as f:
                        f.write(card)
                        f.flush()
                        os.fsync(f.fileno())
                _fsync_dir(self._tmpdir)
                _replace_dir(self._tmpdir, self.target)
                self._tmpdir = None
                _fsync_dir(self.target.parent)
        except OSError as e:
            self._cleanup()
            raise OutputError(f"{self.target}: write failed: {e.strerror or e}") from None

    def _cleanup(self) -> None:
        if self._weights_tmp is not None and self.is_file:
            self._weights_tmp.unlink(missing_ok=True)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)


def _check_replaceable_dir(target: Path) -> None:
    """``--force`` replaces an empty folder or an adapter folder (adapter files, no sub-folders), nothing else."""
    try:
        entries = list(target.iterdir())
    except OSError as e:
        raise OutputError(f"{target}: cannot list the existing output folder: {e.strerror or e}") from None
    names = {e.name for e in entries}
    if not entries:
        return
    if not names & {WEIGHTS_NAME, CONFIG_NAME}:
        why = "it holds no adapter_config.json or adapter_model.safetensors"
    elif any(e.is_dir() and not e.is_symlink() for e in entries):
        why = "it has sub-folders"
    else:
        return
    raise OutputError(f"{target} is not an adapter directory ({why}); refusing to replace it even with {option('--force', 'force=True')}: remove it yourself or choose another output")


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (renames) durable; best effort (some file systems cannot fsync a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``). False where the OS or file system cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError, ImportError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory onto ``dst``. An existing ``dst`` is swapped with it atomically where the OS can
    (so ``dst`` always holds the old or the new output, whenever the process dies), else renamed aside first; the
    old one is then removed."""
    if not dst.exists():
        os.replace(src, dst)
        return
    if not dst.is_symlink() and _rename_exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # src now holds the old output (a named temporary if we die here)
        return
    old = Path(tempfile.mkdtemp(prefix=temp_prefix("old-"), dir=dst.parent))
    os.rmdir(old)
    os.replace(dst, old)
    try:
        os.replace(src, dst)
    except OSError:
        os.replace(old, dst)
        raise
    if old.is_symlink():  # the output was a link to a folder: drop the link, never the folder it points to
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


def check_output_path(target: Path, *, force: bool, inputs: list[Path]) -> None:
    """Refuse an output that exists without ``force``, that lies inside (or is) an input or contains one, or
    (even with ``force``) an existing folder that is not an adapter folder: replacing it would delete it."""
    t = target.resolve()
    for i in inputs:
        ip = Path(i).resolve()
        base = ip if os.path.isdir(ip) else ip.parent if ip.name == WEIGHTS_NAME else None
        if t == ip or (base is not None and (t == base or base in t.parents)):
            raise ParameterError(f"output {target} is inside input {i}; choose another output path")
        if t in ip.parents:
            raise ParameterError(f"output {target} contains input {i}; replacing it would delete the input, choose another output path")
    if os.path.lexists(target):  # (never raises: an unreachable target fails later, at mkdir, as an OutputError)
        if not force:
            raise OutputError(f"{target} already exists; pass {option('--force', 'force=True')} to replace it")
        if target.is_dir() and target.suffix != ".safetensors":
            _check_replaceable_dir(target)
        if target.is_dir() and target.suffix == ".safetensors":
            raise OutputError(f"{target} is a directory; cannot replace it with a file")
        if target.is_file() and target.suffix != ".safetensors":
            raise OutputError(f"{target} is a file; a PEFT adapter output must be a directory (or end in .safetensors)")
