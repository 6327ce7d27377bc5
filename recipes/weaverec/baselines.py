"""Non-LLM baselines that score the same candidate lists as the LLM: SASRec, first-order transitions, popularity.

They are sanity anchors: trained on the target domain's training sequences only (each user's sequence without
its validation and test items, :func:`weaverec.data.training_sequences`), they read the same ``Sample``s as the
LLM and return one score per candidate, in ``sample.candidates`` order, higher = better. Rank them with
:func:`weaverec.metrics.metrics_from_scores` (popularity produces ties: the default ``ties="expected"`` is fair).

SASRec (Kang & McAuley, 2018), small: item-id and learned positional embeddings, ``n_layers`` pre-LayerNorm
causal self-attention blocks, the item embedding table tied as the output layer. Trained on windows of at most
``max_len`` transitions cut from each training sequence (all transitions are used), batched by similar window
length (positions count from the right, so dropping all-padding columns changes only the cost), with either a full
softmax over the domain's items (``loss="ce"``, default) or BCE with one uniformly sampled negative per position
(``loss="bce"``, the original recipe). At scoring time it reads ``sample.history`` (the same, possibly truncated,
history the LLM sees). Training is seeded (``cfg.seed``) without touching the caller's global RNG state; results
are reproducible for a fixed thread count. Nothing here changes torch's thread count.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adaptermerge.errors import IncompatibleInputsError, InputError, OutputError, ParameterError

from .types import Sample

__all__ = [
    "CandidateScorer",
    "PopularityModel",
    "SASRec",
    "SASRecConfig",
    "SASRecModel",
    "TransitionModel",
    "fit_popularity",
    "fit_sasrec",
    "fit_transition",
    "load_sasrec",
    "popularity_scores",
    "save_sasrec",
    "score_candidates",
]

TrainSequences = Mapping[str, Sequence[str]] | Sequence[Sequence[str]]


class CandidateScorer(Protocol):
    """Anything that scores the candidates of samples: one float array per sample, in candidate order."""

    def score_samples(self, samples: Sequence[Sample]) -> list[np.ndarray]: ...


def score_candidates(model: CandidateScorer, samples: Sequence[Sample]) -> list[np.ndarray]:
    """One score per candidate for each sample (same order as ``sample.candidates``; higher = better)."""
    if not hasattr(model, "score_samples"):
        raise ParameterError(f"{type(model).__name__} is not a candidate scorer (no score_samples method)")
    return model.score_samples(samples)


def _sequences(train_sequences: TrainSequences) -> list[list[str]]:
    if isinstance(train_sequences, Mapping):
        raw = [train_sequences[u] for u in sorted(train_sequences)]
    elif isinstance(train_sequences, (str, bytes)):
        raise ParameterError("train_sequences must be a mapping user -> item ids or a list of item-id lists")
    else:
        raw = list(train_sequences)
    if any(isinstance(s, (str, bytes)) for s in raw):
        raise ParameterError("each training sequence must be a list of item ids, not a string")
    return [list(s) for s in raw]


# --------------------------------------------------------------------------------------------------------------------
# Popularity and first-order transitions
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class PopularityModel:
    """Scores a candidate by how often it occurs in the training sequences (unseen items score 0)."""

    counts: dict[str, int]

    def score_samples(self, samples: Sequence[Sample]) -> list[np.ndarray]:
        get = self.counts.get
        return [np.array([float(get(c, 0)) for c in s.candidates]) for s in samples]


def fit_popularity(train_sequences: TrainSequences) -> PopularityModel:
    """Item occurrence counts over the training sequences."""
    return PopularityModel(dict(Counter(it for s in _sequences(train_sequences) for it in s)))


def popularity_scores(train_sequences: TrainSequences, samples: Sequence[Sample]) -> list[np.ndarray]:
    """Popularity score (training count) of every candidate of every sample."""
    return fit_popularity(train_sequences).score_samples(samples)


@dataclass
class TransitionModel:
    """First-order Markov chain: score(c) = count(last history item -> c) + popularity(c) / (total count + 1).

    The popularity term is below 1, so it only orders candidates with equal transition counts (back-off).
    """

    transitions: dict[str, Counter]
    popularity: dict[str, int]

    def score_samples(self, samples: Sequence[Sample]) -> list[np.ndarray]:
        norm = float(sum(self.popularity.values()) + 1)
        out = []
        for s in samples:
            nxt = self.transitions.get(s.history[-1], Counter()) if s.history else Counter()
            out.append(np.array([nxt.get(c, 0) + self.popularity.get(c, 0) / norm for c in s.candidates]))
        return out


def fit_transition(train_sequences: TrainSequences) -> TransitionModel:
    """Count consecutive (item -> next item) pairs in the training sequences."""
    seqs = _sequences(train_sequences)
    transitions: dict[str, Counter] = {}
    for s in seqs:
        for a, b in zip(s, s[1:]):
            transitions.setdefault(a, Counter())[b] += 1
    return TransitionModel(transitions, dict(Counter(it for s in seqs for it in s)))


# --------------------------------------------------------------------------------------------------------------------
# SASRec
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SASRecConfig:
    """SASRec hyper-parameters. Defaults train on the ML-1M target domain in well under a minute on one thread."""

    hidden: int = 64
    n_layers: int = 2
    n_heads: int = 1
    max_len: int = 50
    dropout: float = 0.2
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 20
    loss: str = "ce"  # "ce": full softmax over the domain's items; "bce": one sampled negative per position
    patience: int = 0  # with validation samples: stop after this many epochs without NDCG@10 gain (0 = never)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        ints = {"hidden": 1, "n_layers": 1, "n_heads": 1, "max_len": 1, "batch_size": 1, "epochs": 0, "patience": 0, "seed": 0}
        for name, minimum in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ParameterError(f"SASRec {name} must be an integer >= {minimum}, got {v!r}")
        if self.hidden % self.n_heads:
            raise ParameterError(f"SASRec hidden={self.hidden} must be divisible by n_heads={self.n_heads}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ParameterError(f"SASRec dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("lr", "weight_decay"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0) or (name == "lr" and v == 0):
                raise ParameterError(f"SASRec {name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {v!r}")
        if self.loss not in ("ce", "bce"):
            raise ParameterError(f"SASRec loss must be 'ce' or 'bce', got {self.loss!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SASRecConfig:
        """Build from a plain dict (TOML/YAML section); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ParameterError(f"unknown SASRec config keys {unknown}; known: {sorted(known)}")
        return cls(**dict(values))


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: masked multi-head self-attention, then a GELU feed-forward layer."""

    def __init__(self, hidden: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ff = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, length, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, length, 3, self.n_heads, h // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, length, h)))
        return x + self.drop(self.ff(self.ln2(x)))


class SASRec(nn.Module):
    """Self-attentive sequential recommender. Index 0 is padding; items are 1..n_items; sequences are left-padded."""

    def __init__(self, n_items: int, cfg: SASRecConfig):
        super().__init__()
        self.n_items, self.max_len = n_items, cfg.max_len
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg.hidden, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_layers))
        self.ln = nn.LayerNorm(cfg.hidden)
        nn.init.normal_(self.item_emb.weight, std=cfg.hidden**-0.5)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(B, L, H)`` for left-padded item indices ``(B, L)``, ``L <= max_len``."""
        b, length = seq.shape
        keep = (seq != 0).unsqueeze(-1)
        pos = torch.arange(self.max_len - length, self.max_len, device=seq.device)
        x = self.drop(self.item_emb(seq) * math.sqrt(self.item_emb.embedding_dim) + self.pos_emb(pos)) * keep
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        # Attend to earlier real items; a padding query attends to itself only (no fully masked rows).
        allowed = (causal & (seq != 0)[:, None, :]) | torch.eye(length, dtype=torch.bool, device=seq.device)
        allowed = allowed[:, None]
        for block in self.blocks:
            x = block(x, allowed) * keep
        return self.ln(x)


