"""The task-merging pipeline: prepare -> train -> merge -> evaluate -> report. Every stage resumes what is finished.

Run directory layout (``cfg.run_dir``)::

    data/splits.json              every task's train / val / test examples
    adapters/<task>/              one LoRA per task (PEFT directory + train_log.json)
    adapters/multitask/           one LoRA on all tasks' training data pooled
    merges/<key>/                 merged adapters written by adaptermerge (+ merge.json: method, params, time)
    eval/<row>.json               per-example exact-match results of one model (cached)
    report/                       report.md, results.json, heatmap.png

Models are evaluated by adding each adapter's delta (``adaptermerge.Adapter.delta``: scale * B @ A, as PEFT folds
it) to the base weights in place, scoring, and restoring the saved weights. When the adapters only touch decoder
layers >= k (``lora.layers``), the hidden states entering layer k are computed once per example and every model
runs only the top layers (:class:`recipe_common.scoring.ExactMatchScorer`); this is exact because the weights below
k never change.

Rows: ``base``; ``single:<task>`` (each adapter on every task: the transfer matrix); ``multitask``;
``merge:<method>:<rank>`` for every registered operator at its defaults and each rank in ``merge.ranks`` ("max":
the largest input rank, the core's default; "sum": the sum of the input ranks, exact for linear operators);
``tuned:<method>`` (weights and density chosen on the validation split from a small grid, at rank "max");
``pair:<a>+<b>`` (pairwise merges for the interference study, scored on tasks a and b only).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

import adaptermerge as am
from adaptermerge.errors import InputError, ParameterError

from .config import RunConfig
from .tasks import SYSTEM, Splits, make_splits

Log = Callable[[str], None]
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary sibling, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------- prepare
def prepare(cfg: RunConfig, *, log: Log = print) -> dict[str, Splits]:
    """Generate every task's splits (deterministic); cached in data/splits.json, which must match on reuse."""
    splits = {
        t: make_splits(t, cfg.seed, cfg.data.n_train, cfg.data.n_val, cfg.data.n_test,
                       min_genre_titles=cfg.data.min_genre_titles)
        for t in cfg.tasks
    }
    path = cfg.run_dir / "data" / "splits.json"
    data = {t: s.to_json() for t, s in splits.items()}
    if path.exists():
        if _read_json(path) != data:
            raise InputError(f"{path} holds other splits than this config generates; use another run_dir")
    else:
        _write_json(path, data)
        log(f"prepare: {len(splits)} tasks, {cfg.data.n_train}/{cfg.data.n_val}/{cfg.data.n_test} "
            f"train/val/test examples each -> {path}")
    return splits


def base_model_dir(cfg: RunConfig) -> Path:
    from recipe_common.llm import resolve_base_model

    cache = Path(os.path.expanduser(cfg.model.cache_dir)) if cfg.model.cache_dir else None
    return resolve_base_model(cfg.model.base, cache)


# ------------------------------------------------------------------------------------------------------------ train
def encode_examples(tokenizer, examples: Sequence):
    """EncodedExamples (loss on the answer + end-of-turn tokens) of task examples, in order."""
    from recipe_common.chat import ChatFormat
    from recipe_common.types import IGNORE_INDEX, EncodedExample

    fmt = ChatFormat(tokenizer)
    out = []
    for e in examples:
        p, a = fmt.prompt_ids(SYSTEM, e.prompt), fmt.answer_ids(e.answer)
        out.append(EncodedExample(tuple(p + a), tuple([IGNORE_INDEX] * len(p) + a), len(p)))
    return out


