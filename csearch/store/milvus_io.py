"""Talking to Milvus for `milvus.MilvusStore`: connecting (credentials from the environment),
turning pymilvus' errors into one-line StoreErrors, the two collections' schemas, and paging
through a collection by primary key.

pymilvus is an optional extra (`pip install -e ".[milvus]"`), imported only here and only when a
Milvus store is opened. Its loggers are silenced: it logs every failed call with a traceback,
and csearch reports the failure itself, in one line.

Measured against Milvus Lite 3.2 and the 2.3.5 server (the PyPI `milvus` package): every
collection is created with Strong consistency (the server's default, Bounded, returned a deleted
id right after the delete); index parameters are nested (`params={"params": {...}}`), which Lite
needs; there is no BINARY_VECTOR beside the float vector, so masks are base64 VARCHARs.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import StoreError, one_line
from ..masks import mask_bytes

TOKEN_ENV = ("CSEARCH_MILVUS_TOKEN", "MILVUS_TOKEN")  # "user:password" or an API key
TOKEN_FILE_ENV = "CSEARCH_MILVUS_TOKEN_FILE"
CONNECT_TIMEOUT = 10.0  # seconds
VARCHAR_MAX = 65535  # bytes: Milvus' limit for one VARCHAR value
CATEGORY_MAX = 4096  # bytes of a category name (the filterable field)
PAGE_IDS = 16384  # ids per query page (the server's largest result window)
PAGE_ROWS = 256  # whole items per insert (~5 KB each at 1280-d, plus extras)
PAGE_BYTES = 24 << 20  # about this much per page of whole items read back (each Strong read waits ~200 ms)
EXTRAS_BYTES = VARCHAR_MAX // 4 * 3  # raw bytes of one item's extras that fit one base64 VARCHAR
INDEX_TYPES = {"FLAT": {}, "HNSW": {"M": 16, "efConstruction": 200}, "IVF_FLAT": {"nlist": 1024}}
MISSING = "the Milvus store needs pymilvus and milvus-lite: pip install -e '.[milvus]'"


@dataclass(frozen=True)
class Target:
    """Where a Milvus store's items live: `uri` is what pymilvus connects to (a Lite `.db` path or
    http://HOST:PORT), `collection` the items' collection, `label` the STORE string for messages."""

    uri: str
    collection: str
    label: str

    @property
    def lite(self) -> bool:
        return not self.uri.startswith(("http://", "https://"))

    @property
    def meta_collection(self) -> str:
        return f"{self.collection}__csearch"


def read_token() -> str:
    """The server credentials: $CSEARCH_MILVUS_TOKEN or $MILVUS_TOKEN, else the file named by
    $CSEARCH_MILVUS_TOKEN_FILE; "" when none is set. Never a flag or a saved config value."""
    for name in TOKEN_ENV:
        if os.environ.get(name):
            return os.environ[name].strip()
    path = os.environ.get(TOKEN_FILE_ENV)
    if not path:
        return ""
    try:
        return Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise StoreError(f"${TOKEN_FILE_ENV} names {path}, which cannot be read: {exc.strerror}") from None


