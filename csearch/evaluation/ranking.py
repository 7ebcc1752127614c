"""Rank every query against an index and score the rankings.

The ranking of one query is what `Engine.search` returns, extended to any depth: exact KNN over
the allowed rows (category restriction minus the query itself), the first `rerank_top`
candidates re-ordered by the re-ranker, then the remaining candidates in KNN order. For
k <= rerank_top it equals `Engine.search(..., k)` (tests/test_retrieval_eval.py checks this), and
metrics at deeper cut-offs (Recall@20, R-Precision, MRR) score the ranking a user paging
through results would see.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from .. import metrics
from ..config import Config
from ..pipeline import searched_categories
from .features import QueryFeatures

# (query row, candidate gallery rows, their distances) -> new order of the candidates
Reranker = Callable[[int, np.ndarray, np.ndarray], np.ndarray]

RESTRICTIONS = ("off", "predicted", "oracle")


@dataclass
class Evaluation:
    """Rankings and metrics of one (features, search settings) pair."""

    metrics: dict
    rankings: list  # per kept query: gallery rows, best first
    kept: np.ndarray  # query rows scored (those with >= 1 relevant gallery item)
    n_relevant: np.ndarray
    rel: np.ndarray
    timings: list = field(default_factory=list)  # per query {"search": ms, "rerank": ms}


def self_rows(store, records) -> list[np.ndarray]:
    """Per query, the gallery rows holding the same file: excluded from its results."""
    by_path: dict = {}
    for row, path in enumerate(store.paths):
        by_path.setdefault(path, []).append(row)
    return [np.array(by_path.get(str(r.path), []), np.int64) for r in records]


def query_categories(queries: QueryFeatures, row: int, config: Config, restriction: str) -> Optional[list[str]]:
    """The categories a query searches: none (all), the classifier's top-n, or the true one."""
    if restriction == "off":
        return None
    if restriction == "oracle":
        return [queries.records[row].category]
    if restriction == "predicted":
        if queries.probs is None:
            raise ValueError("restriction 'predicted' needs classifier probabilities for the queries")
        return searched_categories(queries.prediction(row, config.classify.top_n), None, config)
    raise ValueError(f"restriction must be one of {RESTRICTIONS}, got {restriction!r}")


def allowed_rows(store, categories: Optional[Sequence[str]], exclude: np.ndarray) -> Optional[np.ndarray]:
    rows = store.rows_for_categories(categories) if categories else None
    if len(exclude):
        keep = np.ones(len(store), bool)
        keep[exclude] = False
        rows = np.flatnonzero(keep) if rows is None else rows[keep[rows]]
    return rows


def library_reranker(store, queries: QueryFeatures, config: Config) -> Optional[Reranker]:
    """csearch.search's re-ranking with the config's method (None for 'none'): the production path."""
    from ..search import rerank_with_masks
    from ..masks import pack_masks

    cfg = config.search
    if cfg.rerank == "none":
        return None
    query_bits = pack_masks(queries.masks)
    bits, boxes = np.asarray(store.mask_bits), np.asarray(store.boxes)

    def reorder(q: int, rows: np.ndarray, distances: np.ndarray) -> np.ndarray:
        order, _, _ = rerank_with_masks(distances, query_bits[q], queries.boxes[q], bits[rows], boxes[rows],
                                        store.mask_size, method=cfg.rerank, weight=cfg.rerank_weight)
        return np.asarray(order)

    return reorder


def rank_queries(store, queries: QueryFeatures, config: Config, restriction: str = "off",
                 reranker: Optional[Reranker] = None, use_library_reranker: bool = True,
                 depth: Optional[int] = None, exclude_self: bool = True,
                 progress: Optional[Callable[[int], None]] = None) -> Evaluation:
    """Rank every query that has a relevant gallery item and score the rankings."""
    from ..knn import knn

    cfg = config.search
    if reranker is None and use_library_reranker:
        reranker = library_reranker(store, queries, config)
    gallery_products = np.array(store.products, dtype=object)
    excluded = self_rows(store, queries.records) if exclude_self else [np.zeros(0, np.int64)] * len(queries)
    depth = len(store) if depth is None else min(int(depth), len(store))
    kept, n_relevant, rankings, timings = [], [], [], []
    for q, record in enumerate(queries.records):
        if progress:
            progress(1)
        relevant = int(np.count_nonzero(gallery_products == record.product)) if record.product else 0
        relevant -= int(np.count_nonzero(gallery_products[excluded[q]] == record.product)) if record.product else 0
        if relevant == 0:
            continue
        started = time.perf_counter()
        rows = allowed_rows(store, query_categories(queries, q, config, restriction), excluded[q])
        found, distances = knn(store.vectors, queries.vectors[q][None], depth, rows=rows, engine=cfg.engine)
        found, distances = np.asarray(found[0]), np.asarray(distances[0])
        searched = time.perf_counter()
        if reranker is not None and len(found):
            top = min(cfg.rerank_top, len(found))
            order = np.asarray(reranker(q, found[:top], distances[:top]))
            found = np.concatenate([found[:top][order], found[top:]])
        timings.append({"search": (searched - started) * 1e3, "rerank": (time.perf_counter() - searched) * 1e3})
        kept.append(q)
        n_relevant.append(relevant)
        rankings.append(found)
    if not kept:
        raise ValueError("no query has a relevant item (same product) in the gallery")
    n_relevant = np.array(n_relevant)
    labels = [queries.records[q].product for q in kept]
    rel = metrics.relevance([gallery_products[r] for r in rankings], labels, depth)
    summary = metrics.summarize(rel, n_relevant)
    return Evaluation(summary, rankings, np.array(kept), n_relevant, rel, timings)


def category_accuracy(queries: QueryFeatures) -> Optional[float]:
    """Top-1 classifier accuracy on the labelled queries; None without a classifier."""
    if queries.probs is None:
        return None
    labelled = [i for i, r in enumerate(queries.records) if r.category is not None]
    if not labelled:
        return None
    correct = [queries.prediction(i, 1).category == queries.records[i].category for i in labelled]
    return float(np.mean(correct))
