"""Approximate nearest-neighbour (ANN) search in the local store: a FAISS HNSW or IVF index over
the items, which proposes candidates for unrestricted searches (`store.ann: hnsw | ivf`).

It is built when `csearch index` finishes (when store.ann is not none) and by `csearch optimize
INDEX_DIR [--ann KIND]`, and saved as INDEX_DIR/ann-GGGGGG-KIND.faiss, GGGGGG being the generation
of the snapshot it was built from. Building happens outside the writer's lock (adds and removes go
on meanwhile); then, under the lock, the file is written under a temporary name, fsynced, renamed
into place and named in manifest.json ("ann": {file, kind, next_id, count, ...}) in one commit
(`IndexStore.commit_ann`), which also records the kind as the index's store.ann. An interrupted
build leaves the previous commit untouched, and the next writer deletes the unreferenced file.

The ANN index holds the items that were live at its build, under their ids. Later commits keep
the manifest's entry, and a search stays complete and exact in what it returns:

- removed items: those built in but no longer live are excluded inside the FAISS search (an
  `IDSelectorBitmap` of the live positions), and every candidate is looked up in the snapshot,
  so a removed item can never come back;
- added items: ids only grow, so the items with ids >= the entry's next_id are exactly those
  added since the build; they are always searched exactly, with the candidates;
- the candidates and the added rows are then ranked by the exact KNN kernel (`knn.knn`, the
  configured `search.engine`), so distances and tie-breaking are those of an exact search.

When over MAX_DEAD_FRACTION of the built items have been removed, or the ANN proposes fewer
candidates than the search needs, the search is exact over every row (a warning names `csearch
optimize`). Category-restricted searches never use the ANN: with a selective filter HNSW's recall
collapses (0.27 at 1 % of the rows in issue 13) while exact search over one category is cheap.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import allowed_values
from ..errors import StoreError, unknown_name
from .durable import fsync_dir, tmp_name

log = logging.getLogger("csearch")

KINDS = tuple(k for k in allowed_values("store.ann") if k != "none")
ANN_PREFIX = "ann-"
HNSW_M = 32  # graph neighbours per node (HNSW32: recall@10 0.996 at 100k x 1280, issue 13)
HNSW_EF_CONSTRUCTION = 80  # build-time beam (faiss' default 40): a better graph for a slower build
HNSW_EF_SEARCH = 64  # search-time beam, raised to the candidates a search asks for
IVF_NPROBE = 32  # inverted lists scanned per query
IVF_TRAIN_PER_LIST = 32  # k-means training sample: this many points per list (at most every item)
IVF_TRAIN_ITERATIONS = 10  # k-means iterations: faiss' default 25 costs 2.5x the training (recall: scale.md)
MAX_DEAD_FRACTION = 0.5  # past this share of removed built-in items, search exactly (rebuild it)
BUILD_ROWS = 8192  # rows added per chunk while building (bounds the memory of a gather)


def ivf_lists(n: int) -> int:
    """Inverted lists for n items: about 4 * sqrt(n), with at least 39 training points per list
    (faiss' minimum for a meaningful k-means)."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39))


def _faiss():
    try:
        import faiss
    except ImportError:  # a core requirement, so only a broken install gets here
        raise StoreError("store.ann needs FAISS: pip install faiss-cpu") from None
    return faiss


# ------------------------------------------------------------------------------------- building


def build(snapshot, kind: str, progress: Optional[Callable[[int], None]] = None):
    """A FAISS index (`IndexIDMap` over HNSW-Flat or IVF-Flat) holding the live items of
    `snapshot` in row order, under their ids; `progress(n)` after each chunk of n items added."""
    if kind not in KINDS:
        raise unknown_name("ANN index kind", kind, KINDS)
    faiss = _faiss()
    n, dim = len(snapshot), snapshot.dim
    if kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, HNSW_M)
        base.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    else:
        nlist = ivf_lists(n)
        base = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
        base.cp.min_points_per_centroid = 1  # no warning for the deliberate sample size below
        base.cp.niter = IVF_TRAIN_ITERATIONS
        sample = min(n, IVF_TRAIN_PER_LIST * nlist)
        rows = np.sort(np.random.default_rng(0).choice(n, sample, replace=False))
        base.train(np.ascontiguousarray(snapshot.gather("vectors", rows)))
    index = faiss.IndexIDMap(base)
    for start in range(0, n, BUILD_ROWS):
        rows = np.arange(start, min(n, start + BUILD_ROWS))
        index.add_with_ids(np.ascontiguousarray(snapshot.gather("vectors", rows)), snapshot.gather("ids", rows))
        if progress:
            progress(len(rows))
    return index


def _params(kind: str, n: int) -> dict:
    """The build parameters, recorded in the manifest entry."""
    if kind == "hnsw":
        return {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION}
    return {"nlist": ivf_lists(n), "train": min(n, IVF_TRAIN_PER_LIST * ivf_lists(n))}


