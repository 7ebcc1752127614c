"""The online stage: `Engine`, an opened index with its models (query, add, remove)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from .config import Config, merge
from .errors import ModelMismatch
from .indexing import add_records
from .prepare import Prepared, embed_prepared, prepare_image, vector_dim
from .preprocess import ImageSource, load_image
from .resolve import Models, index_config, load_models, verify_files
from .types import Hit, Prediction, QueryResult, Record

log = logging.getLogger("csearch")


class Engine:
    """An opened index with its models: answers queries, adds and removes items."""

    def __init__(self, store, config: Config, models: Models):
        self.store = store
        self.config = config
        self.models = models

    @classmethod
    def open(cls, index_dir: str | Path, search_overrides: Optional[dict] = None, verify: bool = True) -> Engine:
        from .store import IndexStore

        store = IndexStore.open(index_dir)
        recorded = store.meta.get("models", [])
        if verify:
            verify_files(recorded)
        config = index_config(store.meta)
        if search_overrides:
            config = merge(config, {f"search.{k}": v for k, v in search_overrides.items() if v is not None})
        models = load_models(config)
        if vector_dim(config, models.extractor) != store.dim:
            raise ModelMismatch(
                f"{index_dir} holds {store.dim}-d vectors but its config gives "
                f"{vector_dim(config, models.extractor)}-d ones; rebuild the index"
            )
        return cls(store, config, models)

    @property
    def categories(self) -> list[str]:
        return sorted(c for c in self.store.snapshot.category_counts() if c is not None)

    def prepare(self, image: ImageSource) -> Prepared:
        started = time.perf_counter()
        array = load_image(image, self.config.preprocess.max_pixels, self.config.preprocess.min_side)
        decoded = time.perf_counter()
        prepared = prepare_image(array, self.config, self.models.localizer, self.models.classifier)
        prepared.timings_ms["decode"] = (decoded - started) * 1e3
        return prepared

    def embed(self, prepared: Prepared) -> np.ndarray:
        return embed_prepared(self.models.extractor, [prepared], self.config)[0]

    def classify(self, prepared: Prepared) -> Optional[Prediction]:
        if self.models.classifier is None or prepared.classifier_input is None:
            return None
        return self.models.classifier.predict_top(prepared.classifier_input[None], self.config.classify.top_n)[0]

    def query(
        self,
        image: ImageSource,
        k: Optional[int] = None,
        category: Optional[str] = None,
        exclude_ids: Iterable[int] = (),
        **search: object,
    ) -> QueryResult:
        """Localize, classify, restricted exact KNN, optional mask re-ranking: the paper's online stage.
        `k` and the `search` overrides obey the config schema (k 1-100, known re-rankers, ...), so
        the CLI, the HTTP API and library callers share one set of rules."""
        overrides = {f"search.{name}": value for name, value in {**search, "k": k}.items() if value is not None}
        config = merge(self.config, overrides) if overrides else self.config
        k = config.search.k
        prepared = self.prepare(image)
        timings = dict(prepared.timings_ms)
        started = time.perf_counter()
        vector = self.embed(prepared)
        timings["embed"] = (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        prediction = None if category is not None else self.classify(prepared)
        timings["classify"] = (time.perf_counter() - started) * 1e3
        categories = searched_categories(prediction, category, config)
        hits, search_timings = self.search(vector, prepared.mask, k, categories, config, exclude_ids, prepared.box)
        timings.update(search_timings)
        timings["total"] = sum(timings.values())
        shown = category if category is not None else (prediction.category if prediction else None)
        return QueryResult(shown, tuple(hits), timings, prepared.localization)

    def search(
        self,
        vector: np.ndarray,
        mask: np.ndarray,
        k: int,
        categories: Optional[Sequence[str]],
        config: Optional[Config] = None,
        exclude_ids: Iterable[int] = (),
        box: Optional[np.ndarray] = None,
    ) -> tuple[list[Hit], dict]:
        """Exact KNN over the (restricted) gallery, then re-rank the top candidates by mask IoU:
        `csearch.search.search_snapshot`, the function the retrieval evaluation ranks with. Reads
        one snapshot of the index, so concurrent adds/removes never mix into a query."""
        from .search import search_snapshot

        snap = self.store.snapshot
        ranking = search_snapshot(
            snap,
            vector,
            mask,
            box,
            k=k,
            settings=(config or self.config).search,
            categories=categories,
            exclude_ids=exclude_ids,
        )
        hits = [
            Hit(
                id=r["id"],
                path=r["path"],
                product=r["product"],
                category=r["category"],
                distance=float(distance),
                iou=None if np.isnan(iou) else float(iou),
                score=float(score),
            )
            for r, distance, score, iou in zip(
                snap.records(ranking.rows), ranking.distances, ranking.scores, ranking.ious
            )
        ]
        return hits, dict(ranking.timings)

    def add(self, records: Sequence[Record], progress=None, workers: int = 2) -> tuple[np.ndarray, list]:
        """Index `records` (durable on return); returns (their new ids, failures as (path, reason))."""
        return add_records(self.store, records, self.config, self.models, progress, workers)

    def remove(self, ids: Iterable[int]) -> int:
        return self.store.remove(list(ids))


def searched_categories(
    prediction: Optional[Prediction], category: Optional[str], config: Config
) -> Optional[list[str]]:
    """The categories a query searches: an explicit one, else the classifier's top-n, else all."""
    if category is not None:
        return [category]
    if prediction is None or not config.search.restrict:
        return None
    names = [name for name, _ in prediction.top[: config.classify.top_n]]
    return names or [prediction.category]
