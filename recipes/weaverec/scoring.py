"""Evaluation with an LLM recommender: candidate log-likelihoods, greedy top-k generation, latency.

Candidate scoring
    For each sample, every candidate title is scored as the assistant answer to the "next" prompt: the sum of the
    log-probabilities of its tokens plus the end-of-turn token (and the length-normalised mean). The prompt is run
    once per sample; its KV cache is then replicated over that sample's candidates and all candidate continuations
    are scored in one batched forward pass. Prompts of a batch are left-padded (explicit position ids), candidate
    continuations right-padded; the result equals scoring every prompt + candidate separately (to float rounding).

Threads
    Nothing here changes torch's thread count: the caller's ``torch.set_num_threads`` / ``OMP_NUM_THREADS`` rule.
    Latency figures are only comparable at equal thread counts, so :class:`LatencyStats` records it.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from adaptermerge.errors import ParameterError
from recipe_common.scoring import (
    _batches,
    _decoder,
    _layer_slice,
    _cache_kwarg,
    _model_device,
    _output_cache,
    _pad_left,
    _pad_right,
    _token_logprobs,
    bar_label,
    position_ids_from_mask,
    progress_bar,
)

from .prompts import PromptConfig, PromptEncoder, parse_titles
from .types import Sample


#: How a candidate's token log-probabilities become one score (see :meth:`CandidateScores.reduce`).
REDUCTIONS: tuple[str, ...] = ("sum", "mean", "pmi")


@dataclass(frozen=True)
class CandidateScores:
    """Per-candidate log-likelihood of one sample, in the sample's candidate order.

    ``prior_sum`` (when computed) is the log-likelihood of the same answer after the same prompt *without any
    history*: what the model would say about the title for anyone. Subtracting it gives a pointwise mutual
    information score that no longer favours titles the model finds likely in general (short, famous, ...).
    """

    logprob_sum: np.ndarray  # float64, shape (C,)
    n_tokens: np.ndarray  # int64, shape (C,): title tokens + end-of-turn token(s)
    n_history: int  # history titles kept in the prompt (after max_seq_len trimming)
    prior_sum: np.ndarray | None = None  # float64, shape (C,): log-likelihood under the no-history prompt

    @property
    def logprob_mean(self) -> np.ndarray:
        """Length-normalised log-likelihood (mean per answer token)."""
        return self.logprob_sum / self.n_tokens

    @property
    def pmi(self) -> np.ndarray:
        """Calibrated score: log p(title | history) - log p(title | no history)."""
        if self.prior_sum is None:
            raise ParameterError("the PMI reduction needs the no-history prior: score with prior=True")
        return self.logprob_sum - self.prior_sum

    def reduce(self, reduction: str) -> np.ndarray:
        """The candidate scores under ``reduction``: "sum", "mean" (per answer token) or "pmi"."""
        if reduction == "sum":
            return self.logprob_sum
        if reduction == "mean":
            return self.logprob_mean
        if reduction == "pmi":
            return self.pmi
        raise ParameterError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")


@torch.inference_mode()
def _score_batch(model, pad_id: int, inputs: Sequence, max_rows: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Score the candidates of a batch of ScoringInputs: one prompt pass, then candidate passes of <= max_rows rows.

    Each candidate row gets a copy of its prompt's KV cache (the cache API appends per row), so ``max_rows`` bounds
    the memory of the candidate pass: about rows x (prompt + answer) tokens x layers x 2 x kv width.
    """
    from transformers import DynamicCache

    device = _model_device(model)
    p_ids, p_mask = _pad_left([x.prompt_ids for x in inputs], pad_id, device)
    cache_arg = _cache_kwarg(model)
    out = model(
        input_ids=p_ids,
        attention_mask=p_mask,
        position_ids=position_ids_from_mask(p_mask),
        use_cache=True,
        logits_to_keep=1,
        **{cache_arg: DynamicCache()},
    )
    last_logits = out.logits[:, -1, :]  # (B, V): predicts each answer's first token
    prompt_cache = _output_cache(out)
    prompt_len = p_mask.sum(-1)

    owner = [b for b, x in enumerate(inputs) for _ in x.candidate_ids]
    rows = [c for x in inputs for c in x.candidate_ids]
    sums = np.zeros(len(rows), dtype=np.float64)
    counts = np.zeros(len(rows), dtype=np.int64)
    for lo in range(0, len(rows), max_rows):
        hi = min(len(rows), lo + max_rows)
        own = torch.tensor(owner[lo:hi], dtype=torch.long, device=device)
        cache = copy.deepcopy(prompt_cache)
        cache.batch_select_indices(own)
        c_ids, c_mask = _pad_right(rows[lo:hi], pad_id, device)
        out = model(
            input_ids=c_ids,
            attention_mask=torch.cat([p_mask[own], c_mask], dim=1),
            position_ids=position_ids_from_mask(c_mask) + prompt_len[own][:, None],
            use_cache=True,
            **{cache_arg: cache},
        )
        tok_logp = torch.empty(c_ids.shape, dtype=torch.float64, device=device)
        tok_logp[:, 0] = _token_logprobs(last_logits[own], c_ids[:, 0])
        if c_ids.shape[1] > 1:  # position j of the candidate pass predicts candidate token j + 1
            tok_logp[:, 1:] = _token_logprobs(out.logits[:, :-1, :], c_ids[:, 1:])
        sums[lo:hi] = (tok_logp * c_mask).sum(-1).cpu().numpy()
        counts[lo:hi] = c_mask.sum(-1).cpu().numpy()
        del out, cache
    result, start = [], 0
    for x in inputs:
        n = len(x.candidate_ids)
        result.append((sums[start : start + n], counts[start : start + n]))
        start += n
    return result


