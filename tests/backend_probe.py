"""Run csearch's Keras model code on the backend named by KERAS_BACKEND and print one JSON line.

Used by test_backends.py in a subprocess (Keras picks its backend once per process):

    KERAS_BACKEND=jax python tests/backend_probe.py CATALOGUE_DIR WORK_DIR

Checks what the TensorFlow-backend tests check, on another backend: the classifier head trains,
InferenceMode keeps the backbone's batch-norm and dropout in inference mode during fit(), a run
of `python -m csearch.train classifier` (cached features, cached activations with the top layers
fine-tuned, and end to end on images) loads as a Classifier, and a Keras extractor embeds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def inference_mode_check(wrapped: bool = True) -> tuple[bool, bool]:
    """(same output with training=True and False, batch-norm statistics unmoved by fit()) for a
    batch-norm + dropout sub-model, wrapped in InferenceMode or not (the control). Keras fit()
    passes training=True down a Functional model; InferenceMode must stop it."""
    import keras

    from csearch.classifier_model import InferenceMode

    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, keras.layers.Dropout(0.5)(keras.layers.BatchNormalization()(inner_in)))
    x_in = keras.Input((4,))
    sub = InferenceMode(inner) if wrapped else inner
    out = keras.layers.Dense(2, activation="softmax")(sub(x_in, training=False))
    model = keras.Model(x_in, out)
    x = np.random.default_rng(0).normal(5, 3, (16, 4)).astype(np.float32)
    same = np.allclose(
        keras.ops.convert_to_numpy(model(x, training=True)), keras.ops.convert_to_numpy(model(x, training=False))
    )
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    model.fit(x, np.arange(16) % 2, epochs=1, batch_size=16, verbose=0)
    unmoved = np.allclose(keras.ops.convert_to_numpy(inner.layers[1].moving_mean), 0.0)
    return bool(same), bool(unmoved)


def train_runs(catalogue: str, work: Path) -> dict:
    from csearch import classify
    from csearch.train import cli as train_cli

    common = [
        "--data",
        catalogue,
        "--backbone",
        "mobilenet",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--set",
        "copies=1",
        "--seed",
        "0",
    ]
    modes = {
        "features": ["--freeze-backbone"],
        "activations": ["--unfreeze", "7"],
        "images": ["--freeze-backbone", "--set", "cache=none"],
    }
    results = {}
    for mode, extra in modes.items():
        out = work / mode
        code = train_cli.main(["classifier", *common, *extra, "--out", str(out)])
        summary = json.loads((out / "summary.json").read_text()) if code == 0 else {}
        probs = classify.Classifier.load(out).predict(np.full((2, 32, 32, 3), 128, np.uint8)) if code == 0 else None
        results[mode] = {
            "code": code,
            "mode": summary.get("mode"),
            "probs_sum": None if probs is None else np.asarray(probs).sum(axis=1).round(5).tolist(),
        }
    return results


def extractor_dim() -> list:
    from csearch.models import load_extractor

    extractor = load_extractor("mobilenet", "none", image_size=32)
    features = extractor(np.zeros((3, 32, 32, 3), np.uint8))
    return [int(d) for d in features.shape] + [bool(np.isfinite(features).all())]


def compute_device(backend: str) -> str:
    """Where the backend runs its arrays (cpu, gpu/cuda)."""
    if backend == "jax":
        import jax

        return jax.devices()[0].platform
    if backend == "torch":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def main() -> int:
    import keras

    catalogue, work = sys.argv[1], Path(sys.argv[2])
    if not Path(catalogue).is_dir():  # a device machine: make the same synthetic catalogue here
        sys.path.insert(0, str(Path(__file__).parent))
        from conftest import write_catalogue

        write_catalogue(Path(catalogue), size=(40, 40))
    report = {
        "backend": keras.backend.backend(),
        "device": compute_device(keras.backend.backend()),
        "inference_mode": all(inference_mode_check(True)) and not any(inference_mode_check(False)),
        "train": train_runs(catalogue, work),
        "extractor": extractor_dim(),
    }
    print("PROBE " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
