"""Geometric re-ranking: local features (OpenCV ORB or RootSIFT), ratio-test matching and a RANSAC
homography, so the candidates that show the same printed object as the query come first.

An image's local features are one fixed-size uint8 record (`record_bytes`), so an index stores
them as one array row per item (the extras column "local_features")::

    bytes 0-1   uint16 little-endian: n, the keypoints present (<= K)
    byte  2     the kind: 1 = orb, 2 = sift
    byte  3     the record format (1)
    4 .. 4+4K   K x (x, y) as uint16, in 1/8 px of the keypoint image (unused slots are zero)
    .. end      K x B descriptor bytes: ORB 32 (256 bits); SIFT 64: RootSIFT (L1 normalised,
                square root) quantised to 4 bits (value x ROOT_SCALE, at most 15), two per byte

Keypoints are detected in the object's box (the localizer's, with localize.margin) of the image
the localizer saw, in gray, shrunk to at most SIDE px. 4-bit RootSIFT halves the bytes of
OpenCV's 8-bit SIFT at a cost of 2 of 296 Grocery queries (docs/results/geometric.md). SIFT is
compared by Euclidean distance of the (re-normalised) RootSIFT vectors, ORB by Hamming distance;
both as one matrix product per candidate (ORB bits as +-1), then Lowe's ratio test and a mutual
nearest-neighbour check, then `cv2.findHomography` (RANSAC, RANSAC_PX) counts inliers.

Fusion (`rerank_geometric`): a candidate with at least `min_inliers` inliers is verified.
Verified candidates come first, by inliers, then by distance; the others keep the KNN order.
Score = inliers + 1 / (1 + distance) when verified, else 1 / (1 + distance), so it is higher is
better and follows the order. Produce without print (fruit, vegetables) rarely verifies, so it
keeps the global order instead of being reshuffled by chance matches.

Cost gates: a query or candidate with fewer than `min_inliers` keypoints, or a pair with fewer
tentative matches, is not sent to RANSAC. An early stop (STOP_FACTOR: once a candidate reaches
STOP_FACTOR x min_inliers inliers the later ones are not matched) is off: on the Grocery data it
skipped 1.4 of 20 pairs per query at 4x, and at 2x 3.2 pairs for 0.011 Recall@1 lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from .errors import ConfigError, unknown_name

LOCAL_FEATURES = "local_features"  # the extras column, and the index meta key recording its LocalSpec
KIND_CODES = {"orb": 1, "sift": 2}
DESCRIPTOR_BYTES = {"orb": 32, "sift": 64}
ROOT_SCALE = 50.0  # 4-bit RootSIFT: round(value x ROOT_SCALE), clipped to 15 (values above 0.3 are rare)
HEADER = 4
FORMAT = 1
QUANT = 8  # keypoint coordinates are stored in 1/QUANT px
SIDE = 384  # keypoints are detected with the box's longer side shrunk to at most this
RATIO = 0.8  # Lowe's ratio test: best distance < RATIO x second best
MUTUAL = True  # keep only mutual nearest neighbours
RANSAC_PX = 5.0  # RANSAC reprojection threshold, px of the keypoint image
RANSAC_ITERS = 300  # as good as 1000 on the Grocery data, and ~20 % faster per pair
STOP_FACTOR = None  # a candidate with STOP_FACTOR x min_inliers inliers ends the matching (None: never)


@dataclass(frozen=True)
class LocalSpec:
    """Which local features an index stores: the kind and at most how many per image."""

    kind: str  # orb | sift
    keypoints: int

    def __post_init__(self) -> None:
        if self.kind not in KIND_CODES:
            raise unknown_name("local feature kind", self.kind, KIND_CODES)
        if not 1 <= int(self.keypoints) <= 65535:
            raise ConfigError(f"keypoints must lie in [1, 65535], got {self.keypoints!r}")

    @property
    def record_bytes(self) -> int:
        return record_bytes(self.kind, self.keypoints)

    @classmethod
    def from_config(cls, search) -> LocalSpec:
        """From a `SearchConfig` (search.geometric_features, search.keypoints)."""
        return cls(search.geometric_features, int(search.keypoints))

    def to_meta(self) -> dict:
        return {"kind": self.kind, "keypoints": self.keypoints, "record_bytes": self.record_bytes}

    @classmethod
    def from_meta(cls, value) -> Optional[LocalSpec]:
        """The spec an index records under meta["local_features"] (None: the index has none)."""
        return None if not value else cls(str(value["kind"]), int(value["keypoints"]))


def record_bytes(kind: str, keypoints: int) -> int:
    """Bytes of one image's record: the header, K coordinates and K descriptors."""
    return HEADER + keypoints * (4 + DESCRIPTOR_BYTES[kind])


# ---------------------------------------------------------------------------------- extraction


