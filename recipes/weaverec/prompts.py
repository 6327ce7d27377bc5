"""Instruction prompts for WeaveRec and their tokenisation (prompt ids, answer ids, loss mask).

The prompts follow the authors' protocol: the system message is ``"You are a helpful recommendation assistant."``,
the user message lists the user's history as titles joined by ``" || "`` (oldest first) and the candidate titles,
and the assistant turn is the answer. Two tasks share that frame:

``"next"``
    asks which candidate the user will interact with next; the answer is the target title. Used for training and
    for ranking by candidate likelihood (every candidate title is scored as the answer).
``"top5"``
    the authors' variant: pick the top ``k`` candidates and order them; the answer is ``k`` titles joined by the
    separator. As in the authors' data builder, the training answer is the target first, then ``k - 1`` other
    candidates drawn at random (seeded per sample). Used for the generate protocol.

Tokenisation is split into prompt ids and answer ids so that the loss mask and candidate scoring are exact: the
prompt is the chat template rendered with ``add_generation_prompt=True``; the answer is the answer text followed by
the template's end-of-turn token (for ChatML: ``<|im_end|>``), found by rendering a probe conversation. Tokenizers
without a chat template use a plain ``System:/User:/Assistant:`` format and the tokenizer's EOS token.

When ``max_seq_len`` is given, the *oldest* history titles are dropped until prompt + answer fit; candidate titles
are never dropped. This module does not import torch or transformers: any Hugging Face tokenizer works.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from adaptermerge.errors import InputError, ParameterError
from recipe_common.chat import chat_answer_format, render_chat
from recipe_common.types import IGNORE_INDEX, EncodedExample

from .titles import display_title
from .types import Sample

SYSTEM_PROMPT = "You are a helpful recommendation assistant."
Task = Literal["next", "top5"]
TASKS: tuple[str, ...] = ("next", "top5")


@dataclass(frozen=True)
class PromptConfig:
    """How prompts are worded. ``noun`` names the items ("movie", "product"); ``plural`` defaults to noun + "s"."""

    noun: str = "item"
    plural: str | None = None
    separator: str = " || "
    include_candidates: bool = True
    system: str = SYSTEM_PROMPT
    top_k: int = 5
    uninvert_articles: bool = False  # "Matrix, The (1999)" -> "The Matrix (1999)" (see weaverec.titles)
    keep_year: bool = True  # False drops a trailing "(1999)"

    def show(self, title: str) -> str:
        """The title as the model sees it, in prompts and answers."""
        if not self.uninvert_articles and self.keep_year:
            return title.strip()
        return display_title(title, uninvert_articles=self.uninvert_articles, keep_year=self.keep_year)

    def __post_init__(self) -> None:
        if not self.noun.strip():
            raise ParameterError("prompt noun must be a non-empty word such as 'movie' or 'product'")
        if "||" not in self.separator:
            raise ParameterError(f"prompt separator {self.separator!r} must contain '||' (answers are parsed on it)")
        if self.top_k < 1:
            raise ParameterError(f"prompt top_k must be >= 1, got {self.top_k}")

    @property
    def nouns(self) -> str:
        """The plural noun."""
        return self.plural or f"{self.noun}s"


def _join(titles: Sequence[str], cfg: PromptConfig) -> str:
    return cfg.separator.join(cfg.show(t) for t in titles)


def _history_sentence(history_titles: Sequence[str], cfg: PromptConfig) -> str:
    if not history_titles:
        return f"The user has not interacted with any {cfg.nouns} yet."
    return f"Here are the {cfg.nouns} a user interacted with, oldest first: [{_join(history_titles, cfg)}]."


def user_message(sample: Sample, cfg: PromptConfig, task: Task = "next", n_history: int | None = None) -> str:
    """The user turn for ``sample``, keeping the last ``n_history`` history titles (all when None)."""
    if task not in TASKS:
        raise ParameterError(f"prompt task must be one of {', '.join(TASKS)}, got {task!r}")
    titles = sample.history_titles
    history = titles if n_history is None else titles[len(titles) - n_history :]
    parts = [_history_sentence(history, cfg)]
    if task == "top5":
        parts.append(f"Candidate {cfg.nouns}: [{_join(sample.candidate_titles, cfg)}].")
        parts.append(
            f"Pick the {cfg.top_k} candidate {cfg.nouns} the user is most likely to interact with next and order them "
            f"from most to least likely. Answer with their titles only, separated by \"{cfg.separator.strip()}\"."
        )
    elif cfg.include_candidates:
        parts.append(f"Candidate {cfg.nouns}: [{_join(sample.candidate_titles, cfg)}].")
        parts.append(f"Which candidate {cfg.noun} will the user interact with next? Answer with its title only.")
    else:
        parts.append(f"Which {cfg.noun} will the user interact with next? Answer with its title only.")
    return " ".join(parts)


def messages(
    sample: Sample, cfg: PromptConfig, task: Task = "next", n_history: int | None = None
) -> list[dict[str, str]]:
    """System and user messages (no assistant turn) in the chat format ``[{"role": ..., "content": ...}]``."""
    return [
        {"role": "system", "content": cfg.system},
        {"role": "user", "content": user_message(sample, cfg, task, n_history)},
    ]


def _stable_seed(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def topk_answer_titles(sample: Sample, k: int = 5, seed: int = 0) -> list[str]:
    """The authors' top-k training answer: the target title, then ``k - 1`` other candidates in random order.

    The draw is seeded by ``seed`` and the sample's (domain, user, target), so it is reproducible and independent
    of sample order.
    """
    others = [t for i, t in enumerate(sample.candidate_titles) if i != sample.target_index]
    rng = random.Random(_stable_seed(seed, sample.domain, sample.user, sample.target))
    picked = rng.sample(others, min(k - 1, len(others)))
    return [sample.target_title, *picked]


def answer_text(sample: Sample, cfg: PromptConfig, task: Task = "next", seed: int = 0) -> str:
    """The assistant answer used for training on ``sample``."""
    if task == "next":
        return cfg.show(sample.target_title)
    return _join(topk_answer_titles(sample, cfg.top_k, seed), cfg)


_ENUMERATION = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*\u2022])\s+")


def parse_titles(text: str, k: int | None = None) -> list[str]:
    """Split a generated answer on ``||`` into stripped, non-empty, de-duplicated titles (first ``k``).

    A leading list marker that small models like to add ("1. ", "2) ", "- ") is removed; brackets around the list
    are dropped.
    """
    seen: list[str] = []
    for part in text.split("||"):
        title = _ENUMERATION.sub("", part.strip().strip("[]")).strip()
        if title and title not in seen:
            seen.append(title)
    return seen if k is None else seen[:k]


@dataclass(frozen=True)
class ScoringInputs:
    """Prompt ids once, and the answer ids (title + end-of-turn) of every candidate, in candidate order."""

    prompt_ids: tuple[int, ...]
    candidate_ids: tuple[tuple[int, ...], ...]
    n_history: int


class PromptEncoder:
    """Turns Samples into token ids with a given tokenizer and PromptConfig.

    Probes the tokenizer's chat template once to find what it puts around the assistant content, so that the
    prompt ids + answer ids equal the ids of the fully rendered conversation (up to the template's trailing
    whitespace after the end-of-turn token).
    """

    def __init__(self, tokenizer: Any, cfg: PromptConfig | None = None):
        self.tokenizer = tokenizer
        self.cfg = cfg or PromptConfig()
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.answer_prefix, self.end_ids = self._probe()

    # ----------------------------------------------------------------------------------------------- template probe
    def _probe(self) -> tuple[str, tuple[int, ...]]:
        """Return (text the template puts before the answer content, token ids that end the answer)."""
        return chat_answer_format(self.tokenizer)

    def _render(self, msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        return render_chat(self.tokenizer, msgs, generation_prompt)

    def _ids(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    # -------------------------------------------------------------------------------------------------- encoding
    def prompt_text(self, sample: Sample, task: Task = "next", n_history: int | None = None) -> str:
        """The rendered prompt, ending where the assistant answer starts."""
        msgs = messages(sample, self.cfg, task, n_history)
        if self.uses_chat_template:
            return self._render(msgs, generation_prompt=True)
        return f"System: {msgs[0]['content']}\n\nUser: {msgs[1]['content']}\n\nAssistant: "

    def prompt_ids(self, sample: Sample, task: Task = "next", n_history: int | None = None) -> list[int]:
        """Token ids of :meth:`prompt_text` (the plain format lets the tokenizer add its BOS)."""
        return self._ids(self.prompt_text(sample, task, n_history), add_special_tokens=not self.uses_chat_template)

    def answer_ids(self, text: str) -> list[int]:
        """Token ids of one answer: template prefix + text + end-of-turn token(s)."""
        return self._ids(self.answer_prefix + text) + list(self.end_ids)

    def fit_prompt(self, sample: Sample, task: Task, answer_len: int, max_seq_len: int | None) -> tuple[list[int], int]:
        """Prompt ids with as many (most recent) history titles as fit ``max_seq_len - answer_len``.

        Returns (ids, number of history titles kept). Binary search: the prompt grows with the history.
        """
        n_full = len(sample.history_titles)
        ids = self.prompt_ids(sample, task, n_full)
        if max_seq_len is None or len(ids) + answer_len <= max_seq_len:
            return ids, n_full
        budget = max_seq_len - answer_len
        lo, hi, best = 0, n_full - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            cand = self.prompt_ids(sample, task, mid)
            if len(cand) <= budget:
                best, lo = (cand, mid), mid + 1
            else:
                hi = mid - 1
        if best is None:
            raise ParameterError(
                f"max_seq_len={max_seq_len} is too short for user {sample.user!r}: the prompt without history takes "
                f"{len(self.prompt_ids(sample, task, 0))} tokens and the answer {answer_len}"
            )
        return best

    def encode_training(
        self, sample: Sample, task: Task = "next", max_seq_len: int | None = None, seed: int = 0
    ) -> EncodedExample:
        """Prompt + answer ids, with labels only on the answer tokens (including the end-of-turn token)."""
        answer = self.answer_ids(answer_text(sample, self.cfg, task, seed))
        prompt, n_hist = self.fit_prompt(sample, task, len(answer), max_seq_len)
        return EncodedExample(
            input_ids=tuple(prompt + answer),
            labels=tuple([IGNORE_INDEX] * len(prompt) + answer),
            prompt_len=len(prompt),
            n_history=n_hist,
        )

    def encode_scoring(self, sample: Sample, max_seq_len: int | None = None) -> ScoringInputs:
        """The "next" prompt and every candidate's answer ids; history trimmed so the longest candidate fits."""
        if not sample.candidate_titles:
            raise InputError(f"sample of user {sample.user!r} has no candidates to score")
        cands = tuple(tuple(self.answer_ids(self.cfg.show(t))) for t in sample.candidate_titles)
        prompt, n_hist = self.fit_prompt(sample, "next", max(len(c) for c in cands), max_seq_len)
        return ScoringInputs(prompt_ids=tuple(prompt), candidate_ids=cands, n_history=n_hist)

    def encode_generation(self, sample: Sample, max_new_tokens: int, max_seq_len: int | None = None) -> list[int]:
        """The "top5" prompt ids, history trimmed so that ``max_new_tokens`` still fit."""
        return self.fit_prompt(sample, "top5", max_new_tokens, max_seq_len)[0]
