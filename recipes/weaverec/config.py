"""Declarative WeaveRec run configuration (TOML or YAML), validated before anything runs.

A config names the data (loader, domains, target and sources, split sizes), the base model, the LoRA training
settings, the merges to evaluate and the evaluation protocol. ``recipes/quick.toml``, ``recipes/full.toml`` and
``recipes/paper.toml`` are complete examples. Unknown keys are errors (a typo must not silently fall back to a
default).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from adaptermerge.errors import ParameterError
from recipe_common.config import read_run_file, section_from_dict

from .baselines import SASRecConfig
from .prompts import PromptConfig
from .train import ALL_PROJECTIONS, LoraTrainConfig


@dataclass(frozen=True)
class DataConfig:
    loader: str = "movielens"  # movielens | amazon2014 | table
    variant: str = "ml-1m"  # movielens: ml-1m or ml-100k
    path: str = ""  # amazon2014: folder with reviews_<Cat>_5.json.gz + meta_<Cat>.json.gz; table: the CSV/Parquet
    domains: dict[str, list[str]] = field(default_factory=dict)  # movielens: domain -> genres (order matters)
    target: str = "thriller"
    sources: list[str] = field(default_factory=lambda: ["comedy"])
    user_split: str = "random"
    min_seq_len: int = 5
    history_len: int = 10
    n_candidates: int = 20
    max_train_samples: int | None = 2000  # per domain (the authors cap at 40k per domain)
    max_eval_users: int | None = 500
    noun: str = "movie"
    include_candidates: bool = True  # list the candidates in the prompt (the authors' protocol)
    uninvert_articles: bool = False  # show "Matrix, The (1999)" as "The Matrix (1999)" in prompts and answers
    keep_year: bool = True  # False drops a trailing "(1999)" from the titles the model sees
    corrupt_sources: list[str] = field(default_factory=list)  # sources whose next items are shuffled (harmful control)

    def __post_init__(self) -> None:
        if self.loader not in ("movielens", "amazon2014", "table"):
            raise ParameterError(f"data.loader must be movielens, amazon2014 or table, got {self.loader!r}")
        if not self.sources:
            raise ParameterError("data.sources must name at least one source domain")
        if self.target in self.sources:
            raise ParameterError(f"data.target {self.target!r} is also listed in data.sources")
        if len(set(self.sources)) != len(self.sources):
            raise ParameterError(f"data.sources has duplicates: {self.sources}")
        if self.loader != "movielens" and not self.path:
            raise ParameterError(f"data.path is required for loader {self.loader!r}")
        bad = sorted(set(self.corrupt_sources) - set(self.sources))
        if bad:
            raise ParameterError(f"data.corrupt_sources names {bad}, which are not in data.sources {self.sources}")


@dataclass(frozen=True)
class ModelConfig:
    base: str = "smollm2-135m"  # or a local Hugging Face model directory
    cache_dir: str = ""  # default ~/.cache/adaptermerge/weaverec
    dtype: str = "float32"  # dtype of the frozen base weights for training and evaluation


@dataclass(frozen=True)
class MergeSpec:
    """One merged model to evaluate: which modules, which core operator, its parameters."""

    name: str
    modules: str = "hybrid"  # hybrid: target + hybrid_i (WeaveRec); source: target + source_i (naive merging)
    method: str = "linear"
    weights: list[float] | str | None = None  # default uniform (the authors' released setting); "tuned": validation grid
    params: dict[str, Any] = field(default_factory=dict)
    rank: int | str | None = "exact"  # exact: linear -> rank = sum of ranks, element-wise -> full; or an int

    def __post_init__(self) -> None:
        if self.modules not in ("hybrid", "source"):
            raise ParameterError(f"merge {self.name!r}: modules must be 'hybrid' or 'source', got {self.modules!r}")
        if isinstance(self.weights, str) and self.weights != "tuned":
            raise ParameterError(f"merge {self.name!r}: weights must be a list of numbers or \"tuned\", got {self.weights!r}")

    @property
    def tuned(self) -> bool:
        return self.weights == "tuned"


#: Non-LLM and zero-shot rows: base model, SASRec, popularity (all training sequences), and popularity fitted only
#: on the target-domain samples the LLM is trained on.
BASELINES: tuple[str, ...] = ("base", "sasrec", "popularity", "popularity-llm")


@dataclass(frozen=True)
class EvalConfig:
    protocol: str = "likelihood"  # likelihood (rank candidates by log-likelihood) | generate (authors' top-5)
    reduction: str = "sum"  # likelihood: sum | mean (per token) | pmi (minus the no-history prior) | auto (validation)
    protocols: list[str] = field(default_factory=lambda: ["uniform"])  # candidate sets: uniform and/or hard negatives
    hard_band: int | None = None  # hard negatives: popularity-rank window width (default 4 x (candidates - 1))
    valid_users: int | None = None  # validation users for choosing the reduction and tuned weights (None: all)
    tune_step: float = 0.25  # tuned merge weights: grid step on the simplex
    shared_layers: bool = False  # run the layers below lora.layers once for all models (likelihood, no candidate list)
    batch_size: int = 4
    max_rows: int = 32
    n_boot: int = 1000
    buckets: list[int] = field(default_factory=lambda: [3, 10])
    latency_users: int = 8
    baselines: list[str] = field(default_factory=lambda: ["base", "sasrec", "popularity"])
    sasrec: dict[str, Any] = field(default_factory=dict)
    diagnostics: bool = True
    hybrid_rows: bool = True  # also evaluate each hybrid module alone (is every merged module good on the target?)

    def __post_init__(self) -> None:
        if self.protocol not in ("likelihood", "generate"):
            raise ParameterError(f"eval.protocol must be likelihood or generate, got {self.protocol!r}")
        bad = sorted(set(self.baselines) - set(BASELINES))
        if bad:
            raise ParameterError(f"eval.baselines: unknown {bad}; known: {', '.join(BASELINES)}")
        if self.reduction not in ("sum", "mean", "pmi", "auto"):
            raise ParameterError(f"eval.reduction must be sum, mean, pmi or auto, got {self.reduction!r}")
        bad = [p for p in self.protocols if p not in ("uniform", "hard")]
        if bad or not self.protocols or len(set(self.protocols)) != len(self.protocols):
            raise ParameterError(f"eval.protocols must be distinct names among uniform, hard; got {self.protocols}")
        if self.hard_band is not None and self.hard_band < 1:
            raise ParameterError(f"eval.hard_band must be >= 1, got {self.hard_band}")
        if self.valid_users is not None and self.valid_users < 2:
            raise ParameterError(f"eval.valid_users must be >= 2, got {self.valid_users}")
        steps = 1.0 / self.tune_step if self.tune_step > 0 else 0.5
        if not (0 < self.tune_step <= 1) or abs(steps - round(steps)) > 1e-9:
            raise ParameterError(f"eval.tune_step must be 1/n for a whole n >= 1 (e.g. 0.25), got {self.tune_step}")
        SASRecConfig.from_dict(self.sasrec)


@dataclass(frozen=True)
class RunConfig:
    name: str
    seed: int = 42
    workdir: str = ""  # default runs/<name>, relative to the current directory
    threads: int | None = None  # torch threads (default: leave as is)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: dict[str, Any] = field(default_factory=dict)  # LoraTrainConfig fields
    merges: list[MergeSpec] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train_baselines: bool = True  # the pooled module (data merging row) and, when a merge uses them, source-only modules
    source_path: str = ""

    @property
    def run_dir(self) -> Path:
        return Path(self.workdir) if self.workdir else Path("runs") / self.name

    def prompt(self) -> PromptConfig:
        return PromptConfig(noun=self.data.noun, include_candidates=self.data.include_candidates,
                            uninvert_articles=self.data.uninvert_articles, keep_year=self.data.keep_year)

    def train_config(self) -> LoraTrainConfig:
        values = {"seed": self.seed, **self.lora}
        if "target_modules" in values:
            values["target_modules"] = tuple(values["target_modules"])
        if values.get("layers") is not None:
            values["layers"] = tuple(values["layers"])
        return section_from_dict(LoraTrainConfig, {**values, "prompt": self.prompt()}, "lora")

    def fingerprint(self, *sections: str) -> str:
        """A hash of the named sections, to tell whether cached stage outputs still match the config."""
        blob = json.dumps({s: _plain(getattr(self, s)) for s in sections}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _plain(x: Any) -> Any:
    if hasattr(x, "__dataclass_fields__"):
        return {k: _plain(v) for k, v in asdict(x).items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a run config (.toml, .yaml or .yml)."""
    return config_from_dict(read_run_file(path), where=str(Path(path)))


