"""Segments: the immutable, column-per-file batches of items an index is made of. Writing and
memory-mapping one, checking the items of an add, and the merge policy that bounds their number.

A segment folder ``seg-NNNNNN/`` holds (n rows, ids ascending)::

    ids.npy        int64 (n,)        stable ids, ascending
    vectors.npy    float32 (n, dim)
    sq_norms.npy   float32 (n,)      squared L2 norms, so KNN needs no pass to compute them
    masks.npy      uint8 (n, ceil(S*S/8))  masks resized to S x S, row-major, packed
    boxes.npy      float32 (n, 4)    the mask's box (x0, y0, x1, y1) / (W, H), exclusive end
    items.json     {"paths": [...], "categories": [...], "products": [...]}
    NAME.npy       one per extras column the index declares (manifest "extras"): (n, *shape) dtype

Extras are optional named per-item columns (e.g. "local_features" for geometric re-ranking). An
index declares them with its first add (`check_extras`), and from then on every add carries them.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import StoreError
from ..knn import squared_norms
from ..masks import pack_masks
from .durable import fsync_paths, tmp_name, write_new, write_npy

SEGMENT_PREFIX = "seg-"
MERGE_FACTOR = 10  # merge when this many trailing segments share a size tier (see merge_start)
COPY_ROWS = 8192  # rows per chunk when a merge streams segments into a new one (bounds memory)
STRING_COLUMNS = ("paths", "categories", "products")
ARRAY_COLUMNS = ("ids", "vectors", "sq_norms", "masks", "boxes")
EXTRAS_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


@dataclass(frozen=True)
class Segment:
    """One segment's columns: memory-mapped arrays once loaded, plain arrays before writing."""

    ids: np.ndarray
    vectors: np.ndarray
    sq_norms: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    paths: list
    categories: list
    products: list
    extras: Mapping[str, np.ndarray] = field(default_factory=dict)  # extras column -> (n, ...) array

    def __len__(self) -> int:
        return len(self.ids)

    def column(self, name: str) -> np.ndarray:
        """An array column by name: one of ARRAY_COLUMNS or an extras column."""
        return getattr(self, name) if name in ARRAY_COLUMNS else self.extras[name]

    @cached_property
    def category_rows(self) -> dict:
        """{category: ascending row indices}; computed once per segment (segments never change)."""
        groups: dict = {}
        for row, category in enumerate(self.categories):
            groups.setdefault(category, []).append(row)
        return {c: np.array(r, np.int64) for c, r in groups.items()}


# A segment with a bool mask of its live rows (None: all live): what a merge or compact copies.
Source = tuple[Segment, Optional[np.ndarray]]


def segment_name(number: int) -> str:
    return f"{SEGMENT_PREFIX}{number:06d}"


def segment_number(name: str) -> Optional[int]:
    """The number in a segment folder's name, None for any other name."""
    digits = name[len(SEGMENT_PREFIX) :]
    return int(digits) if name.startswith(SEGMENT_PREFIX) and digits.isdigit() else None


def _column_shapes(rows: int, dim: int, mask_nbytes: int, extras: Optional[Mapping] = None) -> dict:
    """{column: (shape, dtype)} of a segment's .npy files; `extras` is the manifest's schema."""
    shapes = {
        "ids": ((rows,), np.int64),
        "vectors": ((rows, dim), np.float32),
        "sq_norms": ((rows,), np.float32),
        "masks": ((rows, mask_nbytes), np.uint8),
        "boxes": ((rows, 4), np.float32),
    }
    for name, spec in (extras or {}).items():
        shapes[name] = ((rows, *spec["shape"]), np.dtype(spec["dtype"]))
    return shapes


def _stream(array: np.ndarray, live: Optional[np.ndarray]) -> Iterator[np.ndarray]:
    for start in range(0, len(array), COPY_ROWS):
        chunk = array[start : start + COPY_ROWS]
        yield chunk if live is None else chunk[live[start : start + COPY_ROWS]]


def select(values: Sequence, live: Optional[np.ndarray]) -> list:
    """The entries of a string column at the live rows (`live` None: all of them)."""
    return list(values) if live is None else [v for v, keep in zip(values, live) if keep]


