"""What one request may cost: upload and queue limits, request field bounds, and the body-size
middleware that refuses an oversized upload (413) before it is buffered."""

from __future__ import annotations

from typing import Optional

from fastapi import UploadFile

from .errors import ApiError, error_response

DEFAULT_MAX_UPLOAD_BYTES = 10 * 2**20  # a full-resolution phone photo is 3-8 MB
DEFAULT_QUEUE_LIMIT = 32  # waiting requests on top of the running ones
FORM_OVERHEAD = 64 * 2**10  # multipart boundaries and text fields on top of the file
MAX_LABEL = 200  # characters in a product or category name
MAX_ID = 2**63 - 1  # ids are int64


def too_large(limit: int, headers: Optional[dict] = None) -> ApiError:
    return ApiError(413, "too_large", f"file: upload too large (limit {limit / 2**20:.1f} MiB)", headers)


async def read_upload(file: UploadFile, limit: int) -> bytes:
    """The file's bytes; 413 past `limit` (the body limit also counts the form around it)."""
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise too_large(limit)
    return data


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
        declared = content_length(scope)
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
        refusal = too_large(self.limit - FORM_OVERHEAD, {"Connection": "close"})
        response = error_response(refusal.status, refusal.kind, refusal.message, refusal.headers)
        await response(scope, receive, send)


def content_length(scope) -> Optional[int]:
    """The request's declared Content-Length, None when absent or malformed."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
