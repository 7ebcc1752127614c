"""The Localizer protocol and the helpers every backend shares.

A localizer maps an RGB image to a `Localization` at the image's own resolution. Backends that
produce a soft object map (U²-Net saliency, the classical detector) are composed with an
optional matting step by `SaliencyLocalizer`, so every backend/matting pair is one code path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional, Protocol, runtime_checkable

import numpy as np

from ..masks import pixel_box
from ..preprocess import validate_image
from ..types import Localization

EMPTY_SUFFIX = "(empty->full)"


class MattingFailed(RuntimeError):
    """A matting solver found no alpha for this image (e.g. its iterative solve did not converge);
    the localizer then keeps the saliency as alpha and says so in `produced_by`."""


@runtime_checkable
class Localizer(Protocol):
    """image uint8 (H, W, 3) -> Localization; `files` are the model files it depends on."""

    name: str
    files: list[Path]

    def __call__(self, image: np.ndarray) -> Localization: ...


class SaliencyModel(Protocol):
    """A coarse object map: image -> float32 (H, W) in [0, 1]."""

    name: str
    files: list[Path]

    def predict(self, image: np.ndarray) -> np.ndarray: ...


# (image, saliency) -> alpha; carries `name` and `files` like a model (see matting.TrimapMatting)
Matting = Callable[[np.ndarray, np.ndarray], np.ndarray]


def composite_on_white(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """image * alpha + white * (1 - alpha), rounded to uint8: catalogue images sit on white."""
    a = np.clip(alpha, 0.0, 1.0).astype(np.float32)[:, :, None]
    out = image.astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def full_localization(image: np.ndarray, backend: str) -> Localization:
    """The whole image is the object (backend 'none', or an explicit empty-mask fallback)."""
    height, width = image.shape[:2]
    return Localization(
        alpha=np.ones((height, width), np.float32),
        mask=np.ones((height, width), bool),
        cutout=image.copy(),
        produced_by=backend,
        box=(0, 0, width, height),
    )


def localization_from_alpha(image: np.ndarray, alpha: np.ndarray, threshold: float, backend: str) -> Localization:
    """Threshold a matte into a Localization.

    An empty mask would hand a blank white cut-out to the extractor and match nothing in the
    re-ranker, so it falls back to the whole image, and the backend string says so.
    """
    if alpha.shape != image.shape[:2]:
        raise ValueError(f"alpha shape {alpha.shape} does not match image shape {image.shape[:2]}")
    alpha = np.clip(np.nan_to_num(alpha.astype(np.float32, copy=False)), 0.0, 1.0)
    mask = alpha > threshold
    if not mask.any():
        return full_localization(image, backend + EMPTY_SUFFIX)
    return Localization(
        alpha=alpha, mask=mask, cutout=composite_on_white(image, alpha), produced_by=backend, box=pixel_box(mask)
    )


class NoLocalizer:
    """Backend 'none': the whole image is the object."""

    name = "none"

    def __init__(self) -> None:
        self.files: list[Path] = []

    def __call__(self, image: np.ndarray) -> Localization:
        return full_localization(validate_image(image, min_side=1), self.name)


class SaliencyLocalizer:
    """A coarse object map, optionally refined by matting, thresholded into a Localization.

    `name` (and so `Localization.produced_by`) is e.g. "u2net+pymatting"; with `matting=None` the
    saliency itself is the alpha matte. If matting fails on an image, the saliency is used and
    the backend reads e.g. "u2net+pymatting(failed->u2net)".
    """

    def __init__(self, saliency: SaliencyModel, matting: Optional[Matting] = None, threshold: float = 0.5):
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        self.saliency = saliency
        self.matting = matting
        self.threshold = float(threshold)
        self.name = saliency.name + (f"+{matting.name}" if matting is not None else "")
        self.files: list[Path] = list(saliency.files) + list(getattr(matting, "files", []))

    def __call__(self, image: np.ndarray) -> Localization:
        image = validate_image(image, min_side=1)
        saliency = self.saliency.predict(image)
        if self.matting is None:
            return localization_from_alpha(image, saliency, self.threshold, self.name)
        try:
            alpha, backend = self.matting(image, saliency), self.name
        except MattingFailed:
            alpha, backend = saliency, f"{self.name}(failed->{self.saliency.name})"
        return localization_from_alpha(image, alpha, self.threshold, backend)

    def __repr__(self) -> str:
        return f"SaliencyLocalizer({self.name!r}, threshold={self.threshold})"
