"""Byte-level mutation fuzzer for adaptermerge's loader (safetensors header + adapter_config.json) and a small merge.

Every iteration takes a valid adapter from a corpus built here, mutates its weights file and/or its config (raw
bit flips, byte runs, truncation, splices, forged header lengths, and structure-aware edits of the JSON header:
dtypes, shapes, offsets, metadata, nesting), writes it to a scratch folder, then

    load_adapter -> read every LoRA factor and extra tensor -> a small merge (in memory, sometimes to disk)

Any exception that is not an ``AdapterMergeError`` is a finding (a crash with a traceback in the CLI); so is an
iteration that takes longer than ``--hang-seconds`` or a merge that leaves files behind. Each finding is saved
(weights, config, traceback) under ``--out`` and deduplicated by exception type and raising line.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/fuzz_loader.py --minutes 30 --out fuzz-out
    python benchmarks/fuzz_loader.py --replay fuzz-out/finding-000   # re-run one saved input

The process caps its own address space (``--max-memory-gb``, default 4) so that an allocation bug shows up as a
finding (MemoryError) instead of pushing the machine into the OOM killer. No atheris needed: this is a plain
mutation loop; it is deterministic for a given ``--seed`` (up to timing).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adaptermerge as am  # noqa: E402
from adaptermerge.errors import AdapterMergeError  # noqa: E402
from adaptermerge.safetensors_io import TEMP_PREFIX  # noqa: E402

torch.set_num_threads(1)

PREFIX = "base_model.model."
Sample = tuple[bytes, str | None]  # (weights file bytes, adapter_config.json text or None for a bare file)


class Hang(BaseException):
    """Raised by the alarm: not an Exception, so no handler under test can swallow it."""


# ---------------------------------------------------------------------------------------------------- corpus
def _st_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, *, shuffle: random.Random | None = None) -> bytes:
    """A safetensors file written by hand (optionally with a shuffled tensor order), independent of adaptermerge."""
    names = list(tensors)
    if shuffle is not None:
        shuffle.shuffle(names)
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    blobs, off = [], 0
    for n in names:
        t = tensors[n].contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[n] = {"dtype": {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}[t.dtype],
                     "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def _lora(modules: dict[str, tuple[int, int]], r: int, dtype: torch.dtype, g: torch.Generator,
          embedding: dict[str, tuple[int, int]] | None = None, ranks: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {}
    for k, (o, i) in modules.items():
        rr = (ranks or {}).get(k, r)
        t[f"{PREFIX}{k}.lora_A.weight"] = torch.randn(rr, i, generator=g).to(dtype)
        t[f"{PREFIX}{k}.lora_B.weight"] = torch.randn(o, rr, generator=g).to(dtype)
    for k, (num, dim) in (embedding or {}).items():
        t[f"{PREFIX}{k}.lora_embedding_A"] = torch.randn(r, num, generator=g).to(dtype)
        t[f"{PREFIX}{k}.lora_embedding_B"] = torch.randn(dim, r, generator=g).to(dtype)
    return t


def build_corpus(seed: int = 0) -> list[Sample]:
    """Valid adapters covering the loader's features: dtypes, embeddings, patterns, rsLoRA, bare files, extras."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    mods = {"model.layers.0.self_attn.q_proj": (12, 10), "model.layers.0.self_attn.v_proj": (6, 10),
            "model.layers.1.mlp.down_proj": (10, 14)}
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
           "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}
    out: list[Sample] = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out.append((_st_bytes(_lora(mods, 4, dtype, g), {"format": "pt"}), json.dumps(cfg)))
    out.append((_st_bytes(_lora(mods, 4, torch.float32, g), {"format": "pt"}, shuffle=rng), json.dumps(cfg)))
    pat = {**cfg, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3.0}, "use_rslora": True}
    out.append((_st_bytes(_lora(mods, 4, torch.float32, g, ranks={"model.layers.0.self_attn.v_proj": 2}), None), json.dumps(pat)))
    emb = _lora({"model.layers.0.self_attn.q_proj": (12, 10)}, 4, torch.float32, g, embedding={"model.embed_tokens": (20, 12)})
    out.append((_st_bytes(emb, {"format": "pt"}), json.dumps({**cfg, "target_modules": ["q_proj", "embed_tokens"]})))
    extra = _lora(mods, 4, torch.float32, g)
    extra[f"{PREFIX}lm_head.modules_to_save.default.weight"] = torch.randn(5, 12, generator=g)
    extra[f"{PREFIX}model.layers.0.step"] = torch.arange(3, dtype=torch.int64)
    out.append((_st_bytes(extra, {"format": "pt"}), json.dumps(cfg)))
    out.append((_st_bytes(_lora(mods, 4, torch.float32, g), {"lora_alpha": "8", "r": "4"}), None))  # bare file
    out.append((_st_bytes(_lora(mods, 4, torch.float32, g), {"adaptermerge.scale_folded": "true", "format": "pt"}), None))
    out.append((_st_bytes(_lora({"a.q": (1, 1)}, 1, torch.float32, g), None), json.dumps({"r": 1, "lora_alpha": 1})))
    return out