def _pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise StoreError(MISSING) from None
    # pymilvus logs each failed call with a traceback; Milvus Lite's in-process gRPC server logs one
    # for every call it does not implement (AllocTimestamp, which pymilvus only tries); faiss, which
    # Lite imports, announces which build it loaded
    for name in ("pymilvus", "pymilvus.milvus_client", "milvus_lite", "grpc._server"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    return pymilvus


def _failures() -> tuple:
    """The exception types a Milvus call raises for a failure of the server or the request."""
    from pymilvus.exceptions import MilvusException

    types = [MilvusException, OSError, ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        import grpc

        types += [grpc.RpcError, grpc.FutureTimeoutError]
    with contextlib.suppress(ImportError):
        from milvus_lite import MilvusLiteError

        types.append(MilvusLiteError)
    return tuple(types)


@contextlib.contextmanager
def calling(target: Target, doing: str) -> Iterator[None]:
    """Run Milvus calls; a failure becomes one StoreError naming the store and what was being done."""
    try:
        yield
    except StoreError:
        raise
    except _failures() as exc:
        raise StoreError(f"Milvus store {target.label}: {doing} failed: {one_line(_message(exc))}") from None


def _message(exc: BaseException) -> str:
    message = getattr(exc, "message", None)  # MilvusException keeps its text here; str() may be empty
    return str(message or exc or type(exc).__name__)


def connect(target: Target):
    """A MilvusClient for `target` (Milvus Lite starts in this process for a `.db` path). StoreError
    when pymilvus is missing or the server cannot be reached."""
    pymilvus = _pymilvus()
    if target.lite:
        Path(target.uri).parent.mkdir(parents=True, exist_ok=True)
    try:
        client = pymilvus.MilvusClient(
            uri=target.uri, token="" if target.lite else read_token(), timeout=CONNECT_TIMEOUT
        )
        client.list_collections()  # fails now, not at the first read, when the server is away
    except StoreError:
        raise
    except (*_failures(), ValueError) as exc:
        where = f"Milvus Lite database {target.uri}" if target.lite else f"the Milvus server at {target.uri}"
        hint = " (Milvus Lite allows one process per database: is another csearch using it?)" if target.lite else ""
        raise StoreError(f"cannot open {where}: {one_line(_message(exc))}{hint}") from None
    return client


def items_schema(dim: int, mask_chars: int):
    """The items collection: one row per item, every per-item field (vector, category, the item's
    path/product/category/box as JSON, the packed mask and the extras columns, base64)."""
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("category", DataType.VARCHAR, max_length=CATEGORY_MAX)  # "" when unlabelled
    schema.add_field("item", DataType.VARCHAR, max_length=VARCHAR_MAX)
    schema.add_field("mask", DataType.VARCHAR, max_length=max(mask_chars, 1))
    schema.add_field("extras", DataType.VARCHAR, max_length=VARCHAR_MAX)
    return schema


def meta_schema():
    """The store's own records beside the items: "layout" (dim, mask size, extras schema), "meta"
    (the index's meta), "changes" (a token every write replaces) and the id claims. Milvus wants
    a vector field in every collection: `v` is a constant 2-d one."""
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=128)
    schema.add_field("kind", DataType.VARCHAR, max_length=16)
    schema.add_field("start", DataType.INT64)
    schema.add_field("stop", DataType.INT64)
    schema.add_field("time", DataType.INT64)
    schema.add_field("value", DataType.VARCHAR, max_length=VARCHAR_MAX)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)
    return schema


def create_collection(client, name: str, schema, vector: str, index_type: str = "FLAT") -> None:
    index = client.prepare_index_params()
    # nested: pymilvus 3 sends a flat dict in a form Milvus Lite ignores
    index.add_index(
        field_name=vector, index_type=index_type, metric_type="L2", params={"params": INDEX_TYPES[index_type]}
    )
    client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")
    client.load_collection(name)


