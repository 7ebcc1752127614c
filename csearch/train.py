"""`python -m csearch.train classifier`: train the paper's category classifier.

    python -m csearch.train classifier --data SPEC --backbone NAME --out RUN_DIR
        [--weights imagenet|none|PATH] [--config FILE] [--epochs N] [--batch-size N]
        [--image-size N] [--color rgb|gray] [--freeze-backbone | --unfreeze N] [--val SPEC]
        [--seed N] [--set KEY=VALUE ...] [--json]

How training stays fast on a CPU: every image is decoded and resized once (thread pool), then
the frozen bottom of the backbone runs once per image and per *copy* - copy 0 is the image
itself, copies 1..K are random augmentations (the classifier's own RandomFlip/RandomRotation/
RandomZoom layers) - and the activations are cached on disk. Each epoch then shows every image
as one randomly chosen copy, and only the trainable top (the head, plus the unfrozen top
backbone layers) runs forward and backward. With K copies, augmentation is K-fold instead of
fresh every epoch: the price of training in minutes instead of hours (measured in
docs/results/classifier.md). Where the unfrozen part cannot be cut off as one tensor (or the
cache would be too large) the whole model trains on images, with augmentation fresh per batch.

Early stopping and the learning-rate schedule watch a validation split carved from the
training data (a seeded stratified split, or --val SPEC), never the data you report on.
An interrupted run resumes when the same command is run again with the same --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import resource
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import yaml

from . import __version__, errors
from .config import _update_section
from .console import parse_sets
from .data import Catalogue, read_catalogue

log = logging.getLogger("csearch.train")

COLORS = ("rgb", "gray")
MONITORS = ("val_loss", "val_accuracy")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (written resolved to RUN_DIR/config.yaml)."""

    backbone: str = "mobilenetv2"  # a registered backbone (`csearch models`); v2 measured best here
    weights: str = "imagenet"  # imagenet | none | a weights file path
    image_size: Optional[int] = None  # None: the backbone's native size (224 for MobileNet)
    color: str = "rgb"  # rgb | gray (the paper: gray)
    epochs: int = 100  # maximum epochs of the main stage (early stopping usually ends it sooner)
    batch_size: int = 32
    freeze_backbone: bool = False  # True: train the head only, whatever unfreeze says
    # Top backbone layers trained with the head (-1: all). Default 0: on Grocery, fine-tuning
    # MobileNet's top block scored no better on val.txt and took 4x longer (docs/results).
    unfreeze: int = 0
    warmup_epochs: int = 0  # head-only epochs before the unfrozen layers join
    val: Optional[str] = None  # a catalogue SPEC for validation; None: split off --data
    val_fraction: float = 0.2  # of each category, when val is None
    seed: int = 0
    learning_rate: float = 1e-3  # SGD, the paper's optimiser
    momentum: float = 0.9
    nesterov: bool = True
    lr_factor: float = 0.5  # ReduceLROnPlateau
    lr_patience: int = 5
    patience: int = 10  # EarlyStopping (restore_best_weights=True)
    monitor: str = "val_loss"  # val_loss | val_accuracy
    rotation: float = 0.1  # RandomRotation factor (fraction of a full turn)
    zoom: float = 0.2  # RandomZoom factor
    flip: bool = True  # RandomFlip("horizontal")
    # Augmented copies cached per training image (0: no augmentation). Default 0: with a frozen
    # MobileNet, 4 copies did not beat none on val.txt and cost a backbone pass each.
    copies: int = 0
    cache: str = "auto"  # auto: cache the frozen bottom's output; none: train end to end on images
    cache_dir: Optional[str] = None  # None: RUN_DIR/cache, deleted after a successful run
    max_cache_gb: float = 8.0  # a larger activation cache falls back to training on images
    workers: int = 4  # decode threads

    def effective_unfreeze(self) -> Optional[int]:
        """0 (head only), N top layers, or None (the whole backbone)."""
        if self.freeze_backbone:
            return 0
        return None if self.unfreeze < 0 else self.unfreeze

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate(config: TrainConfig) -> TrainConfig:
    """Check values the type coercion cannot (names, ranges); resolve the image size."""
    from .models import get_spec, names

    if config.backbone not in names("backbone"):
        raise errors.unknown_name("backbone", config.backbone, names("backbone"))
    if config.color not in COLORS:
        raise errors.unknown_name("color", config.color, COLORS)
    if config.monitor not in MONITORS:
        raise errors.unknown_name("monitor", config.monitor, MONITORS)
    if config.cache not in ("auto", "none"):
        raise errors.unknown_name("cache mode", config.cache, ("auto", "none"))
    if not 0 < config.val_fraction < 1:
        raise errors.ConfigError(f"val_fraction must be between 0 and 1, got {config.val_fraction}")
    for key in ("epochs", "batch_size", "workers"):
        if getattr(config, key) < 1:
            raise errors.ConfigError(f"{key} must be >= 1, got {getattr(config, key)}")
    for key in ("copies", "warmup_epochs", "patience", "lr_patience"):
        if getattr(config, key) < 0:
            raise errors.ConfigError(f"{key} must be >= 0, got {getattr(config, key)}")
    size = config.image_size or get_spec(config.backbone).input_size
    return dataclasses.replace(config, image_size=int(size))


