"""Property-based tests (hypothesis) for the loader and the operators (issue 4).

Loader: for random byte mutations of valid files, random headers and random configs, ``load_adapter`` + reading
every tensor either gives tensors that match what the header says (checked against the raw bytes here) or raises
the project's own error type. Operators: identity with one input, linearity, exact k for trimming, TIES sign
agreement, over random shapes, dtypes, weights and densities. Small sizes and ~40 examples each keep it quick.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import adaptermerge as am
from adaptermerge import ops
from adaptermerge.safetensors_io import DTYPES

def nonzero(lo: float, hi: float) -> st.SearchStrategy:
    """Floats with lo <= |x| <= hi, either sign (no filtering, so hypothesis never gives up)."""
    return st.tuples(st.booleans(), st.floats(lo, hi)).map(lambda t: t[1] if t[0] else -t[1])


EXAMPLES = int(os.environ.get("AM_HYPOTHESIS_EXAMPLES", "40"))  # raise it for a deep local run
FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PREFIX = "base_model.model."
NP_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I32": np.int32, "I64": np.int64,
             "U8": np.uint8, "I8": np.int8, "I16": np.int16, "BOOL": np.bool_}


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """``good`` three times out of four (hypothesis' one_of does not weight its branches)."""
    return st.integers(0, 3).flatmap(lambda k: good if k else bad)


# ------------------------------------------------------------------------------------------------ corpus
def st_file(tensors: dict[str, np.ndarray], dtypes: dict[str, str], metadata: dict | None = None) -> bytes:
    """A safetensors file written here from numpy arrays, with no adaptermerge code involved."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    blobs, off = [], 0
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtypes[name], "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def corpus_file(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    t, d = {}, {}
    for m, (o, i) in {"m.q_proj": (6, 5), "m.v_proj": (3, 5)}.items():
        t[f"{PREFIX}{m}.lora_A.weight"] = rng.standard_normal((2, i)).astype(np.float32)
        t[f"{PREFIX}{m}.lora_B.weight"] = rng.standard_normal((o, 2)).astype(np.float32)
    t[f"{PREFIX}m.extra"] = rng.standard_normal(3).astype(np.float16)
    d = {k: ("F16" if k.endswith("extra") else "F32") for k in t}
    return st_file(t, d, {"format": "pt"})


CORPUS = [corpus_file(s) for s in range(3)]
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}


def load_and_read(folder: Path) -> am.Adapter:
    ad = am.load_adapter(folder)
    for name in ad.modules:
        ad.factors(name, check_finite=False)
    for k in ad.extras:
        ad._extra_tensor(k)
    return ad


def check_against_bytes(ad: am.Adapter, data: bytes) -> None:
    """Every tensor adaptermerge returns equals what the file's own header says, decoded here with numpy."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    for name, m in ad.modules.items():
        for key in (m.key_a, m.key_b):
            info = header[key]
            b, e = info["data_offsets"]
            raw = data[base + b : base + e]
            got = ad.raw_tensor(key)
            assert list(got.shape) == info["shape"]
            assert got.dtype == DTYPES[info["dtype"]][0]
            assert got.contiguous().view(torch.uint8).numpy().tobytes() == raw
            if info["dtype"] == "BF16":  # decode by hand: the high half of a float32
                want = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                want = np.frombuffer(raw, dtype=np.dtype(NP_DTYPES[info["dtype"]]).newbyteorder("<"))
            np.testing.assert_array_equal(got.float().numpy().reshape(-1), want.astype(np.float32))


def write_dir(folder: Path, weights: bytes, config: str | dict = CONFIG) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


# ------------------------------------------------------------------------------------------------ loader
mutation = st.tuples(st.sampled_from(["flip", "flip", "set", "set", "delete", "insert", "truncate"]), st.integers(0, 10**6),
                     st.integers(0, 255))


def apply(data: bytes, muts: list[tuple[str, int, int]]) -> bytes:
    b = bytearray(data)
    for op, pos, val in muts:
        if not b:
            break
        i = pos % len(b)
        if op == "flip":
            b[i] ^= 1 << (val % 8)
        elif op == "set":
            b[i] = val
        elif op == "delete":
            del b[i : i + 1 + val % 8]
        elif op == "insert":
            b[i:i] = bytes([val]) * (1 + val % 5)
        else:
            del b[i:]
    return bytes(b)


@FAST
@given(which=st.integers(0, len(CORPUS) - 1), muts=st.lists(mutation, min_size=1, max_size=6),
       where=st.sampled_from(["anywhere", "header", "data"]))
def test_loader_on_mutated_bytes(which, muts, where):
    data = CORPUS[which]
    n = struct.unpack("<Q", data[:8])[0] + 8
    if where == "header":  # aim the mutations at the header, where the parsing happens
        muts = [(op, pos % n, val) for op, pos, val in muts]
    elif where == "data":  # in-place changes of tensor bytes: the file stays valid, the values change
        muts = [("set" if op == "set" else "flip", n + pos % (len(data) - n), val) for op, pos, val in muts]
    bad = apply(data, muts)
    with tempfile.TemporaryDirectory() as d:
        folder = write_dir(Path(d) / "a", bad)
        try:
            ad = load_and_read(folder)
        except am.AdapterMergeError as e:
            assert "\n" not in str(e) and str(folder) in str(e)
            event(type(e).__name__)
            return
        event("loaded")
        check_against_bytes(ad, bad)


dims = st.lists(st.integers(0, 6), min_size=0, max_size=3)
entry = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(sorted(DTYPES)), st.text(max_size=4), st.integers(), st.none()),
    "shape": st.one_of(dims, st.lists(st.integers(-3, 2**62), max_size=3), st.text(max_size=3)),
    "data_offsets": st.one_of(st.tuples(st.integers(-4, 300), st.integers(-4, 300)).map(list),
                              st.lists(st.integers(0, 2**64), max_size=3), st.none()),
})
names = st.sampled_from([f"{PREFIX}m.q_proj.lora_A.weight", f"{PREFIX}m.q_proj.lora_B.weight", "x",
                         f"{PREFIX}e.lora_embedding_A", f"{PREFIX}e.lora_embedding_B", "__metadata__"])


