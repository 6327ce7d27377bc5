"""Scoring helpers shared by the recipes: padding, positions, KV-cache plumbing, progress bars, token
log-probabilities, and exact-match accuracy of greedy decoding by one teacher-forced forward pass.

Exact match without generating
    Greedy decoding reproduces a gold answer (its tokens, end-of-turn token included) exactly when, with the prompt
    followed by the gold answer fed in (teacher forcing), the argmax of the model's next-token distribution at every
    answer position is the gold token there: by induction, greedy decoding then emits the gold tokens one by one
    and stops at the end token; and at the first position where the argmax differs, greedy decoding emits that
    other token and the output differs from the gold answer. So one batched forward pass per example gives the
    same exact-match figure as token-by-token generation (ties in the argmax aside, which both resolve to the
    lowest token id). Exact match is on token ids: an output that spells the gold text with other tokens counts as
    a miss (greedy decoding of a trained model practically never does that).

Shared prefix
    :class:`ExactMatchScorer` can cache the hidden states entering decoder layer ``first_layer`` once; every later
    call then runs only layers ``first_layer..`` and the LM head (on the answer positions only). This is exact when
    the weights below ``first_layer`` do not change between calls, e.g. LoRA adapters restricted to the top layers
    (the caller checks that).

Threads
    Nothing here changes torch's thread count.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from adaptermerge.errors import ParameterError


def _pad_left(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _pad_right(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def position_ids_from_mask(mask: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Positions 0.. counted over real tokens only (left padding gets 0), plus an optional per-row offset."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return pos if offset is None else pos + offset[:, None]


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument of the model's forward: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def bar_label(action: str, label: str | None) -> str:
    """A progress-bar description naming what is worked on ("training target", "scoring WeaveRec"), markup-safe."""
    from rich.markup import escape

    return escape(f"{action} {label}" if label else action)


def progress_bar(enabled: bool, *extra_columns):
    """A rich progress bar on stderr (description, bar, m/n, extra columns, elapsed, remaining), or a null context."""
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] (float32 math, float64 result), without materialising the full log-softmax."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)).double()



# ------------------------------------------------------------------------------------------------ exact match
@dataclass(frozen=True)
class AnswerExample:
    """A prompt and its gold answer as token ids; ``answer_ids`` ends with the end-of-turn token(s)."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]


def _decoder(model):
    """The decoder stack (``model.model`` of a *ForCausalLM) and the LM head."""
    inner = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    if inner is None or head is None or not hasattr(inner, "layers") or not hasattr(inner, "norm"):
        raise ParameterError(f"{type(model).__name__} is not a decoder-only causal LM with .model.layers and .lm_head")
    return inner, head


@contextmanager
def _layer_slice(inner, start: int, stop: int | None, *, final_norm: bool):
    """Temporarily keep only ``layers[start:stop]`` (and optionally drop the final norm) in a decoder stack."""
    layers, norm = inner.layers, inner.norm
    inner.layers = torch.nn.ModuleList(list(layers)[start:stop])
    if not final_norm:
        inner.norm = torch.nn.Identity()
    try:
        yield
    finally:
        inner.layers, inner.norm = layers, norm


@dataclass
class _Batch:
    index: np.ndarray  # example positions in the caller's order
    ids: torch.Tensor  # (B, W) left-padded prompt + answer
    mask: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor  # (B, K): the last K tokens, K = longest answer
    answer_mask: torch.Tensor  # (B, K) bool: True on each row's answer tokens
    hidden: torch.Tensor | None = None  # cached input of layer ``first_layer``


class ExactMatchScorer:
    """Exact-match accuracy of greedy decoding on fixed examples, by teacher forcing (see the module docstring).

    ``scorer = ExactMatchScorer(examples, pad_id=...)``; ``scorer.prepare(model, first_layer=k)`` caches the hidden
    states entering layer ``k`` (optional); ``scorer(model)`` returns one bool per example, in the given order.
    Examples are batched by length (``batch_size`` rows per forward pass).
    """

    def __init__(self, examples: Sequence[AnswerExample], *, pad_id: int, batch_size: int = 32):
        if batch_size < 1:
            raise ParameterError(f"batch_size must be >= 1, got {batch_size}")
        for i, e in enumerate(examples):
            if not e.prompt_ids or not e.answer_ids:
                raise ParameterError(f"example {i} has an empty prompt or answer")
        self.n = len(examples)
        self.first_layer = 0
        order = sorted(range(self.n), key=lambda i: len(examples[i].prompt_ids) + len(examples[i].answer_ids))
        self.batches: list[_Batch] = []
        for lo in range(0, self.n, batch_size):
            idx = order[lo : lo + batch_size]
            rows = [list(examples[i].prompt_ids) + list(examples[i].answer_ids) for i in idx]
            ids, mask = _pad_left(rows, pad_id, "cpu")
            k = max(len(examples[i].answer_ids) for i in idx)
            answer_mask = torch.zeros((len(idx), k), dtype=torch.bool)
            for r, i in enumerate(idx):
                answer_mask[r, k - len(examples[i].answer_ids) :] = True
            self.batches.append(
                _Batch(np.asarray(idx), ids, mask, position_ids_from_mask(mask), ids[:, -k:].clone(), answer_mask)
            )

    @torch.inference_mode()
    def prepare(self, model, first_layer: int = 0) -> None:
        """Cache the hidden states entering decoder layer ``first_layer`` (0: no cache, every call runs all layers).

        Later calls are exact only while layers below ``first_layer`` (and the embeddings) keep these weights.
        """
        inner, _ = _decoder(model)
        if not 0 <= first_layer < len(inner.layers):
            raise ParameterError(f"first_layer must be in [0, {len(inner.layers) - 1}], got {first_layer}")
        self.first_layer = first_layer
        device = _model_device(model)
        for b in self.batches:
            b.hidden = None
            if first_layer == 0:
                continue
            with _layer_slice(inner, 0, first_layer, final_norm=False):
                out = inner(
                    input_ids=b.ids.to(device),
                    attention_mask=b.mask.to(device),
                    position_ids=b.positions.to(device),
                    use_cache=False,
                )
            b.hidden = out.last_hidden_state

    @torch.inference_mode()
    def __call__(self, model) -> np.ndarray:
        """One bool per example: does greedy decoding reproduce its answer exactly?"""
        inner, head = _decoder(model)
        device = _model_device(model)
        was_training = model.training
        model.eval()
        correct = np.zeros(self.n, dtype=bool)
        try:
            for b in self.batches:
                k = b.targets.shape[1]
                common = {
                    "attention_mask": b.mask.to(device),
                    "position_ids": b.positions.to(device),
                    "use_cache": False,
                }
                if self.first_layer and b.hidden is not None:
                    with _layer_slice(inner, self.first_layer, None, final_norm=True):
                        out = inner(inputs_embeds=b.hidden, **common)
                else:
                    out = inner(input_ids=b.ids.to(device), **common)
                # position t predicts token t + 1: the K answer slots are predicted by positions -K-1 .. -2
                logits = head(out.last_hidden_state[:, -k - 1 : -1, :]).float()
                hit = (logits.argmax(-1).cpu() == b.targets) | ~b.answer_mask
                correct[b.index] = hit.all(-1).numpy()
        finally:
            model.train(was_training)
        return correct


__all__ = [
    "AnswerExample",
    "ExactMatchScorer",
    "bar_label",
    "position_ids_from_mask",
    "progress_bar",
]
