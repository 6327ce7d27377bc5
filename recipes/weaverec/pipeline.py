"""The WeaveRec pipeline: prepare -> train -> merge -> evaluate -> report, resumable stage by stage.

Everything a stage produces lives under the run directory (``runs/<name>/`` by default):

```
data/          samples (JSON lines) + stats.json, keyed by a fingerprint of the data config and seed
modules/<m>/   one PEFT adapter per trained module: target, hybrid-<src>, source-<src>, pooled
merged/<m>/    one PEFT adapter per merge (adaptermerge's public API)
eval/<row>.json per-user scores and metrics of every evaluated model (eval/partial/: checkpoints of the shared scoring pass, by blocks of users)
report/        report.md, report.json, report.png
```

Re-running skips whatever is already finished and matches the config (the trainer refuses to resume a module
trained on other samples or settings). Merging uses only ``adaptermerge``'s public API.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

import adaptermerge as am
from adaptermerge.errors import InputError, ParameterError

from .config import MergeSpec, RunConfig
from .layout import Prepared, _read_json, _slug, _write_json, eval_rows, pooled_module  # noqa: F401
from .report import write_report
from .types import Sample

Log = Callable[[str], None]


def is_main_process() -> bool:
    """False on the non-zero ranks of a torchrun / accelerate launch."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


