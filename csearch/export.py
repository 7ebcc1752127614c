"""Export Keras models to ONNX (Keras 3's own `model.export(format="onnx")`), verified.

On the TensorFlow (and JAX) backend Keras converts through `tf2onnx`, which is therefore
needed for export only (`pip install "tf2onnx>=1.17"`; 1.17 is the first release that accepts
protobuf >= 4, which TensorFlow 2.21 needs). Every export is run once with onnxruntime and
compared with Keras, so a file that disagrees with its model is never left behind silently:
the caller gets the max abs difference, and the file only appears (atomically) once written.

Exported extractors carry csearch metadata (`csearch.role` etc.) so that
`models.load_extractor("model.onnx")` knows how to feed them: NHWC float RGB in [0, 255],
the model-specific preprocessing being inside the graph.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

import numpy as np

from . import errors, models
from .errors import CSearchError


class ExportError(CSearchError, RuntimeError):
    """A model could not be exported to ONNX (missing exporter, unsupported op, ...)."""


def _require_exporter() -> None:
    import keras

    backend = keras.backend.backend()
    if backend in ("tensorflow", "jax") and importlib.util.find_spec("tf2onnx") is None:
        raise ExportError(f"ONNX export on the {backend} backend needs tf2onnx: pip install 'tf2onnx>=1.17'")


def _set_metadata(path: Path, metadata: Mapping[str, object]) -> None:
    import onnx

    model = onnx.load(str(path))
    existing = {p.key: p.value for p in model.metadata_props}
    existing.update({str(k): str(v) for k, v in metadata.items()})
    onnx.helper.set_model_props(model, existing)
    onnx.save(model, str(path))


def _keras_outputs(model, sample: np.ndarray) -> list[np.ndarray]:
    out = model.predict_on_batch(sample)
    return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def onnx_max_abs_diff(path: Union[str, os.PathLike], sample: np.ndarray, expected: list[np.ndarray]) -> float:
    """Run the ONNX file on `sample`; the largest abs difference from `expected` (the Keras
    outputs, in order) over all outputs."""
    session = models.onnx_session(path, "the exported Keras model")
    got = session.run(None, {session.get_inputs()[0].name: sample})
    if len(got) != len(expected):
        raise ExportError(f"{path}: ONNX has {len(got)} outputs, the Keras model {len(expected)}")
    return max(float(np.max(np.abs(np.asarray(g, np.float32) - w))) if w.size else 0.0 for g, w in zip(got, expected))


def export_onnx(
    model,
    path: Union[str, os.PathLike],
    sample: np.ndarray,
    metadata: Optional[Mapping[str, object]] = None,
    opset: Optional[int] = None,
) -> float:
    """Export a single-input Keras model to `path` as ONNX (batch dim left dynamic), check it
    with onnxruntime on `sample` (a batch for the model's input; cast to float32), and return
    the max abs difference from Keras. `metadata` is stored as ONNX metadata_props."""
    _require_exporter()
    path = Path(path)
    sample = np.asarray(sample, np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    expected = _keras_outputs(model, sample)  # also "calls" the model, which export requires
    try:
        try:
            # stdout is kept for machine-readable output; converter chatter goes to stderr.
            with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
                # Keras' tf2onnx numpy-2 shim probes np.object, which warns; not ours to fix.
                warnings.filterwarnings("ignore", message=".*np.object.*", category=FutureWarning)
                model.export(str(partial), format="onnx", verbose=False, opset_version=opset)
        except Exception as exc:  # noqa: BLE001 - converters raise anything; chained below
            raise ExportError(f"ONNX export of {model.name} failed: {errors.one_line(exc)}") from exc
        if metadata:
            _set_metadata(partial, metadata)
        diff = onnx_max_abs_diff(partial, sample, expected)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return diff


def export_extractor(
    name: str, weights: models.WeightsArg, out_path: Union[str, os.PathLike], image_size: Optional[int] = None
) -> tuple[Path, float]:
    """Export a registered Keras backbone (preprocessing included) as an ONNX extractor that
    `models.load_extractor(out_path)` can load. Returns (path, max abs difference from Keras)
    on a seeded random batch."""
    spec = models.get_spec(name)
    if not spec.is_keras:
        raise errors.unknown_name("Keras backbone", name, models.names("backbone"))
    weights_path = models.resolve_weights(name, weights)
    model = models.build_backbone(name, weights_path, image_size)
    size = int(model.input_shape[1])
    sample = np.random.default_rng(0).integers(0, 256, (2, size, size, 3)).astype(np.float32)
    metadata = {
        models.META_ROLE: "extractor",
        models.META_MODEL: name,
        models.META_LAYOUT: "nhwc",
        models.META_PREPROCESSING: "raw",
        "csearch.image_size": size,
        "csearch.dim": int(model.output_shape[-1]),
        "csearch.weights": str(weights_path) if weights_path else "none",
        "csearch.weights_sha256": models.file_sha256(weights_path) if weights_path else "",
    }
    return Path(out_path), export_onnx(model, out_path, sample, metadata)