def config_from_dict(raw: Mapping[str, Any], *, where: str = "config") -> RunConfig:
    raw = dict(raw)
    top = {f.name for f in fields(RunConfig)} - {"source_path"}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ParameterError(f"{where}: unknown keys {unknown}; known: {sorted(top)}")
    if "name" not in raw:
        raise ParameterError(f"{where}: 'name' is required")
    merges = [section_from_dict(MergeSpec, m, f"{where}: merges[{i}]") for i, m in enumerate(raw.pop("merges", []) or [])]
    if not merges:
        merges = [MergeSpec(name="WeaveRec")]
    names = [m.name for m in merges]
    if len(set(names)) != len(names):
        raise ParameterError(f"{where}: merge names must be unique, got {names}")
    cfg = RunConfig(
        **{k: v for k, v in raw.items() if k not in ("data", "model", "eval", "merges")},
        data=section_from_dict(DataConfig, raw.get("data"), f"{where}: data"),
        model=section_from_dict(ModelConfig, raw.get("model"), f"{where}: model"),
        merges=merges,
        eval=section_from_dict(EvalConfig, raw.get("eval"), f"{where}: eval"),
        source_path=where,
    )
    cfg.train_config()  # validates the lora section now, not after the data is prepared
    for m in merges:
        n = 1 + len(cfg.data.sources)
        if isinstance(m.weights, list) and len(m.weights) != n:
            raise ParameterError(f"{where}: merge {m.name!r} has {len(m.weights)} weights for {n} modules")
        if m.tuned and (cfg.eval.protocol != "likelihood" or m.method not in ("linear", "task_arithmetic")):
            raise ParameterError(f"{where}: merge {m.name!r}: tuned weights need eval.protocol likelihood and a linear method")
    if any(m.modules == "source" for m in merges) and not cfg.train_baselines:
        raise ParameterError(f"{where}: a merge of source-only modules needs train_baselines = true")
    return cfg


__all__ = ["ALL_PROJECTIONS", "DataConfig", "EvalConfig", "MergeSpec", "ModelConfig", "RunConfig", "load_config", "config_from_dict"]