# ---------------------------------------------------------------------------------------------------- mutators
INTERESTING_INTS = [0, 1, -1, 2, 7, 8, 255, 256, 2**16, 2**31 - 1, 2**31, 2**32, 2**40, 2**53, 2**63 - 1, 2**63, 2**64, -2**63]
INTERESTING_BYTES = [b"\x00", b"\xff", b"\x7f", b"\x80", b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\", b"9", b"-", b"e"]
DTYPE_STRINGS = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "F128", "", "f32", "C64"]


def _json_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return rng.choice(INTERESTING_INTS)
    if kind == 1:
        return rng.choice([0.0, -0.0, 1.5, 1e308, -1e308, float("nan"), float("inf"), 1e-320])
    if kind == 2:
        return rng.choice(["", "x", "F32", "q_proj", "(", "a" * 1000, "\u00e9", "\x00", ".*", "[", "(a+)+$"])
    if kind == 3:
        return None
    if kind == 4:
        return rng.choice([True, False])
    if kind == 5:
        return 10 ** rng.randrange(1, 4300) - 1
    if kind == 6:
        return []
    if kind == 7:
        return {}
    if kind in (8, 9):
        return [_json_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["dtype", "shape", "data_offsets", "r", "x"]): _json_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _split(data: bytes) -> tuple[dict | None, bytes]:
    """(parsed header, tensor data) of a valid-enough safetensors file, or (None, data)."""
    if len(data) < 8:
        return None, data
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        return None, data
    try:
        h = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError):
        return None, data
    return (h, data[8 + n :]) if isinstance(h, dict) else (None, data)


def _join(header: Any, body: bytes, rng: random.Random) -> bytes:
    try:
        h = json.dumps(header, separators=(",", ":"), allow_nan=True).encode("utf-8", "surrogatepass")
    except (ValueError, OverflowError):
        h = b"{}"
    return struct.pack("<Q", len(h)) + h + body


