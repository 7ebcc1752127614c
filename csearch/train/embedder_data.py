"""The embedder's training data: each catalogue image localized (cached), cut into the views the
index embeds (the object cut-out and the whole photo), plus seeded augmented copies, run through
the frozen backbone trunk and pooled. Only the pooled vectors are kept, cached on disk per chunk of
images, so a rerun (or a resumed run) skips the backbone.

Copy 0 of every image is exactly what `csearch index` embeds (`prepare.prepare_image`); copies
1..n are augmented: a random crop around the object (zoom, shift), a rotation, a horizontal flip
and colour jitter, as the paper augments its classifier's input.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..config import Config
from ..preprocess import WHITE, downscale_max_side, load_image, model_input
from ..types import Record
from .embedder_config import EmbedderConfig

log = logging.getLogger("csearch")
CHUNK = 64  # images per cache file (an interrupted run loses at most one chunk of backbone work)
VIEW_NAMES = ("cutout", "photo")


@dataclass(frozen=True)
class Features:
    """Pooled trunk features of every image: float32 (images, 1 + copies, 2 views, C); view 0 is
    the cut-out, view 1 the whole photo; copy 0 is the un-augmented image. `ok` marks the images
    that decoded (the others are all zero and left out of training)."""

    vectors: np.ndarray
    ok: np.ndarray
    failures: list[tuple[str, str]]


def _jitter_colour(image: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    if amount <= 0:
        return image
    x = image.astype(np.float32)
    gray = x.mean(axis=2, keepdims=True)
    x = gray + (x - gray) * (1 + rng.uniform(-amount, amount))  # saturation
    x = x.mean() + (x - x.mean()) * (1 + rng.uniform(-amount, amount))  # contrast
    x = x * (1 + rng.uniform(-amount, amount))  # brightness
    return np.clip(x, 0, 255).astype(np.uint8)


def augment(
    image: np.ndarray, box: tuple[int, int, int, int], rng: np.random.Generator, config: EmbedderConfig, fill: bool
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One random view of `image` around `box` (x0, y0, x1, y1): (the new image, the new box).
    `fill`: pad rotations with white (a cut-out on white) instead of reflecting the photo."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = box
    box_w, box_h = max(1, x1 - x0), max(1, y1 - y0)
    scale = 1.0 + rng.uniform(-config.zoom, config.zoom)
    cx = (x0 + x1) / 2 + rng.uniform(-config.shift, config.shift) * box_w
    cy = (y0 + y1) / 2 + rng.uniform(-config.shift, config.shift) * box_h
    if config.rotation > 0:
        angle = rng.uniform(-config.rotation, config.rotation)
        matrix = cv2.getRotationMatrix2D((float(cx), float(cy)), float(angle), 1.0)
        border = cv2.BORDER_CONSTANT if fill else cv2.BORDER_REFLECT_101
        image = cv2.warpAffine(image, matrix, (width, height), borderMode=border, borderValue=(WHITE,) * 3)
    half_w, half_h = box_w * scale / 2, box_h * scale / 2
    new_box = (
        int(max(0, round(cx - half_w))),
        int(max(0, round(cy - half_h))),
        int(min(width, round(cx + half_w))),
        int(min(height, round(cy + half_h))),
    )
    if new_box[2] - new_box[0] < 2 or new_box[3] - new_box[1] < 2:
        new_box = (0, 0, width, height)
    if config.flip and rng.random() < 0.5:
        image = image[:, ::-1]
        new_box = (width - new_box[2], new_box[1], width - new_box[0], new_box[3])
    return _jitter_colour(np.ascontiguousarray(image), rng, config.color), new_box


def image_views(image: np.ndarray, localizer, index_config: Config, config: EmbedderConfig, seed: int) -> np.ndarray:
    """uint8 (1 + copies, 2, S, S, 3): every copy of both views of one decoded image."""
    from ..prepare import prepare_image

    prepared = prepare_image(image, index_config, localizer)
    work = downscale_max_side(image, index_config.preprocess.work_side)
    size, color = index_config.preprocess.image_size, index_config.preprocess.color
    margin = index_config.localize.margin
    photo = prepared.photo_input
    if photo is None:  # views: cutout only, or no localization: the photo view as the index would make it
        photo = model_input(work, size, color, (0, 0, work.shape[1], work.shape[0]))
    out = [[prepared.extractor_input, photo]]
    rng = np.random.default_rng([seed, zlib.crc32(work.tobytes()[:65536])])
    full = (0, 0, work.shape[1], work.shape[0])
    for _ in range(config.copies):
        cut_image, cut_box = augment(prepared.localization.cutout, prepared.localization.box, rng, config, fill=True)
        photo_image, photo_box = augment(work, full, rng, config, fill=False)
        photo_box = photo_box if config.zoom < 1 else full
        out.append(
            [
                model_input(cut_image, size, color, cut_box, margin),
                model_input(photo_image, size, color, photo_box),
            ]
        )
    return np.asarray(out, np.uint8)


def pooled_features(
    records: Sequence[Record],
    localizer,
    trunk,
    pooling,
    preprocess: Callable[[np.ndarray], np.ndarray],
    index_config: Config,
    config: EmbedderConfig,
    cache_dir: Path,
    cache_key: str,
    progress: Callable[[int], None],
    batch: int = 32,
) -> Features:
    """Localize, view, augment, run the trunk and pool every record, CHUNK images at a time. Each
    image's vectors are cached under `cache_dir` by `cache_key` (which leaves out the number of
    copies) and the image's path, size and mtime, so any subset of a catalogue (e.g. a grown one,
    or a split) and any smaller number of copies reuses them."""
    from ..evaluation.cache import ArrayCache
    from .cache import digest

    cache = ArrayCache(cache_dir, sync=False)  # a cache: an entry lost to a crash is recomputed
    copies = 1 + config.copies
    vectors = np.zeros((len(records), copies, 2, trunk.info.channels), np.float32)
    ok = np.zeros(len(records), bool)
    failures: list[tuple[str, str]] = []
    for start in range(0, len(records), CHUNK):
        views, places, keys = [], [], []
        for i in range(start, min(start + CHUNK, len(records))):
            record = records[i]
            try:
                stat = os.stat(record.path)
                key = digest(cache_key, record.path, stat.st_size, stat.st_mtime_ns)
            except OSError as exc:
                failures.append((record.path, f"cannot read: {exc.strerror or exc}"))
                continue
            entry = cache.get(key)
            # copy j of an image is the same whatever the number of copies (one seeded sequence), so
            # an entry with at least as many copies serves
            if (
                entry is not None
                and entry["vectors"].shape[0] >= copies
                and entry["vectors"].shape[1:] == vectors.shape[2:]
            ):
                vectors[i], ok[i] = entry["vectors"][:copies], True
                continue
            try:
                image = load_image(record.path, index_config.preprocess.max_pixels, index_config.preprocess.min_side)
            except Exception as exc:  # noqa: BLE001 - one bad image is reported, never fatal
                failures.append((record.path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
                continue
            views.append(image_views(image, localizer, index_config, config, config.seed))
            places.append(i)
            keys.append(key)
        if views:
            images = np.concatenate([v.reshape(-1, *v.shape[2:]) for v in views])
            pooled = np.concatenate(
                [
                    np.asarray(pooling(trunk(preprocess(images[s : s + batch]))), np.float32)
                    for s in range(0, len(images), batch)
                ]
            ).reshape(len(views), copies, 2, -1)
            for i, key, value in zip(places, keys, pooled):
                vectors[i], ok[i] = value, True
                cache.put(key, vectors=value)
        progress(min(start + CHUNK, len(records)) - start)
    return Features(vectors, ok, failures)
