"""Per-setting features for the evaluation, computed once and cached.

A *feature setting* is everything that changes an image's vector, mask or box: preprocessing,
localization, extractor and mask size. Search-time options (restriction, re-ranking, k) do not
belong to it, so every search variant of the ablation reuses the same features.

- The gallery becomes a real csearch index (`build_index`), cached under
  CACHE/index/<setting>-<catalogue>, so the evaluation searches exactly what `csearch query` would.
- The queries become a `QueryFeatures` (vectors, masks, boxes, classifier probabilities), cached
  as one .npz per (setting, catalogue, classifier).
- Localizations are cached per image (cache.CachedLocalizer) and shared by both.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import Config
from ..data import Catalogue
from ..models import file_sha256
from ..pipeline import Models, build_index, embed_prepared, prepare_image
from ..preprocess import load_image
from ..store.durable import write_bytes_atomic
from ..types import Prediction, Record
from .cache import ArrayCache, CachedExtractor, CachedLocalizer, files_digest, npz_bytes, settings_digest

log = logging.getLogger("csearch")

QUERY_CHUNK = 128  # images extracted per batch group: bounds memory on large query sets


def default_cache_dir() -> Path:
    """$CSEARCH_EVAL_CACHE, else ~/.cache/csearch/eval."""
    return Path(os.environ.get("CSEARCH_EVAL_CACHE") or "~/.cache/csearch/eval").expanduser()


def localize_settings(config: Config) -> dict:
    """What changes a localization besides the image (crop/margin act afterwards)."""
    settings = {k: v for k, v in config.to_dict()["localize"].items() if k not in ("crop", "margin")}
    for key in ("model", "matting_model"):
        if settings.get(key):
            settings[key] = file_sha256(settings[key])
    return settings


def feature_settings(config: Config) -> dict:
    """Everything that changes a vector, mask or box. `config` must be resolved (absolute files)."""
    data = config.to_dict()
    embed = dict(data["embed"])
    embed.pop("batch_size")
    for key in ("extractor", "weights"):
        if embed.get(key) and Path(embed[key]).is_file():
            embed[key] = [Path(embed[key]).name, file_sha256(embed[key])]
    localize = localize_settings(config)
    localize.update(crop=config.localize.crop, margin=config.localize.margin)
    return {
        "preprocess": {k: v for k, v in data["preprocess"].items() if k not in ("max_pixels", "min_side")},
        "localize": localize,
        "embed": embed,
        "mask_size": config.search.mask_size,
        "code": feature_code_digest(),
        **({"local": local_spec(config).to_meta()} if local_spec(config) is not None else {}),
    }


def feature_code_digest() -> str:
    """Digest of the code that turns an image into its index entry (localization, preprocessing,
    mask resizing, embedding, and the per-image caches under them). Cached indexes and query
    features are keyed by it, so editing that code rebuilds them (cheaply: the per-image
    localization and vector caches have their own keys)."""
    root = Path(__file__).resolve().parents[1]
    files = (
        sorted(root.glob("localize/*.py"))
        + sorted(root.glob("models/*.py"))
        + sorted(root.glob("store/*.py"))
        + [root / n for n in ("preprocess.py", "masks.py", "prepare.py", "indexing.py", "embed.py", "geometric.py")]
        + [root / "evaluation" / "cache.py"]
    )
    return settings_digest([file_sha256(f) for f in files if f.is_file()])


def catalogue_digest(records: Sequence[Record]) -> str:
    """Paths, labels, sizes and mtimes: editing or relabelling an image misses the cache."""
    rows = []
    for r in records:
        stat = os.stat(r.path)
        rows.append((r.path, r.category, r.product, stat.st_size, stat.st_mtime_ns))
    return settings_digest(rows)


def cached_models(models: Models, config: Config, cache_dir: Path, read: bool = True) -> Models:
    """`models` with the localizer and extractor wrapped in the per-image caches. `read=False`
    (timed queries) fills the caches without reading them, so the timings stay honest; call
    `flush_caches` afterwards to write what they collected."""
    localizer = CachedLocalizer(
        models.localizer, ArrayCache(cache_dir / "loc", defer=not read), localize_settings(config), read=read
    )
    extractor = CachedExtractor(models.extractor, ArrayCache(cache_dir / "vec", defer=not read), read=read)
    return replace(models, localizer=localizer, extractor=extractor)


def flush_caches(models: Models) -> None:
    for model in (models.localizer, models.extractor):
        cache = getattr(model, "cache", None)
        if cache is not None:
            cache.flush()


# ----------------------------------------------------------------------------- gallery


def gallery_index(
    catalogue: Catalogue,
    config: Config,
    models: Models,
    cache_dir: Path,
    progress: Optional[Callable[[int], None]] = None,
    workers: int = 2,
):
    """The gallery as a csearch index in the cache (built once, resumed if interrupted)."""
    from ..store import IndexStore

    key = f"{settings_digest(feature_settings(config))}-{catalogue_digest(catalogue.records)}"
    out = cache_dir / "index" / key
    if (out / "manifest.json").is_file():
        store = IndexStore.open(out)
        if store.snapshot.meta.get("complete") and len(store.snapshot) == len(catalogue.records):
            if progress:
                progress(len(catalogue.records))
            return store
    # the classifier only labels unlabelled gallery images, which an evaluation gallery has none of
    report = build_index(
        catalogue, config, out, progress=progress, models=replace(models, classifier=None), workers=workers
    )
    if report.failures:
        log.warning("gallery: %d image(s) could not be indexed, e.g. %s", len(report.failures), report.failures[0])
    (out / "feature_settings.json").write_text(json.dumps(feature_settings(config), indent=1))
    return IndexStore.open(out)


# ----------------------------------------------------------------------------- queries


def prediction_from(probs: np.ndarray, class_names: Sequence[str], top_n: int) -> Prediction:
    """The top-n classes of one probability vector, as Classifier.predict_top builds them."""
    order = np.argsort(-probs, kind="stable")[: max(1, top_n)]
    top = tuple((class_names[i], float(probs[i])) for i in order)
    return Prediction(category=top[0][0], probability=top[0][1], top=top)


@dataclass
class QueryFeatures:
    """One catalogue of queries under one feature setting; rows follow `records`."""

    records: list[Record]
    vectors: np.ndarray  # float32 (Q, D)
    masks: np.ndarray  # bool (Q, S, S)
    boxes: np.ndarray  # float32 (Q, 4)
    backends: list[str]  # what localized each query (fallbacks visible)
    probs: Optional[np.ndarray] = None  # float32 (Q, C) classifier probabilities
    class_names: Optional[list[str]] = None
    local_features: Optional[np.ndarray] = None  # uint8 (Q, B) geometric records (search.rerank: geometric)

    def __len__(self) -> int:
        return len(self.records)

    def prediction(self, row: int, top_n: int) -> Optional[Prediction]:
        """The classifier's prediction for query `row`, as Classifier.predict_top builds it."""
        return None if self.probs is None else prediction_from(self.probs[row], self.class_names, top_n)

    def save(self, path: Path) -> None:
        arrays = {
            "vectors": self.vectors,
            "masks": np.packbits(self.masks.reshape(len(self), -1), axis=1),
            "boxes": self.boxes,
            "mask_side": np.array(self.masks.shape[1]),
            "records": np.array(json.dumps([[r.path, r.category, r.product] for r in self.records])),
            "backends": np.array(json.dumps(self.backends)),
        }
        if self.probs is not None:
            arrays.update(probs=self.probs, class_names=np.array(json.dumps(self.class_names)))
        if self.local_features is not None:
            arrays.update(local_features=self.local_features)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, npz_bytes(arrays))

    @classmethod
    def load(cls, path: Path) -> QueryFeatures:
        with np.load(path, allow_pickle=False) as data:
            side = int(data["mask_side"])
            records = [Record(*row) for row in json.loads(str(data["records"]))]
            masks = np.unpackbits(data["masks"], axis=1, count=side * side).reshape(-1, side, side).astype(bool)
            probs = data["probs"] if "probs" in data.files else None
            names = json.loads(str(data["class_names"])) if "class_names" in data.files else None
            local = data["local_features"] if "local_features" in data.files else None
            backends = json.loads(str(data["backends"]))
            return cls(records, data["vectors"], masks, data["boxes"], backends, probs, names, local)


