"""What the routes do, on one shared index and a pool of per-worker engines: search, add and
remove jobs, items and their pictures, health and stats. Answers plain dicts (the API's JSON)."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from .. import __version__
from ..errors import ConfigError, ImageError, StoreError
from ..pipeline import Engine, load_models
from ..preprocess import load_image
from ..resolve import query_threads
from ..types import Localization, QueryResult, Record
from .errors import ApiError, not_found
from .images import ITEM_MASK_RGBA, QUERY_MASK_RGBA, THUMBNAIL_SIDE, cutout_jpeg, data_url, small_jpeg, tinted_mask_png
from .pool import WorkerPool
from .uploads import Uploads

log = logging.getLogger(__name__)

THUMBNAIL_CACHE = 512  # thumbnails kept in memory (ids are never reused, so never stale)


class SharedStore:
    """The store all workers share (any `store.base.VectorStore`: the local IndexStore or a
    Milvus one), with every write behind one mutex (a store allows one writer at a time per
    process; the local store's flock orders processes). Reads go through `snapshot`."""

    def __init__(self, store):
        self._store, self._mutex = store, threading.Lock()

    @property
    def snapshot(self):
        return self._store.snapshot

    @property
    def meta(self) -> dict:
        return self._store.meta

    def __len__(self) -> int:
        return len(self._store)

    @property
    def directory(self) -> Path:
        return Path(self._store.directory)

    def add(self, *args, **kwargs):
        with self._mutex:
            return self._store.add(*args, **kwargs)

    def remove(self, ids, missing_ok: bool = False) -> int:
        with self._mutex:
            return self._store.remove(ids, missing_ok=missing_ok)

    def refresh_if_idle(self) -> None:
        """Pick up other processes' commits (one small file read when nothing changed). Skipped
        while this process is writing: its own commit refreshes the store anyway."""
        if self._mutex.acquire(blocking=False):
            try:
                self._store.refresh()
            finally:
                self._mutex.release()


class LruCache:
    def __init__(self, size: int):
        self._size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


def item_urls(item_id: int) -> dict:
    base = f"/items/{int(item_id)}"
    return {"image_url": f"{base}/image", "thumbnail_url": f"{base}/thumbnail", "mask_url": f"{base}/mask"}


def public_hit(hit) -> dict:
    """A Hit as the API shows it: the CLI's fields, URLs in place of the server's file path."""
    row = hit.to_dict()
    row.pop("path", None)
    for key in ("distance", "iou", "score"):  # JSON has no NaN; never let one become a 500
        if row[key] is not None and not math.isfinite(row[key]):
            row[key] = None
    row.update(item_urls(hit.id))
    return row


def public_result(result: QueryResult) -> dict:
    payload = result.to_dict()
    payload["results"] = [public_hit(h) for h in result.hits]
    return payload


def public_item(item: dict) -> dict:
    return {"id": int(item["id"]), "product": item["product"], "category": item["category"], **item_urls(item["id"])}


class Service:
    """Everything the routes do, on a shared store and a pool of per-worker engines."""

    def __init__(
        self,
        engine: Engine,
        workers: int,
        queue_limit: int,
        max_upload_bytes: int,
        model_factory: Optional[Callable[[], object]] = None,
        writes: str = "open",
    ):
        if workers < 1:
            raise ConfigError(f"workers must be at least 1, got {workers}")
        if queue_limit < 0:
            raise ConfigError(f"queue_limit must be >= 0, got {queue_limit}")
        self.config = engine.config
        self.store = SharedStore(engine.store)
        self.index_dir = self.store.directory
        self.uploads = Uploads(self.index_dir)
        self.max_upload_bytes = int(max_upload_bytes)
        self.writes = writes  # 'open', 'api_key' or 'read_only' (auth.write_mode), for /health
        self.has_classifier = engine.models.classifier is not None  # else every search is over all categories
        # each worker's localizer gets its share of the cores (the first engine was opened that way)
        make_models = model_factory or (lambda: load_models(engine.config, query_threads(workers)))
        models = [engine.models] + [make_models() for _ in range(workers - 1)]
        # `Engine.search` reads one `store.snapshot` per query, so workers share the store safely
        self.pool = WorkerPool([Engine(self.store, engine.config, m) for m in models], queue_limit)
        self.thumbnails = LruCache(THUMBNAIL_CACHE)
        self.started = time.time()
        self.counts = {"search": 0, "add": 0, "remove": 0}
        self._count_lock = threading.Lock()
        self.uploads.remove_stale_temp_files()

    # -- items -------------------------------------------------------------------------------
    def item(self, item_id: int) -> tuple[dict, int, object]:
        """(item, row, snapshot) of a live id, else 404."""
        self.store.refresh_if_idle()
        snapshot = self.store.snapshot
        try:
            row = int(snapshot.rows_for_ids([item_id])[0])
        except StoreError:
            raise not_found(item_id) from None
        return snapshot.item(item_id), row, snapshot

    def image_path(self, item_id: int) -> Path:
        item, _, _ = self.item(item_id)
        path = Path(item["path"])
        if not path.is_file():
            log.warning("item %d: image file %s is missing", item_id, path)
            raise ApiError(404, "image_missing", f"the image of item {item_id} is missing on the server")
        return path

    def thumbnail(self, item_id: int) -> bytes:
        path = self.image_path(item_id)
        cached = self.thumbnails.get(item_id)
        if cached is not None:
            return cached
        try:
            image = load_image(path, self.config.preprocess.max_pixels, min_side=1)
        except ImageError:
            raise ApiError(404, "image_missing", f"the image of item {item_id} is unreadable on the server") from None
        data = small_jpeg(image, THUMBNAIL_SIDE)
        self.thumbnails.put(item_id, data)
        return data

    def mask_png(self, item_id: int) -> bytes:
        _, row, snapshot = self.item(item_id)
        return tinted_mask_png(snapshot.masks([row])[0], ITEM_MASK_RGBA)

    # -- jobs (run on a worker thread with that worker's engine) ------------------------------
    def search_job(
        self, engine: Engine, data: bytes, k: Optional[int], category: Optional[str], switches: dict, visuals: bool
    ) -> dict:
        self.store.refresh_if_idle()
        # Engine.query checks the category and the settings (the CLI's rules) before any image work
        result = engine.query(data, k=k, category=category, **switches)
        payload = public_result(result)
        if visuals and result.localization is not None:
            payload.update(self._visuals(result.localization))
        self._count("search")
        return payload

    def _visuals(self, localization: Localization) -> dict:
        from ..masks import resize_mask

        # the same resize the pipeline applies, so this is exactly the mask the re-ranker compares
        mask = resize_mask(localization.mask, self.store.snapshot.mask_size)
        return {
            "cutout": data_url(cutout_jpeg(localization), "image/jpeg"),
            "query_mask": data_url(tinted_mask_png(mask, QUERY_MASK_RGBA), "image/png"),
            "localizer": localization.produced_by,
        }

    def add_job(self, engine: Engine, data: bytes, product: str, category: str) -> dict:
        """Validate, store the upload durably in INDEX_DIR/uploads, then index it (durable)."""
        load_image(data, self.config.preprocess.max_pixels, self.config.preprocess.min_side)
        path = self.uploads.save(data)
        try:
            ids, failures = engine.add([Record(str(path), category, product)], workers=1)
        except BaseException:
            self._discard_unless_indexed(path)
            raise
        if len(ids) != 1:
            self._discard_unless_indexed(path)
            raise ImageError(failures[0][1].replace(str(path), "file") if failures else "file: could not be indexed")
        self._count("add")
        item = {"id": int(ids[0]), "product": product, "category": category}
        return {**public_item(item), "items": len(self.store.snapshot)}

    def remove(self, item_id: int) -> dict:
        item, _, _ = self.item(item_id)
        if not self.store.remove([item_id], missing_ok=True):
            raise not_found(item_id)  # removed meanwhile
        self.uploads.delete(Path(item["path"]))
        self._count("remove")
        return {"id": item_id, "removed": True, "items": len(self.store.snapshot)}

    def _count(self, kind: str) -> None:
        with self._count_lock:
            self.counts[kind] += 1

    def _discard_unless_indexed(self, path: Path) -> None:
        """Delete an upload the store did not commit (an add that failed part-way)."""
        self.store.refresh_if_idle()
        if str(path) not in set(self.store.snapshot.paths):
            self.uploads.delete(path)

    # -- reporting ------------------------------------------------------------------------------
    def health(self) -> dict:
        self.store.refresh_if_idle()
        return {
            "status": "ok",
            "items": len(self.store.snapshot),
            "in_progress": self.pool.in_use,
            "capacity": self.pool.capacity,
            "classifier": self.has_classifier,
            "writes": self.writes,
        }

    def stats(self) -> dict:
        self.store.refresh_if_idle()
        snapshot = self.store.snapshot
        meta = snapshot.meta
        counts = snapshot.category_counts()
        index_bytes, upload_bytes, uploads = self._disk_usage()
        return {
            "items": len(snapshot),
            "categories": {c: n for c, n in sorted(counts.items(), key=lambda kv: str(kv[0])) if c is not None},
            "unlabelled": counts.get(None, 0),
            "products": len({p for p in snapshot.products if p is not None}),
            "models": {
                "extractor": Path(str(meta.get("extractor", {}).get("name", "?"))).name,
                "dim": snapshot.dim,
                "localizer": meta.get("localizer"),
                "classifier": Path(meta["classifier"]).name if meta.get("classifier") else None,
                "files": [{"name": Path(m["path"]).name, "sha256": m["sha256"]} for m in meta.get("models", [])],
            },
            "index": {
                "generation": snapshot.generation,
                "mask_size": snapshot.mask_size,
                "bytes": index_bytes,
                "uploads": uploads,
                "upload_bytes": upload_bytes,
            },
            "service": {
                "version": __version__,
                "workers": self.pool.workers,
                "queue_limit": self.pool.capacity - self.pool.workers,
                "max_upload_bytes": self.max_upload_bytes,
                "in_progress": self.pool.in_use,
                "rejected": self.pool.rejected,
                "completed": dict(self.counts),
                "uptime_s": round(time.time() - self.started, 1),
            },
        }

    def _disk_usage(self) -> tuple[int, int, int]:
        index_bytes = upload_bytes = uploads = 0
        for root, _, files in os.walk(self.index_dir):
            in_uploads = Path(root) == self.uploads.directory
            for name in files:
                try:
                    size = os.stat(os.path.join(root, name)).st_size
                except FileNotFoundError:  # collected by a writer meanwhile
                    continue
                if in_uploads:
                    upload_bytes += size
                    uploads += 1
                else:
                    index_bytes += size
        return index_bytes, upload_bytes, uploads