def mutate_header(data: bytes, rng: random.Random) -> bytes:
    header, body = _split(data)
    if header is None:
        return mutate_bytes(data, rng)
    names = [k for k in header if k != "__metadata__"]
    choice = rng.randrange(16)
    if choice == 14 and names:  # a key twice (the safetensors library refuses such a file; so must we)
        name = rng.choice(names)
        h = json.dumps(header, separators=(",", ":"))
        dup = h[:-1] + "," + json.dumps(name) + ":" + json.dumps(header[name] if rng.random() < 0.5 else _json_value(rng)) + "}"
        raw = dup.encode()
        return struct.pack("<Q", len(raw)) + raw + body
    if choice == 15 and names:  # hostile text in a name or in metadata: lone surrogates, escape codes, markup
        name = rng.choice(names)
        odd = rng.choice(["\ud800", "\udfff", "\x1b[31m", "[/x]", "[bold]", "\x00", "\u202e", "\x07"])
        if rng.random() < 0.5:
            header[name.replace("q_proj", "q_proj" + odd) if "q_proj" in name else name + odd] = header.pop(name)
        else:
            header["__metadata__"] = {"format": "pt", "note" + odd: odd}
    if names and choice < 8:
        name = rng.choice(names)
        info = header[name]
        if not isinstance(info, dict):
            header[name] = _json_value(rng)
        elif choice == 0:
            info["dtype"] = rng.choice(DTYPE_STRINGS) if rng.random() < 0.8 else _json_value(rng)
        elif choice == 1 and isinstance(info.get("shape"), list) and info["shape"]:
            i = rng.randrange(len(info["shape"]))
            old = info["shape"][i]
            near = [old + rng.choice([-1, 1])] if isinstance(old, int) else []
            info["shape"][i] = rng.choice(INTERESTING_INTS + near)
        elif choice == 2:
            info["shape"] = [rng.choice([0, 1, 2, 3, 4, 12]) for _ in range(rng.randrange(0, 10))]
        elif choice == 3 and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2:
            i = rng.randrange(2)
            old = info["data_offsets"][i]
            near = [old + rng.choice([-8, -1, 1, 8])] if isinstance(old, int) else []
            info["data_offsets"][i] = rng.choice(INTERESTING_INTS + near)
        elif choice == 4:
            other = header.get(rng.choice(names))
            if isinstance(other, dict):
                info["data_offsets"] = other.get("data_offsets")
        elif choice == 5:
            info.pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
        elif choice == 6:
            info[rng.choice(["dtype", "shape", "data_offsets"])] = _json_value(rng)
        else:
            new = rng.choice([name.replace("lora_A", "lora_B"), name.replace("lora_B", "lora_A"), name + "x",
                              name.replace(".weight", ""), "__metadata__", "", name.split(".")[-1], "a" * 300])
            header[new] = header.pop(name)
    elif choice == 8:
        header["__metadata__"] = _json_value(rng) if rng.random() < 0.5 else {
            rng.choice(["lora_alpha", "alpha", "r", "use_rslora", "adaptermerge.scale_folded", "format"]):
            rng.choice(["8", "0", "-1", "nan", "inf", "x", "true", "1e400", "", "4.5"])}
    elif choice == 9 and names:
        del header[rng.choice(names)]
    elif choice == 10:
        header[rng.choice(["x", "y.lora_A.weight", "y.lora_B.weight", "z.lora_embedding_A"])] = _json_value(rng)
    elif choice == 11:
        depth = rng.choice([10, 1000, 100_000])
        return struct.pack("<Q", 2 * depth) + b"[" * depth + b"]" * depth + body
    elif choice == 12:
        n = struct.unpack("<Q", data[:8])[0]
        return struct.pack("<Q", max(0, n + rng.choice([-9, -1, 1, 7, 2**20]))) + data[8:]
    else:
        body = body[: rng.randrange(len(body) + 1)] if rng.random() < 0.5 else body + bytes(rng.randrange(1, 64))
    return _join(header, body, rng)


def mutate_bytes(data: bytes, rng: random.Random, corpus: list[Sample] | None = None) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 4, 16])):
        op = rng.randrange(8)
        if not b:
            b += bytes(rng.randrange(1, 16))
            continue
        i = rng.randrange(len(b))
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i : i + 1] = rng.choice(INTERESTING_BYTES)
        elif op == 2:
            del b[i : i + rng.randrange(1, 32)]
        elif op == 3:
            b[i:i] = rng.randbytes(rng.randrange(1, 32))
        elif op == 4:
            b = b[:i]
        elif op == 5 and len(b) >= 8:
            b[0:8] = struct.pack("<Q", rng.choice([x for x in INTERESTING_INTS if x >= 0 and x < 2**64]))
        elif op == 7 and rng.random() < 0.2:
            b[i:i] = b"9" * rng.choice([20, 400, 5000])  # numbers past float range and past int digit limits
        elif op == 6 and corpus:
            other = rng.choice(corpus)[0]
            j = rng.randrange(len(other))
            b[i:] = other[j:]
        else:
            j = rng.randrange(len(b))
            b[i], b[j] = b[j], b[i]
    return bytes(b)


def mutate_config(text: str, rng: random.Random) -> str:
    if rng.random() < 0.3:
        return mutate_bytes(text.encode(), rng).decode("utf-8", "replace")
    try:
        cfg = json.loads(text)
    except ValueError:
        return text
    if not isinstance(cfg, dict):
        return text
    key = rng.choice(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "peft_type", "use_dora",
                      "target_modules", "fan_in_fan_out", "modules_to_save"])
    if rng.random() < 0.2:
        cfg.pop(key, None)
    elif key in ("rank_pattern", "alpha_pattern") and rng.random() < 0.7:
        cfg[key] = {rng.choice(["q_proj", "v_proj", "(", "layers\\.0\\..*", "", ".*", "embed_tokens", "[a-"]):
                    rng.choice([1, 2, 4, 0, -1, 2.5, "4", None, 1e9])}
    else:
        cfg[key] = _json_value(rng)
    try:
        return json.dumps(cfg, allow_nan=True)
    except (ValueError, OverflowError):
        return text