def write_segment(
    directory: Path, name: str, sources: Sequence[Source], dim: int, mask_nbytes: int, extras: Optional[Mapping] = None
) -> dict:
    """Write the live rows of `sources` as segment `name` (with the `extras` columns of the
    manifest's schema); return its manifest entry. Durable on return, but unreferenced until a
    manifest commits it."""
    ids = np.concatenate([s.ids if live is None else s.ids[live] for s, live in sources])
    rows = len(ids)
    tmp = directory / tmp_name(name)
    tmp.mkdir()
    for column, (shape, dtype) in _column_shapes(rows, dim, mask_nbytes, extras).items():
        chunks = [ids] if column == "ids" else (c for s, live in sources for c in _stream(s.column(column), live))
        write_npy(tmp / f"{column}.npy", dtype, shape, chunks, sync=False)
    items = {key: [v for s, live in sources for v in select(getattr(s, key), live)] for key in STRING_COLUMNS}
    write_new(tmp / "items.json", json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode(), sync=False)
    fsync_paths([*tmp.iterdir(), tmp])
    final = directory / name
    if final.exists():  # left by a writer that died before committing: never referenced
        shutil.rmtree(final)
    os.rename(tmp, final)
    return {"name": name, "rows": rows, "first_id": int(ids[0]), "last_id": int(ids[-1])}


