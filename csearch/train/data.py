"""Training data: labelled records, the seeded stratified validation split, decoded images."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .. import errors
from ..data import Catalogue, read_catalogue
from ..types import Record
from .config import TrainConfig

Say = Callable[[str], None]


@dataclass(frozen=True)
class Split:
    """Images of one split, decoded to the model's input (uint8 (N, S, S, 3)), with labels."""

    images: np.ndarray
    labels: np.ndarray  # int class indices
    paths: list[str]


@dataclass(frozen=True)
class PreparedData:
    """What `prepare_data` hands the trainer."""

    class_names: list[str]
    train: Split
    val: Split
    skipped: list[tuple[str, str]]  # (path, reason) of unreadable images
    notes: list[str]  # why the split differs from what was asked (e.g. single-image categories)


def labelled(catalogue: Catalogue, role: str, say: Say) -> list[Record]:
    """The catalogue's records that have a category (a classifier cannot learn from the rest)."""
    records = [r for r in catalogue.records if r.category is not None]
    if len(records) < len(catalogue.records):
        say(f"{role}: {len(catalogue.records) - len(records)} unlabelled images ignored")
    if not records:
        raise errors.CatalogueError(
            f"{role} catalogue {catalogue.spec} has no labelled images (a category is needed to train a classifier)"
        )
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
    from ..preprocess import load_image, model_input

    try:
        return model_input(load_image(path), size, color), None
    except errors.ImageError as exc:
        return None, str(exc)


def load_images(
    paths: Sequence[str], size: int, color: str, workers: int, say: Say
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
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
    say(
        f"decoded {len(kept)} images in {time.perf_counter() - started:.1f}s"
        + (f"; {len(skipped)} unreadable, skipped" if skipped else "")
    )
    for path, reason in skipped[:20]:
        say(f"  skipped {reason}" if path in reason else f"  skipped {path}: {reason}")
    stack = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return stack, kept, skipped


def _split_records(config: TrainConfig, records: list[Record], say: Say):
    """(train records, val records, notes): config.val's catalogue, or a stratified split."""
    if config.val:
        val_catalogue = read_catalogue(config.val)
        say(f"val: {val_catalogue.summary()}")
        return records, labelled(val_catalogue, "--val", say), []
    train_idx, val_idx, notes = stratified_split([r.category for r in records], config.val_fraction, config.seed)
    return [records[i] for i in train_idx], [records[i] for i in val_idx], notes


def prepare_data(config: TrainConfig, catalogue: Catalogue, say: Say) -> PreparedData:
    """Split and decode a catalogue (+ config.val)."""
    say(f"data: {catalogue.summary()}")
    train_records, val_records, notes = _split_records(config, labelled(catalogue, "--data", say), say)
    for note in notes:
        say(note)
    class_names = sorted({r.category for r in train_records})
    if len(class_names) < 2:
        raise errors.CatalogueError(
            f"catalogue {catalogue.spec} has {len(class_names)} category; a classifier needs at least 2"
        )
    unknown = sorted({r.category for r in val_records} - set(class_names))
    if unknown:
        raise errors.CatalogueError(f"--val has categories not in --data: {', '.join(unknown[:8])}")
    if not val_records:
        raise errors.CatalogueError(
            "no validation images: every category has a single image; add images or pass --val SPEC"
        )
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
    return PreparedData(class_names, splits[0], splits[1], skipped, notes)
