"""EmbedderConfig: every setting of an embedder training run (written resolved to RUN_DIR/config.yaml).

The defaults are the measured best on the Grocery train/val split (docs/results/embedder.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from ..config import LocalizeMethod, _Section, bounded, read_yaml_mapping, update_section

Pooling = Literal["gap", "gem", "rmac"]
TrainViews = Literal["cutout", "photo", "cutout+photo"]


@dataclass(frozen=True)
class EmbedderConfig(_Section):
    """Types and bounds are checked on construction, as for the other config sections."""

    _key_prefix = "train"  # error messages name keys as train.<key>

    # the frozen backbone: an ONNX extractor whose output is a global average of its last map
    # (a registry name, or a `csearch export`ed .onnx)
    extractor: str = "efficientnet_lite0"
    pooling: Pooling = "rmac"  # gap | gem | rmac (regional max pooling of the last feature map)
    levels: int = bounded(3, ge=1, le=5)  # R-MAC scales
    gem_p: float = bounded(3.0, ge=1.0, le=10.0)  # GeM exponent
    dim: int = bounded(256, ge=8, le=4096)  # embedding size (64-512 measured: docs/results/embedder.md)
    scale: float = bounded(16.0, gt=0.0, le=128.0)  # normalised-softmax logit scale
    margin: float = bounded(0.1, ge=0.0, lt=1.0)  # additive cosine margin at the true product
    # which views of each catalogue image the head learns from: the object cut-out, the whole
    # photo, or both (the index embeds both by default: embed.views)
    views: TrainViews = "cutout+photo"
    # augmented copies per image and view, besides the image itself (0 -> 3 -> 6: R@1 0.71 -> 0.78 -> 0.79)
    copies: int = bounded(6, ge=0, le=32)
    flip: bool = True  # random horizontal flips
    rotation: float = bounded(10.0, ge=0.0, le=180.0)  # random rotation, +- degrees
    zoom: float = bounded(0.2, ge=0.0, lt=1.0)  # random crop: the box grows or shrinks by up to this share
    shift: float = bounded(0.1, ge=0.0, le=0.5)  # random crop: the box moves by up to this share of its size
    color: float = bounded(0.2, ge=0.0, lt=1.0)  # random brightness / contrast / saturation, +- this share
    epochs: int = bounded(60, ge=1)  # maximum epochs (early stopping by held-out Recall@1 usually ends sooner)
    batch_size: int = bounded(128, ge=2)
    learning_rate: float = bounded(1e-3, gt=0.0, le=1.0)  # Adam
    patience: int = bounded(8, ge=1)  # epochs without a better held-out Recall@1 before stopping
    val_fraction: float = bounded(0.15, gt=0.0, lt=1.0)  # held out per product (products with 2+ images)
    # then train again on every image, held-out ones included, for the epochs early stopping chose
    refit: bool = True
    seed: int = 0
    cache_dir: Optional[str] = None  # localizations and features; None: $CSEARCH_EVAL_CACHE or ~/.cache/csearch/eval
    # the extractor's input side (None: the one its ONNX file fixes, 224 for efficientnet_lite0)
    image_size: Optional[int] = bounded(None, ge=32, le=1024)
    # how the cut-out view is found: as `csearch index` will (localize.method; u2net by default)
    localizer: LocalizeMethod = "u2net"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_embedder_config(
    path: Optional[str | Path] = None, overrides: Optional[Mapping[str, Any]] = None
) -> EmbedderConfig:
    """Defaults, then a YAML file (flat, or under a `train:` section), then overrides (None ignored)."""
    config = EmbedderConfig()
    if path is not None:
        data = read_yaml_mapping(path, "train settings")
        if set(data) == {"train"} and isinstance(data["train"], Mapping):
            data = data["train"]
        config = update_section(config, data, "train.")
    if overrides:
        config = update_section(config, {k: v for k, v in overrides.items() if v is not None}, "train.")
    return config