def load_train_config(path: Optional[str | Path] = None,
                      overrides: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """Defaults, then a YAML file (flat, or under a `train:` section), then overrides (None
    values ignored). An unknown key is an error naming the closest valid keys."""
    config = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise errors.ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise errors.ConfigError(f"config file {path} is not valid YAML: {exc}".splitlines()[0]) from None
        if not isinstance(data, Mapping):
            raise errors.ConfigError(f"config file {path} must hold a mapping of train settings")
        if set(data) == {"train"} and isinstance(data["train"], Mapping):
            data = data["train"]
        config = _update_section(config, data, "train.")
    if overrides:
        config = _update_section(config, {k: v for k, v in overrides.items() if v is not None}, "train.")
    return config


# --------------------------------------------------------------------------------------------
# Data

@dataclass
class Split:
    """Images of one split, decoded to the model's input (uint8 (N, S, S, 3)), with labels."""

    images: np.ndarray
    labels: np.ndarray  # int class indices
    paths: list[str]


def labelled(catalogue: Catalogue, role: str, say: Callable[[str], None]) -> list:
    records = [r for r in catalogue.records if r.category is not None]
    if len(records) < len(catalogue.records):
        say(f"{role}: {len(catalogue.records) - len(records)} unlabelled images ignored")
    if not records:
        raise errors.CatalogueError(f"{role} catalogue {catalogue.spec} has no labelled images "
                                    f"(a category is needed to train a classifier)")
    return records


def stratified_split(labels: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int], list[str]]:
    """Seeded per-category split: round(fraction * n) images of each category (at least 1)
    go to validation. A category with a single image cannot be split: it stays in training
    (so the model still learns it) and a note explains why its validation has none."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    train, val, notes = [], [], []
    for label in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        if len(members) < 2:
            notes.append(f"category {label!r} has 1 image: kept for training, none held out for validation")
            train.extend(members.tolist())
            continue
        n_val = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        val.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    return sorted(train), sorted(val), notes


def _load_one(path: str, size: int, color: str):
    from .preprocess import load_image, model_input

    try:
        return model_input(load_image(path), size, color), None
    except errors.ImageError as exc:
        return None, str(exc)


def load_images(paths: Sequence[str], size: int, color: str, workers: int,
                say: Callable[[str], None]) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Decode and resize in a thread pool (OpenCV and PIL release the GIL). Returns the images
    that loaded, their indices into `paths`, and the (path, reason) of those that did not."""
    images, kept, skipped = [], [], []
    started = time.perf_counter()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for index, (image, reason) in enumerate(pool.map(lambda p: _load_one(p, size, color), paths)):
            if image is None:
                skipped.append((paths[index], reason))
            else:
                images.append(image)
                kept.append(index)
            if (index + 1) % 1000 == 0:
                say(f"  decoded {index + 1}/{len(paths)} images")
    say(f"decoded {len(kept)} images in {time.perf_counter() - started:.1f}s"
        + (f"; {len(skipped)} unreadable, skipped" if skipped else ""))
    for path, reason in skipped[:20]:
        say(f"  skipped {reason}" if path in reason else f"  skipped {path}: {reason}")
    stack = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return stack, kept, skipped