def _detector(kind: str, keypoints: int):
    if kind == "sift":
        return cv2.SIFT_create(nfeatures=keypoints)
    # a lower FAST threshold than OpenCV's 20 finds enough corners on low-contrast packaging
    return cv2.ORB_create(nfeatures=keypoints, fastThreshold=10)


def keypoint_image(image: np.ndarray, box=None, margin: float = 0.0) -> np.ndarray:
    """The gray uint8 image keypoints are detected in: the box (pixels, exclusive end; None or
    empty: the whole image) grown by `margin`, shrunk so its longer side is at most SIDE."""
    from .preprocess import downscale_max_side, expand_box

    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if box is not None:
        x0, y0, x1, y1 = expand_box(tuple(int(v) for v in box), image.shape[:2], margin)
        if x1 > x0 and y1 > y0:
            image = image[y0:y1, x0:x1]
    return np.ascontiguousarray(downscale_max_side(image, SIDE))


def detect(gray: np.ndarray, kind: str, keypoints: int) -> tuple[np.ndarray, np.ndarray]:
    """The strongest <= `keypoints` keypoints of a gray image, strongest first: (points float32
    (n, 2), descriptors uint8 (n, B) as a record stores them, see `compact`)."""
    found, descriptors = _detector(kind, keypoints).detectAndCompute(gray, None)
    if descriptors is None or not found:
        return np.zeros((0, 2), np.float32), np.zeros((0, DESCRIPTOR_BYTES[kind]), np.uint8)
    # strongest first (so a record's first k keypoints are the k best); SIFT may keep a few more
    # than asked on tied responses
    keep = np.argsort([-k.response for k in found], kind="stable")[:keypoints]
    found, descriptors = [found[i] for i in keep], descriptors[keep]
    points = np.array([k.pt for k in found], np.float32).reshape(-1, 2)
    return points, compact(kind, descriptors)


def compact(kind: str, descriptors: np.ndarray) -> np.ndarray:
    """OpenCV's descriptors as a record stores them: ORB as is; SIFT (float, 128 values) as
    4-bit RootSIFT, two values per byte (uint8 (n, 64))."""
    if kind == "orb":
        return np.asarray(descriptors, np.uint8)
    values = np.asarray(descriptors, np.float32)
    root = np.sqrt(values / np.maximum(values.sum(axis=1, keepdims=True), 1e-6))
    nibbles = np.clip(np.rint(root * ROOT_SCALE), 0, 15).astype(np.uint8)
    return (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]


def encode(points: np.ndarray, descriptors: np.ndarray, spec: LocalSpec) -> np.ndarray:
    """One record (uint8 (record_bytes,)) of up to spec.keypoints points and descriptors."""
    n = min(len(points), spec.keypoints)
    k, width = spec.keypoints, DESCRIPTOR_BYTES[spec.kind]
    record = np.zeros(spec.record_bytes, np.uint8)
    record[:HEADER] = (n & 0xFF, n >> 8, KIND_CODES[spec.kind], FORMAT)
    xy = np.zeros((k, 2), "<u2")
    xy[:n] = np.clip(np.rint(np.asarray(points[:n]) * QUANT), 0, 65535)
    record[HEADER : HEADER + 4 * k] = xy.view(np.uint8).reshape(-1)
    descs = np.zeros((k, width), np.uint8)
    descs[:n] = descriptors[:n]
    record[HEADER + 4 * k :] = descs.reshape(-1)
    return record


def decode(record: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    """(kind, points float32 (n, 2), descriptors uint8 (n, B)) of one record."""
    record = np.asarray(record, np.uint8).reshape(-1)
    if len(record) < HEADER or record[3] != FORMAT or int(record[2]) not in KIND_CODES.values():
        raise ValueError("not a local-features record (csearch.geometric)")
    kind = next(name for name, code in KIND_CODES.items() if code == record[2])
    width = DESCRIPTOR_BYTES[kind]
    k, n = (len(record) - HEADER) // (4 + width), int(record[0]) | int(record[1]) << 8
    if len(record) != record_bytes(kind, k) or n > k:
        raise ValueError(f"a {kind} local-features record of {len(record)} bytes is malformed")
    xy = record[HEADER : HEADER + 4 * k].view("<u2").reshape(k, 2)[:n].astype(np.float32) / QUANT
    descriptors = record[HEADER + 4 * k :].reshape(k, width)[:n]
    return kind, xy, descriptors


def extract(image: np.ndarray, spec: LocalSpec, box=None, margin: float = 0.0) -> np.ndarray:
    """The local-features record of an RGB (or gray) uint8 image, detected in `box`."""
    return encode(*detect(keypoint_image(image, box, margin), spec.kind, spec.keypoints), spec)


# ---------------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class _Prepared:
    """One image's features ready to match: points and the float matrix its descriptors become."""

    kind: str
    points: np.ndarray
    matrix: np.ndarray  # float32 (n, D): RootSIFT (unit L2 norm) or ORB bits as +-1


def _prepare(record: np.ndarray) -> _Prepared:
    kind, points, descriptors = decode(record)
    if kind == "sift":  # 4-bit RootSIFT back to unit vectors
        matrix = np.empty((len(descriptors), 2 * descriptors.shape[1]), np.float32)
        matrix[:, 0::2], matrix[:, 1::2] = descriptors >> 4, descriptors & 15
        matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-6)
    else:
        matrix = np.unpackbits(descriptors, axis=1).astype(np.float32) * 2.0 - 1.0
    return _Prepared(kind, points, matrix)


