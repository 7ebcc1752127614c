"""Exact nearest-neighbour search (the KNN kernel): a pure function on arrays.

`knn` is exact brute-force Euclidean search, optionally restricted to a subset of rows (the
paper's category restriction). Every KNN engine (`search.engine`: numpy | faiss | auto) returns
the same answer: the k smallest distances, ties broken by the lower row, as true (not squared)
float32 distances.
"""

from __future__ import annotations

import functools
import importlib.util
import numbers
from collections.abc import Iterator
from typing import NamedTuple, Optional

import numpy as np

from .config import allowed_values
from .errors import unknown_name

ENGINES = allowed_values("search.engine")
AUTO_FAISS_MAX_QUERIES = 3  # "auto": FAISS' SIMD scan wins below this; BLAS GEMM wins above
CHUNK_BYTES = 64 << 20  # per-chunk working memory: bounded whatever the gallery size


# ------------------------------------------------------------------------------------- gallery


class Block(NamedTuple):
    """Part of a gallery searched where it lies, e.g. one memory-mapped index segment, so that
    a gallery in several pieces, or with removed rows, is never copied into one array.

    The gallery's rows are the blocks' `live` rows in order (all rows when `live` is None).
    """

    vectors: np.ndarray  # float32 (n, D)
    sq_norms: Optional[np.ndarray] = None  # (n,) squared norms; None: computed per search
    live: Optional[np.ndarray] = None  # int64 ascending indices into `vectors`; None: every row

    @property
    def size(self) -> int:
        return len(self.vectors) if self.live is None else len(self.live)


def squared_norms(vectors: np.ndarray) -> np.ndarray:
    """float32 (N,) squared L2 norms (store them once so each search skips this pass)."""
    return np.einsum("ij,ij->i", vectors, vectors)


def _check_block(block: Block, dim: Optional[int]) -> Block:
    vectors, norms, live = block
    if (
        not isinstance(vectors, np.ndarray)
        or vectors.ndim != 2
        or vectors.dtype != np.float32
        or (dim is not None and vectors.shape[1] != dim)
    ):
        described = f"{vectors.dtype} {vectors.shape}" if isinstance(vectors, np.ndarray) else type(vectors).__name__
        # no silent cast: a gallery is large, and a copy of it is a surprise
        raise ValueError(f"vectors must be float32 (N, {dim or 'D'}) arrays, got {described}")
    if norms is not None and (not isinstance(norms, np.ndarray) or norms.shape != (len(vectors),)):
        raise ValueError(f"sq_norms must be an ({len(vectors)},) array, one per vector")
    if live is not None:
        live = np.asarray(live, np.int64)
        if live.ndim != 1 or (len(live) and (live[0] < 0 or live[-1] >= len(vectors))):
            raise ValueError(f"a block's live rows must be ascending indices below {len(vectors)}")
    return Block(vectors, norms, live)


def _as_blocks(vectors, sq_norms) -> list[Block]:
    if isinstance(vectors, np.ndarray):
        return [_check_block(Block(vectors, sq_norms), None)]
    if sq_norms is not None:
        raise ValueError("with blocks, give each block's sq_norms in the block")
    blocks = [Block(b) if isinstance(b, np.ndarray) else Block(*b) for b in vectors]
    dim = (
        blocks[0].vectors.shape[1]
        if blocks and isinstance(blocks[0].vectors, np.ndarray) and blocks[0].vectors.ndim == 2
        else None
    )
    return [_check_block(b, dim) for b in blocks]


def _check_queries(queries, dim: int) -> np.ndarray:
    queries = np.asarray(queries)
    if queries.ndim == 1:
        queries = queries[None]
    if queries.ndim != 2 or queries.shape[1] != dim or not np.issubdtype(queries.dtype, np.number):
        raise ValueError(f"queries must be numeric (Q, {dim}) or ({dim},), got {queries.dtype} {queries.shape}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if not np.isfinite(queries).all():
        raise ValueError("queries contain NaN or infinity")
    return queries


def _check_rows(rows, n: int) -> Optional[np.ndarray]:
    if rows is None:
        return None
    rows = np.asarray(rows)
    if rows.ndim != 1 or not (np.issubdtype(rows.dtype, np.integer) or rows.size == 0):
        raise ValueError(f"rows must be a 1-D integer array, got {rows.dtype} {rows.shape}")
    rows = rows.astype(np.int64, copy=False)
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"rows must lie in [0, {n}), got {rows.min()}..{rows.max()}")
    if len(rows) > 1 and not (np.diff(rows) > 0).all():
        rows = np.unique(rows)  # ascending and unique, which the tie-breaking relies on
    return rows