@dataclass
class SASRecModel:
    """A trained :class:`SASRec` with its item vocabulary (``items[i]`` has index ``i + 1``)."""

    module: SASRec
    items: list[str]
    cfg: SASRecConfig
    history: list[dict[str, float]]  # per-epoch training loss (and validation NDCG@10 when given)

    def __post_init__(self) -> None:
        self._index = {it: i + 1 for i, it in enumerate(self.items)}

    def _indices(self, ids: Sequence[str], what: str) -> list[int]:
        try:
            return [self._index[i] for i in ids]
        except KeyError as exc:
            raise IncompatibleInputsError(f"{what} item {exc.args[0]!r} is not in the SASRec item vocabulary") from None

    @torch.no_grad()
    def score_samples(self, samples: Sequence[Sample], batch_size: int = 512) -> list[np.ndarray]:
        """Dot product of the history's last hidden state with each candidate's item embedding."""
        module, device, length = self.module, next(self.module.parameters()).device, self.cfg.max_len
        was_training = module.training
        module.eval()
        out: list[np.ndarray] = []
        try:
            for start in range(0, len(samples), batch_size):
                batch = samples[start : start + batch_size]
                seq = torch.zeros(len(batch), length, dtype=torch.long)
                for r, s in enumerate(batch):
                    hist = self._indices(s.history, f"user {s.user!r} history")[-length:]
                    if hist:
                        seq[r, length - len(hist) :] = torch.tensor(hist)
                last = module(seq.to(device))[:, -1]  # (B, H)
                width = max(len(s.candidates) for s in batch)
                cand = torch.zeros(len(batch), width, dtype=torch.long)
                for r, s in enumerate(batch):
                    cand[r, : len(s.candidates)] = torch.tensor(self._indices(s.candidates, f"user {s.user!r} candidate"))
                scores = (module.item_emb(cand.to(device)) * last[:, None]).sum(-1).double().cpu().numpy()
                out.extend(scores[r, : len(s.candidates)].copy() for r, s in enumerate(batch))
        finally:
            module.train(was_training)
        return out