def mutate(sample: Sample, rng: random.Random, corpus: list[Sample]) -> Sample:
    try:
        return _mutate(sample, rng, corpus)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError, OverflowError):
        # a structure-aware edit met a structure an earlier edit broke: fall back to raw bytes
        return mutate_bytes(sample[0], rng, corpus), sample[1]


def _mutate(sample: Sample, rng: random.Random, corpus: list[Sample]) -> Sample:
    weights, config = sample
    r = rng.random()
    if r < 0.45:
        weights = mutate_header(weights, rng)
    elif r < 0.75:
        weights = mutate_bytes(weights, rng, corpus)
    elif r < 0.9 and config is not None:
        config = mutate_config(config, rng)
    else:
        weights = mutate_header(mutate_bytes(weights, rng, corpus), rng)
        if config is not None and rng.random() < 0.5:
            config = mutate_config(config, rng)
    return weights, config


# ---------------------------------------------------------------------------------------------------- target
def write_sample(sample: Sample, folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    weights, config = sample
    if config is None:
        f = folder / "bare.safetensors"
        f.write_bytes(weights)
        return f
    (folder / "adapter_model.safetensors").write_bytes(weights)
    (folder / "adapter_config.json").write_text(config, encoding="utf-8", errors="replace")
    return folder


def run_target(path: Path, scratch: Path, rng: random.Random) -> str:
    """load -> read every tensor -> small merge. Returns a short tag of how far it got (for statistics)."""
    ad = am.load_adapter(path, alpha=8.0) if path.is_file() else am.load_adapter(path)
    for name in ad.modules:
        b, a = ad.factors(name, check_finite=False)
        assert b.shape[1] == a.shape[0], "factor shapes disagree after load"
    for k in ad.extras:
        ad._extra_tensor(k)
    big = any(m.out_features * m.in_features > 200_000 for m in ad.modules.values())
    method = rng.choice(["linear", "cat", "task_arithmetic"] if big else ["linear", "cat", "ties", "dare_linear", "magnitude_prune"])
    kwargs: dict[str, Any] = {} if method in ("linear", "cat", "task_arithmetic") else {"density": 0.5}
    if method != "cat":
        kwargs["rank"] = rng.choice([None, 1, 3])
    if rng.random() < 0.15:
        out = scratch / "out"
        am.merge_to(out, [ad, ad], method, [0.5, 0.5], force=True, extra_tensors="first", **kwargs)
        left = [p.name for p in scratch.iterdir() if p.name.startswith(TEMP_PREFIX)]
        assert not left, f"temporary files left behind: {left}"
        am.load_adapter(out)
        return "merged_to_disk"
    am.merge([ad, ad], method, [0.5, 0.5], extra_tensors="first", **kwargs)
    return "merged"


def _where(tb: traceback.StackSummary) -> str:
    frames = [f for f in tb if "/adaptermerge/" in f.filename] or list(tb)
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno}"


_NUM = re.compile(r"(0x[0-9a-f]+|\d+(\.\d+)?(e[+-]?\d+)?)")


def _kind(msg: str, root: str) -> str:
    """An error message with paths and numbers removed: which check fired."""
    msg = msg.replace(root, "<dir>")
    msg = re.sub(r"'[^']*'", "'…'", msg)
    return _NUM.sub("N", msg)[:120]


