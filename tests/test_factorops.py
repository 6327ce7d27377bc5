"""Factor-form operators (TSV-M, Iso-C, Iso-CTS, KnOTS) and Core Space merging, against dense float64
implementations of the papers' algorithms written here (deltas read with the safetensors library, not ours)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors import safe_open

import adaptermerge as am
import dense_ref
from conftest import PREFIX, read_deltas, write_adapter

W = [0.7, -0.4, 1.2]
TOL = 1e-8  # relative singular-value cut-off of the references (the inputs are well conditioned)


@pytest.fixture
def trio(tmp_path):
    """Three adapters of ranks 3, 5, 2; 'x.down' is missing from the third; 'x.small' is 5 x 4 (joint span full)."""
    mods = {"x.q": (16, 12), "x.down": (10, 18), "x.small": (5, 4)}
    a = write_adapter(tmp_path / "a", mods, r=3, alpha=6, seed=11)
    b = write_adapter(tmp_path / "b", mods, r=5, alpha=4, seed=12)
    c = write_adapter(tmp_path / "c", {"x.q": (16, 12), "x.small": (5, 4)}, r=2, alpha=2, seed=13)
    return [a, b, c]


def dense_inputs(trio, key):
    """Each input's dense float64 delta of module ``key`` (zeros where the input lacks it)."""
    ds = [read_deltas(p) for p in trio]
    shape = next(d[key].shape for d in ds if key in d)
    return [d.get(key, torch.zeros(shape, dtype=torch.float64)) for d in ds]


def merged(tmp_path, trio, method, weights=W, **kw):
    out = tmp_path / f"out-{method}-{len(list(tmp_path.iterdir()))}"
    summary = am.merge_to(out, trio, method, weights, **kw)
    return read_deltas(out), summary


def rel(x, y):
    return float((x.double() - y.double()).norm() / y.double().norm())


def svd(x):
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return u, s, vh


def nonzero(s):
    return int((s > TOL * s[0]).sum()) if s.numel() and s[0] > 0 else 0


def polar(x):
    u, _, vh = svd(x)
    return u @ vh


def span_dim(ds):
    """min(rank of the joint column span, rank of the joint row span) of dense deltas."""
    return min(nonzero(svd(torch.cat(ds, 1))[1]), nonzero(svd(torch.cat(ds, 0))[1]))


# ------------------------------------------------------------------------------------------- dense references
def tsv_ref(ds, w, alpha=1.0):
    """TSV-M (Gargiulo et al. 2025): per task the top k = min(m, n) // T singular triplets (non-zero ones only),
    concatenated, U and V replaced by their polar factors, alpha U_perp diag(S) V_perp^T."""
    k = min(ds[0].shape) // len(ds)
    us, ss, vs = [], [], []
    for d, wi in zip(ds, w):
        u, s, vh = svd(wi * d)
        keep = min(k, nonzero(s))
        us.append(u[:, :keep]), ss.append(s[:keep]), vs.append(vh[:keep].T)
    u, s, v = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    return alpha * polar(u) @ torch.diag(s) @ polar(v).T


def iso_c_ref(ds, w, alpha=1.0):
    """Iso-C (Marczak et al. 2025): SVD of the sum, every (non-zero) singular value set to their mean."""
    u, s, vh = svd(sum(wi * d for d, wi in zip(ds, w)))
    r = nonzero(s)
    return alpha * s[:r].mean() * u[:, :r] @ vh[:r]


def iso_cts_ref(ds, w, d, alpha=1.0, frac=0.8):
    """Iso-CTS (Marczak et al. 2025) on dense deltas with subspace dimension ``d`` (the paper's min(m, n)):
    common subspace from the sum's SVD, each task's top directions of its residual, polar factors, flat spectrum.
    Zero singular values (no direction) are not added."""
    ts = [wi * x for x, wi in zip(ds, w)]
    t = len(ts)
    common = int(d * frac)
    common = d - round((d - common) / t) * t
    per = (d - common) // t
    u, s, vh = svd(sum(ts))
    c = min(common, nonzero(s))
    us, ss, vs = [u[:, :c]], [s[:c]], [vh[:c].T]
    uc = u[:, :c]
    for x in ts:
        ui, si, vhi = svd(x - uc @ uc.T @ x)
        keep = min(per, nonzero(si)) if si.numel() and si[0] > TOL * s[0] else 0
        us.append(ui[:, :keep]), ss.append(si[:keep]), vs.append(vhi[:keep].T)
    mean = torch.cat(ss).mean()
    return alpha * mean * polar(torch.cat(us, 1)) @ polar(torch.cat(vs, 1)).T


