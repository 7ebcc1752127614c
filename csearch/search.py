"""Search over an index snapshot: category restriction, exact KNN, then re-ranking.

`search_snapshot` is the one search path: `Engine.search` answers a query with it, and the
retrieval evaluation ranks every query with it (deeper), so the two cannot drift apart. The
exact KNN kernel is `csearch.knn`; mask geometry is `csearch.masks`.

The first `rerank_top` KNN candidates are re-ordered; results past them keep KNN order, with
the KNN score 1 / (1 + distance) and no IoU.

Re-ranking follows the paper: the top-N candidates are re-ordered by the IoU of their object
masks with the query's, compared bit-packed (`pack_masks`, the format the index stores). Scores are
"higher is better" for every method:

    none        1 / (1 + distance)                 order: distance
    iou         IoU of the full-frame S x S masks  order: IoU, then distance
    fused       (1 - w) * sim + w * IoU            order: score, then distance
                sim = (d_max - d) / (d_max - d_min) over the candidates (1 when all equal)
    iou_crop, fused_crop
                as iou / fused, with each mask first cropped to its box and resized to a common
                size, so IoU compares shapes rather than where and how big the object is in
                the frame (full-frame IoU penalises a product photographed off-centre).
    geometric   local features matched by ratio test + RANSAC homography (csearch.geometric):
                verified candidates (>= search.min_inliers inliers) first, by inliers, then the
                others by distance; score inliers + 1 / (1 + distance) when verified

The IoU of two empty masks is defined as 0: an empty mask means localization found nothing,
which is no evidence that two images show the same shape.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np

from .config import allowed_values
from .errors import ConfigError, unknown_name
from .geometric import LOCAL_FEATURES, index_local_spec, rerank_geometric
from .knn import knn
from .masks import mask_iou, mask_iou_cropped, pack_masks

if TYPE_CHECKING:
    from .config import SearchConfig

RERANK_METHODS = allowed_values("search.rerank")
MASK_METHODS = tuple(m for m in RERANK_METHODS if m != "geometric")  # what `rerank`/`rerank_with_masks` do


# ---------------------------------------------------------------------------------- re-ranking


def rerank(
    distances: np.ndarray, ious: Optional[np.ndarray] = None, method: str = "none", weight: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Re-order candidates (n,) best first: returns (order int64 (n,), scores float32 (n,)),
    scores[i] belonging to candidate order[i]. See the module docstring for each method; the
    `_crop` methods order like their base, given IoUs from `mask_iou_cropped`. Remaining ties
    keep the candidates' given order."""
    if method == "geometric":
        raise ValueError("geometric re-ranking compares local features, not IoUs: see geometric.rerank_geometric")
    if method not in MASK_METHODS:
        raise unknown_name("re-ranking method", method, MASK_METHODS)
    distances = np.asarray(distances, np.float64).reshape(-1)
    position = np.arange(len(distances))
    base = method.removesuffix("_crop")
    if base == "none":
        scores = 1.0 / (1.0 + distances)
        order = np.lexsort((position, distances))
        return order, scores[order].astype(np.float32)
    if ious is None or np.shape(ious) != distances.shape:
        raise ValueError(f"re-ranking by {method!r} needs one IoU per candidate ({len(distances)})")
    ious = np.asarray(ious, np.float64)
    if base == "iou":
        scores = ious
    else:
        if not 0.0 <= weight <= 1.0:
            raise ConfigError(f"the fused re-ranking weight must lie in [0, 1], got {weight!r}")
        spread = distances.max() - distances.min() if len(distances) else 0.0
        similarity = (distances.max() - distances) / spread if spread > 0 else np.ones_like(distances)
        scores = (1.0 - weight) * similarity + weight * ious
    order = np.lexsort((position, distances, -scores))
    return order, scores[order].astype(np.float32)


def rerank_with_masks(
    distances: np.ndarray,
    query_bits: np.ndarray,
    query_box: np.ndarray,
    bits: np.ndarray,
    boxes: np.ndarray,
    mask_size: int,
    method: str = "none",
    weight: float = 0.5,
    crop_size: int = 32,
):
    """`rerank` with the IoUs the method needs: returns (order, scores, ious in that order, or
    None for method "none"). bits/boxes are the candidates' packed masks and boxes."""
    if method == "geometric":
        raise ValueError("geometric re-ranking compares local features, not masks: see geometric.rerank_geometric")
    if method not in MASK_METHODS:
        raise unknown_name("re-ranking method", method, MASK_METHODS)
    if method == "none":
        order, scores = rerank(distances, None, method)
        return order, scores, None
    if method.endswith("_crop"):
        ious = mask_iou_cropped(query_bits, query_box, bits, boxes, mask_size, crop_size)
    else:
        ious = mask_iou(query_bits, bits)
    order, scores = rerank(distances, ious, method, weight)
    return order, scores, ious[order]


# ---------------------------------------------------------------------------------- search

# (candidate snapshot rows, their distances) -> new order of the candidates: an experimental
# re-ranker (the evaluation's shape study) in place of the configured method
Reorder = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Ranking:
    """One query's results, best first, as snapshot rows and per-result values."""

    rows: np.ndarray  # int64 (n,) snapshot rows
    ids: np.ndarray  # int64 (n,) item ids
    distances: np.ndarray  # float32 (n,) Euclidean
    scores: np.ndarray  # float32 (n,) the ranking key, higher is better (module docstring)
    ious: np.ndarray  # float32 (n,) mask IoU with the query; NaN where masks were not compared
    timings: dict  # {"search": ms (restriction + KNN), "rerank": ms}

    def __len__(self) -> int:
        return len(self.rows)


