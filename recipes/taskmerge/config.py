"""Declarative task-merging run configuration (TOML), validated before anything runs.

``recipes/taskmerge-quick.toml`` and ``recipes/taskmerge-full.toml`` are complete examples. Unknown keys are errors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from adaptermerge.errors import ParameterError
from recipe_common import train as _common
from recipe_common.config import read_run_file, section_from_dict

from .tasks import TASK_NAMES


@dataclass(frozen=True)
class TaskLoraConfig(_common.LoraTrainConfig):
    """The shared LoRA training settings plus rsLoRA (scale alpha / sqrt(r) instead of alpha / r)."""

    use_rslora: bool = False

    def peft_options(self) -> dict:
        return {"use_rslora": bool(self.use_rslora)}


@dataclass(frozen=True)
class DataConfig:
    n_train: int = 400
    n_val: int = 60
    n_test: int = 200
    min_genre_titles: int = 25

    def __post_init__(self) -> None:
        for k in ("n_train", "n_val", "n_test", "min_genre_titles"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ParameterError(f"data.{k} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class ModelConfig:
    base: str = "smollm2-135m"  # or a local Hugging Face model directory
    cache_dir: str = ""  # default ~/.cache/adaptermerge/weaverec


@dataclass(frozen=True)
class LoraVariant:
    """Per-task adapter shape: the config cycles through its variants over the tasks."""

    r: int = 8
    alpha: float = 16
    use_rslora: bool = False


@dataclass(frozen=True)
class MultitaskConfig:
    r: int = 16
    alpha: float = 32
    use_rslora: bool = False
    max_steps: int | None = None  # default: the sum of the per-task steps (same examples seen per task)


@dataclass(frozen=True)
class MergeConfig:
    methods: list[str] = field(default_factory=list)  # empty: every registered operator
    exclude: list[str] = field(default_factory=list)
    ranks: list[str] = field(default_factory=lambda: ["max", "sum"])
    seed: int = 0
    grid_weights: list[float] = field(default_factory=lambda: [0.5, 1.0])
    grid_density: list[float] = field(default_factory=lambda: [0.3, 0.7])
    pair_method: str = "task_arithmetic"  # pairwise merges for the interference study (at rank = sum: exact)
    pair_split: str = "test"

    def __post_init__(self) -> None:
        bad = [r for r in self.ranks if r not in ("max", "sum")]
        if bad or not self.ranks:
            raise ParameterError(f"merge.ranks must list 'max' and/or 'sum', got {self.ranks}")
        if self.pair_split not in ("val", "test"):
            raise ParameterError(f"merge.pair_split must be 'val' or 'test', got {self.pair_split!r}")
        if not self.grid_weights:
            raise ParameterError("merge.grid_weights must list at least one weight")


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 32
    n_boot: int = 1000
    ci: float = 0.95
    # normalized accuracy averages only the tasks whose own adapter reaches this test accuracy: a ratio to an
    # adapter that learned (almost) nothing is noise
    min_individual: float = 0.1


@dataclass(frozen=True)
class RunConfig:
    name: str
    seed: int = 7
    threads: int | None = None
    run_dir: Path = Path("runs/taskmerge")
    tasks: list[str] = field(default_factory=lambda: list(TASK_NAMES))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: dict[str, Any] = field(default_factory=dict)  # shared training settings (recipe_common LoraTrainConfig)
    variants: list[LoraVariant] = field(default_factory=lambda: [LoraVariant()])
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source: str = ""

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASK_NAMES]
        if unknown or len(set(self.tasks)) != len(self.tasks) or len(self.tasks) < 2:
            raise ParameterError(f"tasks must be >= 2 distinct names from {list(TASK_NAMES)}, got {self.tasks}")
        if not self.variants:
            raise ParameterError("variants must list at least one LoRA shape")
        for key in ("r", "alpha", "use_rslora"):
            if key in self.lora:
                raise ParameterError(f"lora.{key} is set per task in [[variants]] (and in [multitask])")
        self.task_train_config(self.tasks[0])  # validates the shared settings

    def _train_config(self, r: int, alpha: float, rslora: bool, **over) -> TaskLoraConfig:
        values = {**self.lora, "r": r, "alpha": alpha, "use_rslora": rslora, "seed": self.seed, **over}
        try:
            return TaskLoraConfig.from_dict(values)
        except TypeError as exc:
            raise ParameterError(f"lora: {exc}") from None

    def variant(self, task: str) -> LoraVariant:
        return self.variants[self.tasks.index(task) % len(self.variants)]

    def task_train_config(self, task: str) -> TaskLoraConfig:
        v = self.variant(task)
        return self._train_config(v.r, v.alpha, v.use_rslora)

    def multitask_train_config(self) -> TaskLoraConfig:
        m = self.multitask
        steps = m.max_steps
        if steps is None:
            steps = sum(self.task_train_config(t).max_steps or 0 for t in self.tasks) or None
        return self._train_config(m.r, m.alpha, m.use_rslora, max_steps=steps)

    def first_layer(self) -> int:
        """The lowest decoder layer any adapter touches (0 when every layer may be adapted)."""
        layers = self.lora.get("layers")
        return min(layers) if layers else 0

    def to_json(self) -> dict:
        d = asdict(self)
        d["run_dir"] = str(self.run_dir)
        return d


def config_from_dict(values: Mapping[str, Any], *, source: str = "") -> RunConfig:
    values = dict(values)
    known = {f.name for f in fields(RunConfig)} - {"source"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ParameterError(f"config: unknown keys {unknown}; known: {sorted(known)}")
    if "name" not in values:
        raise ParameterError("config: `name` is required")
    out: dict[str, Any] = {k: v for k, v in values.items() if k in ("name", "seed", "threads", "tasks", "lora")}
    out["run_dir"] = Path(values.get("run_dir") or f"runs/taskmerge-{values['name']}")
    out["data"] = section_from_dict(DataConfig, values.get("data"), "data")
    out["model"] = section_from_dict(ModelConfig, values.get("model"), "model")
    out["variants"] = [section_from_dict(LoraVariant, v, "variants") for v in values.get("variants", [{}])]
    out["multitask"] = section_from_dict(MultitaskConfig, values.get("multitask"), "multitask")
    out["merge"] = section_from_dict(MergeConfig, values.get("merge"), "merge")
    out["eval"] = section_from_dict(EvalConfig, values.get("eval"), "eval")
    return RunConfig(**out, source=source)


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a run config (.toml, .yaml or .yml)."""
    return config_from_dict(read_run_file(path), source=str(Path(path)))


__all__ = ["RunConfig", "TaskLoraConfig", "config_from_dict", "load_config"]
