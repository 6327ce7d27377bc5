"""Diagnostics (``adaptermerge analyze``): every statistic against a dense float64 computation written here, on
small adapters read back with the safetensors library (conftest.read_deltas), never through adaptermerge."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from adaptermerge import merge, ops
from adaptermerge.cli import main
from adaptermerge.diagnostics import (
    analyze,
    effective_rank,
    group_keys,
    pairwise_cosine,
    wilson_interval,
)
from adaptermerge.errors import IncompatibleInputsError, ParameterError
import dense_ref
from conftest import PREFIX, read_deltas, write_adapter

PAIRS3 = [(0, 1), (0, 2), (1, 2)]


# ------------------------------------------------------------------------------------------------ helpers
def write_factors(path: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *, r: int, alpha: float) -> Path:
    """A PEFT adapter directory with the given (B, A) per model key."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, (b, a) in factors.items():
        tensors[f"{PREFIX}{key}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{PREFIX}{key}.lora_B.weight"] = b.float().contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted({k.rsplit(".", 1)[-1] for k in factors})}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


MODS = {
    "model.layers.0.self_attn.q_proj": (12, 10),
    "model.layers.0.mlp.down_proj": (9, 14),
    "model.layers.1.self_attn.q_proj": (12, 10),
    "model.layers.1.mlp.down_proj": (9, 14),
}


@pytest.fixture
def trio(tmp_path):
    """Three rank-4 adapters: A random, B = A's B mixed with noise on the same A (correlated), C random.
    Scales: A 8/4 = 2, B 4/4 = 1, C 8/4 = 2 (powers of two, so scaled factors are exact in float32)."""
    g = torch.Generator().manual_seed(7)
    fa, fb, fc = {}, {}, {}
    for key, (m, n) in MODS.items():
        a1, b1 = torch.randn(4, n, generator=g), torch.randn(m, 4, generator=g)
        fa[key] = (b1, a1)
        fb[key] = (2 * b1 + 0.8 * torch.randn(m, 4, generator=g), a1 + 0.3 * torch.randn(4, n, generator=g))
        fc[key] = (torch.randn(m, 4, generator=g), torch.randn(4, n, generator=g))
    return (write_factors(tmp_path / "a", fa, r=4, alpha=8.0), write_factors(tmp_path / "b", fb, r=4, alpha=4.0),
            write_factors(tmp_path / "c", fc, r=4, alpha=8.0))


def dense(paths) -> list[dict[str, torch.Tensor]]:
    return [read_deltas(p) for p in paths]


def mod_key(rec: dict) -> str:
    return rec["name"].removeprefix(PREFIX)


def ref_cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x * y).sum() / (x.norm() * y.norm()))


def ref_important(x: torch.Tensor, f: float) -> torch.Tensor:
    """Top floor(f*numel + 0.5) entries by |x| (ties at the threshold included), zeros excluded."""
    flat = x.reshape(-1).abs()
    k = math.floor(f * flat.numel() + 0.5)
    if k == 0:
        return torch.zeros_like(flat, dtype=torch.bool)
    t = torch.sort(flat, descending=True).values[k - 1]
    return (flat >= t) & (flat > 0)


def ref_conflict(x: torch.Tensor, y: torch.Tensor, f: float) -> tuple[int, int]:
    union = ref_important(x, f) | ref_important(y, f)
    opposite = (torch.sign(x.reshape(-1)) * torch.sign(y.reshape(-1))) < 0
    return int((union & opposite).sum()), int(union.sum())


def ref_svals(x: torch.Tensor) -> np.ndarray:
    s = torch.linalg.svdvals(x).numpy()
    return s[s > s[0] * max(x.shape) * np.finfo(np.float64).eps]


def ref_erank(s: np.ndarray) -> float:
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


