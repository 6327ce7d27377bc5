"""A tiny end-to-end WeaveRec run: table data with three domains, a tiny random Llama, a few training steps.

It must produce the report (markdown, JSON, PNG) with every row, the WeaveRec adapter must equal the core merge of
the trained modules (checked against deltas read independently), and a re-run must reuse everything."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch

from conftest import read_deltas
from weaverec.config import config_from_dict, load_config
from recipe_common.llm import tiny_llama
from weaverec.pipeline import run

GENRES = {"books": ["Novel", "Atlas", "Poems", "Essays"], "games": ["Quest", "Racer", "Puzzle"], "music": ["Album", "Single", "Live"]}


def write_table(path, n_users=14, per_domain_items=24, seq_len=9, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    domains = list(GENRES)
    for d_i, d in enumerate(domains):
        items = [f"{d}-{k}" for k in range(per_domain_items)]
        for u in range(n_users):
            user = f"u{d_i}_{u}"
            start = int(rng.integers(0, per_domain_items))
            for t in range(seq_len):  # a strong sequential pattern: next item id = previous + 1
                it = items[(start + t) % per_domain_items]
                title = f"{GENRES[d][int(it.split('-')[1]) % len(GENRES[d])]} {it.split('-')[1]}"
                rows.append({"user": user, "item": it, "timestamp": 1000 + t, "title": f"{d} {title}", "domain": d})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["user", "item", "timestamp", "title", "domain"])
        w.writeheader()
        w.writerows(rows)
    return sorted({r["title"] for r in rows})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("weaverec")
    titles = write_table(tmp / "data.csv")
    model = tiny_llama(tmp / "model", texts=titles)
    cfg = config_from_dict({
        "name": "tiny",
        "seed": 3,
        "workdir": str(tmp / "run"),
        "data": {"loader": "table", "path": str(tmp / "data.csv"), "target": "books", "sources": ["games", "music"],
                 "user_split": "most", "history_len": 4, "n_candidates": 6, "max_train_samples": 16,
                 "max_eval_users": 10, "noun": "item", "include_candidates": False, "corrupt_sources": ["music"]},
        "model": {"base": str(model)},
        "lora": {"r": 4, "alpha": 8, "max_steps": 2, "batch_size": 4, "max_seq_len": 96, "lr": 1e-3},
        "merges": [
            {"name": "Naive model merging", "modules": "source", "method": "linear"},
            {"name": "WeaveRec", "modules": "hybrid", "method": "linear"},
            {"name": "WeaveRec (TIES)", "modules": "hybrid", "method": "ties", "params": {"density": 0.5}},
            {"name": "WeaveRec (tuned weights)", "modules": "hybrid", "method": "linear", "weights": "tuned"},
        ],
        "eval": {"n_boot": 50, "latency_users": 2, "sasrec": {"epochs": 2, "hidden": 16}, "protocols": ["uniform", "hard"],
                 "reduction": "auto", "valid_users": 6, "tune_step": 0.5,
                 "baselines": ["base", "sasrec", "popularity", "popularity-llm"]},
    })
    logs: list[str] = []
    report = run(cfg, log=logs.append, progress=False)
    return cfg, report, logs


def test_report_has_every_row(finished_run):
    cfg, report, _ = finished_run
    rdir = cfg.run_dir / "report"
    assert (rdir / "report.md").exists() and (rdir / "report.png").stat().st_size > 1000
    data = json.loads((rdir / "report.json").read_text())
    want = {"Base model (zero-shot)", "Target-only LoRA", "Data merging (pooled LoRA)", "Naive model merging", "WeaveRec",
            "WeaveRec (TIES)", "SASRec (non-LLM)", "Popularity (non-LLM)",
            "Hybrid LoRA (books+games) alone", "Hybrid LoRA (books+music) alone",
            "WeaveRec (tuned weights)", "Popularity (LLM's training samples)"}
    assert set(data["rows"]) == want
    assert set(data["by_protocol"]) == {"uniform", "hard"} and set(data["by_protocol"]["hard"]["rows"]) == want
    for row in data["rows"].values():
        for m, s in row.items():
            assert 0.0 <= s["low"] <= s["mean"] <= s["high"] <= 1.0, (m, s)
            assert s["n"] == 10
    assert "WeaveRec - Target-only LoRA" in data["paired_differences"]
    # every LLM row against both popularity baselines, per protocol: the mean paired difference of the per-user NDCG@10
    evals = {}
    for f in (cfg.run_dir / "eval").glob("*.json"):
        r = json.loads(f.read_text())
        evals[r["name"]] = r
    llm_rows = {n for n, r in evals.items() if r["kind"] == "llm"}
    for p in ("uniform", "hard"):
        vs = data["by_protocol"][p]["vs_popularity"]
        assert set(vs) == llm_rows
        for n, d in vs.items():
            assert set(d) == {"Popularity (non-LLM)", "Popularity (LLM's training samples)"}
            for b, diff in d.items():
                a_u = np.array(evals[n]["protocols"][p]["per_user"]["NDCG@10"])
                b_u = np.array(evals[b]["protocols"][p]["per_user"]["NDCG@10"])
                assert diff["metric"] == "NDCG@10" and abs(diff["mean"] - float(np.mean(a_u - b_u))) < 1e-12
                assert diff["low"] <= diff["mean"] <= diff["high"]
    md = (rdir / "report.md").read_text()
    assert "LLM rows minus the popularity baselines, hard negatives" in md
    assert "* Against Popularity (non-LLM) under hard negatives:" in md
    assert "| WeaveRec |" in md and "Cold start" in md and "Inference cost" in md and "popularity-matched" in md
    assert "Corrupted source(s) music" in md and "Score reduction" in md and "Merge weights" in md
    assert "## Reading" in md and "![NDCG@10 by model](report.png)" in md
    assert "load average" in md  # times in the report say under what load they were measured
    # losses in the log have 4 significant digits, not a float's 17
    train_lines = [line for line in finished_run[2] if line.startswith("train: ")]
    assert train_lines
    for line in train_lines:
        loss = re.search(r"final loss ([0-9.]+),", line).group(1)
        assert len(loss.replace(".", "").lstrip("0")) == 4, line
    # folding the merged delta into the base weights keeps the base model's size
    cost = data["inference_cost"]
    assert cost["WeaveRec"]["parameters"] == cost["Target-only LoRA"]["parameters"] == cost["Base model (zero-shot)"]["parameters"]
    diag = data["module_cosine"]
    assert diag["modules"][0] == "target" and set(diag["vs_target"]) == set(diag["modules"][1:])
    assert all(-1.0 <= v["cosine"] <= 1.0 and 0.0 <= v["sign_conflict_top20"] <= 1.0 for v in diag["vs_target"].values())


def test_metrics_match_scores(finished_run):
    """Per-user metrics recomputed by hand from the cached candidate scores."""
    cfg, _, _ = finished_run
    res = json.loads((cfg.run_dir / "eval" / "weaverec.json").read_text())
    test = [json.loads(line) for line in open(cfg.run_dir / "data" / "target_test.jsonl")]
    assert len(res["scores"]) == len(test) == len(res["per_user"]["MRR"]) > 0
    compared = 0
    for u, (scores, s) in enumerate(zip(res["scores"], test)):
        scores = np.array(scores)
        t = s["target_index"]
        greater = int((scores > scores[t]).sum())
        if (scores == scores[t]).sum() == 1:  # no ties at 4 decimals: the metric is the plain one
            assert res["per_user"]["MRR"][u] == pytest.approx(1.0 / (greater + 1), abs=1e-3)
            assert res["per_user"]["HR@1"][u] == float(greater == 0)
            compared += 1
    assert compared >= max(1, len(test) // 2), (compared, len(test))  # LLM scores rarely tie


def test_weaverec_adapter_is_core_merge_of_modules(finished_run):
    cfg, _, _ = finished_run
    mods = cfg.run_dir / "modules"
    inputs = [read_deltas(mods / "target"), read_deltas(mods / "hybrid-games"), read_deltas(mods / "hybrid-music")]
    merged = read_deltas(cfg.run_dir / "merged" / "weaverec")
    assert merged.keys() == inputs[0].keys()
    for k in merged:
        want = sum(d[k] for d in inputs) / 3.0
        torch.testing.assert_close(merged[k], want, rtol=1e-5, atol=1e-7)
    naive = read_deltas(cfg.run_dir / "merged" / "naive-model-merging")
    src = [read_deltas(mods / "target"), read_deltas(mods / "source-games"), read_deltas(mods / "source-music")]
    for k in naive:
        torch.testing.assert_close(naive[k], sum(d[k] for d in src) / 3.0, rtol=1e-5, atol=1e-7)


def test_rerun_resumes(finished_run):
    cfg, _, _ = finished_run
    before = {p: p.stat().st_mtime_ns for p in (cfg.run_dir / "eval").glob("*.json")}
    logs: list[str] = []
    run(cfg, log=logs.append, progress=False)
    text = "\n".join(logs)
    assert "reused" in text and "trained in" not in text
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())


def _samples(cfg, name):
    with open(cfg.run_dir / "data" / f"{name}.jsonl") as f:
        return [json.loads(line) for line in f]


def test_hard_protocol_reductions_and_llm_popularity(finished_run):
    from weaverec.pipeline import valid_subset

    cfg, _, _ = finished_run
    test, hard = _samples(cfg, "target_test"), _samples(cfg, "target_test_hard")
    assert [(s["user"], s["target"], s["target_index"]) for s in test] == [(s["user"], s["target"], s["target_index"]) for s in hard]
    assert any(a["candidates"] != b["candidates"] for a, b in zip(test, hard))
    # popularity fitted on the LLM's training samples only: the count of each item as a training target
    counts: dict[str, int] = {}
    for s in _samples(cfg, "target_train"):
        counts[s["target"]] = counts.get(s["target"], 0) + 1
    res = json.loads((cfg.run_dir / "eval" / "popularity-llm-s-training-samples.json").read_text())
    for proto, samples in (("uniform", test), ("hard", hard)):
        got = res["protocols"][proto]["scores"]
        assert got == [[float(counts.get(c, 0)) for c in s["candidates"]] for s in samples]
    # every LLM row: the reduction is the validation argmax; validation = the seeded subset of valid_users users
    assert len(valid_subset(cfg, list(range(10)))) == 6
    for name in ("base-model-zero-shot", "target-only-lora", "weaverec"):
        r = json.loads((cfg.run_dir / "eval" / f"{name}.json").read_text())
        nd = r["valid_ndcg10"]
        assert set(nd) == {"sum", "mean", "pmi"} and r["valid_users"] == 6
        assert nd[r["reduction"]] == max(nd.values())
        assert set(r["protocols"]) == {"uniform", "hard"}


def test_tuned_weights_are_the_validation_argmax_and_merged_exactly(finished_run):
    from weaverec.pipeline import simplex_grid

    cfg, _, _ = finished_run
    summ = json.loads((cfg.run_dir / "merged" / "weaverec-tuned-weights" / "merge_summary.json").read_text())
    grid = summ["tuning"]["grid"]
    assert [tuple(g["weights"]) for g in grid] == simplex_grid(3, 0.5)
    assert len(grid) == 7 and grid[0]["weights"] == [1 / 3] * 3  # six grid points + the uniform average first
    best = max(max(g["valid_ndcg10"].values()) for g in grid)
    first_best = next(g for g in grid if max(g["valid_ndcg10"].values()) == best)
    assert summ["weights"] == first_best["weights"]
    mods = cfg.run_dir / "modules"
    inputs = [read_deltas(mods / "target"), read_deltas(mods / "hybrid-games"), read_deltas(mods / "hybrid-music")]
    merged = read_deltas(cfg.run_dir / "merged" / "weaverec-tuned-weights")
    for k in merged:
        want = sum(w * d[k] for w, d in zip(summ["weights"], inputs))
        torch.testing.assert_close(merged[k], want, rtol=1e-5, atol=1e-7)


def test_simplex_grid_and_bad_configs():
    from adaptermerge.errors import ParameterError
    from weaverec.pipeline import simplex_grid

    g = simplex_grid(2, 0.25)
    assert g == [(1.0, 0.0), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75), (0.0, 1.0)]
    assert len(simplex_grid(3, 0.25)) == 16 and all(abs(sum(w) - 1) < 1e-12 for w in simplex_grid(4, 0.25))
    base = {"name": "x", "data": {"sources": ["a"], "target": "t"}}
    for bad in ({"eval": {"reduction": "max"}}, {"eval": {"protocols": ["hard", "hard"]}}, {"eval": {"tune_step": 0.3}},
                {"data": {"sources": ["a"], "target": "t", "corrupt_sources": ["b"]}},
                {"merges": [{"name": "m", "weights": "best"}]}, {"merges": [{"name": "m", "weights": [1.0]}]},
                {"merges": [{"name": "m", "method": "ties", "weights": "tuned"}]}):
        with pytest.raises(ParameterError):
            config_from_dict({**base, **bad})


def test_shipped_configs_validate():
    """Every shipped config loads, and every merge it asks for is a valid call of the core library's registry
    (method, parameters and weights for its 1 + len(sources) inputs), checked before any run."""
    import adaptermerge as am

    for name in ("quick", "full", "paper", "harmful"):
        cfg = load_config(f"recipes/{name}.toml")
        assert cfg.name == name and cfg.data.sources and cfg.data.target not in cfg.data.sources
        names = [m.name for m in cfg.merges]
        assert len(names) == len(set(names)) and "WeaveRec" in names
        for spec in cfg.merges:
            n_inputs = 1 + len(cfg.data.sources)  # the target module and one module per source domain
            rank = None if spec.rank == "exact" else spec.rank
            weights = None if spec.tuned else spec.weights  # tuned: chosen on validation, checked here as uniform
            req = am.MergeRequest.build(spec.method, n_inputs, weights, spec.params, rank=rank, seed=cfg.seed)
            assert req.operator.name == spec.method
        with pytest.raises(am.ParameterError):  # and the check is real: a wrong parameter is refused
            am.MergeRequest.build("ties", 2, None, {"densty": 0.5})


def test_shared_lower_layers_and_prefix_cache_give_the_same_run(tmp_path):
    """Top-layer LoRA: cached training + shared-lower-layer scoring (all rows and the weight grid in one pass) give
    the scores, reductions and tuned weights of plain per-model scoring."""
    import dataclasses

    titles = write_table(tmp_path / "data.csv")
    model = tiny_llama(tmp_path / "model", texts=titles)
    raw = {
        "name": "tiny-shared", "seed": 5, "workdir": str(tmp_path / "run"),
        "data": {"loader": "table", "path": str(tmp_path / "data.csv"), "target": "books", "sources": ["games"],
                 "user_split": "most", "history_len": 4, "n_candidates": 6, "max_train_samples": 12,
                 "max_eval_users": 8, "noun": "item", "include_candidates": False},
        "model": {"base": str(model)},
        "lora": {"r": 4, "alpha": 8, "max_steps": 3, "batch_size": 4, "max_seq_len": 96, "lr": 3e-2, "layers": [1],
                 "cache_prefix": True, "warmup_ratio": 0.0},
        "merges": [{"name": "WeaveRec", "modules": "hybrid"},
                   {"name": "Tuned", "modules": "hybrid", "weights": "tuned"}],
        "eval": {"n_boot": 20, "latency_users": 2, "protocols": ["uniform", "hard"], "reduction": "auto",
                 "valid_users": 5, "tune_step": 0.5, "baselines": ["base", "popularity"], "shared_layers": True},
    }
    cfg = config_from_dict(raw)
    logs: list[str] = []
    run(cfg, log=logs.append, progress=False)
    assert any("scored together (layers below 1 shared)" in line for line in logs)
    shared = {p.name: json.loads(p.read_text()) for p in (cfg.run_dir / "eval").glob("*.json")}
    tuned_shared = json.loads((cfg.run_dir / "merged" / "tuned" / "merge_summary.json").read_text())["tuning"]
    _check_partial_checkpoints(cfg, shared)
    _check_compute_accounting(cfg, shared, tuned_shared)
    plain_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, shared_layers=False))
    logs = []
    run(plain_cfg, log=logs.append, progress=False)
    assert not any("scored together" in line for line in logs)
    tuned_plain = json.loads((cfg.run_dir / "merged" / "tuned" / "merge_summary.json").read_text())["tuning"]
    for a, b in zip(tuned_shared["grid"], tuned_plain["grid"]):
        assert a["weights"] == b["weights"]
        assert a["valid_ndcg10"] == pytest.approx(b["valid_ndcg10"], abs=1e-9)
    llm = 0
    for name, a in shared.items():
        b = json.loads((cfg.run_dir / "eval" / name).read_text())
        if a["kind"] != "llm":
            continue
        llm += 1
        assert a["reduction"] == b["reduction"] and a["valid_ndcg10"] == pytest.approx(b["valid_ndcg10"], abs=1e-9)
        for p in ("uniform", "hard"):
            np.testing.assert_allclose(np.array(a["protocols"][p]["scores"]), np.array(b["protocols"][p]["scores"]), atol=2e-4)
            assert a["protocols"][p]["per_user"] == b["protocols"][p]["per_user"]
    assert llm == 5  # base, target-only, data merging (= the hybrid), WeaveRec, tuned
    log = json.loads((cfg.run_dir / "modules" / "target" / "train_log.json").read_text())
    assert log["prefix_cached_below_layer"] == 1


def _check_compute_accounting(cfg, shared, tuning):
    """The report's compute time counts the shared scoring pass once (every LLM row records the same pass and how
    many rows shared it), the lower-layer states of training and the weight tuning."""
    llm = [a for a in shared.values() if a["kind"] == "llm"]
    passes = {json.dumps(a["shared_pass"], sort_keys=True) for a in llm}
    assert len(passes) == 1
    one = llm[0]["shared_pass"]
    assert one["rows"] == len(llm) and one["seconds"] > 0
    logs = [json.loads(f.read_text()) for f in (cfg.run_dir / "modules").glob("*/train_log.json")]
    assert all(lg["prefix_seconds"] >= 0 for lg in logs)
    assert json.loads((cfg.run_dir / "modules" / "target" / "train_log.json").read_text())["prefix_seconds"] > 0
    stages = json.loads((cfg.run_dir / "report" / "report.json").read_text())["compute_seconds_by_stage"]
    assert stages["training"] == pytest.approx(sum(lg["seconds"] + lg["prefix_seconds"] for lg in logs), abs=0.2)
    assert stages["tuning"] == pytest.approx(tuning["seconds"], abs=0.1) and tuning["seconds"] > 0
    assert stages["evaluation"] == pytest.approx(sum(a["seconds"] for a in shared.values()) + one["seconds"], abs=0.2)
    md = (cfg.run_dir / "report" / "report.md").read_text()
    assert "seconds (lower-layer states)" in md and "Compute time recorded for training, weight tuning and evaluation" in md


def _check_partial_checkpoints(cfg, shared):
    """The shared scoring pass checkpoints blocks of users and the priors (eval/partial/): a re-evaluation reads
    them back without scoring and gives the same bytes; a lost block is the only one scored again."""
    from weaverec import pipeline
    from weaverec.scoring import SharedPrefixScorer

    partial = sorted((cfg.run_dir / "eval" / "partial").glob("*.json"))
    assert partial, "no checkpoints written"
    calls = {"score": 0, "priors": 0}
    real_score, real_priors = SharedPrefixScorer.score, SharedPrefixScorer.priors

    def counting(kind, real):
        def f(self, *a, **k):
            calls[kind] += 1
            return real(self, *a, **k)
        return f

    prep = pipeline.prepare(cfg, log=lambda m: None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SharedPrefixScorer, "score", counting("score", real_score))
        mp.setattr(SharedPrefixScorer, "priors", counting("priors", real_priors))
        mp.setattr(pipeline, "CHECKPOINT_USERS", 4)  # blocks of one batch: several per set
        for f in (cfg.run_dir / "eval").glob("*.json"):
            f.unlink()
        pipeline.evaluate(cfg, prep, log=lambda m: None, progress=False)  # other block size: new checkpoints
        assert calls["score"] > 3 and calls["priors"] == 0  # new user blocks; the title priors are reused
        again = {p.name: json.loads(p.read_text()) for p in (cfg.run_dir / "eval").glob("*.json")}
        for name, a in shared.items():
            if a["kind"] == "llm":
                for proto in ("uniform", "hard"):  # batches formed as before: identical scores
                    assert a["protocols"][proto]["scores"] == again[name]["protocols"][proto]["scores"]
        n_blocks = calls["score"]
        for f in (cfg.run_dir / "eval").glob("*.json"):
            f.unlink()
        newest = max((cfg.run_dir / "eval" / "partial").glob("*.json"), key=lambda q: q.stat().st_mtime_ns)
        newest.unlink()
        calls.update(score=0, priors=0)
        pipeline.evaluate(cfg, prep, log=lambda m: None, progress=False)
        assert calls["score"] + calls["priors"] == 1, (calls, n_blocks)  # only the lost checkpoint
        third = {p.name: json.loads(p.read_text()) for p in (cfg.run_dir / "eval").glob("*.json")}
        assert {k: v["protocols"] for k, v in third.items() if v["kind"] == "llm"} == \
            {k: v["protocols"] for k, v in again.items() if v["kind"] == "llm"}


def test_generate_protocol_rows_under_both_candidate_sets(tmp_path):
    """The authors' generate-top-k protocol goes through the same evaluate stage: per-protocol metrics, no scores."""
    from weaverec.pipeline import evaluate, prepare

    titles = write_table(tmp_path / "data.csv")
    model = tiny_llama(tmp_path / "model", texts=titles)
    cfg = config_from_dict({
        "name": "tiny-gen", "seed": 2, "workdir": str(tmp_path / "run"),
        "data": {"loader": "table", "path": str(tmp_path / "data.csv"), "target": "books", "sources": ["games"],
                 "user_split": "most", "history_len": 3, "n_candidates": 6, "max_train_samples": 4,
                 "max_eval_users": 3, "noun": "item", "uninvert_articles": True},
        "model": {"base": str(model)},
        "lora": {"r": 4, "alpha": 8, "max_steps": 1, "batch_size": 4, "max_seq_len": 256},
        "eval": {"protocol": "generate", "protocols": ["uniform", "hard"], "baselines": ["base"], "latency_users": 0},
    })
    res = evaluate(cfg, prepare(cfg, log=lambda m: None), log=lambda m: None, progress=False, only=["Base model (zero-shot)"])
    r = res["Base model (zero-shot)"]
    assert set(r["protocols"]) == {"uniform", "hard"} and "scores" not in r
    for p in ("uniform", "hard"):
        pu = r["protocols"][p]["per_user"]
        assert set(pu) >= {"NDCG@1", "NDCG@5", "MRR@5"} and all(len(v) == 3 for v in pu.values())
        assert len(r["generations"][p]["titles"]) == 3


