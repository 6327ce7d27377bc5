"""The WeaveRec comparison report: a markdown table, a JSON file and a bar chart.

Every row is a mean over the test users with a 95% percentile-bootstrap interval; WeaveRec is compared with the
target-only LoRA by a paired bootstrap over the same users; metrics are also broken down by the length of the
user's target-domain history (cold start); the inference cost of the merged model is set next to the target-only
model's; and the adapter diagnostics show how the modules relate (the mechanism the paper describes: hybrid modules
agree more with the target module than source-only modules do).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .config import RunConfig
from .layout import Prepared, _read_json, _slug, _write_json, eval_rows

METRICS_LIKELIHOOD = ["HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR"]
METRICS_GENERATE = ["NDCG@1", "NDCG@3", "NDCG@5", "MRR@5"]


def _fmt(s: Mapping[str, float]) -> str:
    return f"{s['mean']:.4f} [{s['low']:.3f}, {s['high']:.3f}]"


def _module_diagnostics(cfg: RunConfig) -> dict[str, Any] | None:
    """How every trained module relates to the target-only module, from the LoRA factors (adaptermerge.analyze):
    cosine of the whole deltas, sign-conflict rate among the top-20% entries (sampled), subspace overlap."""
    from adaptermerge.diagnostics import analyze

    mdir = cfg.run_dir / "modules"
    names = [n for n in ["target", *[f"hybrid-{s}" for s in cfg.data.sources], *[f"source-{s}" for s in cfg.data.sources], "pooled"]
             if (mdir / n / "adapter_model.safetensors").exists()]
    if len(names) < 2 or names[0] != "target":
        return None
    res = analyze([mdir / n for n in names], top_k_fraction=0.2, samples=4096, seed=cfg.seed)
    ov = res["overall"]
    pairs = [tuple(p) for p in res["pairs"]]
    vs_target = {}
    for j, name in enumerate(names[1:], start=1):
        k = pairs.index((0, j))
        conflict = ov["conflict"][k] or {}
        vs_target[name] = {
            "cosine": ov["cosine"][k],
            "sign_conflict_top20": conflict.get("rate"),
            "sign_conflict_se": conflict.get("se"),
            "subspace_overlap_left": ov["subspace_overlap_mean"]["left"][k],
            "subspace_overlap_right": ov["subspace_overlap_mean"]["right"][k],
        }
    return {"modules": names, "cosine": np.round(np.array(res["cosine_matrix"], dtype=float), 4).tolist(), "vs_target": vs_target}


def write_report(cfg: RunConfig, prep: Prepared, results: Mapping[str, dict], trained: Mapping[str, Any] | None = None,
                 *, log: Callable[[str], None] = print) -> dict[str, Any]:
    from . import metrics as M

    rdir = cfg.run_dir / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    names = [r["name"] for r in eval_rows(cfg) if r["name"] in results]
    metric_names = METRICS_GENERATE if cfg.eval.protocol == "generate" else METRICS_LIKELIHOOD
    protocols = list(cfg.eval.protocols)
    by_protocol: dict[str, dict] = {}
    for p in protocols:
        pus = {n: _per_user(results[n], p, protocols[0]) for n in names}
        pus = {n: v for n, v in pus.items() if v is not None}
        summ = {n: {k: st.as_dict() for k, st in M.summarize({k: v for k, v in pu.items() if k in metric_names},
                                                                n_boot=cfg.eval.n_boot, seed=cfg.seed).items()}
                for n, pu in pus.items()}
        by_protocol[p] = {"rows": summ, "paired_differences": _paired(cfg, pus, metric_names),
                          "vs_popularity": _vs_popularity(cfg, pus, {n: results[n].get("kind", "llm") for n in pus})}
    summaries = by_protocol[protocols[0]]["rows"]
    diffs = by_protocol[protocols[0]]["paired_differences"]
    key_metric = "NDCG@10" if "NDCG@10" in metric_names else "NDCG@5"
    buckets: dict[str, dict] = {}
    edges = tuple(cfg.eval.buckets)
    labels = M.bucket_labels(edges)
    lens = np.array([s.full_history_len for s in prep.target_test], dtype=np.int64)
    counts = {lab: int(len(idx)) for lab, idx in M.bucket_users(lens, edges).items()}
    for n in names:
        r = results[n]
        by = M.summarize_by_bucket({key_metric: r["per_user"][key_metric]}, np.array(r["full_history_len"], dtype=np.int64),
                                   edges, n_boot=cfg.eval.n_boot, seed=cfg.seed)
        buckets[n] = {lab: (None if v is None else v[key_metric].as_dict()) for lab, v in by.items()}
    cost = {n: {k: results[n].get(k) for k in ("parameters", "latency", "threads") if k in results[n]} for n in names if results[n]["kind"] == "llm"}
    training = {}
    for mod in sorted((cfg.run_dir / "modules").glob("*/train_log.json")):
        lg = json.loads(mod.read_text())
        training[mod.parent.name] = {k: lg.get(k) for k in ("steps", "seconds", "prefix_seconds", "samples_per_second", "n_samples")}
        training[mod.parent.name]["final_loss"] = (lg.get("losses") or [None])[-1]
    diag = _module_diagnostics(cfg) if cfg.eval.diagnostics else None
    compute = _compute_seconds(cfg, training, [results[n] for n in names])
    report = {
        "config": cfg.name,
        "config_path": cfg.source_path,
        "target": cfg.data.target,
        "sources": cfg.data.sources,
        "protocol": cfg.eval.protocol,
        "n_test_users": len(prep.target_test),
        "data": prep.stats.get("samples"),
        "protocols": protocols,
        "data_note": (f"Corrupted source(s) {', '.join(cfg.data.corrupt_sources)}: next items shuffled among the "
                      "training samples (a deliberately harmful control)." if cfg.data.corrupt_sources else ""),
        "rows": summaries,
        "kinds": {n: results[n].get("kind", "llm") for n in names},
        "paired_differences": diffs,
        "by_protocol": by_protocol,
        "reductions": {n: {k: results[n][k] for k in ("reduction", "valid_ndcg10", "valid_users", "test_ndcg10_by_reduction")
                           if k in results[n]} for n in names if results[n]["kind"] == "llm"},
        "merge_weights": _merge_weights(cfg),
        "cold_start": {"metric": key_metric, "buckets": labels, "users_per_bucket": counts, "rows": buckets},
        "inference_cost": cost,
        "training": training,
        "module_cosine": diag,
        "compute_seconds": round(sum(compute.values()), 1),
        "compute_seconds_by_stage": compute,
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "load_average": _load_average()},
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    _write_json(rdir / "report.json", report)
    chart = _bar_chart(report, key_metric, rdir / "report.png")
    (rdir / "report.md").write_text(_markdown(report, metric_names, key_metric, chart=chart, results_doc=_results_doc(rdir)))
    log(f"report: {rdir / 'report.md'}")
    log("\n" + _table(report, metric_names))
    return report


def _compute_seconds(cfg: RunConfig, training: Mapping[str, dict], results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Recorded seconds by stage: training (optimizer loop + lower-layer states), weight tuning, evaluation (each row's
    own time, plus each shared scoring pass once: a row scored in a pass of ``rows`` rows carries 1/rows of it)."""
    train = sum((t.get("seconds") or 0) + (t.get("prefix_seconds") or 0) for t in training.values())
    tuning = 0.0
    for m in cfg.merges:
        summ = _read_json(cfg.run_dir / "merged" / _slug(m.name) / "merge_summary.json") or {}
        tuning += float((summ.get("tuning") or {}).get("seconds") or 0)
    scoring = sum(float(r.get("seconds", 0)) + float((r.get("shared_pass") or {}).get("seconds", 0))
                  / max(1, int((r.get("shared_pass") or {}).get("rows", 1))) for r in results)
    return {"training": round(train, 1), "tuning": round(tuning, 1), "evaluation": round(scoring, 1)}


