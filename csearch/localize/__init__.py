"""Object localization: find the product, return its alpha matte, mask, box and white cut-out.

    from csearch.config import LocalizeConfig
    from csearch.localize import make_localizer
    localizer = make_localizer(LocalizeConfig(method="u2net", matting="pymatting"))
    loc = localizer(image)          # Localization(alpha, mask, cutout, produced_by, box)
    localizer.files                 # model files the result depends on (for the index's sha256)

Backends: none (whole image) | classical (OpenCV, no weights) | u2net (ONNX U²-Net / U²-Net-p).
Matting refines the boundary of classical/u2net: none (the map is the alpha) | pymatting
(closed-form, no weights) | fba (ONNX FBA Matting).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import LocalizeConfig
from ..errors import WeightsNotFound
from ..models import resolve_weights
from .base import Localizer, MattingFailed, NoLocalizer, SaliencyLocalizer, composite_on_white, localization_from_alpha
from .classical import ClassicalSaliency
from .matting import FBAMatting, TrimapMatting, alpha_pymatting, make_trimap
from .u2net import U2NetSaliency

DEFAULT_U2NET = "u2netp"  # registry name used when LocalizeConfig.model is None
DEFAULT_FBA = "fba"

__all__ = [
    "ClassicalSaliency",
    "FBAMatting",
    "Localizer",
    "MattingFailed",
    "NoLocalizer",
    "SaliencyLocalizer",
    "TrimapMatting",
    "U2NetSaliency",
    "alpha_pymatting",
    "composite_on_white",
    "localization_from_alpha",
    "make_localizer",
    "make_trimap",
]


def resolve_model(value: Optional[str], default_name: str) -> Path:
    """An existing file path is used as is; None or a registry name (e.g. "u2net") is resolved by
    `csearch.models.resolve_weights`, which raises WeightsNotFound naming where to put the file."""
    if value is not None and not _is_registry_name(value):
        return Path(value).expanduser()  # a path; a missing one is reported by the model class
    name = value or default_name
    path = resolve_weights(name, "imagenet")
    if path is None:
        raise WeightsNotFound(f"no weights file for model {name!r}")
    return Path(path)


def _is_registry_name(value: str) -> bool:
    path = Path(value)
    return not path.suffix and path.name == value and not path.expanduser().exists()


def make_localizer(cfg: LocalizeConfig, threads: Optional[int] = None, input_size: Optional[int] = None) -> Localizer:
    """Build the localizer a LocalizeConfig describes. Nothing is downloaded; model files are
    checked (existence and interface) here, so a bad config fails before any image is read."""
    threads = cfg.threads if threads is None else threads
    input_size = cfg.input_size if input_size is None else input_size
    # cfg's method and matting names were checked when the config was built (csearch.config)
    if cfg.method == "none":
        return NoLocalizer()  # nothing to refine: the whole image is the object
    if cfg.method == "classical":
        saliency = ClassicalSaliency()
    else:
        spec_name = cfg.model if cfg.model and _is_registry_name(cfg.model) else DEFAULT_U2NET  # its interface
        saliency = U2NetSaliency(
            resolve_model(cfg.model, DEFAULT_U2NET), input_size=input_size, threads=threads, model=spec_name
        )
    return SaliencyLocalizer(saliency, _make_matting(cfg, threads), cfg.threshold)


def _make_matting(cfg: LocalizeConfig, threads: Optional[int]) -> Optional[TrimapMatting]:
    if cfg.matting == "none":
        return None
    if cfg.matting == "pymatting":
        return TrimapMatting(alpha_pymatting, "pymatting", cfg.threshold, cfg.band)
    fba = FBAMatting(resolve_model(cfg.matting_model, DEFAULT_FBA), threads=threads)
    return TrimapMatting(fba, "fba", cfg.threshold, cfg.band, files=fba.files)