def prepare_data(config: TrainConfig, catalogue: Catalogue, say: Callable[[str], None]):
    """Split and decode a catalogue (+ config.val). Returns (class_names, train, val, skipped, notes)."""
    data = catalogue.spec
    say(f"data: {catalogue.summary()}")
    records = labelled(catalogue, "--data", say)
    notes: list[str] = []
    if config.val:
        val_catalogue = read_catalogue(config.val)
        say(f"val: {val_catalogue.summary()}")
        val_records = labelled(val_catalogue, "--val", say)
        train_records = records
    else:
        train_idx, val_idx, notes = stratified_split([r.category for r in records],
                                                     config.val_fraction, config.seed)
        train_records = [records[i] for i in train_idx]
        val_records = [records[i] for i in val_idx]
    for note in notes:
        say(note)
    class_names = sorted({r.category for r in train_records})
    if len(class_names) < 2:
        raise errors.CatalogueError(f"catalogue {data} has {len(class_names)} category; a classifier needs at least 2")
    unknown = sorted({r.category for r in val_records} - set(class_names))
    if unknown:
        raise errors.CatalogueError(f"--val has categories not in --data: {', '.join(unknown[:8])}")
    if not val_records:
        raise errors.CatalogueError("no validation images: every category has a single image; "
                                    "add images or pass --val SPEC")
    index = {name: i for i, name in enumerate(class_names)}
    splits, skipped = [], []
    for role, subset in (("train", train_records), ("val", val_records)):
        paths = [r.path for r in subset]
        images, kept, bad = load_images(paths, config.image_size, config.color, config.workers, say)
        if len(kept) == 0:
            raise errors.CatalogueError(f"no readable {role} images ({len(bad)} unreadable)")
        labels = np.array([index[subset[i].category] for i in kept], np.int64)
        splits.append(Split(images, labels, [paths[i] for i in kept]))
        skipped += bad
    return class_names, splits[0], splits[1], skipped, notes


# --------------------------------------------------------------------------------------------
# Cached activations

def _digest(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def find_cut(model, unfreeze: Optional[int]):
    """Split the backbone where its frozen bottom ends: (bottom, top).

    bottom: a model from images (float32 RGB [0, 255]) to the cut activations; top: a model
    from those activations to the pooled features, holding every trainable backbone layer
    (None when the whole backbone is frozen). The cut is the deepest layer output below the
    first trainable layer through which the whole graph passes (a residual branch around it
    makes Keras refuse the split, so the next layer down is tried). None when there is none.
    """
    import keras

    from .classify import FEATURES_LAYER, backbone_network
    from .models import PREPROCESS_LAYER

    features = model.get_layer(FEATURES_LAYER).layer
    if not unfreeze and unfreeze is not None:
        return features, None
    network = backbone_network(model)
    layers = [layer for layer in network.layers if layer.__class__.__name__ != "InputLayer"]
    first = next((i for i, layer in enumerate(layers) if layer.trainable), len(layers))
    for candidate in reversed(layers[max(0, first - 64):first]):
        try:
            top = keras.Model(candidate.output, network.output, name="backbone_top")
        except ValueError:  # "not connected": a skip connection bypasses this tensor
            continue
        image = keras.Input(features.input_shape[1:], name="image", dtype="float32")
        cut = keras.Model(network.input, candidate.output)(features.get_layer(PREPROCESS_LAYER)(image))
        return keras.Model(image, cut, name=f"bottom_to_{candidate.name}"), top
    return None


def trainable_part(model, top, input_shape):
    """The model that is fitted: cached activations -> [top backbone layers] -> head. It shares
    its layers with `model`, so fitting it trains the classifier."""
    import keras

    from .classify import HEAD_LAYERS, _inference_mode_class

    inputs = keras.Input(input_shape, name="cached")
    x = inputs if top is None else _inference_mode_class()(top, name="top")(inputs)
    for name in HEAD_LAYERS:
        x = model.get_layer(name)(x)
    return keras.Model(inputs, x, name="trainable_part")


def extract(bottom, augment, images: np.ndarray, augmented: bool, batch_size: int) -> np.ndarray:
    """Run the frozen bottom over images (optionally through the augmentation layers in
    training mode), as float16 to halve the cache."""
    import keras

    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].astype(np.float32)
        if augmented:
            # convert_to_numpy, not np.asarray: a torch tensor on a GPU has no __array__ view
            x = keras.ops.convert_to_numpy(augment(x, training=True)).astype(np.float32)
        out.append(np.asarray(bottom.predict_on_batch(x), np.float16))
    return np.concatenate(out)