def _matches(query: _Prepared, candidate: _Prepared) -> tuple[np.ndarray, np.ndarray]:
    """Indices (query, candidate) of the pairs that pass the ratio test and are mutual nearest
    neighbours."""
    if len(query.points) < 2 or len(candidate.points) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    similarity = query.matrix @ candidate.matrix.T  # (nq, nc); the nearest is the most similar
    rows = np.arange(len(similarity))
    best = np.argmax(similarity, axis=1)
    first = similarity[rows, best]
    similarity[rows, best] = -np.inf
    second = similarity.max(axis=1)
    similarity[rows, best] = first
    if query.kind == "sift":  # unit vectors: squared distance 2 - 2 s
        passed = 1.0 - first < RATIO**2 * (1.0 - second)
    else:  # Hamming distance of +-1 vectors: (bits - s) / 2
        bits = query.matrix.shape[1]
        passed = bits - first < RATIO * (bits - second)
    if MUTUAL:
        passed &= np.argmax(similarity, axis=0)[best] == rows
    keep = np.flatnonzero(passed)
    return keep, best[keep]


def inliers(query: np.ndarray, candidate: np.ndarray, min_inliers: int = 4) -> tuple[int, Optional[np.ndarray]]:
    """(RANSAC inliers, homography mapping the candidate's keypoints onto the query's or None) of
    two records; 0 when fewer than max(4, min_inliers) matches pass the ratio and mutual tests."""
    return _verify(_prepare(query), _prepare(candidate), min_inliers)


def _verify(query: _Prepared, candidate: _Prepared, min_inliers: int) -> tuple[int, Optional[np.ndarray]]:
    if query.kind != candidate.kind:
        raise ValueError(f"cannot match {query.kind} features against {candidate.kind} ones")
    if min(len(query.points), len(candidate.points)) < max(4, min_inliers):
        return 0, None
    q, c = _matches(query, candidate)
    if len(q) < max(4, min_inliers):
        return 0, None
    homography, mask = cv2.findHomography(
        candidate.points[c], query.points[q], cv2.RANSAC, RANSAC_PX, maxIters=RANSAC_ITERS, confidence=0.995
    )
    if homography is None or mask is None:
        return 0, None
    return int(mask.sum()), homography


def rerank_geometric(
    distances: np.ndarray, query: np.ndarray, candidates: np.ndarray, min_inliers: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-order candidates (n,) by geometric verification: returns (order int64 (n,), scores
    float32 (n,), inliers int32 (n,)), scores and inliers in that order (-1: not matched, after
    an early stop). `query` is the query's record, `candidates` uint8 (n, R) theirs (module
    docstring: fusion and cost gates)."""
    distances = np.asarray(distances, np.float64).reshape(-1)
    n = len(distances)
    if len(candidates) != n:
        raise ValueError(f"geometric re-ranking needs one local-features record per candidate ({n})")
    counts = np.full(n, -1, np.int32)
    prepared = _prepare(query)
    stop = None if STOP_FACTOR is None else STOP_FACTOR * min_inliers
    if len(prepared.points) >= max(4, min_inliers):
        for i in range(n):
            counts[i] = _verify(prepared, _prepare(candidates[i]), min_inliers)[0]
            if stop is not None and counts[i] >= stop:
                break
    order, scores = fuse(distances, counts, min_inliers)
    return order, scores, counts[order]


def fuse(distances: np.ndarray, counts: np.ndarray, min_inliers: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, scores in that order) of candidates with KNN `distances` and RANSAC inlier
    `counts`: the verified (>= min_inliers) first by inliers then distance, the rest by distance."""
    distances, counts = np.asarray(distances, np.float64), np.asarray(counts)
    verified = counts >= min_inliers
    similarity = 1.0 / (1.0 + distances)
    scores = np.where(verified, counts + similarity, similarity)
    order = np.lexsort((np.arange(len(distances)), distances, -np.where(verified, counts, 0), ~verified))
    return order, scores[order].astype(np.float32)


def index_local_spec(meta: dict) -> LocalSpec:
    """The local features an index stores (its meta["local_features"]); a one-line ConfigError
    naming how to rebuild when it has none."""
    spec = LocalSpec.from_meta(meta.get(LOCAL_FEATURES))
    if spec is None:
        raise ConfigError(
            "search.rerank geometric needs an index built with local features; rebuild it with "
            "`csearch index CATALOGUE --out INDEX_DIR --overwrite --set search.rerank=geometric`"
        )
    return spec
