"""`csearch serve`: the online stage over HTTP (FastAPI) plus a web page, safe under load,
faults and bad input.

Design, in brief (measurements in docs/results/service.md):

- Workers: `workers` threads, each owning its own copy of the models (thread confinement), so
  no model has to be thread-safe and every stage, localization included, runs in parallel.
  A copy costs memory once at start (U²-Net-p 4.7 MB, MobileNet 17 MB), not per request.
- Reads never wait: a search reads one immutable `store.snapshot` (`Engine.search` takes one
  per query), so concurrent adds and removes can never show it half an update. Writes (add, remove, refresh)
  are serialised by one mutex in this process and by the store's flock across processes; each
  is fsynced before the response, so an acknowledged change survives SIGKILL.
- Overload: at most `workers + queue_limit` requests hold a slot (running or queued FIFO); the
  next gets 503 at once, before its upload is read into memory. With the body size limit (413)
  this bounds memory to about slots x max_upload_bytes plus the workers' decoded images.
- Paths never leave the server: items are addressed by id, errors are one-line JSON messages.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import mimetypes
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Callable, Optional

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Path as PathParam, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .errors import ConfigError, CSearchError, ImageError, StoreError, unknown_name
from .pipeline import Engine, load_models
from .preprocess import downscale_max_side, load_image
from .search import RERANK_METHODS
from .store import fsync_dir
from .types import Localization, QueryResult, Record

log = logging.getLogger("csearch.serve")

STATIC_DIR = Path(__file__).with_name("static")
UPLOADS = "uploads"  # INDEX_DIR/uploads/: images added through the API, kept with the index
DEFAULT_MAX_UPLOAD_BYTES = 10 * 2**20  # a full-resolution phone photo is 3-8 MB
DEFAULT_QUEUE_LIMIT = 32  # waiting requests on top of the running ones
FORM_OVERHEAD = 64 * 2**10  # multipart boundaries and text fields on top of the file
MAX_K = 100
MAX_RERANK_TOP = 1000
MAX_LABEL = 200  # characters in a product or category name
MAX_ID = 2**63 - 1  # ids are int64
THUMBNAIL_SIDE = 256
THUMBNAIL_CACHE = 512  # thumbnails kept in memory (ids are never reused, so never stale)
CUTOUT_SIDE = 320
QUERY_MASK_RGBA = (255, 120, 0, 150)  # orange: the query's mask, in the page's overlay
ITEM_MASK_RGBA = (0, 110, 255, 150)  # blue: the catalogue item's mask


# ----------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered as JSON `{"error": message, "type": kind}` with an HTTP status."""

    def __init__(self, status: int, kind: str, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


def error_response(status: int, kind: str, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": message, "type": kind}, status_code=status, headers=headers)


def _csearch_error(exc: CSearchError) -> ApiError:
    """Map the engine's typed errors to HTTP: the request's fault is 4xx, the server's is 5xx
    with a generic message (its text may name server paths; it goes to the log instead)."""
    if isinstance(exc, ImageError):
        return ApiError(422, "bad_image", str(exc).replace("<upload>", "file"))
    if isinstance(exc, ConfigError):
        return ApiError(422, "bad_parameter", str(exc))
    log.error("index or model problem: %s", exc)
    if isinstance(exc, StoreError):  # e.g. another process held the index's write lock too long
        return ApiError(503, "index_unavailable", "the index is busy or unavailable; try again",
                        {"Retry-After": "2"})
    return ApiError(500, "server_error", "the server's models or index are misconfigured; see its log")


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error.get("loc", ())[1:]) or "request"
        parts.append(f"{field}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return error_response(exc.status, exc.kind, exc.message, exc.headers)

    @app.exception_handler(CSearchError)
    async def _engine(request: Request, exc: CSearchError):
        api = _csearch_error(exc)
        return error_response(api.status, api.kind, api.message, api.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(422, "bad_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, "http_error", str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "server_error", "internal error; see the server's log")


# ----------------------------------------------------------------------------- request body limit


class BodyLimit:
    """ASGI middleware: refuse a request body over `limit` bytes with 413, from the declared
    Content-Length when there is one, else while it streams in, so it is never buffered whole.

    When the limit trips mid-body the app sees its read fail and answers something; that answer
    is dropped and the 413 is sent instead.
    """

    class _TooLarge(Exception):
        pass

    def __init__(self, app, limit: int):
        self.app, self.limit = app, int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            return await self._refuse(scope, receive, send)
        state = {"seen": 0, "over": False, "started": False}

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > self.limit:
                    state["over"] = True
                    raise BodyLimit._TooLarge()
            return message

        async def guarded_send(message):
            if state["over"]:
                return
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:  # noqa: BLE001 - only the consequences of our own abort are absorbed
            if not state["over"]:
                raise
        if state["over"] and not state["started"]:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        limit_mb = (self.limit - FORM_OVERHEAD) / 2**20
        response = error_response(413, "too_large", f"file: upload too large (limit {limit_mb:.1f} MiB)",
                                  {"Connection": "close"})
        await response(scope, receive, send)


def _content_length(scope) -> Optional[int]:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


# ----------------------------------------------------------------------------- workers


class _GuardedStore:
    """The shared IndexStore with every mutation behind one mutex (the store allows one writer
    at a time per process). Reads pass straight through; searches use `snapshot`."""

    def __init__(self, store, mutex: threading.Lock):
        self._store, self._mutex = store, mutex
        self._added = threading.local()

    def __getattr__(self, name):
        return getattr(self._store, name)

    def __len__(self) -> int:
        return len(self._store)

    def add(self, *args, **kwargs):
        with self._mutex:
            ids = self._store.add(*args, **kwargs)
        self._added.ids = ids  # `Engine.add` reports counts; the API must answer the new id
        return ids

    def take_added_ids(self):
        ids, self._added.ids = getattr(self._added, "ids", None), None
        return ids

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


class Slot:
    """A place in the pool (running or queued). Freed when its job ends, or on exit if it never
    got one, so a client that disconnects cannot leak it."""

    def __init__(self, pool: "WorkerPool"):
        self._pool, self._handed_over, self._released = pool, False, False
        self._lock = threading.Lock()

    def hand_over(self, future: Future) -> None:
        self._handed_over = True
        future.add_done_callback(lambda _: self.release())

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._pool._release()

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc) -> None:
        if not self._handed_over:
            self.release()


class WorkerPool:
    """`len(engines)` threads, one engine each, fed first-in first-out; at most
    `workers + queue_limit` slots, the next request is refused at once (503)."""

    def __init__(self, engines: list, queue_limit: int):
        self.workers = len(engines)
        self.capacity = self.workers + int(queue_limit)
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        for engine in engines:
            self._idle.put(engine)
        self.engines = list(engines)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="csearch-worker")
        self._lock = threading.Lock()
        self.in_use = 0
        self.rejected = 0

    def admit(self) -> Slot:
        with self._lock:
            if self.in_use >= self.capacity:
                self.rejected += 1
                raise ApiError(503, "overloaded", f"server busy: {self.capacity} requests running or queued; "
                               f"retry shortly", {"Retry-After": "1"})
            self.in_use += 1
        return Slot(self)

    def _release(self) -> None:
        with self._lock:
            self.in_use -= 1

    async def run(self, slot: Slot, job: Callable, *args):
        """`job(engine, *args)` on a worker; returns (its result, ms spent waiting in the queue)."""
        queued = time.perf_counter()

        def on_worker():
            waited_ms = (time.perf_counter() - queued) * 1e3
            engine = self._idle.get_nowait()  # never empty: as many engines as threads
            try:
                return job(engine, *args), waited_ms
            finally:
                self._idle.put(engine)

        future = self._executor.submit(on_worker)
        slot.hand_over(future)
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------- images


def _encode(array: np.ndarray, fmt: str, **options) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def tinted_mask_png(mask: np.ndarray, rgba: tuple) -> bytes:
    """bool (S, S) -> RGBA PNG: `rgba` where the mask is set, transparent elsewhere, for overlays."""
    out = np.zeros((*mask.shape, 4), np.uint8)
    out[mask] = rgba
    return _encode(out, "PNG")


def cutout_jpeg(localization: Localization, side: int = CUTOUT_SIDE) -> bytes:
    """The object on white, cropped to its box with a small margin."""
    x0, y0, x1, y1 = localization.box
    pad = round(0.05 * max(x1 - x0, y1 - y0))
    height, width = localization.cutout.shape[:2]
    crop = localization.cutout[max(0, y0 - pad):min(height, y1 + pad), max(0, x0 - pad):min(width, x1 + pad)]
    return _encode(np.ascontiguousarray(downscale_max_side(crop, side)), "JPEG", quality=85)


def _upload_suffix(data: bytes) -> str:
    """A file suffix for the upload's real format (sniffed, never the client's file name)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        fmt = image.format or ""
    known = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
    if fmt in known:
        return known[fmt]
    found = [ext for ext, name in Image.registered_extensions().items() if name == fmt]
    return found[0] if found else ".img"


class _LruCache:
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


# ----------------------------------------------------------------------------- the service


def public_hit(hit) -> dict:
    """A Hit as the API shows it: the CLI's fields, URLs in place of the server's file path."""
    row = hit.to_dict()
    row.pop("path", None)
    for key in ("distance", "iou", "score"):  # JSON has no NaN; never let one become a 500
        if row[key] is not None and not math.isfinite(row[key]):
            row[key] = None
    base = f"/items/{int(hit.id)}"
    row.update(image_url=f"{base}/image", thumbnail_url=f"{base}/thumbnail", mask_url=f"{base}/mask")
    return row


def public_result(result: QueryResult) -> dict:
    payload = result.to_dict()
    payload["results"] = [public_hit(h) for h in result.hits]
    return payload


def public_item(item: dict) -> dict:
    base = f"/items/{int(item['id'])}"
    return {"id": int(item["id"]), "product": item["product"], "category": item["category"],
            "image_url": f"{base}/image", "thumbnail_url": f"{base}/thumbnail", "mask_url": f"{base}/mask"}


class Service:
    """Everything the routes do, on a shared store and a pool of per-worker engines."""

    def __init__(self, engine: Engine, workers: int, queue_limit: int, max_upload_bytes: int,
                 model_factory: Optional[Callable[[], object]] = None):
        if workers < 1:
            raise ConfigError(f"workers must be at least 1, got {workers}")
        if queue_limit < 0:
            raise ConfigError(f"queue_limit must be >= 0, got {queue_limit}")
        self.config = engine.config
        self.index_dir = Path(engine.store.directory)
        self.uploads = self.index_dir / UPLOADS
        self.max_upload_bytes = int(max_upload_bytes)
        self.store = _GuardedStore(engine.store, threading.Lock())
        make_models = model_factory or (lambda: load_models(engine.config))
        models = [engine.models] + [make_models() for _ in range(workers - 1)]
        # `Engine.search` reads one `store.snapshot` per query, so workers share the store safely
        self.pool = WorkerPool([Engine(self.store, engine.config, m) for m in models], queue_limit)
        self.thumbnails = _LruCache(THUMBNAIL_CACHE)
        self.started = time.time()
        self.counts = {"search": 0, "add": 0, "remove": 0}
        self._count_lock = threading.Lock()
        self._remove_stale_temp_files()

    # -- items -------------------------------------------------------------------------------
    def item(self, item_id: int) -> tuple[dict, int, object]:
        """(item, row, snapshot) of a live id, else 404."""
        self.store.refresh_if_idle()
        snapshot = self.store.snapshot
        try:
            row = int(snapshot.rows_for_ids([item_id])[0])
        except StoreError:
            raise ApiError(404, "not_found", f"no item with id {item_id}") from None
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
        data = _encode(np.ascontiguousarray(downscale_max_side(image, THUMBNAIL_SIDE)), "JPEG", quality=85)
        self.thumbnails.put(item_id, data)
        return data

    def mask_png(self, item_id: int) -> bytes:
        _, row, snapshot = self.item(item_id)
        return tinted_mask_png(snapshot.masks([row])[0], ITEM_MASK_RGBA)

    # -- jobs (run on a worker thread with that worker's engine) ------------------------------
    def search_job(self, engine: Engine, data: bytes, k: Optional[int], category: Optional[str],
                   switches: dict, visuals: bool) -> dict:
        self.store.refresh_if_idle()
        if category is not None:
            known = [c for c in self.store.snapshot.category_counts() if c is not None]
            if category not in known:
                raise unknown_name("category", category, known)
        result = engine.query(data, k=k, category=category, **switches)
        payload = public_result(result)
        if visuals and result.localization is not None:
            payload.update(self._visuals(result.localization))
        self._count("search")
        return payload

    def _visuals(self, localization: Localization) -> dict:
        from .masks import resize_mask

        # the same resize the pipeline applies, so this is exactly the mask the re-ranker compares
        mask = resize_mask(localization.mask, self.store.snapshot.mask_size)
        return {"cutout": _data_url(cutout_jpeg(localization), "image/jpeg"),
                "query_mask": _data_url(tinted_mask_png(mask, QUERY_MASK_RGBA), "image/png"),
                "localizer": localization.backend}

    def add_job(self, engine: Engine, data: bytes, product: str, category: str) -> dict:
        """Validate, store the upload durably in INDEX_DIR/uploads, then index it (durable)."""
        load_image(data, self.config.preprocess.max_pixels, self.config.preprocess.min_side)
        path = self._save_upload(data, _upload_suffix(data))
        try:
            added, failures = engine.add([Record(str(path), category, product)], workers=1)
        finally:
            ids = self.store.take_added_ids()
            if ids is None:
                self._discard_unless_indexed(path)
        if ids is None or len(ids) != 1:
            reason = failures[0][1].replace(str(path), "file") if failures else "file: could not be indexed"
            raise ImageError(reason)
        self._count("add")
        item = {"id": int(ids[0]), "product": product, "category": category}
        return {**public_item(item), "items": len(self.store)}

    def remove(self, item_id: int) -> dict:
        item, _, _ = self.item(item_id)
        if not self.store.remove([item_id], missing_ok=True):
            raise ApiError(404, "not_found", f"no item with id {item_id}")  # removed meanwhile
        self._delete_upload(Path(item["path"]))
        self._count("remove")
        return {"id": item_id, "removed": True, "items": len(self.store)}

    def _count(self, kind: str) -> None:
        with self._count_lock:
            self.counts[kind] += 1

    # -- uploads ------------------------------------------------------------------------------
    def _save_upload(self, data: bytes, suffix: str) -> Path:
        """Write, fsync, rename, fsync the folder: the file is durable before the store refers to it."""
        if not self.uploads.is_dir():
            self.uploads.mkdir(exist_ok=True)
            fsync_dir(self.index_dir)
        name = f"{uuid.uuid4().hex}{suffix}"
        tmp = self.uploads / f".tmp-{name}"
        with open(tmp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        final = self.uploads / name
        os.replace(tmp, final)
        fsync_dir(self.uploads)
        return final.resolve()

    def _discard_unless_indexed(self, path: Path) -> None:
        """Delete an upload the store did not commit (an add that failed part-way)."""
        self.store.refresh_if_idle()
        if str(path) not in set(self.store.snapshot.paths):
            path.unlink(missing_ok=True)

    def _delete_upload(self, path: Path) -> None:
        """Only files this service stored (catalogue images are the user's own files)."""
        if path.parent == self.uploads.resolve():
            path.unlink(missing_ok=True)

    def _remove_stale_temp_files(self) -> None:
        if self.uploads.is_dir():
            for stale in self.uploads.glob(".tmp-*"):
                stale.unlink(missing_ok=True)

    # -- reporting ------------------------------------------------------------------------------
    def health(self) -> dict:
        self.store.refresh_if_idle()
        return {"status": "ok", "items": len(self.store), "in_progress": self.pool.in_use,
                "capacity": self.pool.capacity}

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
            "index": {"generation": snapshot.generation, "mask_size": snapshot.mask_size,
                      "bytes": index_bytes, "uploads": uploads, "upload_bytes": upload_bytes},
            "service": {"version": __version__, "workers": self.pool.workers,
                        "queue_limit": self.pool.capacity - self.pool.workers,
                        "max_upload_bytes": self.max_upload_bytes, "in_progress": self.pool.in_use,
                        "rejected": self.pool.rejected, "completed": dict(self.counts),
                        "uptime_s": round(time.time() - self.started, 1)},
        }

    def _disk_usage(self) -> tuple[int, int, int]:
        index_bytes = upload_bytes = uploads = 0
        for root, _, files in os.walk(self.index_dir):
            in_uploads = Path(root) == self.uploads
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


# ----------------------------------------------------------------------------- response models


class HitOut(BaseModel):
    id: int
    product: Optional[str]
    category: Optional[str]
    distance: Optional[float]
    iou: Optional[float]
    score: Optional[float]
    image_url: str
    thumbnail_url: str
    mask_url: str


class SearchOut(BaseModel):
    category: Optional[str]
    results: list[HitOut]
    timings_ms: dict[str, float]
    cutout: Optional[str] = None
    query_mask: Optional[str] = None
    localizer: Optional[str] = None


class ItemOut(BaseModel):
    id: int
    product: Optional[str]
    category: Optional[str]
    image_url: str
    thumbnail_url: str
    mask_url: str


class AddedOut(ItemOut):
    items: int


class RemovedOut(BaseModel):
    id: int
    removed: bool
    items: int


class ErrorOut(BaseModel):
    error: str
    type: str


UPLOAD_ERRORS = {code: {"model": ErrorOut} for code in (413, 415, 422, 503)}
ID_ERRORS = {code: {"model": ErrorOut} for code in (404, 422)}
ItemId = Annotated[int, PathParam(ge=0, le=MAX_ID, description="item id (from a search or an add)")]


def require_multipart(request: Request) -> None:
    """415 for anything but a multipart form, rather than a confusing 'field required'; and
    parameters in the URL are refused, not silently ignored (they belong in the form)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", "expected a multipart/form-data upload with a "
                       f"'file' field, got content-type {ctype or 'none'!r}")
    if request.query_params:
        names = ", ".join(sorted(request.query_params.keys()))
        raise ApiError(422, "bad_parameter", f"{names}: send parameters as multipart form fields, not in the URL")


async def read_upload(file: UploadFile, limit: int) -> bytes:
    """The file's bytes; 413 past `limit` (the body limit also counts the form around it)."""
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "too_large", f"file: upload too large (limit {limit / 2**20:.1f} MiB)")
    return data


def _label(value: str, field: str) -> str:
    value = value.strip()
    if not value or any(ord(ch) < 32 for ch in value):
        raise ApiError(422, "bad_parameter", f"{field}: must be a non-empty name without control characters")
    return value


# ----------------------------------------------------------------------------- the app


def create_app(engine: Engine, workers: int = 2, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               queue_limit: int = DEFAULT_QUEUE_LIMIT,
               model_factory: Optional[Callable[[], object]] = None) -> FastAPI:
    """The HTTP API and web page on an opened Engine. `workers` threads each get their own models
    (`model_factory`, default: load the index's models again); see the module docstring."""
    service = Service(engine, workers, queue_limit, max_upload_bytes, model_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.pool.shutdown()

    app = FastAPI(title="csearch", version=__version__, lifespan=lifespan,
                  description="Find the same product in a catalogue from one photo "
                  "(localize, classify, restricted exact KNN, mask-IoU re-ranking).")
    app.state.service = service
    app.add_middleware(BodyLimit, limit=service.max_upload_bytes + FORM_OVERHEAD)
    install_error_handlers(app)
    _add_search_routes(app, service)
    _add_item_routes(app, service)
    _add_info_routes(app, service)
    return app


def _add_search_routes(app: FastAPI, service: Service) -> None:
    @app.post("/search", response_model=SearchOut, responses=UPLOAD_ERRORS, dependencies=[Depends(require_multipart)],
              summary="Find the catalogue items matching a photo")
    async def search(
        file: Annotated[UploadFile, File(description="the photo (any format Pillow reads)")],
        k: Annotated[Optional[int], Form(ge=1, le=MAX_K, description="number of results")] = None,
        category: Annotated[Optional[str], Form(max_length=MAX_LABEL,
                                                description="search this category instead of the predicted one")] = None,
        rerank: Annotated[Optional[str], Form(description=f"one of {', '.join(RERANK_METHODS)}")] = None,
        rerank_top: Annotated[Optional[int], Form(ge=1, le=MAX_RERANK_TOP)] = None,
        restrict: Annotated[Optional[bool], Form(description="restrict to the predicted category")] = None,
        visuals: Annotated[bool, Form(description="also return the cut-out and the query mask")] = False,
    ):
        if rerank is not None and rerank not in RERANK_METHODS:
            raise unknown_name("rerank method", rerank, RERANK_METHODS)
        switches = {"rerank": rerank, "rerank_top": rerank_top, "restrict": restrict}
        switches = {key: value for key, value in switches.items() if value is not None}
        with service.pool.admit() as slot:  # 503 before the upload is read into memory
            data = await read_upload(file, service.max_upload_bytes)
            payload, waited_ms = await service.pool.run(slot, service.search_job, data, k,
                                                        category or None, switches, visuals)
        payload["timings_ms"]["queue"] = round(waited_ms, 3)
        return payload


def _add_item_routes(app: FastAPI, service: Service) -> None:
    @app.post("/items", status_code=201, response_model=AddedOut, responses=UPLOAD_ERRORS,
              dependencies=[Depends(require_multipart)], summary="Add an image to the index (durable)")
    async def add_item(
        file: Annotated[UploadFile, File(description="the catalogue image")],
        product: Annotated[str, Form(min_length=1, max_length=MAX_LABEL)],
        category: Annotated[str, Form(min_length=1, max_length=MAX_LABEL)],
    ):
        product, category = _label(product, "product"), _label(category, "category")
        with service.pool.admit() as slot:
            data = await read_upload(file, service.max_upload_bytes)
            payload, _ = await service.pool.run(slot, service.add_job, data, product, category)
        return JSONResponse(payload, status_code=201, headers={"Location": f"/items/{payload['id']}"})

    @app.delete("/items/{item_id}", response_model=RemovedOut, responses=ID_ERRORS,
                summary="Remove an item from the index (durable)")
    async def remove_item(item_id: ItemId):
        return await run_in_threadpool(service.remove, item_id)  # fsyncs: off the event loop

    @app.get("/items/{item_id}", response_model=ItemOut, responses=ID_ERRORS, summary="An item's labels and URLs")
    async def get_item(item_id: ItemId):
        item, _, _ = service.item(item_id)
        return public_item(item)

    @app.get("/items/{item_id}/image", responses=ID_ERRORS, response_class=FileResponse,
             summary="The item's catalogue image")
    async def item_image(item_id: ItemId):
        path = service.image_path(item_id)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/items/{item_id}/thumbnail", responses=ID_ERRORS, summary=f"The item's image, at most {THUMBNAIL_SIDE} px")
    async def item_thumbnail(item_id: ItemId):
        data = await run_in_threadpool(service.thumbnail, item_id)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/items/{item_id}/mask", responses=ID_ERRORS,
             summary="The item's object mask as the re-ranker compares it (RGBA PNG, mask_size px)")
    async def item_mask(item_id: ItemId):
        return Response(service.mask_png(item_id), media_type="image/png")


def _add_info_routes(app: FastAPI, service: Service) -> None:
    @app.get("/health", summary="Liveness and load")
    async def health():
        return service.health()

    @app.get("/stats", summary="Items, categories, models and index size")
    async def stats():
        return await run_in_threadpool(service.stats)  # walks INDEX_DIR: off the event loop

    page_headers = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
                    "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=page_headers)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


# ----------------------------------------------------------------------------- running


def run_server(index_dir, host: str = "127.0.0.1", port: int = 8000, workers: int = 2, *,
               queue_limit: int = DEFAULT_QUEUE_LIMIT, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               log_level: str = "info") -> None:
    """Open the index and its models once, then serve until interrupted (uvicorn, one process)."""
    import uvicorn

    engine = Engine.open(index_dir)
    app = create_app(engine, workers=workers, max_upload_bytes=max_upload_bytes, queue_limit=queue_limit)
    log.info("csearch: serving %d item(s) from %s on http://%s:%d (%d worker(s), queue %d)",
             len(engine.store), index_dir, host, port, workers, queue_limit)
    # last-resort guard on open connections; the pool's 503 (with a JSON body) normally acts first
    limit = max(128, 4 * (workers + queue_limit))
    uvicorn.run(app, host=host, port=port, log_level=log_level, limit_concurrency=limit,
                timeout_keep_alive=5, server_header=False)