def _per_user(res: Mapping[str, Any], protocol: str, first: str) -> dict | None:
    by = res.get("protocols")
    if by is None:  # a result written before candidate protocols existed: uniform negatives only
        return res["per_user"] if protocol == first else None
    return (by.get(protocol) or {}).get("per_user")


PROTOCOL_TITLES = {
    "uniform": "uniform negatives (comparable with the literature)",
    "hard": "popularity-matched negatives (from the true item's popularity band)",
}


def _paired(cfg: RunConfig, pus: Mapping[str, dict], metric_names: list[str]) -> dict[str, dict]:
    """Every WeaveRec-style merge (hybrid modules) against target-only, data merging and naive merging."""
    from . import metrics as M

    diffs: dict[str, dict] = {}
    others = ["Target-only LoRA", "Data merging (pooled LoRA)", *[m.name for m in cfg.merges if m.modules == "source"]]
    for w in [m.name for m in cfg.merges if m.modules == "hybrid" and m.name in pus]:
        for other in others:
            if other in pus:
                a = {k: pus[w][k] for k in metric_names}
                b = {k: pus[other][k] for k in metric_names}
                d = M.paired_difference(a, b, n_boot=cfg.eval.n_boot, seed=cfg.seed)
                diffs[f"{w} - {other}"] = {k: v.as_dict() for k, v in d.items()}
    return diffs


