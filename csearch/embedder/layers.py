"""The embedding head's Keras layers, backend-agnostic (`keras.ops` only).

- `MapPooling`: a feature map -> one vector per image: global average (`gap`), generalised mean
  (`gem`, p fixed) or R-MAC (`rmac`: the max over square regions at `levels` scales, each region
  vector L2-normalised, summed). Regions depend only on the map's static size, so the layer
  exports to ONNX as plain slices and maxima.
- `L2Normalize`: unit rows.
- `CosineLogits`: cosine similarity of embeddings with one learned proxy per class, the
  normalised-softmax (CosFace-style) training head; it is not part of the exported model.

This module imports Keras: only the trainer and the tests import it.
"""

from __future__ import annotations

import math

import keras
from keras import ops

POOLINGS = ("gap", "gem", "rmac")
EPS = 1e-6


def rmac_regions(height: int, width: int, levels: int) -> list[tuple[int, int, int, int]]:
    """(y0, x0, y1, x1) of the R-MAC regions: at level l (1..levels) squares of side
    ceil(2 * min(h, w) / (l + 1)), l per axis of the shorter side (more along the longer one),
    spread evenly from edge to edge (about 40 % overlap), the whole map first."""
    regions = [(0, 0, height, width)]
    short = min(height, width)
    for level in range(2, levels + 1):
        side = min(short, math.ceil(2 * short / (level + 1)))
        for y in _starts(height, side, level):
            for x in _starts(width, side, level):
                regions.append((y, x, y + side, x + side))
    return list(dict.fromkeys(regions))


def _starts(length: int, side: int, count: int) -> list[int]:
    count = max(count, math.ceil((length - side) / max(1, side * 0.6)) + 1) if length > side else 1
    if count == 1:
        return [0]
    return sorted({round(i * (length - side) / (count - 1)) for i in range(count)})


@keras.saving.register_keras_serializable(package="csearch")
class MapPooling(keras.layers.Layer):
    """(N, C, H, W) or (N, H, W, C) feature maps -> (N, C) vectors."""

    def __init__(self, method: str = "rmac", levels: int = 3, p: float = 3.0, channels_first: bool = True, **kwargs):
        super().__init__(**kwargs)
        if method not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {method!r}")
        self.method, self.levels, self.p, self.channels_first = method, int(levels), float(p), bool(channels_first)

    def call(self, maps):
        x = ops.transpose(maps, (0, 2, 3, 1)) if self.channels_first else maps
        if self.method == "gap":
            return ops.mean(x, axis=(1, 2))
        if self.method == "gem":
            powered = ops.power(ops.maximum(x, EPS), self.p)
            return ops.power(ops.mean(powered, axis=(1, 2)), 1.0 / self.p)
        height, width = int(x.shape[1]), int(x.shape[2])
        total = None
        for y0, x0, y1, x1 in rmac_regions(height, width, self.levels):
            region = ops.max(x[:, y0:y1, x0:x1, :], axis=(1, 2))
            region = region / (ops.sqrt(ops.sum(region * region, axis=-1, keepdims=True)) + EPS)
            total = region if total is None else total + region
        return total

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1] if self.channels_first else input_shape[-1])

    def get_config(self):
        return {
            **super().get_config(),
            "method": self.method,
            "levels": self.levels,
            "p": self.p,
            "channels_first": self.channels_first,
        }


@keras.saving.register_keras_serializable(package="csearch")
class L2Normalize(keras.layers.Layer):
    def call(self, x):
        return x / (ops.sqrt(ops.sum(x * x, axis=-1, keepdims=True)) + EPS)


@keras.saving.register_keras_serializable(package="csearch")
class CosineLogits(keras.layers.Layer):
    """Unit embeddings (N, D) -> cosine with each class proxy (N, classes)."""

    def __init__(self, classes: int, **kwargs):
        super().__init__(**kwargs)
        self.classes = int(classes)

    def build(self, input_shape):
        self.proxies = self.add_weight(
            shape=(int(input_shape[-1]), self.classes), initializer="glorot_normal", name="proxies"
        )

    def call(self, x):
        proxies = self.proxies / (ops.sqrt(ops.sum(self.proxies * self.proxies, axis=0, keepdims=True)) + EPS)
        return ops.matmul(x, proxies)

    def get_config(self):
        return {**super().get_config(), "classes": self.classes}


def normalized_softmax_loss(scale: float, margin: float):
    """Cross-entropy of scale * (cosine - margin at the true class): pulls each embedding to its
    class proxy with an additive cosine margin (normalised softmax / CosFace)."""

    def loss(labels, cosines):
        labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
        onehot = ops.one_hot(labels, ops.shape(cosines)[-1])
        logits = scale * (cosines - margin * onehot)
        return keras.losses.categorical_crossentropy(onehot, logits, from_logits=True)

    return loss