def optimize(store, kind: Optional[str] = None, progress: Optional[Callable[[int], None]] = None) -> dict:
    """Build the ANN index of `store` (an `IndexStore`) over its current items and commit it;
    `kind` None: the index's recorded store.ann. "none" drops it. Returns a summary
    {"ann", "items", "seconds", "file", "previous"}."""
    if not hasattr(store, "commit_ann"):
        raise StoreError("an ANN index is built in the local store only (this store has its own indexes)")
    snapshot = store.snapshot
    if kind is None:
        kind = recorded_kind(snapshot.meta)
    if kind != "none" and kind not in KINDS:
        raise unknown_name("ANN index kind", kind, ("none", *KINDS))
    previous = (snapshot.manifest.get("ann") or {}).get("kind", "none")
    started = time.perf_counter()
    if kind != "none" and len(snapshot):
        log.info("building the %s ANN index of %s over %d item(s)", kind, store.directory, len(snapshot))
    index = build(snapshot, kind, progress) if kind != "none" and len(snapshot) else None
    built = snapshot.manifest
    entry = None
    if index is not None:
        entry = {
            "file": f"{ANN_PREFIX}{built['generation']:06d}-{kind}.faiss",
            "kind": kind,
            "generation": built["generation"],
            "next_id": built["next_id"],
            "count": int(index.ntotal),
            "params": _params(kind, len(snapshot)),
        }

    def write(directory: Path, manifest: dict) -> None:
        if manifest["uuid"] != built["uuid"]:
            raise StoreError(f"index {directory} was replaced while its ANN index was built; run it again")
        if entry is not None:
            _write_index(index, directory, entry["file"])
        manifest["ann"] = entry
        config = manifest["meta"].get("config")
        if isinstance(config, dict):  # the recorded store.ann says what the index has
            config.setdefault("store", {})["ann"] = kind

    store.commit_ann(write)
    return {
        "ann": kind,
        "items": 0 if entry is None else entry["count"],
        "seconds": time.perf_counter() - started,
        "file": None if entry is None else str(store.directory / entry["file"]),
        "previous": previous,
    }


def ensure(store, kind: str, progress: Optional[Callable[[int], None]] = None) -> Optional[dict]:
    """`optimize(store, kind)` unless the index already has an ANN index of that kind covering
    exactly its current items (so a resumed `csearch index` with nothing new does not rebuild)."""
    manifest = store.snapshot.manifest
    entry = manifest.get("ann")
    if kind == "none" and entry is None:
        return None
    if entry and entry["kind"] == kind and entry["next_id"] == manifest["next_id"] and entry["count"] == len(store):
        return None
    return optimize(store, kind, progress)


def recorded_kind(meta: dict) -> str:
    """The store.ann an index records (none when it predates the key)."""
    return ((meta.get("config") or {}).get("store") or {}).get("ann", "none")


