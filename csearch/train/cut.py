"""Where the classifier is cut: its frozen bottom runs once per image (cached), the rest trains.

This module imports Keras: the trainer imports it only when it trains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import keras
import numpy as np

from ..classifier_model import FEATURES_LAYER, InferenceMode, apply_head, backbone_network
from ..models import PREPROCESS_LAYER
from .config import TrainConfig

# How far below the first trainable layer a cut is looked for (deeper cuts make larger caches).
MAX_CUT_DEPTH = 64


def find_cut(model, unfreeze: Optional[int]):
    """Split the backbone where its frozen bottom ends: (bottom, top).

    bottom: a model from images (float32 RGB [0, 255]) to the cut activations; top: a model
    from those activations to the pooled features, holding every trainable backbone layer
    (None when the whole backbone is frozen). The cut is the deepest layer output below the
    first trainable layer through which the whole graph passes (a residual branch around it
    makes Keras refuse the split, so the next layer down is tried). None when there is none.
    """
    features = model.get_layer(FEATURES_LAYER).layer
    if not unfreeze and unfreeze is not None:
        return features, None
    network = backbone_network(model)
    layers = [layer for layer in network.layers if layer.__class__.__name__ != "InputLayer"]
    first = next((i for i, layer in enumerate(layers) if layer.trainable), len(layers))
    for candidate in reversed(layers[max(0, first - MAX_CUT_DEPTH) : first]):
        try:
            top = keras.Model(candidate.output, network.output, name="backbone_top")
        except ValueError:  # "not connected": a skip connection bypasses this tensor
            continue
        image = keras.Input(features.input_shape[1:], name="image", dtype="float32")
        cut = keras.Model(network.input, candidate.output)(features.get_layer(PREPROCESS_LAYER)(image))
        return keras.Model(image, cut, name=f"bottom_to_{candidate.name}"), top
    return None


def plan_cut(model, config: TrainConfig, unfreeze: Optional[int], n_images: int, say: Callable[[str], None]):
    """(bottom, top) for training on cached activations, or None to train on images."""
    if config.cache == "none":
        say("cache: none; training end to end on images (augmentation fresh every batch)")
        return None
    plan = find_cut(model, unfreeze)
    if plan is None:
        say(
            "the whole backbone trains, or no single tensor separates its frozen bottom from the "
            "trained top: training on images"
        )
        return None
    bottom, _ = plan
    per_image = int(np.prod(bottom.output_shape[1:])) * 2  # float16
    size_gb = per_image * n_images * (config.copies + 1) / 1e9
    if size_gb > config.max_cache_gb:
        say(
            f"the activation cache would take {size_gb:.1f} GB (> max_cache_gb {config.max_cache_gb}); "
            f"training on images"
        )
        return None
    return plan


def trainable_part(model, top, input_shape) -> keras.Model:
    """The model that is fitted: cached activations -> [top backbone layers] -> head. It shares
    its layers with `model`, so fitting it trains the classifier."""
    inputs = keras.Input(input_shape, name="cached")
    x = inputs if top is None else InferenceMode(top, name="top")(inputs)
    return keras.Model(inputs, apply_head(model, x), name="trainable_part")
