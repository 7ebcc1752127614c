"""The online stage: `Engine`, an opened index with its models (query, add, remove)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from .config import Config, merge
from .errors import ConfigError, ModelMismatch, unknown_name
from .indexing import add_records
from .prepare import Prepared, embed_prepared, prepare_image, vector_dim
from .preprocess import ImageSource, load_image
from .resolve import Models, index_config, load_models, locate_config, locate_files, query_threads
from .types import Hit, Prediction, QueryResult, Record

log = logging.getLogger("csearch")


class Engine:
    """An opened index with its models: answers queries, adds and removes items."""

    def __init__(self, store, config: Config, models: Models):
        self.store = store
        self.config = config
        self.models = models

    @classmethod
    def open(
        cls,
        index_dir: str | Path,
        search_overrides: Optional[dict] = None,
        verify: bool = True,
        localizer_threads: Optional[int] = None,
    ) -> Engine:
        """Open an index with its recorded models. The localizer gets `localizer_threads` ONNX
        Runtime threads (default: every core, for one query stream) unless the index sets
        localize.threads."""
        from .store.open import open_store

        store = open_store(index_dir)  # the local index folder, or the Milvus collection it names
        config = index_config(store.meta)
        if verify:  # the recorded model files, by sha256, wherever they are now (the index is not rewritten)
            config = locate_config(config, locate_files(store.meta.get("models", []), store.directory))
        if search_overrides:
            config = merge(config, {f"search.{k}": v for k, v in search_overrides.items() if v is not None})
        models = load_models(config, localizer_threads or query_threads())
        if vector_dim(config, models.extractor) != store.dim:
            raise ModelMismatch(
                f"{index_dir} holds {store.dim}-d vectors but its config gives "
                f"{vector_dim(config, models.extractor)}-d ones; rebuild the index"
            )
        return cls(store, config, models)

    @property
    def categories(self) -> list[str]:
        return sorted(c for c in self.store.snapshot.category_counts() if c is not None)

    def check_search(self, category: Optional[str] = None, restrict: Optional[bool] = None) -> None:
        """Refuse what this index cannot answer, before any image is read: a category it does not
        hold (the error lists those it does), or a restriction to the predicted category without a
        classifier. The CLI and the HTTP API share this check."""
        if category is not None and category not in self.categories:
            raise unknown_name("category", category, self.categories)
        if restrict and self.models.classifier is None:
            raise ConfigError(
                "search.restrict needs an index built with a classifier (csearch index --classifier RUN_DIR); "
                "this index has none, so every query searches all categories"
            )

    def prepare(self, image: ImageSource, local=None) -> Prepared:
        """Decode, localize and build the model inputs (+ the local features of `local`, a
        `geometric.LocalSpec`)."""
        started = time.perf_counter()
        array = load_image(image, self.config.preprocess.max_pixels, self.config.preprocess.min_side)
        decoded = time.perf_counter()
        prepared = prepare_image(array, self.config, self.models.localizer, self.models.classifier, local)
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
        `k` and the `search` overrides obey the config schema (k 1-100, known re-rankers, ...), and
        `check_search` refuses a category the index does not hold and a restriction it cannot make,
        so the CLI, the HTTP API and library callers share one set of rules."""
        overrides = {f"search.{name}": value for name, value in {**search, "k": k}.items() if value is not None}
        config = merge(self.config, overrides) if overrides else self.config
        self.check_search(category, config.search.restrict if search.get("restrict") is not None else None)
        if config.search.mask_size != self.config.search.mask_size:
            raise ConfigError(
                f"search.mask_size is fixed by the index (its masks are stored at {self.config.search.mask_size} px); "
                f"rebuild the index to change it"
            )
        local = self._local_spec(config) if config.search.rerank == "geometric" else None
        k = config.search.k
        prepared = self.prepare(image, local)
        timings = dict(prepared.timings_ms)
        started = time.perf_counter()
        vector = self.embed(prepared)
        timings["embed"] = (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        prediction = None if category is not None else self.classify(prepared)
        timings["classify"] = (time.perf_counter() - started) * 1e3
        categories = searched_categories(prediction, category, config)
        hits, search_timings = self.search(
            vector, prepared.mask, k, categories, config, exclude_ids, prepared.box, prepared.local_features
        )
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
        local_features: Optional[np.ndarray] = None,
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
            local_features=local_features,
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
                missing=not os.path.isfile(r["path"]),  # the catalogue image has gone: still a hit, marked
            )
            for r, distance, score, iou in zip(
                snap.records(ranking.rows), ranking.distances, ranking.scores, ranking.ious
            )
        ]
        return hits, dict(ranking.timings)

    def _local_spec(self, config: Config):
        """The local features a geometric query extracts: the index's (a one-line ConfigError when
        it has none, or when the query asks for other ones)."""
        from .geometric import index_local_spec

        spec = index_local_spec(self.store.meta)
        if (config.search.geometric_features, config.search.keypoints) != (spec.kind, spec.keypoints):
            raise ConfigError(
                f"search.geometric_features and search.keypoints are fixed by the index ({spec.kind}, "
                f"{spec.keypoints}); rebuild the index to change them"
            )
        return spec

    def add(self, records: Sequence[Record], progress=None, workers: int = 2) -> tuple[np.ndarray, list]:
        """Index `records` (durable on return); returns (their new ids, failures as (path, reason))."""
        self._warn_unseen_products(records)
        return add_records(self.store, records, self.config, self.models, progress, workers)

    def _warn_unseen_products(self, records: Sequence[Record]) -> None:
        """A learned embedding is best on the products it was trained on: say when others arrive
        (they are indexed all the same)."""
        if not self.config.embed.embedder:
            return
        from .embedder.run import read_embedder
        from .errors import CSearchError

        try:
            known = read_embedder(self.config.embed.embedder).products()
        except CSearchError:
            return
        unseen = sorted({r.product for r in records if r.product is not None and r.product not in known})
        if known and unseen:
            log.warning(
                "%d product(s) the embedder never saw (%s): indexed all the same; retrain it on the grown "
                "catalogue (python -m csearch.train embedder) for the best results",
                len(unseen),
                ", ".join(unseen[:3]) + (", ..." if len(unseen) > 3 else ""),
            )

    def remove(self, ids: Iterable[int]) -> int:
        return self.store.remove(list(ids))


def query_settings(sets: Mapping[str, object], flags: Mapping[str, object]) -> dict:
    """The search settings of one query, {key of the search section: value}, from `--set
    search.KEY=VALUE` pairs and explicit flags (which win; None: not given). Judged by the config
    schema before any index or model is opened; only search.* keys, as the rest is fixed by the index."""
    fixed = [key for key in sets if not key.startswith("search.")]
    if fixed:
        raise ConfigError(
            f"--set {fixed[0]}: only search.* settings can change at query time; the rest is fixed by the index "
            f"(rebuild it with `csearch index ... --set {fixed[0]}=...` to change it)"
        )
    settings = {key.split(".", 1)[1]: value for key, value in sets.items()}
    settings.update({key: value for key, value in flags.items() if value is not None})
    merge(Config(), {f"search.{key}": value for key, value in settings.items()})
    return settings


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
