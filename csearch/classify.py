"""Inference with a trained category classifier (a RUN_DIR), plus its ONNX export.

A RUN_DIR (written by `python -m csearch.train classifier`) holds `model.keras`,
`classes.json` (class names in output order), `config.yaml`, `history.csv`, `summary.json`,
and after `export_classifier` also `model.onnx` + `export.json`. The Keras model itself (its
layers and their names) is csearch.classifier_model, imported only when a Keras model is loaded,
so importing this module (the query path) never imports Keras.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import yaml

from . import errors
from .types import Prediction

MODEL_FILE = "model.keras"
ONNX_FILE = "model.onnx"
CLASSES_FILE = "classes.json"
CONFIG_FILE = "config.yaml"
EXPORT_FILE = "export.json"
RUNTIMES = ("auto", "keras", "onnx")  # what runs a trained classifier


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

    def __init__(
        self, run_dir: Path, class_names: Sequence[str], image_size: int, color: str, model_file: Path, runner
    ):
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
    def runtime(self) -> str:
        """What runs the model: "onnx" (ONNX Runtime) or "keras"."""
        return "onnx" if self.model_file.suffix == ".onnx" else "keras"

    @classmethod
    def load(cls, run_dir, runtime: str = "auto") -> Classifier:
        """runtime: "auto" (ONNX when a current export exists), "keras" or "onnx"."""
        run_dir = Path(run_dir).expanduser()
        if not run_dir.is_dir():
            raise errors.StoreError(f"classifier RUN_DIR not found: {run_dir}")
        if runtime not in RUNTIMES:
            raise errors.unknown_name("classifier runtime", runtime, RUNTIMES)
        config = read_run_config(run_dir)
        class_names = read_class_names(run_dir)
        size, color = int(config["image_size"]), str(config.get("color", "rgb"))
        use_onnx = runtime == "onnx" or (runtime == "auto" and _current_export(run_dir))
        if use_onnx:
            path = run_dir / ONNX_FILE
            if not path.is_file():
                raise errors.StoreError(f"{run_dir}: no {ONNX_FILE} (run `csearch export {run_dir} --format onnx`)")
            runner = _OnnxRunner(path)
        else:
            path = run_dir / MODEL_FILE
            runner = _KerasRunner(_load_inference_model(path))
        classifier = cls(run_dir, class_names, size, color, path, runner)
        classifier._check_outputs()
        return classifier

    def _check_outputs(self) -> None:
        probe = self.predict(np.zeros((1, self.image_size, self.image_size, 3), np.uint8))
        if probe.shape[1] != len(self.class_names):
            raise errors.ModelMismatch(
                f"{self.model_file}: the model has {probe.shape[1]} outputs "
                f"but {CLASSES_FILE} lists {len(self.class_names)} classes"
            )

    def check_classes(self, data_classes: Iterable[str]) -> None:
        """Raise ModelMismatch when the data has classes this model cannot predict."""
        unknown = sorted(set(data_classes) - set(self.class_names))
        if unknown:
            shown = ", ".join(unknown[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
            raise errors.ModelMismatch(
                f"the data has {len(unknown)} categories the classifier in "
                f"{self.run_dir} does not know: {shown}; it knows "
                f"{len(self.class_names)}: {', '.join(self.class_names[:8])}"
                f"{'...' if len(self.class_names) > 8 else ''}"
            )

    def _validate(self, images: np.ndarray) -> np.ndarray:
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise errors.ImageError(
                f"classifier input must be a uint8 numpy array, got {getattr(images, 'dtype', type(images).__name__)}"
            )
        if images.ndim == 3:
            images = images[None]
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise errors.ImageError(
                f"classifier input must have shape (N, {self.image_size}, "
                f"{self.image_size}, 3), got {images.shape}; use "
                f"preprocess.model_input(image, {self.image_size}, {self.color!r})"
            )
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
        out = [self._runner(images[i : i + batch_size].astype(np.float32)) for i in range(0, len(images), batch_size)]
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


def _load_inference_model(path: Path):
    """model.keras without its augmentation layers (imports Keras: only when a Keras model runs)."""
    from .classifier_model import inference_model, load_keras_model

    return inference_model(load_keras_model(path))


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
    from .export import export_onnx
    from .models import file_sha256

    run_dir = Path(run_dir).expanduser()
    config = read_run_config(run_dir)
    size = int(config["image_size"])
    model = _load_inference_model(run_dir / MODEL_FILE)
    sample = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3)).astype(np.float32)
    path = run_dir / ONNX_FILE
    diff = float(export_onnx(model, path, sample))
    meta = {
        "format": "onnx",
        "file": ONNX_FILE,
        "source": MODEL_FILE,
        "source_sha256": file_sha256(run_dir / MODEL_FILE),
        "max_abs_diff": diff,
    }
    (run_dir / EXPORT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path, diff
