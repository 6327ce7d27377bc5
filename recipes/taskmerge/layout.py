"""Where a task-merging run keeps its files, and which merges it runs (shared by the pipeline and the report)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import adaptermerge as am
from adaptermerge.errors import InputError, ParameterError

from .config import RunConfig


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


def adapter_names(cfg: RunConfig) -> list[str]:
    return [*cfg.tasks, "multitask"]


def adapter_dir(cfg: RunConfig, name: str) -> Path:
    return cfg.run_dir / "adapters" / name


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


def eval_path(cfg: RunConfig, row: str) -> Path:
    safe = row.replace(":", "__").replace("/", "_")
    return cfg.run_dir / "eval" / f"{safe}.json"