class ActivationCache:
    """Copies of the bottom's output, one .npy per (split, copy), memory-mapped on reading.
    Keys cover everything that changes the numbers, so a stale file is never reused."""

    def __init__(self, folder: Path, key_parts: tuple):
        self.folder = Path(folder)
        self.key = _digest(*key_parts)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, split: str, copy: int) -> Path:
        return self.folder / f"{self.key}-{split}-{copy}.npy"

    def get(self, split: str, copy: int, compute: Callable[[], np.ndarray]) -> np.ndarray:
        path = self.path(split, copy)
        if not path.is_file():
            _atomic_save(path, compute())
        return np.load(path, mmap_mode="r")


def _batches_class():
    import keras

    class Batches(keras.utils.PyDataset):
        """Batches from `copies` (arrays of the same N rows): each epoch shows each row once, as
        a randomly chosen copy (copy 0 is un-augmented), in a fresh seeded order."""

        def __init__(self, copies: Sequence[np.ndarray], labels: np.ndarray, batch_size: int,
                     shuffle: bool, seed: int, **kwargs):
            super().__init__(**kwargs)
            self.copies, self.labels, self.batch_size = list(copies), labels, batch_size
            self.shuffle, self.rng = shuffle, np.random.default_rng(seed)
            self.on_epoch_end()

        def __len__(self):
            return int(np.ceil(len(self.labels) / self.batch_size))

        def on_epoch_end(self):
            n = len(self.labels)
            self.order = self.rng.permutation(n) if self.shuffle else np.arange(n)
            self.choice = self.rng.integers(0, len(self.copies), n) if self.shuffle else np.zeros(n, int)

        def __getitem__(self, index):
            rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
            x = np.stack([self.copies[self.choice[r]][r] for r in rows]).astype(np.float32)
            return x, self.labels[rows]

    return Batches


# --------------------------------------------------------------------------------------------
# Callbacks: progress, history, resumable early stopping / LR schedule