def load_segment(directory: Path, entry: dict, dim: int, mask_nbytes: int, extras: Optional[Mapping] = None) -> Segment:
    """Memory-map one committed segment (and the `extras` columns of the manifest's schema).
    FileNotFoundError propagates (the caller retries)."""
    folder = directory / entry["name"]
    rows = entry["rows"]
    arrays = {}
    for column, (shape, dtype) in _column_shapes(rows, dim, mask_nbytes, extras).items():
        try:
            array = np.load(folder / f"{column}.npy", mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise
        except (ValueError, EOFError, OSError) as exc:
            raise StoreError(f"index {directory}: {entry['name']}/{column}.npy is corrupt ({exc})") from None
        if array.shape != shape or array.dtype != dtype:
            raise StoreError(
                f"index {directory}: {entry['name']}/{column}.npy is {array.dtype} "
                f"{array.shape}, expected {np.dtype(dtype)} {shape}"
            )
        arrays[column] = np.asarray(array)  # a plain ndarray view, so results are not np.memmap
    try:
        items = json.loads((folder / "items.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise StoreError(f"index {directory}: {entry['name']}/items.json is corrupt") from None
    if any(len(items.get(key, ())) != rows for key in STRING_COLUMNS):
        raise StoreError(f"index {directory}: {entry['name']}/items.json does not hold {rows} items")
    extra_arrays = {name: arrays.pop(name) for name in (extras or {})}
    return Segment(**{key: items[key] for key in STRING_COLUMNS}, **arrays, extras=extra_arrays)


# ------------------------------------------------------------------------------------- merging


def _tier(rows: int) -> int:
    return int(math.log(max(rows, 1), MERGE_FACTOR) + 1e-9)


def _run_start(rows: Sequence[int]) -> int:
    tiers = [_tier(r) for r in rows]
    for level in sorted(set(tiers)):
        run = 0
        while run < len(tiers) and tiers[-1 - run] <= level:
            run += 1
        # count only this tier's segments: smaller ones in the run must not make a big segment
        # be rewritten every few adds
        if tiers[len(tiers) - run :].count(level) >= MERGE_FACTOR:
            return len(rows) - run
    return len(rows)


def merge_start(rows: Sequence[int]) -> int:
    """Where the trailing run of segments to merge begins (len(rows): nothing to merge).

    Segments fall in size tiers (powers of MERGE_FACTOR). When the trailing run of segments of
    tier <= t holds MERGE_FACTOR of tier t, the run becomes one segment, cascading up the tiers.
    Each item is so rewritten about log_MERGE_FACTOR(N) times and an index keeps at most
    ~MERGE_FACTOR segments per tier; small segments stranded inside a run are swept up with it.
    """
    rows, start = list(rows), len(rows)
    while (run := _run_start(rows)) < len(rows):
        start = min(start, run)
        rows = rows[:run] + [sum(rows[run:])]
    return start


# ---------------------------------------------------------------------------------- validation


def _as_strings(values, n: int, name: str, optional: bool) -> list:
    if values is None and optional:
        return [None] * n
    values = None if isinstance(values, (str, bytes)) or values is None else list(values)
    if values is None or len(values) != n:
        raise StoreError(f"{name} must be a sequence of {n} strings, one per vector")
    for v in values:
        if not (isinstance(v, str) or (optional and v is None)):
            raise StoreError(f"{name} must hold strings{' or None' if optional else ''}, got {type(v).__name__}")
    return values


def validate_add(vectors, masks, boxes, paths, categories, products, dim: int, size: int) -> Segment:
    """Check the items of an add against the index's `dim` and mask `size`; return them as a
    segment to write (ids still zero, masks packed, paths absolute). StoreError says what is wrong."""
    if not isinstance(vectors, np.ndarray) or vectors.dtype != np.float32 or vectors.ndim != 2:
        described = f"{vectors.dtype} {vectors.shape}" if isinstance(vectors, np.ndarray) else type(vectors).__name__
        raise StoreError(f"vectors must be a float32 (n, {dim}) array, got {described}")
    n = len(vectors)
    if vectors.shape[1] != dim:
        raise StoreError(f"vectors have dimension {vectors.shape[1]}, this index holds {dim}")
    if not np.isfinite(vectors).all():
        raise StoreError("vectors contain NaN or infinity")
    masks = np.asarray(masks)
    if masks.dtype != bool or masks.shape != (n, size, size):
        raise StoreError(
            f"masks must be bool ({n}, {size}, {size}) (see masks.resize_mask), got {masks.dtype} {masks.shape}"
        )
    boxes = np.asarray(boxes)
    if boxes.shape != (n, 4) or not np.issubdtype(boxes.dtype, np.floating):
        raise StoreError(f"boxes must be float ({n}, 4) (x0, y0, x1, y1) / (W, H), got {boxes.dtype} {boxes.shape}")
    if not (
        np.isfinite(boxes).all()
        and (boxes >= 0).all()
        and (boxes <= 1).all()
        and (boxes[:, 2] >= boxes[:, 0]).all()
        and (boxes[:, 3] >= boxes[:, 1]).all()
    ):
        raise StoreError("boxes must be normalised (0 <= x0 <= x1 <= 1, 0 <= y0 <= y1 <= 1)")
    paths = [os.path.abspath(p) for p in _as_strings(paths, n, "paths", optional=False)]
    vectors = np.ascontiguousarray(vectors)
    return Segment(
        ids=np.zeros(n, np.int64),
        vectors=vectors,
        sq_norms=squared_norms(vectors),
        masks=pack_masks(masks),
        boxes=boxes.astype(np.float32),
        paths=paths,
        categories=_as_strings(categories, n, "categories", optional=True),
        products=_as_strings(products, n, "products", optional=True),
    )


def check_extras(extras: Optional[Mapping], n: int, schema: Mapping, may_declare: bool) -> tuple[dict, dict]:
    """Check an add's extras columns against the index's `schema` (the manifest's "extras":
    {name: {"shape": row shape, "dtype": name}}); return (the columns as arrays, the schema).
    An index that has never held an item (`may_declare`) and has no schema takes the add's
    columns as its schema; otherwise the add must carry exactly the declared columns."""
    extras = dict(extras or {})
    if not schema and extras and may_declare:
        schema = {}
        for name, values in extras.items():
            if not isinstance(name, str) or not EXTRAS_NAME.fullmatch(name) or name in ARRAY_COLUMNS + ("items",):
                raise StoreError(
                    f"extras column name {name!r} must be lower-case letters, digits and _ "
                    f"(at most 64) and not one of {', '.join(ARRAY_COLUMNS)}, items"
                )
            values = np.asarray(values)
            if values.ndim < 1 or values.dtype.kind not in "biuf":
                raise StoreError(f"extras column {name!r} must be a numeric array, one row per item")
            schema[name] = {"shape": list(values.shape[1:]), "dtype": values.dtype.name}
    if set(extras) != set(schema):
        missing, unknown = sorted(set(schema) - set(extras)), sorted(set(extras) - set(schema))
        if missing:
            raise StoreError(f"this index stores {missing[0]!r} for every item; the add lacks it")
        raise StoreError(
            f"this index has no extras column {unknown[0]!r} (its items were added without it); "
            f"build a new index to store it"
        )
    arrays = {}
    for name, spec in schema.items():
        values = np.asarray(extras[name])
        expected = (n, *spec["shape"])
        if values.shape != expected or values.dtype != np.dtype(spec["dtype"]):
            raise StoreError(
                f"extras column {name!r} must be {np.dtype(spec['dtype'])} {expected}, "
                f"got {values.dtype} {values.shape}"
            )
        arrays[name] = np.ascontiguousarray(values)
    return arrays, dict(schema)