def read_page_rows(layout: dict) -> int:
    """Whole items per read: about PAGE_BYTES, between PAGE_ROWS and PAGE_IDS."""
    extras = sum(int(np.prod(e["shape"])) * np.dtype(e["dtype"]).itemsize for e in layout["extras"].values())
    row = 4 * layout["dim"] + b64_chars(mask_bytes(layout["mask_size"])) + b64_chars(extras) + 512
    return int(min(max(PAGE_BYTES // row, PAGE_ROWS), PAGE_IDS))


def page_through(
    client, collection: str, fields: list[str], page: int, level: str, start: int = 0, stop: Optional[int] = None
) -> Iterator[list[dict]]:
    """The rows of `collection` with start <= id < stop (stop None: no end), `page` at a time, by
    ascending primary key `id` (the order a Milvus query returns, which pymilvus' own
    query_iterator relies on too), read at consistency `level`. (query_iterator itself took 70x
    longer here to list 5,000 ids on the 2.3.5 server.)"""
    cursor = f"id >= {int(start)}"
    end = "" if stop is None else f" and id < {int(stop)}"
    while True:
        rows = client.query(collection, filter=cursor + end, output_fields=fields, limit=page, consistency_level=level)
        if not rows:
            return
        yield rows
        if len(rows) < page:
            return
        cursor = f"id > {max(int(r['id']) for r in rows)}"


# ------------------------------------------------------------------------------------ encoding


def b64_chars(nbytes: int) -> int:
    return 4 * ((nbytes + 2) // 3)


def json_record(value, what: str) -> dict:
    """`value` as a plain JSON dict that fits one record (StoreError otherwise)."""
    try:
        value = json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} must be a JSON-serialisable dict: {exc}") from None
    if len(json.dumps(value).encode()) > VARCHAR_MAX:
        raise StoreError(f"{what} takes more than {VARCHAR_MAX} bytes as JSON, Milvus' limit for one record")
    return value


def meta_record(key: str, value: dict, kind: str = "record", start: int = 0, stop: int = 0) -> dict:
    """A row of the records collection (`meta_schema`): `value` as JSON; claims set start/stop."""
    return {
        "key": key,
        "kind": kind,
        "start": start,
        "stop": stop,
        "time": int(time.time() * 1000),
        "value": json.dumps(value),
        "v": [0.0, 0.0],
    }


def rows_of(new, columns: Mapping[str, np.ndarray], schema: Mapping) -> list[dict]:
    """The items of a checked add (`segments.validate_add`) as collection rows (ids set later)."""
    rows = []
    names = sorted(schema)
    for i in range(len(new.ids)):
        category = new.categories[i]
        item = {"path": new.paths[i], "category": category, "product": new.products[i]}
        item["box"] = [float(v) for v in new.boxes[i]]
        text = json.dumps(item, ensure_ascii=False)
        extras = b"".join(np.ascontiguousarray(columns[name][i]).tobytes() for name in names)
        if len(text.encode()) > VARCHAR_MAX or len((category or "").encode()) > CATEGORY_MAX:
            raise StoreError(f"item {new.paths[i]}: its path, category or product is too long for Milvus")
        if len(extras) > EXTRAS_BYTES:
            raise StoreError(
                f"the extras of one item take {len(extras)} bytes; the Milvus store holds at most {EXTRAS_BYTES}"
            )
        rows.append(
            {
                "id": 0,
                "vector": new.vectors[i],
                "category": category or "",
                "item": text,
                "mask": base64.b64encode(new.masks[i].tobytes()).decode(),
                "extras": base64.b64encode(extras).decode(),
            }
        )
    return rows


def columns_of(rows: list[dict], layout: dict) -> dict:
    """Collection rows -> the columns of a MemorySnapshot (in the rows' order)."""
    items = [json.loads(r["item"]) for r in rows]
    n, nbytes = len(rows), mask_bytes(layout["mask_size"])
    columns = {
        "ids": np.array([r["id"] for r in rows], np.int64),
        "vectors": np.array([r["vector"] for r in rows], np.float32).reshape(n, layout["dim"]),
        "masks": np.frombuffer(b"".join(base64.b64decode(r["mask"]) for r in rows), np.uint8).reshape(n, nbytes),
        "boxes": np.array([i["box"] for i in items], np.float32).reshape(n, 4),
        "paths": [i["path"] for i in items],
        "categories": [i["category"] for i in items],
        "products": [i["product"] for i in items],
    }
    blobs = [base64.b64decode(r["extras"]) for r in rows]
    offset = 0
    for name in sorted(layout["extras"]):
        spec = layout["extras"][name]
        dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = b"".join(blob[offset : offset + size] for blob in blobs)
        columns[name] = np.frombuffer(raw, dtype).reshape(n, *shape).copy()
        offset += size
    return columns
