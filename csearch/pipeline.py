"""Composition of the stages: `build_index` (offline) and `Engine.query` (online).

No model code lives here: each stage is a callable from csearch's plain types to plain types,
and this module only wires them, times them and records which models produced an index.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np

from . import __version__
from .config import Config, config_from_dict, merge
from .data import Catalogue
from .errors import ConfigError, ImageError, ModelMismatch, StoreError
from .preprocess import ImageSource, downscale_max_side, load_image, model_input
from .types import Hit, Localization, Prediction, QueryResult, Record

log = logging.getLogger("csearch")

CHUNK = 256  # images per committed index segment: an interruption loses at most this many
# what an index written before a config key existed was built with (its meta lacks the key)
LEGACY_DEFAULTS = {"embed": {"views": "cutout"}, "classify": {"input": "cutout"}}


# ----------------------------------------------------------------------------- models


@dataclass
class Models:
    """The models a config needs, loaded once."""

    localizer: object
    extractor: object
    classifier: Optional[object] = None

    def files(self) -> list[Path]:
        found = []
        for model in (self.localizer, self.extractor, self.classifier):
            found.extend(Path(f) for f in (getattr(model, "files", None) or []))
        return found


def load_models(config: Config) -> Models:
    from .localize import make_localizer
    from .models import load_extractor

    localizer = make_localizer(config.localize)
    extractor = load_extractor(config.embed.extractor, config.embed.weights, image_size=config.preprocess.image_size)
    classifier = None
    if config.classify.classifier:
        from .classify import Classifier

        classifier = Classifier.load(config.classify.classifier)
    return Models(localizer, extractor, classifier)


def describe_files(files: Iterable[Path]) -> list[dict]:
    from .models import file_sha256

    return [{"path": str(Path(f).resolve()), "sha256": file_sha256(f)} for f in files]


def verify_files(recorded: Sequence[dict]) -> None:
    """An index is only valid with the exact model files it was built with."""
    from .models import file_sha256

    for entry in recorded:
        path = Path(entry["path"])
        if not path.is_file():
            raise ModelMismatch(
                f"model file {path} recorded by the index is missing (moved or deleted); "
                f"put it back or rebuild the index"
            )
        if file_sha256(path) != entry["sha256"]:
            raise ModelMismatch(
                f"model file {path} changed since the index was built (sha256 differs); rebuild the index"
            )


# ----------------------------------------------------------------------------- one image


@dataclass(frozen=True)
class Prepared:
    """One image after localization: what the extractor, classifier and re-ranker consume."""

    extractor_input: np.ndarray  # uint8 (S, S, 3): the object cut-out
    classifier_input: Optional[np.ndarray]  # uint8, the classifier's own size/colour
    mask: np.ndarray  # bool (mask_size, mask_size), full frame
    box: np.ndarray  # float32 (4,) normalised x0, y0, x1, y1
    localization: Localization
    timings_ms: dict = field(default_factory=dict)
    photo_input: Optional[np.ndarray] = None  # uint8 (S, S, 3): the whole photo (embed.views)


def photo_view(config: Config) -> bool:
    """Whether every image is also embedded whole, next to its cut-out (embed.views). Without
    localization the cut-out is the photo, so there is one view."""
    return config.embed.views == "cutout+photo" and config.localize.method != "none"


def vector_dim(config: Config, extractor) -> int:
    """Length of an index vector: the extractor's, once per view."""
    return int(extractor.dim) * (2 if photo_view(config) else 1)


def embed_prepared(extractor, prepared: Sequence[Prepared], config: Config) -> np.ndarray:
    """Index/query vectors of prepared images: the cut-out, and with embed.views = cutout+photo
    the whole photo too (embed.combine_views), float32 (N, vector_dim)."""
    from .embed import combine_views, embed_batches

    batch, normalize = config.embed.batch_size, config.embed.normalize
    cutouts = embed_batches(extractor, np.stack([p.extractor_input for p in prepared]), batch, normalize)
    if not photo_view(config):
        return cutouts
    photos = embed_batches(extractor, np.stack([p.photo_input for p in prepared]), batch, normalize)
    return combine_views(cutouts, photos, config.embed.photo_weight)


