"""Pooled feature extraction in batches.

Batching bounds memory (a whole catalogue never goes through a model at once); L2
normalisation makes Euclidean KNN rank like cosine similarity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Optional, Union

import numpy as np

from .errors import ConfigError, ModelMismatch
from .models import Extractor

EPS = 1e-12  # norms below this are treated as zero vectors (left at zero, never NaN)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Row-wise unit vectors, float32; all-zero rows stay zero."""
    vectors = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > EPS)


def _batches(images: Union[np.ndarray, Iterable[np.ndarray]], size: int) -> Iterator[np.ndarray]:
    if isinstance(images, np.ndarray):
        for start in range(0, len(images), size):
            yield images[start : start + size]
        return
    iterator = iter(images)
    while batch := list(islice(iterator, size)):
        yield np.stack(batch)


def embed_batches(
    extractor: Extractor,
    images: Union[np.ndarray, Iterable[np.ndarray]],
    batch_size: int = 32,
    normalize: bool = True,
    progress: Optional[Callable[[int], None]] = None,
) -> np.ndarray:
    """Features of uint8 (S, S, 3) images, `batch_size` at a time -> float32 (N, extractor.dim).

    `images` is an (N, S, S, 3) array or any iterable of (S, S, 3) arrays (e.g. a generator
    that decodes files lazily). `progress(n_done)` is called after each batch.
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    chunks, done = [], 0
    for batch in _batches(images, int(batch_size)):
        features = np.asarray(extractor(batch), np.float32)
        if features.shape != (len(batch), extractor.dim):
            raise ModelMismatch(
                f"{extractor.name}: expected features of shape ({len(batch)}, {extractor.dim}), got {features.shape}"
            )
        chunks.append(features)
        done += len(batch)
        if progress is not None:
            progress(done)
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, extractor.dim), np.float32)
    return l2_normalize(vectors) if normalize else vectors


def combine_views(cutout: np.ndarray, photo: np.ndarray, photo_weight: float) -> np.ndarray:
    """Two views of the same images as one vector [sqrt(1-w) a, sqrt(w) b]: the squared distance
    between two such vectors is (1-w) d_a^2 + w d_b^2, so one exact KNN searches both views at
    once, and unit-norm views give a unit-norm result."""
    if cutout.shape != photo.shape:
        raise ValueError(f"views must have the same shape, got {cutout.shape} and {photo.shape}")
    a, b = np.sqrt(1.0 - photo_weight), np.sqrt(photo_weight)
    return np.concatenate([a * cutout, b * photo], axis=1).astype(np.float32)