def _merge_weights(cfg: RunConfig) -> dict[str, Any]:
    out = {}
    for m in cfg.merges:
        summ = json.loads(p.read_text()) if (p := cfg.run_dir / "merged" / _slug(m.name) / "merge_summary.json").exists() else {}
        if "weights" in summ:
            t = summ.get("tuning") or {}
            out[m.name] = {"weights": summ["weights"], "tuned": bool(t), "valid_users": t.get("valid_users"),
                           "grid_points": len(t.get("grid", [])) or None}
    return out


def _table(report: dict, metric_names: list[str], rows: Mapping[str, Any] | None = None) -> str:
    head = "| model | " + " | ".join(metric_names) + " |"
    sep = "|---|" + "---|" * len(metric_names)
    lines = [head, sep]
    for n, s in (report["rows"] if rows is None else rows).items():
        lines.append(f"| {n} | " + " | ".join(_fmt(s[m]) for m in metric_names) + " |")
    return "\n".join(lines)


#: Bar colours of report.png, by row name; the legend and the report text use the same groups.
COLOR_GROUPS = (
    ("#c44e52", "WeaveRec (merged target + hybrid modules)"),
    ("#4c72b0", "other LoRA models (target-only, data merging, naive merging, hybrid alone)"),
    ("#8c8c8c", "no LoRA trained (base model zero-shot, non-LLM baselines)"),
)


def _color(name: str) -> str:
    if "WeaveRec" in name:
        return COLOR_GROUPS[0][0]
    if "LoRA" in name or "merging" in name:
        return COLOR_GROUPS[1][0]
    return COLOR_GROUPS[2][0]


def _results_doc(rdir: Path) -> str:
    """Where the full results are described: a relative link when the run lies in a checkout of the project."""
    root = Path(__file__).resolve().parents[2]
    doc = root / "docs" / "weaverec-results.md"
    if doc.is_file() and rdir.resolve().is_relative_to(root):
        return os.path.relpath(doc, rdir.resolve())
    return "docs/weaverec-results.md"


def _doc_link(results_doc: str) -> str:
    if results_doc.startswith(".."):
        return f"[docs/weaverec-results.md]({results_doc})"
    return f"{results_doc} in the adaptermerge source tree"


#: Baselines that every LLM row is compared with, paired, under every candidate protocol.
POPULARITY_KINDS = ("popularity", "popularity-llm")


def _vs_popularity(cfg: RunConfig, pus: Mapping[str, dict], kinds: Mapping[str, str]) -> dict[str, dict]:
    """NDCG@10 (else NDCG@5) of every LLM row minus each popularity baseline's, paired over the same users:
    ``{llm row: {baseline: Difference dict}}``. Under popularity-matched negatives this is the test of whether the
    LLM ranks by more than popularity."""
    from . import metrics as M

    pops = [n for n in pus if kinds.get(n) in POPULARITY_KINDS]
    out: dict[str, dict] = {}
    for n in (n for n in pus if kinds.get(n) == "llm"):
        for b in pops:
            key = "NDCG@10" if "NDCG@10" in pus[n] and "NDCG@10" in pus[b] else "NDCG@5"
            d = M.paired_difference(pus[n][key], pus[b][key], n_boot=cfg.eval.n_boot, seed=cfg.seed)
            out.setdefault(n, {})[b] = {"metric": key, **d.as_dict()}
    return out


