"""The retrieval evaluation of `python -m csearch.evaluate retrieval`: how often the right
product comes back, and how fast.

Relevance is "same product". Headline numbers never use the queries' labels: the search is
unrestricted unless a classifier predicts the category; the oracle category only appears as an
ablation row. Every query runs through the online path (decode, localize, embed, classify,
search) one image at a time, so the latencies are those of `csearch query`; the gallery is
indexed once per setting and cached (features.py). The rankings are scored by ranking.py with
the same search function `Engine.search` uses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import Config, merge
from ..errors import CatalogueError
from .metrics import latency_percentiles

log = logging.getLogger("csearch")

HEADLINE_KEYS = ("recall@1", "recall@5", "recall@10", "recall@20", "map@10", "r_precision", "mrr")


def read_subset(spec: str, subset: Optional[str], limit: Optional[int] = None):
    """read_catalogue, filtered to paths containing `subset`, optionally the first `limit`."""
    from ..data import read_catalogue

    catalogue = read_catalogue(spec)
    records = catalogue.records
    if subset:
        records = tuple(r for r in records if subset in r.path)
        if not records:
            raise CatalogueError(f"no image of {spec} has {subset!r} in its path (--subset)")
    if limit:
        records = records[:limit]
    return replace(catalogue, records=records)


# ----------------------------------------------------------------------------- the gallery


def index_engine(index_dir: str | Path, search: Optional[dict] = None, top_n: Optional[int] = None):
    """The Engine of an existing index: its recorded models and config, with `search`
    overrides ({key of the search section: value}) and classify.top_n = `top_n` if given."""
    from ..pipeline import Engine

    engine = Engine.open(index_dir, search_overrides=search)
    if top_n is not None:
        engine.config = merge(engine.config, {"classify.top_n": top_n})
    return engine


def gallery_engine(
    gallery, config: Config, cache_dir: Path, progress: Optional[Callable[[int], None]] = None, workers: int = 2
):
    """The Engine of the `gallery` catalogue indexed into the cache with the configured models."""
    from ..pipeline import Engine, load_models, resolve_config
    from .features import cached_models, gallery_index

    config = resolve_config(config)
    models = load_models(config)
    store = gallery_index(
        gallery, config, cached_models(models, config, cache_dir), cache_dir, progress=progress, workers=workers
    )
    return Engine(store, config, models)


# ----------------------------------------------------------------------------- the queries


def run_queries(engine, queries, cache_dir: Path, read_cache: bool, progress: Optional[Callable[[int], None]] = None):
    """Every query through the online path, one image at a time, timed per stage.

    Returns (QueryFeatures, per-query timings, per-query hits of the timed search)."""
    from ..pipeline import embed_prepared, prepare_image, searched_categories
    from ..preprocess import load_image
    from .features import QueryFeatures, cached_models, flush_caches, local_spec, prediction_from
    from .ranking import self_rows

    config, gallery = engine.config, engine.store.snapshot
    models = cached_models(engine.models, config, cache_dir, read=read_cache)
    excluded = self_rows(gallery, queries.records)
    local = local_spec(config)  # the geometric re-ranker's query features, as Engine.query extracts them
    vectors, masks, boxes, backends, probs, timings, hits_all, locals_ = [], [], [], [], [], [], [], []
    for q, record in enumerate(queries.records):
        started = time.perf_counter()
        image = load_image(record.path, config.preprocess.max_pixels, config.preprocess.min_side)
        decoded = time.perf_counter()
        prepared = prepare_image(image, config, models.localizer, models.classifier, local)
        times = {"decode": (decoded - started) * 1e3, **prepared.timings_ms}
        started = time.perf_counter()
        vector = embed_prepared(models.extractor, [prepared], config)[0]
        times["embed"] = (time.perf_counter() - started) * 1e3
        prediction = None
        started = time.perf_counter()
        if models.classifier is not None:
            p = np.asarray(models.classifier.predict(prepared.classifier_input[None]), np.float32)[0]
            probs.append(p)
            prediction = prediction_from(p, models.classifier.class_names, config.classify.top_n)
        times["classify"] = (time.perf_counter() - started) * 1e3
        categories = searched_categories(prediction, None, config)
        hits, search_times = engine.search(
            vector,
            prepared.mask,
            config.search.k,
            categories,
            config,
            exclude_ids=gallery.ids[excluded[q]],
            box=prepared.box,
            local_features=prepared.local_features,
        )
        times.update(search_times)
        locals_.append(prepared.local_features)
        times["total"] = sum(times.values())
        vectors.append(vector)
        masks.append(prepared.mask)
        boxes.append(prepared.box)
        backends.append(prepared.localization.produced_by)
        timings.append(times)
        hits_all.append(hits)
        if progress:
            progress(1)
    flush_caches(models)
    features = QueryFeatures(
        list(queries.records),
        np.stack(vectors).astype(np.float32),
        np.stack(masks),
        np.stack(boxes).astype(np.float32),
        backends,
        np.stack(probs) if probs else None,
        list(models.classifier.class_names) if models.classifier is not None else None,
        None if local is None else np.stack(locals_),
    )
    return features, timings, hits_all


# ----------------------------------------------------------------------------- the headline


def evaluate_headline(
    engine,
    queries,
    cache_dir: Path,
    read_cache: bool = False,
    progress: Optional[Callable[[int], None]] = None,
    provenance: Optional[dict] = None,
) -> tuple[dict, object, object]:
    """Run the `queries` catalogue and score it; returns (report dict, QueryFeatures,
    Evaluation). `read_cache`: reuse cached query localizations (then the localize latency
    measures a cache read); `provenance` ({"gallery": ..., ...}) goes into the report."""
    from .ranking import category_accuracy, rank_queries

    features, timings, hits = run_queries(engine, queries, cache_dir, read_cache, progress)
    restriction = "predicted" if features.probs is not None and engine.config.search.restrict else "off"
    evaluation = rank_queries(engine.store, features, engine.config, restriction)
    gallery = engine.store.snapshot
    latency = latency_percentiles([timings[q] for q in evaluation.kept])
    report = {key: round(evaluation.metrics[key], 4) for key in HEADLINE_KEYS}
    report.update(
        {
            "category_accuracy": category_accuracy(features),
            # the category of the first result: the search's own category prediction (a vote of the
            # nearest gallery item); without a classifier it measures the features alone
            "nearest_category_accuracy": nearest_category_accuracy(gallery, features, evaluation),
            "latency_ms_p50": round(latency["total"]["p50"], 2),
            "latency_ms_p95": round(latency["total"]["p95"], 2),
            "n_queries": int(len(evaluation.kept)),
            "n_gallery": int(len(gallery)),
            "n_queries_without_relevant": int(len(features) - len(evaluation.kept)),
            "restriction": restriction,
            "latency_ms": {k: {s: round(v, 2) for s, v in row.items()} for k, row in latency.items()},
            "latency_note": (
                "localize times are cache reads (--cached-queries)"
                if read_cache
                else "every query localized, embedded and searched live, one at a time"
            ),
            "localization_fallbacks": int(sum("empty->full" in b for b in features.backends)),
            "top1_errors_in_query_category": top1_error_breakdown(gallery, features, evaluation),
            "ranking_mismatches_vs_engine": count_mismatches(gallery, evaluation, hits),
            **(provenance or {}),
            "config": engine.config.to_dict(),
        }
    )
    return report, features, evaluation


def top1_error_breakdown(gallery, features, evaluation) -> dict:
    """Of the queries whose first result is another product, how many got a product of their own
    category: shape (or category restriction) can only fix the others. `gallery`: a Snapshot."""
    wrong = same = 0
    for q, ranking in zip(evaluation.kept, evaluation.rankings):
        if len(ranking) and gallery.products[ranking[0]] != features.records[q].product:
            wrong += 1
            same += gallery.categories[ranking[0]] == features.records[q].category
    return {"top1_errors": wrong, "same_category": same}


def nearest_category_accuracy(gallery, features, evaluation) -> Optional[float]:
    """Share of the ranked queries whose first result has the query's category."""
    right = [
        gallery.categories[ranking[0]] == features.records[q].category
        for q, ranking in zip(evaluation.kept, evaluation.rankings)
        if len(ranking) and features.records[q].category is not None
    ]
    return round(float(np.mean(right)), 4) if right else None


