"""The offline stage: `build_index` (resumable) and `add_records`, in committed chunks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from . import __version__
from .config import Config
from .data import Catalogue
from .errors import ImageError, StoreError
from .prepare import Prepared, embed_prepared, prepare_image, vector_dim
from .preprocess import load_image
from .resolve import Models, describe_files, index_config, load_models, resolve_config
from .types import Record

log = logging.getLogger("csearch")

CHUNK = 256  # images per committed index segment: an interruption loses at most this many


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