def score_candidates_detailed(
    model,
    tokenizer,
    samples: Sequence[Sample],
    *,
    prompt: PromptConfig | None = None,
    batch_size: int = 4,
    max_rows: int = 32,
    max_seq_len: int | None = None,
    prior: bool = False,
    progress: bool = False,
    label: str | None = None,
) -> list[CandidateScores]:
    """Log-likelihood of every candidate of every sample (see the module docstring).

    ``batch_size`` is the number of samples whose prompts run in one forward pass; their candidates are then scored
    ``max_rows`` at a time, each row with a copy of its prompt's KV cache (memory ~ max_rows x prompt length).
    ``max_seq_len`` trims the oldest history titles exactly as training does. ``prior``: also score every candidate
    after the same prompt with the history removed (``prior_sum``; see :class:`CandidateScores`). When the prompt
    does not list the candidates, that prompt is the same for every user, so each distinct title is scored once.
    """
    if batch_size < 1 or max_rows < 1:
        raise ParameterError(f"batch_size and max_rows must be >= 1, got {batch_size} and {max_rows}")
    encoder = PromptEncoder(tokenizer, prompt)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    results: list[CandidateScores] = []
    try:
        with progress_bar(progress) as bar:
            task = bar.add_task(bar_label("scoring", label), total=len(samples)) if bar else None
            for idx in _batches(len(samples), batch_size):
                inputs = [encoder.encode_scoring(samples[i], max_seq_len) for i in idx]
                for x, (sums, counts) in zip(inputs, _score_batch(model, pad_id, inputs, max_rows)):
                    results.append(CandidateScores(sums, counts, x.n_history))
                if bar:
                    bar.update(task, advance=len(idx))
        if prior:
            results = _with_prior(model, encoder, pad_id, samples, results, batch_size, max_rows)
    finally:
        model.train(was_training)
    return results


def _no_history(sample: Sample, titles: Sequence[str] | None = None) -> Sample:
    """``sample`` with its history removed (and, when given, ``titles`` as its candidates)."""
    from dataclasses import replace

    if titles is None:
        return replace(sample, history=(), history_titles=())
    return replace(sample, history=(), history_titles=(), candidates=tuple(titles), candidate_titles=tuple(titles),
                   target=titles[0], target_title=titles[0], target_index=0)