def _reading(report: dict, key_metric: str, results_doc: str) -> list[str]:
    """A few generated sentences: what the numbers of this run can and cannot support (under every candidate
    protocol the run reports)."""
    n = report["n_test_users"]
    by = report.get("by_protocol") or {"uniform": {"rows": report["rows"], "paired_differences": report["paired_differences"]}}
    several = len(by) > 1
    first = by[next(iter(by))]["rows"]
    half = [(s[key_metric]["high"] - s[key_metric]["low"]) / 2 for s in first.values() if key_metric in s]
    width = float(np.mean(half)) if half else float("nan")
    out = ["## Reading", ""]
    out.append(f"* {n} test users: a row's 95% interval on {key_metric} is about ±{width:.3f} wide, so two rows whose "
               f"means differ by less than that are not told apart by their intervals; the paired comparisons below "
               f"(same users) are the sharper test.")
    n_comparisons = 0
    for p, section in by.items():
        where = f" ({p} negatives)" if several else ""
        for name, d in section["paired_differences"].items():
            m = d.get(key_metric)
            if not m:
                continue
            n_comparisons += 1
            sig = m["p_value"] < 0.05 and (m["low"] > 0 or m["high"] < 0)
            verdict = "significant at the 5% level" if sig else "not significant at this number of users"
            out.append(f"* {name}{where}: {m['mean']:+.3f} {key_metric} [{m['low']:+.3f}, {m['high']:+.3f}], "
                       f"p = {m['p_value']:.2f}: {verdict}.")
    if n_comparisons > 1:
        out.append(f"* Each p-value is for one comparison on its own ({n_comparisons} are made, "
                   "uncorrected): one p just under 0.05 among them is weak evidence.")
    small = n < 100 or width > 0.05
    if small:
        out.append(f"* A run this small shows that the pipeline works end to end (data, training, merging, scoring, "
                   f"report) and gives rough magnitudes; it cannot rank the methods. The full experiment and what it "
                   f"shows: {_doc_link(results_doc)}.")
    else:
        out.append(f"* The project's recorded runs and how to read them: {_doc_link(results_doc)}.")
    for p, section in by.items():
        rows = section["rows"]
        where = f" under {p} negatives" if several else ""
        anchors = [k for k, r in report.get("kinds", {}).items() if r != "llm" and k in rows]
        llm = [k for k, r in report.get("kinds", {}).items() if r == "llm" and k in rows]
        if anchors and llm:
            best_llm = max(llm, key=lambda k: rows[k][key_metric]["mean"])
            best_anchor = max(anchors, key=lambda k: rows[k][key_metric]["mean"])
            vs = section.get("vs_popularity") or {}
            pops = list(dict.fromkeys(b for d in vs.values() for b in d))
            for b in pops:
                above = [n for n in llm if b in vs.get(n, {}) and vs[n][b]["low"] > 0]
                below = [n for n in llm if b in vs.get(n, {}) and vs[n][b]["high"] < 0]
                out.append(f"* Against {b}{where}: {len(above)} of {len(llm)} LLM rows are above it and {len(below)} "
                           "below it by a paired 95% interval that excludes 0 (the rest are not told apart).")
            if rows[best_anchor][key_metric]["mean"] > rows[best_llm][key_metric]["mean"]:
                out.append(f"* The best non-LLM baseline{where} ({best_anchor}, {rows[best_anchor][key_metric]['mean']:.3f}) "
                           f"is above every LLM row (best: {best_llm}, {rows[best_llm][key_metric]['mean']:.3f}): the "
                           "comparison between the LLM rows is the experiment, the baselines say where absolute quality "
                           "stands.")
    return out + [""]


