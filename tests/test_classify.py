"""The paper's classifier head, freezing, inference mode, RUN_DIR loading and prediction.

Backbones run with weights=None at 32 px, so this is about wiring, not accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from csearch import classifier_model, classify
from csearch.errors import ImageError, ModelMismatch, StoreError, UnknownNameError, WeightsNotFound

SIZE = 32


@pytest.fixture(scope="module")
def model():
    return classifier_model.build_classifier("mobilenet", 3, "none", SIZE, unfreeze=0, seed=0)


def test_head_is_the_papers(model):
    layers = {layer.name: layer for layer in model.layers}
    assert [n for n in layers if n in classifier_model.HEAD_LAYERS] == list(classifier_model.HEAD_LAYERS)
    assert layers["fc1"].units == 1024 and layers["fc1"].activation.__name__ == "relu"
    assert layers["dropout"].rate == 0.5
    assert layers["fc2"].units == 512 and layers["fc2"].activation.__name__ == "relu"
    assert layers["predictions"].units == 3 and layers["predictions"].activation.__name__ == "softmax"
    augment = [type(layer).__name__ for layer in layers[classifier_model.AUGMENT_LAYER].layers]
    assert augment == ["RandomFlip", "RandomRotation", "RandomZoom"]
    assert model.output_shape == (None, 3)
    probs = classifier_model.inference_model(model).predict_on_batch(np.full((2, SIZE, SIZE, 3), 128, np.float32))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_unfreeze_selects_top_layers(model):
    head = {"fc1", "fc2", "predictions"}
    try:
        assert classifier_model.set_trainable(model, 0) == 0
        assert {w.path.split("/")[0] for w in model.trainable_weights} == head
        # MobileNet's top 7 layers: pooling + conv_dw_13(+bn, relu) + conv_pw_13(+bn, relu)
        assert classifier_model.set_trainable(model, 7) == 4
        owners = {w.path.split("/")[0] for w in model.trainable_weights}
        assert owners == head | {"conv_dw_13", "conv_dw_13_bn", "conv_pw_13", "conv_pw_13_bn"}
        network = classifier_model.backbone_network(model)
        assert classifier_model.set_trainable(model, None) == sum(1 for layer in network.layers if layer.weights)
        with pytest.raises(Exception, match="unfreeze"):
            classifier_model.set_trainable(model, -3)
    finally:
        classifier_model.set_trainable(model, 0)


@pytest.mark.parametrize("wrapped", [True, False])
def test_inference_mode_survives_fit(wrapped):
    """keras fit() passes training=True down a Functional model, overriding a
    `backbone(x, training=False)` written at construction (the unwrapped control shows it);
    InferenceMode must stop it, or batch-norm statistics move and dropout fires."""
    from backend_probe import inference_mode_check

    same, unmoved = inference_mode_check(wrapped)
    assert same == wrapped and unmoved == wrapped


def test_classifier_wraps_its_backbone(model):
    assert type(model.get_layer(classifier_model.FEATURES_LAYER)).__name__ == "InferenceMode"


@pytest.mark.shared_models
def test_real_mobilenetv2_keeps_its_batch_norm_while_fine_tuning(shared_models):
    """The shared MobileNetV2 file has identity batch-norm: training the whole backbone one step
    must leave every moving statistic as loaded, and training=True must not change features."""
    import keras

    path = shared_models / "mobilenet_v2_1.0_224_imagenet.weights.h5"
    clf = classifier_model.build_classifier("mobilenetv2", 2, path, 96, unfreeze=None, seed=0)
    network = classifier_model.backbone_network(clf)
    bns = [layer for layer in network.layers if type(layer).__name__ == "BatchNormalization"]
    before = [keras.ops.convert_to_numpy(b.moving_variance).copy() for b in bns]
    x = np.random.default_rng(0).uniform(0, 255, (4, 96, 96, 3)).astype(np.float32)
    features = clf.get_layer(classifier_model.FEATURES_LAYER)
    np.testing.assert_allclose(np.asarray(features(x, training=True)), np.asarray(features(x, training=False)))
    clf.compile(keras.optimizers.SGD(1e-3), "sparse_categorical_crossentropy")
    assert np.isfinite(clf.train_on_batch(x, np.array([0, 1, 0, 1])))
    for b, old in zip(bns, before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(b.moving_variance), old)


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(UnknownNameError) as info:
        classifier_model.build_classifier("mobilnet", 3, "none", SIZE)
    message = str(info.value)
    assert "mobilenet" in message and "resnet101v2" in message and "\n" not in message


def test_missing_weights_file_is_one_line(tmp_path):
    with pytest.raises(WeightsNotFound) as info:
        classifier_model.build_classifier("mobilenet", 3, tmp_path / "nope.weights.h5", SIZE)
    assert "nope.weights.h5" in str(info.value) and "\n" not in str(info.value)


def write_run(run_dir, model, class_names, color="rgb"):
    """A RUN_DIR as csearch.train writes it (only what Classifier.load reads)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    model.save(run_dir / classify.MODEL_FILE)
    (run_dir / classify.CLASSES_FILE).write_text(json.dumps(class_names))
    (run_dir / classify.CONFIG_FILE).write_text(
        yaml.safe_dump({"train": {"backbone": "mobilenet", "image_size": SIZE, "color": color}})
    )
    return run_dir


