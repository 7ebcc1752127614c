"""Keras backbones: the preprocessing layer, `build_backbone`, weight loading, `KerasExtractor`.

This module imports Keras at the top; `csearch.models` reaches it lazily, so only code that
really builds or loads a Keras model pays for importing Keras/TensorFlow.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import keras
import numpy as np

from .. import errors
from .base import extract
from .preprocessing import preprocessing_step
from .registry import BACKBONE_LAYER, PREPROCESS_LAYER, get_spec, names
from .weights import WeightsArg, resolve_weights

MIN_IMAGE_SIZE = 32  # keras.applications refuse smaller inputs


@keras.saving.register_keras_serializable(package="csearch")
class Preprocess(keras.layers.Layer):
    """RGB [0, 255] -> the backbone's input range (preprocessing.PREPROCESSING[mode]), in keras.ops:
    backend-agnostic and exported with the model, so ONNX/saved models need no separate step."""

    def __init__(self, mode: str = "raw", **kwargs):
        super().__init__(**kwargs)
        self.mode = mode
        self._flip, self._scale, self._offset = preprocessing_step(mode)

    def call(self, x):
        ops = keras.ops
        x = ops.cast(x, "float32")
        if self._flip:
            x = ops.flip(x, axis=-1)
        if self.mode == "raw":
            return x
        return x * ops.convert_to_tensor(self._scale, "float32") + ops.convert_to_tensor(self._offset, "float32")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def custom_objects() -> dict:
    """Pass to `keras.saving.load_model(..., custom_objects=...)` for models holding a csearch
    `Preprocess` layer (also saved under its bare class name by older runs)."""
    return {"csearch>Preprocess": Preprocess, "Preprocess": Preprocess}


def preprocess_layer(mode: str, name: str = PREPROCESS_LAYER) -> Preprocess:
    """A Keras layer applying PREPROCESSING[mode] (registered as csearch>Preprocess)."""
    return Preprocess(mode, name=name)


def _check_image_size(name: str, image_size: int) -> int:
    if not isinstance(image_size, (int, np.integer)) or image_size < MIN_IMAGE_SIZE:
        raise errors.ConfigError(f"{name}: image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    return int(image_size)


def build_backbone(
    name: str, weights: WeightsArg = "imagenet", image_size: Optional[int] = None, trainable: bool = False
):
    """A `keras.Model`: float32 RGB in [0, 255], shape (S, S, 3) -> pooled features (D,).

    Layers: input "image" -> "preprocess" (model-specific scaling, `PREPROCESS_LAYER`) ->
    "backbone" (the keras.applications network with average pooling, `BACKBONE_LAYER`).
    A classifier freezes/unfreezes `model.get_layer("backbone")` and should call the backbone
    with `training=False` (MobileNetV2's shared weights have identity batch-norm).
    `trainable` is the backbone's initial state (frozen by default). Weights are checked: a
    file that does not fit, or leaves any weight unset, raises `ModelMismatch`. ImageNet
    weights are the 224 px release at every `image_size` (convolution weights do not depend
    on the input size).
    """
    spec = get_spec(name)
    if not spec.is_keras:
        raise errors.unknown_name("backbone", name, names("backbone"))
    size = _check_image_size(name, image_size or spec.input_size)
    path = resolve_weights(name, weights)  # before building: fail fast, cheaply
    inner = getattr(keras.applications, spec.builder)(
        include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg", **dict(spec.builder_kwargs)
    )
    # Renamed afterwards: EfficientNetV2 uses its `name` argument to pick its architecture.
    inner.name = BACKBONE_LAYER
    if path is not None:
        load_backbone_weights(inner, path, name)
    inner.trainable = trainable
    image = keras.Input((size, size, 3), name="image", dtype="float32")
    features = inner(preprocess_layer(spec.preprocessing)(image))
    return keras.Model(image, features, name=f"csearch_{name}")


def load_backbone_weights(inner, path: Path, name: str) -> None:
    """Load a weights file into a keras.applications network, and prove every weight came
    from the file: weights are first set to NaN, so any the file did not provide stay NaN.
    (Keras raises for most mismatches but skips some gaps with only a warning, and legacy
    `.h5` files load by layer order, so the result is checked rather than trusted.)"""
    for variable in inner.weights:
        if np.issubdtype(np.dtype(variable.dtype), np.floating):
            variable.assign(np.full(variable.shape, np.nan, dtype=variable.dtype))
    try:
        with warnings.catch_warnings():
            # Harmless for Functional models (the check below catches real gaps).
            warnings.filterwarnings("ignore", message=".*Skipping nested container.*")
            inner.load_weights(str(path))
    except (ValueError, KeyError, OSError) as exc:
        raise errors.ModelMismatch(
            f"{name}: weights file {path} does not fit the {name} backbone: {errors.one_line(exc, 160)}"
        ) from None
    unset = [v.path for v in inner.weights if np.isnan(keras.ops.convert_to_numpy(v)).any()]
    if unset:
        raise errors.ModelMismatch(
            f"{name}: weights file {path} left {len(unset)} of "
            f"{len(inner.weights)} weights unset (e.g. {unset[0]}); "
            f"is it a {name} file?"
        )


class KerasExtractor:
    """A Keras backbone as an extractor.

    On the TensorFlow backend it runs through one `tf.function` with a batch-polymorphic input
    signature. Measured at batch 32 on the 2-core CPU (benchmarks/bench_models.py --calls):
    as fast as `predict_on_batch` (0-15% faster, within the noise of a shared machine),
    1.4-2x faster than the eager call, and 10x faster than an XLA-compiled function for the
    MobileNets (XLA's CPU depthwise convolutions are slow). It is traced once for every batch
    size, where `predict_on_batch` retraces on a new one (seconds for large backbones).
    Other backends use `predict_on_batch`.
    """

    def __init__(self, name: str, model, files: Sequence[Path] = ()):
        self.name = name
        self.model = model
        self.files = [Path(f) for f in files]
        self.input_size = int(model.input_shape[1])
        self.dim = int(model.output_shape[-1])
        self._run = _compiled_forward(model, self.input_size)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return extract(self, images, lambda x: np.asarray(self._run(x.astype(np.float32)), np.float32))


def _compiled_forward(model, size: int):
    """The fastest inference call for `model` on the active Keras backend (traced lazily)."""
    if keras.backend.backend() != "tensorflow":
        return model.predict_on_batch
    import tensorflow as tf

    spec = tf.TensorSpec([None, size, size, 3], tf.float32)
    forward = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    return lambda x: forward(x).numpy()