def _markdown(report: dict, metric_names: list[str], key_metric: str, *, chart: bool = False,
              results_doc: str = "docs/weaverec-results.md") -> str:
    out = [f"# WeaveRec report: {report['config']}", ""]
    out.append(f"Target domain **{report['target']}**, source domains {', '.join(report['sources'])}; "
               f"{report['n_test_users']} test users; protocol `{report['protocol']}`; "
               f"mean over users with 95% bootstrap intervals.")
    out.append(f"Training samples: {report['data']}.")
    if report.get("data_note"):
        out.append(report["data_note"])
    out += [""] + _reading(report, key_metric, results_doc)
    by = report.get("by_protocol") or {"uniform": {"rows": report["rows"], "paired_differences": report["paired_differences"]}}
    if chart:
        legend = "; ".join(f"{'red' if c == '#c44e52' else 'blue' if c == '#4c72b0' else 'grey'}: {what}" for c, what in COLOR_GROUPS)
        first = next(iter(by))
        out += [f"![{key_metric} by model](report.png)", "",
                f"{key_metric} per model with its 95% interval (report.png), {PROTOCOL_TITLES.get(first, first)}. "
                f"Bar colours: {legend}.", ""]
    for p, section in by.items():
        out += [f"## All metrics, candidates: {PROTOCOL_TITLES.get(p, p)}", "", _table(report, metric_names, section["rows"]), ""]
        if len(report["sources"]) == 1:
            out += ["With one source domain the pooled (data merging) module is the hybrid module itself: same data.", ""]
        if section["paired_differences"]:
            out += [f"Paired differences, {p} negatives (same users, paired bootstrap):", "",
                    "| comparison | " + " | ".join(metric_names) + " |", "|---|" + "---|" * len(metric_names)]
            for name, d in section["paired_differences"].items():
                out.append(f"| {name} | " + " | ".join(f"{d[m]['mean']:+.4f} [{d[m]['low']:+.3f}, {d[m]['high']:+.3f}] p={d[m]['p_value']:.3f}" for m in metric_names) + " |")
            out.append("")
        vs = section.get("vs_popularity") or {}
        pops = list(dict.fromkeys(b for d in vs.values() for b in d))
        if pops:
            out += [f"LLM rows minus the popularity baselines, {p} negatives (same users, paired bootstrap):", "",
                    "| LLM row | " + " | ".join(f"- {b}" for b in pops) + " |", "|---|" + "---|" * len(pops)]
            for n, d in vs.items():
                out.append(f"| {n} | " + " | ".join(
                    "-" if b not in d else f"{d[b]['mean']:+.4f} [{d[b]['low']:+.3f}, {d[b]['high']:+.3f}] p={d[b]['p_value']:.3f} ({d[b]['metric']})"
                    for b in pops) + " |")
            out.append("")
    red = {n: r for n, r in (report.get("reductions") or {}).items() if r}
    if red:
        out += ["## Score reduction (chosen per model on the validation users, never on test)", "",
                "Sum: log-likelihood of the title; mean: per title token; PMI: minus the same title's log-likelihood "
                "without any history.", "",
                "| model | reduction | validation NDCG@10 (sum / mean / PMI) | test NDCG@10 by reduction, for information |",
                "|---|---|---|---|"]
        f3 = lambda d: " / ".join("-" if d.get(k) is None else f"{d[k]:.4f}" for k in ("sum", "mean", "pmi"))  # noqa: E731
        for n, r in red.items():
            test = "; ".join(f"{p}: {f3(v)}" for p, v in (r.get("test_ndcg10_by_reduction") or {}).items())
            out.append(f"| {n} | {r.get('reduction', '-')} | {f3(r.get('valid_ndcg10') or {})} | {test} |")
        out.append("")
    if report.get("merge_weights"):
        out += ["## Merge weights (target-only module first)", "", "| merge | weights | chosen on |", "|---|---|---|"]
        for n, w in report["merge_weights"].items():
            how = f"validation NDCG@10, {w['valid_users']} users, {w['grid_points']} grid points" if w["tuned"] else "fixed"
            out.append(f"| {n} | {', '.join(f'{x:.3f}' for x in w['weights'])} | {how} |")
        out.append("")
    cs = report["cold_start"]
    shown = [b for b in cs["buckets"] if cs["users_per_bucket"].get(b, 0) > 0]
    empty = [b for b in cs["buckets"] if b not in shown]
    out += [f"## Cold start: {cs['metric']} by the user's target-domain history length", "",
            "| model | " + " | ".join(f"{b} items ({cs['users_per_bucket'][b]} users)" for b in shown) + " |",
            "|---|" + "---|" * len(shown)]
    for n, row in cs["rows"].items():
        out.append(f"| {n} | " + " | ".join("-" if row[b] is None else _fmt(row[b]) for b in shown) + " |")
    if empty:
        out += ["", f"Buckets without any test user are left out: {', '.join(b + ' items' for b in empty)}."]
    out.append("")
    if report["inference_cost"]:
        out += ["## Inference cost (adapter folded into the base weights)", "", "| model | parameters | scoring latency per user (median ms) | threads |", "|---|---|---|---|"]
        for n, c in report["inference_cost"].items():
            lat = c.get("latency") or {}
            out.append(f"| {n} | {c.get('parameters', '-'):,} | {lat.get('median_ms', float('nan')):.0f} | {c.get('threads', '-')} |")
        out.append("")
    if report["module_cosine"]:
        d = report["module_cosine"]
        f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        out += ["## How the modules relate to the target-only module (adaptermerge diagnostics, from the LoRA factors)", "",
                "Does weaving the target data through every module make the modules agree with the target module "
                "(higher cosine, fewer sign conflicts) more than source-only modules do?", "",
                "| module | cosine with target | sign conflicts, top-20% entries | subspace overlap (left / right) |", "|---|---|---|---|"]
        for name, v in d["vs_target"].items():
            out.append(f"| {name} | {f(v['cosine'])} | {f(v['sign_conflict_top20'])} ± {f(v['sign_conflict_se'])} | "
                       f"{f(v['subspace_overlap_left'])} / {f(v['subspace_overlap_right'])} |")
        out += ["", "Cosine similarity of the whole deltas:", "", "| | " + " | ".join(d["modules"]) + " |", "|---|" + "---|" * len(d["modules"])]
        for name, row in zip(d["modules"], d["cosine"]):
            out.append(f"| {name} | " + " | ".join(f(x) for x in row) + " |")
        out.append("")
    if report["training"]:
        out += ["## Training", "", "| module | samples | steps | final loss | seconds (steps) | seconds (lower-layer states) |",
                "|---|---|---|---|---|---|"]
        for n, t in report["training"].items():
            fl = t.get("final_loss")
            pre = "-" if t.get("prefix_seconds") is None else f"{t['prefix_seconds']:.0f}"
            out.append(f"| {n} | {t.get('n_samples')} | {t.get('steps')} | {fl if fl is None else f'{fl:.3f}'} | "
                       f"{t.get('seconds') or 0:.0f} | {pre} |")
        out.append("")
        if any(t.get("prefix_seconds") is not None for t in report["training"].values()):
            out += ["Lower-layer states: the frozen layers below the adapted ones, computed once per sample and shared "
                    "by the modules of the run (a module lists only the states it computed first).", ""]
    load = (report.get("machine") or {}).get("load_average")
    where = (f" The machine's load average was {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min, "
             f"{report['machine'].get('cpus')} CPUs) when the report was written: the times above grow with it."
             if load else "")
    stages = report.get("compute_seconds_by_stage") or {}
    parts = f" ({', '.join(f'{k} {v:.0f} s' for k, v in stages.items())})" if stages else ""
    out.append(f"Compute time recorded for training, weight tuning and evaluation: {report['compute_seconds']:.0f} s"
               f"{parts}; data preparation, merging and writing this report are not "
               f"counted.{where}")
    return "\n".join(out) + "\n"


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):  # not on every platform
        return None


def _bar_chart(report: dict, metric: str, path: Path) -> bool:
    """Write the bar chart (True), or nothing when matplotlib is missing (False)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return False
    names = list(report["rows"])
    means = [report["rows"][n][metric]["mean"] for n in names]
    lo = [m - report["rows"][n][metric]["low"] for n, m in zip(names, means)]
    hi = [report["rows"][n][metric]["high"] - m for n, m in zip(names, means)]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.9), layout="constrained")
    colors = [_color(n) for n in names]
    ax.barh(range(len(names)), means, xerr=[lo, hi], color=colors, capsize=3)
    fig.legend(handles=[Patch(color=c, label=what) for c, what in COLOR_GROUPS if c in colors],
               loc="outside lower center", fontsize="small", frameon=False)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} (95% bootstrap CI), {report['n_test_users']} test users")
    ax.set_title(f"{report['config']}: target {report['target']}, sources {', '.join(report['sources'])}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