@st.composite
def lora_headers(draw) -> dict:
    """Mostly valid headers: one LoRA pair (random dtype, dims, rank, data order), then 0-2 fields replaced by
    arbitrary values and sometimes an extra random entry."""
    dtype = draw(st.sampled_from(["F32", "F16", "BF16", "F64"]))
    size = DTYPES[dtype][1]
    r, out_f, in_f = draw(st.integers(0, 3)), draw(st.integers(0, 5)), draw(st.integers(0, 5))
    a_len, b_len = r * in_f * size, out_f * r * size
    a_first = draw(st.booleans())
    a_off = [0, a_len] if a_first else [b_len, b_len + a_len]
    b_off = [a_len, a_len + b_len] if a_first else [0, b_len]
    h = {f"{PREFIX}m.q_proj.lora_A.weight": {"dtype": dtype, "shape": [r, in_f], "data_offsets": a_off},
         f"{PREFIX}m.q_proj.lora_B.weight": {"dtype": dtype, "shape": [out_f, r], "data_offsets": b_off}}
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        name = draw(st.sampled_from(sorted(h)))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        h[name][field] = draw(entry)[field]
    if draw(st.integers(0, 3)) == 0:
        h[draw(names)] = draw(entry)
    return h


@FAST
@given(header=mostly(lora_headers(), st.dictionaries(names, entry, max_size=5)),
       data_len=mostly(st.none(), st.integers(0, 300)), pad=st.booleans())
