"""TrainConfig: every setting of a training run, its checks and its loading (YAML + overrides)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from .. import errors
from ..config import Color, _Section, bounded, read_yaml_mapping, update_section

Monitor = Literal["val_loss", "val_accuracy"]
CacheMode = Literal["auto", "none"]


@dataclass(frozen=True)
class TrainConfig(_Section):
    """Everything that determines a training run (written resolved to RUN_DIR/config.yaml).
    Types and bounds are checked on construction, as for the other config sections."""

    _key_prefix = "train"  # error messages name keys as train.<key>

    backbone: str = "mobilenetv2"  # a registered backbone (`csearch models`); v2 measured best here
    weights: str = "imagenet"  # imagenet | none | a weights file path
    image_size: Optional[int] = None  # None: the backbone's native size (224 for MobileNet)
    color: Color = "rgb"  # rgb | gray (the paper: gray)
    epochs: int = bounded(100, ge=1)  # maximum epochs of the main stage (early stopping usually ends it sooner)
    batch_size: int = bounded(32, ge=1)
    freeze_backbone: bool = False  # True: train the head only, whatever unfreeze says
    # Top backbone layers trained with the head (-1: all). Default 0: on Grocery, fine-tuning
    # MobileNet's top block scored no better on val.txt and took 4x longer (docs/results).
    unfreeze: int = 0
    warmup_epochs: int = bounded(0, ge=0)  # head-only epochs before the unfrozen layers join
    val: Optional[str] = None  # a catalogue SPEC for validation; None: split off --data
    val_fraction: float = bounded(0.2, gt=0.0, lt=1.0)  # of each category, when val is None
    seed: int = 0
    learning_rate: float = 1e-3  # SGD, the paper's optimiser
    momentum: float = 0.9
    nesterov: bool = True
    lr_factor: float = 0.5  # ReduceLROnPlateau
    lr_patience: int = bounded(5, ge=0)
    patience: int = bounded(10, ge=0)  # EarlyStopping (restore_best_weights=True)
    monitor: Monitor = "val_loss"  # val_loss | val_accuracy
    rotation: float = 0.1  # RandomRotation factor (fraction of a full turn)
    zoom: float = 0.2  # RandomZoom factor
    flip: bool = True  # RandomFlip("horizontal")
    # Augmented copies cached per training image (0: no augmentation). Default 0: with a frozen
    # MobileNet, 4 copies did not beat none on val.txt and cost a backbone pass each.
    copies: int = bounded(0, ge=0)
    cache: CacheMode = "auto"  # auto: cache the frozen bottom's output; none: train end to end on images
    cache_dir: Optional[str] = None  # None: RUN_DIR/cache, deleted after a successful run
    max_cache_gb: float = 8.0  # a larger activation cache falls back to training on images
    workers: int = bounded(4, ge=1)  # decode threads

    def effective_unfreeze(self) -> Optional[int]:
        """0 (head only), N top layers, or None (the whole backbone)."""
        if self.freeze_backbone:
            return 0
        return None if self.unfreeze < 0 else self.unfreeze

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate(config: TrainConfig) -> TrainConfig:
    """Check what the declaration cannot (the backbone is registered); resolve the image size."""
    from ..models import get_spec, names

    if config.backbone not in names("backbone"):
        raise errors.unknown_name("backbone", config.backbone, names("backbone"))
    size = config.image_size or get_spec(config.backbone).input_size
    return dataclasses.replace(config, image_size=int(size))


def load_train_config(path: Optional[str | Path] = None, overrides: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """Defaults, then a YAML file (flat, or under a `train:` section), then overrides (None
    values ignored). An unknown key is an error naming the closest valid keys."""
    config = TrainConfig()
    if path is not None:
        data = read_yaml_mapping(path, "train settings")
        if set(data) == {"train"} and isinstance(data["train"], Mapping):
            data = data["train"]
        config = update_section(config, data, "train.")
    if overrides:
        config = update_section(config, {k: v for k, v in overrides.items() if v is not None}, "train.")
    return config
