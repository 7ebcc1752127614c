"""Who may write: the API key that guards `POST /items` and `DELETE /items/{id}`, `--read-only`,
and the rule that a server reachable from other machines never has open writes.

The key comes from `$CSEARCH_API_KEY` or a file (`--api-key-file`), never from the command line,
where `ps` shows it. Clients send it as `Authorization: Bearer KEY` or `X-API-Key: KEY`; it is
compared in constant time. Reads (search, items, pictures, health, stats, docs) stay open.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from ..errors import ConfigError
from .errors import error_response
from .limits import content_length

API_KEY_ENV = "CSEARCH_API_KEY"
KEY_HEADER = b"x-api-key"
MAX_KEY_FILE = 4096  # bytes: a key file is one short line
# printable ASCII without spaces: what an HTTP header carries unchanged
KEY_PATTERN = re.compile(r"[\x21-\x7e]+")


def load_api_key(key_file: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The configured API key: `key_file` (surrounding whitespace stripped) when given, else
    `$CSEARCH_API_KEY`, else None. An empty, unreadable or malformed key is a ConfigError."""
    environ = os.environ if environ is None else environ
    if key_file is not None:
        path = Path(key_file)
        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_KEY_FILE + 1)
        except OSError as exc:
            raise ConfigError(f"--api-key-file {key_file}: cannot read it ({exc.strerror or exc})") from None
        if len(raw) > MAX_KEY_FILE:
            raise ConfigError(f"--api-key-file {key_file}: over {MAX_KEY_FILE} bytes; it must hold one key")
        return _checked(raw.decode("utf-8", "replace").strip(), f"--api-key-file {key_file}")
    if API_KEY_ENV in environ:
        return _checked(environ[API_KEY_ENV].strip(), f"${API_KEY_ENV}")
    return None


def _checked(key: str, source: str) -> str:
    if not key:
        raise ConfigError(f"{source}: the API key is empty")
    if not KEY_PATTERN.fullmatch(key):
        raise ConfigError(f"{source}: the API key must be one word of printable ASCII (no spaces)")
    return key


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: localhost, 127.0.0.0/8 and ::1."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False


def check_exposure(host: str, api_key: Optional[str], read_only: bool) -> None:
    """Refuse to serve open writes beyond this machine (before any model is loaded or port bound)."""
    if not (is_loopback(host) or api_key or read_only):
        raise ConfigError(
            f"--host {host} is reachable from other machines: set ${API_KEY_ENV} or --api-key-file "
            "to require an API key for writes, or pass --read-only"
        )


def write_mode(api_key: Optional[str], read_only: bool) -> str:
    """How writes are guarded, as /health reports it: 'read_only', 'api_key' or 'open'."""
    return "read_only" if read_only else "api_key" if api_key else "open"


def is_write(method: str, path: str) -> bool:
    """The routes that change the index: POST /items and DELETE /items/{id}."""
    return (method == "POST" and path.rstrip("/") == "/items") or (method == "DELETE" and path.startswith("/items/"))


def presented_key(headers: Mapping[bytes, bytes]) -> Optional[bytes]:
    """The key a request carries: `Authorization: Bearer KEY`, else `X-API-Key: KEY`."""
    scheme, _, token = headers.get(b"authorization", b"").strip().partition(b" ")
    if scheme.lower() == b"bearer" and token.strip():
        return token.strip()
    key = headers.get(KEY_HEADER, b"").strip()
    return key or None


def cross_origin(headers: Mapping[bytes, bytes]) -> bool:
    """True for a browser request sent by a page of another origin: a multipart POST needs no
    CORS preflight, so without a key any web site could otherwise add items to a local server.
    Clients other than browsers send no Origin header."""
    origin = headers.get(b"origin")
    if origin is None:
        return False
    netloc = urlsplit(origin.decode("latin-1")).netloc.lower()
    return not netloc or netloc != headers.get(b"host", b"").decode("latin-1").lower()


class WriteGuard:
    """ASGI middleware: refuse a write with 403 when the server is read-only, and with 401 when
    an API key is configured and the request lacks it, before its body is read.

    A middleware rather than a route dependency, because FastAPI parses (and spools) a form
    before it runs dependencies: an unauthorised client must not make the server read 10 MiB.
    """

    def __init__(self, app, api_key: Optional[str], read_only: bool):
        self.app, self.read_only = app, bool(read_only)
        self.key = api_key.encode("ascii") if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not is_write(scope["method"], scope["path"]):
            return await self.app(scope, receive, send)
        refusal = self.refusal(dict(scope.get("headers", ())))
        if refusal is None:
            return await self.app(scope, receive, send)
        status, kind, message, headers = refusal
        if (content_length(scope) or 0) > 0 or any(name == b"transfer-encoding" for name, _ in scope["headers"]):
            headers["Connection"] = "close"  # the unread body must not be taken for the next request
        await error_response(status, kind, message, headers)(scope, receive, send)

    def refusal(self, headers: Mapping[bytes, bytes]) -> Optional[tuple[int, str, str, dict]]:
        if self.read_only:
            return 403, "read_only", "this server is read-only (started with --read-only): writes are disabled", {}
        if self.key is None:  # open writes (loopback only): still no other web site's page may write
            if cross_origin(headers):
                return 403, "cross_origin", "writes from another web site's page are refused", {}
            return None
        given = presented_key(headers)
        if given is not None and hmac.compare_digest(given, self.key):
            return None
        what = "a wrong API key" if given is not None else "no API key"
        message = f"writes need the server's API key (Authorization: Bearer KEY or X-API-Key: KEY); got {what}"
        return 401, "unauthorized", message, {"WWW-Authenticate": 'Bearer realm="csearch"'}