def _prior_chunks(tokenizer, prompt: PromptConfig | None, titles: Sequence[str], max_rows: int, who: str):
    """(pad id, the distinct titles in sorted chunks of ``max_rows``, chunk -> scoring inputs without history)."""
    encoder = PromptEncoder(tokenizer, prompt)
    if encoder.cfg.include_candidates:
        raise ParameterError(f"{who} needs a prompt without the candidate list (include_candidates=False)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    unique = sorted(set(titles))
    probe = Sample("<prior>", "", (), (), "", "", (), (), 0, 0)
    return (pad_id, [unique[i : i + max_rows] for i in range(0, len(unique), max_rows)],
            lambda chunk: encoder.encode_scoring(_no_history(probe, chunk)))


def no_history_priors(
    model,
    tokenizer,
    titles: Sequence[str],
    *,
    prompt: PromptConfig | None = None,
    batch_size: int = 4,
    max_rows: int = 32,
) -> dict[str, float]:
    """Log-likelihood of each title as the answer to the "next" prompt without history (the PMI prior).

    Only meaningful when the prompt does not list the candidates (then that prompt is the same for every user):
    each distinct title is scored once, whatever the number of users or candidate sets.
    """
    pad_id, chunks, encode = _prior_chunks(tokenizer, prompt, titles, max_rows, "no_history_priors")
    by_title: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        for idx in _batches(len(chunks), batch_size):
            inputs = [encode(chunks[i]) for i in idx]
            for i, (sums, _) in zip(idx, _score_batch(model, pad_id, inputs, max_rows)):
                by_title.update(zip(chunks[i], sums.tolist()))
    finally:
        model.train(was_training)
    return by_title


def _with_prior(model, encoder: PromptEncoder, pad_id: int, samples: Sequence[Sample],
                results: list[CandidateScores], batch_size: int, max_rows: int) -> list[CandidateScores]:
    from dataclasses import replace

    if not encoder.cfg.include_candidates:  # one prompt for everyone: score each distinct title once
        by_title = no_history_priors(model, encoder.tokenizer, [t for s in samples for t in s.candidate_titles],
                                     prompt=encoder.cfg, batch_size=batch_size, max_rows=max_rows)
        return with_priors(results, samples, by_title)
    priors = []  # the prompt lists the candidates: one no-history prompt per sample
    for idx in _batches(len(samples), batch_size):
        inputs = [encoder.encode_scoring(_no_history(samples[i])) for i in idx]
        priors.extend(sums for sums, _ in _score_batch(model, pad_id, inputs, max_rows))
    return [replace(r, prior_sum=p) for r, p in zip(results, priors)]


def with_priors(scores: Sequence[CandidateScores], samples: Sequence[Sample], priors: dict[str, float]) -> list[CandidateScores]:
    """``scores`` with ``prior_sum`` filled from a :func:`no_history_priors` table."""
    from dataclasses import replace

    return [replace(d, prior_sum=np.array([priors[t] for t in s.candidate_titles], dtype=np.float64))
            for d, s in zip(scores, samples)]


def score_candidates(
    model,
    tokenizer,
    samples: Sequence[Sample],
    *,
    prompt: PromptConfig | None = None,
    batch_size: int = 4,
    max_rows: int = 32,
    max_seq_len: int | None = None,
    reduction: str = "sum",
    progress: bool = False,
    label: str | None = None,
) -> list[np.ndarray]:
    """Per-sample arrays of candidate scores (higher = more likely): ``reduction`` "sum", "mean" (per token) or
    "pmi" (sum minus the no-history prior)."""
    if reduction not in REDUCTIONS:
        raise ParameterError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    detailed = score_candidates_detailed(
        model,
        tokenizer,
        samples,
        prompt=prompt,
        batch_size=batch_size,
        max_rows=max_rows,
        max_seq_len=max_seq_len,
        prior=reduction == "pmi",
        progress=progress,
        label=label,
    )
    return [d.reduce(reduction) for d in detailed]


# ------------------------------------------------------------------------------------------- shared lower layers
class SharedPrefixScorer:
    """Candidate scores of several models that differ only in their decoder layers ``first_layer..`` (e.g. LoRA
    adapters on the top layers, folded), with the layers below run once per sample for all of them.

    ``scorer = SharedPrefixScorer(base, first_layer)``; ``scorer.add(name, model)`` takes over that model's layers
    ``first_layer..`` and final norm, after checking that its embeddings, lower layers and LM head are bit-identical
    to ``base``'s (a :class:`ParameterError` otherwise); ``scorer.score(tokenizer, samples, ...)`` returns
    ``{name: [CandidateScores, ...]}``. Per batch of samples: the prompts and candidate continuations run through
    layers ``< first_layer`` once (KV cache shared as in :func:`score_candidates_detailed`); then, per model, the
    cached hidden states run through that model's upper layers. The scores equal :func:`score_candidates_detailed`
    on each model to float rounding.
    """

    def __init__(self, base, first_layer: int):
        inner, _ = _decoder(base)
        if not 0 < first_layer < len(inner.layers):
            raise ParameterError(f"first_layer must be in [1, {len(inner.layers) - 1}], got {first_layer}")
        self.base, self.first_layer = base.eval(), first_layer
        self.n_layers = len(inner.layers)
        self._fixed = {k: v for k, v in base.state_dict().items() if not self._is_upper(k)}
        self.uppers: dict[str, tuple[torch.nn.ModuleList, torch.nn.Module]] = {}

    def _is_upper(self, key: str) -> bool:
        parts = key.split(".")
        if "layers" in parts:
            i = parts.index("layers")
            return int(parts[i + 1]) >= self.first_layer
        return key.startswith("model.norm.")

    def add(self, name: str, model) -> None:
        inner, _ = _decoder(model)
        if len(inner.layers) != self.n_layers:
            raise ParameterError(f"model {name!r} has {len(inner.layers)} layers, the base {self.n_layers}")
        state = model.state_dict()
        for k, v in self._fixed.items():
            if k not in state or not torch.equal(state[k], v):
                raise ParameterError(f"model {name!r} differs from the base below layer {self.first_layer} ({k}): "
                                     "its lower layers cannot be shared")
        layers = torch.nn.ModuleList(list(inner.layers)[self.first_layer :])
        norm = inner.norm
        if model is self.base:  # keep the base model itself intact
            layers, norm = copy.deepcopy(layers), copy.deepcopy(norm)
        for j, layer in enumerate(layers):  # the upper pass runs with its own cache, indexed from 0
            layer.self_attn.layer_idx = j
        self.uppers[name] = (layers.eval(), norm.eval())

    @torch.inference_mode()
    def _lower(self, pad_id: int, inputs: Sequence, max_rows: int) -> dict:
        from transformers import DynamicCache

        inner, _ = _decoder(self.base)
        device = _model_device(self.base)
        p_ids, p_mask = _pad_left([x.prompt_ids for x in inputs], pad_id, device)
        p_pos = position_ids_from_mask(p_mask)
        with _layer_slice(inner, 0, self.first_layer, final_norm=False):
            out = inner(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, use_cache=True, cache=DynamicCache())
            prompt_cache = out.cache
            h_prompt = out.last_hidden_state
            prompt_len = p_mask.sum(-1)
            owner = [b for b, x in enumerate(inputs) for _ in x.candidate_ids]
            rows = [c for x in inputs for c in x.candidate_ids]
            chunks = []
            for lo in range(0, len(rows), max_rows):
                hi = min(len(rows), lo + max_rows)
                own = torch.tensor(owner[lo:hi], dtype=torch.long, device=device)
                cache = copy.deepcopy(prompt_cache)
                cache.batch_select_indices(own)
                c_ids, c_mask = _pad_right(rows[lo:hi], pad_id, device)
                c_pos = position_ids_from_mask(c_mask) + prompt_len[own][:, None]
                o = inner(input_ids=c_ids, attention_mask=torch.cat([p_mask[own], c_mask], dim=1), position_ids=c_pos,
                          use_cache=True, cache=cache)
                chunks.append((own, c_ids, c_mask, c_pos, o.last_hidden_state))
                del cache
        return {"p_mask": p_mask, "p_pos": p_pos, "h_prompt": h_prompt, "chunks": chunks, "n_rows": len(rows)}

    @torch.inference_mode()
    def _upper(self, name: str, low: dict) -> tuple[np.ndarray, np.ndarray]:
        from transformers import DynamicCache

        inner, head = _decoder(self.base)
        layers, norm = self.uppers[name]
        saved = inner.layers, inner.norm
        inner.layers, inner.norm = layers, norm
        try:
            p_mask = low["p_mask"]
            out = inner(inputs_embeds=low["h_prompt"], attention_mask=p_mask, position_ids=low["p_pos"], use_cache=True,
                        cache=DynamicCache())
            last_logits = head(out.last_hidden_state[:, -1, :])
            prompt_cache = out.cache
            sums = np.zeros(low["n_rows"], dtype=np.float64)
            counts = np.zeros(low["n_rows"], dtype=np.int64)
            lo = 0
            for own, c_ids, c_mask, c_pos, h in low["chunks"]:
                hi = lo + len(own)
                cache = copy.deepcopy(prompt_cache)
                cache.batch_select_indices(own)
                o = inner(inputs_embeds=h, attention_mask=torch.cat([p_mask[own], c_mask], dim=1), position_ids=c_pos,
                          use_cache=True, cache=cache)
                tok_logp = torch.empty(c_ids.shape, dtype=torch.float64, device=c_ids.device)
                tok_logp[:, 0] = _token_logprobs(last_logits[own], c_ids[:, 0])
                if c_ids.shape[1] > 1:
                    tok_logp[:, 1:] = _token_logprobs(head(o.last_hidden_state[:, :-1, :]), c_ids[:, 1:])
                sums[lo:hi] = (tok_logp * c_mask).sum(-1).cpu().numpy()
                counts[lo:hi] = c_mask.sum(-1).cpu().numpy()
                lo = hi
                del cache, o
        finally:
            inner.layers, inner.norm = saved
        return sums, counts

    def score(self, tokenizer, samples: Sequence[Sample], *, prompt: PromptConfig | None = None, batch_size: int = 4,
              max_rows: int = 32, max_seq_len: int | None = None, prior: bool = False,
              progress: bool = False, label: str | None = None) -> dict[str, list[CandidateScores]]:
        """Scores of every added model on ``samples`` (see the class docstring); ``prior`` as in
        :func:`score_candidates_detailed` (only without a candidate list in the prompt); ``label`` names what is
        scored on the progress bar."""
        if batch_size < 1 or max_rows < 1:
            raise ParameterError(f"batch_size and max_rows must be >= 1, got {batch_size} and {max_rows}")
        if not self.uppers:
            raise ParameterError("SharedPrefixScorer: add at least one model before scoring")
        encoder = PromptEncoder(tokenizer, prompt)
        if prior and encoder.cfg.include_candidates:
            raise ParameterError("SharedPrefixScorer computes the PMI prior only for prompts without a candidate list")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out: dict[str, list[CandidateScores]] = {n: [] for n in self.uppers}
        with progress_bar(progress) as bar:
            task = bar.add_task(bar_label("scoring", label or f"{len(self.uppers)} models, shared lower layers"),
                                total=len(samples)) if bar else None
            for idx in _batches(len(samples), batch_size):
                inputs = [encoder.encode_scoring(samples[i], max_seq_len) for i in idx]
                low = self._lower(pad_id, inputs, max_rows)
                for name in self.uppers:
                    sums, counts = self._upper(name, low)
                    start = 0
                    for x in inputs:
                        n = len(x.candidate_ids)
                        out[name].append(CandidateScores(sums[start : start + n], counts[start : start + n], x.n_history))
                        start += n
                if bar:
                    bar.update(task, advance=len(idx))
        if prior:
            by_title = self.priors(tokenizer, [t for s in samples for t in s.candidate_titles], prompt=prompt,
                                   batch_size=batch_size, max_rows=max_rows)
            out = {n: with_priors(v, samples, by_title[n]) for n, v in out.items()}
        return out

    @torch.inference_mode()
    def priors(self, tokenizer, titles: Sequence[str], *, prompt: PromptConfig | None = None, batch_size: int = 4,
               max_rows: int = 32) -> dict[str, dict[str, float]]:
        """``{model: {title: no-history log-likelihood}}`` for every distinct title (the PMI prior; prompts without
        a candidate list only), each title scored once per model, lower layers shared."""
        pad_id, chunks, encode = _prior_chunks(tokenizer, prompt, titles, max_rows, "SharedPrefixScorer.priors")
        by_title: dict[str, dict[str, float]] = {n: {} for n in self.uppers}
        for idx in _batches(len(chunks), batch_size):
            inputs = [encode(chunks[i]) for i in idx]
            low = self._lower(pad_id, inputs, max_rows)
            for name in self.uppers:
                sums, _ = self._upper(name, low)
                by_title[name].update(zip([t for i in idx for t in chunks[i]], sums.tolist()))
        return by_title


# ------------------------------------------------------------------------------------------------------ generation
def _max_new_tokens(encoder: PromptEncoder, sample: Sample, k: int) -> int:
    """Room for the k longest candidate titles, separators and the end-of-turn token."""
    lengths = sorted((len(encoder.answer_ids(encoder.cfg.show(t))) for t in sample.candidate_titles), reverse=True)
    sep = len(encoder.answer_ids(encoder.cfg.separator))
    return sum(lengths[:k]) + k * sep + 8


@torch.inference_mode()
def generate_topk(
    model,
    tokenizer,
    samples: Sequence[Sample],
    *,
    k: int = 5,
    prompt: PromptConfig | None = None,
    batch_size: int = 4,
    max_seq_len: int | None = None,
    progress: bool = False,
    label: str | None = None,
) -> list[list[str]]:
    """Greedy generation with the authors' "pick and order the top k" prompt; returns the parsed titles per sample.

    Titles are split on "||", stripped and de-duplicated; at most ``k`` are kept. They are not forced to be
    candidates (the authors match titles exactly; see :func:`titles_to_candidate_indices`).
    """
    from dataclasses import replace

    cfg = replace(prompt or PromptConfig(), top_k=k)
    encoder = PromptEncoder(tokenizer, cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = _model_device(model)
    was_training = model.training
    model.eval()
    out: list[list[str]] = []
    try:
        with progress_bar(progress) as bar:
            task = bar.add_task(bar_label("generating top-k", label), total=len(samples)) if bar else None
            for idx in _batches(len(samples), batch_size):
                budgets = [_max_new_tokens(encoder, samples[i], k) for i in idx]
                rows = [encoder.encode_generation(samples[i], b, max_seq_len) for i, b in zip(idx, budgets)]
                ids, mask = _pad_left(rows, pad_id, device)
                gen = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max(budgets),
                    do_sample=False,
                    num_beams=1,
                    eos_token_id=list(encoder.end_ids),
                    pad_token_id=pad_id,
                )
                for row, budget in zip(gen[:, ids.shape[1] :], budgets):  # same length cap whatever the batching
                    out.append(parse_titles(tokenizer.decode(row[:budget], skip_special_tokens=True), k))
                if bar:
                    bar.update(task, advance=len(idx))
    finally:
        model.train(was_training)
    return out


def titles_to_candidate_indices(titles: Sequence[str], candidate_titles: Sequence[str]) -> list[int]:
    """Candidate positions of generated titles by exact (whitespace-stripped) match; unmatched titles dropped."""
    index: dict[str, int] = {}
    for i, t in enumerate(candidate_titles):
        index.setdefault(t.strip(), i)
    seen: list[int] = []
    for t in titles:
        i = index.get(t.strip())
        if i is not None and i not in seen:
            seen.append(i)
    return seen


# --------------------------------------------------------------------------------------------------------- latency
@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock time to score all candidates of one user (batch of one), in milliseconds."""

    n_users: int
    mean_ms: float
    median_ms: float
    p95_ms: float
    threads: int
    device: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def measure_scoring_latency(
    model,
    tokenizer,
    samples: Sequence[Sample],
    *,
    prompt: PromptConfig | None = None,
    max_seq_len: int | None = None,
    warmup: int = 1,
) -> LatencyStats:
    """Score each sample alone (one user per call) and time it; ``warmup`` first calls are not timed.

    Records ``torch.get_num_threads()``: state it with any benchmark, latencies differ across thread counts.
    """
    if len(samples) <= warmup:
        raise ParameterError(f"latency needs more samples ({len(samples)}) than warmup calls ({warmup})")
    device = _model_device(model)
    times = []
    for i, s in enumerate(samples):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        score_candidates_detailed(model, tokenizer, [s], prompt=prompt, batch_size=1, max_seq_len=max_seq_len)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000.0)
    times.sort()
    p95 = times[min(len(times) - 1, math.ceil(0.95 * len(times)) - 1)]
    return LatencyStats(
        n_users=len(times),
        mean_ms=statistics.fmean(times),
        median_ms=statistics.median(times),
        p95_ms=p95,
        threads=torch.get_num_threads(),
        device=str(device),
    )


__all__ = [
    "REDUCTIONS",
    "SharedPrefixScorer",
    "CandidateScores",
    "LatencyStats",
    "generate_topk",
    "measure_scoring_latency",
    "no_history_priors",
    "with_priors",
    "position_ids_from_mask",
    "score_candidates",
    "score_candidates_detailed",
    "titles_to_candidate_indices",
]
