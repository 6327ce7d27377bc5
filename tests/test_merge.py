"""The engine against independent dense computations (deltas read with the safetensors library, not ours)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open

import adaptermerge as am
import dense_ref
from conftest import LLAMA_MODULES, read_deltas, write_adapter

ELEMENTWISE_IDENTITY = {
    "ties": {"density": 1.0},
    "dare_linear": {"density": 1.0},
    "dare_ties": {"density": 1.0},
    "magnitude_prune": {"density": 1.0},
    "breadcrumbs": {"density": 1.0, "gamma": 0.0},
    "della": {"density": 1.0, "epsilon": 0.0},
}


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


def saved_deltas(merged: am.Adapter, path) -> dict[str, torch.Tensor]:
    merged.save(path)
    return read_deltas(path)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "cat", *ELEMENTWISE_IDENTITY])
def test_one_adapter_weight_one_is_identity(tmp_path, adapters, method):
    a, _ = adapters
    params = ELEMENTWISE_IDENTITY.get(method, {})
    merged = am.merge([a], method, [1.0], **params)
    got = saved_deltas(merged, tmp_path / "out")
    want = read_deltas(a)
    assert got.keys() == want.keys()
    for k in want:
        assert rel(got[k], want[k]) < 1e-5, (method, k)
    assert merged.summary["max_rel_error"] < 1e-5


def test_linear_weights_exact(tmp_path, adapters):
    a, b = adapters
    merged = am.merge([a, b], "linear", [0.7, 0.3], rank=8)  # 8 = 4 + 4: exact
    got = saved_deltas(merged, tmp_path / "out")
    da, db = read_deltas(a), read_deltas(b)
    for k in da:
        assert rel(got[k], 0.7 * da[k] + 0.3 * db[k]) < 1e-6


def test_linear_normalize_divides_by_sum(tmp_path, adapters):
    a, b = adapters
    got = saved_deltas(am.merge([a, b], "linear", [2.0, 6.0], rank=8), tmp_path / "out")
    da, db = read_deltas(a), read_deltas(b)
    for k in da:
        assert rel(got[k], (2 * da[k] + 6 * db[k]) / 8) < 1e-6


def test_negative_weight_task_arithmetic_exact(tmp_path, adapters):
    a, b = adapters
    merged = am.merge([a, b], "task_arithmetic", [1.0, -0.5], rank=8, scale=0.8)
    got = saved_deltas(merged, tmp_path / "out")
    da, db = read_deltas(a), read_deltas(b)
    for k in da:
        assert rel(got[k], 0.8 * (da[k] - 0.5 * db[k])) < 1e-6


def test_linear_truncation_is_optimal(tmp_path, adapters):
    a, b = adapters
    merged = am.merge([a, b], "linear", [0.5, 0.5], rank=3)
    got = saved_deltas(merged, tmp_path / "out")
    da, db = read_deltas(a), read_deltas(b)
    for k in da:
        dense = 0.5 * da[k] + 0.5 * db[k]
        s = torch.linalg.svdvals(dense)
        optimal = float((s[3:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
        assert got[k].shape == dense.shape
        assert torch.linalg.matrix_rank(got[k]) <= 3
        assert abs(rel(got[k], dense) - optimal) < 1e-6
        assert abs(merged.summary["modules"]["base_model.model." + k]["rel_error"] - optimal) < 1e-6


def test_cat_exact_rank_sum(tmp_path, adapters):
    a, b = adapters
    merged = am.merge([a, b], "cat", [0.25, 2.0])
    assert {m.rank for m in merged.modules.values()} == {8}
    got = saved_deltas(merged, tmp_path / "out")
    da, db = read_deltas(a), read_deltas(b)
    for k in da:
        assert rel(got[k], 0.25 * da[k] + 2.0 * db[k]) < 1e-6


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "majority_sign": "frequency"}),
    ("dare_linear", {"density": 0.6}),
    ("dare_ties", {"density": 0.6}),
    ("magnitude_prune", {"density": 0.4}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
    ("della", {"density": 0.6, "epsilon": 0.2}),
])
def test_elementwise_matches_dense_formula(tmp_path, adapters, method, params):
    a, b = adapters
    w = [0.6, 0.4]
    full = am.merge([a, b], method, w, rank="full", seed=3, **params)
    low = am.merge([a, b], method, w, rank=4, seed=3, **params)
    got_full = saved_deltas(full, tmp_path / "full")
    got_low = saved_deltas(low, tmp_path / "low")
    da, db = read_deltas(a), read_deltas(b)
    fn = getattr(dense_ref, method)  # written from the papers in tests/dense_ref.py, not the operator under test
    for k in da:
        kwargs = dict(params)
        if am.METHODS[method].stochastic:
            from adaptermerge.engine import module_seed

            kwargs["seed"] = module_seed(3, "base_model.model." + k)
        want = fn([da[k], db[k]], w, **kwargs)
        assert rel(got_full[k], want) < 1e-5, k
        reported = low.summary["modules"]["base_model.model." + k]["rel_error"]
        assert abs(rel(got_low[k], want) - reported) < 1e-4, (k, reported)
        # the randomized SVD is within a hair of the optimal rank-4 error
        s = torch.linalg.svdvals(want)
        optimal = float((s[4:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
        assert reported <= optimal * 1.01 + 1e-6


def test_ties_reference_by_hand(tmp_path):
    """TIES on two one-module adapters against a from-scratch dense implementation."""
    mods = {"m.lin": (6, 5)}
    a = write_adapter(tmp_path / "a", mods, r=2, alpha=2, seed=11)
    b = write_adapter(tmp_path / "b", mods, r=2, alpha=4, seed=12)
    got = saved_deltas(am.merge([a, b], "ties", [1.0, 1.0], rank="full", density=0.4), tmp_path / "o")["m.lin"]
    ds = [read_deltas(a)["m.lin"], read_deltas(b)["m.lin"]]
    k = int(0.4 * 30 + 0.5)
    trimmed = []
    for d in ds:
        flat = d.flatten()
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.abs().argsort(descending=True, stable=True)[:k]] = True
        trimmed.append(torch.where(keep, flat, 0.0))
    sign = torch.sign(trimmed[0] + trimmed[1])
    num = sum(torch.where((torch.sign(t) == sign) & (t != 0), t, 0.0) for t in trimmed)
    den = sum(((torch.sign(t) == sign) & (t != 0)).double() for t in trimmed)
    want = torch.where(den > 0, num / den.clamp_min(1), 0.0).reshape(6, 5)
    assert rel(got, want) < 1e-5


def test_rslora_and_patterns(tmp_path):
    mods = {"model.layers.0.q_proj": (8, 8), "model.layers.0.v_proj": (8, 8), "model.layers.1.q_proj": (8, 8)}
    a = write_adapter(tmp_path / "a", mods, r=4, alpha=8, seed=1, use_rslora=True)
    b = write_adapter(tmp_path / "b", mods, r=4, alpha=8, seed=2,
                      rank_pattern={"layers.1.q_proj": 2}, alpha_pattern={"v_proj": 3.0})
    ad_a, ad_b = am.load_adapter(a), am.load_adapter(b)
    assert ad_a.modules["base_model.model.model.layers.0.q_proj"].scale == pytest.approx(8 / 2)  # alpha/sqrt(r)
    assert ad_b.modules["base_model.model.model.layers.0.v_proj"].scale == pytest.approx(3.0 / 4)
    assert ad_b.modules["base_model.model.model.layers.1.q_proj"].scale == pytest.approx(8 / 2)
    assert ad_b.modules["base_model.model.model.layers.1.q_proj"].rank == 2
    got = saved_deltas(am.merge([a, b], "linear", [0.5, 0.5], rank=8), tmp_path / "o")
    da, db = read_deltas(a), read_deltas(b)
    for k in da:
        assert rel(got[k], 0.5 * da[k] + 0.5 * db[k]) < 1e-6


def test_different_ranks_and_missing_modules(tmp_path):
    a = write_adapter(tmp_path / "a", {"x.q": (10, 12), "x.k": (10, 12)}, r=2, alpha=4, seed=1)
    b = write_adapter(tmp_path / "b", {"x.q": (10, 12), "x.v": (6, 12)}, r=6, alpha=6, seed=2)
    merged = am.merge([a, b], "linear", [0.5, 0.5], normalize=False, rank=8)
    notes = " ".join(merged.summary["notes"])
    assert "x.k" in notes and "x.v" in notes and "zero delta" in notes
    got = saved_deltas(merged, tmp_path / "o")
    da, db = read_deltas(a), read_deltas(b)
    assert rel(got["x.q"], 0.5 * da["x.q"] + 0.5 * db["x.q"]) < 1e-6
    assert rel(got["x.k"], 0.5 * da["x.k"]) < 1e-6
    assert rel(got["x.v"], 0.5 * db["x.v"]) < 1e-6
    # default rank = largest input rank (6), ties sees zeros for the missing module
    t = am.merge([a, b], "ties", density=1.0, rank="full")
    gt = saved_deltas(t, tmp_path / "t")
    assert rel(gt["x.k"], da["x.k"]) < 1e-5  # only contributor: disjoint mean is itself
    assert {m.rank for m in am.merge([a, b], "ties", density=0.5).modules.values()} == {6}


def test_bf16_inputs_compute_fp32_output_bf16(tmp_path):
    a = write_adapter(tmp_path / "a", seed=1, dtype=torch.bfloat16)
    b = write_adapter(tmp_path / "b", seed=2, dtype=torch.bfloat16)
    merged = am.merge([a, b], "linear", [0.5, 0.5], rank=8)
    out = tmp_path / "o"
    merged.save(out)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    got, da, db = read_deltas(out), read_deltas(a), read_deltas(b)
    for k in da:
        assert rel(got[k], 0.5 * da[k] + 0.5 * db[k]) < 2e-2  # bf16 output rounding only
    merged32 = am.merge([a, b], "linear", [0.5, 0.5], rank=8, dtype="float32")
    got32 = saved_deltas(merged32, tmp_path / "o32")
    for k in da:
        assert rel(got32[k], 0.5 * da[k] + 0.5 * db[k]) < 1e-6  # computed in fp32 from exact bf16 inputs


def test_embedding_lora(tmp_path):
    emb = {"model.embed_tokens": (50, 8)}
    a = write_adapter(tmp_path / "a", {}, embedding=emb, seed=1)
    b = write_adapter(tmp_path / "b", {}, embedding=emb, seed=2)
    merged = am.merge([a, b], "ties", density=0.5, rank="full")
    out = tmp_path / "o"
    merged.save(out)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert set(f.keys()) == {"base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.model.embed_tokens.lora_embedding_B"}
    got = read_deltas(out)["model.embed_tokens"]
    da, db = read_deltas(a)["model.embed_tokens"], read_deltas(b)["model.embed_tokens"]
    want = dense_ref.ties([da, db], [1, 1], density=0.5)
    assert rel(got, want) < 1e-5
    # an embedding's delta is B @ A with A (r, num_embeddings): the (dim, num) orientation PEFT applies transposed
    assert got.shape == (8, 50)


def test_bare_safetensors_alpha_sources(tmp_path):
    f = write_adapter(tmp_path / "bare.safetensors", {"m.q": (6, 6)}, r=2, seed=1, bare=True, metadata={"lora_alpha": "4"})
    ad = am.load_adapter(f)
    assert ad.modules["base_model.model.m.q"].scale == pytest.approx(2.0)
    assert any("metadata" in n for n in ad.notes)
    g = write_adapter(tmp_path / "bare2.safetensors", {"m.q": (6, 6)}, r=2, seed=1, bare=True)
    with pytest.raises(am.ParameterError, match=r"pass alpha=\.\.\. to load_adapter$"):
        am.load_adapter(g)
    ad2 = am.load_adapter(g, alpha=6)
    assert ad2.modules["base_model.model.m.q"].scale == pytest.approx(3.0)
    got = saved_deltas(am.merge([ad2], "linear"), tmp_path / "o")["m.q"]
    assert rel(got, read_deltas(g, alpha=6)["m.q"]) < 1e-6


def _sha(path):
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_dare_byte_identical_across_runs_and_threads(tmp_path, adapters):
    a, b = adapters
    shas = set()
    old = torch.get_num_threads()
    try:
        for i, threads in enumerate([1, 2, 1]):
            torch.set_num_threads(threads)
            out = tmp_path / f"o{i}"
            am.merge_to(out, [a, b], "dare_ties", [0.5, 0.5], density=0.5, seed=7, rank=4)
            shas.add(_sha(out))
    finally:
        torch.set_num_threads(old)
    assert len(shas) == 1
    am.merge_to(tmp_path / "other", [a, b], "dare_ties", [0.5, 0.5], density=0.5, seed=8, rank=4)
    assert _sha(tmp_path / "other") not in shas


def test_dare_module_result_independent_of_other_modules(tmp_path):
    full = {"x.q": (12, 12), "x.k": (12, 12)}
    a = write_adapter(tmp_path / "a", full, seed=1)
    a_only_q = write_adapter(tmp_path / "aq", {"x.q": (12, 12)}, seed=1)
    m1 = am.merge([a], "dare_linear", density=0.5, seed=5, rank="full")
    m2 = am.merge([a_only_q], "dare_linear", density=0.5, seed=5, rank="full")
    # same factors for x.q (the generator is drawn in the same order for the first module) -> same result
    d1 = saved_deltas(m1, tmp_path / "o1")["x.q"]
    d2 = saved_deltas(m2, tmp_path / "o2")["x.q"]
    assert torch.equal(read_deltas(a)["x.q"], read_deltas(a_only_q)["x.q"])  # same input factors
    assert torch.equal(d1, d2)


def test_provenance_metadata(tmp_path, adapters):
    a, b = adapters
    out = tmp_path / "o"
    am.merge_to(out, [a, b], "ties", [0.5, 0.5], density=0.5, seed=3, rank=4)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["adaptermerge.version"] == am.__version__
    assert md["adaptermerge.method"] == "ties"
    settings = json.loads(md["adaptermerge.settings"])
    assert settings["params"]["density"] == [0.5, 0.5] and settings["seed"] == 3 and settings["weights"] == [0.5, 0.5]
    inputs = json.loads(md["adaptermerge.inputs"])
    want = hashlib.sha256((a / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert inputs[0]["sha256"] == want
    errs = json.loads(md["adaptermerge.rel_errors"])
    assert set(errs) == {"base_model.model." + k for k in LLAMA_MODULES}
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4 and cfg["peft_type"] == "LORA"
    assert cfg["target_modules"] == sorted({k.rsplit(".", 1)[-1] for k in LLAMA_MODULES})


def test_save_as_single_file(tmp_path, adapters):
    a, b = adapters
    out = tmp_path / "merged.safetensors"
    am.merge([a, b], "linear", rank=8).save(out)
    ad = am.load_adapter(out)  # a bare output says in its metadata that each module's scale is 1
    assert {m.scale for m in ad.modules.values()} == {1.0}
    da, db = read_deltas(a), read_deltas(b)
    for k in da:
        got = ad.delta("base_model.model." + k).double()
        assert rel(got, 0.5 * da[k] + 0.5 * db[k]) < 1e-6