def _summary(mean, half):
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": 25, "confidence": 0.95}


def test_report_reading_legend_and_no_empty_buckets():
    """The generated reading calls a difference significant only when p < 0.05 and its interval excludes 0; the
    chart is linked with its colour legend; a cold-start bucket without users gets no column."""
    from weaverec.report import _markdown

    diff = lambda mean, lo, hi, p: {"NDCG@10": {"mean": mean, "low": lo, "high": hi, "p_value": p, "n": 25, "confidence": 0.95}}  # noqa: E731
    report = {
        "config": "quick", "target": "thriller", "sources": ["comedy"], "protocol": "likelihood", "n_test_users": 25,
        "data": {"target_train": 64}, "kinds": {"Target-only LoRA": "llm", "WeaveRec": "llm", "SASRec (non-LLM)": "sasrec"},
        "rows": {"Target-only LoRA": {"NDCG@10": _summary(0.30, 0.08)}, "WeaveRec": {"NDCG@10": _summary(0.33, 0.08)},
                 "SASRec (non-LLM)": {"NDCG@10": _summary(0.70, 0.06)}},
        "paired_differences": {"WeaveRec - Target-only LoRA": diff(0.03, -0.02, 0.08, 0.31),
                               "WeaveRec - Naive model merging": diff(0.06, 0.01, 0.11, 0.01)},
        "cold_start": {"metric": "NDCG@10", "buckets": ["<=3", "4-10", ">10"], "users_per_bucket": {"<=3": 0, "4-10": 11, ">10": 14},
                       "rows": {"WeaveRec": {"<=3": None, "4-10": _summary(0.3, 0.1), ">10": _summary(0.35, 0.1)}}},
        "inference_cost": {}, "module_cosine": None, "training": {}, "compute_seconds": 1.0,
    }
    md = _markdown(report, ["NDCG@10"], "NDCG@10", chart=True, results_doc="../../../docs/weaverec-results.md")
    reading = md.split("## Reading")[1].split("##")[0]
    assert "±0.073" in reading  # mean half-width of the three rows' intervals: (0.08 + 0.08 + 0.06) / 3
    assert "WeaveRec - Target-only LoRA: +0.030 NDCG@10 [-0.020, +0.080], p = 0.31: not significant" in reading
    assert "WeaveRec - Naive model merging: +0.060 NDCG@10 [+0.010, +0.110], p = 0.01: significant" in reading
    assert "cannot rank the methods" in reading and "(../../../docs/weaverec-results.md)" in reading
    assert "SASRec (non-LLM), 0.700) is above every LLM row" in reading
    assert "![NDCG@10 by model](report.png)" in md and "red: WeaveRec" in md and "grey: no LoRA trained" in md
    cold = md.split("## Cold start")[1]
    header = cold.splitlines()[2]
    assert header == "| model | 4-10 items (11 users) | >10 items (14 users) |"
    assert "(0 users)" not in md and "left out: <=3 items" in cold


