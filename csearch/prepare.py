"""One image through the per-image stages: localization, the model inputs of each view, the
stored mask and box (`prepare_image`), and the index vector of prepared images (`embed_prepared`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .config import Config
from .preprocess import downscale_max_side, model_input
from .types import Localization

log = logging.getLogger("csearch")


@dataclass(frozen=True)
class Prepared:
    """One image after localization: what the extractor, classifier and re-ranker consume."""

    extractor_input: np.ndarray  # uint8 (S, S, 3): the object cut-out
    classifier_input: Optional[np.ndarray]  # uint8, the classifier's own size/colour
    mask: np.ndarray  # bool (mask_size, mask_size), full frame
    box: np.ndarray  # float32 (4,) normalised x0, y0, x1, y1
    localization: Localization
    timings_ms: dict = field(default_factory=dict)
    photo_input: Optional[np.ndarray] = None  # uint8 (S, S, 3): the whole photo (embed.views)
    local_features: Optional[np.ndarray] = None  # uint8 record of keypoints + descriptors (csearch.geometric)


def photo_view(config: Config) -> bool:
    """Whether every image is also embedded whole, next to its cut-out (embed.views). Without
    localization the cut-out is the photo, so there is one view."""
    return config.embed.views == "cutout+photo" and config.localize.method != "none"


def vector_dim(config: Config, extractor) -> int:
    """Length of an index vector: the extractor's, once per view."""
    return int(extractor.dim) * (2 if photo_view(config) else 1)


def embed_prepared(extractor, prepared: Sequence[Prepared], config: Config) -> np.ndarray:
    """Index/query vectors of prepared images: the cut-out, and with embed.views = cutout+photo
    the whole photo too (embed.combine_views), float32 (N, vector_dim)."""
    from .embed import combine_views, embed_batches

    batch, normalize = config.embed.batch_size, config.embed.normalize
    cutouts = embed_batches(extractor, np.stack([p.extractor_input for p in prepared]), batch, normalize)
    if not photo_view(config):
        return cutouts
    photos = embed_batches(extractor, np.stack([p.photo_input for p in prepared]), batch, normalize)
    return combine_views(cutouts, photos, config.embed.photo_weight)


def prepare_image(image: np.ndarray, config: Config, localizer, classifier=None, local=None) -> Prepared:
    """Localize and cut out the object, then build the model inputs and the compact mask; with
    `local` (a `geometric.LocalSpec`) also the local features of the object's box in the photo."""
    from .masks import resize_mask

    started = time.perf_counter()
    image = downscale_max_side(image, config.preprocess.work_side)
    loc = localizer(image)
    localized = time.perf_counter()
    box = loc.box if config.localize.crop else None
    size, color = config.preprocess.image_size, config.preprocess.color
    extractor_input = model_input(loc.cutout, size, color, box, config.localize.margin)
    photo_input = None
    if photo_view(config):
        # padded to a square like the cut-out, so both views keep the object's aspect ratio
        photo_input = model_input(image, size, color, (0, 0, image.shape[1], image.shape[0]))
    classifier_input = None
    if classifier is not None:
        # the whole photo classifies far better than the cut-out (0.753 vs 0.547 top-1 on the
        # Grocery val photos, docs/results/retrieval.md); "cutout" keeps the paper's order
        if config.classify.input == "cutout":
            classifier_input = model_input(
                loc.cutout, classifier.image_size, classifier.color, box, config.localize.margin
            )
        else:  # "photo" (the config allows no other value)
            classifier_input = model_input(image, classifier.image_size, classifier.color)
    height, width = image.shape[:2]
    x0, y0, x1, y1 = loc.box
    norm_box = np.array([x0 / width, y0 / height, x1 / width, y1 / height], np.float32)
    mask = resize_mask(loc.mask, config.search.mask_size)
    timings = {"localize": (localized - started) * 1e3, "prepare": (time.perf_counter() - localized) * 1e3}
    local_features = None
    if local is not None:
        from .geometric import extract

        prepared = time.perf_counter()
        local_features = extract(image, local, loc.box, config.localize.margin)
        timings["local_features"] = (time.perf_counter() - prepared) * 1e3
    return Prepared(extractor_input, classifier_input, mask, norm_box, loc, timings, photo_input, local_features)