def test_loader_on_random_headers(header, data_len, pad):
    if data_len is None:  # exactly the bytes the offsets ask for, when they can be read at all
        ends = [v["data_offsets"][1] for v in header.values() if isinstance(v, dict)
                and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
        data_len = max([e for e in ends if isinstance(e, int) and 0 <= e <= 512] or [0])
    h = json.dumps(header).encode() + (b" " * (-len(json.dumps(header)) % 8) if pad else b"")
    blob = struct.pack("<Q", len(h)) + h + bytes(range(256)) * 2
    blob = blob[: 8 + len(h) + data_len]
    with tempfile.TemporaryDirectory() as d:
        r = next((v["shape"][0] for k, v in header.items() if k.endswith("lora_A.weight") and isinstance(v, dict)
                  and isinstance(v.get("shape"), list) and v["shape"] and isinstance(v["shape"][0], int)), 2)
        folder = write_dir(Path(d) / "a", blob, {"r": r, "lora_alpha": 2})
        try:
            ad = load_and_read(folder)
        except am.AdapterMergeError as e:
            assert "\n" not in str(e)
            event(type(e).__name__)
            return
        event("loaded")
        check_against_bytes(ad, blob)


config_value = st.one_of(st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3),
                         st.none(), st.booleans(), st.integers(2**60, 2**70))
pattern_key = st.sampled_from(["q_proj", "v_proj", "m\\.q_proj", ".*", "(", "k_proj", "[", "q_proj|v_proj"])


@FAST
@given(r=mostly(st.just(2), config_value), alpha=mostly(st.floats(-5, 100), config_value),
       rslora=st.one_of(st.booleans(), st.none()),
       rank_pattern=mostly(st.just({}), st.dictionaries(pattern_key, mostly(st.just(2), config_value), max_size=2)),
       alpha_pattern=mostly(st.just({}), st.dictionaries(pattern_key, mostly(st.floats(-5, 100), config_value), max_size=2)))
def test_loader_on_random_configs(r, alpha, rslora, rank_pattern, alpha_pattern):
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "rank_pattern": rank_pattern,
           "alpha_pattern": alpha_pattern}
    with tempfile.TemporaryDirectory() as d:
        folder = write_dir(Path(d) / "a", CORPUS[0], json.dumps(cfg))
        try:
            ad = load_and_read(folder)
        except am.AdapterMergeError as e:
            assert "\n" not in str(e) and len(str(e)) < 600
            event(type(e).__name__)
            return
    event("loaded")
    # accepted: every module's scale follows PEFT's rule, computed here independently
    for name, m in ad.modules.items():
        key = name[len(PREFIX):]
        rk = next((p for p in rank_pattern if re.match(rf"(.*\.)?({p})$", key)), None)
        ak = next((p for p in alpha_pattern if re.match(rf"(.*\.)?({p})$", key)), None)
        mr = rank_pattern[rk] if rk is not None else r
        ma = alpha_pattern[ak] if ak is not None else alpha
        assert mr == 2 and m.rank == 2
        want = ma / math.sqrt(mr) if rslora else ma / mr
        assert m.scale == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------------------------------------ operators
TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
shapes = st.tuples(st.integers(1, 7), st.integers(1, 9))