def allowed_rows(
    snapshot, categories: Optional[Sequence[str]], exclude_ids: Iterable[int] = ()
) -> Optional[np.ndarray]:
    """Ascending snapshot rows a query may return: those of `categories` (all when empty or
    None) minus the items `exclude_ids` (ids not in the snapshot are ignored); None: every row."""
    rows = snapshot.rows_for_categories(categories) if categories else None
    exclude = np.fromiter((int(i) for i in exclude_ids), np.int64)
    if len(exclude) and len(snapshot):
        ids = snapshot.ids  # ascending, as the snapshot keeps them
        where = np.minimum(np.searchsorted(ids, exclude), len(ids) - 1)
        keep = np.ones(len(snapshot), bool)
        keep[where[ids[where] == exclude]] = False
        rows = np.flatnonzero(keep) if rows is None else rows[keep[rows]]
    return rows


def search_snapshot(
    snapshot,
    vector: np.ndarray,
    mask: np.ndarray,
    box: Optional[np.ndarray] = None,
    *,
    k: int,
    settings: SearchConfig,
    categories: Optional[Sequence[str]] = None,
    exclude_ids: Iterable[int] = (),
    reorder: Optional[Reorder] = None,
    local_features: Optional[np.ndarray] = None,
) -> Ranking:
    """The k best items of `snapshot` for one query: restriction to `categories` minus
    `exclude_ids`, exact KNN (`settings.engine`; over the ANN's candidates and the items added
    since, when the index has an ANN and no category restricts the search: `store.ann`), then
    the first `settings.rerank_top` candidates re-ordered by `settings.rerank` (or by `reorder`).

    vector: the query's (D,) vector; mask: its bool (S, S) object mask or the packed bits of one
    (`pack_masks`); box: its normalised box (None: the whole frame); local_features: the query's
    `geometric` record, needed by rerank geometric (the index must store them too).
    """
    if settings.rerank == "geometric" and reorder is None:
        index_local_spec(snapshot.meta)  # one-line ConfigError when the index has none
        if local_features is None:
            raise ConfigError("search.rerank geometric needs the query's local features (csearch.geometric.extract)")
    started = time.perf_counter()
    rows = allowed_rows(snapshot, categories, exclude_ids)
    reranking = reorder is not None or settings.rerank != "none"
    depth = max(k, settings.rerank_top) if reranking else k
    if len(snapshot) == 0 or (rows is not None and len(rows) == 0):
        found, distances = np.zeros(0, np.int64), np.zeros(0, np.float32)
    else:
        # an unrestricted search on an index with an ANN (store.ann) ranks only its candidates,
        # plus the items added since it was built, exactly; category-restricted searches stay exact
        ann = None if categories else getattr(snapshot, "ann", None)
        candidates = None if ann is None else ann.candidate_rows(np.asarray(vector, np.float32), depth, rows)
        rows = rows if candidates is None else candidates
        found, distances = knn(snapshot.blocks(), np.asarray(vector)[None], depth, rows=rows, engine=settings.engine)
        found, distances = found[0], distances[0]
    searched = time.perf_counter()
    top = min(settings.rerank_top, len(found)) if reranking else 0
    scores = (1.0 / (1.0 + distances.astype(np.float64))).astype(np.float32)  # KNN order's scores
    ious = np.full(len(found), np.nan, np.float32)
    if top:
        order, top_scores, top_ious = _rerank_top(
            snapshot, found[:top], distances[:top], mask, box, settings, reorder, local_features
        )
        found = np.concatenate([found[:top][order], found[top:]])
        distances = np.concatenate([distances[:top][order], distances[top:]])
        scores[:top] = scores[:top][order] if top_scores is None else top_scores
        if top_ious is not None:
            ious[:top] = top_ious
    found, distances, scores, ious = found[:k], distances[:k], scores[:k], ious[:k]
    ids = snapshot.gather("ids", found)  # not snapshot.ids: that builds the whole column
    timings = {"search": (searched - started) * 1e3, "rerank": (time.perf_counter() - searched) * 1e3}
    return Ranking(found, ids, distances, scores, ious, timings)


def _rerank_top(
    snapshot,
    rows: np.ndarray,
    distances: np.ndarray,
    mask: np.ndarray,
    box: Optional[np.ndarray],
    settings: SearchConfig,
    reorder: Optional[Reorder],
    local_features: Optional[np.ndarray] = None,
):
    """(order, scores or None, IoUs or None) of the candidates to re-rank; a `reorder` gives
    the order only (its candidates keep their KNN scores)."""
    if reorder is not None:
        return np.asarray(reorder(rows, distances)), None, None
    if settings.rerank == "geometric":
        candidates = snapshot.gather(LOCAL_FEATURES, rows)
        order, scores, _ = rerank_geometric(distances, local_features, candidates, settings.min_inliers)
        return order, scores, None
    mask = np.asarray(mask)
    query_bits = pack_masks(mask[None])[0] if mask.dtype == bool else mask
    query_box = np.array([0, 0, 1, 1], np.float32) if box is None else box
    return rerank_with_masks(
        distances,
        query_bits,
        query_box,
        snapshot.gather("masks", rows),
        snapshot.gather("boxes", rows),
        snapshot.mask_size,
        method=settings.rerank,
        weight=settings.rerank_weight,
    )
