"""The paper's qualitative figures, drawn from an evaluation (matplotlib, Agg backend).

- Figure 9: each query followed by its top-5 results; correct results framed green, wrong red.
- Figure 4: a query's object mask over its top results' masks, with their IoU (full frame and
  cropped to the boxes), to show what the paper's re-ranking sees.
- Figure 6: the localization backends (classical, U²-Net-p, U²-Net-p + matting) on the same
  images: the white cut-out each gives the extractor, with the mask outline.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

log = logging.getLogger("csearch")

THUMB = 160
GREEN, RED, BLUE = (0.1, 0.65, 0.2), (0.85, 0.1, 0.1), (0.15, 0.35, 0.8)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def thumbnail(path: str, size: int = THUMB) -> np.ndarray:
    """The image squared onto white (as the extractor sees it) at size x size."""
    from ..preprocess import load_image, model_input

    return model_input(load_image(path), size, "rgb")


def _frame(ax, color, width: float = 4.0) -> None:
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(width)
    ax.set_xticks([])
    ax.set_yticks([])


def _short(text: Optional[str], limit: int = 22) -> str:
    text = text or "?"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def pick_queries(evaluation, features, count: int) -> list[int]:
    """Positions (into evaluation.kept) spread evenly over the query set, one per product where
    possible, so the figure shows several products rather than one."""
    seen, picked = set(), []
    kept = list(evaluation.kept)
    step = max(1, len(kept) // max(count, 1))
    for start in range(step):
        for position in range(start, len(kept), step):
            product = features.records[kept[position]].product
            if product not in seen:
                seen.add(product)
                picked.append(position)
            if len(picked) == count:
                return sorted(picked)
    return sorted(picked)


def _query_rows(evaluation, features, queries: int, top: int, row_height: float):
    """A figure of `queries` rows x (1 + top) panels; returns (fig, [(row's axes, query index,
    position in evaluation.kept)])."""
    plt = _pyplot()
    positions = pick_queries(evaluation, features, queries)
    fig, axes = plt.subplots(
        len(positions), top + 1, figsize=(1.9 * (top + 1), row_height * len(positions)), squeeze=False
    )
    return fig, [(axes[row], evaluation.kept[position], position) for row, position in enumerate(positions)]


def figure9_grid(store, features, evaluation, out: Path, queries: int = 6, top: int = 5) -> Path:
    """Each query (blue frame) then its top results in the IndexStore `store`, green when the
    same product, else red."""
    gallery = store.snapshot
    fig, rows = _query_rows(evaluation, features, queries, top, row_height=2.1)
    for axes, q, position in rows:
        record = features.records[q]
        axes[0].imshow(thumbnail(record.path))
        axes[0].set_title(f"query\n{_short(record.product)}", fontsize=7)
        _frame(axes[0], BLUE)
        for col, gallery_row in enumerate(evaluation.rankings[position][:top], 1):
            ax = axes[col]
            ax.imshow(thumbnail(gallery.paths[gallery_row]))
            correct = gallery.products[gallery_row] == record.product
            ax.set_title(f"#{col} {_short(gallery.products[gallery_row])}", fontsize=7)
            _frame(ax, GREEN if correct else RED)
    fig.suptitle("Query, then its top results (green: same product, red: other)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def _overlay(image: np.ndarray, mask: np.ndarray, outline: Optional[np.ndarray] = None) -> np.ndarray:
    """Tint the mask's pixels; draw `outline` (another mask) as a contour."""
    size = image.shape[0]
    m = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)
    out = image.astype(np.float32)
    out[m] = 0.55 * out[m] + 0.45 * np.array([255, 140, 0], np.float32)
    out = out.astype(np.uint8)
    if outline is not None:
        o = cv2.resize(outline.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(o, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, (0, 90, 255), 2)
    return out


def _frame_image(path: str, size: int = THUMB) -> np.ndarray:
    """The full frame resized to a square, matching how masks are stored (full frame, S x S)."""
    from ..preprocess import load_image

    return cv2.resize(load_image(path), (size, size), interpolation=cv2.INTER_AREA)


def figure4_masks(store, features, evaluation, out: Path, queries: int = 3, top: int = 5) -> Path:
    """Query mask (orange) and each result's mask (orange) with the query's outline (blue);
    results from the IndexStore `store`."""
    from ..masks import mask_iou, mask_iou_cropped, pack_masks

    gallery = store.snapshot
    fig, rows = _query_rows(evaluation, features, queries, top, row_height=2.2)
    for axes, q, position in rows:
        record = features.records[q]
        q_mask = features.masks[q]
        q_bits = pack_masks(q_mask[None])[0]
        axes[0].imshow(_overlay(_frame_image(record.path), q_mask))
        axes[0].set_title(f"query mask\n{_short(record.product)}", fontsize=7)
        _frame(axes[0], BLUE)
        shown = np.asarray(evaluation.rankings[position][:top])
        bits = gallery.gather("masks", shown)
        ious = mask_iou(q_bits, bits)
        crop_ious = mask_iou_cropped(q_bits, features.boxes[q], bits, gallery.gather("boxes", shown), gallery.mask_size)
        for col, (gallery_row, iou, crop_iou) in enumerate(zip(shown, ious, crop_ious), 1):
            ax = axes[col]
            ax.imshow(_overlay(_frame_image(gallery.paths[gallery_row]), gallery.masks([gallery_row])[0], q_mask))
            ax.set_title(f"#{col} IoU {iou:.2f} / crop {crop_iou:.2f}", fontsize=7)
            _frame(ax, GREEN if gallery.products[gallery_row] == record.product else RED)
    fig.suptitle("Object masks (orange) vs the query's outline (blue): full-frame IoU / box-cropped IoU", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def figure6_localization(paths: Sequence[str], localizers: dict, out: Path, work_side: int = 640) -> Path:
    """One row per image: the photo, then each backend's cut-out with its mask outline and the
    backend string it reported (fallbacks visible)."""
    from ..preprocess import downscale_max_side, load_image

    plt = _pyplot()
    names = list(localizers)
    fig, axes = plt.subplots(
        len(paths), len(names) + 1, figsize=(2.1 * (len(names) + 1), 2.2 * len(paths)), squeeze=False
    )
    for row, path in enumerate(paths):
        image = downscale_max_side(load_image(path), work_side)
        axes[row, 0].imshow(image)
        axes[row, 0].set_title("photo", fontsize=7)
        _frame(axes[row, 0], (0.5, 0.5, 0.5), 1.0)
        for col, name in enumerate(names, 1):
            loc = localizers[name](image)
            cut = loc.cutout.copy()
            contours, _ = cv2.findContours(loc.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(cut, contours, -1, (0, 90, 255), max(1, image.shape[0] // 150))
            ax = axes[row, col]
            ax.imshow(cut)
            ax.set_title(f"{name}\n({loc.produced_by})" if loc.produced_by != name else name, fontsize=7)
            _frame(ax, (0.5, 0.5, 0.5), 1.0)
    fig.suptitle("Localization backends on the same photos: cut-out on white, mask outline in blue", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)  # keeps a 6-row grid near 1 MB
    _pyplot().close(fig)
    return out


def comparison_localizers(config, cache_dir: Optional[Path] = None) -> dict:
    """{label: localizer} for Figure 6: classical, U²-Net-p, U²-Net-p + pymatting (cached when
    `cache_dir` is given). U²-Net-p is left out, with a log line, when its file is missing."""
    from dataclasses import replace

    from ..errors import WeightsNotFound
    from ..localize import make_localizer

    wanted = {
        "classical": ("classical", "none"),
        "u2net-p": ("u2net", "none"),
        "u2net-p + pymatting": ("u2net", "pymatting"),
    }
    out = {}
    for label, (backend, matting) in wanted.items():
        cfg = replace(config.localize, method=backend, matting=matting)
        try:
            localizer = make_localizer(cfg)
        except WeightsNotFound as exc:
            log.warning("figure 6: %s left out (%s)", label, exc)
            continue
        if cache_dir is not None:
            from .cache import ArrayCache, CachedLocalizer
            from .features import localize_settings

            localizer = CachedLocalizer(
                localizer, ArrayCache(Path(cache_dir) / "loc"), localize_settings(replace(config, localize=cfg))
            )
        out[label] = localizer
    return out


def draw_all(engine, features, evaluation, out_dir: Path, cache_dir: Optional[Path] = None) -> list[Path]:
    """Figures 9, 4 and 6 for an evaluation (CLI --figures)."""
    out_dir = Path(out_dir)
    written = [
        figure9_grid(engine.store, features, evaluation, out_dir / "figure9_results.png"),
        figure4_masks(engine.store, features, evaluation, out_dir / "figure4_masks.png"),
    ]
    positions = pick_queries(evaluation, features, 4)
    paths = [features.records[evaluation.kept[p]].path for p in positions]
    localizers = comparison_localizers(engine.config, cache_dir)
    if localizers:
        written.append(
            figure6_localization(
                paths, localizers, out_dir / "figure6_localization.png", engine.config.preprocess.work_side
            )
        )
    for path in written:
        log.info("figure: %s", path)
    return written
