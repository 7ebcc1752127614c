"""Rank every query against an index and score the rankings.

A query's ranking is `csearch.search.search_snapshot`, the function `Engine.search` answers
with, asked for every allowed gallery row instead of k: the category restriction minus the query
itself, exact KNN, the first `rerank_top` candidates re-ordered, the rest in KNN order. Its first
k rows are what `Engine.search(..., k)` returns, and metrics at deeper cut-offs (Recall@20,
R-Precision, MRR) score the ranking a user paging through results would see.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..config import Config
from ..errors import CatalogueError, ConfigError, unknown_name
from ..masks import pack_masks
from ..pipeline import searched_categories
from ..search import search_snapshot
from .features import QueryFeatures
from .metrics import relevance, summarize

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


def self_rows(snapshot, records) -> list[np.ndarray]:
    """Per query, the gallery rows holding the same file: excluded from its results."""
    by_path: dict = {}
    for row, path in enumerate(snapshot.paths):
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
            raise ConfigError("restriction 'predicted' needs classifier probabilities for the queries")
        return searched_categories(queries.prediction(row, config.classify.top_n), None, config)
    raise unknown_name("restriction", restriction, RESTRICTIONS)


def rank_queries(
    store,
    queries: QueryFeatures,
    config: Config,
    restriction: str = "off",
    reranker: Optional[Reranker] = None,
    depth: Optional[int] = None,
    exclude_self: bool = True,
    progress: Optional[Callable[[int], None]] = None,
) -> Evaluation:
    """Rank every query that has a relevant gallery item (in the IndexStore `store`) and score
    the rankings. `reranker` replaces the configured re-ranking method (the shape study)."""
    gallery = store.snapshot
    query_bits = pack_masks(queries.masks)
    gallery_products = np.array(gallery.products, dtype=object)
    excluded = self_rows(gallery, queries.records) if exclude_self else [np.zeros(0, np.int64)] * len(queries)
    depth = len(gallery) if depth is None else min(int(depth), len(gallery))
    kept, n_relevant, rankings, timings = [], [], [], []
    for q, record in enumerate(queries.records):
        if progress:
            progress(1)
        relevant = int(np.count_nonzero(gallery_products == record.product)) if record.product else 0
        relevant -= int(np.count_nonzero(gallery_products[excluded[q]] == record.product)) if record.product else 0
        if relevant == 0:
            continue
        ranking = search_snapshot(
            gallery,
            queries.vectors[q],
            query_bits[q],
            queries.boxes[q],
            k=depth,
            settings=config.search,
            categories=query_categories(queries, q, config, restriction),
            exclude_ids=gallery.ids[excluded[q]],
            reorder=None if reranker is None else functools.partial(reranker, q),
            local_features=None if queries.local_features is None else queries.local_features[q],
        )
        timings.append(ranking.timings)
        kept.append(q)
        n_relevant.append(relevant)
        rankings.append(ranking.rows)
    if not kept:
        raise CatalogueError("no query has a relevant item (same product) in the gallery")
    n_relevant = np.array(n_relevant)
    labels = [queries.records[q].product for q in kept]
    rel = relevance([gallery_products[r] for r in rankings], labels, depth)
    return Evaluation(summarize(rel, n_relevant), rankings, np.array(kept), n_relevant, rel, timings)


def category_accuracy(queries: QueryFeatures) -> Optional[float]:
    """Top-1 classifier accuracy on the labelled queries; None without a classifier."""
    if queries.probs is None:
        return None
    labelled = [i for i, r in enumerate(queries.records) if r.category is not None]
    if not labelled:
        return None
    correct = [queries.prediction(i, 1).category == queries.records[i].category for i in labelled]
    return float(np.mean(correct))
