"""Retrieval metrics on hand-made rankings whose answers are worked out by hand."""

import numpy as np
import pytest

from csearch.evaluation import metrics

# three queries, five ranks each; R = relevant items in the whole gallery
REL = np.array(
    [
        [1, 0, 1, 0, 0],  # hits at ranks 1 and 3, R = 2
        [0, 0, 0, 1, 0],  # first hit at rank 4, R = 3 (two never retrieved)
        [0, 0, 0, 0, 0],  # nothing found, R = 1
    ],
    bool,
)
R = np.array([2, 3, 1])


def test_relevance_pads_short_rankings_and_compares_labels():
    rel = metrics.relevance([["a", "b", "a"], ["x"], []], ["a", "x", "z"], depth=4)
    assert rel.tolist() == [[True, False, True, False], [True, False, False, False], [False] * 4]


def test_recall_at_k():
    assert metrics.recall_at_k(REL, 1).tolist() == [1, 0, 0]
    assert metrics.recall_at_k(REL, 3).tolist() == [1, 0, 0]
    assert metrics.recall_at_k(REL, 4).tolist() == [1, 1, 0]


def test_average_precision_at_k_by_hand():
    # q0: (P@1 * 1 + P@3 * 1) / min(2, 10) = (1 + 2/3) / 2 ; q1: (1/4) / 3 ; q2: 0
    expected = [(1 + 2 / 3) / 2, 0.25 / 3, 0.0]
    np.testing.assert_allclose(metrics.average_precision_at_k(REL, R, k=10), expected)


def test_average_precision_cuts_at_k_and_divides_by_min_r_k():
    rel = np.array([[0, 1, 1, 1]], bool)
    # k = 2: only rank 2 counts, P@2 = 1/2, divided by min(R=3, 2) = 2
    np.testing.assert_allclose(metrics.average_precision_at_k(rel, np.array([3]), k=2), [0.25])
    perfect = np.ones((1, 10), bool)
    np.testing.assert_allclose(metrics.average_precision_at_k(perfect, np.array([50]), k=10), [1.0])


def test_r_precision_and_reciprocal_rank():
    # q0: top-2 holds 1 of 2; q1: top-3 holds 0 of 3; q2: top-1 holds 0
    np.testing.assert_allclose(metrics.r_precision(REL, R), [0.5, 0.0, 0.0])
    np.testing.assert_allclose(metrics.reciprocal_rank(REL), [1.0, 0.25, 0.0])


def test_r_precision_when_ranking_is_shorter_than_r():
    rel = np.array([[1, 1]], bool)
    np.testing.assert_allclose(metrics.r_precision(rel, np.array([4])), [0.5])


def test_summarize_means_and_keys():
    out = metrics.summarize(REL, R)
    assert set(out) == {"recall@1", "recall@5", "recall@10", "recall@20", "map@10", "r_precision", "mrr"}
    assert out["recall@1"] == pytest.approx(1 / 3)
    assert out["recall@5"] == pytest.approx(2 / 3)
    assert out["mrr"] == pytest.approx((1 + 0.25) / 3)
    assert out["map@10"] == pytest.approx(((1 + 2 / 3) / 2 + 0.25 / 3) / 3)


def test_zero_relevant_scores_zero():
    rel = np.zeros((1, 3), bool)
    assert metrics.average_precision_at_k(rel, np.array([0])).tolist() == [0.0]
    assert metrics.r_precision(rel, np.array([0])).tolist() == [0.0]


@pytest.mark.parametrize(
    "rel, n_relevant, message",
    [
        (np.zeros((2, 3), int), np.array([1, 1]), "bool"),
        (np.zeros((2, 3), bool), np.array([1]), "shape"),
        (np.ones((1, 3), bool), np.array([2]), "more relevant"),
        (np.zeros((1, 3), bool), np.array([-1]), ">= 0"),
    ],
)
def test_bad_inputs_raise(rel, n_relevant, message):
    with pytest.raises(ValueError, match=message):
        metrics.average_precision_at_k(rel, n_relevant)


def test_latency_percentiles():
    rows = [{"search": float(v), "total": float(10 * v)} for v in range(1, 101)]
    rows.append({"total": 5.0})  # a stage missing from one query
    out = metrics.latency_percentiles(rows)
    assert out["search"]["p50"] == pytest.approx(50.5)
    assert out["search"]["p95"] == pytest.approx(95.05)
    assert out["total"]["p50"] == pytest.approx(500.0)