def query_features(
    catalogue: Catalogue,
    config: Config,
    models: Models,
    cache_dir: Path,
    progress: Optional[Callable[[int], None]] = None,
) -> QueryFeatures:
    """Localize, embed (and classify) every query once per setting; cached on disk."""
    settings = query_settings(config, models.classifier)
    path = cache_dir / "queries" / f"{settings_digest(settings)}-{catalogue_digest(catalogue.records)}.npz"
    if path.is_file():
        if progress:
            progress(len(catalogue.records))
        return QueryFeatures.load(path)
    features = compute_query_features(catalogue.records, config, models, progress)
    features.save(path)
    return features


def query_settings(config: Config, classifier=None) -> dict:
    """feature_settings plus what changes a query's classifier probabilities."""
    settings = feature_settings(config)
    if classifier is not None:
        settings["classifier"] = files_digest(getattr(classifier, "files", []))
        settings["classify_input"] = config.classify.input
    return settings


def compute_query_features(
    records: Sequence[Record], config: Config, models: Models, progress: Optional[Callable[[int], None]] = None
) -> QueryFeatures:
    """The same steps as Engine.prepare/embed/classify, batched. Unreadable images are an
    error: a query set silently shrinking would change every metric."""
    local = local_spec(config)
    parts = []
    for start in range(0, len(records), QUERY_CHUNK):
        chunk = records[start : start + QUERY_CHUNK]
        prepared = []
        for record in chunk:
            image = load_image(record.path, config.preprocess.max_pixels, config.preprocess.min_side)
            prepared.append(prepare_image(image, config, models.localizer, models.classifier, local))
            if progress:
                progress(1)
        vectors = embed_prepared(models.extractor, prepared, config)
        probs = None
        if models.classifier is not None:
            probs = np.asarray(models.classifier.predict(np.stack([p.classifier_input for p in prepared])), np.float32)
        parts.append((prepared, vectors, probs))
    prepared = [p for part in parts for p in part[0]]
    probs = np.concatenate([part[2] for part in parts]) if models.classifier is not None else None
    return QueryFeatures(
        records=list(records),
        vectors=np.concatenate([part[1] for part in parts]).astype(np.float32),
        masks=np.stack([p.mask for p in prepared]),
        boxes=np.stack([p.box for p in prepared]).astype(np.float32),
        backends=[p.localization.produced_by for p in prepared],
        probs=probs,
        class_names=list(models.classifier.class_names) if models.classifier is not None else None,
        local_features=None if local is None else np.stack([p.local_features for p in prepared]),
    )


def local_spec(config: Config):
    """The geometric re-ranker's local features spec when the config asks for it, else None."""
    if config.search.rerank != "geometric":
        return None
    from ..geometric import LocalSpec

    return LocalSpec.from_config(config.search)


def store_as_queries(store) -> QueryFeatures:
    """The gallery (an IndexStore) itself as a query set (leave-one-out tuning on the training
    gallery)."""
    from ..masks import unpack_masks

    gallery = store.snapshot
    records = [Record(p, c, pr) for p, c, pr in zip(gallery.paths, gallery.categories, gallery.products)]
    masks = unpack_masks(np.asarray(gallery.mask_bits), gallery.mask_size)
    return QueryFeatures(
        records,
        np.asarray(gallery.vectors, np.float32),
        masks,
        np.asarray(gallery.boxes, np.float32),
        ["(index)"] * len(records),
    )
