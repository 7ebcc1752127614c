"""MemorySnapshot: a consistent read view held in memory, for store backends whose items live
elsewhere (a Milvus collection). The backend fetches every live item once (and later only what
changed) and hands the columns over; from then on the snapshot never changes, so a request reads
one version of the index, and search is the same exact numpy KNN as over the local store's files.

It offers what `snapshot.Snapshot` offers readers (`base.VectorSnapshot` plus the whole columns
`ids`, `paths`, `categories`, `products`, `category_counts`, `item`, `generation`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cached_property
from typing import Optional

import numpy as np

from ..errors import StoreError
from ..knn import Block, squared_norms
from ..masks import mask_bytes, unpack_masks

ARRAYS = ("ids", "vectors", "sq_norms", "masks", "boxes")
STRINGS = ("paths", "categories", "products")


def concat_columns(parts: list) -> dict:
    """Column dicts (arrays and lists alike) joined row-wise, in order."""
    return {
        k: np.concatenate([p[k] for p in parts])
        if isinstance(parts[0][k], np.ndarray)
        else [x for p in parts for x in p[k]]
        for k in parts[0]
    }


def take_rows(columns: Mapping, index) -> dict:
    """The rows `index` (a bool mask or positions) of every column, arrays and lists alike."""
    index = np.asarray(index)
    positions = np.flatnonzero(index) if index.dtype == bool else index
    return {k: v[index] if isinstance(v, np.ndarray) else [v[i] for i in positions] for k, v in columns.items()}


class MemorySnapshot:
    """Live items in ascending id order, every column aligned by row, never changing.

    columns: "ids" int64 (n,), "vectors" float32 (n, dim), "masks" uint8 (n, mask bytes) packed,
    "boxes" float32 (n, 4), "paths"/"categories"/"products" lists, and one array per extras
    column; "sq_norms" is computed when absent. `extras`: the extras schema
    {name: {"shape": row shape, "dtype": name}}; `source` names the index in error messages.
    """

    def __init__(
        self,
        columns: Mapping,
        dim: int,
        mask_size: int,
        meta: dict,
        extras: Mapping,
        generation: int,
        source: str,
    ):
        self.dim, self.mask_size, self.meta = int(dim), int(mask_size), meta
        self.extras, self.generation, self.directory = dict(extras), int(generation), source
        n = len(columns["ids"])
        empty = {
            "ids": np.zeros(0, np.int64),
            "vectors": np.zeros((0, self.dim), np.float32),
            "masks": np.zeros((0, mask_bytes(self.mask_size)), np.uint8),
            "boxes": np.zeros((0, 4), np.float32),
            **{name: np.zeros((0, *s["shape"]), np.dtype(s["dtype"])) for name, s in self.extras.items()},
        }
        self._arrays = {name: columns[name] if n else empty[name] for name in [*empty]}
        ids = self._arrays["ids"]
        if len(ids) > 1 and not (np.diff(ids) > 0).all():
            raise ValueError("a snapshot's ids must be unique and ascending")
        self._arrays["sq_norms"] = columns.get("sq_norms", squared_norms(self._arrays["vectors"]))
        for name in STRINGS:
            setattr(self, name, list(columns[name]) if n else [])
        for name, values in [*self._arrays.items(), *((s, getattr(self, s)) for s in STRINGS)]:
            if len(values) != n:
                raise ValueError(f"snapshot column {name} has {len(values)} rows, expected {n}")

    def __len__(self) -> int:
        return len(self._arrays["ids"])

    ids = property(lambda self: self._arrays["ids"])
    vectors = property(lambda self: self._arrays["vectors"])
    sq_norms = property(lambda self: self._arrays["sq_norms"])
    mask_bits = property(lambda self: self._arrays["masks"])
    boxes = property(lambda self: self._arrays["boxes"])

    def column(self, name: str) -> np.ndarray:
        """A whole array column ("ids", "vectors", "sq_norms", "masks", "boxes" or an extras one)."""
        if name not in self._arrays:
            known = ", ".join(self._arrays)
            raise StoreError(f"index {self.directory} has no column {name!r} (it has {known})")
        return self._arrays[name]

    def blocks(self) -> list:
        return [Block(self.vectors, self.sq_norms)]

    def gather(self, column: str, rows) -> np.ndarray:
        values = self.column(column)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise StoreError(f"rows must lie in [0, {len(self)}), got {rows.min()}..{rows.max()}")
        return values[rows]

    def masks(self, rows) -> np.ndarray:
        return unpack_masks(self.gather("masks", rows), self.mask_size)

    @cached_property
    def _category_rows(self) -> dict:
        groups: dict = {}
        for row, category in enumerate(self.categories):
            groups.setdefault(category, []).append(row)
        return {c: np.array(r, np.int64) for c, r in groups.items()}

    def category_counts(self) -> dict:
        """{category: live items}; unlabelled items count under None."""
        return {c: len(r) for c, r in self._category_rows.items()}

    def rows_for_categories(self, categories: Iterable[Optional[str]]) -> np.ndarray:
        parts = [self._category_rows[c] for c in set(categories) if c in self._category_rows]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def rows_for_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        rows = np.minimum(np.searchsorted(self.ids, ids), max(len(self) - 1, 0))
        found = (self.ids[rows] == ids) if len(self) else np.zeros(len(ids), bool)
        if not found.all():
            missing = ids[~found]
            listed = ", ".join(str(int(i)) for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise StoreError(f"{len(missing)} id(s) not in index {self.directory}: {listed}")
        return rows

    def records(self, rows) -> list[dict]:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        boxes = self.gather("boxes", rows)
        return [
            {
                "id": int(self.ids[row]),
                "path": self.paths[row],
                "category": self.categories[row],
                "product": self.products[row],
                "box": [float(v) for v in box],
            }
            for row, box in zip(rows, boxes)
        ]

    def item(self, item_id: int) -> dict:
        return self.records(self.rows_for_ids([item_id]))[0]

    def changed(self, keep: np.ndarray, added: Mapping, meta: dict, generation: int) -> MemorySnapshot:
        """A new snapshot: this one's rows where `keep` (bool per row) plus the `added` columns
        (ids not already here), in ascending id order, with the given meta and generation."""
        names = [*self._arrays, *STRINGS]
        merged = {}
        order = np.argsort(np.concatenate([self.ids[keep], np.asarray(added["ids"], np.int64)]), kind="stable")
        for name in names:
            old = (
                self._arrays[name][keep]
                if name in self._arrays
                else [v for v, k in zip(getattr(self, name), keep) if k]
            )
            new = added[name] if name != "sq_norms" else squared_norms(added["vectors"])
            if name in self._arrays:
                merged[name] = np.concatenate([old, np.asarray(new, old.dtype).reshape(-1, *old.shape[1:])])[order]
            else:
                joined = list(old) + list(new)
                merged[name] = [joined[i] for i in order]
        return MemorySnapshot(merged, self.dim, self.mask_size, meta, self.extras, generation, self.directory)