def ties_ref(xs, w, density=None, masks=None, majority_sign="total"):
    """TIES (Yadav et al. 2023) as documented, written in tests/dense_ref.py."""
    return dense_ref.ties(xs, w, density=density, masks=masks, majority_sign=majority_sign)


def knots_blocks(ds):
    """KnOTS (Stoica et al. 2025): SVD of [dW_1 | ... | dW_T] = U S [V_1^T ... V_T^T]; per input S V_i^T."""
    n = ds[0].shape[1]
    u, s, vh = svd(torch.cat(ds, 1))
    r = nonzero(s)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    return u, [s[:, None] * vh[:, i * n : (i + 1) * n] for i in range(len(ds))]


def core_ref(factors):
    """Core Space (Panariello et al. 2025): U_ref, V_ref from the SVDs of [B_1 .. B_T] and [A_1; ..; A_T]."""
    u_ref = svd(torch.cat([b for b, _ in factors], 1))[0]
    v_ref = svd(torch.cat([a for _, a in factors], 0))[2]
    return u_ref, [u_ref.T @ b @ a @ v_ref.T for b, a in factors], v_ref


def scaled_factors(trio, key):
    """(s_i B_i, A_i) float64 of every input, rank 0 where it lacks the module, read with safetensors."""
    import json

    out, shape = [], None
    for p in trio:
        cfg = json.loads((p / "adapter_config.json").read_text())
        with safe_open(str(p / "adapter_model.safetensors"), "pt") as f:
            if PREFIX + key + ".lora_A.weight" not in f.keys():
                out.append(None)
                continue
            a = f.get_tensor(PREFIX + key + ".lora_A.weight").double()
            b = f.get_tensor(PREFIX + key + ".lora_B.weight").double()
        shape = (b.shape[0], a.shape[1])
        out.append((b * (cfg["lora_alpha"] / cfg["r"]), a))
    return [x if x is not None else (torch.zeros(shape[0], 0, dtype=torch.float64),
                                     torch.zeros(0, shape[1], dtype=torch.float64)) for x in out]


KEYS = ("x.q", "x.down", "x.small")


# ------------------------------------------------------------------------------------------- operators vs references
def test_tsv_m_matches_the_dense_recipe(tmp_path, trio):
    got, summary = merged(tmp_path, trio, "tsv_m", alpha=0.8)
    for key in KEYS:
        ds = dense_inputs(trio, key)
        assert rel(got[key], tsv_ref(ds, W, 0.8)) < 1e-5, key
    assert summary["max_rel_error"] < 1e-6  # default rank keeps the low-rank result whole


def test_iso_c_matches_the_dense_recipe_and_equals_the_paper_on_a_full_span(tmp_path, trio):
    got, _ = merged(tmp_path, trio, "iso_c", alpha=1.3)
    for key in KEYS:
        ds = dense_inputs(trio, key)
        assert rel(got[key], iso_c_ref(ds, W, 1.3)) < 1e-5, key
    # x.small (5 x 4, ranks 3+5+2): the sum has full rank, so the paper's full-space formula applies unchanged
    ds = dense_inputs(trio, "x.small")
    u, s, vh = svd(sum(wi * d for d, wi in zip(ds, W)))
    assert rel(got["x.small"], 1.3 * s.mean() * u @ vh) < 1e-5


def test_iso_cts_matches_the_dense_recipe(tmp_path, trio):
    for frac in (0.8, 0.5):
        got, _ = merged(tmp_path, trio, "iso_cts", alpha=1.1, common_fraction=frac)
        for key in KEYS:
            ds = dense_inputs(trio, key)
            d = span_dim(ds)
            if key == "x.small":
                assert d == min(ds[0].shape)  # full span: d is the paper's min(m, n)
            assert rel(got[key], iso_cts_ref(ds, W, d, 1.1, frac)) < 1e-5, (key, frac)


def test_knots_ties_matches_the_dense_recipe(tmp_path, trio):
    for density in (1.0, 0.4):
        got, summary = merged(tmp_path, trio, "knots", density=density)
        for key in KEYS:
            u, blocks = knots_blocks(dense_inputs(trio, key))
            want = u @ ties_ref(blocks, W, density)
            assert rel(got[key], want) < 1e-5, (key, density)
        assert summary["max_rel_error"] < 1e-6


