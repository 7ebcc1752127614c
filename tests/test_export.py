"""ONNX export through Keras 3's own exporter (tf2onnx on TensorFlow), checked with
onnxruntime; exported extractors load back through models.load_extractor."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from csearch import errors, export, models

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tf2onnx") is None,
    reason="Keras' ONNX export on TensorFlow needs tf2onnx (pip install 'tf2onnx>=1.17')",
)


def tiny_model(size: int = 16):
    """Preprocess (caffe: exercises the BGR flip) -> conv -> ReLU -> pooled features (4,)."""
    import keras

    keras.utils.set_random_seed(0)
    image = keras.Input((size, size, 3), name="image")
    x = models.preprocess_layer("caffe")(image)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(x)
    return keras.Model(image, keras.layers.GlobalAveragePooling2D()(x), name="tiny")


def sample(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.float32)


def test_export_onnx_matches_keras(tmp_path):
    import onnx
    import onnxruntime as ort

    model = tiny_model()
    path = tmp_path / "out" / "tiny.onnx"
    diff = export.export_onnx(model, path, sample(2, 16), metadata={"csearch.role": "test"})
    assert diff < 1e-4
    assert path.is_file() and not list(path.parent.glob("*.partial"))
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props}["csearch.role"] == "test"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = sample(5, 16, seed=1)  # another batch size: the batch dim stays dynamic
    got = session.run(None, {session.get_inputs()[0].name: batch})[0]
    want = model.predict_on_batch(batch)
    assert np.abs(want).max() > 1 and np.abs(got - want).max() < 1e-4


def test_export_failure_is_typed_and_leaves_no_file(tmp_path, monkeypatch):
    model = tiny_model()

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported op\nwith details")

    monkeypatch.setattr(model, "export", broken)
    with pytest.raises(export.ExportError, match="ONNX export of tiny failed: unsupported op with details"):
        export.export_onnx(model, tmp_path / "x.onnx", sample(1, 16))
    assert list(tmp_path.iterdir()) == []


def test_export_extractor_round_trip(tmp_path, monkeypatch):
    """export_extractor's metadata lets load_extractor feed the file (NHWC, [0, 255]); the
    tiny model stands in for a registered backbone to keep the conversion fast."""
    model = tiny_model(32)
    monkeypatch.setattr(models, "build_backbone", lambda name, weights, image_size: model)
    path, diff = export.export_extractor("resnet50", None, tmp_path / "r.onnx")
    assert path == tmp_path / "r.onnx" and diff < 1e-4
    extractor = models.load_extractor(str(path), image_size=32)
    assert (extractor.dim, extractor.input_size, extractor.layout, extractor.batched) == (4, 32, "nhwc", True)
    assert extractor.files == [path.resolve()]
    batch = sample(3, 32).astype(np.uint8)
    np.testing.assert_allclose(extractor(batch), model.predict_on_batch(batch.astype(np.float32)), rtol=1e-4, atol=1e-4)
    with pytest.raises(errors.ConfigError, match="holds its weights"):
        models.load_extractor(str(path), weights="/some/file.h5")


def test_export_extractor_rejects_onnx_models(tmp_path):
    with pytest.raises(errors.UnknownNameError, match="unknown Keras backbone 'u2netp'"):
        export.export_extractor("u2netp", "imagenet", tmp_path / "u.onnx")


@pytest.mark.slow
def test_export_real_mobilenet_backbone(tmp_path):
    """The whole registered path: a real backbone graph (random weights, saved to a file so the
    Keras and ONNX extractors share them) exported and loaded back."""
    weights = tmp_path / "m.weights.h5"
    models.build_backbone("mobilenet", None, 32).get_layer(models.BACKBONE_LAYER).save_weights(weights)
    path, diff = export.export_extractor("mobilenet", weights, tmp_path / "m.onnx", image_size=32)
    onnx_extractor = models.load_extractor(str(path))
    keras_extractor = models.load_extractor("mobilenet", weights, image_size=32)
    batch = sample(2, 32).astype(np.uint8)
    want = keras_extractor(batch)
    scale = np.abs(want).max()
    assert scale > 0 and diff <= 1e-4 * max(scale, 1.0)
    np.testing.assert_allclose(onnx_extractor(batch), want, rtol=1e-3, atol=1e-4 * scale)