def tensors_of(seed: int, shape: tuple[int, int], n: int, dtype: torch.dtype, grid: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randn(shape, generator=g)
        if grid:  # many exact ties of magnitude
            t = torch.round(t * 2) / 2
        out.append(t.to(dtype))
    return out


IDENTITY = [
    ("linear", {}), ("task_arithmetic", {}), ("cat", {}), ("ties", {"density": 1.0}),
    ("dare_linear", {"density": 1.0, "seed": 3}), ("dare_ties", {"density": 1.0, "seed": 3}),
    ("magnitude_prune", {"density": 1.0}), ("breadcrumbs", {"density": 1.0, "gamma": 0.0}),
    ("della", {"density": 1.0, "epsilon": 0.0, "seed": 1}), ("della_linear", {"density": 1.0, "epsilon": 0.0, "seed": 1}),
]


@FAST
@given(seed=st.integers(0, 10**6), shape=shapes, dtype=st.sampled_from(TORCH_DTYPES),
       which=st.sampled_from(IDENTITY), grid=st.booleans())
def test_identity_with_one_input(seed, shape, dtype, which, grid):
    name, kwargs = which
    (t,) = tensors_of(seed, shape, 1, dtype, grid)
    out = getattr(ops, name)([t], [1.0], **kwargs)
    assert out.dtype == torch.float32 and out.shape == t.shape
    assert torch.equal(out, t.float())
    assert torch.equal(t, tensors_of(seed, shape, 1, dtype, grid)[0])  # input untouched


@FAST
@given(seed=st.integers(0, 10**6), shape=shapes, n=st.integers(1, 4), dtype=st.sampled_from(TORCH_DTYPES),
       weights=st.lists(nonzero(1e-3, 3), min_size=4, max_size=4), scale=nonzero(1e-3, 2), c=st.floats(0.25, 4))
def test_linearity(seed, shape, n, dtype, weights, scale, c):
    ts = tensors_of(seed, shape, n, dtype, False)
    w = weights[:n]
    ref = sum(wi * t.double() for wi, t in zip(w, ts))  # float64 reference
    out = ops.task_arithmetic(ts, w, scale=scale).double()
    mag = sum(abs(wi) * t.double().abs() for wi, t in zip(w, ts))  # the size float32 rounding is relative to
    tol = 1e-5 * mag + 1e-30
    assert torch.all((out - scale * ref).abs() <= 4 * abs(scale) * tol)
    # homogeneous in the weights (up to float32 rounding)
    out_c = ops.task_arithmetic(ts, [c * wi for wi in w], scale=scale).double()
    assert torch.all((out_c - c * out).abs() <= 8 * c * abs(scale) * tol)
    total = math.fsum(w)
    assume(abs(total) > 1e-2)
    lin = ops.linear(ts, w).double()
    assert torch.all((lin - ref / total).abs() <= 8 * tol / abs(total))


def ref_topk(x: np.ndarray, k: int) -> np.ndarray:
    """Mask of the k largest |x|, ties broken by lowest flat index (a stable sort on -|x|)."""
    order = np.argsort(-np.abs(x.astype(np.float64)), kind="stable")
    mask = np.zeros(x.size, bool)
    mask[order[:k]] = True
    return mask


@FAST
@given(seed=st.integers(0, 10**6), shape=shapes, density=st.floats(0.01, 1.0), dtype=st.sampled_from(TORCH_DTYPES),
       grid=st.booleans(), gamma_frac=st.floats(0.0, 1.0))
def test_trimming_keeps_exactly_k(seed, shape, density, dtype, grid, gamma_frac):
    (t,) = tensors_of(seed, shape, 1, dtype, grid)
    x = t.float().reshape(-1).numpy()
    n = x.size
    k = min(max(math.floor(density * n + 0.5), 0), n)
    want = np.where(ref_topk(x, k), x, 0)
    for name in ("magnitude_prune", "ties"):
        out = getattr(ops, name)([t], [1.0], density=density).reshape(-1).numpy()
        np.testing.assert_array_equal(out, want)
        assert int(np.count_nonzero(ref_topk(x, k))) == k
    # breadcrumbs keeps ranks g..g+k-1 exactly (it needs gamma + density <= 1)
    gamma = min(gamma_frac * (1.0 - density), 0.999)
    g = min(max(math.floor(gamma * n + 0.5), 0), n)
    band = ref_topk(x, min(n, g + k)) & ~ref_topk(x, g)
    out = ops.breadcrumbs([t], [1.0], density=density, gamma=gamma).reshape(-1).numpy()
    np.testing.assert_array_equal(out, np.where(band, x, 0))


@FAST
@given(seed=st.integers(0, 10**6), shape=shapes, n=st.integers(2, 4), dtype=st.sampled_from(TORCH_DTYPES),
       densities=st.lists(st.floats(0.05, 1.0), min_size=4, max_size=4),
       weights=st.lists(nonzero(0.05, 2), min_size=4, max_size=4),
       majority=st.sampled_from(["total", "frequency"]), grid=st.booleans(), normalize=st.booleans())
def test_ties_sign_agreement(seed, shape, n, dtype, densities, weights, majority, grid, normalize):
    ts = tensors_of(seed, shape, n, dtype, grid)
    w, dens = weights[:n], densities[:n]
    out = ops.ties(ts, w, density=dens, majority_sign=majority, normalize=normalize).reshape(-1).numpy()
    size = ts[0].numel()
    taus = []
    for t, wi, d in zip(ts, w, dens):
        x = t.float().reshape(-1).numpy()
        k = min(max(math.floor(d * size + 0.5), 0), size)
        taus.append(np.where(ref_topk(x, k), np.float32(wi) * x, np.float32(0)))
    taus = np.array(taus, dtype=np.float64)
    votes = taus.sum(0) if majority == "total" else np.sign(taus).sum(0)
    elected = np.sign(votes)
    nz = out != 0
    # every non-zero merged entry has the elected sign; where nothing is elected the result is 0
    assert np.all(np.sign(out[nz]) == elected[nz])
    assert np.all(out[elected == 0] == 0)
    # and its magnitude is bounded by the agreeing inputs (an average when normalized, a sum otherwise)
    agree = (np.sign(taus) == elected) & (taus != 0)
    num = np.where(agree, taus, 0).sum(0)
    den = np.where(agree, np.abs(np.array(w))[:, None], 0).sum(0) if normalize else np.ones_like(num)
    want = np.divide(num, den, out=np.zeros_like(num), where=den != 0)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6 * (np.abs(taus).max() + 1e-30))


