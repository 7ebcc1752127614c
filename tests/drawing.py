"""Shapes drawn into masks, shared by the mask and search tests."""

import numpy as np


def triangle(frame, y0, x0, height, width, mirrored=False):
    """Fill a right triangle in the box (lower-left half, or upper-right when mirrored)."""
    ys, xs = np.mgrid[0:height, 0:width]
    below = xs / width <= ys / height
    frame[y0 : y0 + height, x0 : x0 + width] |= ~below if mirrored else below
    return frame
