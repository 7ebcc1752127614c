"""The on-disk index: per catalogue image a float32 vector, a bit-packed object mask, the mask's
box, the image's absolute path, category and product, plus index-wide metadata.

Layout of INDEX_DIR (log-structured, so adding or removing never rewrites the index)::

    manifest.json        the commit point: format, version, uuid, generation, dim, mask_size,
                         next_id, next_segment, live, segments [...], tombstones, meta {...}
    seg-000001/          an immutable segment, never modified once committed:
        ids.npy          int64 (n,)        stable ids, ascending
        vectors.npy      float32 (n, dim)
        sq_norms.npy     float32 (n,)      squared L2 norms, so KNN needs no pass to compute them
        masks.npy        uint8 (n, ceil(S*S/8))  masks resized to S x S, row-major, packed
        boxes.npy        float32 (n, 4)    the mask's box (x0, y0, x1, y1) / (W, H), exclusive end
        items.json       {"paths": [...], "categories": [...], "products": [...]}
    tomb-000012.npy      int64 sorted ids removed but still physically inside a segment
    writer.lock          flock()ed by the one writer; the kernel drops it when a writer dies

Every write builds new files under a ``tmp-`` name, fsyncs them and renames them into place, then
replaces manifest.json (fsynced, then the directory fsynced). Until that replace nothing a reader
sees has changed, so a crash at any moment leaves the previous index; once a method returns its
change is durable. The next writer deletes whatever no manifest refers to. Nothing inside refers
to the directory's own location, so an index can be moved; image paths are stored absolute.

Readers take no lock: they read manifest.json and memory-map the segments it lists. A writer may
delete an old segment while a reader is opening it; the reader then re-reads the manifest.

Ids only ever grow (`next_id`), so a removed id is never reused. Segment ids are disjoint,
ascending ranges, so live items are always in ascending id order.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import numbers
import os
import secrets
import shutil
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from .errors import StoreError
from .knn import Block, squared_norms
from .masks import mask_bytes, pack_masks, unpack_masks

FORMAT = "csearch-index"
VERSION = 1
MANIFEST = "manifest.json"
LOCK_FILE = "writer.lock"
SEGMENT_PREFIX = "seg-"
TOMB_PREFIX = "tomb-"
TMP_PREFIX = "tmp-"
MERGE_FACTOR = 10  # merge when this many trailing segments share a size tier (see _merge_start)
COPY_ROWS = 8192  # rows per chunk when a merge streams segments into a new one (bounds memory)
LOAD_RETRIES = 5


# ------------------------------------------------------------------------------- durable files

def fsync_dir(path: Path) -> None:
    """Make a rename/creation inside `path` durable (POSIX needs the folder itself fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_paths(paths: Sequence[Path]) -> None:
    """fsync files and folders concurrently: the file system commits concurrent fsyncs together,
    so a segment's six files cost about one fsync's latency instead of six."""
    def sync(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(max_workers=len(paths)) as pool:
        for future in [pool.submit(sync, p) for p in paths]:
            future.result()  # re-raises a failed fsync


def _write_durably(path: Path, data: bytes, sync: bool = True) -> None:
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        if sync:
            os.fsync(handle.fileno())


def _write_npy(path: Path, dtype, shape: tuple, chunks: Iterable[np.ndarray], sync: bool = True) -> None:
    """Write an .npy file from row chunks (never holding the whole array), then fsync it."""
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    written = 0
    with open(path, "xb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=dtype)
            handle.write(chunk.data)
            written += len(chunk)
        handle.flush()
        if sync:
            os.fsync(handle.fileno())
    if written != shape[0]:
        raise RuntimeError(f"internal error: wrote {written} rows to {path.name}, expected {shape[0]}")


def _tmp_name(label: str) -> str:
    return f"{TMP_PREFIX}{label}-{os.getpid()}-{secrets.token_hex(4)}"


# ------------------------------------------------------------------------------------ segments

@dataclass(frozen=True)
class _Segment:
    """One segment's columns: memory-mapped arrays once loaded, plain arrays before writing."""

    ids: np.ndarray
    vectors: np.ndarray
    sq_norms: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    paths: list
    categories: list
    products: list

    def __len__(self) -> int:
        return len(self.ids)

    @cached_property
    def category_rows(self) -> dict:
        """{category: ascending row indices}; computed once per segment (segments never change)."""
        groups: dict = {}
        for row, category in enumerate(self.categories):
            groups.setdefault(category, []).append(row)
        return {c: np.array(r, np.int64) for c, r in groups.items()}


def _segment_name(number: int) -> str:
    return f"{SEGMENT_PREFIX}{number:06d}"


def _stream(array: np.ndarray, live: Optional[np.ndarray]) -> Iterator[np.ndarray]:
    for start in range(0, len(array), COPY_ROWS):
        chunk = array[start:start + COPY_ROWS]
        yield chunk if live is None else chunk[live[start:start + COPY_ROWS]]


def _select(values: Sequence, live: Optional[np.ndarray]) -> list:
    return list(values) if live is None else [v for v, keep in zip(values, live) if keep]


def _write_segment(directory: Path, name: str, sources: Sequence[tuple[_Segment, Optional[np.ndarray]]],
                   dim: int, nbytes: int) -> dict:
    """Write the live rows of `sources` (segment, live mask or None) as segment `name`; return
    its manifest entry. Durable on return, but unreferenced until a manifest commits it."""
    ids = np.concatenate([s.ids if live is None else s.ids[live] for s, live in sources])
    rows = len(ids)
    shapes = {"vectors": ((rows, dim), np.float32), "sq_norms": ((rows,), np.float32),
              "masks": ((rows, nbytes), np.uint8), "boxes": ((rows, 4), np.float32)}
    tmp = directory / _tmp_name(name)
    tmp.mkdir()
    _write_npy(tmp / "ids.npy", np.int64, (rows,), [ids], sync=False)
    for column, (shape, dtype) in shapes.items():
        chunks = (c for s, live in sources for c in _stream(getattr(s, column), live))
        _write_npy(tmp / f"{column}.npy", dtype, shape, chunks, sync=False)
    items = {key: [v for s, live in sources for v in _select(getattr(s, key), live)]
             for key in ("paths", "categories", "products")}
    _write_durably(tmp / "items.json", json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode(),
                   sync=False)
    _fsync_paths([*tmp.iterdir(), tmp])
    final = directory / name
    if final.exists():  # left by a writer that died before committing: never referenced
        shutil.rmtree(final)
    os.rename(tmp, final)
    return {"name": name, "rows": rows, "first_id": int(ids[0]), "last_id": int(ids[-1])}


def _load_segment(directory: Path, entry: dict, dim: int, nbytes: int) -> _Segment:
    """Memory-map one committed segment. FileNotFoundError propagates (the caller retries)."""
    folder = directory / entry["name"]
    rows = entry["rows"]
    expected = {"ids": ((rows,), np.int64), "vectors": ((rows, dim), np.float32),
                "sq_norms": ((rows,), np.float32), "masks": ((rows, nbytes), np.uint8),
                "boxes": ((rows, 4), np.float32)}
    arrays = {}
    for column, (shape, dtype) in expected.items():
        try:
            array = np.load(folder / f"{column}.npy", mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise
        except (ValueError, EOFError, OSError) as exc:
            raise StoreError(f"index {directory}: {entry['name']}/{column}.npy is corrupt ({exc})") from None
        if array.shape != shape or array.dtype != dtype:
            raise StoreError(f"index {directory}: {entry['name']}/{column}.npy is {array.dtype} "
                             f"{array.shape}, expected {np.dtype(dtype)} {shape}")
        arrays[column] = np.asarray(array)  # a plain ndarray view, so results are not np.memmap
    try:
        items = json.loads((folder / "items.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise StoreError(f"index {directory}: {entry['name']}/items.json is corrupt") from None
    if any(len(items.get(key, ())) != rows for key in ("paths", "categories", "products")):
        raise StoreError(f"index {directory}: {entry['name']}/items.json does not hold {rows} items")
    return _Segment(paths=items["paths"], categories=items["categories"], products=items["products"],
                    **arrays)


# ------------------------------------------------------------------------------------ manifest

_MANIFEST_KEYS = {"format": str, "version": int, "uuid": str, "generation": int, "dim": int,
                  "mask_size": int, "next_id": int, "next_segment": int, "live": int,
                  "segments": list, "meta": dict}


def _read_manifest(directory: Path) -> dict:
    if not directory.exists():
        raise StoreError(f"index directory not found: {directory}")
    if not directory.is_dir():
        raise StoreError(f"index path is not a directory: {directory}")
    path = directory / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StoreError(f"{directory} is not a csearch index (no {MANIFEST}); build one with "
                         f"`csearch index`") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreError(f"index {directory}: {MANIFEST} is corrupt ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"index {directory}: {MANIFEST} is not a csearch index manifest")
    for key, kind in _MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            raise StoreError(f"index {directory}: {MANIFEST} lacks a valid {key!r}")
    if manifest["version"] > VERSION:
        raise StoreError(f"index {directory} has format version {manifest['version']}; this csearch "
                         f"reads up to {VERSION}, upgrade csearch")
    return manifest


# ------------------------------------------------------------------------------------ snapshot

class Snapshot:
    """The index at one generation: live items only, in ascending id order, never changing.

    Every column is aligned by row. Search through `blocks()` and read candidates' masks and
    boxes with `gather()`/`masks()`: these never copy a whole column. The whole-column
    properties (`vectors`, `mask_bits`, ...) are the memory-mapped files themselves when there is
    one segment and nothing was removed, otherwise a copy built on first use (`compact`
    restores the no-copy case). A server should take `store.snapshot` once per request and
    read everything from it.
    """

    def __init__(self, directory: Path, manifest: dict, segments: list[_Segment], tombstones: np.ndarray):
        self.directory = directory
        self.manifest = manifest
        self.tombstones = tombstones  # int64, sorted
        self._segments = segments
        self._live = []  # per segment: bool mask of live rows, or None when all are live
        for segment in segments:
            dead = np.isin(segment.ids, tombstones) if len(tombstones) else None
            self._live.append(~dead if dead is not None and dead.any() else None)

    generation = property(lambda self: self.manifest["generation"])
    meta = property(lambda self: self.manifest["meta"])
    dim = property(lambda self: self.manifest["dim"])
    mask_size = property(lambda self: self.manifest["mask_size"])

    def __len__(self) -> int:
        return self.manifest["live"]

    @cached_property
    def _live_rows(self) -> list:
        """Per segment: ascending indices of its live rows, or None when all are live."""
        return [None if live is None else np.flatnonzero(live) for live in self._live]

    @cached_property
    def _offsets(self) -> np.ndarray:
        """Snapshot row where each segment's live rows start (plus the total at the end)."""
        return np.cumsum([0] + self.segment_rows())

    def blocks(self):
        """The vectors as `knn.Block`s, one per segment, for `knn.knn`: the memory-mapped
        files themselves with their stored norms, removed rows skipped by index, so nothing
        is copied however the index was changed."""
        if not self._segments:  # an empty gallery of the right dimension: knn finds nothing
            return [Block(np.zeros((0, self.dim), np.float32))]
        return [Block(s.vectors, s.sq_norms, live) for s, live in zip(self._segments, self._live_rows)]

    def gather(self, column: str, rows) -> np.ndarray:
        """`column` ("ids", "vectors", "sq_norms", "masks" or "boxes") at the given rows,
        read from the segments without building the whole column."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise StoreError(f"rows must lie in [0, {len(self)}), got {rows.min()}..{rows.max()}")
        which = np.searchsorted(self._offsets, rows, side="right") - 1
        first = getattr(self._segments[0], column) if self._segments else self._column(column)
        out = np.empty((len(rows), *first.shape[1:]), first.dtype)
        for i in np.unique(which):
            local = rows[which == i] - self._offsets[i]
            live = self._live_rows[i]
            out[which == i] = getattr(self._segments[i], column)[local if live is None else live[local]]
        return out

    def _column(self, name: str) -> np.ndarray:
        """A whole column, live rows only: the memory map itself when there is one segment and
        nothing was removed, otherwise a concatenated copy (search uses `blocks` instead)."""
        parts = [getattr(s, name) if live is None else getattr(s, name)[live]
                 for s, live in zip(self._segments, self._live)]
        if len(parts) == 1:
            return parts[0]
        if parts:
            return np.concatenate(parts)
        width = {"vectors": (self.dim,), "masks": (mask_bytes(self.mask_size),), "boxes": (4,)}
        dtype = {"ids": np.int64, "masks": np.uint8}.get(name, np.float32)
        return np.zeros((0, *width.get(name, ())), dtype)

    def _strings(self, name: str) -> list:
        return [v for s, live in zip(self._segments, self._live) for v in _select(getattr(s, name), live)]

    @cached_property
    def ids(self) -> np.ndarray:
        return self._column("ids")

    @cached_property
    def vectors(self) -> np.ndarray:
        return self._column("vectors")

    @cached_property
    def sq_norms(self) -> np.ndarray:
        return self._column("sq_norms")

    @cached_property
    def mask_bits(self) -> np.ndarray:
        return self._column("masks")

    @cached_property
    def boxes(self) -> np.ndarray:
        return self._column("boxes")

    @cached_property
    def paths(self) -> list:
        return self._strings("paths")

    @cached_property
    def categories(self) -> list:
        return self._strings("categories")

    @cached_property
    def products(self) -> list:
        return self._strings("products")

    @cached_property
    def _category_rows(self) -> dict:
        """{category: ascending snapshot rows}, from the segments' cached groups."""
        groups: dict = {}
        for segment, live, offset in zip(self._segments, self._live, self._offsets):
            rank = None if live is None else np.cumsum(live) - 1  # physical row -> live row
            for category, physical in segment.category_rows.items():
                rows = physical if live is None else rank[physical[live[physical]]]
                groups.setdefault(category, []).append(rows + offset)
        return {c: np.concatenate(parts) for c, parts in groups.items()}

    def category_counts(self) -> dict:
        """{category: live items}; unlabelled items count under None."""
        return {c: len(r) for c, r in self._category_rows.items()}

    def rows_for_categories(self, categories: Iterable[Optional[str]]) -> np.ndarray:
        """Ascending rows whose category is one of `categories` (unknown names match nothing)."""
        parts = [self._category_rows[c] for c in set(categories) if c in self._category_rows]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def rows_for_ids(self, ids) -> np.ndarray:
        """Rows of live `ids`, in the order given; StoreError naming any id not in the index."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        rows = np.minimum(np.searchsorted(self.ids, ids), max(len(self.ids) - 1, 0))
        found = (self.ids[rows] == ids) if len(self.ids) else np.zeros(len(ids), bool)
        if not found.all():
            missing = ids[~found]
            listed = ", ".join(str(int(i)) for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise StoreError(f"{len(missing)} id(s) not in index {self.directory}: {listed}")
        return rows

    def records(self, rows) -> list[dict]:
        """{"id", "path", "category", "product", "box"} of each row, e.g. the hits of a search."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        ids, boxes = self.gather("ids", rows), self.gather("boxes", rows)
        which = np.searchsorted(self._offsets, rows, side="right") - 1
        records = []
        for row, i, item_id, box in zip(rows, which, ids, boxes):
            segment, live = self._segments[i], self._live_rows[i]
            local = row - self._offsets[i] if live is None else live[row - self._offsets[i]]
            records.append({"id": int(item_id), "path": segment.paths[local], "category": segment.categories[local],
                            "product": segment.products[local], "box": [float(v) for v in box]})
        return records

    def item(self, item_id: int) -> dict:
        return self.records(self.rows_for_ids([item_id]))[0]

    def masks(self, rows) -> np.ndarray:
        """bool (n, S, S) masks of the given rows."""
        return unpack_masks(self.gather("masks", rows), self.mask_size)

    def segment_rows(self) -> list[int]:
        """Live rows per segment, oldest first (what the merge policy looks at)."""
        return [len(s) if live is None else int(live.sum()) for s, live in zip(self._segments, self._live)]


def _load_snapshot(directory: Path, cache: dict) -> Snapshot:
    """Read the manifest and map what it lists. `cache` ((uuid, name) -> _Segment) holds the
    segments already mapped: segments are immutable, so a refresh only maps the new ones."""
    previous = None
    for _ in range(LOAD_RETRIES):
        manifest = _read_manifest(directory)
        nbytes = mask_bytes(manifest["mask_size"])
        try:
            segments = [cache[(manifest["uuid"], e["name"])] if (manifest["uuid"], e["name"]) in cache
                        else _load_segment(directory, e, manifest["dim"], nbytes) for e in manifest["segments"]]
            tomb = manifest.get("tombstones")
            tombstones = (np.load(directory / tomb["file"], allow_pickle=False) if tomb
                          else np.zeros(0, np.int64))
        except FileNotFoundError as exc:
            if previous == (manifest["uuid"], manifest["generation"]):
                raise StoreError(f"index {directory} is incomplete: {Path(exc.filename).name} is "
                                 f"missing") from None
            previous = (manifest["uuid"], manifest["generation"])
            continue  # a writer committed and collected the files meanwhile: read its manifest
        return Snapshot(directory, manifest, segments, tombstones)
    raise StoreError(f"index {directory} changed {LOAD_RETRIES} times while loading; try again")


# ------------------------------------------------------------------------------ writer's lock

@contextlib.contextmanager
def _writer_lock(directory: Path, timeout: Optional[float]) -> Iterator[None]:
    """Exclusive flock on INDEX_DIR/writer.lock. Closing the file (or the process dying, even by
    SIGKILL) releases it, so a crashed writer never leaves a stale lock."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot write to index {directory}: {exc.strerror}") from None
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if deadline is None else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise StoreError(f"index {directory} is being written by another process "
                                     f"(pid {holder}); waited {timeout:g} s, try again") from None
                time.sleep(0.02)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # only to name the holder in the error above
        yield
    finally:
        os.close(fd)


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
        if tiers[len(tiers) - run:].count(level) >= MERGE_FACTOR:
            return len(rows) - run
    return len(rows)


def _merge_start(rows: Sequence[int]) -> int:
    """Where the trailing run of segments to merge begins (len(rows): nothing to merge).

    Segments fall in size tiers (powers of MERGE_FACTOR). When the trailing run of segments of
    tier <= t holds MERGE_FACTOR of tier t, the run becomes one segment, cascading up the tiers. Each item is
    so rewritten about log_MERGE_FACTOR(N) times and an index keeps at most ~MERGE_FACTOR
    segments per tier; small segments stranded inside a run are swept up with it.
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


def _validate_add(vectors, masks, boxes, paths, categories, products, dim: int, size: int) -> _Segment:
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
        raise StoreError(f"masks must be bool ({n}, {size}, {size}) (see store.resize_mask), "
                         f"got {masks.dtype} {masks.shape}")
    boxes = np.asarray(boxes)
    if boxes.shape != (n, 4) or not np.issubdtype(boxes.dtype, np.floating):
        raise StoreError(f"boxes must be float ({n}, 4) (x0, y0, x1, y1) / (W, H), got {boxes.dtype} {boxes.shape}")
    if not (np.isfinite(boxes).all() and (boxes >= 0).all() and (boxes <= 1).all()
            and (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()):
        raise StoreError("boxes must be normalised (0 <= x0 <= x1 <= 1, 0 <= y0 <= y1 <= 1)")
    paths = [os.path.abspath(p) for p in _as_strings(paths, n, "paths", optional=False)]
    vectors = np.ascontiguousarray(vectors)
    return _Segment(ids=np.zeros(n, np.int64), vectors=vectors,
                    sq_norms=squared_norms(vectors),
                    masks=pack_masks(masks), boxes=boxes.astype(np.float32), paths=paths,
                    categories=_as_strings(categories, n, "categories", optional=True),
                    products=_as_strings(products, n, "products", optional=True))


def _check_meta(meta) -> dict:
    try:
        return json.loads(json.dumps(dict(meta), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"index meta must be a JSON-serialisable dict: {exc}") from None


def _within(tombstones: np.ndarray, entries: Sequence[dict]) -> np.ndarray:
    """The tombstones that still point into one of `entries` (segments have disjoint id ranges)."""
    keep = np.zeros(len(tombstones), bool)
    for entry in entries:
        keep |= (tombstones >= entry["first_id"]) & (tombstones <= entry["last_id"])
    return tombstones[keep]


# ---------------------------------------------------------------------------------- the store

class IndexStore:
    """An index directory: read through `snapshot` (or the shortcuts below), change it with
    `add`, `remove`, `update_meta` and `compact`, see other processes' changes with `refresh`.

    One writer at a time (other writers wait up to `lock_timeout` seconds, None: forever);
    readers never wait. Safe to share between threads.
    """

    def __init__(self, directory: Path, snapshot: Snapshot, lock_timeout: Optional[float]):
        self.directory = directory
        self.lock_timeout = lock_timeout
        self._snapshot = snapshot

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def create(cls, directory, meta: dict, dim: int, mask_size: int = 64, overwrite: bool = False,
               lock_timeout: Optional[float] = 60.0) -> "IndexStore":
        """Create an empty index. With `overwrite` an existing index there is replaced in one
        atomic commit (its readers see the new, empty index on refresh). A directory holding
        anything else is refused, so a mistyped path never loses files."""
        directory = Path(directory).expanduser().absolute()
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in (dim, mask_size)):
            raise StoreError(f"dim and mask_size must be positive integers, got {dim!r} and {mask_size!r}")
        dim, mask_size = int(dim), int(mask_size)
        meta = _check_meta(meta)
        if directory.exists() and not directory.is_dir():
            raise StoreError(f"index path exists and is not a directory: {directory}")
        directory.mkdir(parents=True, exist_ok=True)
        fsync_dir(directory.parent)
        has_index = (directory / MANIFEST).exists()
        if has_index and not overwrite:
            raise StoreError(f"an index already exists in {directory}; pass overwrite to replace it")
        foreign = sorted(p.name for p in directory.iterdir() if not _is_ours(p.name))
        if foreign and not has_index:
            raise StoreError(f"{directory} is not empty and not a csearch index (holds {foreign[0]!r}); "
                             f"refusing to write there")
        with _writer_lock(directory, lock_timeout):
            try:
                generation = _read_manifest(directory)["generation"] if has_index else 0
            except StoreError:  # overwriting a damaged index is how one repairs it
                generation = 0
            # fresh segment names, so nothing of the old index is ever overwritten in place
            numbers_used = [int(p.name[len(SEGMENT_PREFIX):]) for p in directory.iterdir()
                            if p.name.startswith(SEGMENT_PREFIX) and p.name[len(SEGMENT_PREFIX):].isdigit()]
            manifest = {"format": FORMAT, "version": VERSION, "uuid": uuid.uuid4().hex,
                        "generation": generation + 1, "dim": dim, "mask_size": mask_size, "next_id": 0,
                        "next_segment": max(numbers_used, default=0) + 1,
                        "live": 0, "segments": [], "tombstones": None, "meta": meta}
            _write_manifest(directory, manifest)
            _collect_garbage(directory, manifest)
        return cls.open(directory, lock_timeout=lock_timeout)

    @classmethod
    def open(cls, directory, lock_timeout: Optional[float] = 60.0) -> "IndexStore":
        """Open an existing index for reading (and writing); StoreError if it is not one."""
        directory = Path(directory).expanduser().absolute()
        return cls(directory, _load_snapshot(directory, {}), lock_timeout)

    # -- reading ------------------------------------------------------------------------------
    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    meta = property(lambda self: self._snapshot.meta)
    dim = property(lambda self: self._snapshot.dim)
    mask_size = property(lambda self: self._snapshot.mask_size)
    generation = property(lambda self: self._snapshot.generation)
    ids = property(lambda self: self._snapshot.ids)
    vectors = property(lambda self: self._snapshot.vectors)
    sq_norms = property(lambda self: self._snapshot.sq_norms)
    mask_bits = property(lambda self: self._snapshot.mask_bits)
    boxes = property(lambda self: self._snapshot.boxes)
    paths = property(lambda self: self._snapshot.paths)
    categories = property(lambda self: self._snapshot.categories)
    products = property(lambda self: self._snapshot.products)

    def __len__(self) -> int:
        return len(self._snapshot)

    def __repr__(self) -> str:
        return (f"IndexStore({str(self.directory)!r}, items={len(self)}, dim={self.dim}, "
                f"mask_size={self.mask_size}, generation={self.generation})")

    def item(self, item_id: int) -> dict:
        return self._snapshot.item(item_id)

    def records(self, rows) -> list[dict]:
        return self._snapshot.records(rows)

    def blocks(self) -> list:
        return self._snapshot.blocks()

    def gather(self, column: str, rows) -> np.ndarray:
        return self._snapshot.gather(column, rows)

    def masks(self, rows) -> np.ndarray:
        return self._snapshot.masks(rows)

    def rows_for_categories(self, categories) -> np.ndarray:
        return self._snapshot.rows_for_categories(categories)

    def rows_for_ids(self, ids) -> np.ndarray:
        return self._snapshot.rows_for_ids(ids)

    def refresh(self) -> bool:
        """Load the latest commit if another process (or thread) changed the index; cheap when
        nothing changed (one small file read). True when the snapshot changed."""
        manifest = _read_manifest(self.directory)
        current = self._snapshot.manifest
        if (manifest["uuid"], manifest["generation"]) == (current["uuid"], current["generation"]):
            return False
        self._reload()
        return True

    def _reload(self) -> None:
        old = self._snapshot
        cache = {(old.manifest["uuid"], e["name"]): s for e, s in zip(old.manifest["segments"], old._segments)}
        new = _load_snapshot(self.directory, cache)
        current = self._snapshot  # another thread may have loaded a later commit meanwhile
        if new.manifest["uuid"] != current.manifest["uuid"] or new.generation >= current.generation:
            self._snapshot = new

    # -- writing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _writing(self) -> Iterator[dict]:
        """Hold the writer's lock, starting from the latest commit (whoever made it); yield a
        private copy of its manifest to edit and pass to `_commit`."""
        with _writer_lock(self.directory, self.lock_timeout):
            self.refresh()
            yield json.loads(json.dumps(self._snapshot.manifest))

    def _commit(self, manifest: dict, tombstones: np.ndarray) -> None:
        manifest["generation"] += 1
        unsynced = []
        if not len(tombstones):
            manifest["tombstones"] = None
        elif not np.array_equal(tombstones, self._snapshot.tombstones):
            path = self.directory / f"{TOMB_PREFIX}{manifest['generation']:06d}.npy"
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # left by a writer that died before committing
            _write_npy(path, np.int64, tombstones.shape, [tombstones], sync=False)
            unsynced.append(path)
            manifest["tombstones"] = {"file": path.name, "count": int(len(tombstones))}
        _write_manifest(self.directory, manifest, unsynced)
        self._reload()
        _collect_garbage(self.directory, manifest)

    def _write(self, manifest: dict, sources: list) -> dict:
        name = _segment_name(manifest["next_segment"])
        manifest["next_segment"] += 1
        return _write_segment(self.directory, name, sources, manifest["dim"], mask_bytes(manifest["mask_size"]))

    def add(self, vectors: np.ndarray, masks: np.ndarray, boxes: np.ndarray, paths: Sequence[str],
            categories: Optional[Sequence[Optional[str]]] = None,
            products: Optional[Sequence[Optional[str]]] = None) -> np.ndarray:
        """Append items; return their new ids (int64, ascending). Durable when it returns.

        vectors float32 (n, dim); masks bool (n, S, S) with S = mask_size (see `resize_mask`);
        boxes float (n, 4) normalised (see `mask_box`); paths are stored absolute. When the new
        segment completes a size tier, the tier is merged into it in the same commit.
        """
        with self._writing() as manifest:
            new = _validate_add(vectors, masks, boxes, paths, categories, products,
                                manifest["dim"], manifest["mask_size"])
            if not len(new):
                return np.zeros(0, np.int64)
            ids = np.arange(manifest["next_id"], manifest["next_id"] + len(new), dtype=np.int64)
            snapshot = self._snapshot
            start = _merge_start(snapshot.segment_rows() + [len(ids)])
            sources = list(zip(snapshot._segments[start:], snapshot._live[start:]))
            entry = self._write(manifest, sources + [(replace(new, ids=ids), None)])
            kept = manifest["segments"][:start]
            manifest["segments"] = kept + [entry]
            manifest["next_id"] += len(ids)
            manifest["live"] += len(ids)
            # every tombstone names a row still on disk, which remove() relies on to count
            self._commit(manifest, _within(snapshot.tombstones, kept))
        return ids

    def remove(self, ids, missing_ok: bool = False) -> int:
        """Remove items by id; return how many were removed. Durable when it returns.

        An id not in the index (never added, or already removed) is a StoreError naming it and
        nothing is removed, unless `missing_ok`. Segments left with no live item are dropped.
        """
        try:
            ids = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        except (TypeError, ValueError):
            raise StoreError(f"ids to remove must be integers, got {ids!r}"[:200]) from None
        with self._writing() as manifest:
            snapshot = self._snapshot
            if missing_ok:
                ids = ids[np.isin(ids, snapshot.ids)]
            else:
                snapshot.rows_for_ids(ids)  # raises, naming the unknown ids
            if not len(ids):
                return 0
            tombstones = np.union1d(snapshot.tombstones, ids)
            manifest["segments"] = [e for e in manifest["segments"] if len(_within(tombstones, [e])) < e["rows"]]
            manifest["live"] -= len(ids)
            self._commit(manifest, _within(tombstones, manifest["segments"]))
        return int(len(ids))

    def update_meta(self, values: dict) -> None:
        """Merge `values` into the index's meta (top-level keys) in one atomic commit."""
        values = _check_meta(values)
        with self._writing() as manifest:
            manifest["meta"].update(values)
            self._commit(manifest, self._snapshot.tombstones)

    def compact(self) -> None:
        """Rewrite all live items as one segment without tombstones, so loading maps the files
        with no copy. Atomic like every write; costs one pass over the index."""
        with self._writing() as manifest:
            snapshot = self._snapshot
            if len(manifest["segments"]) <= 1 and not len(snapshot.tombstones):
                return
            sources = list(zip(snapshot._segments, snapshot._live))
            manifest["segments"] = [self._write(manifest, sources)] if len(snapshot) else []
            self._commit(manifest, np.zeros(0, np.int64))


def _is_ours(name: str) -> bool:
    return name in (MANIFEST, LOCK_FILE) or name.startswith((SEGMENT_PREFIX, TOMB_PREFIX, TMP_PREFIX))


def _write_manifest(directory: Path, manifest: dict, unsynced: Sequence[Path] = ()) -> None:
    """The commit point: make the new manifest, the folder's new entries (renamed segments) and
    the `unsynced` files durable, then atomically replace the manifest and make that durable."""
    tmp = directory / _tmp_name("manifest")
    _write_durably(tmp, json.dumps(manifest, indent=1, ensure_ascii=False).encode(), sync=False)
    _fsync_paths([tmp, directory, *unsynced])
    os.replace(tmp, directory / MANIFEST)
    fsync_dir(directory)


def _collect_garbage(directory: Path, manifest: dict) -> None:
    """Delete what the committed manifest no longer refers to (merged segments, old tombstones,
    temp files of writers that died). Runs under the writer's lock, so no write is in progress.
    A failure only leaves files behind, so it warns instead of failing a committed write."""
    keep = {e["name"] for e in manifest["segments"]} | {MANIFEST, LOCK_FILE}
    if manifest.get("tombstones"):
        keep.add(manifest["tombstones"]["file"])
    for path in directory.iterdir():
        if path.name in keep or not _is_ours(path.name):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            warnings.warn(f"index {directory}: could not delete unused {path.name}: {exc}", stacklevel=3)
