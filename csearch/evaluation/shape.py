"""Shape re-rankers that are not (yet) in csearch.search, for the ablation's shape study.

The paper re-orders the top-N KNN candidates by mask IoU alone. On in-store photos the masks
differ with pose and framing far more than between products of one category, so the study
also tries gentler uses of shape; each is a `Reranker` (see ranking.py):

    aspect_fused   (1 - w) * sim + w * aspect agreement min(a_q, a_g) / max(a_q, a_g), where a is
                   the box's width / height: a pose-robust shape cue (carton vs tub)
    iou_rrf        reciprocal-rank fusion of the KNN order and the IoU order (weight w on IoU):
                   rank-based, so it ignores how spread out the distances are
    iou_gate       re-order by IoU only the candidates within a distance margin w of the best
                   one: shape may only break near-ties

`sim` is the fused similarity of csearch.search ((d_max - d) / (d_max - d_min)). Box aspect
ratios come from the normalised boxes, so they are exact for square images (Grocery Store) and
approximate otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import unknown_name
from ..masks import mask_iou, mask_iou_cropped, pack_masks

KINDS = ("aspect_fused", "iou_rrf", "iou_gate")
RRF_K = 60.0  # the usual reciprocal-rank-fusion constant


def _similarity(distances: np.ndarray) -> np.ndarray:
    spread = distances.max() - distances.min()
    return (distances.max() - distances) / spread if spread > 0 else np.ones_like(distances)


def box_aspect(boxes: np.ndarray) -> np.ndarray:
    """Width / height of normalised (x0, y0, x1, y1) boxes (guarded against zero size)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.maximum(boxes[:, 2] - boxes[:, 0], 1e-6) / np.maximum(boxes[:, 3] - boxes[:, 1], 1e-6)


def aspect_agreement(query_box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """min / max of the two aspect ratios: 1 for the same proportions, towards 0 otherwise."""
    a, b = box_aspect(query_box)[0], box_aspect(boxes)
    return np.minimum(a, b) / np.maximum(a, b)


def order_by(scores: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Best score first, then smaller distance, then the given order."""
    return np.lexsort((np.arange(len(scores)), distances, -scores))


def aspect_fused(distances, query_box, boxes, weight: float) -> np.ndarray:
    distances = np.asarray(distances, np.float64)
    scores = (1 - weight) * _similarity(distances) + weight * aspect_agreement(query_box, boxes)
    return order_by(scores, distances)


def iou_rrf(distances, ious, weight: float) -> np.ndarray:
    distances = np.asarray(distances, np.float64)
    knn_rank = np.arange(1, len(distances) + 1)  # candidates arrive in KNN order
    iou_rank = np.empty(len(ious))
    iou_rank[np.lexsort((knn_rank, -np.asarray(ious)))] = np.arange(1, len(ious) + 1)
    scores = 1.0 / (RRF_K + knn_rank) + weight / (RRF_K + iou_rank)
    return order_by(scores, distances)


def iou_gate(distances, ious, weight: float) -> np.ndarray:
    """Candidates within `weight` (relative) of the best distance form the gate, ordered by IoU;
    the rest keep KNN order after them."""
    distances = np.asarray(distances, np.float64)
    if not len(distances):
        return np.zeros(0, np.int64)
    gate = distances <= distances.min() * (1.0 + weight)
    scores = np.where(gate, 1.0 + np.asarray(ious, np.float64), 0.0)
    return order_by(scores, distances)


def make_reranker(kind: str, weight: float, store, queries, crop: bool = False) -> Callable:
    """A ranking.Reranker for one experimental kind over the IndexStore `store` and `queries`
    (QueryFeatures)."""

    if kind not in KINDS:
        raise unknown_name("shape re-ranker", kind, KINDS)
    gallery = store.snapshot
    query_bits = pack_masks(queries.masks)
    bits, boxes = np.asarray(gallery.mask_bits), np.asarray(gallery.boxes)

    def ious(q, rows):
        if crop:
            return mask_iou_cropped(query_bits[q], queries.boxes[q], bits[rows], boxes[rows], gallery.mask_size)
        return mask_iou(query_bits[q], bits[rows])

    def reorder(q: int, rows: np.ndarray, distances: np.ndarray) -> np.ndarray:
        if kind == "aspect_fused":
            return aspect_fused(distances, queries.boxes[q], boxes[rows], weight)
        if kind == "iou_rrf":
            return iou_rrf(distances, ious(q, rows), weight)
        return iou_gate(distances, ious(q, rows), weight)

    return reorder