def _callbacks_module():
    import keras

    class EpochLog(keras.callbacks.Callback):
        """One line per epoch on stderr (Keras' own progress bar is off: verbose=0)."""

        def __init__(self, say, stage: str, epochs: int):
            super().__init__()
            self.say, self.stage, self.epochs = say, stage, epochs

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            self.say(f"[{self.stage}] epoch {epoch + 1}/{self.epochs} "
                     f"loss {logs.get('loss', float('nan')):.4f} acc {logs.get('accuracy', float('nan')):.4f} "
                     f"val_loss {logs.get('val_loss', float('nan')):.4f} "
                     f"val_acc {logs.get('val_accuracy', float('nan')):.4f} lr {lr:.2e} "
                     f"({time.perf_counter() - self.started:.1f}s)")

    class HistoryCSV(keras.callbacks.Callback):
        """history.csv: one row per (stage, epoch); a resumed epoch replaces its row."""

        FIELDS = ("stage", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds")

        def __init__(self, path: Path, stage: str):
            super().__init__()
            self.path, self.stage = Path(path), stage

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            row = {"stage": self.stage, "epoch": epoch + 1,
                   **{k: logs.get(k) for k in ("loss", "accuracy", "val_loss", "val_accuracy")},
                   "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
                   "seconds": round(time.perf_counter() - self.started, 3)}
            rows = [r for r in read_history(self.path) if (r["stage"], int(r["epoch"])) != (self.stage, epoch + 1)]
            write_history(self.path, rows + [row], self.FIELDS)

    def _state_paths(folder: Path, name: str) -> tuple[Path, Path]:
        return folder / f"{name}.json", folder / f"{name}.best.npz"

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        """EarlyStopping whose counters and best weights survive an interruption."""

        def __init__(self, folder: Path, **kwargs):
            super().__init__(**kwargs)
            self.folder = Path(folder)

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            state_path, weights_path = _state_paths(self.folder, "early_stopping")
            if state_path.is_file():
                state = json.loads(state_path.read_text())
                self.wait, self.best, self.best_epoch = state["wait"], state["best"], state["best_epoch"]
                if weights_path.is_file():
                    with np.load(weights_path) as data:
                        self.best_weights = [data[f"w{i}"] for i in range(len(data.files))]

        def on_epoch_end(self, epoch, logs=None):
            previous_best = self.best_epoch
            super().on_epoch_end(epoch, logs)
            self.folder.mkdir(parents=True, exist_ok=True)
            state_path, weights_path = _state_paths(self.folder, "early_stopping")
            if self.best_weights is not None and (self.best_epoch != previous_best or not weights_path.is_file()):
                tmp = weights_path.with_name("tmp-" + weights_path.name)
                np.savez(tmp, **{f"w{i}": w for i, w in enumerate(self.best_weights)})
                os.replace(tmp, weights_path)
            best = None if self.best is None else float(self.best)
            state_path.write_text(json.dumps({"wait": self.wait, "best": best, "best_epoch": self.best_epoch}))

    class ResumableReduceLR(keras.callbacks.ReduceLROnPlateau):
        """ReduceLROnPlateau whose counters survive an interruption (the learning rate itself
        is an optimizer variable, restored by BackupAndRestore)."""

        def __init__(self, folder: Path, **kwargs):
            super().__init__(**kwargs)
            self.folder = Path(folder)

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            path = self.folder / "reduce_lr.json"
            if path.is_file():
                state = json.loads(path.read_text())
                self.wait, self.best, self.cooldown_counter = state["wait"], state["best"], state["cooldown"]

        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            self.folder.mkdir(parents=True, exist_ok=True)
            best = None if self.best is None else float(self.best)
            (self.folder / "reduce_lr.json").write_text(
                json.dumps({"wait": self.wait, "best": best, "cooldown": self.cooldown_counter}))

    return EpochLog, HistoryCSV, ResumableEarlyStopping, ResumableReduceLR


def read_history(path: Path) -> list[dict]:
    import csv

    if not Path(path).is_file():
        return []
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_history(path: Path, rows: list[dict], fields: Sequence[str]) -> None:
    import csv

    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in fields})
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Training

