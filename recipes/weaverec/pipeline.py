"""The WeaveRec pipeline: prepare -> train -> merge -> evaluate -> report, resumable stage by stage.

Everything a stage produces lives under the run directory (``runs/<name>/`` by default):

```
data/          samples (JSON lines) + stats.json, keyed by a fingerprint of the data config and seed
modules/<m>/   one PEFT adapter per trained module: target, hybrid-<src>, source-<src>, pooled
merged/<m>/    one PEFT adapter per merge (adaptermerge's public API)
eval/<row>.json per-user scores and metrics of every evaluated model
report/        report.md, report.json, report.png
```

Re-running skips whatever is already finished and matches the config (the trainer refuses to resume a module
trained on other samples or settings). Merging uses only ``adaptermerge``'s public API.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

import adaptermerge as am
from adaptermerge.errors import InputError, ParameterError

from .config import MergeSpec, RunConfig
from .types import Sample

Log = Callable[[str], None]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, default=_json_default))
    os.replace(tmp, path)


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_main_process() -> bool:
    """False on the non-zero ranks of a torchrun / accelerate launch."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


# ------------------------------------------------------------------------------------------------------------ prepare
@dataclasses.dataclass
class Prepared:
    target: str
    sources: list[str]
    target_train: list[Sample]
    target_valid: list[Sample]
    target_test: list[Sample]
    source_train: dict[str, list[Sample]]
    train_sequences: dict[str, list[str]]  # target domain, for the non-LLM baselines
    target_items: list[str]
    stats: dict[str, Any]


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
    fp = cfg.fingerprint("data", "seed")
    stats = _read_json(ddir / "stats.json")
    names = ["target_train", "target_valid", "target_test", *[f"source_{s}_train" for s in cfg.data.sources]]
    if stats and stats.get("fingerprint") == fp and all((ddir / f"{n}.jsonl").exists() for n in names) and (ddir / "train_sequences.json").exists():
        log(f"prepare: reusing {ddir}")
        loaded = {n: _load_samples(ddir / f"{n}.jsonl") for n in names}
        return Prepared(cfg.data.target, list(cfg.data.sources), loaded["target_train"], loaded["target_valid"],
                        loaded["target_test"], {s: loaded[f"source_{s}_train"] for s in cfg.data.sources},
                        _read_json(ddir / "train_sequences.json"), stats["target_items"], stats)
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
        src[s] = sp.train
    seqs = D.training_sequences(data, dc.target)
    stats = {
        "fingerprint": fp,
        "domains": {k: v.as_dict() for k, v in data.stats().items()},
        "samples": {"target_train": len(tsplit.train), "target_valid": len(tsplit.valid), "target_test": len(tsplit.test),
                    **{f"source_{s}_train": len(v) for s, v in src.items()}},
        "target_items": data.domain_items(dc.target),
        "info": {k: v for k, v in data.info.items() if isinstance(v, (int, float, str, list, dict))},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    _save_samples(ddir / "target_train.jsonl", tsplit.train)
    _save_samples(ddir / "target_valid.jsonl", tsplit.valid)
    _save_samples(ddir / "target_test.jsonl", tsplit.test)
    for s, v in src.items():
        _save_samples(ddir / f"source_{s}_train.jsonl", v)
    _write_json(ddir / "train_sequences.json", seqs)
    _write_json(ddir / "stats.json", stats)
    log(f"prepare: {data.summary()}")
    log(f"prepare: samples {stats['samples']} in {stats['seconds']} s")
    return Prepared(dc.target, list(dc.sources), tsplit.train, tsplit.valid, tsplit.test, src, seqs, stats["target_items"], stats)


# ------------------------------------------------------------------------------------------------------------ train
def module_samples(cfg: RunConfig, prep: Prepared) -> dict[str, list[Sample]]:
    """The training set of every module. The target thread runs through every WeaveRec module."""
    mods = {"target": list(prep.target_train)}
    for s in prep.sources:
        mods[f"hybrid-{s}"] = list(prep.target_train) + list(prep.source_train[s])
    if cfg.train_baselines:
        for s in prep.sources:
            mods[f"source-{s}"] = list(prep.source_train[s])
        if len(prep.sources) > 1:  # with one source the pooled data is exactly the hybrid module's data
            mods["pooled"] = list(prep.target_train) + [x for s in prep.sources for x in prep.source_train[s]]
    return mods


def pooled_module(cfg: RunConfig) -> Path:
    """The data-merging module: trained on all domains pooled (the hybrid module itself when there is one source)."""
    name = "pooled" if len(cfg.data.sources) > 1 else f"hybrid-{cfg.data.sources[0]}"
    return cfg.run_dir / "modules" / name


def base_model_dir(cfg: RunConfig) -> Path:
    from recipe_common.llm import resolve_base_model

    return resolve_base_model(cfg.model.base, Path(os.path.expanduser(cfg.model.cache_dir)) if cfg.model.cache_dir else None)


def train(cfg: RunConfig, prep: Prepared, *, only: Sequence[str] | None = None, log: Log = print, progress: bool = True) -> dict[str, Any]:
    """Train every module (or ``only`` these), skipping finished ones. Returns {module: TrainResult}."""
    from .train import train_lora

    base = base_model_dir(cfg)
    tcfg = cfg.train_config()
    results = {}
    for name, samples in module_samples(cfg, prep).items():
        if only and name not in only:
            continue
        out = cfg.run_dir / "modules" / name
        t0 = time.perf_counter()
        res = train_lora(base, samples, out, tcfg, progress=progress)
        results[name] = res
        state = "reused" if res.resumed else f"trained in {time.perf_counter() - t0:.0f} s"
        log(f"train: {name}: {len(samples)} samples, {res.steps} steps, final loss {res.final_loss}, {state}")
    return results


# ------------------------------------------------------------------------------------------------------------ merge
def merge_inputs(spec: MergeSpec, cfg: RunConfig) -> list[Path]:
    kind = "hybrid" if spec.modules == "hybrid" else "source"
    return [cfg.run_dir / "modules" / "target", *[cfg.run_dir / "modules" / f"{kind}-{s}" for s in cfg.data.sources]]


def merge_one(spec: MergeSpec, cfg: RunConfig, *, force: bool = False) -> tuple[Path, dict]:
    """Merge the modules named by ``spec`` with the core library; returns (output dir, merge summary)."""
    inputs = merge_inputs(spec, cfg)
    for p in inputs:
        if not (p / "adapter_model.safetensors").exists():
            raise InputError(f"merge {spec.name!r}: module {p} is not trained yet (run the train stage)")
    adapters = [am.load_adapter(p) for p in inputs]
    method = am.METHODS.get(spec.method)
    if method is None:
        am.merge(adapters, spec.method)  # raises the registry's "did you mean" error
    rank = spec.rank
    if rank == "exact":
        # WeaveRec folds the merged delta into the base weights, so nothing forces a low rank: keep it exact.
        if method.kind == "elementwise":
            rank = "full"
        elif method.kind == "linear":
            rank = sum(max(m.rank for m in a.modules.values()) for a in adapters)
        else:
            rank = None
    weights = spec.weights or [1.0 / len(adapters)] * len(adapters)
    out = cfg.run_dir / "merged" / _slug(spec.name)
    fp = json.dumps({"spec": dataclasses.asdict(spec), "inputs": [a.sha256() for a in adapters], "seed": cfg.seed}, sort_keys=True)
    marker = out / "merge_spec.json"
    if out.exists() and not force and marker.exists() and marker.read_text() == fp:
        return out, _read_json(out / "merge_summary.json") or {}
    merged = am.merge(adapters, spec.method, weights, rank=rank, seed=cfg.seed, **spec.params)
    merged.save(out, force=True)
    marker.write_text(fp)
    summary = {k: v for k, v in merged.summary.items() if k != "modules"}
    _write_json(out / "merge_summary.json", summary)
    return out, summary


def merge(cfg: RunConfig, *, log: Log = print) -> dict[str, Path]:
    outs = {}
    for spec in cfg.merges:
        out, summary = merge_one(spec, cfg)
        outs[spec.name] = out
        log(f"merge: {spec.name}: {spec.method} of {[p.name for p in merge_inputs(spec, cfg)]} -> {out} "
            f"(max rel. truncation error {summary.get('max_rel_error', 0):.2g})")
    return outs


# ------------------------------------------------------------------------------------------------------------ evaluate
def eval_rows(cfg: RunConfig) -> list[dict[str, Any]]:
    """Every model the report compares, in report order."""
    rows: list[dict[str, Any]] = []
    if "base" in cfg.eval.baselines:
        rows.append({"name": "Base model (zero-shot)", "kind": "llm", "adapter": None})
    rows.append({"name": "Target-only LoRA", "kind": "llm", "adapter": cfg.run_dir / "modules" / "target"})
    if cfg.train_baselines:
        rows.append({"name": "Data merging (pooled LoRA)", "kind": "llm", "adapter": pooled_module(cfg)})
    for s in cfg.data.sources if cfg.eval.hybrid_rows and len(cfg.data.sources) > 1 else []:
        rows.append({"name": f"Hybrid LoRA ({cfg.data.target}+{s}) alone", "kind": "llm", "adapter": cfg.run_dir / "modules" / f"hybrid-{s}"})
    for spec in cfg.merges:
        rows.append({"name": spec.name, "kind": "llm", "adapter": cfg.run_dir / "merged" / _slug(spec.name), "merge": spec.name})
    if "sasrec" in cfg.eval.baselines:
        rows.append({"name": "SASRec (non-LLM)", "kind": "sasrec"})
    if "popularity" in cfg.eval.baselines:
        rows.append({"name": "Popularity (non-LLM)", "kind": "popularity"})
    for r in rows:
        r["key"] = _slug(r["name"])
    return rows


def _row_fingerprint(cfg: RunConfig, row: dict) -> str:
    adapter = row.get("adapter")
    sha = ""
    if adapter is not None and (Path(adapter) / "adapter_model.safetensors").exists():
        sha = am.load_adapter(adapter).sha256()
    return json.dumps({"eval": cfg.fingerprint("eval", "data", "seed", "model"), "adapter": sha, "kind": row["kind"]}, sort_keys=True)


def evaluate(cfg: RunConfig, prep: Prepared, *, log: Log = print, progress: bool = True, only: Sequence[str] | None = None) -> dict[str, dict]:
    """Score the test users with every model; per-user results cached in eval/<row>.json."""
    from . import metrics as M

    edir = cfg.run_dir / "eval"
    results = {}
    test = prep.target_test
    for row in eval_rows(cfg):
        if only and row["key"] not in only and row["name"] not in only:
            continue
        path = edir / f"{row['key']}.json"
        fp = _row_fingerprint(cfg, row)
        cached = _read_json(path)
        if cached and cached.get("fingerprint") == fp:
            results[row["name"]] = cached
            log(f"evaluate: {row['name']}: reusing {path}")
            continue
        t0 = time.perf_counter()
        if row["kind"] == "llm":
            scores, extra = _score_llm(cfg, row, test, progress=progress)
        elif row["kind"] == "sasrec":
            scores, extra = _score_sasrec(cfg, prep)
        else:
            from .baselines import popularity_scores

            scores, extra = popularity_scores(prep.train_sequences, test), {}
        if cfg.eval.protocol == "generate" and row["kind"] == "llm":
            per_user = extra.pop("per_user")
        else:
            per_user = M.metrics_from_scores(scores, [s.target_index for s in test])
        res = {
            "fingerprint": fp,
            "name": row["name"],
            "kind": row["kind"],
            "users": [s.user for s in test],
            "full_history_len": [s.full_history_len for s in test],
            "per_user": {k: np.asarray(v).tolist() for k, v in per_user.items()},
            "seconds": round(time.perf_counter() - t0, 2),
            **extra,
        }
        if scores is not None:
            res["scores"] = [np.asarray(s).round(4).tolist() for s in scores]
        _write_json(path, res)
        results[row["name"]] = res
        ndcg = float(np.mean(per_user.get("NDCG@10", per_user.get("NDCG@5", [0]))))
        log(f"evaluate: {row['name']}: NDCG@10 {ndcg:.4f} over {len(test)} users in {res['seconds']} s")
    return results


def _score_llm(cfg: RunConfig, row: dict, test: list[Sample], *, progress: bool):
    import torch

    from . import metrics as M
    from recipe_common.llm import count_parameters, load_for_eval, load_tokenizer
    from .scoring import generate_topk, measure_scoring_latency, score_candidates

    base = base_model_dir(cfg)
    adapter = row["adapter"]
    if adapter is not None and not (Path(adapter) / "adapter_model.safetensors").exists():
        raise InputError(f"evaluate {row['name']!r}: {adapter} does not exist yet (run train/merge first)")
    model = load_for_eval(base, adapter, merge=True, dtype=cfg.model.dtype)
    tok = load_tokenizer(base)
    prompt = cfg.prompt()
    max_len = cfg.train_config().max_seq_len
    extra: dict[str, Any] = {"parameters": count_parameters(model), "threads": torch.get_num_threads()}
    with torch.inference_mode():
        if cfg.eval.protocol == "generate":
            gens = generate_topk(model, tok, test, k=prompt.top_k, prompt=prompt, batch_size=cfg.eval.batch_size,
                                 max_seq_len=max_len, progress=progress)
            extra["per_user"] = M.metrics_from_generations(gens, [prompt.show(s.target_title) for s in test])
            extra["generations"] = gens
            scores = None
        else:
            scores = score_candidates(model, tok, test, prompt=prompt, batch_size=cfg.eval.batch_size,
                                      max_rows=cfg.eval.max_rows, max_seq_len=max_len,
                                      reduction=cfg.eval.reduction, progress=progress)
        if cfg.eval.latency_users and len(test) > cfg.eval.latency_users:
            lat = measure_scoring_latency(model, tok, test[: cfg.eval.latency_users + 1], prompt=prompt, max_seq_len=max_len)
            extra["latency"] = lat.to_dict()
    return scores, extra


def _score_sasrec(cfg: RunConfig, prep: Prepared):
    from .baselines import SASRecConfig, fit_sasrec, score_candidates

    scfg = SASRecConfig.from_dict({"seed": cfg.seed, **cfg.eval.sasrec})
    model = fit_sasrec(prep.train_sequences, prep.target_items, scfg, valid=prep.target_valid)
    return score_candidates(model, prep.target_test), {"config": dataclasses.asdict(scfg)}


# ------------------------------------------------------------------------------------------------------------ run
def run(cfg: RunConfig, *, log: Log = print, progress: bool = True, stop_after: str | None = None) -> dict[str, Any]:
    """Every stage in order; each reuses what is already finished."""
    import torch

    from .report import write_report

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
    merge(cfg, log=log)
    timings["merge"] = time.perf_counter() - t
    t = time.perf_counter()
    results = evaluate(cfg, prep, log=log, progress=progress)
    timings["evaluate"] = time.perf_counter() - t
    t = time.perf_counter()
    report = write_report(cfg, prep, results, trained, log=log)
    timings["report"] = time.perf_counter() - t
    report["timings"] = timings
    return report
