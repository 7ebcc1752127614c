"""The offline stage: `build_index` (resumable) and `add_records`.

Images are prepared in a small thread pool, embedded in batches as they arrive, and committed to
the store every CHUNK images or every COMMIT_SECONDS, whichever comes first, so an interruption
(even SIGKILL) loses at most about COMMIT_SECONDS of work; a rerun resumes after the last commit.
The images that could not be indexed are listed in INDEX_DIR/failures.txt (path TAB reason).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from . import __version__
from .config import Config
from .data import Catalogue
from .errors import ImageError, StoreError, one_line
from .geometric import LOCAL_FEATURES, LocalSpec
from .prepare import Prepared, embed_prepared, prepare_image, vector_dim
from .preprocess import load_image
from .resolve import (
    Models,
    build_identity,
    carried_classifier,
    carried_embedder,
    carry_classifier,
    carry_embedder,
    describe_files,
    load_models,
    record_carried_embedder,
    resolve_config,
)
from .types import Record

log = logging.getLogger("csearch")

CHUNK = 256  # most images per commit (one segment); the store's merge policy keeps segments few
COMMIT_SECONDS = 30.0  # commit at least this often: what an interruption can lose
FAILURES_FILE = "failures.txt"  # INDEX_DIR/failures.txt: path TAB reason, one line per image
clock = time.monotonic  # the commit timer's clock (tests replace it)


@dataclass(frozen=True)
class IndexReport:
    index_dir: str
    added: int
    skipped_existing: int
    failures: tuple[tuple[str, str], ...]
    seconds: float
    config: Optional[Config] = None  # resolved: the exact model files used
    items: int = 0  # items in the index once built (resumed ones included)
    failures_file: Optional[str] = None  # INDEX_DIR/failures.txt when some images failed

    @property
    def images_per_second(self) -> float:
        return self.added / self.seconds if self.seconds > 0 else 0.0


def _prepare_records(
    records: Sequence[Record], config: Config, models: Models, workers: int, local=None
) -> Iterator[tuple[Record, Optional[Prepared], Optional[str]]]:
    """Decode + localize (+ the local features of `local`, a `geometric.LocalSpec`) in a small
    thread pool (ONNX Runtime and OpenCV release the GIL), in order."""

    def work(record: Record):
        try:
            image = load_image(record.path, config.preprocess.max_pixels, config.preprocess.min_side)
            prepared = prepare_image(image, config, models.localizer, _needs_classifier(record, models), local)
            return record, prepared, None
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


@dataclass(frozen=True)
class _Embedded:
    """One image ready to store: what `IndexStore.add` takes, without the model inputs."""

    vector: np.ndarray
    mask: np.ndarray
    box: np.ndarray
    path: str
    category: Optional[str]
    product: Optional[str]
    local_features: Optional[np.ndarray] = None


def _embed(prepared: Sequence[tuple[Record, Prepared]], config: Config, models: Models) -> list[_Embedded]:
    vectors = embed_prepared(models.extractor, [p for _, p in prepared], config)
    return [
        _Embedded(vector, p.mask, p.box, str(Path(r.path).resolve()), _label(r, p, models), r.product, p.local_features)
        for (r, p), vector in zip(prepared, vectors)
    ]


def _store(store, items: Sequence[_Embedded]) -> np.ndarray:
    local = None if items[0].local_features is None else [i.local_features for i in items]
    return store.add(
        vectors=np.stack([i.vector for i in items]),
        masks=np.stack([i.mask for i in items]),
        boxes=np.stack([i.box for i in items]),
        paths=[i.path for i in items],
        categories=[i.category for i in items],
        products=[i.product for i in items],
        extras=None if local is None else {LOCAL_FEATURES: np.stack(local)},
    )


def index_meta(config: Config, models: Models, index_dir: Optional[Path] = None) -> dict:
    """What an index records about its build: the config, each model file with its sha256, ...
    With `index_dir`, a trained classifier is recorded as the copy the index carries
    (INDEX_DIR/models/classifier, see `_open_or_create`); "classifier" keeps the RUN_DIR it came from."""
    recorded, files = config, describe_files(models.files())
    if index_dir is not None and config.classify.classifier and models.classifier is not None:
        copy = carried_classifier(index_dir)
        recorded = replace(config, classify=replace(config.classify, classifier=str(copy)))
        sources = {str(Path(f).resolve()) for f in models.classifier.files}
        files = [{**f, "path": str(copy / Path(f["path"]).name)} if f["path"] in sources else f for f in files]
    if index_dir is not None and config.embed.embedder:
        recorded, files = record_carried_embedder(recorded, files, index_dir)
    return {
        "csearch_version": __version__,
        "config": recorded.to_dict(),
        "models": files,
        "extractor": {"name": config.embed.extractor, "dim": vector_dim(config, models.extractor)},
        "classifier": None if models.classifier is None else str(Path(config.classify.classifier).resolve()),
        "embedder": config.embed.embedder,  # the RUN_DIR it came from (the index carries a copy)
        "localizer": getattr(models.localizer, "name", config.localize.method),
        # the local features every item stores for geometric re-ranking (None: the index has none)
        LOCAL_FEATURES: LocalSpec.from_config(config.search).to_meta() if config.search.rerank == "geometric" else None,
        "complete": False,
    }


def _open_or_create(out: Path, config: Config, models: Models, overwrite: bool):
    """Create the index, or open it to resume when it was built the same way (the same settings
    and model files by sha256, wherever they are); then copy its trained classifier into it."""
    from .store.open import create_store, open_store

    meta = index_meta(config, models, out)
    if out.exists() and not overwrite and any(out.iterdir()):
        store = open_store(out)
        if build_identity(store.meta) != build_identity(meta):
            raise StoreError(
                f"{out} already holds an index built with other settings or models; "
                f"use `csearch add` to extend it, --overwrite to replace it, or another --out"
            )
    else:
        store = create_store(  # in the store config.store.uri names: the index folder, or Milvus
            out,
            config.store.uri,
            meta=meta,
            dim=vector_dim(config, models.extractor),
            mask_size=config.search.mask_size,
            overwrite=overwrite,
            ann=config.store.ann,
        )
    # before any image: the index records the copy, so the copy is made (or completed) right away;
    # an index from before copies existed, or resumed after a move, keeps what it recorded
    if meta["classifier"] and store.meta["config"]["classify"]["classifier"] == str(carried_classifier(out)):
        carry_classifier(config.classify.classifier, models.classifier, out)
    if meta["embedder"] and store.meta["config"]["embed"]["embedder"] == str(carried_embedder(out)):
        carry_embedder(config.embed.embedder, out)
    return store


def add_records(
    store,
    records: Sequence[Record],
    config: Config,
    models: Models,
    progress: Optional[Callable[[int], None]] = None,
    workers: int = 2,
    on_commit: Optional[Callable[[int], None]] = None,
) -> tuple[np.ndarray, list]:
    """Extract and store `records`; returns (the new ids: int64, ascending, one per record
    indexed; the failures as (path, reason)).

    `progress(1)` is called as each image is prepared (or fails); images are embedded in batches
    of embed.batch_size and committed every CHUNK images or COMMIT_SECONDS, whichever comes first
    (`on_commit(items in the store)` after each commit). Durable on return."""
    local = LocalSpec.from_meta(store.meta.get(LOCAL_FEATURES))  # the index decides, not the query config
    added, failures = [np.zeros(0, np.int64)], []
    waiting: list[tuple[Record, Prepared]] = []  # prepared, not yet embedded
    ready: list[_Embedded] = []  # embedded, not yet committed
    last_commit = clock()

    def embed_waiting() -> None:
        if waiting:
            ready.extend(_embed(waiting, config, models))
            waiting.clear()

    def commit() -> None:
        nonlocal last_commit
        embed_waiting()
        if ready:
            added.append(_store(store, ready))
            ready.clear()
            if on_commit:
                on_commit(len(store))
        last_commit = clock()

    for record, prepared, error in _prepare_records(records, config, models, workers, local):
        if prepared is None:
            failures.append((record.path, error))
        else:
            waiting.append((record, prepared))
            if len(waiting) >= config.embed.batch_size:
                embed_waiting()
        if progress:
            progress(1)
        if len(waiting) + len(ready) >= CHUNK or clock() - last_commit >= COMMIT_SECONDS:
            commit()
    commit()
    return np.concatenate(added), failures


def _label(record: Record, prepared: Prepared, models: Models) -> Optional[str]:
    if record.category is not None or prepared.classifier_input is None:
        return record.category
    return models.classifier.predict_top(prepared.classifier_input[None], 1)[0].category


def catalogue_key(spec: str) -> str:
    """How an index records the catalogue it was built from: its SPEC as an absolute path."""
    return str(Path(spec).expanduser().resolve())


def check_same_catalogue(out: Path, catalogue: Catalogue) -> None:
    """Refuse to index `catalogue` into an existing index of another catalogue (StoreError), so
    `csearch index OTHER --out INDEX` never merges silently; the same SPEC resumes. Reads only
    the index's meta, so it runs before any model is loaded."""
    from .store.open import read_meta

    meta = read_meta(out)  # the local manifest's, or a Milvus store's records
    if meta is None:
        return
    recorded = meta.get("catalogue")
    if recorded is None or catalogue_key(recorded) == catalogue_key(catalogue.spec):
        return
    raise StoreError(
        f"{out} already holds an index of another catalogue ({recorded}); use "
        f"`csearch add {out} {catalogue.spec}` to add this catalogue to it, --overwrite to replace it, or another --out"
    )


