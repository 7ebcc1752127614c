"""The vector-store interface: what the search engine, the service and the indexer need from an
index, so a second backend (e.g. a Milvus collection) can stand in for `IndexStore`.

A store holds items: a float32 vector, an object mask (bool S x S, S = `mask_size`), the mask's
normalised box, the image path, category and product. Ids are int64, assigned by the store, and
never reused. Readers take `store.snapshot` once per request and read only from it, so one query
never mixes two versions of the index; writers call `add`, `remove` and `update_meta`, each
durable and atomic on return. `refresh` makes the store's snapshot follow other processes' writes.

Snapshot rows are 0..len-1 in ascending id order. A filtered top-k search is
``knn(snapshot.blocks(), queries, k, rows=snapshot.rows_for_categories(names))``, then
``snapshot.gather("masks" | "boxes" | "ids", rows)`` for re-ranking and ``snapshot.records(rows)``
for the hits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Optional, Protocol, runtime_checkable

import numpy as np


class IndexShape(Protocol):
    """What a store and its snapshots both describe: vector length, mask side, meta, item count."""

    @property
    def dim(self) -> int: ...

    @property
    def mask_size(self) -> int: ...

    @property
    def meta(self) -> dict: ...

    def __len__(self) -> int: ...


@runtime_checkable
class VectorSnapshot(IndexShape, Protocol):
    """A consistent, immutable read view of a store."""

    def blocks(self) -> list:
        """The vectors as `knn.Block`s (every live row, in row order) for `knn.knn`."""

    def rows_for_categories(self, categories: Iterable[Optional[str]]) -> np.ndarray:
        """Ascending rows whose category is one of `categories`."""

    def rows_for_ids(self, ids) -> np.ndarray:
        """Rows of `ids`, in the order given; StoreError naming any id not in the store."""

    def gather(self, column: str, rows) -> np.ndarray:
        """ "ids", "vectors", "sq_norms", "masks" (bit-packed) or "boxes" at the given rows."""

    def masks(self, rows) -> np.ndarray:
        """bool (n, S, S) masks of the given rows."""

    def records(self, rows) -> list[dict]:
        """{"id", "path", "category", "product", "box"} of each row."""


@runtime_checkable
class VectorStore(IndexShape, Protocol):
    """A vector store: the consistent snapshot readers use, and the writes."""

    @property
    def snapshot(self) -> VectorSnapshot: ...

    def refresh(self) -> bool:
        """Load the latest committed state; True when the snapshot changed."""

    def add(
        self,
        vectors: np.ndarray,
        masks: np.ndarray,
        boxes: np.ndarray,
        paths: Sequence[str],
        categories: Optional[Sequence[Optional[str]]] = None,
        products: Optional[Sequence[Optional[str]]] = None,
        extras: Optional[Mapping[str, np.ndarray]] = None,
    ) -> np.ndarray:
        """Append items; return their new int64 ids, ascending. `extras`: optional named per-item
        columns, each an array with one fixed-shape row per item (e.g. "local_features": uint8
        (n, K, B) keypoints and descriptors for geometric re-ranking); an index that has a column
        needs it in every add, and `snapshot.gather(name, rows)` reads it back."""

    def remove(self, ids, missing_ok: bool = False) -> int:
        """Remove items by id; return how many were removed."""

    def update_meta(self, values: dict) -> None:
        """Merge `values` into the store's meta (top-level keys)."""