def _windows(seqs: list[list[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut every sequence into left-padded (input, next-item target) windows of at most ``max_len`` transitions."""
    inputs, targets = [], []
    for s in seqs:
        end = len(s) - 1  # number of transitions
        while end > 0:
            start = max(0, end - max_len)
            inputs.append(s[start:end])
            targets.append(s[start + 1 : end + 1])
            end = start
    x = torch.zeros(len(inputs), max_len, dtype=torch.long)
    y = torch.zeros(len(inputs), max_len, dtype=torch.long)
    for r, (a, b) in enumerate(zip(inputs, targets)):
        x[r, max_len - len(a) :] = torch.tensor(a)
        y[r, max_len - len(b) :] = torch.tensor(b)
    return x, y


def _length_bucketed_batches(lengths: torch.Tensor, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Random batches of windows of similar length: shuffle, sort by length (stable), cut, shuffle the batches."""
    order = torch.randperm(len(lengths), generator=gen)
    order = order[torch.argsort(lengths[order], stable=True)]
    batches = list(torch.split(order, batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def _ndcg10(model: SASRecModel, samples: Sequence[Sample]) -> float:
    scores = model.score_samples(samples)
    total = 0.0
    for sc, s in zip(scores, samples):
        rank = int((sc > sc[s.target_index]).sum()) + 0.5 * int((sc == sc[s.target_index]).sum() - 1)
        total += 1.0 / math.log2(rank + 2.0) if rank < 10 else 0.0
    return total / max(1, len(samples))


def fit_sasrec(
    train_sequences: TrainSequences,
    items: Sequence[str],
    cfg: SASRecConfig | None = None,
    *,
    valid: Sequence[Sample] | None = None,
    progress: Callable[[dict[str, float]], None] | None = None,
) -> SASRecModel:
    """Train SASRec on chronological training sequences over the item vocabulary ``items`` (the domain's items).

    ``train_sequences`` is ``{user: item ids}`` (iterated in sorted user order) or a list of item-id lists; items
    outside ``items`` are an error. With ``valid`` samples, NDCG@10 on them is computed after every epoch and the
    best epoch's weights are kept (``cfg.patience`` > 0 also stops early). ``progress`` receives each epoch's record.
    """
    cfg = cfg or SASRecConfig()
    vocab = list(items)
    if not vocab or len(set(vocab)) != len(vocab):
        raise ParameterError("items must be a non-empty list of distinct item ids")
    index = {it: i + 1 for i, it in enumerate(vocab)}
    seqs = []
    for s in _sequences(train_sequences):
        try:
            seqs.append([index[it] for it in s])
        except KeyError as exc:
            raise IncompatibleInputsError(f"training item {exc.args[0]!r} is not among the {len(vocab)} items") from None
    x_all, y_all = _windows(seqs, cfg.max_len)
    if len(x_all) == 0:
        raise ParameterError("no training transitions: every training sequence has fewer than 2 items")
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        raise ParameterError(f"SASRec device {cfg.device!r} is not a torch device") from None

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        module = SASRec(len(vocab), cfg).to(device)
        gen = torch.Generator().manual_seed(cfg.seed)
        opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        model = SASRecModel(module, vocab, cfg, history=[])
        best_score, best_state, stale = -1.0, None, 0
        lengths = (x_all != 0).sum(1)
        for epoch in range(1, cfg.epochs + 1):
            module.train()
            total, count = 0.0, 0
            for rows in _length_bucketed_batches(lengths, cfg.batch_size, gen):
                width = int(lengths[rows].max())  # leading all-padding columns dropped: same result, less work
                x, y = x_all[rows, -width:].to(device), y_all[rows, -width:].to(device)
                h = module(x)
                mask = y != 0
                if cfg.loss == "ce":
                    logits = h[mask] @ module.item_emb.weight[1:].T
                    loss = F.cross_entropy(logits, y[mask] - 1)
                else:
                    neg = torch.randint(1, len(vocab) + 1, y.shape, generator=gen).to(device)
                    hm = h[mask]
                    pos_logit = (hm * module.item_emb(y[mask])).sum(-1)
                    neg_logit = (hm * module.item_emb(neg[mask])).sum(-1)
                    loss = F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit)) + (
                        F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit))
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                n = int(mask.sum())
                total, count = total + float(loss.detach()) * n, count + n
            record = {"epoch": float(epoch), "loss": total / max(1, count)}
            if valid:
                record["valid_ndcg10"] = _ndcg10(model, valid)
                if record["valid_ndcg10"] > best_score:
                    best_score, stale = record["valid_ndcg10"], 0
                    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
                else:
                    stale += 1
            model.history.append(record)
            if progress is not None:
                progress(record)
            if valid and cfg.patience and stale >= cfg.patience:
                break
        if best_state is not None:
            module.load_state_dict(best_state)
    module.eval()
    return model


def save_sasrec(model: SASRecModel, path: str | Path) -> None:
    """Write the model to a folder: ``model.safetensors`` plus ``sasrec.json`` (config, vocabulary, history)."""
    from safetensors.torch import save_file

    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.module.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        meta = {"config": asdict(model.cfg), "items": model.items, "history": model.history}
        (folder / "sasrec.json").write_text(json.dumps(meta), encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write SASRec model to {folder}: {exc.strerror or exc}") from exc


def load_sasrec(path: str | Path, device: str = "cpu") -> SASRecModel:
    """Read a model written by :func:`save_sasrec`."""
    from safetensors.torch import load_file

    folder = Path(path)
    try:
        meta = json.loads((folder / "sasrec.json").read_text(encoding="utf-8"))
        state = load_file(str(folder / "model.safetensors"), device=device)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read a SASRec model from {folder}: {exc}") from None
    cfg = SASRecConfig.from_dict({**meta["config"], "device": device})
    module = SASRec(len(meta["items"]), cfg).to(device)
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(f"{folder / 'model.safetensors'} does not match its sasrec.json: {str(exc).splitlines()[0]}") from None
    module.eval()
    return SASRecModel(module, list(meta["items"]), cfg, history=list(meta["history"]))
