"""The pictures the API sends back: thumbnails, the query's cut-out and tinted mask overlays."""

from __future__ import annotations

import base64
import io

import numpy as np

from ..preprocess import downscale_max_side
from ..types import Localization

THUMBNAIL_SIDE = 256
CUTOUT_SIDE = 320
QUERY_MASK_RGBA = (255, 120, 0, 150)  # orange: the query's mask, in the page's overlay
ITEM_MASK_RGBA = (0, 110, 255, 150)  # blue: the catalogue item's mask


def encode(array: np.ndarray, fmt: str, **options) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def small_jpeg(image: np.ndarray, side: int) -> bytes:
    """`image` scaled down to at most `side` px, as JPEG."""
    return encode(np.ascontiguousarray(downscale_max_side(image, side)), "JPEG", quality=85)


def tinted_mask_png(mask: np.ndarray, rgba: tuple) -> bytes:
    """bool (S, S) -> RGBA PNG: `rgba` where the mask is set, transparent elsewhere, for overlays."""
    out = np.zeros((*mask.shape, 4), np.uint8)
    out[mask] = rgba
    return encode(out, "PNG")


def cutout_jpeg(localization: Localization, side: int = CUTOUT_SIDE) -> bytes:
    """The object on white, cropped to its box with a small margin."""
    x0, y0, x1, y1 = localization.box
    pad = round(0.05 * max(x1 - x0, y1 - y0))
    height, width = localization.cutout.shape[:2]
    crop = localization.cutout[max(0, y0 - pad) : min(height, y1 + pad), max(0, x0 - pad) : min(width, x1 + pad)]
    return small_jpeg(crop, side)