def prepare_image(image: np.ndarray, config: Config, localizer, classifier=None) -> Prepared:
    """Localize and cut out the object, then build the model inputs and the compact mask."""
    from .masks import resize_mask

    started = time.perf_counter()
    image = downscale_max_side(image, config.preprocess.work_side)
    loc = localizer(image)
    localized = time.perf_counter()
    box = loc.box if config.localize.crop else None
    size, color = config.preprocess.image_size, config.preprocess.color
    extractor_input = model_input(loc.cutout, size, color, box, config.localize.margin)
    photo_input = None
    if photo_view(config):
        # padded to a square like the cut-out, so both views keep the object's aspect ratio
        photo_input = model_input(image, size, color, (0, 0, image.shape[1], image.shape[0]))
    classifier_input = None
    if classifier is not None:
        # the whole photo classifies far better than the cut-out (0.753 vs 0.547 top-1 on the
        # Grocery val photos, docs/results/retrieval.md); "cutout" keeps the paper's order
        if config.classify.input == "cutout":
            classifier_input = model_input(
                loc.cutout, classifier.image_size, classifier.color, box, config.localize.margin
            )
        else:  # "photo" (the config allows no other value)
            classifier_input = model_input(image, classifier.image_size, classifier.color)
    height, width = image.shape[:2]
    x0, y0, x1, y1 = loc.box
    norm_box = np.array([x0 / width, y0 / height, x1 / width, y1 / height], np.float32)
    mask = resize_mask(loc.mask, config.search.mask_size)
    timings = {"localize": (localized - started) * 1e3, "prepare": (time.perf_counter() - localized) * 1e3}
    return Prepared(extractor_input, classifier_input, mask, norm_box, loc, timings, photo_input)


# ----------------------------------------------------------------------------- offline


@dataclass(frozen=True)
class IndexReport:
    index_dir: str
    added: int
    skipped_existing: int
    failures: tuple[tuple[str, str], ...]
    seconds: float
    config: Optional[Config] = None  # resolved: the exact model files used

    @property
    def images_per_second(self) -> float:
        return self.added / self.seconds if self.seconds > 0 else 0.0


def _prepare_records(
    records: Sequence[Record], config: Config, models: Models, workers: int
) -> Iterator[tuple[Record, Optional[Prepared], Optional[str]]]:
    """Decode + localize in a small thread pool (ONNX Runtime and OpenCV release the GIL), in order."""

    def work(record: Record):
        try:
            image = load_image(record.path, config.preprocess.max_pixels, config.preprocess.min_side)
            return record, prepare_image(image, config, models.localizer, _needs_classifier(record, models)), None
        except ImageError as exc:
            return record, None, str(exc)

    if workers <= 1:
        yield from map(work, records)
        return
    with ThreadPoolExecutor(workers) as pool:
        # bounded look-ahead: at most 2 batches in flight keeps memory flat on huge catalogues
        window = max(workers * 4, 8)
        pending = []
        for record in records:
            pending.append(pool.submit(work, record))
            if len(pending) >= window:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def _needs_classifier(record: Record, models: Models):
    # gallery images keep their catalogue labels; only unlabelled ones are classified
    return models.classifier if (record.category is None and models.classifier is not None) else None


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def index_meta(config: Config, models: Models) -> dict:
    return {
        "csearch_version": __version__,
        "config": config.to_dict(),
        "models": describe_files(models.files()),
        "extractor": {"name": config.embed.extractor, "dim": vector_dim(config, models.extractor)},
        "classifier": None if models.classifier is None else str(Path(config.classify.classifier).resolve()),
        "localizer": getattr(models.localizer, "name", config.localize.method),
        "complete": False,
    }


def _open_or_create(out: Path, config: Config, models: Models, overwrite: bool):
    from .store import IndexStore

    meta = index_meta(config, models)
    if out.exists() and not overwrite and any(out.iterdir()):
        store = IndexStore.open(out)
        if index_config(store.meta).to_dict() != meta["config"] or store.meta.get("models") != meta["models"]:
            raise StoreError(
                f"{out} already holds an index built with other settings or models; "
                f"use `csearch add` to extend it, --overwrite to replace it, or another --out"
            )
        return store
    return IndexStore.create(
        out, meta=meta, dim=vector_dim(config, models.extractor), mask_size=config.search.mask_size, overwrite=overwrite
    )