# ---------------------------------------------------------------------------------------------------- main loop
def fuzz(minutes: float, seed: int, out: Path, hang_seconds: float, max_iterations: int | None = None, report_every: float = 60.0) -> dict[str, Any]:
    rng = random.Random(seed)
    corpus = build_corpus(seed)
    out.mkdir(parents=True, exist_ok=True)
    scratch_root = Path(tempfile.mkdtemp(prefix="am-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"iteration took more than {hang_seconds} s")

    signal.signal(signal.SIGALRM, on_alarm)
    findings: dict[str, dict[str, Any]] = {}
    outcomes: Counter[str] = Counter()
    error_kinds: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}  # a few messages per error class, for the record
    t0 = time.monotonic()
    deadline = t0 + minutes * 60
    next_report = t0 + report_every
    it = 0
    try:
        # the corpus itself must load and merge cleanly
        for i, sample in enumerate(corpus):
            run_target(write_sample(sample, scratch_root / "in"), scratch_root, random.Random(i))
        while time.monotonic() < deadline and (max_iterations is None or it < max_iterations):
            it += 1
            sample = mutate(rng.choice(corpus), rng, corpus)
            if rng.random() < 0.2:
                sample = mutate(sample, rng, corpus)
            path = write_sample(sample, scratch_root / "in")
            for p in scratch_root.iterdir():
                if p.name != "in":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            signal.setitimer(signal.ITIMER_REAL, hang_seconds)
            try:
                outcomes[run_target(path, scratch_root, random.Random(it))] += 1
            except AdapterMergeError as e:
                outcomes[type(e).__name__] += 1
                kind = _kind(str(e), str(scratch_root))
                error_kinds[kind] += 1
                seen = examples.setdefault(type(e).__name__, [])
                if len(seen) < 8 and kind not in seen:
                    seen.append(kind)
                if "\n" in str(e):
                    _record(findings, out, sample, "multi-line message", f"message has a newline: {e!r}")
            except (Exception, Hang) as e:  # noqa: BLE001 - anything else is a finding
                tb = traceback.extract_tb(e.__traceback__)
                key = f"{type(e).__name__} at {_where(tb)}"
                outcomes["FINDING"] += 1
                _record(findings, out, sample, key, "".join(traceback.format_exception(e)))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if time.monotonic() >= next_report:
                el = time.monotonic() - t0
                print(f"[{el / 60:5.1f} min] {it} iterations, {it / el:.0f}/s, findings {len(findings)}, {dict(outcomes)}", flush=True)
                next_report += report_every
    finally:
        shutil.rmtree(scratch_root, ignore_errors=True)
    elapsed = time.monotonic() - t0
    summary = {
        "seed": seed, "minutes": round(elapsed / 60, 2), "iterations": it, "iterations_per_second": round(it / elapsed, 1),
        "corpus_files": len(corpus), "outcomes": dict(outcomes), "findings": {k: v["count"] for k, v in findings.items()},
        "distinct_error_kinds": len(error_kinds), "examples": examples, "top_error_kinds": error_kinds.most_common(40),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _record(findings: dict, out: Path, sample: Sample, key: str, text: str) -> None:
    if key in findings:
        findings[key]["count"] += 1
        return
    d = out / f"finding-{len(findings):03d}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "weights.safetensors").write_bytes(sample[0])
    if sample[1] is not None:
        (d / "adapter_config.json").write_text(sample[1], encoding="utf-8", errors="replace")
    (d / "traceback.txt").write_text(f"{key}\n\n{text}")
    findings[key] = {"count": 1, "dir": str(d)}
    print(f"FINDING {key} -> {d}", flush=True)


def replay(d: Path) -> None:
    w = (d / "weights.safetensors").read_bytes()
    cfg = d / "adapter_config.json"
    scratch = Path(tempfile.mkdtemp(prefix="am-replay-"))
    try:
        path = write_sample((w, cfg.read_text() if cfg.exists() else None), scratch / "in")
        for i in range(20):  # the merge step is randomized; try several
            try:
                print(run_target(path, scratch, random.Random(i)))
            except AdapterMergeError as e:
                print(f"{type(e).__name__}: {e}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=1.0, help="how long to fuzz (default 1)")
    ap.add_argument("--iterations", type=int, default=None, help="stop after this many iterations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("fuzz-out"), help="findings and summary.json go here")
    ap.add_argument("--hang-seconds", type=float, default=20.0, help="an iteration slower than this is a finding")
    ap.add_argument("--max-memory-gb", type=float, default=4.0, help="address-space cap of this process (0: none)")
    ap.add_argument("--report-every", type=float, default=60.0, help="seconds between progress lines")
    ap.add_argument("--replay", type=Path, default=None, help="re-run one saved finding folder and exit")
    args = ap.parse_args(argv)
    if args.max_memory_gb > 0:
        cap = int(args.max_memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    if args.replay is not None:
        replay(args.replay)
        return 0
    summary = fuzz(args.minutes, args.seed, args.out, args.hang_seconds, args.iterations, args.report_every)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("top_error_kinds", "examples")}, indent=2))
    return 1 if summary["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
