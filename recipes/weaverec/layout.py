"""The run directory's files, shared by the pipeline and the report (which must not import each other):
JSON helpers, the prepared data, and the list of models a run evaluates."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .config import RunConfig
from .types import Sample


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
    target_valid_hard: list[Sample] = dataclasses.field(default_factory=list)  # popularity-matched negatives
    target_test_hard: list[Sample] = dataclasses.field(default_factory=list)

    def test_set(self, protocol: str) -> list[Sample]:
        """The test samples under a candidate protocol: "uniform" or "hard" negatives."""
        return self.target_test_hard if protocol == "hard" else self.target_test

    def valid_set(self, protocol: str = "uniform") -> list[Sample]:
        return self.target_valid_hard if protocol == "hard" else self.target_valid


def pooled_module(cfg: RunConfig) -> Path:
    """The data-merging module: trained on all domains pooled (the hybrid module itself when there is one source)."""
    name = "pooled" if len(cfg.data.sources) > 1 else f"hybrid-{cfg.data.sources[0]}"
    return cfg.run_dir / "modules" / name


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
    if "popularity-llm" in cfg.eval.baselines:
        rows.append({"name": "Popularity (LLM's training samples)", "kind": "popularity-llm"})
    for r in rows:
        r["key"] = _slug(r["name"])
    return rows
