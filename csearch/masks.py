"""Object masks in one place: packing (the index's stored format), resizing, boxes and IoU.

Masks are bool (H, W) arrays; the index stores them resized to S x S and bit-packed
(`pack_masks`). Boxes come in two forms: `pixel_box` (x0, y0, x1, y1) in pixels, and
`normalized_box`, the same divided by (W, H), which is what the index stores.

The IoU of two empty masks is defined as 0: an empty mask means localization found nothing,
which is no evidence that two images show the same shape.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def mask_bytes(size: int) -> int:
    """Bytes of one packed size x size mask."""
    return (size * size + 7) // 8


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """bool (n, S, S) -> uint8 (n, ceil(S*S/8)), row-major, most significant bit first."""
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.dtype != bool:
        raise ValueError(f"masks must be bool (n, S, S), got {masks.dtype} {masks.shape}")
    return np.packbits(masks.reshape(len(masks), masks.shape[1] * masks.shape[2]), axis=1)


def unpack_masks(bits: np.ndarray, size: int) -> np.ndarray:
    """uint8 (n, ceil(S*S/8)) -> bool (n, S, S); the inverse of `pack_masks`."""
    bits = np.asarray(bits)
    if bits.ndim != 2 or bits.dtype != np.uint8 or bits.shape[1] != mask_bytes(size):
        raise ValueError(
            f"packed masks must be uint8 (n, {mask_bytes(size)}) for size {size}, got {bits.dtype} {bits.shape}"
        )
    flat = np.unpackbits(bits, axis=1, count=size * size)
    return flat.reshape(len(bits), size, size).view(bool)


def area_weights(n_in: int, n_out: int, start: float = 0.0, stop: Optional[float] = None) -> np.ndarray:
    """float32 (n_out, n_in): each output cell's average over the input span it covers.

    The output cells split [start, stop) (in input-cell units; default the whole axis) evenly,
    so a fractional box can be cropped and resized in one exact area-interpolation step, for
    up- and downscaling alike.
    """
    stop = float(n_in) if stop is None else float(stop)
    width = max(stop - float(start), 1e-6) / n_out  # a zero-width box still maps somewhere
    lo = float(start) + width * np.arange(n_out)[:, None]
    cells = np.arange(n_in)[None, :]
    overlap = np.minimum(lo + width, cells + 1) - np.maximum(lo, cells)
    return (np.clip(overlap, 0.0, None) / width).astype(np.float32)


def _threshold(coverage: np.ndarray, nonempty: np.ndarray) -> np.ndarray:
    """Coverage >= 0.5 is object. A non-empty source keeps at least its best-covered cell, since
    an object that vanished on resizing would have IoU 0 with everything."""
    out = coverage >= 0.5 - 1e-6
    lost = np.flatnonzero(nonempty & ~out.any(axis=(1, 2)))
    for i in lost:
        out[i].flat[np.argmax(coverage[i])] = True
    return out


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """bool (H, W) -> bool (size, size): area interpolation, then threshold at 0.5."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != bool or 0 in mask.shape:
        raise ValueError(f"mask must be a non-empty bool (H, W) array, got {mask.dtype} {mask.shape}")
    height, width = mask.shape
    coverage = area_weights(height, size) @ mask.astype(np.float32) @ area_weights(width, size).T
    return _threshold(coverage[None], np.array([mask.any()]))[0]


def crop_masks(masks: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """bool (n, S, S) masks cropped to their normalised boxes, each resized to bool (n, size, size).

    Cropping removes the object's position and scale in the frame, so the IoU compares shapes.
    """
    masks, boxes = np.asarray(masks), np.asarray(boxes, dtype=np.float64)
    if masks.ndim != 3 or masks.dtype != bool or boxes.shape != (len(masks), 4):
        raise ValueError(
            f"crop_masks needs bool (n, S, S) masks and (n, 4) boxes, got {masks.dtype} {masks.shape} and {boxes.shape}"
        )
    side = masks.shape[1]
    grid = np.clip(boxes, 0.0, 1.0) * side
    rows = (
        np.stack([area_weights(side, size, y0, y1) for _, y0, _, y1 in grid])
        if len(masks)
        else np.zeros((0, size, side), np.float32)
    )
    cols = (
        np.stack([area_weights(side, size, x0, x1) for x0, _, x1, _ in grid])
        if len(masks)
        else np.zeros((0, size, side), np.float32)
    )
    coverage = rows @ masks.astype(np.float32) @ cols.transpose(0, 2, 1)
    return _threshold(coverage, masks.reshape(len(masks), side * side).any(axis=1))


def pixel_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), exclusive end, of the True pixels; the whole image when none is True
    (nothing was localised, so the object may be anywhere)."""
    mask = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return 0, 0, int(mask.shape[1]), int(mask.shape[0])
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def normalized_box(mask: np.ndarray) -> np.ndarray:
    """float32 (4,): `pixel_box` divided by (W, H), the form the index stores; (0, 0, 1, 1)
    when the mask is empty."""
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    x0, y0, x1, y1 = pixel_box(mask)
    return np.array([x0 / width, y0 / height, x1 / width, y1 / height], np.float32)


# ----------------------------------------------------------------------------------------- IoU


def _popcount(bits: np.ndarray) -> np.ndarray:
    """Set bits per row of a uint8 (M, B) array, as int64 (M,)."""
    if bits.shape[-1] % 8 == 0 and bits.flags.c_contiguous:
        bits = bits.view(np.uint64)  # 8x fewer elements to count
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(bits).sum(axis=-1, dtype=np.int64)
    return np.unpackbits(bits.view(np.uint8), axis=-1).sum(axis=-1, dtype=np.int64)


def mask_iou(query_bits: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """IoU of one packed mask uint8 (B,) with each of uint8 (M, B): float32 (M,).
    Two empty masks have IoU 0 (see the module docstring)."""
    query_bits, bits = np.asarray(query_bits), np.asarray(bits)
    if query_bits.dtype != np.uint8 or bits.dtype != np.uint8 or bits.ndim != 2 or query_bits.shape != bits.shape[1:]:
        raise ValueError(
            f"mask_iou needs packed uint8 masks (B,) and (M, B), got {query_bits.dtype} "
            f"{query_bits.shape} and {bits.dtype} {bits.shape}"
        )
    inter = _popcount(np.ascontiguousarray(bits & query_bits))
    union = _popcount(np.ascontiguousarray(bits | query_bits))
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0).astype(np.float32)


def mask_iou_cropped(
    query_bits: np.ndarray,
    query_box: np.ndarray,
    bits: np.ndarray,
    boxes: np.ndarray,
    mask_size: int,
    crop_size: int = 32,
) -> np.ndarray:
    """IoU after cropping every mask to its normalised box and resizing it to crop_size^2:
    float32 (M,). Compares shapes whatever the object's position and scale in the frame."""
    bits = np.asarray(bits)
    if bits.ndim != 2 or bits.shape[1] != mask_bytes(mask_size):
        raise ValueError(f"bits must be (M, {mask_bytes(mask_size)}) for mask_size {mask_size}, got {bits.shape}")
    every = np.concatenate([np.asarray(query_bits, np.uint8)[None], bits])
    every_box = np.concatenate([np.asarray(query_box, np.float32).reshape(1, 4), np.asarray(boxes, np.float32)])
    packed = pack_masks(crop_masks(unpack_masks(every, mask_size), every_box, crop_size))
    return mask_iou(packed[0], packed[1:])
