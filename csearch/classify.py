"""The paper's category classifier: a registered backbone plus a small dense head.

Model layout (layer names are the interface `train.py` and `export_classifier` rely on)::

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

A RUN_DIR (written by `python -m csearch.train classifier`) holds `model.keras`,
`classes.json` (class names in output order), `config.yaml`, `history.csv`, `summary.json`,
and after `export_classifier` also `model.onnx` + `export.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import yaml

from . import errors
from .types import Prediction

HEAD_UNITS = (1024, 512)
DROPOUT = 0.5
AUGMENT_LAYER = "augment"
FEATURES_LAYER = "features"
HEAD_LAYERS = ("fc1", "dropout", "fc2", "predictions")
MODEL_FILE = "model.keras"
ONNX_FILE = "model.onnx"
CLASSES_FILE = "classes.json"
CONFIG_FILE = "config.yaml"
EXPORT_FILE = "export.json"

_INFERENCE_MODE_CLASS = None


def _inference_mode_class():
    """The `InferenceMode` wrapper class, created on first use so importing csearch.classify
    does not import Keras (the same pattern as models.Preprocess)."""
    global _INFERENCE_MODE_CLASS
    if _INFERENCE_MODE_CLASS is None:
        import keras

        @keras.saving.register_keras_serializable(package="csearch")
        class InferenceMode(keras.layers.Wrapper):
            """Calls the wrapped layer with training=False, always (see the module docstring)."""

            def call(self, inputs, training=None):
                return self.layer(inputs, training=False)

            def compute_output_shape(self, input_shape):
                return self.layer.compute_output_shape(input_shape)

        _INFERENCE_MODE_CLASS = InferenceMode
    return _INFERENCE_MODE_CLASS


def custom_objects() -> dict:
    """Everything `keras.saving.load_model` needs for a classifier file."""
    from .models import custom_objects as model_objects

    cls = _inference_mode_class()
    return {**model_objects(), "csearch>InferenceMode": cls, "InferenceMode": cls}


def build_augmentation(rotation: float = 0.1, zoom: float = 0.2, flip: bool = True,
                       seed: Optional[int] = None):
    """The paper's augmentation as Keras preprocessing layers (active only when training).

    `rotation` is a fraction of a full turn (0.1 = up to +-36 degrees) and `zoom` a fraction of
    the side (0.2 = 80-120 %), as in keras.layers.RandomRotation / RandomZoom. Rotated/zoomed-out
    corners are filled by reflection so no black border becomes a cue.
    """
    import keras

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
    from .models import BACKBONE_LAYER

    features = model.get_layer(FEATURES_LAYER) if _has_layer(model, FEATURES_LAYER) else None
    holder = features.layer if features is not None else model
    return holder.get_layer(BACKBONE_LAYER)


def _has_layer(model, name: str) -> bool:
    return any(layer.name == name for layer in model.layers)


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
    return sum(1 for layer in layers[len(layers) - count:] if layer.weights)


def build_classifier(backbone_name: str, n_classes: int, weights="imagenet",
                     image_size: Optional[int] = None, unfreeze: Optional[int] = 0, *,
                     rotation: float = 0.1, zoom: float = 0.2, flip: bool = True,
                     seed: Optional[int] = None):
    """The paper's classifier: backbone (no top, pooled) -> Dense(1024, relu) -> Dropout(0.5)
    -> Dense(512, relu) -> Dense(n_classes, softmax).

    `weights`: "imagenet" | "none" | a file path (resolved by models.resolve_weights, so a
    missing file is a one-line WeightsNotFound). `unfreeze`: 0 trains the head only, N also
    the backbone's top N layers, None the whole backbone. Input: float32 RGB in [0, 255].
    """
    import keras

    from .models import build_backbone, get_spec, names

    if backbone_name not in names("backbone"):
        raise errors.unknown_name("backbone", backbone_name, names("backbone"))
    if not isinstance(n_classes, (int, np.integer)) or n_classes < 2:
        raise errors.ConfigError(f"a classifier needs at least 2 classes, got {n_classes!r}")
    size = int(image_size or get_spec(backbone_name).input_size)
    backbone = build_backbone(backbone_name, weights, size)
    image = keras.Input((size, size, 3), name="image", dtype="float32")
    x = build_augmentation(rotation, zoom, flip, seed)(image)
    x = _inference_mode_class()(backbone, name=FEATURES_LAYER)(x)
    x = keras.layers.Dense(HEAD_UNITS[0], activation="relu", name="fc1")(x)
    x = keras.layers.Dropout(DROPOUT, seed=seed, name="dropout")(x)
    x = keras.layers.Dense(HEAD_UNITS[1], activation="relu", name="fc2")(x)
    probs = keras.layers.Dense(int(n_classes), activation="softmax", name="predictions")(x)
    model = keras.Model(image, probs, name=f"classifier_{backbone_name}")
    set_trainable(model, unfreeze)
    return model


def head_model(model, feature_dim: int):
    """The classifier's head as its own model on pooled features (sharing the layers, so
    training it trains the classifier): what the frozen-backbone mode fits on cached features."""
    import keras

    features = keras.Input((feature_dim,), name="pooled")
    x = features
    for name in HEAD_LAYERS:
        x = model.get_layer(name)(x)
    return keras.Model(features, x, name="head")


def inference_model(model):
    """The classifier without its augmentation layers (shared weights): for predict and export."""
    import keras

    image = keras.Input(model.input_shape[1:], name="image", dtype="float32")
    x = model.get_layer(FEATURES_LAYER)(image)
    for name in HEAD_LAYERS:
        x = model.get_layer(name)(x)
    return keras.Model(image, x, name=model.name)


def load_keras_model(path: Path):
    import keras

    if not Path(path).is_file():
        raise errors.StoreError(f"classifier model not found: {path}")
    try:
        return keras.saving.load_model(str(path), custom_objects=custom_objects(), compile=False)
    except (ValueError, OSError, TypeError) as exc:
        raise errors.ModelMismatch(f"{path}: not a readable csearch classifier "
                                   f"({' '.join(str(exc).split())[:160]})") from None


def read_run_config(run_dir: Path) -> dict:
    """config.yaml of a RUN_DIR (image size, colour, backbone...)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise errors.StoreError(f"{run_dir}: not a classifier RUN_DIR ({CONFIG_FILE} missing)")
    data = yaml.safe_load(path.read_text()) or {}
    return data.get("train", data)