def _compile(model, config: TrainConfig) -> None:
    import keras

    optimizer = keras.optimizers.SGD(learning_rate=config.learning_rate, momentum=config.momentum,
                                     nesterov=config.nesterov)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def fit_stage(model, stage: str, train_data, val_data, epochs: int, config: TrainConfig,
              run_dir: Path, say: Callable[[str], None]) -> None:
    """Fit `model` for one stage with the paper's callbacks; resumable via RUN_DIR/backup."""
    import keras

    EpochLog, HistoryCSV, ResumableEarlyStopping, ResumableReduceLR = _callbacks_module()
    backup = run_dir / "backup" / stage
    _compile(model, config)
    mode = "min" if config.monitor == "val_loss" else "max"
    callbacks = [
        EpochLog(say, stage, epochs),
        HistoryCSV(run_dir / "history.csv", stage),
        ResumableReduceLR(backup, monitor=config.monitor, mode=mode, factor=config.lr_factor,
                          patience=config.lr_patience),
        ResumableEarlyStopping(backup, monitor=config.monitor, mode=mode, patience=config.patience,
                               restore_best_weights=True),
        # Last, so that its epoch counter (the commit point) is written after the others.
        keras.callbacks.BackupAndRestore(str(backup)),
    ]
    model.fit(train_data, validation_data=val_data, epochs=epochs, verbose=0, callbacks=callbacks)


def _weights_fingerprint(path: Optional[Path]) -> Optional[str]:
    from .models import file_sha256

    return None if path is None else file_sha256(path)


