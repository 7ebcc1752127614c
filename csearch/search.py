"""Search over an index snapshot: category restriction, exact KNN, then re-ranking.

The exact KNN kernel is `csearch.knn`; mask geometry is `csearch.masks`.

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

The IoU of two empty masks is defined as 0: an empty mask means localization found nothing,
which is no evidence that two images show the same shape.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .errors import unknown_name
from .masks import mask_iou, mask_iou_cropped

RERANK_METHODS = ("none", "iou", "fused", "iou_crop", "fused_crop")


# ---------------------------------------------------------------------------------- re-ranking

def rerank(distances: np.ndarray, ious: Optional[np.ndarray] = None, method: str = "none",
           weight: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Re-order candidates (n,) best first: returns (order int64 (n,), scores float32 (n,)),
    scores[i] belonging to candidate order[i]. See the module docstring for each method; the
    `_crop` methods order like their base, given IoUs from `mask_iou_cropped`. Remaining ties
    keep the candidates' given order."""
    if method not in RERANK_METHODS:
        raise unknown_name("re-ranking method", method, RERANK_METHODS)
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
            raise ValueError(f"the fused re-ranking weight must lie in [0, 1], got {weight!r}")
        spread = distances.max() - distances.min() if len(distances) else 0.0
        similarity = (distances.max() - distances) / spread if spread > 0 else np.ones_like(distances)
        scores = (1.0 - weight) * similarity + weight * ious
    order = np.lexsort((position, distances, -scores))
    return order, scores[order].astype(np.float32)


def rerank_with_masks(distances: np.ndarray, query_bits: np.ndarray, query_box: np.ndarray,
                      bits: np.ndarray, boxes: np.ndarray, mask_size: int, method: str = "none",
                      weight: float = 0.5, crop_size: int = 32):
    """`rerank` with the IoUs the method needs: returns (order, scores, ious in that order, or
    None for method "none"). bits/boxes are the candidates' packed masks and boxes."""
    if method not in RERANK_METHODS:
        raise unknown_name("re-ranking method", method, RERANK_METHODS)
    if method == "none":
        order, scores = rerank(distances, None, method)
        return order, scores, None
    if method.endswith("_crop"):
        ious = mask_iou_cropped(query_bits, query_box, bits, boxes, mask_size, crop_size)
    else:
        ious = mask_iou(query_bits, bits)
    order, scores = rerank(distances, ious, method, weight)
    return order, scores, ious[order]