def count_mismatches(gallery, evaluation, hits) -> int:
    """Queries whose evaluated ranking does not start with what the timed Engine.search
    returned. Both come from csearch.search.search_snapshot, so this stays 0 unless the two
    runs saw different predictions or gallery snapshots."""
    mismatches = 0
    for q, ranking in zip(evaluation.kept, evaluation.rankings):
        returned = [h.id for h in hits[q]]
        expected = [int(i) for i in gallery.ids[ranking[: len(returned)]]]
        mismatches += returned != expected
    if mismatches:
        log.warning("%d queries: the evaluation's ranking differs from Engine.search's top-k", mismatches)
    return mismatches


def format_table(report: dict) -> str:
    """The headline numbers and per-stage latency as a small text table."""
    lines = [
        f"retrieval: {report['n_queries']} queries vs {report['n_gallery']} gallery images "
        f"(restriction: {report['restriction']})"
    ]
    for key in HEADLINE_KEYS + ("category_accuracy",):
        value = report.get(key)
        lines.append(f"  {key:<18} {'-' if value is None else f'{value:.4f}'}")
    lines.append(f"  {'stage':<18} {'p50 ms':>9} {'p95 ms':>9}")
    for stage, row in report["latency_ms"].items():
        lines.append(f"  {stage:<18} {row['p50']:9.2f} {row['p95']:9.2f}")
    return "\n".join(lines)
