"""The embedding head: its Keras models, the held-out Recall@1 that stops training, and the export.

The head learns on pooled trunk features (cached), so an epoch costs seconds: L2-normalise,
a linear projection to `dim`, L2-normalise again; during training a cosine classifier with one
proxy per product and the normalised-softmax loss (scale, margin) pulls each product together.
The exported model runs the pooling too: feature map -> embedding.
This module imports Keras: the trainer imports it only when it trains.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from ..embedder.layers import CosineLogits, L2Normalize, MapPooling, normalized_softmax_loss
from ..embedder.trunk import TrunkInfo
from .callbacks import ResumableEarlyStopping
from .embedder_config import EmbedderConfig
from .history import record_epoch

RECALL, MAP = "val_recall_at_1", "val_map"
# what early stopping keeps the best of: held-out Recall@1, ties broken by mAP (a few dozen held-out
# images make Recall@1 coarse; without the tie-break the first epoch of a plateau would win)
MONITOR = "val_selection"
HISTORY_FIELDS = ("stage", "epoch", "loss", RECALL, MAP, "seconds")
PHOTO_WEIGHT = 0.5  # how the index combines the two views (embed.photo_weight)


def build_models(config: EmbedderConfig, channels: int, products: int):
    """(embed: pooled vector -> embedding, train: pooled vector -> cosines with the proxies)."""
    pooled = keras.Input((channels,), name="pooled")
    projection = keras.layers.Dense(config.dim, use_bias=False, name="projection")
    embedding = L2Normalize(name="embedding")(projection(L2Normalize(name="pooled_unit")(pooled)))
    embed = keras.Model(pooled, embedding, name="embed_pooled")
    train = keras.Model(pooled, CosineLogits(products, name="proxies")(embedding), name="train_head")
    train.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate), loss=normalized_softmax_loss(config.scale, config.margin)
    )
    return embed, train


def map_model(config: EmbedderConfig, info: TrunkInfo, embed) -> keras.Model:
    """Feature map (the trunk's layout) -> embedding: the pooling, then the trained head's layers."""
    shape = (
        (info.channels, info.height, info.width) if info.layout == "nchw" else (info.height, info.width, info.channels)
    )
    maps = keras.Input(shape, name="feature_map")
    x = pooling_layer(config, info)(maps)
    x = embed.get_layer("pooled_unit")(x)
    x = embed.get_layer("projection")(x)
    return keras.Model(maps, embed.get_layer("embedding")(x), name="embedder_head")


def pooling_layer(config: EmbedderConfig, info: TrunkInfo) -> MapPooling:
    return MapPooling(config.pooling, config.levels, config.gem_p, channels_first=info.layout == "nchw", name="pooling")


def combine(embeddings: np.ndarray) -> np.ndarray:
    """(n, 2, D) cut-out and photo embeddings -> (n, 2D) index vectors, as csearch.embed.combine_views."""
    a, b = np.sqrt(1.0 - PHOTO_WEIGHT), np.sqrt(PHOTO_WEIGHT)
    return np.concatenate([a * embeddings[:, 0], b * embeddings[:, 1]], axis=1)


def recall_at_1(gallery: np.ndarray, gallery_labels, queries: np.ndarray, query_labels) -> float:
    """Share of queries whose nearest gallery vector (Euclidean) has the query's label."""
    return retrieval_scores(gallery, gallery_labels, queries, query_labels)[0]


def retrieval_scores(gallery: np.ndarray, gallery_labels, queries: np.ndarray, query_labels) -> tuple[float, float]:
    """(Recall@1, mean average precision over the whole ranking) of exact Euclidean KNN."""
    if not len(queries):
        return float("nan"), float("nan")
    distances = (gallery**2).sum(1)[None] - 2 * queries @ gallery.T
    order = np.argsort(distances, axis=1, kind="stable")
    relevant = np.asarray(gallery_labels)[order] == np.asarray(query_labels)[:, None]
    hits = np.cumsum(relevant, axis=1)
    ranks = np.arange(1, relevant.shape[1] + 1)
    precision_sum = (relevant * hits / ranks).sum(axis=1)
    ap = np.divide(precision_sum, relevant.sum(axis=1), out=np.zeros(len(queries)), where=relevant.sum(axis=1) > 0)
    return float(relevant[:, 0].mean()), float(ap.mean())


def embed_views(embed, pooled: np.ndarray) -> np.ndarray:
    """(n, 2, C) pooled views -> (n, 2D) index vectors through the head."""
    n = len(pooled)
    flat = embed.predict(pooled.reshape(n * 2, -1), batch_size=1024, verbose=0)
    return combine(np.asarray(flat).reshape(n, 2, -1))


class HeldOutRecall(keras.callbacks.Callback):
    """Puts the held-out Recall@1 (val images against the training images, both views combined as
    the index does) into the epoch's logs, and writes history.csv; one line per epoch to `say`."""

    def __init__(self, embed, gallery, gallery_labels, queries, query_labels, history: Path, epochs: int, say):
        super().__init__()
        self.embed, self.gallery, self.gallery_labels = embed, gallery, gallery_labels
        self.queries, self.query_labels = queries, query_labels
        self.history, self.epochs, self.say = history, epochs, say

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        recall, mean_ap = retrieval_scores(
            embed_views(self.embed, self.gallery), self.gallery_labels,
            embed_views(self.embed, self.queries), self.query_labels,
        )  # fmt: skip
        logs.update({RECALL: recall, MAP: mean_ap, MONITOR: recall + 1e-3 * mean_ap})
        seconds = time.perf_counter() - self.started
        row = {"stage": "head", "epoch": epoch + 1, "loss": logs.get("loss"), RECALL: recall, MAP: mean_ap,
               "seconds": seconds}  # fmt: skip
        record_epoch(self.history, row, HISTORY_FIELDS)
        self.say(
            f"epoch {epoch + 1}/{self.epochs} loss {logs.get('loss', float('nan')):.4f} "
            f"held-out R@1 {recall:.3f} ({seconds:.1f}s)"
        )


def fit_head(
    config: EmbedderConfig,
    samples: np.ndarray,
    labels: np.ndarray,
    products: int,
    held_out: dict,
    run_dir: Path,
    say: Callable[[str], None],
):
    """Train the head (resumable through RUN_DIR/backup); returns (embed model, best epoch, best R@1)."""
    keras.utils.set_random_seed(config.seed)
    embed, train = build_models(config, samples.shape[1], products)
    backup = run_dir / "backup"
    callbacks = [
        HeldOutRecall(embed, **held_out, history=run_dir / "history.csv", epochs=config.epochs, say=say),
        ResumableEarlyStopping(
            backup / "early_stopping", monitor=MONITOR, mode="max", patience=config.patience, restore_best_weights=True
        ),
        keras.callbacks.BackupAndRestore(str(backup / "keras")),
    ]
    train.fit(
        samples,
        labels,
        batch_size=config.batch_size,
        epochs=config.epochs,
        shuffle=True,
        verbose=0,
        callbacks=callbacks,
    )
    stopper = callbacks[1]
    if stopper.best_weights is not None:  # a run that ended on its epoch limit: keep the best epoch
        train.set_weights(stopper.best_weights)
    best_epoch = int(stopper.best_epoch) + 1
    from .history import read_history

    rows = [r for r in read_history(run_dir / "history.csv") if int(r["epoch"]) == best_epoch]
    return embed, best_epoch, float(rows[0][RECALL]) if rows else float("nan")


def refit_head(config: EmbedderConfig, samples: np.ndarray, labels: np.ndarray, products: int, epochs: int):
    """The head trained again on every image (held-out ones included) for the epochs early stopping
    chose: the held-out images then teach the head too. Returns the embed model."""
    keras.utils.set_random_seed(config.seed)
    embed, train = build_models(config, samples.shape[1], products)
    train.fit(samples, labels, batch_size=config.batch_size, epochs=epochs, shuffle=True, verbose=0)
    return embed


def save_state(path: Path, values: dict) -> None:
    from ..store.durable import write_bytes_atomic

    write_bytes_atomic(path, (json.dumps(values, indent=2) + "\n").encode())