# ------------------------------------------------------------------------------------------------ exact statistics
def test_norms_cosines_and_aggregates_are_exact(trio):
    res = analyze(list(trio), samples=10_000)
    d = dense(trio)
    assert [i["label"] for i in res["inputs"]] == ["A", "B", "C"] and res["pairs"] == [list(p) for p in PAIRS3]
    for rec in res["modules"]:
        k = mod_key(rec)
        for i in range(3):
            assert rec["norm"][i] == pytest.approx(float(d[i][k].norm()), rel=1e-10)
        for p, (a, b) in enumerate(PAIRS3):
            assert rec["cosine"][p] == pytest.approx(ref_cos(d[a][k], d[b][k]), rel=1e-9, abs=1e-12)
        s = sum(d[i][k] for i in range(3))
        assert rec["sum"]["energy_ratio"] == pytest.approx(float(s.norm() ** 2 / sum(d[i][k].norm() ** 2 for i in range(3))), rel=1e-9)
    # aggregates are the cosines of the concatenated deltas
    flat = [torch.cat([d[i][k].reshape(-1) for k in sorted(d[i])]) for i in range(3)]
    for p, (a, b) in enumerate(PAIRS3):
        assert res["overall"]["cosine"][p] == pytest.approx(ref_cos(flat[a], flat[b]), rel=1e-9)
        assert res["cosine_matrix"][a][b] == pytest.approx(ref_cos(flat[a], flat[b]), rel=1e-9)
    assert res["overall"]["norm"] == pytest.approx([float(x.norm()) for x in flat], rel=1e-10)
    layer1 = [k for k in sorted(d[0]) if ".layers.1." in f".{k}"]
    l1 = [torch.cat([d[i][k].reshape(-1) for k in layer1]) for i in range(3)]
    agg = res["layers"]["model.layers.1"]
    assert agg["n_modules"] == 2 and agg["cosine"][0] == pytest.approx(ref_cos(l1[0], l1[1]), rel=1e-9)
    down = [torch.cat([d[i][k].reshape(-1) for k in sorted(d[i]) if k.endswith("down_proj")]) for i in range(3)]
    assert res["types"]["down_proj"]["cosine"][2] == pytest.approx(ref_cos(down[1], down[2]), rel=1e-9)
    assert set(res["types"]) == {"down_proj", "q_proj"}
    # the correlated pair is clearly more similar than the unrelated ones
    assert res["overall"]["cosine"][0] > 0.5 > abs(res["overall"]["cosine"][1])
    # pairwise_cosine: same matrix, from the factors
    pc = pairwise_cosine(list(trio))
    want = np.array([[ref_cos(flat[a], flat[b]) for b in range(3)] for a in range(3)])
    np.testing.assert_allclose(pc, want, rtol=1e-9)


def test_spectra_effective_rank_and_subspace_overlap_are_exact(tmp_path):
    g = torch.Generator().manual_seed(3)
    m, n = 20, 16
    b1, a1 = torch.randn(m, 5, generator=g), torch.randn(5, n, generator=g)
    mix = torch.randn(5, 5, generator=g)
    # B shares A's column space exactly (B2 = B1 @ mix): left overlap 1; C has rank 3 < 5 (its B has 2 zero columns)
    b3 = torch.randn(m, 5, generator=g)
    b3[:, 3:] = 0
    pa = write_factors(tmp_path / "a", {"model.layers.0.o_proj": (b1, a1)}, r=5, alpha=5.0)
    pb = write_factors(tmp_path / "b", {"model.layers.0.o_proj": (b1 @ mix, torch.randn(5, n, generator=g))}, r=5, alpha=5.0)
    pc = write_factors(tmp_path / "c", {"model.layers.0.o_proj": (b3, torch.randn(5, n, generator=g))}, r=5, alpha=5.0)
    d = [x["model.layers.0.o_proj"] for x in dense([pa, pb, pc])]
    for sub_k in (None, 2):
        rec = analyze([pa, pb, pc], subspace_k=sub_k)["modules"][0]
        svals = [ref_svals(x) for x in d]
        assert [len(s) for s in svals] == [5, 5, 3]
        for i in range(3):
            np.testing.assert_allclose(rec["singular_values"][i], svals[i], rtol=1e-9)
            assert rec["effective_rank"][i] == pytest.approx(ref_erank(svals[i]), rel=1e-9)
        s_sum = ref_svals(d[0] + d[1] + d[2])
        # B's factor is a float32 rounding of B1 @ mix, so the sum has 5 tiny (~1e-9 relative) singular values too
        np.testing.assert_allclose(rec["sum"]["singular_values"], s_sum, rtol=1e-8, atol=1e-12 * s_sum[0])
        assert rec["sum"]["effective_rank"] == pytest.approx(ref_erank(s_sum), rel=1e-8)
        assert rec["sum"]["energy_at_rank"] == {"rank": 5, "fraction": pytest.approx(float((s_sum[:5] ** 2).sum() / (s_sum**2).sum()), rel=1e-9)}
        u = [torch.linalg.svd(x)[0] for x in d]
        v = [torch.linalg.svd(x)[2].T for x in d]
        for p, (a, b) in enumerate(PAIRS3):
            k = min(len(svals[a]), len(svals[b]), sub_k or 99)
            assert rec["subspace_overlap"]["k"][p] == k
            left = float((u[a][:, :k].T @ u[b][:, :k]).pow(2).sum()) / k
            right = float((v[a][:, :k].T @ v[b][:, :k]).pow(2).sum()) / k
            assert rec["subspace_overlap"]["left"][p] == pytest.approx(left, abs=1e-9)
            assert rec["subspace_overlap"]["right"][p] == pytest.approx(right, abs=1e-9)
        if sub_k is None:
            assert rec["subspace_overlap"]["left"][0] == pytest.approx(1.0, abs=1e-9)  # same column space


