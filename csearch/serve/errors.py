"""Every error the API answers is one-line JSON `{"error": message, "type": kind}`: the
request's fault is 4xx naming the field, the server's is 5xx with a generic message (server
paths go to the log, never to the client)."""

from __future__ import annotations

import logging
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError, CSearchError, ImageError, StoreError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as JSON `{"error": message, "type": kind}` with an HTTP status."""

    def __init__(self, status: int, kind: str, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


def not_found(item_id: int) -> ApiError:
    return ApiError(404, "not_found", f"no item with id {item_id}")


def error_response(status: int, kind: str, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": message, "type": kind}, status_code=status, headers=headers)


def api_error(exc: CSearchError) -> ApiError:
    """Map the engine's typed errors to HTTP: the request's fault is 4xx, the server's is 5xx
    with a generic message (its text may name server paths; it goes to the log instead)."""
    if isinstance(exc, ImageError):
        return ApiError(422, "bad_image", str(exc).replace("<upload>", "file"))
    if isinstance(exc, ConfigError):
        return ApiError(422, "bad_parameter", str(exc))
    log.error("index or model problem: %s", exc)
    if isinstance(exc, StoreError):  # e.g. another process held the index's write lock too long
        return ApiError(503, "index_unavailable", "the index is busy or unavailable; try again", {"Retry-After": "2"})
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
        api = api_error(exc)
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
