"""What fit() reads: batches of decoded images, or of cached activations (copy 0 the image
itself, copies 1..K augmented), each epoch showing every image once as a random copy.

This module imports Keras: the trainer imports it only when it trains.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import keras
import numpy as np

from ..classifier_model import build_augmentation
from .cache import ActivationCache
from .config import TrainConfig
from .data import Split

# Validation batches only run forward, so they can be larger than training batches.
MIN_VAL_BATCH = 64
# Extraction runs forward only, through the frozen bottom.
MIN_EXTRACT_BATCH = 32


class Batches(keras.utils.PyDataset):
    """Batches from `copies` (arrays of the same N rows): each epoch shows each row once, as
    a randomly chosen copy (copy 0 is un-augmented), in a fresh seeded order."""

    def __init__(
        self, copies: Sequence[np.ndarray], labels: np.ndarray, batch_size: int, shuffle: bool, seed: int, **kwargs
    ):
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
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        x = np.stack([self.copies[self.choice[r]][r] for r in rows]).astype(np.float32)
        return x, self.labels[rows]


def extract(bottom, augment, images: np.ndarray, augmented: bool, batch_size: int) -> np.ndarray:
    """Run the frozen bottom over images (optionally through the augmentation layers in
    training mode), as float16 to halve the cache."""
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].astype(np.float32)
        if augmented:
            # convert_to_numpy, not np.asarray: a torch tensor on a GPU has no __array__ view
            x = keras.ops.convert_to_numpy(augment(x, training=True)).astype(np.float32)
        out.append(np.asarray(bottom.predict_on_batch(x), np.float16))
    return np.concatenate(out)


def cached_batches(
    bottom,
    train: Split,
    val: Split,
    config: TrainConfig,
    cache_dir: Path,
    weights_sha256: Optional[str],
    say: Callable[[str], None],
):
    """Compute (or reuse) the bottom's activations for copy 0..K of the training images and
    copy 0 of the validation images; return the two PyDatasets and the activation shape."""
    key = (
        config.backbone,
        weights_sha256,
        config.image_size,
        config.color,
        bottom.name,
        bottom.output_shape,
        config.rotation,
        config.zoom,
        config.flip,
        config.seed,
        train.paths,
        val.paths,
    )
    cache = ActivationCache(cache_dir, key)
    batch = max(config.batch_size, MIN_EXTRACT_BATCH)
    copies = []
    for copy in range(config.copies + 1):
        t0 = time.perf_counter()
        hit = cache.path("train", copy).is_file()
        # Fresh layers seeded per copy: a resumed run recomputes exactly the copy it lost.
        augment = build_augmentation(config.rotation, config.zoom, config.flip, seed=config.seed * 1000 + copy)
        copies.append(cache.get("train", copy, lambda: extract(bottom, augment, train.images, copy > 0, batch)))  # noqa: B023 (called at once, in this iteration)
        say(
            f"activations of training copy {copy}/{config.copies}"
            f"{' (augmented)' if copy else ''}: {'cached' if hit else f'{time.perf_counter() - t0:.1f}s'}"
        )
    val_copy = cache.get("val", 0, lambda: extract(bottom, None, val.images, False, batch))
    train_data = Batches(copies, train.labels, config.batch_size, True, config.seed)
    val_data = Batches([val_copy], val.labels, max(config.batch_size, MIN_VAL_BATCH), False, config.seed)
    return train_data, val_data, tuple(val_copy.shape[1:])


def image_batches(train: Split, val: Split, config: TrainConfig):
    """Batches of decoded images; augmentation runs in the model (fresh every batch)."""
    # Two threads assemble the next batches while the model trains on this one (prefetch).
    train_data = Batches(
        [train.images], train.labels, config.batch_size, True, config.seed, workers=2, use_multiprocessing=False
    )
    val_data = Batches([val.images], val.labels, max(config.batch_size, MIN_VAL_BATCH), False, config.seed)
    return train_data, val_data