def test_effective_rank_and_interval_reference_values():
    assert effective_rank(np.array([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(np.array([2.0, 2.0, 2.0, 2.0])) == pytest.approx(4.0)
    assert effective_rank(np.array([])) == 0.0
    assert effective_rank(np.array([3.0, 1.0])) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)  # textbook value for 0/10
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert group_keys("base_model.model.model.layers.12.mlp.up_proj") == ("model.layers.12", "up_proj")
    assert group_keys("base_model.model.lm_head") == ("(no layer)", "lm_head")


# ------------------------------------------------------------------------------------------------ sign conflicts
@pytest.mark.parametrize("fraction", [0.2, 0.5, 1.0])
def test_sign_conflict_exact_when_every_entry_is_evaluated(trio, fraction):
    res = analyze(list(trio), top_k_fraction=fraction, samples=10_000)  # every module has <= 140 entries
    d = dense(trio)
    tot_c = [0, 0, 0]
    tot_i = [0, 0, 0]
    for rec in res["modules"]:
        k = mod_key(rec)
        assert rec["exact"] and rec["n_sampled"] == d[0][k].numel()
        for p, (a, b) in enumerate(PAIRS3):
            conf, imp = ref_conflict(d[a][k], d[b][k], fraction)
            got = rec["conflict"][p]
            assert (got["n_important"], got["rate"], got["se"]) == (imp, conf / imp, 0.0)
            tot_c[p] += conf
            tot_i[p] += imp
        masks = [ref_important(d[i][k], fraction) for i in range(3)]
        signs = [torch.sign(d[i][k].reshape(-1)) for i in range(3)]
        union = masks[0] | masks[1] | masks[2]
        mixed = (signs[0] > 0) | (signs[1] > 0) | (signs[2] > 0)
        mixed &= (signs[0] < 0) | (signs[1] < 0) | (signs[2] < 0)
        assert rec["conflict_all"]["rate"] == pytest.approx(int((union & mixed).sum()) / int(union.sum()), abs=1e-15)
    for p in range(3):
        assert res["overall"]["conflict"][p]["rate"] == pytest.approx(tot_c[p] / tot_i[p], abs=1e-15)
        assert res["overall"]["conflict"][p]["se"] == 0.0
    # the correlated pair conflicts less than the unrelated pairs
    assert res["overall"]["conflict"][0]["rate"] < res["overall"]["conflict"][1]["rate"]


def test_sign_conflict_sampled_within_four_standard_errors(tmp_path):
    g = torch.Generator().manual_seed(11)
    fa, fb = {}, {}
    for layer in range(2):
        m, n = 240, 200
        b1, a1 = torch.randn(m, 6, generator=g), torch.randn(6, n, generator=g)
        fa[f"model.layers.{layer}.q_proj"] = (b1, a1)
        fb[f"model.layers.{layer}.q_proj"] = (0.6 * b1 + torch.randn(m, 6, generator=g), a1 + 0.5 * torch.randn(6, n, generator=g))
    pa = write_factors(tmp_path / "a", fa, r=6, alpha=6.0)
    pb = write_factors(tmp_path / "b", fb, r=6, alpha=6.0)
    d = dense([pa, pb])
    f = 0.2
    truth = {k: ref_conflict(d[0][k], d[1][k], f) for k in d[0]}
    pooled = sum(c for c, _ in truth.values()) / sum(i for _, i in truth.values())
    rates = []
    for seed in range(5):
        res = analyze([pa, pb], top_k_fraction=f, samples=3000, seed=seed)
        for rec in res["modules"]:
            c = rec["conflict"][0]
            conf, imp = truth[mod_key(rec)]
            assert not rec["exact"] and rec["n_sampled"] == 3000
            assert 0 < c["se"] < 0.05 and c["ci95"][0] < c["rate"] < c["ci95"][1]
            assert abs(c["rate"] - conf / imp) <= 4 * c["se"], (seed, rec["name"], c, conf / imp)
        agg = res["overall"]["conflict"][0]
        assert agg["n_sampled"] == 6000 and 0 < agg["se"] < 0.03
        assert abs(agg["rate"] - pooled) <= 4 * agg["se"]
        rates.append(agg["rate"])
    assert len(set(rates)) > 1  # the seed changes the sample
    again = analyze([pa, pb], top_k_fraction=f, samples=3000, seed=0)["overall"]["conflict"][0]["rate"]
    assert again == rates[0]  # and the same seed repeats it


# ------------------------------------------------------------------------------------------------ merge preview
def ref_preview(merged: dict[str, torch.Tensor], deltas: list[dict[str, torch.Tensor]], keys) -> dict[str, list[float]]:
    m = torch.cat([merged[k].reshape(-1) for k in keys])
    out = {"projection": [], "cosine": [], "norm_ratio": []}
    for d in deltas:
        x = torch.cat([d[k].reshape(-1) for k in keys])
        out["projection"].append(float((m * x).sum() / (x * x).sum()))
        out["cosine"].append(ref_cos(m, x))
        out["norm_ratio"].append(float(m.norm() / x.norm()))
    return out


@pytest.mark.parametrize("method,params", [("linear", {}), ("task_arithmetic", {"scale": 0.7})])
def test_preview_linear_methods_exact_in_low_rank(trio, method, params):
    w = [0.5, 0.3, 0.2]
    res = analyze(list(trio), preview={"method": method, "weights": w, "rank": "full", **params})
    d = dense(trio)
    coef = [x / sum(w) for x in w] if method == "linear" else [0.7 * x for x in w]
    merged = {k: sum(c * d[i][k] for i, c in enumerate(coef)) for k in d[0]}
    for rec in res["modules"]:
        want = ref_preview(merged, d, [mod_key(rec)])
        for key in want:
            assert rec["preview"][key] == pytest.approx(want[key], rel=1e-6)
    want = ref_preview(merged, d, sorted(d[0]))
    for key in want:
        assert res["overall"]["preview"][key] == pytest.approx(want[key], rel=1e-6)
    assert res["preview"]["method"] == method and res["preview"]["modules_previewed"] == 4


@pytest.mark.parametrize("method,rank", [("linear", 3), ("task_arithmetic", 4), ("cat", None)])
def test_preview_linear_methods_match_the_truncated_merge(trio, tmp_path, method, rank):
    """With a rank below the sum of ranks the preview is the truncated merge, as merge writes it."""
    d = dense(trio)
    w = [1.0, -0.5, 0.25]
    res = analyze(list(trio), preview={"method": method, "weights": w, "rank": rank})
    merge(list(trio), method, w, rank=rank).save(tmp_path / "m")
    merged = read_deltas(tmp_path / "m")
    for rec in res["modules"]:
        want = ref_preview(merged, d, [mod_key(rec)])
        for key in want:
            assert rec["preview"][key] == pytest.approx(want[key], rel=2e-5, abs=1e-7)
        assert rec["preview"]["rank"] == {"linear": 3, "task_arithmetic": 4, "cat": 12}[method]
        assert (rec["preview"]["rel_error"] > 0.01) == (method != "cat")


def test_preview_ties_matches_the_merge_it_previews(trio, tmp_path):
    d = dense(trio)
    spec = {"method": "ties", "density": 0.5, "weights": [1.0, 0.5, 1.0], "rank": 4}
    res = analyze(list(trio), seed=3, preview=spec)
    merge(list(trio), "ties", [1.0, 0.5, 1.0], density=0.5, rank=4, seed=3).save(tmp_path / "m")
    merged = read_deltas(tmp_path / "m")
    # the reference: TIES written from the paper (tests/dense_ref.py), then its optimal rank-4 truncation
    full = {k: dense_ref.ties([d[i][k] for i in range(3)], [1.0, 0.5, 1.0], density=0.5) for k in d[0]}
    for rec in res["modules"]:
        key_ = mod_key(rec)
        u, s, vh = torch.linalg.svd(full[key_], full_matrices=False)
        optimal = {key_: (u[:, :4] * s[:4]) @ vh[:4]}
        want = ref_preview(merged, d, [key_])  # what merge writes
        ref = ref_preview(optimal, d, [key_])  # what TIES + the best rank-4 truncation give
        for key in want:
            assert rec["preview"][key] == pytest.approx(want[key], rel=1e-5, abs=1e-7)
            assert rec["preview"][key] == pytest.approx(ref[key], rel=2e-2, abs=1e-3)  # randomized SVD ~ optimal
        opt_err = float(s[4:].square().sum().sqrt() / s.square().sum().sqrt())
        assert opt_err - 1e-6 <= rec["preview"]["rel_error"] <= opt_err * 1.01 + 1e-6
        assert rec["preview"]["rank"] == 4
    # untruncated: TIES on the dense deltas
    res = analyze(list(trio), preview={**spec, "rank": "full"})
    want = ref_preview(full, d, sorted(d[0]))
    for key in want:
        assert res["overall"]["preview"][key] == pytest.approx(want[key], rel=1e-5)
    assert all(rec["preview"]["rel_error"] == 0.0 for rec in res["modules"])


def test_preview_on_a_seeded_sample_of_modules(trio):
    d = dense(trio)
    res = analyze(list(trio), seed=5, preview={"method": "dare_ties", "density": 0.5, "modules": 2, "rank": "full"})
    done = [rec for rec in res["modules"] if rec["preview"] is not None]
    assert len(done) == 2 and res["preview"]["module_sample"] and res["overall"]["preview"]["n_modules"] == 2
    keys = [mod_key(r) for r in done]
    from adaptermerge.engine import module_seed

    merged = {k: ops.dare_ties([d[i][k] for i in range(3)], density=0.5, seed=module_seed(5, PREFIX + k)).double() for k in keys}
    want = ref_preview(merged, d, keys)
    for key in want:
        assert res["overall"]["preview"][key] == pytest.approx(want[key], rel=1e-5)
    again = analyze(list(trio), seed=5, preview={"method": "dare_ties", "density": 0.5, "modules": 2, "rank": "full"})
    assert [r["name"] for r in again["modules"] if r["preview"]] == [r["name"] for r in done]


# ------------------------------------------------------------------------------------------------ odd inputs and errors
def test_module_missing_from_one_input(tmp_path):
    a = write_adapter(tmp_path / "a", seed=1)
    few = {"model.layers.0.self_attn.q_proj": (16, 16)}
    b = write_adapter(tmp_path / "b", few, seed=2)
    res = analyze([a, b])
    d = dense([a, b])
    for rec in res["modules"]:
        if mod_key(rec) in few:
            assert rec["cosine"][0] == pytest.approx(ref_cos(d[0][mod_key(rec)], d[1][mod_key(rec)]), rel=1e-9)
        else:
            assert rec["norm"][1] is None and rec["cosine"] == [None] and rec["conflict"] == [None]
            assert rec["present"] == ["A"]
    flat_a = torch.cat([d[0][k].reshape(-1) for k in sorted(d[0])])
    flat_b = torch.cat([d[1][k].reshape(-1) if k in d[1] else torch.zeros(d[0][k].numel(), dtype=torch.float64) for k in sorted(d[0])])
    assert res["overall"]["cosine"][0] == pytest.approx(ref_cos(flat_a, flat_b), rel=1e-9)
    assert any("missing" in n for n in res["notes"])
    json.dumps(res, allow_nan=False)  # undefined values are None, never NaN


@pytest.mark.parametrize("kwargs,match", [
    ({"top_k_fraction": 0.0}, "top_k_fraction"), ({"top_k_fraction": 1.5}, "top_k_fraction"),
    ({"samples": 0}, "samples"), ({"seed": -1}, "seed"), ({"subspace_k": 0}, "subspace_k"),
    ({"preview": {"method": "tie"}}, "did you mean 'ties'"), ({"preview": {"method": "ties", "density": 2}}, "density"),
    ({"preview": {"method": "ties", "modules": 0}}, "modules"), ({"preview": {"density": 0.5}}, "method"),
    ({"preview": {"method": "dare_ties", "seed": 3}}, "seed"), ({"preview": {"method": "linear", "weights": [1, 2]}}, "weights"),
    ({"preview": {"method": "cat", "rank": 4}}, "cat"),
])
def test_bad_options_raise_parameter_error(trio, kwargs, match):
    with pytest.raises(ParameterError, match=match):
        analyze(list(trio), **kwargs)


def test_incompatible_inputs(tmp_path):
    a = write_adapter(tmp_path / "a", seed=1)
    b = write_adapter(tmp_path / "b", {"model.layers.0.self_attn.q_proj": (32, 16)}, seed=2)
    with pytest.raises(IncompatibleInputsError, match="q_proj"):
        analyze([a, b])
    with pytest.raises(IncompatibleInputsError, match="q_proj"):
        pairwise_cosine([a, b])
    c = write_adapter(tmp_path / "c", {"model.layers.9.mlp.gate_proj": (8, 8)}, seed=3)
    with pytest.raises(IncompatibleInputsError, match="no module in common"):
        analyze([a, c])


# ------------------------------------------------------------------------------------------------ command line
def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_table_json_and_plot(trio, tmp_path, capsys):
    code, out, err = run(capsys, "analyze", *trio, "--preview-method", "ties", "--density", "0.5", "--top", "2")
    assert code == 0, err
    for text in ("inputs", "pairs (all modules)", "per layer", "per module type", "highest mean sign conflict first; 2 of 4",
                 "merge preview: ties", "A·B"):
        assert text in out, text
    code, out, err = run(capsys, "analyze", *trio, "--json", "--samples", "50", "--seed", "2")
    assert code == 0, err
    res = json.loads(out)
    d = dense(trio)
    rec = res["modules"][0]
    assert rec["norm"][1] == pytest.approx(float(d[1][mod_key(rec)].norm()), rel=1e-10)
    assert res["settings"] == {**res["settings"], "samples": 50, "seed": 2, "top_k_fraction": 0.2}
    png = tmp_path / "diag.png"
    code, out, err = run(capsys, "analyze", *trio, "--plot", png, "-q")
    assert code == 0, err
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 300_000
    assert f"plot written to {png}" in out


def one_line_error(err: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err


@pytest.mark.parametrize("case,code,words", [
    ("missing", 3, "no such file"), ("shape", 4, "q_proj"), ("fraction", 2, "top_k_fraction"),
    ("density_alone", 2, "--preview-method"), ("method", 2, "did you mean"), ("sort", 2, "--sort"),
    ("plot_dir", 5, "does not exist"), ("plot_format", 2, "must end in"), ("no_matplotlib", 2, "pip install adaptermerge[plot]"), ("no_alpha", 2, "--alpha"),
])
def test_cli_bad_input_exits_with_one_line(tmp_path, capsys, monkeypatch, case, code, words):
    a = write_adapter(tmp_path / "a", seed=1)
    args: list = [a, write_adapter(tmp_path / "b", seed=2)]
    extra: list = []
    if case == "missing":
        args[1] = tmp_path / "nope"
    elif case == "shape":
        args[1] = write_adapter(tmp_path / "c", {"model.layers.0.self_attn.q_proj": (32, 16)}, seed=2)
    elif case == "fraction":
        extra = ["--top-k-fraction", "0"]
    elif case == "density_alone":
        extra = ["--density", "0.5"]
    elif case == "method":
        extra = ["--preview-method", "tie"]
    elif case == "sort":
        extra = ["--sort", "worst"]
    elif case == "plot_dir":
        extra = ["--plot", tmp_path / "no" / "p.png"]
    elif case == "plot_format":
        extra = ["--plot", tmp_path / "p.xyz"]
    elif case == "no_matplotlib":
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
        extra = ["--plot", tmp_path / "p.png"]
    elif case == "no_alpha":
        args[1] = write_adapter(tmp_path / "bare.safetensors", seed=2, bare=True)
    got, out, err = run(capsys, "analyze", *args, *extra)
    assert got == code, err
    one_line_error(err)
    assert words in err
    assert not (tmp_path / "p.png").exists()


def test_cli_checks_options_before_opening_files(tmp_path, capsys):
    code, _, err = run(capsys, "analyze", tmp_path / "nope1", tmp_path / "nope2", "--preview-method", "ties", "--density", "0")
    assert code == 2 and "density" in err
    one_line_error(err)


def test_cli_module_imports_only_typer_rich_and_stdlib():
    """analyze_cli keeps heavy imports inside the command; importing the CLI never loads matplotlib."""
    import adaptermerge.analyze_cli as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add("." + (node.module or "") if node.level else node.module.split(".")[0])
    allowed = {"__future__", "importlib", "json", "math", "os", "re", "sys", "tempfile", "pathlib", "typing", "typer", "rich",
               ".errors", ".cliparse"}
    assert top <= allowed, top - allowed
    parse_tree = ast.parse((Path(mod.__file__).parent / "cliparse.py").read_text())  # stdlib-only at import time
    assert {n.module for n in parse_tree.body if isinstance(n, ast.ImportFrom)} <= {"__future__", "errors", "typing"}
    probe = "import sys, adaptermerge.cli, adaptermerge.diagnostics; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