def _fingerprint(examples: Sequence) -> str:
    import hashlib

    h = hashlib.sha256(SYSTEM.encode())
    for e in examples:
        h.update(json.dumps([e.prompt, e.answer], ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()


def adapter_names(cfg: RunConfig) -> list[str]:
    return [*cfg.tasks, "multitask"]


def adapter_dir(cfg: RunConfig, name: str) -> Path:
    return cfg.run_dir / "adapters" / name


def train(cfg: RunConfig, splits: dict[str, Splits], *, only: Sequence[str] | None = None, log: Log = print,
          progress: bool = True) -> dict[str, Any]:
    """Train one LoRA per task and the multi-task LoRA (skips finished ones)."""
    from recipe_common.train import train_lora_encoded

    base = base_model_dir(cfg)
    results = {}
    for name in adapter_names(cfg):
        if only and name not in only:
            continue
        if name == "multitask":
            examples = [e for t in cfg.tasks for e in splits[t].train]
            tcfg = cfg.multitask_train_config()
        else:
            examples = list(splits[name].train)
            tcfg = cfg.task_train_config(name)
        t0 = time.perf_counter()
        res = train_lora_encoded(
            base, lambda tok, ex=examples: (encode_examples(tok, ex), {}), adapter_dir(cfg, name), tcfg,
            fingerprint=_fingerprint(examples), n_samples=len(examples), cache_prefix=True, progress=progress,
        )
        results[name] = res
        state = "reused" if res.resumed else f"trained in {time.perf_counter() - t0:.0f} s"
        log(f"train: {name}: r={tcfg.r} alpha={tcfg.alpha} rslora={tcfg.use_rslora}, {len(examples)} examples, "
            f"{res.steps} steps, final loss {res.final_loss:.4f}, {state}")
    return results


# ------------------------------------------------------------------------------------------------------------ merge
@dataclass(frozen=True)
class MergeJob:
    """One merge: which adapters, which operator, its weights/parameters and output rank rule."""

    key: str
    inputs: tuple[str, ...]
    method: str
    rank: str  # "max" or "sum"
    weights: tuple[float, ...] | None = None
    params: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> dict:
        return {"inputs": list(self.inputs), "method": self.method, "rank": self.rank,
                "weights": list(self.weights) if self.weights else None, "params": dict(self.params)}


def registered_methods(cfg: RunConfig) -> list[dict]:
    """The operators to evaluate: every registered one (``adaptermerge.methods()``) unless the config lists some."""
    described = am.methods()
    names = [m["name"] for m in described]
    wanted = cfg.merge.methods or names
    missing = [m for m in wanted if m not in names]
    if missing:
        raise ParameterError(f"merge.methods names unregistered operators {missing}; registered: {names}")
    return [m for m in described if m["name"] in wanted and m["name"] not in cfg.merge.exclude]


def _fmt(x: float) -> str:
    return f"{x:g}"


def grid_points(method: dict, cfg: RunConfig) -> list[tuple[tuple[float, ...], tuple[tuple[str, Any], ...]]]:
    """The validation grid of one operator: its defaults, then uniform weights x density (when it has a density).

    An operator whose ``normalize`` flag defaults to true divides the weights away; its grid sets it false, so
    the weight scales the sum (the grid then covers what the weight can do).
    """
    params = {p["name"]: p for p in method["params"]}
    fixed: list[tuple[str, Any]] = []
    if "normalize" in params and params["normalize"]["default"] is True:
        fixed.append(("normalize", False))
    densities = cfg.merge.grid_density if "density" in params else [None]
    n = len(cfg.tasks)
    out: list = [(None, ())]  # the defaults are a grid point too
    for w in cfg.merge.grid_weights:
        for d in densities:
            extra = fixed + ([("density", float(d))] if d is not None else [])
            out.append((tuple([float(w)] * n), tuple(extra)))
    return out


def _method_info(method: str) -> dict:
    """The registry's public description of one operator (``adaptermerge.methods()``)."""
    for m in am.methods():
        if m["name"] == method:
            return m
    raise ParameterError(f"operator {method!r} is not registered")


def _fixed_rank(method: str) -> bool:
    """Operators that take no ``rank`` (their output rank is the sum of the input ranks)."""
    return _method_info(method).get("kind") == "concat"


def merge_jobs(cfg: RunConfig) -> dict[str, list[MergeJob]]:
    """Every merge of the run, by purpose: defaults, grid (validation), pairs."""
    tasks = tuple(cfg.tasks)
    defaults, grid = [], []
    for m in registered_methods(cfg):
        # an exact concatenation fixes its own rank (the sum of the input ranks): one row
        ranks = ["sum"] if _fixed_rank(m["name"]) else cfg.merge.ranks
        for rank in ranks:
            defaults.append(MergeJob(f"{m['name']}@{rank}", tasks, m["name"], rank))
        for weights, params in grid_points(m, cfg):
            if weights is None:
                grid.append(MergeJob(f"grid-{m['name']}-defaults", tasks, m["name"], "max"))
                continue
            tag = f"w{_fmt(weights[0])}" + "".join(f"-{k[0]}{_fmt(v) if not isinstance(v, bool) else int(v)}"
                                                   for k, v in params)
            grid.append(MergeJob(f"grid-{m['name']}-{tag}", tasks, m["name"], "max", weights, params))
    pairs = [MergeJob(f"pair-{a}+{b}", (a, b), cfg.merge.pair_method, "sum") for a, b in combinations(tasks, 2)]
    return {"defaults": defaults, "grid": grid, "pairs": pairs}


def merge_dir(cfg: RunConfig, key: str) -> Path:
    return cfg.run_dir / "merges" / key


def _input_rank(adapter: am.Adapter) -> int:
    return max(m.rank for m in adapter.modules.values())


def run_merge(cfg: RunConfig, job: MergeJob, adapters: dict[str, am.Adapter]) -> dict:
    """Merge with the core library, save the adapter, record the wall time; reuse a finished merge."""
    out = merge_dir(cfg, job.key)
    info_path = out / "merge.json"
    if info_path.exists() and (out / "adapter_model.safetensors").exists():
        info = _read_json(info_path)
        if info.get("job") != job.describe():
            raise InputError(f"{out} holds another merge ({info.get('job')}); remove it or use another run_dir")
        return info
    ads = [adapters[n] for n in job.inputs]
    rank = sum(_input_rank(a) for a in ads) if job.rank == "sum" and not _fixed_rank(job.method) else None
    params = dict(job.params)
    if _method_info(job.method).get("stochastic"):
        params["seed"] = cfg.merge.seed
    t0 = time.perf_counter()
    merged = am.merge(ads, method=job.method, weights=list(job.weights) if job.weights else None, rank=rank, **params)
    seconds = time.perf_counter() - t0
    if out.exists():
        import shutil

        shutil.rmtree(out)  # an unfinished earlier attempt (no merge.json)
    merged.save(out)
    summary = merged.summary or {}
    out_rank = max(m.rank for m in merged.modules.values())
    info = {"job": job.describe(), "seconds": seconds, "output_rank": out_rank, "requested_rank": rank,
            "summary": {k: v for k, v in summary.items() if k not in ("modules",)}}
    _write_json(info_path, info)
    return info


def load_adapters(cfg: RunConfig, names: Sequence[str]) -> dict[str, am.Adapter]:
    out = {}
    for n in names:
        d = adapter_dir(cfg, n)
        if not (d / "adapter_model.safetensors").exists():
            raise InputError(f"adapter {d} is not trained yet (run the train stage)")
        out[n] = am.load_adapter(d)
    return out


def merge(cfg: RunConfig, *, groups: Sequence[str] = ("defaults", "grid", "pairs"), log: Log = print) -> dict:
    """Run every merge of the given groups (skips finished ones). Returns {key: merge info}."""
    adapters = load_adapters(cfg, cfg.tasks)
    jobs = merge_jobs(cfg)
    infos = {}
    t0 = time.perf_counter()
    for g in groups:
        for job in jobs[g]:
            infos[job.key] = run_merge(cfg, job, adapters)
    log(f"merge: {len(infos)} merged adapters ready ({time.perf_counter() - t0:.0f} s)")
    return infos


# --------------------------------------------------------------------------------------------------------- evaluate
def _layer_of(key: str) -> int | None:
    m = _LAYER.search(key)
    return int(m.group(1)) if m else None


@contextmanager
def applied(model, adapter: am.Adapter | None, first_layer: int = 0):
    """Add the adapter's deltas to the model's weights in place; restore the exact original weights on exit."""
    import torch

    saved = {}
    try:
        if adapter is not None:
            with torch.no_grad():
                for name, mod in adapter.modules.items():
                    key = mod.model_key
                    layer = _layer_of(key)
                    if first_layer and (layer is None or layer < first_layer):
                        raise InputError(f"adapter {adapter.name}: module {key} lies below layer {first_layer}, "
                                         "which the cached prefix assumes unchanged")
                    try:
                        weight = model.get_submodule(key).weight
                    except AttributeError:
                        raise InputError(f"adapter {adapter.name}: the model has no module {key}") from None
                    delta = adapter.delta(name)
                    if tuple(delta.shape) != tuple(weight.shape):
                        raise InputError(f"adapter {adapter.name}: delta of {key} is {tuple(delta.shape)}, "
                                         f"the weight {tuple(weight.shape)}")
                    saved[key] = weight.detach().clone()
                    weight.add_(delta.to(weight.dtype))
        yield model
    finally:
        with torch.no_grad():
            for key, w in saved.items():
                model.get_submodule(key).weight.copy_(w)


class Evaluator:
    """The base model and one exact-match scorer per (task, split); scores any adapter on any tasks."""

    def __init__(self, cfg: RunConfig, splits: dict[str, Splits], *, log: Log = print):
        from recipe_common.llm import load_base_model, load_tokenizer
        from recipe_common.scoring import AnswerExample, ExactMatchScorer

        self.cfg = cfg
        base = base_model_dir(cfg)
        self.tokenizer = load_tokenizer(base)
        self.model = load_base_model(base, device="cpu")
        self.first_layer = cfg.first_layer()
        self.scorers: dict[tuple[str, str], Any] = {}
        self._make = lambda examples: ExactMatchScorer(
            [AnswerExample(tuple(e.input_ids[: e.prompt_len]), tuple(e.input_ids[e.prompt_len:]))
             for e in encode_examples(self.tokenizer, examples)],
            pad_id=self.tokenizer.pad_token_id, batch_size=cfg.eval.batch_size,
        )
        self.splits = splits
        self.log = log

    def scorer(self, task: str, split: str):
        key = (task, split)
        if key not in self.scorers:
            s = self._make(getattr(self.splits[task], split))
            s.prepare(self.model, self.first_layer)
            self.scorers[key] = s
        return self.scorers[key]

    def score(self, adapter: am.Adapter | None, tasks: Sequence[str], split: str) -> dict[str, list[int]]:
        with applied(self.model, adapter, self.first_layer):
            return {t: self.scorer(t, split)(self.model).astype(int).tolist() for t in tasks}


def eval_path(cfg: RunConfig, row: str) -> Path:
    safe = row.replace(":", "__").replace("/", "_")
    return cfg.run_dir / "eval" / f"{safe}.json"


def evaluate_row(ev: Evaluator, row: str, adapter_path: Path | None, tasks: Sequence[str], split: str) -> dict:
    """Per-example correctness of one model on ``tasks`` (cached in eval/<row>.json)."""
    path = eval_path(ev.cfg, row)
    if path.exists():
        cached = _read_json(path)
        if cached.get("split") == split and set(cached["correct"]) == set(tasks):
            return cached
    adapter = am.load_adapter(adapter_path) if adapter_path is not None else None
    t0 = time.perf_counter()
    correct = ev.score(adapter, tasks, split)
    seconds = time.perf_counter() - t0
    import torch

    result = {"row": row, "split": split, "adapter": str(adapter_path) if adapter_path else None,
              "correct": correct, "seconds": seconds, "torch_threads": torch.get_num_threads()}
    _write_json(path, result)
    acc = " ".join(f"{t}={np.mean(v):.2f}" for t, v in correct.items())
    ev.log(f"evaluate: {row} [{split}] {acc} ({seconds:.0f} s)")
    return result


def _mean_acc(result: dict) -> float:
    return float(np.mean([np.mean(v) for v in result["correct"].values()]))


def evaluate(cfg: RunConfig, splits: dict[str, Splits], *, log: Log = print) -> dict[str, Any]:
    """Evaluate every row (cached per row); choose the tuned configurations on validation. Returns all results."""
    ev = Evaluator(cfg, splits, log=log)
    tasks = list(cfg.tasks)
    jobs = merge_jobs(cfg)
    rows: dict[str, dict] = {}
    rows["base"] = evaluate_row(ev, "base", None, tasks, "test")
    for name in adapter_names(cfg):
        row = "multitask" if name == "multitask" else f"single:{name}"
        rows[row] = evaluate_row(ev, row, adapter_dir(cfg, name), tasks, "test")
    for job in jobs["defaults"]:
        rows[f"merge:{job.key}"] = evaluate_row(ev, f"merge:{job.key}", merge_dir(cfg, job.key), tasks, "test")
    # validation: individual adapters (each on its own task) and every grid point
    val_single = {t: evaluate_row(ev, f"val-single:{t}", adapter_dir(cfg, t), [t], "val") for t in tasks}
    grid_val = {job.key: evaluate_row(ev, f"val-{job.key}", merge_dir(cfg, job.key), tasks, "val")
                for job in jobs["grid"]}
    tuned = {}
    for method in dict.fromkeys(j.method for j in jobs["grid"]):
        cands = [j for j in jobs["grid"] if j.method == method]
        best = max(cands, key=lambda j: (round(_mean_acc(grid_val[j.key]), 12), -cands.index(j)))
        tuned[method] = {"job": best.key, "weights": best.weights[0] if best.weights else "default",
                         "params": dict(best.params),
                         "val_mean_accuracy": _mean_acc(grid_val[best.key]),
                         "grid": {j.key: _mean_acc(grid_val[j.key]) for j in cands}}
        rows[f"tuned:{method}"] = evaluate_row(ev, f"tuned:{method}", merge_dir(cfg, best.key), tasks, "test")
    pairs = {}
    for job in jobs["pairs"]:
        pairs[job.key] = evaluate_row(ev, f"pair:{job.key}", merge_dir(cfg, job.key), list(job.inputs),
                                      cfg.merge.pair_split)
    pair_single = {}
    if cfg.merge.pair_split == "val":
        pair_single = val_single
    return {"rows": rows, "val_single": val_single, "grid_val": grid_val, "tuned": tuned, "pairs": pairs,
            "pair_single": pair_single}


# -------------------------------------------------------------------------------------------------------- all stages
def run(cfg: RunConfig, *, log: Log = print, progress: bool = True) -> dict:
    """Every stage in order; each resumes what is finished."""
    from .report import write_report

    splits = prepare(cfg, log=log)
    train(cfg, splits, log=log, progress=progress)
    merge(cfg, log=log)
    results = evaluate(cfg, splits, log=log)
    return write_report(cfg, splits, results, log=log)


__all__ = ["Evaluator", "MergeJob", "applied", "evaluate", "merge", "merge_jobs", "prepare", "registered_methods",
           "run", "train"]