def test_knots_model_wide_topk(tmp_path, trio):
    """topk=model: one exact top-k per input over the S V_i^T entries of every module, as in the paper."""
    density = 0.3
    got, _ = merged(tmp_path, trio, "knots", density=density, topk="model")
    per_key = {key: knots_blocks(dense_inputs(trio, key)) for key in sorted(KEYS)}  # the engine's module order
    masks = {key: [] for key in per_key}
    for i in range(3):
        allv = torch.cat([blocks[i].abs().flatten() for _, blocks in per_key.values()])
        k = int(np.floor(density * allv.numel() + 0.5))
        t = allv.sort(descending=True).values[k - 1]
        for key, (_, blocks) in per_key.items():
            masks[key].append(blocks[i].abs() >= t)  # no exact ties in random data
    module_wide, _ = merged(tmp_path, trio, "knots", density=density)
    differs = False
    for key, (u, blocks) in per_key.items():
        want = u @ ties_ref(blocks, W, masks=masks[key])
        assert rel(got[key], want) < 1e-5, key
        differs |= rel(module_wide[key], want) > 1e-3
    assert differs  # the model-wide threshold is not the per-module one
    with pytest.raises(am.ParameterError, match="topk=model is the top-k of merge=ties"):
        am.merge(trio, "knots", topk="model", merge="dare_ties")


def test_knots_dare_ties_on_the_reference_blocks(tmp_path, trio):
    from adaptermerge.engine import module_seed

    got, _ = merged(tmp_path, trio, "knots", merge="dare_ties", density=0.5, seed=9)
    for key in KEYS:
        u, blocks = knots_blocks(dense_inputs(trio, key))
        drop = am.ops.dare_ties([b.float() for b in blocks], W, density=0.5, seed=module_seed(9, PREFIX + key))
        assert rel(got[key], u @ drop.double()) < 1e-4, key


# ------------------------------------------------------------------------------------------- core space
def test_core_space_is_lossless_for_linear_merges(tmp_path, trio):
    """sum_i c_i M_i in the core equals today's exact linear merge: magnitude_prune(density=1) and dare_linear
    (density=1) are linear, and in the core they give task arithmetic's exact result."""
    exact, _ = merged(tmp_path, trio, "task_arithmetic", scale=0.9)
    for method in ("magnitude_prune", "dare_linear"):
        got, summary = merged(tmp_path, trio, method, density=1.0, scale=0.9, space="core")
        for key in KEYS:
            want = 0.9 * sum(wi * d for d, wi in zip(dense_inputs(trio, key), W))
            assert rel(exact[key], want) < 1e-6
            assert rel(got[key], want) < 1e-6, (method, key)
        assert summary["max_rel_error"] < 1e-6
    for key in KEYS:  # and the test's own core bases reproduce each delta
        fs = scaled_factors(trio, key)
        u_ref, cores, v_ref = core_ref(fs)
        for (b, a), c in zip(fs, cores):
            if b.shape[1]:
                assert rel(u_ref @ c @ v_ref, b @ a) < 1e-10


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.3}), ("ties", {"density": 0.6, "majority_sign": "frequency"})])
def test_core_space_ties_is_dense_ties_on_the_cores(tmp_path, trio, method, params):
    got, summary = merged(tmp_path, trio, method, space="core", **params)
    for key in KEYS:
        u_ref, cores, v_ref = core_ref(scaled_factors(trio, key))
        want = ties_ref(cores, W, params["density"], majority_sign=params.get("majority_sign", "total"))
        assert rel(got[key], u_ref @ want @ v_ref) < 1e-5, key
    assert summary["max_rel_error"] < 1e-6
    full, _ = merged(tmp_path, trio, method, **params)
    assert rel(full["x.q"], got["x.q"]) > 1e-2  # a different merge: element-wise operators are basis-dependent


# ------------------------------------------------------------------------------------------- invariants
LOWRANK = [("tsv_m", {}), ("iso_c", {}), ("iso_cts", {}), ("knots", {}), ("knots", {"topk": "model", "density": 0.5}),
           ("ties", {"space": "core"}), ("dare_ties", {"space": "core"}), ("della", {"space": "core"})]


