"""The task-merging report: report.md, results.json and heatmap.png under ``<run_dir>/report/``.

Statistics
    accuracy     exact-match rate on a task's test split; a row's *mean accuracy* averages the tasks.
    normalized   per task, the row's accuracy divided by the individual adapter's (that task's own LoRA) on the same
                 test examples, then averaged over the tasks where the individual adapter reaches
                 ``eval.min_individual`` (a ratio to an adapter that learned almost nothing is noise).
    intervals    95% percentile bootstrap over examples: each task's test examples are resampled with replacement
                 (the same indices for the row and the individual adapter, so the ratio is paired), ``eval.n_boot``
                 times, seeded.
    interference for a pairwise merge of adapters a and b, 1 - mean(normalized accuracy on a, on b): the accuracy
                 the pair loses against the two adapters alone.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np

import adaptermerge as am

from .config import RunConfig
from .layout import _read_json, _write_json, adapter_dir, merge_dir, merge_jobs
from .tasks import Splits, majority_rate

Log = Callable[[str], None]


def _acc(v: Sequence[int]) -> float:
    return float(np.mean(v)) if len(v) else float("nan")


def bootstrap_row(correct: Mapping[str, Sequence[int]], individual: Mapping[str, Sequence[int]],
                  tasks: Sequence[str], n_boot: int, seed: int, ci: float = 0.95,
                  min_individual: float = 0.0) -> dict[str, Any]:
    """Mean and normalized accuracy of one row with paired percentile-bootstrap intervals (see module docstring)."""
    rng = np.random.default_rng(seed)
    c = {t: np.asarray(correct[t], dtype=float) for t in tasks}
    ind = {t: np.asarray(individual[t], dtype=float) for t in tasks}
    acc = np.array([c[t].mean() for t in tasks])
    ind_acc = np.array([ind[t].mean() for t in tasks])
    usable = (ind_acc > 0) & (ind_acc >= min_individual)
    norm_t = np.where(usable, acc / np.where(usable, ind_acc, 1.0), np.nan)
    boots_mean = np.empty(n_boot)
    boots_norm = np.empty(n_boot)
    for b in range(n_boot):
        a_b, r_b = [], []
        for t in tasks:
            idx = rng.integers(0, len(c[t]), len(c[t]))
            x, y = c[t][idx].mean(), ind[t][idx].mean()
            a_b.append(x)
            r_b.append(x / y if y > 0 else np.nan)
        boots_mean[b] = np.mean(a_b)
        r = np.asarray(r_b)[usable]
        boots_norm[b] = np.nanmean(r) if r.size and not np.all(np.isnan(r)) else np.nan
    lo, hi = (1 - ci) / 2 * 100, (1 + ci) / 2 * 100
    finite = boots_norm[np.isfinite(boots_norm)]
    return {
        "accuracy": dict(zip(tasks, acc.tolist())),
        "normalized": dict(zip(tasks, [None if np.isnan(x) else float(x) for x in norm_t])),
        "mean_accuracy": float(acc.mean()),
        "mean_accuracy_ci": [float(np.percentile(boots_mean, lo)), float(np.percentile(boots_mean, hi))],
        "normalized_accuracy": float(np.nanmean(norm_t)) if usable.any() else None,
        "normalized_accuracy_ci": ([float(np.percentile(finite, lo)), float(np.percentile(finite, hi))]
                                   if finite.size else None),
    }


def _correlations(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": int(x.size), "pearson": None, "pearson_p": None, "spearman": None, "spearman_p": None}
    pr = stats.pearsonr(x, y)
    sr = stats.spearmanr(x, y)
    return {"n": int(x.size), "pearson": float(pr.statistic), "pearson_p": float(pr.pvalue),
            "spearman": float(sr.statistic), "spearman_p": float(sr.pvalue)}


def _conflict_rate(entry: Any) -> float:
    if entry is None:
        return float("nan")
    if isinstance(entry, Mapping):
        for k in ("rate", "value", "conflict"):
            if k in entry and entry[k] is not None:
                return float(entry[k])
        return float("nan")
    return float(entry)


def interference_study(cfg: RunConfig, results: dict, individual_split: dict[str, Sequence[int]] | None) -> dict:
    """Diagnostics of every adapter pair (``adaptermerge.analyze``) next to the accuracy their merge loses."""
    tasks = list(cfg.tasks)
    analysis = am.analyze([adapter_dir(cfg, t) for t in tasks], seed=cfg.merge.seed)
    overall = analysis["overall"]
    pairs = [tuple(p) for p in analysis["pairs"]]
    rows = []
    for k, (i, j) in enumerate(pairs):
        a, b = tasks[i], tasks[j]
        key = f"pair-{a}+{b}"
        res = results["pairs"].get(key)
        if res is None:
            continue
        ind = individual_split or {}
        norm = []
        for t in (a, b):
            denom = _acc(ind[t]) if t in ind else float("nan")
            ok = denom > 0 and denom >= cfg.eval.min_individual
            norm.append(_acc(res["correct"][t]) / denom if ok else float("nan"))
        rows.append({
            "a": a, "b": b,
            "cosine": overall["cosine"][k],
            "sign_conflict": _conflict_rate(overall["conflict"][k]),
            "normalized_a": norm[0], "normalized_b": norm[1],
            "interference": 1.0 - float(np.nanmean(norm)) if not np.all(np.isnan(norm)) else float("nan"),
        })
    inter = [r["interference"] for r in rows]
    return {
        "method": cfg.merge.pair_method, "split": cfg.merge.pair_split, "pairs": rows,
        "vs_sign_conflict": _correlations([r["sign_conflict"] for r in rows], inter),
        "vs_cosine": _correlations([r["cosine"] if r["cosine"] is not None else np.nan for r in rows], inter),
        "vs_abs_cosine": _correlations([abs(r["cosine"]) if r["cosine"] is not None else np.nan for r in rows], inter),
        "analyze_overall": {k: overall[k] for k in ("cosine", "conflict", "energy_ratio") if k in overall},
    }


def _heatmap(path: Path, tasks: Sequence[str], labels: Sequence[str], values: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.1 * len(tasks) + 3.5, 0.32 * len(labels) + 1.6))
    im = ax.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=1.2, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="normalized accuracy (merged / individual)")
    ax.set_title("Normalized accuracy per task (test split)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _ci(x: list[float] | None) -> str:
    return f"[{x[0]:.3f}, {x[1]:.3f}]" if x else "-"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, fmt)


def write_report(cfg: RunConfig, splits: dict[str, Splits], results: dict, *, log: Log = print) -> dict:
    """Write report.md, results.json and heatmap.png; return the JSON data."""
    tasks = list(cfg.tasks)
    rows = results["rows"]
    individual = {t: rows[f"single:{t}"]["correct"][t] for t in tasks}
    jobs = merge_jobs(cfg)
    merge_info = {j.key: _read_json(merge_dir(cfg, j.key) / "merge.json") for g in jobs.values() for j in g}
    train_logs = {n: _read_json(adapter_dir(cfg, n) / "train_log.json") for n in [*tasks, "multitask"]}

    table = []
    seed = cfg.seed
    order = ["base", *[f"single:{t}" for t in tasks], "multitask",
             *[f"merge:{j.key}" for j in jobs["defaults"]], *[k for k in rows if k.startswith("tuned:")]]
    for k, name in enumerate(order):
        stats = bootstrap_row(rows[name]["correct"], individual, tasks, cfg.eval.n_boot, seed + k, cfg.eval.ci,
                              cfg.eval.min_individual)
        rec: dict[str, Any] = {"row": name, **stats, "eval_seconds": rows[name].get("seconds")}
        if name.startswith("merge:"):
            info = merge_info[name.removeprefix("merge:")]
            rec.update(method=info["job"]["method"], rank_rule=info["job"]["rank"], output_rank=info["output_rank"],
                       merge_seconds=info["seconds"])
        elif name.startswith("tuned:"):
            method = name.removeprefix("tuned:")
            t = results["tuned"][method]
            info = merge_info[t["job"]]
            rec.update(method=method, rank_rule="max", output_rank=info["output_rank"], merge_seconds=info["seconds"],
                       chosen={"weight": t["weights"], **t["params"]}, val_mean_accuracy=t["val_mean_accuracy"])
        table.append(rec)
    by_row = {r["row"]: r for r in table}
    individual_rec = {
        "row": "individual (each task's own adapter)",
        "accuracy": {t: _acc(individual[t]) for t in tasks},
        "mean_accuracy": float(np.mean([_acc(individual[t]) for t in tasks])),
    }
    pair_ind = results.get("pair_single") or {}
    pair_ind = {t: v["correct"][t] for t, v in pair_ind.items()} if pair_ind else individual
    study = interference_study(cfg, results, pair_ind)
    task_info = {
        t: {"n_train": len(splits[t].train), "n_val": len(splits[t].val), "n_test": len(splits[t].test),
            "majority_baseline": majority_rate(splits[t].train, splits[t].test),
            "example": [splits[t].test[0].prompt, splits[t].test[0].answer],
            "adapter": {k: train_logs[t]["config"][k] for k in ("r", "alpha", "use_rslora")},
            "train_steps": train_logs[t]["steps"], "train_seconds": train_logs[t]["seconds"],
            "final_loss": train_logs[t]["losses"][-1]}
        for t in tasks
    }
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    threads = {
        "train": sorted({v.get("torch_threads") for v in train_logs.values()} - {None}),
        "evaluate": sorted({r.get("torch_threads") for r in rows.values()} - {None}),
    }
    data = {
        "name": cfg.name, "config": cfg.to_json(), "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_at_report": load,
                    "torch_threads": threads},
        "tasks": task_info, "individual": individual_rec, "rows": table,
        "multitask_adapter": {k: train_logs["multitask"]["config"][k] for k in ("r", "alpha", "use_rslora", "max_steps")},
        "tuned": results["tuned"], "interference": study,
        "train_seconds_total": float(sum(v["seconds"] for v in train_logs.values())),
        "eval_seconds_total": float(sum(float(r.get("seconds") or 0) for r in
                                        [*rows.values(), *results["grid_val"].values(), *results["pairs"].values(),
                                         *results["val_single"].values()])),
        "merge_seconds_total": float(sum(i["seconds"] for i in merge_info.values())),
    }
    out = cfg.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "results.json", data)
    heat_rows = [r for r in table if r["row"] == "multitask" or r["row"].startswith(("merge:", "tuned:"))]
    values = np.array([[np.nan if r["normalized"][t] is None else r["normalized"][t] for t in tasks]
                       for r in heat_rows])
    _heatmap(out / "heatmap.png", tasks, [_label(r["row"]) for r in heat_rows], values)
    (out / "report.md").write_text(render_markdown(cfg, data, by_row), encoding="utf-8")
    log(f"report: {out / 'report.md'}")
    return data


def _label(row: str) -> str:
    if row.startswith("merge:"):
        m, r = row.removeprefix("merge:").split("@")
        return f"{m} (rank {r})"
    if row.startswith("tuned:"):
        return f"{row.removeprefix('tuned:')} (tuned on val)"
    return row


def render_markdown(cfg: RunConfig, data: dict, by_row: dict) -> str:
    tasks = list(cfg.tasks)
    L: list[str] = []
    L.append(f"# Task merging: `{cfg.name}`\n")
    th = data["machine"]["torch_threads"]
    load = data["machine"]["loadavg_at_report"]
    L.append(f"Config `{cfg.source}`; created {data['created']}; {data['machine']['cpus']} CPUs, torch threads "
             f"{th['train'] or '?'} (training) / {th['evaluate'] or 'not recorded'} (evaluation), load average at "
             f"report time {' '.join(f'{x:.1f}' for x in load) if load else '?'}. "
             f"Training {data['train_seconds_total']:.0f} s, merging {data['merge_seconds_total']:.1f} s, "
             f"evaluation {data['eval_seconds_total']:.0f} s in total.\n")
    used = [t for t in tasks if data["individual"]["accuracy"][t] >= max(cfg.eval.min_individual, 1e-12)]
    L.append("Exact-match accuracy of greedy decoding (teacher-forced argmax, equivalent), test split. Normalized = "
             "merged / individual per task, averaged over the tasks whose own adapter reaches "
             f"{cfg.eval.min_individual:g} ({', '.join(used) or 'none'}). Brackets: 95% bootstrap intervals over test "
             "examples. Tuned rows: weights/density chosen on the validation split only.\n")
    L.append("## Tasks\n")
    L.append("| task | example | train/val/test | adapter r / alpha / rsLoRA | steps | final loss | majority baseline |")
    L.append("|---|---|---|---|---|---|---|")
    for t, i in data["tasks"].items():
        a = i["adapter"]
        L.append(f"| {t} | `{i['example'][0]}` -> `{i['example'][1]}` | {i['n_train']}/{i['n_val']}/{i['n_test']} | "
                 f"{a['r']} / {a['alpha']:g} / {'yes' if a['use_rslora'] else 'no'} | {i['train_steps']} | "
                 f"{i['final_loss']:.3f} | {i['majority_baseline']:.3f} |")
    mt = data["multitask_adapter"]
    L.append(f"\nMulti-task adapter: r {mt['r']}, alpha {mt['alpha']:g}, {mt['max_steps']} steps on all tasks pooled.\n")
    L.append("## Transfer matrix (accuracy of each adapter on each task)\n")
    L.append("| adapter | " + " | ".join(tasks) + " | mean |")
    L.append("|---|" + "---|" * (len(tasks) + 1))
    for name in ["base", *[f"single:{t}" for t in tasks], "multitask"]:
        r = by_row[name]
        cells = [f"**{r['accuracy'][t]:.3f}**" if name == f"single:{t}" else f"{r['accuracy'][t]:.3f}" for t in tasks]
        L.append(f"| {name} | " + " | ".join(cells) + f" | {r['mean_accuracy']:.3f} |")
    L.append("\n## Merges\n")
    L.append("| row | output rank | merge s | mean accuracy | normalized accuracy | " + " | ".join(tasks) + " |")
    L.append("|---|---|---|---|---|" + "---|" * len(tasks))
    ind = data["individual"]
    L.append(f"| individual adapters | - | - | {ind['mean_accuracy']:.3f} | 1.000 | "
             + " | ".join(f"{ind['accuracy'][t]:.3f}" for t in tasks) + " |")
    for r in data["rows"]:
        if not (r["row"] == "multitask" or r["row"] == "base" or r["row"].startswith(("merge:", "tuned:"))):
            continue
        label = _label(r["row"])
        if r["row"].startswith("tuned:"):
            ch = r["chosen"]
            label += " " + ", ".join(f"{k}={v}" for k, v in ch.items())
        L.append(f"| {label} | {r.get('output_rank', '-')} | {_num(r.get('merge_seconds'), '.2f')} | "
                 f"{r['mean_accuracy']:.3f} {_ci(r['mean_accuracy_ci'])} | {_num(r['normalized_accuracy'])} "
                 f"{_ci(r['normalized_accuracy_ci'])} | " + " | ".join(f"{r['accuracy'][t]:.3f}" for t in tasks) + " |")
    L.append("\n![normalized accuracy](heatmap.png)\n")
    L.append("## Validation grid (mean validation accuracy per point; the best is the tuned row)\n")
    for m, t in data["tuned"].items():
        pts = ", ".join(f"{k.split(m + '-', 1)[-1]}: {v:.3f}" for k, v in t["grid"].items())
        L.append(f"- {m}: {pts}")
    st = data["interference"]
    L.append("\n## Interference: diagnostics vs accuracy lost by pairwise merges\n")
    L.append(f"Pairs merged with `{st['method']}` at rank = sum of ranks (exact sum of the two deltas), scored on "
             f"the two tasks' {st['split']} split; interference = 1 - mean normalized accuracy of the pair. "
             "Cosine and sign-conflict rate (among the top 20% magnitudes) from `adaptermerge.analyze`, over all "
             "modules.\n")
    L.append("| pair | cosine | sign conflict | normalized a | normalized b | interference |")
    L.append("|---|---|---|---|---|---|")
    for p in st["pairs"]:
        L.append(f"| {p['a']} + {p['b']} | {_num(p['cosine'], '.4f')} | {_num(p['sign_conflict'])} | "
                 f"{_num(p['normalized_a'])} | {_num(p['normalized_b'])} | {_num(p['interference'])} |")
    for key, what in (("vs_sign_conflict", "sign-conflict rate"), ("vs_cosine", "cosine"),
                      ("vs_abs_cosine", "|cosine|")):
        c = st[key]
        L.append(f"\nInterference vs {what}: Pearson {_num(c['pearson'])} (p {_num(c['pearson_p'])}), "
                 f"Spearman {_num(c['spearman'])} (p {_num(c['spearman_p'])}), n = {c['n']} pairs.")
    L.append("")
    return "\n".join(L)


__all__ = ["bootstrap_row", "interference_study", "render_markdown", "write_report"]