def test_one_time_conversion_announces_itself(tmp_path, monkeypatch):
    """The first use says what is converted, where it goes, its size and how to remove it; a reuse says nothing."""
    from recipe_common import llm

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not really a gguf")

    def fake_convert(src, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"\0" * 3_000_000)
        (out / "conversion.json").write_text("{}")
        return out

    monkeypatch.setattr(llm, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setattr(llm, "convert_gguf", fake_convert)
    lines: list[str] = []
    out = llm.resolve_base_model("smollm2-135m", tmp_path / "cache", log=lines.append)
    assert out.parent == tmp_path / "cache" and (out / "model.safetensors").exists()
    assert len(lines) == 2
    assert "one-time conversion" in lines[0] and str(out) in lines[0] and "0.5 GB" in lines[0]
    assert "3 MB" in lines[1] and f"rm -r {out}" in lines[1]
    lines.clear()
    assert llm.resolve_base_model("smollm2-135m", tmp_path / "cache", log=lines.append) == out
    assert lines == []


def test_report_reading_covers_every_candidate_protocol():
    """With two candidate protocols the reading names the protocol of each paired difference and of each anchor
    statement, counts every comparison, and the chart caption says which protocol the chart shows."""
    from weaverec.report import _markdown

    diff = lambda mean, lo, hi, p: {"NDCG@10": {"mean": mean, "low": lo, "high": hi, "p_value": p, "n": 25, "confidence": 0.95}}  # noqa: E731
    uniform = {"rows": {"WeaveRec": {"NDCG@10": _summary(0.33, 0.08)}, "Popularity (non-LLM)": {"NDCG@10": _summary(0.60, 0.05)}},
               "paired_differences": {"WeaveRec - Target-only LoRA": diff(0.03, -0.02, 0.08, 0.31)}}
    hard = {"rows": {"WeaveRec": {"NDCG@10": _summary(0.30, 0.08)}, "Popularity (non-LLM)": {"NDCG@10": _summary(0.20, 0.05)}},
            "paired_differences": {"WeaveRec - Target-only LoRA": diff(0.05, 0.01, 0.09, 0.02)}}
    report = {
        "config": "quick", "target": "thriller", "sources": ["comedy"], "protocol": "likelihood", "n_test_users": 25,
        "data": {"target_train": 64}, "kinds": {"WeaveRec": "llm", "Popularity (non-LLM)": "popularity"},
        "rows": uniform["rows"], "paired_differences": uniform["paired_differences"],
        "by_protocol": {"uniform": uniform, "hard": hard},
        "cold_start": {"metric": "NDCG@10", "buckets": [">10"], "users_per_bucket": {">10": 25}, "rows": {}},
        "inference_cost": {}, "module_cosine": None, "training": {}, "compute_seconds": 1.0,
    }
    md = _markdown(report, ["NDCG@10"], "NDCG@10", chart=True)
    reading = md.split("## Reading")[1].split("##")[0]
    assert "WeaveRec - Target-only LoRA (uniform negatives): +0.030 NDCG@10 [-0.020, +0.080], p = 0.31: not significant" in reading
    assert "WeaveRec - Target-only LoRA (hard negatives): +0.050 NDCG@10 [+0.010, +0.090], p = 0.02: significant" in reading
    assert "(2 are made, uncorrected)" in reading
    assert "best non-LLM baseline under uniform negatives (Popularity (non-LLM), 0.600)" in reading
    assert "under hard negatives" not in reading  # there the LLM row is above popularity
    assert "(report.png), uniform negatives" in md
    assert md.count("## All metrics, candidates:") == 2 and "popularity-matched negatives" in md


def test_source_only_modules_trained_only_for_naive_merging():
    """Source-only modules serve only the naive-merging row: a config without it does not train them (the harmful
    config saves that training), and the data-merging module is still there."""
    from weaverec.layout import Prepared
    from weaverec.pipeline import module_samples

    base = {"name": "x", "data": {"sources": ["a", "b"], "target": "t"}}
    prep = Prepared("t", ["a", "b"], ["t1", "t2"], [], [], {"a": ["a1"], "b": ["b1", "b2"]}, {}, [], {})
    with_naive = config_from_dict({**base, "merges": [{"name": "WeaveRec", "modules": "hybrid"},
                                                      {"name": "Naive", "modules": "source"}]})
    mods = module_samples(with_naive, prep)
    assert mods == {"target": ["t1", "t2"], "hybrid-a": ["t1", "t2", "a1"], "hybrid-b": ["t1", "t2", "b1", "b2"],
                    "source-a": ["a1"], "source-b": ["b1", "b2"], "pooled": ["t1", "t2", "a1", "b1", "b2"]}
    without = config_from_dict({**base, "merges": [{"name": "WeaveRec", "modules": "hybrid"}]})
    assert sorted(module_samples(without, prep)) == ["hybrid-a", "hybrid-b", "pooled", "target"]


def test_cli_threads_option_wins_over_the_config(tmp_path, monkeypatch):
    """`weaverec run --threads 1` on a config with `threads = 2` runs with one torch thread: run() applies the
    config's thread count, so the option must reach the config (it once did not: two runs of 2 threads each on 2
    cores, with idle OpenMP workers spinning at half a core each)."""
    import torch

    from adaptermerge.cli import main
    from weaverec import pipeline

    seen = {}

    def fake_run(cfg, **kw):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)  # what the real run() does first
        seen["threads"], seen["cfg"] = torch.get_num_threads(), cfg.threads
        return {}

    monkeypatch.setattr(pipeline, "run", fake_run)
    cfg = tmp_path / "c.toml"
    cfg.write_text('name = "t"\nthreads = 2\n[data]\ntarget = "books"\nsources = ["games"]\n')
    before = torch.get_num_threads()
    try:
        assert main(["weaverec", "run", str(cfg), "--threads", "1", "-q"]) == 0
        assert seen == {"threads": 1, "cfg": 1}
        assert main(["weaverec", "run", str(cfg), "-q"]) == 0
        assert seen == {"threads": 2, "cfg": 2}
    finally:
        torch.set_num_threads(before)