@pytest.mark.parametrize("method,params", LOWRANK)
def test_rank_bound_and_bytes_across_runs_and_threads(tmp_path, trio, method, params):
    shas = set()
    old = torch.get_num_threads()
    try:
        for i, threads in enumerate((1, 2, 1)):
            torch.set_num_threads(threads)
            out = tmp_path / f"o{i}"
            summary = am.merge_to(out, trio, method, W, **params)
            shas.add(hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest())
    finally:
        torch.set_num_threads(old)
    assert len(shas) == 1
    ranks = {"x.q": 10, "x.down": 8, "x.small": 4}  # sum of the present ranks, capped by min(m, n)
    for key, bound in ranks.items():
        mod = summary["modules"][PREFIX + key]
        assert mod["rank"] <= bound and mod["rel_error"] < 1e-6, (key, mod)
    got = read_deltas(tmp_path / "o0")
    for key in ranks:
        assert int(torch.linalg.matrix_rank(got[key])) <= ranks[key]
    # an explicit smaller rank is the optimal truncation of that low-rank result
    small = am.merge(trio, method, W, rank=2, **params)
    full = am.merge(trio, method, W, **params)
    small.save(tmp_path / "s")
    full.save(tmp_path / "f")
    ds, df = read_deltas(tmp_path / "s"), read_deltas(tmp_path / "f")
    for key in ranks:
        s = torch.linalg.svdvals(df[key])
        optimal = float(s[2:].square().sum().sqrt() / s.square().sum().sqrt())
        assert abs(rel(ds[key], df[key]) - optimal) < 1e-5, key


@pytest.mark.parametrize("method,params", [("tsv_m", {}), ("knots", {}), ("ties", {"density": 1.0, "space": "core"}),
                                           ("della", {"density": 1.0, "epsilon": 0.0, "space": "core"})])
def test_one_input_weight_one_is_its_delta(tmp_path, trio, method, params):
    got, _ = merged(tmp_path, trio[:1], method, [1.0], **params)
    want = read_deltas(trio[0])
    for key in KEYS:
        assert rel(got[key], want[key]) < 1e-6, (method, key)


def test_iso_flattens_the_spectrum_of_one_input(tmp_path, trio):
    """Iso-C defines no identity: one input keeps its singular vectors, with every singular value at their mean."""
    got, _ = merged(tmp_path, trio[:1], "iso_c", [1.0])
    for key in KEYS:
        u, s, vh = svd(read_deltas(trio[0])[key])
        r = nonzero(s)
        assert rel(got[key], s[:r].mean() * u[:, :r] @ vh[:r]) < 1e-6


def test_factor_operators_never_form_a_dense_delta(trio, monkeypatch):
    """Factor-form and core-space merges run without any m x n product (the engine's dense path is never hit)."""
    import adaptermerge.engine as engine

    def boom(*a, **k):
        raise AssertionError("dense path used")

    monkeypatch.setattr(engine, "truncate_dense", boom)
    monkeypatch.setattr(engine, "full_rank_factors", boom)
    for method, params in LOWRANK:
        am.merge(trio, method, W, **params)


def test_loss_warning_and_default_ranks(tmp_path, trio):
    with pytest.warns(am.MergeLossWarning, match=r"lost more than 10% of the merged delta in 2 of 3 modules \(relative error max 0\.\d\d.*space='core'"):
        s = am.merge_to(tmp_path / "t", trio, "ties", W, density=0.3)
    assert s["warnings"] and {m["rank"] for m in s["modules"].values()} == {4, 5}  # largest input rank, capped
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = am.merge_to(tmp_path / "l", trio, "linear", W)  # exact by default: rank = sum of ranks
        assert s["warnings"] == [] and s["max_rel_error"] < 1e-6
        assert {k: v["rank"] for k, v in s["modules"].items()} == {PREFIX + "x.q": 10, PREFIX + "x.down": 8,
                                                                   PREFIX + "x.small": 4}
        am.merge_to(tmp_path / "q", trio, "ties", W, density=0.3, warn_loss=1.0)  # 1 = never warn
    with pytest.warns(am.MergeLossWarning, match=r"no rank \(the default keeps this merge exact\)"):
        am.merge(trio, "linear", W, rank=1)
    with pytest.raises(am.ParameterError, match=r"warn_loss must be a number in \[0, 1\]"):
        am.merge(trio, "linear", W, warn_loss=2)


def test_a_request_is_validated_once_and_reused(tmp_path, trio):
    req = am.MergeRequest.build("knots", 3, W, {"density": 0.5})
    assert req.params["density"] == (0.5, 0.5, 0.5)
    with pytest.raises(TypeError):
        req.params["density"] = 1  # read-only
    a = am.merge(trio, req)
    b = am.merge(trio, "knots", W, density=0.5)
    assert a.metadata == b.metadata
    with pytest.raises(am.ParameterError, match="pass a MergeRequest alone"):
        am.merge(trio, req, rank=3)
    with pytest.raises(am.ParameterError, match="request is for 3 inputs but 2"):
        am.plan([am.load_adapter(p) for p in trio[:2]], req)
