"""Plain data passed between pipeline stages.

Conventions (see STYLE.md): images are uint8 (H, W, 3) RGB, masks are bool (H, W), alpha
mattes are float32 (H, W) in [0, 1], feature vectors are float32 (N, D).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class Record:
    """One catalogue image. `category`/`product` are None when unlabelled."""

    path: str
    category: Optional[str] = None
    product: Optional[str] = None


@dataclass(frozen=True)
class Localization:
    """What a localizer found in one image, at the image's own resolution.

    `produced_by` names what actually produced it (e.g. "u2net+pymatting", "classical"), so a
    fallback is never silent. `box` is (x0, y0, x1, y1) in pixels, exclusive end, of the mask.
    """

    alpha: np.ndarray  # float32 (H, W) in [0, 1]
    mask: np.ndarray  # bool (H, W)
    cutout: np.ndarray  # uint8 (H, W, 3): the object composited onto white
    produced_by: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Prediction:
    """A category prediction: the best class and the top classes with their probabilities."""

    category: str
    probability: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Hit:
    """One search result. `distance` is Euclidean (not squared); `score` is the final ranking
    key, higher is better; `iou` is None when masks were not compared; `missing` is True when
    the catalogue image at `path` has gone since it was indexed (the hit is still returned)."""

    id: int
    path: str
    product: Optional[str]
    category: Optional[str]
    distance: float
    iou: Optional[float]
    score: float
    missing: bool = False

    def to_dict(self) -> dict:
        return {
            "id": int(self.id),
            "path": self.path,
            "product": self.product,
            "category": self.category,
            "distance": float(self.distance),
            "iou": None if self.iou is None else float(self.iou),
            "score": float(self.score),
            "missing": bool(self.missing),
        }


@dataclass(frozen=True)
class QueryResult:
    """The answer to one query: the category searched (None when unrestricted), the hits best
    first, and the time spent in each stage in milliseconds."""

    category: Optional[str]
    hits: tuple[Hit, ...]
    timings_ms: dict = field(default_factory=dict)
    localization: Optional[Localization] = None

    def to_dict(self) -> dict:
        return {
            "category": self.category,
            "results": [h.to_dict() for h in self.hits],
            "timings_ms": {k: round(float(v), 3) for k, v in self.timings_ms.items()},
        }