# ------------------------------------------------------------------------------------------------ engine
@settings(max_examples=max(10, EXAMPLES * 5 // 8), deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 3), out_f=st.integers(1, 12), in_f=st.integers(1, 12),
       ranks=st.lists(st.integers(1, 5), min_size=3, max_size=3),
       weights=st.lists(nonzero(0.05, 2), min_size=3, max_size=3),
       dtype=st.sampled_from(["F32", "BF16", "F16"]))
def test_engine_task_arithmetic_is_exact_at_full_rank(seed, n, out_f, in_f, ranks, weights, dtype):
    """Adapters of random shapes, ranks and dtypes: the low-rank merge at rank sum(r_i) reproduces the dense
    weighted sum of the deltas, computed here with numpy from the raw factors."""
    rng = np.random.default_rng(seed)
    key = "model.layers.0.mlp.up_proj"
    np_dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.float32}[dtype]
    dense = np.zeros((out_f, in_f))
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i in range(n):
            a = rng.standard_normal((ranks[i], in_f)).astype(np_dtype)
            b = rng.standard_normal((out_f, ranks[i])).astype(np_dtype)
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            if dtype == "BF16":
                ta, tb = ta.bfloat16(), tb.bfloat16()
            raw_a, raw_b = ta.contiguous().view(torch.uint8).numpy().tobytes(), tb.contiguous().view(torch.uint8).numpy().tobytes()
            header = {f"{PREFIX}{key}.lora_A.weight": {"dtype": dtype, "shape": [ranks[i], in_f], "data_offsets": [0, len(raw_a)]},
                      f"{PREFIX}{key}.lora_B.weight": {"dtype": dtype, "shape": [out_f, ranks[i]], "data_offsets": [len(raw_a), len(raw_a) + len(raw_b)]}}
            h = json.dumps(header).encode()
            alpha = 2.0 * (i + 1)
            write_dir(Path(d) / f"a{i}", struct.pack("<Q", len(h)) + h + raw_a + raw_b, {"r": ranks[i], "lora_alpha": alpha})
            dense += weights[i] * (alpha / ranks[i]) * (tb.double().numpy() @ ta.double().numpy())
            paths.append(Path(d) / f"a{i}")
        merged = am.merge(paths, "task_arithmetic", weights[:n], rank=sum(ranks[:n]), dtype="float32")
    m = merged.modules[f"{PREFIX}{key}"]
    b, a = merged.factors(m.name)
    got = (b.double() @ a.double()).numpy()
    scale = np.abs(dense).max() + 1e-12
    np.testing.assert_allclose(got, dense, rtol=0, atol=2e-5 * scale)
