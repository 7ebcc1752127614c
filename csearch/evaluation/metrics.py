"""Retrieval metrics: small pure functions over a relevance matrix (classifier metrics: confusion.py).

`rel` is a bool array (Q, L): rel[q, i] is True when the i-th result (0-based) of query q is
relevant (the same product). `n_relevant` (Q,) is R, the number of relevant gallery items per
query, counted over the whole gallery (not just the L ranks returned), so a ranking truncated
before all relevant items is scored as missing them. Every function returns per-query values
(Q,); `summarize` averages them. A query with R = 0 scores 0 on every metric: callers should
drop such queries and report how many they dropped.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np


def _check(rel: np.ndarray, n_relevant: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    rel = np.asarray(rel)
    if rel.ndim != 2 or rel.dtype != bool:
        raise ValueError(f"rel must be a bool array (queries, ranks), got {rel.dtype} {rel.shape}")
    if n_relevant is None:
        return rel, None
    n_relevant = np.asarray(n_relevant)
    if n_relevant.shape != (rel.shape[0],):
        raise ValueError(f"n_relevant must have shape ({rel.shape[0]},), got {n_relevant.shape}")
    if (n_relevant < 0).any():
        raise ValueError("n_relevant must be >= 0")
    if (rel.sum(axis=1) > n_relevant).any():
        raise ValueError("a ranking holds more relevant items than n_relevant says exist")
    return rel, n_relevant.astype(np.int64)


def relevance(
    rankings: Sequence[Sequence[Hashable]], labels: Sequence[Hashable], depth: int | None = None
) -> np.ndarray:
    """bool (Q, depth): rankings[q][i] == labels[q]; shorter rankings are padded as not relevant."""
    if len(rankings) != len(labels):
        raise ValueError(f"{len(rankings)} rankings for {len(labels)} labels")
    depth = max((len(r) for r in rankings), default=0) if depth is None else int(depth)
    rel = np.zeros((len(rankings), depth), bool)
    for q, (ranking, label) in enumerate(zip(rankings, labels)):
        row = [item == label for item in list(ranking)[:depth]]
        rel[q, : len(row)] = row
    return rel


def recall_at_k(rel: np.ndarray, k: int) -> np.ndarray:
    """1 when any of the top k is relevant ("identical recall"), else 0."""
    rel, _ = _check(rel)
    return rel[:, :k].any(axis=1).astype(np.float64)


def precision_at_k(rel: np.ndarray, k: int) -> np.ndarray:
    """Relevant fraction of the top k (ranks beyond the list count as not relevant)."""
    rel, _ = _check(rel)
    return rel[:, :k].sum(axis=1) / float(k)


def average_precision_at_k(rel: np.ndarray, n_relevant: np.ndarray, k: int = 10) -> np.ndarray:
    """AP@k = (1 / min(R, k)) * sum_{i<=k} P@i * rel_i; 0 when R = 0."""
    rel, n_relevant = _check(rel, n_relevant)
    top = rel[:, :k].astype(np.float64)
    ranks = np.arange(1, top.shape[1] + 1)
    precision = np.cumsum(top, axis=1) / ranks
    total = (precision * top).sum(axis=1)
    denominator = np.minimum(n_relevant, k)
    return np.divide(total, denominator, out=np.zeros_like(total), where=denominator > 0)


def r_precision(rel: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """Relevant fraction of the top R; 0 when R = 0."""
    rel, n_relevant = _check(rel, n_relevant)
    hits_in_top = np.cumsum(rel, axis=1)
    out = np.zeros(rel.shape[0])
    for q, r in enumerate(n_relevant):
        if r > 0 and rel.shape[1] > 0:
            out[q] = hits_in_top[q, min(r, rel.shape[1]) - 1] / r
    return out


def reciprocal_rank(rel: np.ndarray) -> np.ndarray:
    """1 / rank of the first relevant result; 0 when none is in the list."""
    rel, _ = _check(rel)
    found = rel.any(axis=1)
    first = rel.argmax(axis=1) + 1
    return np.where(found, 1.0 / first, 0.0)


def summarize(
    rel: np.ndarray, n_relevant: np.ndarray, recall_ks: Iterable[int] = (1, 5, 10, 20), map_k: int = 10
) -> dict[str, float]:
    """Mean metrics over queries, keyed as in retrieval.json (`recall@K`, `map@10`, ...)."""
    rel, n_relevant = _check(rel, n_relevant)
    if rel.shape[0] == 0:
        raise ValueError("no queries to summarize")
    out = {f"recall@{k}": float(recall_at_k(rel, k).mean()) for k in recall_ks}
    out[f"map@{map_k}"] = float(average_precision_at_k(rel, n_relevant, map_k).mean())
    out["r_precision"] = float(r_precision(rel, n_relevant).mean())
    out["mrr"] = float(reciprocal_rank(rel).mean())
    return out


def latency_percentiles(
    timings: Sequence[Mapping[str, float]], percentiles: Sequence[float] = (50, 95)
) -> dict[str, dict[str, float]]:
    """{stage: {"p50": ms, "p95": ms, "mean": ms}} over queries; a stage missing from some
    queries is summarised over the queries that have it."""
    stages: dict[str, list[float]] = {}
    for row in timings:
        for stage, value in row.items():
            stages.setdefault(stage, []).append(float(value))
    out = {}
    for stage, values in stages.items():
        array = np.asarray(values)
        out[stage] = {f"p{p:g}": float(np.percentile(array, p)) for p in percentiles}
        out[stage]["mean"] = float(array.mean())
    return out
