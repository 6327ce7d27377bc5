"""WeaveRec metrics: hand-computed ranking values, tie policies, the generate protocol, bootstrap CIs, buckets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adaptermerge.errors import IncompatibleInputsError, ParameterError
from weaverec.metrics import (
    GENERATE_METRICS,
    RANK_METRICS,
    bucket_labels,
    bucket_users,
    generated_topk_metrics,
    metrics_from_generations,
    metrics_from_ranks,
    metrics_from_scores,
    paired_difference,
    rank_of_target,
    summarize,
    summarize_by_bucket,
)


def test_metrics_from_ranks_hand_values():
    m = metrics_from_ranks([0, 2, 4, 9, 10])
    assert tuple(m) == RANK_METRICS
    np.testing.assert_array_equal(m["HR@1"], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(m["HR@5"], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(m["HR@10"], [1, 1, 1, 1, 0])
    np.testing.assert_allclose(m["NDCG@5"], [1.0, 0.5, 1 / math.log2(6), 0, 0])
    np.testing.assert_allclose(m["NDCG@10"], [1.0, 0.5, 1 / math.log2(6), 1 / math.log2(11), 0])
    np.testing.assert_allclose(m["MRR"], [1.0, 1 / 3, 1 / 5, 1 / 10, 1 / 11])
    custom = {k: v.tolist() for k, v in metrics_from_ranks([1], hr_ks=[2], ndcg_ks=[1, 3]).items()}
    assert custom == {"HR@2": [1.0], "NDCG@1": [0.0], "NDCG@3": [pytest.approx(1 / math.log2(3))], "MRR": [0.5]}
    with pytest.raises(ParameterError, match="non-negative integers"):
        metrics_from_ranks([-1])
    with pytest.raises(ParameterError, match="non-negative integers"):
        metrics_from_ranks([0.5])


def test_metrics_from_scores_without_ties_match_sorting():
    rng = np.random.default_rng(0)
    scores = [rng.normal(size=int(rng.integers(5, 30))) for _ in range(50)]
    targets = [int(rng.integers(0, len(s))) for s in scores]
    got = metrics_from_scores(scores, targets)
    ranks = [list(np.argsort(-s, kind="stable")).index(t) for s, t in zip(scores, targets)]
    for name, values in metrics_from_ranks(ranks).items():
        np.testing.assert_allclose(got[name], values)


def test_tie_policies():
    scores, target = [1.0, 1.0, 1.0, 0.0, 2.0], 0  # one higher, two tied with the target
    assert rank_of_target(scores, target, ties="pessimistic") == 3
    assert rank_of_target(scores, target, ties="optimistic") == 1
    assert rank_of_target(scores, target) == 2.0  # expected
    pess = metrics_from_scores([scores], [target], ties="pessimistic")
    opt = metrics_from_scores([scores], [target], ties="optimistic")
    exp = metrics_from_scores([scores], [target])
    assert pess["MRR"][0] == pytest.approx(1 / 4) and opt["MRR"][0] == pytest.approx(1 / 2)
    assert exp["MRR"][0] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    assert exp["NDCG@5"][0] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(5)) / 3)
    assert exp["HR@1"][0] == 0.0 and opt["HR@5"][0] == 1.0
    # a constant scorer gets exactly chance level under "expected"
    const = metrics_from_scores([np.zeros(20)] * 3, [0, 7, 19])
    np.testing.assert_allclose(const["HR@5"], 5 / 20)
    np.testing.assert_allclose(const["MRR"], sum(1 / r for r in range(1, 21)) / 20)
    with pytest.raises(ParameterError, match="ties must be one of"):
        metrics_from_scores([scores], [0], ties="random")
    with pytest.raises(ParameterError, match="NaN"):
        metrics_from_scores([[0.1, float("nan")]], [0])
    with pytest.raises(ParameterError, match="target_index 5 is outside"):
        rank_of_target([1.0, 2.0], 5)
    with pytest.raises(IncompatibleInputsError, match="2 score arrays but 1 target"):
        metrics_from_scores([[1.0], [2.0]], [0])


def test_generated_topk_metrics():
    gen = ["A", "B", " Target ", "Target", "C"]
    m = generated_topk_metrics(gen, "Target")
    assert tuple(m) == GENERATE_METRICS
    assert m == {"NDCG@1": 0.0, "NDCG@3": 0.5, "NDCG@5": 0.5, "MRR@5": pytest.approx(1 / 3)}
    first = generated_topk_metrics(["Target", "x"], "Target")
    assert first == {"NDCG@1": 1.0, "NDCG@3": 1.0, "NDCG@5": 1.0, "MRR@5": 1.0}
    fourth = generated_topk_metrics(["a", "b", "c", "Target"], "Target")
    assert fourth == {"NDCG@1": 0.0, "NDCG@3": 0.0, "NDCG@5": pytest.approx(1 / math.log2(5)), "MRR@5": 0.25}
    beyond = generated_topk_metrics(["a", "b", "c", "d", "e", "Target"], "Target")  # only the top 5 count
    assert set(beyond.values()) == {0.0}
    assert set(generated_topk_metrics([], "Target").values()) == {0.0}
    assert set(generated_topk_metrics(["target"], "Target").values()) == {0.0}  # exact match: case matters
    with pytest.raises(ParameterError, match="not one string"):
        generated_topk_metrics("Target", "Target")
    many = metrics_from_generations([gen, ["Target"], ["x"]], ["Target", "Target", "Target"])
    assert list(many) == list(GENERATE_METRICS)
    np.testing.assert_allclose(many["NDCG@3"], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(many["MRR@5"], [1 / 3, 1.0, 0.0])
    with pytest.raises(IncompatibleInputsError, match="2 generated lists but 1 target"):
        metrics_from_generations([[], []], ["a"])


def test_summarize_constant_and_binomial():
    const = summarize({"HR@1": [0.25] * 40}, n_boot=200)
    assert (const["HR@1"].mean, const["HR@1"].low, const["HR@1"].high, const["HR@1"].n) == (0.25, 0.25, 0.25, 40)
    rng = np.random.default_rng(5)
    hits = (rng.random(4000) < 0.3).astype(float)
    s = summarize({"HR": hits}, n_boot=2000, seed=1)["HR"]
    p, se = hits.mean(), math.sqrt(hits.mean() * (1 - hits.mean()) / hits.size)
    assert s.mean == pytest.approx(p)
    assert s.low < p < s.high
    assert s.low == pytest.approx(p - 1.96 * se, abs=0.25 * se)  # percentile CI ~ normal CI for n = 4000
    assert s.high == pytest.approx(p + 1.96 * se, abs=0.25 * se)


def test_summarize_ci_shrinks_and_is_seeded():
    rng = np.random.default_rng(2)
    small = rng.random(50)
    large = rng.random(5000)
    ws = summarize({"m": small})["m"]
    wl = summarize({"m": large})["m"]
    assert (wl.high - wl.low) < (ws.high - ws.low) / 5  # width ~ 1/sqrt(n): 10x more users -> ~10x narrower
    assert summarize({"m": small}, seed=3) == summarize({"m": small}, seed=3)
    assert summarize({"m": small}, seed=3) != summarize({"m": small}, seed=4)
    rows = [{"a": float(x), "b": 1.0} for x in small]  # list-of-dicts form gives the same answer
    assert summarize(rows)["a"] == ws
    with pytest.raises(IncompatibleInputsError, match="one length"):
        summarize({"a": [1.0, 2.0], "b": [1.0]})
    with pytest.raises(ParameterError, match="n_boot"):
        summarize({"a": [1.0]}, n_boot=0)


def test_paired_difference():
    rng = np.random.default_rng(3)
    b = rng.random(300)
    shifted = paired_difference(b + 0.1, b, n_boot=500)
    assert shifted.mean == pytest.approx(0.1) and shifted.low == pytest.approx(0.1) and shifted.high == pytest.approx(0.1)
    assert shifted.p_value == 0.0 and shifted.n == 300
    # correlated systems: the paired CI is much narrower than the spread of either system's own mean
    a = b + rng.normal(0.02, 0.01, size=300)
    d = paired_difference(a, b)
    assert d.low < 0.02 < d.high and d.low > 0
    own = summarize({"a": a})["a"]
    assert (d.high - d.low) < (own.high - own.low) / 10
    same = paired_difference(b, b)
    assert same.mean == 0.0 and same.p_value == 1.0
    multi = paired_difference({"x": b + 1, "y": b}, {"x": b, "y": b})
    assert multi["x"].mean == pytest.approx(1.0) and multi["y"].mean == 0.0
    with pytest.raises(IncompatibleInputsError, match="a has 300 users but b has 299"):
        paired_difference(b, b[:-1])
    with pytest.raises(IncompatibleInputsError, match="different metrics"):
        paired_difference({"x": b}, {"y": b})


def test_cold_start_buckets():
    assert bucket_labels() == ["<=3", "4-10", ">10"]
    assert bucket_labels([1, 2, 5]) == ["<=1", "2", "3-5", ">5"]
    lens = [0, 3, 4, 10, 11, 50, 7]
    groups = bucket_users(lens)
    assert list(groups) == ["<=3", "4-10", ">10"]
    assert [g.tolist() for g in groups.values()] == [[0, 1], [2, 3, 6], [4, 5]]
    assert [g.tolist() for g in bucket_users(lens, [100]).values()] == [list(range(7)), []]
    with pytest.raises(ParameterError, match="strictly increasing"):
        bucket_users(lens, [5, 5])
    per_user = {"HR@1": np.array([1, 0, 1, 1, 0, 0, 0], dtype=float)}
    by = summarize_by_bucket(per_user, lens, [3, 10, 100], n_boot=100)
    assert by["<=3"]["HR@1"].mean == 0.5 and by["4-10"]["HR@1"].mean == pytest.approx(2 / 3)
    assert by["11-100"]["HR@1"].mean == 0.0 and by[">100"] is None
