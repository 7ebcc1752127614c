"""What every feature extractor shares: the `Extractor` protocol and the batch check where
images enter a model (Keras and ONNX extractors alike)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from .. import errors


class Extractor(Protocol):
    """uint8 RGB images (N, S, S, 3) -> float32 features (N, dim)."""

    name: str
    dim: int
    input_size: int
    files: list[Path]  # weights/model files used, for the index to record with their sha256

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


def extract(extractor: Extractor, images: np.ndarray, run: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Validate a batch where data enters a model - uint8 (N, S, S, 3) - then `run` it; an empty
    batch gives (0, dim) features without running."""
    size, name = extractor.input_size, extractor.name
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise errors.ImageError(
            f"{name}: images must be a uint8 numpy array, got {getattr(images, 'dtype', type(images).__name__)}"
        )
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise errors.ImageError(f"{name}: images must have shape (N, {size}, {size}, 3), got {images.shape}")
    if len(images) == 0:
        return np.zeros((0, extractor.dim), np.float32)
    return run(images)
