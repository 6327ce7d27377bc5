"""LoRA fine-tuning of the base LLM on WeaveRec instruction samples.

:func:`train_lora` trains one LoRA module (target-only, hybrid target+source, or pooled data: the caller chooses the
samples) and saves it as an ordinary PEFT adapter directory. It tokenises the samples with WeaveRec's prompts and
hands them to the training loop shared by the recipes (:mod:`recipe_common.train`: answer-only loss, seeded
length-sorted batches, accelerate, atomic output, resume); see that module for the details.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from adaptermerge.errors import ParameterError
from recipe_common import train as _common
from recipe_common.train import (
    ALL_PROJECTIONS,
    TrainResult,
    collate_left,
    epoch_batches,
)

from .prompts import TASKS, PromptConfig, PromptEncoder
from .types import Sample


@dataclass(frozen=True)
class LoraTrainConfig(_common.LoraTrainConfig):
    """The shared LoRA settings (:class:`recipe_common.train.LoraTrainConfig`) plus WeaveRec's ``task`` ("next" or
    "top5"), ``prompt`` wording and ``cache_prefix`` (:func:`recipe_common.train.train_lora_encoded`: the hidden
    states entering the lowest adapted layer are computed once per sample and reused for every epoch; the result
    equals uncached training to float rounding)."""

    task: str = "next"
    prompt: PromptConfig = field(default_factory=PromptConfig)
    cache_prefix: bool = False  # with ``layers``: run the frozen layers below them once per sample, train above

    def _extra_checks(self) -> list[tuple[bool, str]]:
        return [(self.task in TASKS, f"task must be one of {', '.join(TASKS)}, got {self.task!r}")]

    @classmethod
    def _convert(cls, values: dict) -> dict:
        values = super()._convert(values)
        if isinstance(values.get("prompt"), dict):
            prompt_known = {f.name for f in fields(PromptConfig)}
            bad = sorted(set(values["prompt"]) - prompt_known)
            if bad:
                raise ParameterError(f"unknown prompt option(s): {', '.join(bad)}")
            values["prompt"] = PromptConfig(**values["prompt"])
        return values


def samples_fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 over the samples' content, in order (what the model sees and is trained to answer)."""
    h = hashlib.sha256()
    for s in samples:
        record = [s.domain, s.user, s.target, s.target_title, list(s.history_titles), list(s.candidate_titles)]
        h.update(json.dumps(record, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def train_lora(
    base_model_dir: Path,
    samples: Sequence[Sample],
    out_dir: Path,
    cfg: LoraTrainConfig | None = None,
    *,
    progress: bool = True,
    prefix_memo: dict | None = None,
    label: str | None = None,
) -> TrainResult:
    """Train one LoRA adapter on ``samples`` and save it to ``out_dir`` (see :mod:`recipe_common.train`).

    ``prefix_memo`` (with ``cfg.cache_prefix``): a dict kept across the modules of one run, so that the lower-layer
    states of a sample used by several modules (the target data is in every module) are computed once. ``label``
    names the module on the progress bar (default: the output folder's name)."""
    cfg = cfg or LoraTrainConfig()

    def encode(tokenizer):
        encoder = PromptEncoder(tokenizer, cfg.prompt)
        encoded = [encoder.encode_training(s, cfg.task, cfg.max_seq_len, cfg.seed) for s in samples]
        trimmed = sum(e.n_history < len(s.history_titles) for e, s in zip(encoded, samples))
        return encoded, {"samples_with_trimmed_history": int(trimmed)}

    return _common.train_lora_encoded(
        base_model_dir, encode, out_dir, cfg,
        fingerprint=samples_fingerprint(samples), n_samples=len(samples), cache_prefix=cfg.cache_prefix,
        prefix_memo=prefix_memo, progress=progress, label=label,
    )


__all__ = [
    "ALL_PROJECTIONS",
    "LoraTrainConfig",
    "TrainResult",
    "collate_left",
    "epoch_batches",
    "samples_fingerprint",
    "train_lora",
]