def _write_index(index, directory: Path, name: str) -> None:
    """Write the FAISS index as directory/name: a temporary file, fsynced, renamed into place
    (the manifest commit that names it then makes the folder durable)."""
    faiss = _faiss()
    tmp = directory / tmp_name(name)
    try:
        faiss.write_index(index, str(tmp))
        fsync_dir(tmp)  # fsyncs a file too
        os.replace(tmp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# ------------------------------------------------------------------------------------- loading


class AnnIndex:
    """A loaded ANN file: the FAISS index and the ids of its positions (ascending). Shared by
    every snapshot whose manifest names the same file; read-only, so safe across threads.

    Searches go to the HNSW/IVF index inside the file's `IndexIDMap`, by position, and positions
    become ids here: `IndexIDMap.search` maps labels in an OpenMP loop even for one query, whose
    spinning threads cost 10 ms per query on a busy 2-core machine (docs/results/scale.md)."""

    def __init__(self, index, entry: dict):
        faiss = _faiss()
        self._file_index = index  # owns the index searched below
        self.index = faiss.downcast_index(index.index)
        self.entry = entry
        self.kind = entry["kind"]
        self.ids = faiss.vector_to_array(index.id_map).astype(np.int64)


_loaded: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_loading = threading.Lock()


def _load(directory: Path, manifest: dict) -> AnnIndex:
    """The ANN file the manifest names, memory-mapped where FAISS can (flat vectors), loaded
    once per process however many snapshots name it."""
    entry = manifest["ann"]
    key = (str(directory), manifest["uuid"], entry["file"])
    with _loading:
        found = _loaded.get(key)
        if found is not None:
            return found
        faiss = _faiss()
        path = directory / entry["file"]
        if not path.is_file():
            raise StoreError(f"{entry['file']} is missing")
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
        except RuntimeError:
            try:
                index = faiss.read_index(str(path))
            except RuntimeError as exc:
                raise StoreError(f"{entry['file']} is corrupt ({str(exc).splitlines()[0][:120]})") from None
        if index.ntotal != entry["count"] or index.d != manifest["dim"] or not hasattr(index, "id_map"):
            raise StoreError(f"{entry['file']} does not hold the {entry['count']} items its manifest entry says")
        found = _loaded[key] = AnnIndex(index, entry)
        return found


def ann_view(snapshot) -> Optional[AnnView]:
    """The ANN index of `snapshot` (None when it has none): what `Snapshot.ann` returns. A file
    that cannot be loaded gives None and a warning, so searches stay exact and complete."""
    if not snapshot.manifest.get("ann"):
        return None
    try:
        view = AnnView(snapshot, _load(snapshot.directory, snapshot.manifest))
    except StoreError as exc:
        log.warning(
            "index %s: its ANN index cannot be used (%s); searching exactly (run `csearch optimize %s`)",
            snapshot.directory,
            exc,
            snapshot.directory,
        )
        return None
    if view.dead_fraction > MAX_DEAD_FRACTION:
        log.warning(
            "index %s: %.0f%% of the items in its ANN index were removed since it was built; searching exactly "
            "(run `csearch optimize %s`)",
            snapshot.directory,
            100 * view.dead_fraction,
            snapshot.directory,
        )
        return None
    return view


# ------------------------------------------------------------------------------------- searching


class AnnView:
    """An ANN index seen from one snapshot: which of its items are still live, which of the
    snapshot's rows it does not hold (added since), and the candidate rows of a query."""

    def __init__(self, snapshot, ann: AnnIndex):
        self.snapshot = snapshot
        self.ann = ann
        ids = snapshot.ids  # ascending
        next_id = ann.entry["next_id"]
        covered = int(np.searchsorted(ids, next_id))  # live rows with ids the build saw: rows [0, covered)
        self.tail = np.arange(covered, len(ids), dtype=np.int64)  # added since the build: always searched
        # every live id below next_id was built in (ids are never reused), so equal counts: none removed
        self.dead_fraction = 1.0 - covered / max(len(ann.ids), 1)
        self._selector = None
        if covered != len(ann.ids):
            faiss = _faiss()
            keep = np.isin(ann.ids, ids[:covered], assume_unique=True)  # by position in the ANN
            self._bits = np.packbits(keep, bitorder="little")  # kept alive: the selector points into it
            self._selector = faiss.IDSelectorBitmap(len(keep), faiss.swig_ptr(self._bits))

    @property
    def kind(self) -> str:
        return self.ann.kind

    def _search_params(self, want: int, ef_search: Optional[int], nprobe: Optional[int]):
        faiss = _faiss()
        selector = {"sel": self._selector} if self._selector is not None else {}
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=max(ef_search or HNSW_EF_SEARCH, want), **selector)
        return faiss.SearchParametersIVF(nprobe=nprobe or IVF_NPROBE, **selector)

    def candidates(
        self, vectors: np.ndarray, depth: int, ef_search: Optional[int] = None, nprobe: Optional[int] = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ANN's `depth` nearest live items of each query: (rows int64 (Q, depth), -1 where
        it found fewer; squared distances float32 (Q, depth)). Rows index the snapshot."""
        queries = np.ascontiguousarray(np.asarray(vectors, np.float32).reshape(-1, self.snapshot.dim))
        want = max(1, min(depth, len(self.ann.ids)))
        d2, positions = self.ann.index.search(queries, want, params=self._search_params(want, ef_search, nprobe))
        found = np.where(positions >= 0, self.ann.ids[np.maximum(positions, 0)], -1)
        ids = self.snapshot.ids
        rows = np.searchsorted(ids, found) if len(ids) else np.zeros_like(found)
        rows = np.minimum(rows, max(len(ids) - 1, 0))
        live = (found >= 0) & (ids[rows] == found) if len(ids) else np.zeros(found.shape, bool)
        return np.where(live, rows, -1), np.where(live, d2, np.inf).astype(np.float32)

    def candidate_rows(self, vector: np.ndarray, depth: int, allowed: Optional[np.ndarray] = None):
        """Snapshot rows to rank exactly for one query so that its `depth` best are found: the
        ANN's candidates plus the rows added since the build, within `allowed` (ascending rows,
        None: all). None when the ANN cannot supply enough of them: search every row then."""
        excluded = 0 if allowed is None else len(self.snapshot) - len(allowed)
        rows, _ = self.candidates(vector, depth + excluded)
        rows = rows[0][rows[0] >= 0]
        if allowed is not None:
            rows = rows[np.isin(rows, allowed)]
            tail = self.tail[np.isin(self.tail, allowed)]
        else:
            tail = self.tail
        needed = min(depth, len(self.snapshot) if allowed is None else len(allowed))
        if len(rows) + len(tail) < needed:
            return None
        return np.union1d(rows, tail)