@pytest.fixture(scope="module")
def run_dir(model, tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("clf") / "run", model, ["bottle", "jar", "tube"])


def test_classifier_load_and_predict(run_dir, model):
    clf = classify.Classifier.load(run_dir)
    assert clf.class_names == ["bottle", "jar", "tube"] and clf.image_size == SIZE and clf.color == "rgb"
    assert clf.runtime == "keras"
    assert [p.name for p in clf.files] == ["model.keras", "classes.json"] and all(p.is_absolute() for p in clf.files)
    images = np.random.default_rng(1).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    probs = clf.predict(images, batch_size=2)
    assert probs.dtype == np.float32 and probs.shape == (5, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    expected = classifier_model.inference_model(model).predict_on_batch(images.astype(np.float32))
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    top = clf.predict_top(images, 2)
    assert len(top) == 5 and len(top[0].top) == 2
    for row, prediction in zip(probs, top):
        assert prediction.category == clf.class_names[int(np.argmax(row))]
        assert prediction.probability == pytest.approx(float(row.max()))
        assert prediction.top[0][1] >= prediction.top[1][1]
    assert clf.predict(np.zeros((0, SIZE, SIZE, 3), np.uint8)).shape == (0, 3)


def test_predict_validates_input(run_dir):
    clf = classify.Classifier.load(run_dir)
    with pytest.raises(ImageError, match="uint8"):
        clf.predict(np.zeros((1, SIZE, SIZE, 3), np.float32))
    with pytest.raises(ImageError, match="model_input"):
        clf.predict(np.zeros((1, SIZE + 1, SIZE, 3), np.uint8))


def test_gray_model_converts_rgb_input(model, tmp_path):
    from csearch.preprocess import to_color

    clf = classify.Classifier.load(write_run(tmp_path / "gray", model, ["a", "b", "c"], color="gray"))
    image = np.random.default_rng(2).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    np.testing.assert_allclose(clf.predict(image), clf.predict(to_color(image[0], "gray")[None]), atol=1e-6)


def test_class_mismatches_are_clear_errors(run_dir, model, tmp_path):
    clf = classify.Classifier.load(run_dir)
    clf.check_classes(["jar", "bottle"])
    with pytest.raises(ModelMismatch, match="spoon"):
        clf.check_classes(["jar", "spoon"])
    wrong = write_run(tmp_path / "wrong", model, ["a", "b"])  # 3 outputs, 2 names
    with pytest.raises(ModelMismatch, match="3 outputs"):
        classify.Classifier.load(wrong)
    with pytest.raises(StoreError):
        classify.Classifier.load(tmp_path / "missing")
    with pytest.raises(StoreError, match="no model.onnx"):
        classify.Classifier.load(run_dir, runtime="onnx")


def test_export_classifier_to_onnx(model, tmp_path):
    pytest.importorskip("csearch.export")  # written by the export module's owner
    pytest.importorskip("onnxruntime")
    run = write_run(tmp_path / "exp", model, ["bottle", "jar", "tube"])
    path, diff = classify.export_classifier(run)
    assert path == run / "model.onnx" and path.is_file() and diff < 1e-4
    clf = classify.Classifier.load(run)  # auto: the export is current, so ONNX runs
    assert clf.runtime == "onnx" and clf.files[0].name == "model.onnx"
    images = np.random.default_rng(3).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    np.testing.assert_allclose(clf.predict(images), classify.Classifier.load(run, "keras").predict(images), atol=1e-4)
    model.save(run / "model.keras")  # a "retrained" model makes the export stale
    (run / "model.keras").touch()
    meta = json.loads((run / "export.json").read_text())
    meta["source_sha256"] = "0" * 64
    (run / "export.json").write_text(json.dumps(meta))
    assert classify.Classifier.load(run).runtime == "keras"