# ------------------------------------------------------------------------------------------------------------ prepare
def _save_samples(path: Path, samples: Sequence[Sample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(dataclasses.asdict(s), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _load_samples(path: Path) -> list[Sample]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            out.append(Sample(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}))
    return out


def load_data(cfg: RunConfig):
    """The CDSR data set named by the config."""
    from . import data as D

    dc = cfg.data
    if dc.loader == "movielens":
        return D.load_movielens(dc.variant, dc.domains or None, seed=cfg.seed, min_seq_len=dc.min_seq_len,
                                user_split=dc.user_split, path=dc.path or None)
    if dc.loader == "amazon2014":
        return D.load_amazon2014(dc.path, [dc.target, *dc.sources], seed=cfg.seed, min_seq_len=dc.min_seq_len,
                                 user_split=dc.user_split)
    return D.load_table(dc.path, domains=[dc.target, *dc.sources], seed=cfg.seed, min_seq_len=dc.min_seq_len,
                        user_split=dc.user_split)


def prepare(cfg: RunConfig, *, log: Log = print) -> Prepared:
    """Load the data, split it, build (or reload) the samples of every domain."""
    from . import data as D

    ddir = cfg.run_dir / "data"
    fp = f"{cfg.fingerprint('data', 'seed')}-band{cfg.eval.hard_band}"
    stats = _read_json(ddir / "stats.json")
    names = ["target_train", "target_valid", "target_test", "target_valid_hard", "target_test_hard",
             *[f"source_{s}_train" for s in cfg.data.sources]]
    if stats and stats.get("fingerprint") == fp and all((ddir / f"{n}.jsonl").exists() for n in names) and (ddir / "train_sequences.json").exists():
        log(f"prepare: reusing {ddir}")
        loaded = {n: _load_samples(ddir / f"{n}.jsonl") for n in names}
        return Prepared(cfg.data.target, list(cfg.data.sources), loaded["target_train"], loaded["target_valid"],
                        loaded["target_test"], {s: loaded[f"source_{s}_train"] for s in cfg.data.sources},
                        _read_json(ddir / "train_sequences.json"), stats["target_items"], stats,
                        loaded["target_valid_hard"], loaded["target_test_hard"])
    t0 = time.perf_counter()
    data = load_data(cfg)
    data.check_disjoint()
    dc = cfg.data
    for d in [dc.target, *dc.sources]:
        if d not in data.domains:
            raise ParameterError(f"data: domain {d!r} is not in the data (domains: {data.domains})")
    tsplit = D.build_samples(data, dc.target, history_len=dc.history_len, n_candidates=dc.n_candidates, seed=cfg.seed,
                             max_train_samples=dc.max_train_samples, max_eval_users=dc.max_eval_users)
    src = {}
    for s in dc.sources:
        sp = D.build_samples(data, s, history_len=dc.history_len, n_candidates=dc.n_candidates, seed=cfg.seed,
                             max_train_samples=dc.max_train_samples, max_eval_users=1)
        src[s] = D.corrupt_next_items(sp.train, seed=cfg.seed) if s in dc.corrupt_sources else sp.train
    seqs = D.training_sequences(data, dc.target)
    pop = D.item_popularity(data, dc.target)
    valid_hard = D.hard_negative_samples(data, dc.target, tsplit.valid, seed=cfg.seed, band_width=cfg.eval.hard_band, popularity=pop)
    test_hard = D.hard_negative_samples(data, dc.target, tsplit.test, seed=cfg.seed, band_width=cfg.eval.hard_band, popularity=pop)
    stats = {
        "fingerprint": fp,
        "domains": {k: v.as_dict() for k, v in data.stats().items()},
        "samples": {"target_train": len(tsplit.train), "target_valid": len(tsplit.valid), "target_test": len(tsplit.test),
                    **{f"source_{s}_train": len(v) for s, v in src.items()}},
        "corrupt_sources": list(dc.corrupt_sources),
        "target_items": data.domain_items(dc.target),
        "info": {k: v for k, v in data.info.items() if isinstance(v, (int, float, str, list, dict))},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    _save_samples(ddir / "target_train.jsonl", tsplit.train)
    _save_samples(ddir / "target_valid.jsonl", tsplit.valid)
    _save_samples(ddir / "target_test.jsonl", tsplit.test)
    _save_samples(ddir / "target_valid_hard.jsonl", valid_hard)
    _save_samples(ddir / "target_test_hard.jsonl", test_hard)
    for s, v in src.items():
        _save_samples(ddir / f"source_{s}_train.jsonl", v)
    _write_json(ddir / "train_sequences.json", seqs)
    _write_json(ddir / "stats.json", stats)
    log(f"prepare: {data.summary()}")
    log(f"prepare: samples {stats['samples']} in {stats['seconds']} s")
    return Prepared(dc.target, list(dc.sources), tsplit.train, tsplit.valid, tsplit.test, src, seqs, stats["target_items"], stats,
                    valid_hard, test_hard)


# ------------------------------------------------------------------------------------------------------------ train
def module_samples(cfg: RunConfig, prep: Prepared) -> dict[str, list[Sample]]:
    """The training set of every module. The target thread runs through every WeaveRec module."""
    mods = {"target": list(prep.target_train)}
    for s in prep.sources:
        mods[f"hybrid-{s}"] = list(prep.target_train) + list(prep.source_train[s])
    if cfg.train_baselines:
        if any(m.modules == "source" for m in cfg.merges):  # only naive model merging uses source-only modules
            for s in prep.sources:
                mods[f"source-{s}"] = list(prep.source_train[s])
        if len(prep.sources) > 1:  # with one source the pooled data is exactly the hybrid module's data
            mods["pooled"] = list(prep.target_train) + [x for s in prep.sources for x in prep.source_train[s]]
    return mods


def base_model_dir(cfg: RunConfig, log: Log | None = None) -> Path:
    from recipe_common.llm import resolve_base_model

    cache = Path(os.path.expanduser(cfg.model.cache_dir)) if cfg.model.cache_dir else None
    return resolve_base_model(cfg.model.base, cache, log=log)


def _loss(x: float | None) -> str:
    """A loss for the log: 4 significant digits (the full float is in train_log.json)."""
    return "-" if x is None else f"{x:#.4g}"


def train(cfg: RunConfig, prep: Prepared, *, only: Sequence[str] | None = None, log: Log = print, progress: bool = True) -> dict[str, Any]:
    """Train every module (or ``only`` these), skipping finished ones. Returns {module: TrainResult}."""
    from .train import train_lora

    base = base_model_dir(cfg, log)
    tcfg = cfg.train_config()
    results = {}
    memo: dict | None = {} if tcfg.cache_prefix else None  # lower-layer states shared by the modules of this run
    for name, samples in module_samples(cfg, prep).items():
        if only and name not in only:
            continue
        out = cfg.run_dir / "modules" / name
        t0 = time.perf_counter()
        res = train_lora(base, samples, out, tcfg, progress=progress, prefix_memo=memo, label=name)
        results[name] = res
        state = "reused" if res.resumed else f"trained in {time.perf_counter() - t0:.0f} s"
        log(f"train: {name}: {len(samples)} samples, {res.steps} steps, final loss {_loss(res.final_loss)}, {state}")
    return results


# ------------------------------------------------------------------------------------------------------------ merge
def merge_inputs(spec: MergeSpec, cfg: RunConfig) -> list[Path]:
    kind = "hybrid" if spec.modules == "hybrid" else "source"
    return [cfg.run_dir / "modules" / "target", *[cfg.run_dir / "modules" / f"{kind}-{s}" for s in cfg.data.sources]]


def _exact_rank(method, adapters, rank):
    if rank != "exact":
        return rank
    # WeaveRec folds the merged delta into the base weights, so nothing forces a low rank: keep it exact.
    if method.kind == "elementwise":
        return "full"
    if method.kind == "linear":
        return sum(max(m.rank for m in a.modules.values()) for a in adapters)
    return None


def merge_one(spec: MergeSpec, cfg: RunConfig, *, force: bool = False, prep: Prepared | None = None,
              log: Log = print) -> tuple[Path, dict]:
    """Merge the modules named by ``spec`` with the core library; returns (output dir, merge summary).

    ``weights = "tuned"``: the weights are chosen on the validation users first (:func:`tune_weights`).
    """
    inputs = merge_inputs(spec, cfg)
    for p in inputs:
        if not (p / "adapter_model.safetensors").exists():
            raise InputError(f"merge {spec.name!r}: module {p} is not trained yet (run the train stage)")
    adapters = [am.load_adapter(p) for p in inputs]
    method = am.METHODS.get(spec.method)
    if method is None:
        am.merge(adapters, spec.method)  # raises the registry's "did you mean" error
    rank = _exact_rank(method, adapters, spec.rank)
    tuning = None
    if spec.tuned:
        tuning = tune_weights(spec, cfg, prep if prep is not None else prepare(cfg, log=log), adapters, rank, log=log)
        weights = tuning["weights"]
    else:
        weights = spec.weights or [1.0 / len(adapters)] * len(adapters)
    out = cfg.run_dir / "merged" / _slug(spec.name)
    fp = json.dumps({"spec": dataclasses.asdict(spec), "inputs": [a.sha256() for a in adapters], "seed": cfg.seed,
                     **({"weights": weights} if tuning else {})}, sort_keys=True)
    marker = out / "merge_spec.json"
    if out.exists() and not force and marker.exists() and marker.read_text() == fp:
        return out, _read_json(out / "merge_summary.json") or {}
    merged = am.merge(adapters, spec.method, weights, rank=rank, seed=cfg.seed, **spec.params)
    merged.save(out, force=True)
    marker.write_text(fp)
    summary = {k: v for k, v in merged.summary.items() if k != "modules"}
    summary["weights"] = list(weights)
    if tuning:
        summary["tuning"] = tuning
    _write_json(out / "merge_summary.json", summary)
    return out, summary


def simplex_grid(n: int, step: float) -> list[tuple[float, ...]]:
    """Every weight vector of ``n`` non-negative multiples of ``step`` summing to 1, plus the uniform vector."""
    m = round(1.0 / step)

    def parts(k: int, total: int):
        if k == 1:
            yield (total,)
            return
        for first in range(total, -1, -1):
            for rest in parts(k - 1, total - first):
                yield (first, *rest)

    grid = [tuple(x / m for x in p) for p in parts(n, m)]
    uniform = tuple([1.0 / n] * n)
    if not any(np.allclose(g, uniform) for g in grid):
        grid.insert(0, uniform)
    return grid


def valid_subset(cfg: RunConfig, samples: Sequence[Sample]) -> list[Sample]:
    """The validation users used for every choice (reduction, merge weights): a seeded subset of ``valid_users``."""
    n = cfg.eval.valid_users
    if n is None or n >= len(samples):
        return list(samples)
    keep = np.sort(np.random.default_rng([cfg.seed, 7]).choice(len(samples), size=n, replace=False))
    return [samples[i] for i in keep]


def _reductions(cfg: RunConfig) -> tuple[str, ...]:
    return ("sum", "mean", "pmi") if cfg.eval.reduction == "auto" else (cfg.eval.reduction,)


def _valid_ndcg(cfg: RunConfig, detailed, samples: Sequence[Sample]) -> dict[str, float]:
    """Mean validation NDCG@10 under every reduction allowed by the config."""
    from . import metrics as M

    targets = [s.target_index for s in samples]
    return {r: float(np.mean(M.metrics_from_scores([d.reduce(r) for d in detailed], targets)["NDCG@10"]))
            for r in _reductions(cfg)}


def tune_weights(spec: MergeSpec, cfg: RunConfig, prep: Prepared, adapters, rank, *, log: Log = print) -> dict[str, Any]:
    """The merge weights (the paper's lambda_i) with the best validation NDCG@10, over :func:`simplex_grid`.

    Every grid point is merged, folded and scored on the validation users (uniform negatives); the score is the
    best allowed reduction's NDCG@10. Ties go to the earlier grid point (the uniform average comes first when it is
    not on the grid). The grid and its scores are cached in ``tuning/<merge>/grid.json``.
    """
    import shutil

    valid = valid_subset(cfg, prep.target_valid)
    tdir = cfg.run_dir / "tuning" / _slug(spec.name)
    fp = json.dumps({"inputs": [a.sha256() for a in adapters], "method": spec.method, "params": spec.params,
                     "eval": cfg.fingerprint("eval", "data", "seed", "model"), "rank": rank}, sort_keys=True, default=str)
    cached = _read_json(tdir / "grid.json")
    if cached and cached.get("fingerprint") == fp:
        return {k: v for k, v in cached.items() if k != "fingerprint"}
    t0 = time.perf_counter()
    grid = simplex_grid(len(adapters), cfg.eval.tune_step)
    points = []
    shared = {}
    if _shared_first_layer(cfg) is not None:  # every grid point in one pass over the validation users
        dirs = {}
        for i, w in enumerate(grid):
            dirs[str(i)] = tdir / f"point-{i}"
            am.merge(adapters, spec.method, list(w), rank=rank, seed=cfg.seed, **spec.params).save(dirs[str(i)], force=True)
        shared = _score_shared(cfg, dirs, {"valid": valid}, progress=True, log=log)
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
    for i, w in enumerate(grid):
        if shared:
            detailed = shared[str(i)][0]
        else:
            tmp = tdir / f"point-{i}"
            merged = am.merge(adapters, spec.method, list(w), rank=rank, seed=cfg.seed, **spec.params)
            merged.save(tmp, force=True)
            detailed, _ = _score_sets(cfg, tmp, {"valid": valid}, progress=False, label=f"{spec.name} w={w}", log=log)
            shutil.rmtree(tmp, ignore_errors=True)
        nd = _valid_ndcg(cfg, detailed["valid"], valid)
        points.append({"weights": list(w), "valid_ndcg10": nd})
        log(f"merge: {spec.name}: weights {[round(x, 3) for x in w]}: validation NDCG@10 "
            + ", ".join(f"{r} {v:.4f}" for r, v in nd.items()))
    best = max(range(len(points)), key=lambda i: (max(points[i]["valid_ndcg10"].values()), -i))
    res = {"weights": points[best]["weights"], "grid": points, "valid_users": len(valid), "step": cfg.eval.tune_step,
           "seconds": round(time.perf_counter() - t0, 2)}
    _write_json(tdir / "grid.json", {"fingerprint": fp, **res})
    return res


def merge(cfg: RunConfig, *, log: Log = print, prep: Prepared | None = None) -> dict[str, Path]:
    outs = {}
    for spec in cfg.merges:
        out, summary = merge_one(spec, cfg, prep=prep, log=log)
        outs[spec.name] = out
        log(f"merge: {spec.name}: {spec.method} of {[p.name for p in merge_inputs(spec, cfg)]} with weights "
            f"{[round(w, 3) for w in summary.get('weights', [])]} -> {out} "
            f"(max rel. truncation error {summary.get('max_rel_error', 0):.2g})")
    return outs


# ------------------------------------------------------------------------------------------------------------ evaluate
def _adapter_sha(adapter: Path | None) -> str:
    """The adapter's content hash ("base" for no adapter, "" while it does not exist); hashed once per file version."""
    if adapter is None:
        return "base"
    f = Path(adapter) / "adapter_model.safetensors"
    if not f.exists():
        return ""
    st = f.stat()
    return _sha_memo(str(f.resolve()), st.st_mtime_ns, st.st_size, str(adapter))


@functools.lru_cache(maxsize=64)
def _sha_memo(_file: str, _mtime_ns: int, _size: int, adapter: str) -> str:
    return am.load_adapter(adapter).sha256()


def _row_fingerprint(cfg: RunConfig, row: dict) -> str:
    adapter = row.get("adapter")
    sha = "" if adapter is None else _adapter_sha(adapter)  # "" (not "base"): the key existing eval results carry
    return json.dumps({"eval": cfg.fingerprint("eval", "data", "seed", "model"), "adapter": sha, "kind": row["kind"]}, sort_keys=True)


def evaluate(cfg: RunConfig, prep: Prepared, *, log: Log = print, progress: bool = True, only: Sequence[str] | None = None) -> dict[str, dict]:
    """Score the test users with every model under every candidate protocol; per-user results in eval/<row>.json.

    ``res["per_user"]`` holds the first protocol's metrics, ``res["protocols"][p]["per_user"]`` every protocol's.
    LLM rows also score the validation users (uniform negatives) to choose the score reduction when
    ``eval.reduction = "auto"``; the choice and the validation NDCG@10 of every reduction are recorded.
    """
    from . import metrics as M

    edir = cfg.run_dir / "eval"
    results = {}
    protocols = list(cfg.eval.protocols)
    todo = [r for r in eval_rows(cfg) if not only or r["key"] in only or r["name"] in only]
    fps = {r["key"]: _row_fingerprint(cfg, r) for r in todo}
    fresh = {}  # results on disk whose fingerprint still matches: read once, reused below
    for r in todo:
        cached = _read_json(edir / f"{r['key']}.json")
        if cached and cached.get("fingerprint") == fps[r["key"]]:
            fresh[r["key"]] = cached
    shared: dict[str, tuple[dict, dict]] = {}
    stale = [r for r in todo if r["kind"] == "llm" and r["key"] not in fresh]
    if _shared_first_layer(cfg) is not None and len(stale) > 1:
        for r in stale:
            if r["adapter"] is not None and not (Path(r["adapter"]) / "adapter_model.safetensors").exists():
                raise InputError(f"evaluate {r['name']!r}: {r['adapter']} does not exist yet (run train/merge first)")
        valid = valid_subset(cfg, prep.target_valid) if cfg.eval.reduction == "auto" else []
        sets_all = {**{p: prep.test_set(p) for p in protocols}, **({"valid": valid} if valid else {})}
        t0 = time.perf_counter()
        shared = _score_shared(cfg, {r["name"]: r["adapter"] for r in stale}, sets_all, progress=progress, latency=True,
                               log=log)
        dt = time.perf_counter() - t0
        for _, extra in shared.values():  # the pass's time, recorded once per row with the number of rows sharing it
            extra["shared_pass"] = {"seconds": round(dt, 2), "rows": len(stale)}
        log(f"evaluate: {len(stale)} LLM rows scored together (layers below {_shared_first_layer(cfg)} shared) "
            f"in {dt:.0f} s")
    for row in todo:
        path = edir / f"{row['key']}.json"
        fp = fps[row["key"]]
        if row["key"] in fresh:
            results[row["name"]] = fresh[row["key"]]
            log(f"evaluate: {row['name']}: reusing {path}")
            continue
        t0 = time.perf_counter()
        sets = {p: prep.test_set(p) for p in protocols}
        extra: dict[str, Any] = {}
        if row["kind"] == "llm":
            scores, extra = _score_llm(cfg, row, prep, sets, progress=progress, precomputed=shared.get(row["name"]), log=log)
        elif row["kind"] == "sasrec":
            scores, extra = _score_sasrec(cfg, prep, sets)
        else:
            from .baselines import popularity_scores

            seqs = prep.train_sequences if row["kind"] == "popularity" else {str(i): [s.target] for i, s in enumerate(prep.target_train)}
            scores = {p: popularity_scores(seqs, v) for p, v in sets.items()}
        per_proto = {}
        for p, test in sets.items():
            if cfg.eval.protocol == "generate" and row["kind"] == "llm":
                pu = extra["generations"][p].pop("per_user")
            else:
                pu = M.metrics_from_scores(scores[p], [s.target_index for s in test])
            per_proto[p] = {"per_user": {k: np.asarray(v).tolist() for k, v in pu.items()}}
            if scores is not None:
                per_proto[p]["scores"] = [np.asarray(x).round(4).tolist() for x in scores[p]]
        first = protocols[0]
        res = {
            "fingerprint": fp,
            "name": row["name"],
            "kind": row["kind"],
            "users": [s.user for s in sets[first]],
            "full_history_len": [s.full_history_len for s in sets[first]],
            "per_user": per_proto[first]["per_user"],
            "protocols": per_proto,
            "seconds": round(time.perf_counter() - t0, 2),
            **extra,
        }
        if "scores" in per_proto[first]:
            res["scores"] = per_proto[first]["scores"]
        _write_json(path, res)
        results[row["name"]] = res
        nd = ", ".join(f"{p} {np.mean(v['per_user'].get('NDCG@10', v['per_user'].get('NDCG@5', [0]))):.4f}" for p, v in per_proto.items())
        red = f" ({res['reduction']})" if "reduction" in res else ""
        log(f"evaluate: {row['name']}{red}: NDCG@10 {nd} over {len(sets[first])} users in {res['seconds']} s")
    return results


def _score_sets(cfg: RunConfig, adapter: Path | None, sets: dict[str, list[Sample]], *, progress: bool, label: str,
                latency: bool = False, log: Log | None = None):
    """Detailed candidate scores (sum, mean, no-history prior) of every sample set with one folded model."""
    import torch

    from recipe_common.llm import count_parameters, load_for_eval, load_tokenizer
    from .scoring import measure_scoring_latency, no_history_priors, score_candidates_detailed, with_priors

    base = base_model_dir(cfg, log)
    model = load_for_eval(base, adapter, merge=True, dtype=cfg.model.dtype)
    tok = load_tokenizer(base)
    prompt = cfg.prompt()
    max_len = cfg.train_config().max_seq_len
    prior = cfg.eval.reduction in ("pmi", "auto")
    shared = prior and not prompt.include_candidates  # one no-history prompt for all: each title's prior once
    out = {}
    extra: dict[str, Any] = {"parameters": count_parameters(model), "threads": torch.get_num_threads()}
    with torch.inference_mode():
        for name, samples in sets.items():
            out[name] = score_candidates_detailed(model, tok, samples, prompt=prompt, batch_size=cfg.eval.batch_size,
                                                  max_rows=cfg.eval.max_rows, max_seq_len=max_len,
                                                  prior=prior and not shared, progress=progress, label=f"{label}: {name}")
        if shared:
            titles = [t for samples in sets.values() for s in samples for t in s.candidate_titles]
            priors = no_history_priors(model, tok, titles, prompt=prompt, batch_size=cfg.eval.batch_size,
                                       max_rows=cfg.eval.max_rows)
            out = {name: with_priors(out[name], sets[name], priors) for name in sets}
        first = next(iter(sets.values()), [])
        if latency and cfg.eval.latency_users and len(first) > cfg.eval.latency_users:
            lat = measure_scoring_latency(model, tok, first[: cfg.eval.latency_users + 1], prompt=prompt, max_seq_len=max_len)
            extra["latency"] = lat.to_dict()
    return out, extra


def _shared_first_layer(cfg: RunConfig) -> int | None:
    """The lowest adapted layer when the scoring may share the layers below it across models, else None."""
    layers = cfg.train_config().layers
    if not cfg.eval.shared_layers or cfg.eval.protocol != "likelihood" or not layers or min(layers) == 0:
        return None
    if cfg.data.include_candidates:
        return None
    return min(layers)


def _score_shared(cfg: RunConfig, adapters: dict[str, Path | None], sets: dict[str, list[Sample]], *, progress: bool,
                  latency: bool = False, log: Log | None = None) -> dict[str, tuple[dict, dict]]:
    """Like :func:`_score_sets` for several models at once, the lower layers run once (SharedPrefixScorer)."""
    import torch

    from recipe_common.llm import count_parameters, load_for_eval, load_tokenizer
    from .scoring import CandidateScores, SharedPrefixScorer, measure_scoring_latency, with_priors

    base_dir = base_model_dir(cfg, log)
    tok = load_tokenizer(base_dir)
    prompt = cfg.prompt()
    max_len = cfg.train_config().max_seq_len
    scorer = SharedPrefixScorer(load_for_eval(base_dir, None, dtype=cfg.model.dtype), _shared_first_layer(cfg))
    extras = {}
    for name, adapter in adapters.items():
        model = load_for_eval(base_dir, adapter, merge=True, dtype=cfg.model.dtype)
        extra: dict[str, Any] = {"parameters": count_parameters(model), "threads": torch.get_num_threads(),
                                 "shared_lower_layers": scorer.first_layer}
        first = next(iter(sets.values()), [])
        if latency and cfg.eval.latency_users and len(first) > cfg.eval.latency_users:
            extra["latency"] = measure_scoring_latency(model, tok, first[: cfg.eval.latency_users + 1], prompt=prompt,
                                                       max_seq_len=max_len).to_dict()
        scorer.add(name, model)
        extras[name] = extra
        del model
    prior = cfg.eval.reduction in ("pmi", "auto")
    out: dict[str, dict] = {name: {} for name in adapters}
    # What the scores depend on, besides the samples: the models, the prompt and the batching (padding changes the
    # float rounding). Blocks of users are checkpointed under eval/partial/, so an interrupted pass resumes.
    common = {"models": {n: _adapter_sha(a) for n, a in adapters.items()},
              "model": cfg.fingerprint("model"), "prompt": dataclasses.asdict(prompt), "max_len": max_len,
              "batch_size": cfg.eval.batch_size, "max_rows": cfg.eval.max_rows, "first_layer": scorer.first_layer}
    kw = {"prompt": prompt, "batch_size": cfg.eval.batch_size, "max_rows": cfg.eval.max_rows}
    block = cfg.eval.batch_size * max(1, CHECKPOINT_USERS // cfg.eval.batch_size)  # whole batches, as unsplit
    for set_name, samples in sets.items():
        got: dict[str, list] = {name: [] for name in adapters}
        for lo in range(0, len(samples), block):
            part = samples[lo : lo + block]
            path = _partial_path(cfg, common, [[s.user, list(s.history_titles), list(s.candidate_titles)] for s in part])
            cached = _read_json(path)
            if cached is None or sorted(cached) != sorted(adapters):
                res = scorer.score(tok, part, max_seq_len=max_len, progress=progress, **kw,
                                   label=f"{len(adapters)} models, shared lower layers: {set_name} "
                                         f"{lo + 1}-{lo + len(part)} of {len(samples)}")
                cached = {n: [[d.logprob_sum.tolist(), d.n_tokens.tolist(), d.n_history] for d in v] for n, v in res.items()}
                _write_json(path, cached)
            for name in adapters:
                got[name] += [CandidateScores(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.int64), h)
                              for a, b, h in cached[name]]
        if prior:
            titles = sorted({t for s in samples for t in s.candidate_titles})
            path = _partial_path(cfg, common, titles)
            priors = _read_json(path)
            if priors is None or sorted(priors) != sorted(adapters):
                priors = scorer.priors(tok, titles, **kw)
                _write_json(path, priors)
            got = {name: with_priors(v, samples, priors[name]) for name, v in got.items()}
        for name in adapters:
            out[name][set_name] = got[name]
    return {name: (out[name], extras[name]) for name in adapters}


#: Users per checkpoint of a shared scoring pass (rounded down to whole batches).
CHECKPOINT_USERS = 48


def _partial_path(cfg: RunConfig, common: dict, what: Any) -> Path:
    key = hashlib.sha256(json.dumps({**common, "what": what}, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return cfg.run_dir / "eval" / "partial" / f"{key}.json"


def _score_llm(cfg: RunConfig, row: dict, prep: Prepared, sets: dict[str, list[Sample]], *, progress: bool,
               precomputed: tuple[dict, dict] | None = None, log: Log | None = None):
    import torch

    from . import metrics as M
    from recipe_common.llm import load_for_eval, load_tokenizer
    from .scoring import generate_topk

    adapter = row["adapter"]
    if adapter is not None and not (Path(adapter) / "adapter_model.safetensors").exists():
        raise InputError(f"evaluate {row['name']!r}: {adapter} does not exist yet (run train/merge first)")
    if cfg.eval.protocol == "generate":
        base = base_model_dir(cfg, log)
        model = load_for_eval(base, adapter, merge=True, dtype=cfg.model.dtype)
        tok = load_tokenizer(base)
        prompt = cfg.prompt()
        gens = {}
        with torch.inference_mode():
            for p, test in sets.items():
                g = generate_topk(model, tok, test, k=prompt.top_k, prompt=prompt, batch_size=cfg.eval.batch_size,
                                  max_seq_len=cfg.train_config().max_seq_len, progress=progress,
                                  label=f"{row['name']}: {p}")
                gens[p] = {"per_user": M.metrics_from_generations(g, [prompt.show(s.target_title) for s in test]), "titles": g}
        return None, {"generations": gens, "threads": torch.get_num_threads()}
    valid = valid_subset(cfg, prep.target_valid) if cfg.eval.reduction == "auto" else []
    all_sets = {**sets, **({"valid": valid} if valid else {})}
    if precomputed is not None:
        detailed, extra = precomputed
    else:
        detailed, extra = _score_sets(cfg, adapter, all_sets, progress=progress, label=row["name"], latency=True, log=log)
    if valid:
        nd = _valid_ndcg(cfg, detailed["valid"], valid)
        reduction = max(nd, key=lambda r: (nd[r], -("sum", "mean", "pmi").index(r)))
        extra["valid_ndcg10"] = nd
        extra["valid_users"] = len(valid)
    else:
        reduction = cfg.eval.reduction
    extra["reduction"] = reduction
    # every reduction's test NDCG@10, for information only: the row's scores use the validation choice
    extra["test_ndcg10_by_reduction"] = {
        p: {r: float(np.mean(M.metrics_from_scores([d.reduce(r) for d in detailed[p]], [s.target_index for s in test])["NDCG@10"]))
            for r in (("sum", "mean", "pmi") if detailed[p] and detailed[p][0].prior_sum is not None else ("sum", "mean"))}
        for p, test in sets.items()
    }
    return {p: [d.reduce(reduction) for d in detailed[p]] for p in sets}, extra


def _score_sasrec(cfg: RunConfig, prep: Prepared, sets: dict[str, list[Sample]]):
    from .baselines import SASRecConfig, fit_sasrec, score_candidates

    scfg = SASRecConfig.from_dict({"seed": cfg.seed, **cfg.eval.sasrec})
    model = fit_sasrec(prep.train_sequences, prep.target_items, scfg, valid=prep.target_valid)
    return {p: score_candidates(model, v) for p, v in sets.items()}, {"config": dataclasses.asdict(scfg)}


# ------------------------------------------------------------------------------------------------------------ run
def run(cfg: RunConfig, *, log: Log = print, progress: bool = True, stop_after: str | None = None) -> dict[str, Any]:
    """Every stage in order; each reuses what is already finished."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    prep = prepare(cfg, log=log)
    timings["prepare"] = time.perf_counter() - t
    if stop_after == "prepare":
        return {"timings": timings}
    t = time.perf_counter()
    trained = train(cfg, prep, log=log, progress=progress)
    timings["train"] = time.perf_counter() - t
    if not is_main_process() or stop_after == "train":
        return {"timings": timings}
    t = time.perf_counter()
    merge(cfg, log=log, prep=prep)
    timings["merge"] = time.perf_counter() - t
    t = time.perf_counter()
    results = evaluate(cfg, prep, log=log, progress=progress)
    timings["evaluate"] = time.perf_counter() - t
    t = time.perf_counter()
    report = write_report(cfg, prep, results, trained, log=log)
    timings["report"] = time.perf_counter() - t
    report["timings"] = timings
    return report