def _chunk_rows(queries: int, dim: int, gathered: bool) -> int:
    """Rows per chunk so that the (Q, rows) distance block, and a gathered copy of the rows
    when searching a subset, each stay within CHUNK_BYTES."""
    rows = CHUNK_BYTES // (4 * max(queries, 1))
    if gathered:
        rows = min(rows, CHUNK_BYTES // (4 * dim))
    return max(rows, 1024)


class _Chunk(NamedTuple):
    data: np.ndarray  # (c, D): a view of a block, or the gathered rows of a subset
    norms: Optional[np.ndarray]  # (c,) or None
    keep: Optional[np.ndarray]  # columns of `data` that are gallery rows; None: all
    rows: np.ndarray  # gallery row of each kept column, ascending


def _chunks(blocks: list[Block], rows: Optional[np.ndarray], queries: int) -> Iterator[_Chunk]:
    """The gallery (or its `rows`) in chunks of bounded size, in ascending row order. Whole
    blocks are read as views, removed rows are skipped after the distance computation (so a
    block with a few removed rows is not copied), and only a row subset is gathered."""
    offset = 0
    for block in blocks:
        vectors, norms, live = block
        if rows is None:
            step = _chunk_rows(queries, vectors.shape[1], gathered=False)
            for start in range(0, len(vectors), step):
                stop = min(start + step, len(vectors))
                first, last = (start, stop) if live is None else np.searchsorted(live, [start, stop])
                keep = None if live is None else live[first:last] - start
                yield _Chunk(
                    vectors[start:stop],
                    None if norms is None else norms[start:stop],
                    keep,
                    np.arange(offset + first, offset + last),
                )
        else:
            mine = rows[(rows >= offset) & (rows < offset + block.size)]
            step = _chunk_rows(queries, vectors.shape[1], gathered=True)
            for start in range(0, len(mine), step):
                chunk = mine[start : start + step]
                physical = chunk - offset if live is None else live[chunk - offset]
                yield _Chunk(vectors[physical], None if norms is None else norms[physical], None, chunk)
        offset += block.size


def _take(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """values[q, index[q]] for every row q (take_along_axis without its per-call overhead)."""
    return values[np.arange(len(values))[:, None], index]


# ----------------------------------------------------------------------------------- selection


def _smallest(d2: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the k smallest of d2 (Q, c) and their column indices; ties at the cut go to
    the lower columns, so the final answer is the same however the gallery was chunked."""
    if d2.shape[1] <= k:
        return d2, np.broadcast_to(np.arange(d2.shape[1]), d2.shape)
    part = np.argpartition(d2, k - 1, axis=1)[:, :k]
    picked = _take(d2, part)
    cut = picked.max(axis=1, keepdims=True)
    # argpartition picks arbitrarily among values equal to the cut: redo those (rare) queries
    for q in np.flatnonzero((d2 == cut).sum(axis=1) > (picked == cut).sum(axis=1)):
        below = np.flatnonzero(d2[q] < cut[q])
        tied = np.flatnonzero(d2[q] == cut[q])[: k - len(below)]
        part[q] = np.concatenate([below, tied])
    return _take(d2, part), part


def _merge(parts: list, k: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Final top-k over the chunks' (squared distances, rows), sorted by (distance, row)."""
    if not parts:
        return np.zeros((queries, 0), np.int64), np.zeros((queries, 0), np.float32)
    d2 = np.concatenate([p[0] for p in parts], axis=1) if len(parts) > 1 else parts[0][0]
    rows = np.concatenate([p[1] for p in parts], axis=1) if len(parts) > 1 else parts[0][1]
    order = np.lexsort((rows, d2), axis=1)[:, :k]
    d2 = np.maximum(_take(d2, order), 0)
    return _take(rows, order).astype(np.int64), np.sqrt(d2).astype(np.float32)


# ------------------------------------------------------------------------------------- engines


def _numpy_candidates(blocks, queries, k, rows) -> list:
    """||x||^2 - 2 x.q + ||q||^2 per chunk: one matrix product (GEMV for one query) per chunk,
    reading the gallery once when the norms are precomputed."""
    query_norms = squared_norms(queries)
    parts = []
    for chunk in _chunks(blocks, rows, len(queries)):
        norms = squared_norms(chunk.data) if chunk.norms is None else chunk.norms
        # X @ Q.T rather than Q @ X.T: OpenBLAS is 1.5-2x faster with the gallery as the tall
        # left operand when Q is small (measured, docs/results/search.md)
        data = chunk.data
        d2 = (data @ queries[0])[None] if len(queries) == 1 else np.ascontiguousarray((data @ queries.T).T)
        d2 *= -2
        d2 += norms[None, :]
        d2 += query_norms[:, None]
        if chunk.keep is not None:
            d2 = d2[:, chunk.keep]
        values, local = _smallest(d2, k)
        parts.append((values, chunk.rows[local]))
    return parts


def _faiss_smallest(faiss, queries, block, k) -> tuple[np.ndarray, np.ndarray]:
    """faiss.knn on one block (no copy when contiguous), asking for more neighbours until the
    k-th distance is strictly below the last one returned, so that no tie at the cut is lost."""
    want = min(k + 1, len(block))
    while True:
        d2, local = faiss.knn(queries, block, want)
        if want == len(block) or (d2[:, k - 1] < d2[:, want - 1]).all():
            return d2, local
        want = min(2 * want, len(block))


def _faiss_candidates(blocks, queries, k, rows) -> list:
    import faiss  # optional: only this engine needs it

    parts = []
    for chunk in _chunks(blocks, rows, len(queries)):
        data = np.ascontiguousarray(chunk.data)
        if not len(data):
            continue
        if chunk.keep is None:
            d2, local = _faiss_smallest(faiss, queries, data, min(k, len(data)))
            parts.append((d2, chunk.rows[local]))
            continue
        # removed rows are in the block: ask for that many more, then drop them
        removed = len(data) - len(chunk.keep)
        d2, physical = _faiss_smallest(faiss, queries, data, min(k + removed, len(data)))
        column = np.full(len(data), -1)
        column[chunk.keep] = np.arange(len(chunk.keep))
        local = column[physical]
        parts.append((np.where(local >= 0, d2, np.inf), chunk.rows[np.maximum(local, 0)]))
    return parts


@functools.lru_cache(maxsize=1)
def _has_faiss() -> bool:
    return importlib.util.find_spec("faiss") is not None


def knn(
    vectors,
    queries: np.ndarray,
    k: int,
    rows: Optional[np.ndarray] = None,
    engine: str = "numpy",
    sq_norms: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by Euclidean distance.

    vectors: the gallery, float32 (N, D) (a memory map is fine; it is never copied whole) or a
    sequence of `Block`s; queries (Q, D) or (D,); rows: search only these gallery rows (any
    order, duplicates ignored); sq_norms: precomputed `squared_norms(vectors)` for an array
    gallery (blocks carry their own). Engine "auto" picks FAISS for a few queries (when
    installed) and numpy's BLAS for batches, whichever is faster. Returns (rows int64 (Q, k'),
    distances float32 (Q, k')), nearest first, k' = min(k, rows available), ties broken by the
    lower row. Memory stays within a few CHUNK_BYTES whatever N is.
    """
    blocks = _as_blocks(vectors, sq_norms)
    size = sum(b.size for b in blocks)
    if not blocks:
        raise ValueError("the gallery has no blocks")
    queries = _check_queries(queries, blocks[0].vectors.shape[1])
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if engine not in ENGINES:
        raise unknown_name("search engine", engine, ENGINES)
    rows = _check_rows(rows, size)
    k = min(int(k), size if rows is None else len(rows))
    if k == 0:
        return _merge([], 0, len(queries))
    if engine == "auto":
        engine = "faiss" if len(queries) <= AUTO_FAISS_MAX_QUERIES and _has_faiss() else "numpy"
    if engine == "faiss":
        parts = _faiss_candidates(blocks, queries, k, rows)
    else:
        parts = _numpy_candidates(blocks, queries, k, rows)
    return _merge(parts, k, len(queries))
