"""The paper's category classifier as a Keras model: a registered backbone plus a small dense head.

Model layout (layer names are the interface the trainer and `classify.export_classifier` rely on)::

    image (S, S, 3) float32 RGB in [0, 255]
    -> "augment"     RandomFlip("horizontal"), RandomRotation, RandomZoom (identity at inference)
    -> "features"    InferenceMode(models.build_backbone(...)): preprocessing + pooled backbone
    -> "fc1" Dense(1024, relu) -> "dropout" Dropout(0.5) -> "fc2" Dense(512, relu)
    -> "predictions" Dense(n_classes, softmax)

Why `InferenceMode`: in Keras 3 a Functional model passes `fit()`'s `training=True` to every
layer, overriding a `backbone(x, training=False)` written at construction (keras-team/keras
#20285). Unfrozen batch-norm layers would then normalise with batch statistics, which breaks
the shared MobileNetV2 weights (identity batch-norm). The wrapper pins the backbone to
inference mode however the model is called; its unfrozen weights still train.

This module imports Keras: import it inside the functions that build, train or load a model
(csearch.classify and csearch.train do), never on the query path's import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import keras
import numpy as np

from . import errors
from .models import BACKBONE_LAYER, build_backbone, get_spec, names
from .models import custom_objects as model_objects

HEAD_UNITS = (1024, 512)
DROPOUT = 0.5
AUGMENT_LAYER = "augment"
FEATURES_LAYER = "features"
HEAD_LAYERS = ("fc1", "dropout", "fc2", "predictions")


@keras.saving.register_keras_serializable(package="csearch")
class InferenceMode(keras.layers.Wrapper):
    """Calls the wrapped layer with training=False, always (see the module docstring)."""

    def call(self, inputs, training=None):
        return self.layer(inputs, training=False)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)


def custom_objects() -> dict:
    """Everything `keras.saving.load_model` needs for a classifier file."""
    return {**model_objects(), "csearch>InferenceMode": InferenceMode, "InferenceMode": InferenceMode}


def build_augmentation(
    rotation: float = 0.1, zoom: float = 0.2, flip: bool = True, seed: Optional[int] = None
) -> keras.Sequential:
    """The paper's augmentation as Keras preprocessing layers (active only when training).

    `rotation` is a fraction of a full turn (0.1 = up to +-36 degrees) and `zoom` a fraction of
    the side (0.2 = 80-120 %), as in keras.layers.RandomRotation / RandomZoom. Rotated/zoomed-out
    corners are filled by reflection so no black border becomes a cue.
    """
    layers = []
    if flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if rotation:
        layers.append(keras.layers.RandomRotation(rotation, fill_mode="reflect", seed=seed))
    if zoom:
        layers.append(keras.layers.RandomZoom(zoom, fill_mode="reflect", seed=seed))
    if not layers:  # an identity keeps the model's layout (and layer names) fixed
        layers.append(keras.layers.Identity())
    return keras.Sequential(layers, name=AUGMENT_LAYER)


def backbone_network(model):
    """The keras.applications network inside a classifier (or inside a build_backbone model)."""
    has_features = any(layer.name == FEATURES_LAYER for layer in model.layers)
    holder = model.get_layer(FEATURES_LAYER).layer if has_features else model
    return holder.get_layer(BACKBONE_LAYER)


def set_trainable(model, unfreeze: Optional[int]) -> int:
    """Freeze the backbone except its top `unfreeze` layers (None: all of it; 0: none).

    Layers are counted on the keras.applications network's own layer list (the global pooling
    layer included), the usual meaning of "top N layers". The head stays trainable. Returns the
    number of backbone layers that hold weights and are now trainable.
    """
    network = backbone_network(model)
    layers = [layer for layer in network.layers if layer.__class__.__name__ != "InputLayer"]
    if unfreeze is not None and (not isinstance(unfreeze, (int, np.integer)) or unfreeze < 0):
        raise errors.ConfigError(f"unfreeze must be a count of layers >= 0 or None (all), got {unfreeze!r}")
    count = len(layers) if unfreeze is None else min(int(unfreeze), len(layers))
    # The containers must be trainable for any child to be (Keras returns no trainable
    # weights from a frozen container); then the bottom layers are frozen one by one.
    model.get_layer(FEATURES_LAYER).trainable = count > 0
    network.trainable = count > 0
    for index, layer in enumerate(layers):
        layer.trainable = index >= len(layers) - count
    for name in HEAD_LAYERS:
        model.get_layer(name).trainable = True
    return sum(1 for layer in layers[len(layers) - count :] if layer.weights)


def build_classifier(
    backbone_name: str,
    n_classes: int,
    weights="imagenet",
    image_size: Optional[int] = None,
    unfreeze: Optional[int] = 0,
    *,
    rotation: float = 0.1,
    zoom: float = 0.2,
    flip: bool = True,
    seed: Optional[int] = None,
) -> keras.Model:
    """The paper's classifier: backbone (no top, pooled) -> Dense(1024, relu) -> Dropout(0.5)
    -> Dense(512, relu) -> Dense(n_classes, softmax).

    `weights`: "imagenet" | "none" | a file path (resolved by models.resolve_weights, so a
    missing file is a one-line WeightsNotFound). `unfreeze`: 0 trains the head only, N also
    the backbone's top N layers, None the whole backbone. Input: float32 RGB in [0, 255].
    """
    if backbone_name not in names("backbone"):
        raise errors.unknown_name("backbone", backbone_name, names("backbone"))
    if not isinstance(n_classes, (int, np.integer)) or n_classes < 2:
        raise errors.ConfigError(f"a classifier needs at least 2 classes, got {n_classes!r}")
    size = int(image_size or get_spec(backbone_name).input_size)
    backbone = build_backbone(backbone_name, weights, size)
    image = keras.Input((size, size, 3), name="image", dtype="float32")
    x = build_augmentation(rotation, zoom, flip, seed)(image)
    x = InferenceMode(backbone, name=FEATURES_LAYER)(x)
    x = keras.layers.Dense(HEAD_UNITS[0], activation="relu", name="fc1")(x)
    x = keras.layers.Dropout(DROPOUT, seed=seed, name="dropout")(x)
    x = keras.layers.Dense(HEAD_UNITS[1], activation="relu", name="fc2")(x)
    probs = keras.layers.Dense(int(n_classes), activation="softmax", name="predictions")(x)
    model = keras.Model(image, probs, name=f"classifier_{backbone_name}")
    set_trainable(model, unfreeze)
    return model


def apply_head(model, x):
    """Run `x` through the classifier's head layers (shared, so training them trains `model`)."""
    for name in HEAD_LAYERS:
        x = model.get_layer(name)(x)
    return x


def inference_model(model) -> keras.Model:
    """The classifier without its augmentation layers (shared weights): for predict and export."""
    image = keras.Input(model.input_shape[1:], name="image", dtype="float32")
    return keras.Model(image, apply_head(model, model.get_layer(FEATURES_LAYER)(image)), name=model.name)


def load_keras_model(path: Path) -> keras.Model:
    """A saved classifier (model.keras); one-line StoreError / ModelMismatch when it is missing or
    not a csearch classifier."""
    if not Path(path).is_file():
        raise errors.StoreError(f"classifier model not found: {path}")
    try:
        return keras.saving.load_model(str(path), custom_objects=custom_objects(), compile=False)
    except (ValueError, OSError, TypeError) as exc:
        raise errors.ModelMismatch(
            f"{path}: not a readable csearch classifier ({' '.join(str(exc).split())[:160]})"
        ) from None
