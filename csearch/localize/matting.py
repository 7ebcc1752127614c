"""Alpha matting of the saliency boundary: the paper's U²-Net + matting fusion.

The saliency map is thresholded into a trimap whose unknown band of `band` px straddles the
object boundary; a matting solver then estimates alpha only inside that band. Solvers:
closed-form matting (pymatting, no weights) and the FBA network (ONNX, `FBAMatting`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from ..errors import ConfigError, ModelMismatch
from ..models.onnx_runtime import check_file, dim_matches, graph_io, load_proto, onnx_session
from ..models.preprocessing import unit_mean_std
from ..models.registry import get_spec
from .base import MattingFailed
from .u2net import DEFAULT_THREADS

LOG = logging.getLogger(__name__)
BG, UNKNOWN, FG = 0, 128, 255
# Closed-form matting couples pixels through 3x3 windows, so a window touching an unknown pixel
# reaches 2 px beyond it: a crop with this margin solves exactly the same system as the image.
CF_MARGIN = 2


# --- trimap -----------------------------------------------------------------------------------


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _deepest(region: np.ndarray) -> np.ndarray:
    """The pixels of `region` farthest from its edge (a seed that survives any erosion)."""
    dist = cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, 3)
    return (dist == dist.max()) & region


def make_trimap(saliency: np.ndarray, threshold: float = 0.5, band: int = 11) -> np.ndarray:
    """uint8 trimap (0 bg, 128 unknown, 255 fg) with an unknown band `band` px wide across the
    boundary of `saliency > threshold` (band // 2 px inside, the rest outside).

    An object thinner than the band would lose all its definite foreground (and a frame-filling
    one all its background); the deepest pixels are then kept as seeds, because matting needs
    both constraints to say anything.
    """
    if band < 0:
        raise ConfigError(f"band must be >= 0, got {band}")
    mask = np.asarray(saliency) > threshold
    inner, outer = band // 2, band - band // 2
    mask_u8 = mask.astype(np.uint8)
    fg = cv2.erode(mask_u8, _disk(inner)).astype(bool) if inner else mask
    known_bg = ~(cv2.dilate(mask_u8, _disk(outer)).astype(bool)) if outer else ~mask
    if mask.any() and not fg.any():
        fg = _deepest(mask)
    if (~mask).any() and not known_bg.any():
        known_bg = _deepest(~mask)
    trimap = np.full(mask.shape, UNKNOWN, np.uint8)
    trimap[fg] = FG
    trimap[known_bg] = BG
    return trimap


# --- closed-form matting (pymatting) --------------------------------------------------------


def _unknown_crop(unknown: np.ndarray, margin: int) -> tuple[slice, slice]:
    rows = np.flatnonzero(unknown.any(axis=1))
    cols = np.flatnonzero(unknown.any(axis=0))
    height, width = unknown.shape
    return (
        slice(max(0, rows[0] - margin), min(height, rows[-1] + 1 + margin)),
        slice(max(0, cols[0] - margin), min(width, cols[-1] + 1 + margin)),
    )


def alpha_pymatting(image: np.ndarray, trimap: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Closed-form matting (Levin et al. 2008, pymatting's `estimate_alpha_cf`) of the unknown
    trimap pixels; known pixels keep their trimap value. float32 (H, W) in [0, 1].

    Solved on the crop around the unknown band (exact, see CF_MARGIN), resized by `scale` < 1
    to save time: the cost follows the unknown pixel count, so 0.5 costs about a quarter
    (measured in docs/results/localize.md).
    """
    if not 0.0 < scale <= 1.0:
        raise ConfigError(f"scale must be in (0, 1], got {scale}")
    _check_pair(image, trimap)
    alpha = (trimap == FG).astype(np.float32)
    unknown = (trimap != FG) & (trimap != BG)
    if not unknown.any():
        return alpha
    ys, xs = _unknown_crop(unknown, CF_MARGIN)
    sub = _solve_cf(image[ys, xs], trimap[ys, xs], scale)
    alpha[ys, xs] = np.where(unknown[ys, xs], sub, alpha[ys, xs])
    return alpha


def _quiet_pymatting() -> None:
    """pymatting's incomplete-Cholesky preconditioner print()s its retry notices to stdout, which
    must stay machine-readable (`--json`); send them to the log instead. Only that module's own
    `print` name is rebound: no process-wide stdout swap, so it is thread-safe."""
    module = sys.modules.get("pymatting.preconditioner.ichol")
    if module is not None and "print" not in vars(module):
        module.print = lambda *args, **kwargs: LOG.debug("pymatting: %s", " ".join(map(str, args)))


def _solve_cf(image: np.ndarray, trimap: np.ndarray, scale: float) -> np.ndarray:
    from pymatting import estimate_alpha_cf

    _quiet_pymatting()

    has_fg, has_bg = bool((trimap == FG).any()), bool((trimap == BG).any())
    if not ((trimap != FG) & (trimap != BG)).any():  # a downscaled band can vanish
        return (trimap == FG).astype(np.float32)
    if not (has_fg and has_bg):  # one kind of constraint: the smoothest alpha is that constant
        if not (has_fg or has_bg):
            raise ValueError("trimap has unknown pixels but neither definite foreground nor background")
        return np.full(trimap.shape, 1.0 if has_fg else 0.0, np.float32)
    height, width = trimap.shape
    if min(height, width) < 3:  # no 3x3 window fits: closed-form matting has no equation
        return np.where(trimap == FG, 1.0, np.where(trimap == BG, 0.0, 0.5)).astype(np.float32)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if scale < 1.0 and min(size) >= 3:
        small = _solve_cf(
            cv2.resize(image, size, interpolation=cv2.INTER_AREA),
            cv2.resize(trimap, size, interpolation=cv2.INTER_NEAREST),
            1.0,
        )
        return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    try:
        solved = estimate_alpha_cf(image.astype(np.float64) / 255.0, trimap.astype(np.float64) / 255.0)
    except ValueError as exc:  # pymatting: "Conjugate gradient descent did not converge ..."
        raise MattingFailed(f"closed-form matting failed: {exc}") from None
    if not np.isfinite(solved).all():
        raise MattingFailed("closed-form matting produced non-finite alpha")
    return np.clip(solved, 0.0, 1.0).astype(np.float32)


def _check_pair(image: np.ndarray, trimap: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if trimap.shape != image.shape[:2] or trimap.dtype != np.uint8:
        raise ValueError(f"trimap must be uint8 {image.shape[:2]}, got {trimap.dtype} {trimap.shape}")


# --- FBA matting (ONNX) ---------------------------------------------------------------------

FBA_SPEC = get_spec("fba")  # input names (in the order below) and the image_n normalisation
FBA_INPUTS = dict(zip(FBA_SPEC.onnx_inputs, (3, 2, 3, 6)))  # name -> channels: image, trimap, image_n, distances
FBA_MEAN, FBA_STD = unit_mean_std(FBA_SPEC.preprocessing)
FBA_OUTPUT_CHANNELS = 7  # alpha, foreground RGB, background RGB
FBA_STRIDE = 8
FBA_L = 320  # the reference code's scale for the click-style distance encoding


def two_channel_trimap(trimap: np.ndarray) -> np.ndarray:
    """float32 (H, W, 2): channel 0 = definite background, 1 = definite foreground (the order of
    the FBA reference code's `read_trimap`)."""
    return np.stack([trimap == BG, trimap == FG], axis=-1).astype(np.float32)


def trimap_distance_channels(two_chan: np.ndarray) -> np.ndarray:
    """float32 (H, W, 6): for bg then fg, exp(-d² / (2 (s L)²)) with d the distance to that
    region and s in (0.02, 0.08, 0.16), L = 320 (FBA's reference `trimap_transform`)."""
    height, width = two_chan.shape[:2]
    out = np.zeros((height, width, 6), np.float32)
    for k in range(2):
        region = two_chan[:, :, k] > 0
        if not region.any():
            continue  # the reference leaves an absent region's channels at zero
        dist = cv2.distanceTransform((~region).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        for j, scale in enumerate((0.02, 0.08, 0.16)):
            out[:, :, 3 * k + j] = np.exp(-(dist**2) / (2 * (scale * FBA_L) ** 2))
    return out


def _nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def fba_inputs(image: np.ndarray, trimap: np.ndarray) -> dict[str, np.ndarray]:
    """The four FBA network inputs, H and W padded (edge-replicated) to a multiple of 8."""
    height, width = trimap.shape
    pad = ((0, -height % FBA_STRIDE), (0, -width % FBA_STRIDE))
    rgb = np.pad(image.astype(np.float32) / 255.0, pad + ((0, 0),), mode="edge")
    two_chan = two_channel_trimap(np.pad(trimap, pad, mode="edge"))
    arrays = (rgb, two_chan, (rgb - FBA_MEAN) / FBA_STD, trimap_distance_channels(two_chan))
    return {name: _nchw(x) for name, x in zip(FBA_INPUTS, arrays)}


def _rank4_with_channels(shape: list, channels: int) -> bool:
    return len(shape) == 4 and dim_matches(shape[1], channels)


def check_fba_io(inputs, outputs, path: Path) -> None:
    expected = ", ".join(f"{n} [1,{c},H,W]" for n, c in FBA_INPUTS.items()) + f" -> [1,{FBA_OUTPUT_CHANNELS},H,W]"
    found = {name: list(shape) for name, shape in inputs}
    out = list(outputs[0][1]) if outputs else []
    ok = (
        set(found) == set(FBA_INPUTS)
        and all(_rank4_with_channels(found[n], c) for n, c in FBA_INPUTS.items())
        and _rank4_with_channels(out, FBA_OUTPUT_CHANNELS)
    )
    if not ok:
        raise ModelMismatch(
            f"{path}: not an FBA matting model: inputs {found}, first output {out}; expected {expected}"
        )


class FBAMatting:
    """FBA Matting (Forte & Pitié 2020) exported to ONNX: `predict(image, trimap) -> alpha`.

    Known trimap pixels keep their value, as in the reference `pred()`.
    """

    name = "fba"

    def __init__(self, model_path: str | Path, threads: Optional[int] = None):
        path = check_file(model_path, "FBA matting")
        self.files = [path.resolve()]
        check_fba_io(*graph_io(load_proto(path, "the FBA matting network")), path)
        self.session = onnx_session(path, "FBA", DEFAULT_THREADS if threads is None else threads)
        self.output_name = self.session.get_outputs()[0].name

    def predict(self, image: np.ndarray, trimap: np.ndarray) -> np.ndarray:
        _check_pair(image, trimap)
        height, width = trimap.shape
        output = self.session.run([self.output_name], fba_inputs(image, trimap))[0]
        alpha = np.clip(output[0, 0, :height, :width], 0.0, 1.0).astype(np.float32)
        alpha[trimap == BG] = 0.0
        alpha[trimap == FG] = 1.0
        return alpha

    __call__ = predict


# --- saliency -> alpha ------------------------------------------------------------------------


class TrimapMatting:
    """(image, saliency) -> alpha: trimap from the thresholded saliency, then `solver`.

    `name` ("pymatting" / "fba") becomes part of the Localization's backend string.
    """

    def __init__(
        self,
        solver: Callable[[np.ndarray, np.ndarray], np.ndarray],
        name: str,
        threshold: float = 0.5,
        band: int = 11,
        files: Optional[list[Path]] = None,
    ):
        self.solver, self.name = solver, name
        self.threshold, self.band = float(threshold), int(band)
        self.files = list(files or [])

    def __call__(self, image: np.ndarray, saliency: np.ndarray) -> np.ndarray:
        return self.solver(image, make_trimap(saliency, self.threshold, self.band))

    def __repr__(self) -> str:
        return f"TrimapMatting({self.name!r}, threshold={self.threshold}, band={self.band})"
