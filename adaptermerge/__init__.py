"""adaptermerge: merge LoRA adapters as adapters — exact, fast, reproducible, without a base model.

    import adaptermerge as am
    merged = am.merge([am.load_adapter("a/"), am.load_adapter("b/")], method="ties", density=0.5, rank=16)
    merged.save("merged/")
    am.ops.ties([t1, t2, t3], weights=[1, 1, 1], density=0.2)   # the operators work on plain tensors too
"""

from ._version import __version__
from . import ops  # noqa: E402
from .adapter import Adapter, LoraModule, load_adapter  # noqa: E402
from .diagnostics import analyze, pairwise_cosine  # noqa: E402
from .engine import MergeLossWarning, MergeRequest, merge, merge_module, merge_to, plan  # noqa: E402
from .errors import (  # noqa: E402
    AdapterMergeError,
    IncompatibleInputsError,
    InputError,
    OutputError,
    ParameterError,
)
from .registry import METHODS, describe as methods  # noqa: E402

__all__ = [
    "__version__",
    "Adapter",
    "LoraModule",
    "load_adapter",
    "merge",
    "merge_to",
    "merge_module",
    "plan",
    "MergeRequest",
    "MergeLossWarning",
    "analyze",
    "pairwise_cosine",
    "ops",
    "METHODS",
    "methods",
    "AdapterMergeError",
    "ParameterError",
    "InputError",
    "IncompatibleInputsError",
    "OutputError",
]
