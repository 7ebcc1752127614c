"""Decoding and geometric/colour preprocessing.

`load_image` is the one place images enter the system: it applies EXIF orientation, converts
every PIL mode to uint8 RGB (transparency composited onto white, as catalogue images expect),
and refuses files that are missing, empty, truncated, too small or too large.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

ImageSource = Union[str, Path, bytes, np.ndarray]
WHITE = 255


def _open(source: Union[str, Path, bytes]) -> tuple[Image.Image, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = "<upload>"
        if len(source) == 0:
            raise ImageError(f"{name}: empty file (0 bytes)")
        fp = io.BytesIO(bytes(source))
    else:
        name = str(source)
        path = Path(source)
        if not path.exists():
            raise ImageError(f"{name}: file not found")
        if not path.is_file():
            raise ImageError(f"{name}: not a file")
        if path.stat().st_size == 0:
            raise ImageError(f"{name}: empty file (0 bytes)")
        fp = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(fp), name
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: image dimensions too large (decompression bomb guard)") from None
    except OSError as exc:
        raise ImageError(f"{name}: cannot read image ({exc})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; alpha is composited onto white, 16/32-bit is scaled to 8-bit."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.round().astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (WHITE, WHITE, WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: ImageSource, max_pixels: int = 40_000_000, min_side: int = 8) -> np.ndarray:
    """Read an image file (path or bytes) as uint8 (H, W, 3) RGB, or validate an array.

    Raises ImageError with a one-line reason for anything unusable.
    """
    if isinstance(source, np.ndarray):
        return validate_image(source, min_side=min_side, max_pixels=max_pixels)
    image, name = _open(source)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: image too large ({width}x{height} = {width * height / 1e6:.1f} MP; "
            f"limit {max_pixels / 1e6:.0f} MP)"
        )
    if min(width, height) < min_side:
        raise ImageError(f"{name}: image too small ({width}x{height}; need at least {min_side} px a side)")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        rgb = _to_rgb(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{name}: corrupt or truncated image ({exc})") from None
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def validate_image(
    image: np.ndarray, min_side: int = 8, max_pixels: int = 40_000_000, name: str = "image"
) -> np.ndarray:
    """Check an in-memory image: uint8 (H, W, 3). Grayscale (H, W) is replicated."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"{name}: expected shape (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise ImageError(f"{name}: expected dtype uint8, got {image.dtype}")
    height, width = image.shape[:2]
    if min(height, width) < min_side:
        raise ImageError(f"{name}: image too small ({width}x{height}; need at least {min_side} px a side)")
    if height * width > max_pixels:
        raise ImageError(f"{name}: image too large ({width}x{height})")
    return np.ascontiguousarray(image)


def downscale_max_side(image: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink so the longer side is at most max_side (never enlarges)."""
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    interpolation = cv2.INTER_AREA if max(image.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def to_color(image: np.ndarray, color: str) -> np.ndarray:
    """'rgb' keeps the image; 'gray' is luminance replicated to 3 channels (the paper's input)."""
    if color == "rgb":
        return image
    if color == "gray":
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        return np.repeat(gray[:, :, None], 3, axis=2)
    raise ImageError(f"color must be 'rgb' or 'gray', got {color!r}")


def expand_box(box: tuple[int, int, int, int], shape: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    """Grow a box by `margin` of its longer side on every edge, clipped to the image."""
    x0, y0, x1, y1 = box
    pad = int(round(margin * max(x1 - x0, y1 - y0)))
    height, width = shape
    return max(0, x0 - pad), max(0, y0 - pad), min(width, x1 + pad), min(height, y1 + pad)


def pad_to_square(image: np.ndarray, value: int = WHITE) -> np.ndarray:
    """Centre the image on a square canvas so resizing keeps the object's aspect ratio."""
    height, width = image.shape[:2]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return cv2.copyMakeBorder(
        image,
        top,
        side - height - top,
        left,
        side - width - left,
        cv2.BORDER_CONSTANT,
        value=(value,) * 3 if image.ndim == 3 else value,
    )


def model_input(
    image: np.ndarray, size: int, color: str, box: Optional[tuple[int, int, int, int]] = None, margin: float = 0.0
) -> np.ndarray:
    """The extractor/classifier input: optional crop to `box` (squared with white), resize, colour."""
    if box is not None:
        x0, y0, x1, y1 = expand_box(box, image.shape[:2], margin)
        if x1 > x0 and y1 > y0:
            image = pad_to_square(image[y0:y1, x0:x1])
    return to_color(resize_square(image, size), color)
