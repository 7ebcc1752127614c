"""Snapshots: the index as one committed manifest lists it, a consistent read view that never
changes, and loading one.

Readers take no lock: they read manifest.json and memory-map the segments it lists. A writer may
delete an old segment while a reader is opening it; the reader then re-reads the manifest.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import StoreError
from ..knn import Block
from ..masks import mask_bytes, unpack_masks
from .ann import AnnView, ann_view
from .manifest import read_manifest
from .segments import ARRAY_COLUMNS, Segment, Source, load_segment, select

LOAD_RETRIES = 5


class Snapshot:
    """The index at one generation: live items only, in ascending id order, never changing.

    Every column is aligned by row. Search through `blocks()` and read candidates' masks and
    boxes with `gather()`/`masks()`: these never copy a whole column. The whole-column
    properties (`vectors`, `mask_bits`, ...) are the memory-mapped files themselves when there is
    one segment and nothing was removed, otherwise a copy built on first use (`compact`
    restores the no-copy case). A server should take `store.snapshot` once per request and
    read everything from it.
    """

    def __init__(self, directory: Path, manifest: dict, segments: list[Segment], tombstones: np.ndarray):
        self.directory = directory
        self.manifest = manifest
        self.tombstones = tombstones  # int64, sorted
        self._segments = segments
        self._live = []  # per segment: bool mask of live rows, or None when all are live
        for segment in segments:
            dead = np.isin(segment.ids, tombstones) if len(tombstones) else None
            self._live.append(~dead if dead is not None and dead.any() else None)

    generation = property(lambda self: self.manifest["generation"])
    extras = property(lambda self: self.manifest.get("extras") or {})  # {column: {"shape", "dtype"}}
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
        """`column` ("ids", "vectors", "sq_norms", "masks", "boxes" or an extras column) at the
        given rows, read from the segments without building the whole column."""
        if column not in ARRAY_COLUMNS and column not in self.extras:
            known = ", ".join([*ARRAY_COLUMNS, *self.extras])
            raise StoreError(f"index {self.directory} has no column {column!r} (it has {known})")
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise StoreError(f"rows must lie in [0, {len(self)}), got {rows.min()}..{rows.max()}")
        which = np.searchsorted(self._offsets, rows, side="right") - 1
        first = self._segments[0].column(column) if self._segments else self._column(column)
        out = np.empty((len(rows), *first.shape[1:]), first.dtype)
        for i in np.unique(which):
            local = rows[which == i] - self._offsets[i]
            live = self._live_rows[i]
            out[which == i] = self._segments[i].column(column)[local if live is None else live[local]]
        return out

    def _column(self, name: str) -> np.ndarray:
        """A whole column, live rows only: the memory map itself when there is one segment and
        nothing was removed, otherwise a concatenated copy (search uses `blocks` instead)."""
        parts = [
            s.column(name) if live is None else s.column(name)[live] for s, live in zip(self._segments, self._live)
        ]
        if len(parts) == 1:
            return parts[0]
        if parts:
            return np.concatenate(parts)
        if name in self.extras:
            return np.zeros((0, *self.extras[name]["shape"]), np.dtype(self.extras[name]["dtype"]))
        width = {"vectors": (self.dim,), "masks": (mask_bytes(self.mask_size),), "boxes": (4,)}
        dtype = {"ids": np.int64, "masks": np.uint8}.get(name, np.float32)
        return np.zeros((0, *width.get(name, ())), dtype)

    def _strings(self, name: str) -> list:
        return [v for s, live in zip(self._segments, self._live) for v in select(getattr(s, name), live)]

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
    def ann(self) -> Optional[AnnView]:
        """The index's ANN index (`store.ann`) as this snapshot sees it, loaded on first use (one
        copy per process, memory-mapped), or None: see `ann`. `search.search_snapshot` uses it."""
        return ann_view(self)

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
            records.append(
                {
                    "id": int(item_id),
                    "path": segment.paths[local],
                    "category": segment.categories[local],
                    "product": segment.products[local],
                    "box": [float(v) for v in box],
                }
            )
        return records

    def item(self, item_id: int) -> dict:
        return self.records(self.rows_for_ids([item_id]))[0]

    def masks(self, rows) -> np.ndarray:
        """bool (n, S, S) masks of the given rows."""
        return unpack_masks(self.gather("masks", rows), self.mask_size)

    def segment_rows(self) -> list[int]:
        """Live rows per segment, oldest first (what the merge policy looks at)."""
        return [len(s) if live is None else int(live.sum()) for s, live in zip(self._segments, self._live)]

    def sources(self, start: int = 0) -> list[Source]:
        """(segment, bool mask of its live rows or None) of the segments from `start` on, oldest
        first: what a merge or compact copies."""
        return list(zip(self._segments[start:], self._live[start:]))


def load_snapshot(directory: Path, reuse: Optional[Snapshot] = None) -> Snapshot:
    """Read the manifest and map what it lists. Segments are immutable, so those `reuse` (an
    earlier snapshot of the same index) already mapped are taken from it, not mapped again."""
    cache = (
        {}
        if reuse is None
        else {(reuse.manifest["uuid"], e["name"]): s for e, s in zip(reuse.manifest["segments"], reuse._segments)}
    )
    previous = None
    for _ in range(LOAD_RETRIES):
        manifest = read_manifest(directory)
        nbytes = mask_bytes(manifest["mask_size"])
        try:
            segments = [
                cache[(manifest["uuid"], e["name"])]
                if (manifest["uuid"], e["name"]) in cache
                else load_segment(directory, e, manifest["dim"], nbytes, manifest.get("extras"))
                for e in manifest["segments"]
            ]
            tomb = manifest.get("tombstones")
            tombstones = np.load(directory / tomb["file"], allow_pickle=False) if tomb else np.zeros(0, np.int64)
        except FileNotFoundError as exc:
            if previous == (manifest["uuid"], manifest["generation"]):
                raise StoreError(f"index {directory} is incomplete: {Path(exc.filename).name} is missing") from None
            previous = (manifest["uuid"], manifest["generation"])
            continue  # a writer committed and collected the files meanwhile: read its manifest
        return Snapshot(directory, manifest, segments, tombstones)
    raise StoreError(f"index {directory} changed {LOAD_RETRIES} times while loading; try again")
