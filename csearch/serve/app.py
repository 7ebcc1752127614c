"""The HTTP routes, their JSON models and the web page, on a `Service`; `run_server` serves them."""

from __future__ import annotations

import logging
import mimetypes
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Optional

from fastapi import Depends, FastAPI, File, Form, Request, Security, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..config import MAX_K, MAX_RERANK_TOP, allowed_values, merge
from ..pipeline import Engine
from ..resolve import query_threads
from .auth import API_KEY_ENV, WriteGuard, check_exposure, write_mode
from .errors import ApiError, install_error_handlers
from .images import THUMBNAIL_SIDE
from .limits import (
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_QUEUE_LIMIT,
    FORM_OVERHEAD,
    MAX_ID,
    MAX_LABEL,
    BodyLimit,
    read_upload,
)
from .service import Service, public_item

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"  # package data: csearch/static/


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
    missing: bool = False  # the catalogue image has gone (moved or deleted); the hit is still returned


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


class HealthOut(BaseModel):
    status: str
    items: int
    in_progress: int
    capacity: int
    classifier: bool  # False: searches cover all categories (nothing is predicted)
    writes: str  # 'open', 'api_key' or 'read_only'


UPLOAD_ERRORS = {code: {"model": ErrorOut} for code in (413, 415, 422, 503)}
ID_ERRORS = {code: {"model": ErrorOut} for code in (404, 422)}
WRITE_ERRORS = {
    401: {"model": ErrorOut, "description": "no API key or a wrong one (when the server has a key)"},
    403: {"model": ErrorOut, "description": "the server is read-only (--read-only)"},
}
# Only documents the two ways to send the key (OpenAPI `security`); WriteGuard enforces them
# before the body is read (see auth.py).
WRITE_AUTH = [
    Security(
        HTTPBearer(
            auto_error=False,
            description=f"Authorization: Bearer KEY (KEY: the server's ${API_KEY_ENV} or --api-key-file)",
        )
    ),
    Security(APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: KEY (the same key)")),
]


def picture(media_type: str, description: str) -> dict:
    """OpenAPI for a route that answers an image (FastAPI would otherwise document JSON)."""
    return {200: {"content": {media_type: {}}, "description": description}, **ID_ERRORS}


ItemId = Annotated[int, PathParam(ge=0, le=MAX_ID, description="item id (from a search or an add)")]


def require_multipart(request: Request) -> None:
    """415 for anything but a multipart form, rather than a confusing 'field required'; and
    parameters in the URL are refused, not silently ignored (they belong in the form)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"expected a multipart/form-data upload with a 'file' field, got content-type {ctype or 'none'!r}",
        )
    if request.query_params:
        names = ", ".join(sorted(request.query_params.keys()))
        raise ApiError(422, "bad_parameter", f"{names}: send parameters as multipart form fields, not in the URL")


def _label(value: str, field: str) -> str:
    value = value.strip()
    if not value or any(ord(ch) < 32 for ch in value):
        raise ApiError(422, "bad_parameter", f"{field}: must be a non-empty name without control characters")
    return value


# ----------------------------------------------------------------------------- the app


def create_app(
    engine: Engine,
    workers: int = 2,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    queue_limit: int = DEFAULT_QUEUE_LIMIT,
    model_factory: Optional[Callable[[], object]] = None,
    api_key: Optional[str] = None,
    read_only: bool = False,
) -> FastAPI:
    """The HTTP API and web page on an opened Engine. `workers` threads each get their own models
    (`model_factory`, default: load the index's models again); see the module docstring.

    Writes (POST /items, DELETE /items/{id}) need `api_key` when it is given (401 without it) and
    are refused with 403 when `read_only`; with neither they are open (`run_server` allows that
    on a loopback host only)."""
    service = Service(engine, workers, queue_limit, max_upload_bytes, model_factory, write_mode(api_key, read_only))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.pool.shutdown()

    app = FastAPI(
        title="csearch",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,  # FastAPI's Swagger UI and ReDoc load from a CDN: /docs is our own page
        redoc_url=None,
        description="Find the same product in a catalogue from one photo "
        "(localize, classify, restricted exact KNN, mask-IoU re-ranking).",
    )
    app.state.service = service
    app.add_middleware(BodyLimit, limit=service.max_upload_bytes + FORM_OVERHEAD)
    app.add_middleware(WriteGuard, api_key=api_key, read_only=read_only)  # outermost: runs first
    install_error_handlers(app)
    _add_search_routes(app, service)
    _add_item_routes(app, service)
    _add_info_routes(app, service)
    return app


def _add_search_routes(app: FastAPI, service: Service) -> None:
    @app.post(
        "/search",
        response_model=SearchOut,
        responses=UPLOAD_ERRORS,
        dependencies=[Depends(require_multipart)],
        summary="Find the catalogue items matching a photo",
    )
    async def search(
        file: Annotated[UploadFile, File(description="the photo (any format Pillow reads)")],
        k: Annotated[Optional[int], Form(ge=1, le=MAX_K, description="number of results")] = None,
        category: Annotated[
            Optional[str], Form(max_length=MAX_LABEL, description="search this category instead of the predicted one")
        ] = None,
        rerank: Annotated[
            Optional[str], Form(description=f"one of {', '.join(allowed_values('search.rerank'))}")
        ] = None,
        rerank_top: Annotated[Optional[int], Form(ge=1, le=MAX_RERANK_TOP)] = None,
        restrict: Annotated[Optional[bool], Form(description="restrict to the predicted category")] = None,
        visuals: Annotated[bool, Form(description="also return the cut-out and the query mask")] = False,
    ):
        switches = {"rerank": rerank, "rerank_top": rerank_top, "restrict": restrict}
        switches = {key: value for key, value in switches.items() if value is not None}
        # the config schema judges the values (the CLI's rules), before the upload is read
        given = {**switches, "k": k}
        merge(service.config, {f"search.{key}": value for key, value in given.items() if value is not None})
        with service.pool.admit() as slot:  # 503 before the upload is read into memory
            data = await read_upload(file, service.max_upload_bytes)
            payload, waited_ms = await service.pool.run(
                slot, service.search_job, data, k, category or None, switches, visuals
            )
        payload["timings_ms"]["queue"] = round(waited_ms, 3)
        return payload


def _add_item_routes(app: FastAPI, service: Service) -> None:
    @app.post(
        "/items",
        status_code=201,
        response_model=AddedOut,
        responses={**WRITE_ERRORS, **UPLOAD_ERRORS},
        dependencies=[*WRITE_AUTH, Depends(require_multipart)],
        summary="Add an image to the index (durable; needs the API key when the server has one)",
    )
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

    @app.delete(
        "/items/{item_id}",
        response_model=RemovedOut,
        responses={**WRITE_ERRORS, **ID_ERRORS},
        dependencies=WRITE_AUTH,
        summary="Remove an item from the index (durable; needs the API key when the server has one)",
    )
    async def remove_item(item_id: ItemId):
        return await run_in_threadpool(service.remove, item_id)  # fsyncs: off the event loop

    @app.get("/items/{item_id}", response_model=ItemOut, responses=ID_ERRORS, summary="An item's labels and URLs")
    async def get_item(item_id: ItemId):
        item, _, _ = service.item(item_id)
        return public_item(item)

    @app.get(
        "/items/{item_id}/image",
        responses=picture("image/*", "the catalogue image as stored (its own format)"),
        response_class=FileResponse,
        summary="The item's catalogue image",
    )
    async def item_image(item_id: ItemId):
        path = service.image_path(item_id)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.get(
        "/items/{item_id}/thumbnail",
        responses=picture("image/jpeg", "JPEG"),
        response_class=Response,
        summary=f"The item's image, at most {THUMBNAIL_SIDE} px",
    )
    async def item_thumbnail(item_id: ItemId):
        data = await run_in_threadpool(service.thumbnail, item_id)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get(
        "/items/{item_id}/mask",
        responses=picture("image/png", "RGBA PNG"),
        response_class=Response,
        summary="The item's object mask as the re-ranker compares it (RGBA PNG, mask_size px)",
    )
    async def item_mask(item_id: ItemId):
        return Response(service.mask_png(item_id), media_type="image/png")


def _add_info_routes(app: FastAPI, service: Service) -> None:
    @app.get(
        "/health",
        response_model=HealthOut,
        summary="Liveness, load, whether the index has a classifier, how writes are guarded",
    )
    async def health():
        return service.health()

    @app.get("/stats", summary="Items, categories, models and index size")
    async def stats():
        return await run_in_threadpool(service.stats)  # walks INDEX_DIR: off the event loop

    page_headers = {
        "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=page_headers)

    @app.get("/docs", include_in_schema=False)
    async def docs():  # renders /openapi.json with the package's own script: works offline
        return FileResponse(STATIC_DIR / "docs.html", media_type="text/html", headers=page_headers)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():  # for clients that ask without reading the page's <link rel=icon>
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml", headers=page_headers)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


# ----------------------------------------------------------------------------- running

WRITES_LOG = {
    "open": f"writes (POST /items, DELETE /items/ID) are open to anyone on this machine: set ${API_KEY_ENV} "
    "or --api-key-file to require a key",
    "api_key": "writes (POST /items, DELETE /items/ID) need the API key",
    "read_only": "read-only: writes are disabled",
}


def run_server(
    index_dir,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 2,
    *,
    queue_limit: int = DEFAULT_QUEUE_LIMIT,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    log_level: str = "info",
    api_key: Optional[str] = None,
    read_only: bool = False,
) -> None:
    """Open the index and its models once, then serve until interrupted (uvicorn, one process).
    A host other machines can reach needs `api_key` or `read_only` (ConfigError before loading)."""
    import uvicorn

    check_exposure(host, api_key, read_only)
    engine = Engine.open(index_dir, localizer_threads=query_threads(workers))
    app = create_app(
        engine,
        workers=workers,
        max_upload_bytes=max_upload_bytes,
        queue_limit=queue_limit,
        api_key=api_key,
        read_only=read_only,
    )
    log.info(
        "csearch: serving %d item(s) from %s on http://%s:%d (%d worker(s), queue %d, uploads up to %.1f MiB); %s",
        len(engine.store.snapshot),
        index_dir,
        host,
        port,
        workers,
        queue_limit,
        max_upload_bytes / 2**20,
        WRITES_LOG[write_mode(api_key, read_only)],
    )
    # last-resort guard on open connections; the pool's 503 (with a JSON body) normally acts first
    limit = max(128, 4 * (workers + queue_limit))
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        limit_concurrency=limit,
        timeout_keep_alive=5,
        server_header=False,
    )