def _check_run_dir(run_dir: Path, resolved: dict) -> Optional[dict]:
    """Resume rules: the same config resumes (or returns the finished summary); another
    config in the same RUN_DIR is an error rather than a silent mix of two runs."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return None
    saved = yaml.safe_load(config_path.read_text()) or {}
    previous, current = saved.get("train", {}), resolved["train"]
    changed = [(k, previous.get(k), current.get(k)) for k in sorted(set(previous) | set(current))
               if previous.get(k) != current.get(k)]
    changed += [(k, saved.get(k), resolved.get(k)) for k in ("data", "weights_sha256")
                if saved.get(k) != resolved.get(k)]
    if changed:
        key, old, new = changed[0]
        raise errors.ConfigError(f"{run_dir} holds a run with another config ({key}: {old!r} -> {new!r}); "
                                 f"use a new --out or delete it")
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else None


def train_classifier(config: TrainConfig, data: str, out: str | Path,
                     say: Callable[[str], None] = log.info, command: Optional[str] = None) -> dict:
    """Train and write RUN_DIR (model.keras, classes.json, history.csv, config.yaml,
    summary.json). Returns the summary."""
    started = time.perf_counter()
    config = validate(config)
    catalogue = read_catalogue(data)  # cheap: a wrong SPEC fails before weights are looked up
    from .models import resolve_weights

    weights_path = resolve_weights(config.backbone, config.weights)  # fail fast: offline, typo
    run_dir = Path(out).expanduser().resolve()
    resolved = {"train": config.to_dict(), "data": str(Path(data).expanduser().resolve()), "command": command,
                "csearch_version": __version__,
                "weights_file": None if weights_path is None else str(weights_path),
                "weights_sha256": _weights_fingerprint(weights_path)}
    finished = _check_run_dir(run_dir, resolved)
    if finished is not None:
        say(f"{run_dir} already holds this finished run; nothing to do")
        return finished
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    import keras

    keras.utils.set_random_seed(config.seed)
    class_names, train, val, skipped, notes = prepare_data(config, catalogue, say)
    (run_dir / "classes.json").write_text(json.dumps(class_names, indent=1) + "\n")
    say(f"{len(class_names)} classes; {len(train.labels)} training and {len(val.labels)} validation images")

    from .classify import build_classifier, set_trainable

    unfreeze = config.effective_unfreeze()
    model = build_classifier(config.backbone, len(class_names), weights_path, config.image_size,
                             unfreeze, rotation=config.rotation, zoom=config.zoom, flip=config.flip,
                             seed=config.seed)
    plan = _plan(model, config, unfreeze, len(train.labels) + len(val.labels), say)
    cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else run_dir / "cache"
    feature_seconds = 0.0
    if plan is None:
        (train_data, val_data), fitted, mode = _image_batches(train, val, config), model, "images"
    else:
        bottom, top = plan
        t0 = time.perf_counter()
        train_data, val_data, cut_shape = _cached_batches(model, bottom, train, val, config, cache_dir,
                                                          weights_path, say)
        feature_seconds = time.perf_counter() - t0
        fitted = trainable_part(model, top, cut_shape)
        mode = "features" if top is None else f"cached activations {tuple(cut_shape)}"

    stages = _stages(config, unfreeze)
    for stage, stage_unfreeze, epochs in stages:
        done = run_dir / "backup" / f"{stage}.done.weights.h5"
        set_trainable(model, stage_unfreeze)
        if done.is_file():
            model.load_weights(done)
            say(f"[{stage}] finished before; weights restored")
            continue
        trainable = sum(int(np.prod(w.shape)) for w in fitted.trainable_weights)
        say(f"[{stage}] training {trainable:,} parameters for up to {epochs} epochs ({mode})")
        fit_stage(fitted, stage, train_data, val_data, epochs, config, run_dir, say)
        model.save_weights(done)
    set_trainable(model, unfreeze)

    val_loss, val_accuracy = _evaluate(fitted, val_data)
    model.save(run_dir / "model.keras")
    history = read_history(run_dir / "history.csv")
    summary = {
        "backbone": config.backbone, "weights": config.weights, "image_size": config.image_size,
        "color": config.color, "mode": mode, "unfreeze": unfreeze,
        "val_accuracy": val_accuracy, "val_loss": val_loss, "val_source": config.val or
        f"stratified {config.val_fraction:.0%} of --data (seed {config.seed})",
        "n_classes": len(class_names), "n_train": int(len(train.labels)), "n_val": int(len(val.labels)),
        "epochs_run": {s: sum(1 for r in history if r["stage"] == s) for s, _, _ in stages},
        "params": int(model.count_params()),
        "trainable_params": int(sum(int(np.prod(w.shape)) for w in model.trainable_weights)),
        "train_seconds": round(time.perf_counter() - started, 1),
        "feature_seconds": round(feature_seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "skipped": [{"path": p, "reason": r} for p, r in skipped], "n_skipped": len(skipped),
        "notes": notes,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(run_dir / "backup", ignore_errors=True)
    if not config.cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)
    say(f"done in {summary['train_seconds']:.0f}s: validation accuracy {val_accuracy:.4f} -> {run_dir}")
    return summary


def _stages(config: TrainConfig, unfreeze: Optional[int]) -> list[tuple[str, Optional[int], int]]:
    """(name, unfreeze, epochs) per stage: an optional head-only warm-up, then the main stage."""
    if unfreeze == 0:
        return [("head", 0, config.epochs)]
    warmup = [("warmup", 0, config.warmup_epochs)] if config.warmup_epochs else []
    return warmup + [("finetune", unfreeze, config.epochs)]


def _plan(model, config: TrainConfig, unfreeze: Optional[int], n_images: int, say):
    """(bottom, top) for training on cached activations, or None to train on images."""
    if config.cache == "none":
        say("cache: none; training end to end on images (augmentation fresh every batch)")
        return None
    plan = find_cut(model, unfreeze)
    if plan is None:
        say("the whole backbone trains, or no single tensor separates its frozen bottom from the "
            "trained top: training on images")
        return None
    bottom, _ = plan
    per_image = int(np.prod(bottom.output_shape[1:])) * 2  # float16
    size_gb = per_image * n_images * (config.copies + 1) / 1e9
    if size_gb > config.max_cache_gb:
        say(f"the activation cache would take {size_gb:.1f} GB (> max_cache_gb {config.max_cache_gb}); "
            f"training on images")
        return None
    return plan


def _cached_batches(model, bottom, train: Split, val: Split, config: TrainConfig, cache_dir: Path,
                    weights_path: Optional[Path], say):
    """Compute (or reuse) the bottom's activations for copy 0..K of the training images and
    copy 0 of the validation images; return the two PyDatasets and the activation shape."""
    from .classify import build_augmentation

    Batches = _batches_class()
    key = (config.backbone, _weights_fingerprint(weights_path), config.image_size, config.color,
           bottom.name, bottom.output_shape, config.rotation,
           config.zoom, config.flip, config.seed, train.paths, val.paths)
    cache = ActivationCache(cache_dir, key)
    batch = max(config.batch_size, 32)
    copies = []
    for copy in range(config.copies + 1):
        t0 = time.perf_counter()
        hit = cache.path("train", copy).is_file()
        # Fresh layers seeded per copy: a resumed run recomputes exactly the copy it lost.
        augment = build_augmentation(config.rotation, config.zoom, config.flip, seed=config.seed * 1000 + copy)
        copies.append(cache.get("train", copy, lambda: extract(bottom, augment, train.images, copy > 0, batch)))
        say(f"activations of training copy {copy}/{config.copies}"
            f"{' (augmented)' if copy else ''}: {'cached' if hit else f'{time.perf_counter() - t0:.1f}s'}")
    val_copy = cache.get("val", 0, lambda: extract(bottom, None, val.images, False, batch))
    train_data = Batches(copies, train.labels, config.batch_size, True, config.seed)
    val_data = Batches([val_copy], val.labels, max(config.batch_size, 64), False, config.seed)
    return train_data, val_data, tuple(val_copy.shape[1:])


def _image_batches(train: Split, val: Split, config: TrainConfig):
    """Batches of decoded images; augmentation runs in the model (fresh every batch)."""
    Batches = _batches_class()
    # Two threads assemble the next batches while the model trains on this one (prefetch).
    train_data = Batches([train.images], train.labels, config.batch_size, True, config.seed,
                         workers=2, use_multiprocessing=False)
    val_data = Batches([val.images], val.labels, max(config.batch_size, 64), False, config.seed)
    return train_data, val_data


def _evaluate(model, data) -> tuple[float, float]:
    loss, accuracy = model.evaluate(data, verbose=0)
    return float(loss), float(accuracy)


# --------------------------------------------------------------------------------------------
# CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m csearch.train", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("classifier", help="train the category classifier (the paper's head on a backbone)")
    p.add_argument("--data", required=True, metavar="SPEC", help="training catalogue (folder, CSV, Grocery .txt)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="output folder; the same --out resumes")
    p.add_argument("--backbone", help="registered backbone (default mobilenetv2)")
    p.add_argument("--weights", help="imagenet | none | weights file (default imagenet)")
    p.add_argument("--config", metavar="FILE", help="YAML with train settings; flags override it")
    p.add_argument("--epochs", type=int, help="maximum epochs (early stopping ends sooner)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--image-size", type=int, help="input side (default: the backbone's native size)")
    p.add_argument("--color", help="rgb | gray")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--freeze-backbone", action="store_true", default=None, help="train the head only")
    group.add_argument("--unfreeze", type=int, metavar="N", help="also train the top N backbone layers (-1: all)")
    p.add_argument("--val", metavar="SPEC", help="validation catalogue (default: stratified split of --data)")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="any other train setting, e.g. --set copies=2 (see TrainConfig)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    return parser


def _run(args: argparse.Namespace) -> int:
    overrides = {**parse_sets(args.set), "backbone": args.backbone, "weights": args.weights,
                 "epochs": args.epochs, "batch_size": args.batch_size, "image_size": args.image_size,
                 "color": args.color, "val": args.val, "seed": args.seed}
    if args.freeze_backbone:
        overrides["freeze_backbone"] = True
    if args.unfreeze is not None:
        overrides.update(unfreeze=args.unfreeze, freeze_backbone=False)
    config = load_train_config(args.config, overrides)
    summary = train_classifier(config, args.data, args.out, log.info, args.command_line)
    if args.json:
        args.stdout.write(json.dumps(summary) + "\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """One-line errors (exit 2), Ctrl-C resumable (exit 130), stdout kept for --json: the
    shared csearch.console.run_command."""
    from .console import quiet_frameworks, run_command

    quiet_frameworks()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = "python -m csearch.train " + " ".join(argv)
    return run_command(_run, args, "run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