def read_class_names(run_dir: Path) -> list[str]:
    path = Path(run_dir) / CLASSES_FILE
    if not path.is_file():
        raise errors.StoreError(f"{run_dir}: not a classifier RUN_DIR ({CLASSES_FILE} missing)")
    names = json.loads(path.read_text())
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise errors.StoreError(f"{path}: expected a JSON list of class names")
    return names


class Classifier:
    """A trained classifier from a RUN_DIR: uint8 images (N, S, S, 3) -> class probabilities.

    Runs `model.keras` with Keras, or `model.onnx` with onnxruntime when it was exported from
    this very model.keras (export.json records the source's sha256, so a retrained model never
    runs a stale export).
    """

    def __init__(self, run_dir: Path, class_names: Sequence[str], image_size: int, color: str,
                 model_file: Path, runner):
        self.run_dir = Path(run_dir)
        self.class_names = list(class_names)
        self.image_size = int(image_size)
        self.color = color
        self.model_file = Path(model_file)
        self._runner = runner

    @property
    def files(self) -> list[Path]:
        """The files an index must record (with their sha256) to detect a changed model."""
        return [self.model_file.resolve(), (self.run_dir / CLASSES_FILE).resolve()]

    @property
    def backend(self) -> str:
        return "onnx" if self.model_file.suffix == ".onnx" else "keras"

    @classmethod
    def load(cls, run_dir, backend: str = "auto") -> "Classifier":
        """backend: "auto" (ONNX when a current export exists), "keras" or "onnx"."""
        run_dir = Path(run_dir).expanduser()
        if not run_dir.is_dir():
            raise errors.StoreError(f"classifier RUN_DIR not found: {run_dir}")
        if backend not in ("auto", "keras", "onnx"):
            raise errors.unknown_name("classifier backend", backend, ["auto", "keras", "onnx"])
        config = read_run_config(run_dir)
        class_names = read_class_names(run_dir)
        size, color = int(config["image_size"]), str(config.get("color", "rgb"))
        use_onnx = backend == "onnx" or (backend == "auto" and _current_export(run_dir))
        if use_onnx:
            path = run_dir / ONNX_FILE
            if not path.is_file():
                raise errors.StoreError(f"{run_dir}: no {ONNX_FILE} (run `csearch export {run_dir} "
                                        f"--format onnx`)")
            runner = _OnnxRunner(path)
        else:
            path = run_dir / MODEL_FILE
            runner = _KerasRunner(inference_model(load_keras_model(path)))
        classifier = cls(run_dir, class_names, size, color, path, runner)
        classifier._check_outputs()
        return classifier

    def _check_outputs(self) -> None:
        probe = self.predict(np.zeros((1, self.image_size, self.image_size, 3), np.uint8))
        if probe.shape[1] != len(self.class_names):
            raise errors.ModelMismatch(f"{self.model_file}: the model has {probe.shape[1]} outputs "
                                       f"but {CLASSES_FILE} lists {len(self.class_names)} classes")

    def check_classes(self, data_classes: Iterable[str]) -> None:
        """Raise ModelMismatch when the data has classes this model cannot predict."""
        unknown = sorted(set(data_classes) - set(self.class_names))
        if unknown:
            shown = ", ".join(unknown[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
            raise errors.ModelMismatch(f"the data has {len(unknown)} categories the classifier in "
                                       f"{self.run_dir} does not know: {shown}; it knows "
                                       f"{len(self.class_names)}: {', '.join(self.class_names[:8])}"
                                       f"{'...' if len(self.class_names) > 8 else ''}")

    def _validate(self, images: np.ndarray) -> np.ndarray:
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise errors.ImageError(f"classifier input must be a uint8 numpy array, got "
                                    f"{getattr(images, 'dtype', type(images).__name__)}")
        if images.ndim == 3:
            images = images[None]
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise errors.ImageError(f"classifier input must have shape (N, {self.image_size}, "
                                    f"{self.image_size}, 3), got {images.shape}; use "
                                    f"preprocess.model_input(image, {self.image_size}, {self.color!r})")
        return images

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N, C) probabilities, columns in `class_names` order.

        A "gray" model gets grayscale input whatever it is given (converting a gray-replicated
        image again is a no-op), so a caller's RGB image cannot silently mislead it.
        """
        images = self._validate(images)
        if self.color == "gray":
            from .preprocess import to_color

            images = np.stack([to_color(image, "gray") for image in images]) if len(images) else images
        if len(images) == 0:
            return np.zeros((0, len(self.class_names)), np.float32)
        out = [self._runner(images[i:i + batch_size].astype(np.float32))
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out).astype(np.float32)

    def predict_top(self, images: np.ndarray, n: int = 1) -> list[Prediction]:
        """The best `n` categories per image, most probable first."""
        probs = self.predict(images)
        n = max(1, min(int(n), len(self.class_names)))
        results = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[:n]
            top = tuple((self.class_names[i], float(row[i])) for i in order)
            results.append(Prediction(category=top[0][0], probability=top[0][1], top=top))
        return results


class _KerasRunner:
    def __init__(self, model):
        self.model = model

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(batch))


class _OnnxRunner:
    def __init__(self, path: Path):
        from .models import onnx_session

        self.session = onnx_session(path)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: batch})[0])


def _current_export(run_dir: Path) -> bool:
    """True when model.onnx exists and was exported from the current model.keras."""
    from .models import file_sha256

    meta_path, onnx_path, keras_path = (run_dir / EXPORT_FILE, run_dir / ONNX_FILE, run_dir / MODEL_FILE)
    if not (meta_path.is_file() and onnx_path.is_file()):
        return False
    if not keras_path.is_file():
        return True
    meta = json.loads(meta_path.read_text())
    return meta.get("source_sha256") == file_sha256(keras_path)


def export_classifier(run_dir, fmt: str = "onnx", batch: int = 2) -> tuple[Path, float]:
    """Export RUN_DIR/model.keras (without its augmentation layers) to RUN_DIR/model.onnx.

    Returns (path, max |onnxruntime - keras|) on a seeded random batch, as csearch.export
    measures it; export.json records it with the source model's sha256.
    """
    if fmt != "onnx":
        raise errors.unknown_name("export format", fmt, ["onnx"])
    try:
        from .export import export_onnx
    except ImportError:
        raise errors.ConfigError("ONNX export needs csearch.export, which is not installed") from None
    from .models import file_sha256

    run_dir = Path(run_dir).expanduser()
    config = read_run_config(run_dir)
    size = int(config["image_size"])
    model = inference_model(load_keras_model(run_dir / MODEL_FILE))
    sample = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3)).astype(np.float32)
    path = run_dir / ONNX_FILE
    diff = float(export_onnx(model, path, sample))
    meta = {"format": "onnx", "file": ONNX_FILE, "source": MODEL_FILE,
            "source_sha256": file_sha256(run_dir / MODEL_FILE), "max_abs_diff": diff}
    (run_dir / EXPORT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path, diff