def add_records(
    store,
    records: Sequence[Record],
    config: Config,
    models: Models,
    progress: Optional[Callable[[int], None]] = None,
    workers: int = 2,
) -> tuple[np.ndarray, list]:
    """Extract and store `records` in committed chunks; returns (the new ids: int64, ascending,
    one per record indexed; the failures as (path, reason))."""
    added, failures = [np.zeros(0, np.int64)], []
    prepared_stream = _prepare_records(records, config, models, workers)
    for chunk in _batches(prepared_stream, CHUNK):
        good = [(r, p) for r, p, error in chunk if p is not None]
        failures.extend((r.path, error) for r, p, error in chunk if p is None)
        if good:
            vectors = embed_prepared(models.extractor, [p for _, p in good], config)
            categories = [_label(r, p, models) for r, p in good]
            added.append(
                store.add(
                    vectors=vectors,
                    masks=np.stack([p.mask for _, p in good]),
                    boxes=np.stack([p.box for _, p in good]),
                    paths=[str(Path(r.path).resolve()) for r, _ in good],
                    categories=categories,
                    products=[r.product for r, _ in good],
                )
            )
        if progress:
            progress(len(chunk))
    return np.concatenate(added), failures


def _label(record: Record, prepared: Prepared, models: Models) -> Optional[str]:
    if record.category is not None or prepared.classifier_input is None:
        return record.category
    return models.classifier.predict_top(prepared.classifier_input[None], 1)[0].category


def build_index(
    catalogue: Catalogue,
    config: Config,
    out: str | Path,
    overwrite: bool = False,
    progress: Optional[Callable[[int], None]] = None,
    models: Optional[Models] = None,
    workers: int = 2,
) -> IndexReport:
    """Index a catalogue into `out`. Re-running on an interrupted index resumes where it stopped."""
    started = time.perf_counter()
    out = Path(out)
    if models is None:
        config = resolve_config(config)
        models = load_models(config)
    store = _open_or_create(out, config, models, overwrite)
    done = set(store.snapshot.paths)
    todo = [r for r in catalogue.records if str(Path(r.path).resolve()) not in done]
    if progress and len(todo) < len(catalogue.records):
        progress(len(catalogue.records) - len(todo))
    ids, failures = add_records(store, todo, config, models, progress, workers)
    store.update_meta({"complete": True, "catalogue": catalogue.spec})
    return IndexReport(
        str(out),
        len(ids),
        len(catalogue.records) - len(todo),
        tuple(failures) + tuple(catalogue.skipped),
        time.perf_counter() - started,
        config,
    )


# ----------------------------------------------------------------------------- online


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
        """Localize, classify, restricted exact KNN, optional mask re-ranking: the paper's online stage."""
        config = (
            merge(self.config, {f"search.{k_}": v for k_, v in search.items() if v is not None})
            if search
            else self.config
        )
        k = config.search.k if k is None else int(k)
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


def index_config(meta: dict) -> Config:
    """The config an index was built with; keys it predates take the values it was built with."""
    data = {section: dict(values) for section, values in meta["config"].items()}
    for section, values in LEGACY_DEFAULTS.items():
        for key, value in values.items():
            data.setdefault(section, {}).setdefault(key, value)
    return config_from_dict(data, notify_deprecated=False)


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


def resolve_config(config: Config) -> Config:
    """Replace model names/"imagenet" by the absolute files they resolve to, so an index records
    (and its queries reuse) exactly the files it was built with."""
    from .models import get_spec, resolve_weights

    localize, embed = config.localize, config.embed
    if embed.extractor.endswith(".onnx"):  # an exported extractor file carries its own weights
        embed = replace(embed, extractor=str(Path(embed.extractor).expanduser().resolve()), weights=None)
    else:
        get_spec(embed.extractor)  # unknown names fail here, listing the valid ones
        weights = resolve_weights(embed.extractor, embed.weights)
        if weights is None:
            raise ConfigError(
                f"extractor {embed.extractor!r} has no weights (weights: {embed.weights}); an index "
                f"needs fixed weights: pass 'imagenet' or a weights file"
            )
        embed = replace(embed, weights=str(Path(weights).resolve()))
    if localize.method == "u2net" and not localize.model:
        localize = replace(localize, model=str(resolve_weights("u2netp", "imagenet")))
    if localize.matting == "fba" and not localize.matting_model:
        localize = replace(localize, matting_model=str(resolve_weights("fba", "imagenet")))
    for field_name in ("model", "matting_model"):
        value = getattr(localize, field_name)
        if value:
            localize = replace(localize, **{field_name: str(Path(value).expanduser().resolve())})
    classify = config.classify
    if classify.classifier:
        classify = replace(classify, classifier=str(Path(classify.classifier).expanduser().resolve()))
    return replace(config, localize=localize, embed=embed, classify=classify)