def write_failures(out: Path, failures: Sequence[tuple[str, str]]) -> Optional[Path]:
    """Write INDEX_DIR/failures.txt (path TAB reason per line, atomically); remove a stale one
    when nothing failed. Returns its path, or None."""
    from .store import write_bytes_atomic

    path = out / FAILURES_FILE
    if not failures:
        path.unlink(missing_ok=True)
        return None
    lines = [
        f"{_tsv_field(failed)}\t{one_line(reason.replace(f'{failed}: ', ''), limit=500)}\n"
        for failed, reason in failures
    ]
    write_bytes_atomic(path, "".join(lines).encode("utf-8", errors="surrogateescape"))
    return path


def _tsv_field(text: str) -> str:
    # a tab or line break inside a file name would break the one-line-per-image format
    return " ".join(str(text).replace("\t", " ").splitlines())


def build_index(
    catalogue: Catalogue,
    config: Config,
    out: str | Path,
    overwrite: bool = False,
    progress: Optional[Callable[[int], None]] = None,
    models: Optional[Models] = None,
    workers: int = 2,
    on_commit: Optional[Callable[[int], None]] = None,
    adder: Optional[Callable] = None,
) -> IndexReport:
    """Index a catalogue into `out`. Re-running with the same catalogue resumes after the last
    commit; another catalogue at an existing `out` is refused unless `overwrite`.

    `progress(n)` counts images done (the resumed ones first, then one per image prepared);
    `on_commit(items)` follows each commit. Images that could not be read are skipped, returned
    in the report and listed in INDEX_DIR/failures.txt. `adder` replaces `add_records` (same
    arguments and result), e.g. `indexing_ray.ray_adder(address)` runs the images on Ray Data."""
    started = time.perf_counter()
    out = Path(out)
    if not overwrite:
        check_same_catalogue(out, catalogue)
    from .store.open import parse_store

    parse_store(config.store.uri, out)  # a malformed STORE fails before any model loads
    if models is None:
        config = resolve_config(config)
        models = load_models(config)
    store = _open_or_create(out, config, models, overwrite)
    key = catalogue_key(catalogue.spec)
    if store.meta.get("catalogue") != key:  # recorded at once, so an interrupted index knows it too
        store.update_meta({"catalogue": key})
    done = set(store.snapshot.paths)
    todo = [r for r in catalogue.records if str(Path(r.path).resolve()) not in done]
    if progress and len(todo) < len(catalogue.records):
        progress(len(catalogue.records) - len(todo))
    ids, failures = (adder or add_records)(store, todo, config, models, progress, workers, on_commit)
    failures = tuple(failures) + tuple(catalogue.skipped)
    failures_file = write_failures(out, failures)
    store.update_meta({"complete": True})
    if config.store.ann != "none" and hasattr(store, "commit_ann"):  # the local store's ANN index (store.ann)
        from .store.ann import ensure

        ensure(store, config.store.ann)
    return IndexReport(
        str(out),
        len(ids),
        len(catalogue.records) - len(todo),
        failures,
        time.perf_counter() - started,
        config,
        items=len(store),
        failures_file=None if failures_file is None else str(failures_file),
    )
