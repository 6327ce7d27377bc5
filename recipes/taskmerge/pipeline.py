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
the largest input rank; "sum": the sum of the input ranks, exact for the linear operators; operators that fix their
own rank, like ``cat``, get one row);
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
from pathlib import Path
from typing import Any

import numpy as np

import adaptermerge as am
from adaptermerge.errors import InputError

from .config import RunConfig
from .layout import (
    MergeJob,
    _fixed_rank,
    _method_info,
    _read_json,
    _write_json,
    adapter_dir,
    adapter_names,
    eval_path,
    merge_dir,
    merge_jobs,
    registered_methods,
)
from .tasks import SYSTEM, Splits, make_splits

Log = Callable[[str], None]
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


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
    if _fixed_rank(job.method):
        rank = None  # the operator fixes its own rank
    elif job.rank == "sum":
        rank = sum(_input_rank(a) for a in ads)
    else:
        rank = max(_input_rank(a) for a in ads)
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
