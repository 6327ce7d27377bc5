"""WeaveRec non-LLM baselines: SASRec, first-order transitions and popularity on the same candidate lists."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from adaptermerge.errors import IncompatibleInputsError, ParameterError
from weaverec.baselines import (
    SASRec,
    SASRecConfig,
    fit_popularity,
    fit_sasrec,
    fit_transition,
    load_sasrec,
    popularity_scores,
    save_sasrec,
    score_candidates,
)
from weaverec.data import CDSRData, build_samples, training_sequences
from weaverec.types import Item, Sample

N_ITEMS = 40


def cyclic_data(n_users: int = 240, seed: int = 0) -> CDSRData:
    """Users walk the items in order (i -> i+1 mod 40) from a random start, for 8..14 steps."""
    rng = np.random.default_rng(seed)
    seqs = {}
    for u in range(n_users):
        start, n = int(rng.integers(0, N_ITEMS)), int(rng.integers(8, 15))
        seqs[f"u{u:03d}"] = [f"m{(start + k) % N_ITEMS:02d}" for k in range(n)]
    items = {f"m{k:02d}": Item(f"m{k:02d}", f"Movie {k}", "d") for k in range(N_ITEMS)}
    return CDSRData(items=items, sequences={"d": seqs}, domains=["d"])


@pytest.fixture(scope="module")
def cyclic():
    data = cyclic_data()
    return data, build_samples(data, "d", n_candidates=10, history_len=6, seed=0), training_sequences(data, "d")


SMALL = SASRecConfig(hidden=32, n_layers=1, n_heads=2, max_len=16, epochs=25, batch_size=64, lr=5e-3, dropout=0.1)


@pytest.fixture(scope="module")
def sasrec(cyclic):
    data, _, train = cyclic
    return fit_sasrec(train, data.domain_items("d"), SMALL)


def top1_rate(scores, samples) -> float:
    return float(np.mean([int(np.argmax(s)) == x.target_index for s, x in zip(scores, samples)]))


def test_sasrec_learns_the_transition_pattern(cyclic, sasrec):
    _, splits, _ = cyclic
    scores = score_candidates(sasrec, splits.test)
    assert all(s.shape == (10,) and s.dtype == np.float64 for s in scores)
    assert top1_rate(scores, splits.test) >= 0.9
    assert sasrec.history[-1]["loss"] < sasrec.history[0]["loss"] / 2


def test_sasrec_bce_variant_learns_too(cyclic):
    data, splits, train = cyclic
    cfg = SASRecConfig(hidden=32, n_layers=1, max_len=16, epochs=30, batch_size=64, lr=5e-3, dropout=0.1, loss="bce")
    model = fit_sasrec(train, data.domain_items("d"), cfg)
    assert top1_rate(score_candidates(model, splits.test), splits.test) >= 0.8


def test_sasrec_is_seeded_and_leaves_global_rng_alone(cyclic, sasrec):
    data, splits, train = cyclic
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = fit_sasrec(train, data.domain_items("d"), SMALL)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream was not consumed
    a, b = score_candidates(sasrec, splits.test[:20]), score_candidates(again, splits.test[:20])
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    other = fit_sasrec(train, data.domain_items("d"), replace(SMALL, epochs=1, seed=1))
    assert not np.array_equal(score_candidates(other, splits.test[:1])[0], a[0])


def test_sasrec_attention_is_causal_and_padding_safe():
    torch.manual_seed(0)
    module = SASRec(10, SASRecConfig(hidden=16, n_heads=2, max_len=6, dropout=0.0)).eval()
    seq = torch.tensor([[0, 0, 3, 4, 5, 6]])
    changed = torch.tensor([[0, 0, 3, 4, 9, 1]])
    with torch.no_grad():
        h, h2 = module(seq), module(changed)
        torch.testing.assert_close(h[:, :4], h2[:, :4])  # positions before the change do not see it
        assert not torch.allclose(h[:, 4:], h2[:, 4:])
        # a short history scored alone equals the same history left-padded inside a wider batch
        trimmed = module(seq[:, 2:])
        torch.testing.assert_close(trimmed[:, -1], h[:, -1])
        assert torch.isfinite(module(torch.zeros(1, 6, dtype=torch.long))).all()


def test_sasrec_scores_are_batch_independent_and_roundtrip(cyclic, sasrec, tmp_path):
    _, splits, _ = cyclic
    batch = score_candidates(sasrec, splits.test[:30])
    single = [sasrec.score_samples([s])[0] for s in splits.test[:30]]
    for x, y in zip(batch, single):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    # the score is the dot product of the last hidden state with the candidate's embedding
    s = splits.test[0]
    idx = torch.tensor([[0] * (SMALL.max_len - len(s.history)) + [sasrec.items.index(h) + 1 for h in s.history]])
    with torch.no_grad():
        last = sasrec.module(idx)[0, -1]
        emb = sasrec.module.item_emb.weight[[sasrec.items.index(c) + 1 for c in s.candidates]]
    np.testing.assert_allclose(batch[0], (emb @ last).numpy(), rtol=1e-5, atol=1e-5)
    save_sasrec(sasrec, tmp_path / "m")
    loaded = load_sasrec(tmp_path / "m")
    assert loaded.items == sasrec.items and loaded.cfg == sasrec.cfg
    for x, y in zip(score_candidates(loaded, splits.test[:30]), batch):
        np.testing.assert_array_equal(x, y)


def test_sasrec_early_stopping_keeps_best_epoch(cyclic):
    data, splits, train = cyclic
    cfg = replace(SMALL, epochs=6, patience=2)
    seen = []
    model = fit_sasrec(train, data.domain_items("d"), cfg, valid=splits.valid[:60], progress=seen.append)
    assert seen == model.history and all("valid_ndcg10" in r for r in seen)
    best = max(r["valid_ndcg10"] for r in seen)
    rescored = score_candidates(model, splits.valid[:60])
    ndcg = np.mean([
        (1 / np.log2(r + 2) if r < 10 else 0.0)
        for r in (int((s > s[x.target_index]).sum()) for s, x in zip(rescored, splits.valid[:60]))
    ])
    assert ndcg == pytest.approx(best, abs=1e-9)


def test_sasrec_errors(cyclic, sasrec):
    data, splits, train = cyclic
    with pytest.raises(ParameterError, match="divisible by n_heads"):
        SASRecConfig(hidden=30, n_heads=4)
    with pytest.raises(ParameterError, match="loss must be"):
        SASRecConfig(loss="bpr")
    with pytest.raises(ParameterError, match="unknown SASRec config keys \\['layers'\\]"):
        SASRecConfig.from_dict({"layers": 2})
    assert SASRecConfig.from_dict({"epochs": 3}).epochs == 3
    with pytest.raises(IncompatibleInputsError, match="training item 'zz' is not among"):
        fit_sasrec({"u": ["m00", "zz"]}, data.domain_items("d"), SMALL)
    with pytest.raises(ParameterError, match="no training transitions"):
        fit_sasrec({"u": ["m00"]}, data.domain_items("d"), SMALL)
    s = splits.test[0]
    foreign = Sample(s.user, "other", s.history, s.history_titles, "zz", "Z", ("zz",) + s.candidates[1:],
                     ("Z",) + s.candidate_titles[1:], 0, s.full_history_len)
    with pytest.raises(IncompatibleInputsError, match="candidate item 'zz' is not in the SASRec item vocabulary"):
        score_candidates(sasrec, [foreign])
    with pytest.raises(ParameterError, match="not a candidate scorer"):
        score_candidates(object(), [s])


def test_transition_model_is_exact_on_the_pattern(cyclic):
    _, splits, train = cyclic
    model = fit_transition(train)
    assert top1_rate(score_candidates(model, splits.test), splits.test) == 1.0
    # hand-computed scores on a tiny case: a->b twice, a->c once; popularity back-off below 1
    tiny = fit_transition({"u": ["a", "b", "a", "c"], "v": ["a", "b"]})
    sample = Sample("w", "d", ("x", "a"), ("X", "A"), "b", "B", ("c", "b", "z"), ("C", "B", "Z"), 1, 2)
    (scores,) = tiny.score_samples([sample])
    np.testing.assert_allclose(scores, [1 + 1 / 7, 2 + 2 / 7, 0.0])


def test_popularity():
    train = {"u": ["a", "b", "a"], "v": ["b", "c", "b"], "w": ["b"]}
    sample = Sample("x", "d", ("c",), ("C",), "a", "A", ("c", "a", "b", "q"), ("C", "A", "B", "Q"), 1, 1)
    (scores,) = popularity_scores(train, [sample])
    np.testing.assert_array_equal(scores, [1.0, 2.0, 4.0, 0.0])
    assert fit_popularity([["a"], ["a", "c"]]).counts == {"a": 2, "c": 1}
    with pytest.raises(ParameterError, match="not a string"):
        fit_popularity([["a"], "abc"])
