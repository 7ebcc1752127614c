"""The model registry: backbones (random weights, small inputs), weight loading that is proven
complete, weight resolution (offline), and ONNX extractors (tiny generated graphs + the real
EfficientNet-Lite0 when ../shared/models is present)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from csearch import errors, models

MOBILENET_FILE = "mobilenet_1.0_224_imagenet.weights.h5"
MOBILENETV2_FILE = "mobilenet_v2_1.0_224_imagenet.weights.h5"
LITE0_FILE = "efficientnet_lite0_imagenet.onnx"


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture
def offline_home(tmp_path, monkeypatch):
    """Empty $CSEARCH_HOME and Keras cache, and a Keras download that must not happen."""
    import keras

    home, keras_home = tmp_path / "home", tmp_path / "keras"
    home.mkdir()
    monkeypatch.setenv("CSEARCH_HOME", str(home))
    monkeypatch.setenv("KERAS_HOME", str(keras_home))

    def no_download(*args, **kwargs):
        raise AssertionError(f"unexpected download: {args}")

    monkeypatch.setattr(keras.utils, "get_file", no_download)
    return home


# ---------------------------------------------------------------------------------- registry


def test_registry_roles_and_dims():
    assert models.names("backbone") == ["efficientnetv2l", "mobilenet", "mobilenetv2", "resnet101v2", "resnet50"]
    assert models.names("onnx_extractor") == ["efficientnet_lite0"]
    assert models.names("saliency") == ["u2net", "u2netp"]
    assert models.names("matting") == ["fba"]
    assert len(models.names()) == 9
    dims = {n: models.get_spec(n).dim for n in models.names(models.EXTRACTOR_ROLES)}
    assert dims == {
        "resnet50": 2048,
        "resnet101v2": 2048,
        "efficientnetv2l": 1280,
        "mobilenetv2": 1280,
        "mobilenet": 1024,
        "efficientnet_lite0": 1280,
    }
    for spec in models.REGISTRY.values():
        assert spec.weights_file and spec.source and spec.preprocessing in models.PREPROCESSING
        if spec.is_keras:
            assert spec.keras_url.startswith(models.KERAS_URL) and spec.keras_url.endswith(spec.keras_file)
            assert spec.download_url == spec.keras_url
        # every model says where its file comes from: an official URL, or why there is none
        assert spec.download_url or spec.source.startswith("no download"), spec.name
    from csearch.models.convert import CONVERTERS

    lite0 = models.get_spec("efficientnet_lite0")
    assert lite0.converter in CONVERTERS and lite0.url.endswith("/efficientnet/lite/efficientnet-lite0.tar.gz")
    assert models.get_spec("u2netp").url == "https://github.com/danielgatis/rembg/releases/download/v0.0.0/u2netp.onnx"


def test_unknown_name_lists_valid_names():
    with pytest.raises(errors.UnknownNameError) as info:
        models.get_spec("mobilenet3")
    message = str(info.value)
    assert "'mobilenet3'" in message and "Did you mean" in message
    assert all(name in message for name in models.names())


def test_load_extractor_rejects_non_extractors():
    with pytest.raises(errors.UnknownNameError, match="unknown extractor 'u2netp'.*efficientnet_lite0"):
        models.load_extractor("u2netp")


@pytest.mark.parametrize("mode,reference", [("tf", "mobilenet"), ("caffe", "resnet50"), ("tf", "resnet_v2")])
def test_preprocess_layer_matches_keras_applications(mode, reference):
    import keras

    x = images(2, 8).astype(np.float32)
    want = getattr(keras.applications, reference).preprocess_input(x.copy())
    got = keras.ops.convert_to_numpy(models.preprocess_layer(mode)(x))
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(models.preprocess_array(x, mode), want, atol=1e-4)


# ---------------------------------------------------------------------------------- backbones

SLOW_BACKBONES = {"efficientnetv2l"}  # 118M parameters: ~10 s to build on 2 cores


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_BACKBONES else n for n in models.names("backbone")]
)
def test_backbone_forward_random_weights(name):
    spec = models.get_spec(name)
    model = models.build_backbone(name, weights=None, image_size=32)
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, spec.dim)
    backbone = model.get_layer(models.BACKBONE_LAYER)
    assert not backbone.trainable and backbone.weights  # frozen by default, reachable by name
    assert model.get_layer(models.PREPROCESS_LAYER).mode == spec.preprocessing
    out = np.asarray(model(images(2, 32).astype(np.float32), training=False))
    assert out.shape == (2, spec.dim) and np.isfinite(out).all()


def test_keras_extractor_batches_and_validates():
    extractor = models.load_extractor("mobilenet", "none", image_size=32)
    assert (extractor.name, extractor.dim, extractor.input_size, extractor.files) == ("mobilenet", 1024, 32, [])
    batch = images(3, 32)
    want = np.asarray(extractor.model(batch.astype(np.float32), training=False))
    np.testing.assert_allclose(extractor(batch), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(extractor(batch[:1]), want[:1], rtol=1e-5, atol=1e-6)  # another batch size
    assert extractor(batch[:0]).shape == (0, 1024)
    with pytest.raises(errors.ImageError, match="uint8"):
        extractor(batch.astype(np.float32))
    with pytest.raises(errors.ImageError, match=r"\(N, 32, 32, 3\)"):
        extractor(images(1, 64))


def test_backbone_saved_and_reloaded(tmp_path):
    """A saved model holding the Preprocess layer loads back with models.custom_objects()."""
    import keras

    model = models.build_backbone("mobilenet", None, 32)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", custom_objects=models.custom_objects())
    x = images(2, 32).astype(np.float32)
    np.testing.assert_allclose(loaded.predict_on_batch(x), model.predict_on_batch(x), rtol=1e-5, atol=1e-7)


def test_legacy_h5_weights_load(tmp_path):
    """Keras' own downloads are legacy .h5 files (loaded by layer order): they load too."""
    source = models.build_backbone("mobilenet", None, 32)
    source.get_layer(models.BACKBONE_LAYER).save(tmp_path / "legacy.h5")
    loaded = models.build_backbone("mobilenet", tmp_path / "legacy.h5", 32)
    for want, got in zip(source.get_layer("backbone").weights, loaded.get_layer("backbone").weights):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_incomplete_weights_file_is_mismatch(tmp_path):
    import h5py

    path = tmp_path / "partial.weights.h5"
    models.build_backbone("mobilenet", None, 32).get_layer("backbone").save_weights(path)
    with h5py.File(path, "a") as h5:
        del h5["layers/conv2d_3"]
    with pytest.raises(errors.ModelMismatch, match="does not fit the mobilenet backbone") as info:
        models.build_backbone("mobilenet", path, 32)
    assert "\n" not in str(info.value)


def test_weights_left_unset_are_detected(tmp_path, monkeypatch):
    """Belt and braces: even if Keras loaded nothing without complaint, NaN sentinels remain."""
    import keras

    path = tmp_path / "any.weights.h5"
    path.write_bytes(b"")
    monkeypatch.setattr(keras.Model, "load_weights", lambda self, filepath: None)
    with pytest.raises(errors.ModelMismatch, match=r"left (\d+) of \1 weights unset"):
        models.build_backbone("mobilenet", path, 32)


def _keras_file_keys(network) -> dict:
    """Layer -> its group in a Keras 3 `.weights.h5` file: snake_case class name plus a per-class
    counter over the network's layers in order (how Keras names them; the file stores no
    layer names)."""

    def snake(name):
        return re.sub(r"([a-z])([A-Z])", r"\1_\2", re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)).lower()

    counts, keys = {}, {}
    for layer in network.layers:
        base = snake(type(layer).__name__)
        keys[layer.name] = base if base not in counts else f"{base}_{counts[base]}"
        counts[base] = counts.get(base, 0) + 1
    return keys


@pytest.mark.shared_models
@pytest.mark.parametrize("name,file", [("mobilenet", MOBILENET_FILE), ("mobilenetv2", MOBILENETV2_FILE)])
def test_real_weights_reach_every_layer(shared_models, name, file):
    import h5py

    path = shared_models / file
    network = models.build_backbone(name, path, 96).get_layer(models.BACKBONE_LAYER)
    keys, checked = _keras_file_keys(network), 0
    with h5py.File(path, "r") as h5:
        for layer in network.layers:
            for index, weight in enumerate(layer.weights):
                stored = h5[f"layers/{keys[layer.name]}/vars/{index}"][()]
                np.testing.assert_array_equal(np.asarray(weight), stored, err_msg=f"{name}: {weight.path}")
                checked += 1
    assert checked == len(network.weights) > 100


@pytest.mark.shared_models
def test_real_mobilenet_matches_full_reference_model(shared_models):
    """The README's reference: the full ImageNet classifier loaded from the file; our pooled
    vector must equal its global-average-pooling layer."""
    import keras

    path = shared_models / MOBILENET_FILE
    full = keras.applications.MobileNet(weights=str(path))
    pooling = next(layer for layer in full.layers if isinstance(layer, keras.layers.GlobalAveragePooling2D))
    reference = keras.Model(full.input, pooling.output)
    batch = images(2, 224, seed=3)
    want = np.asarray(reference(keras.applications.mobilenet.preprocess_input(batch.astype(np.float32)))).reshape(2, -1)
    extractor = models.load_extractor("mobilenet", path)
    got = extractor(batch)
    assert extractor.files == [path.resolve()]
    assert np.abs(got - want).max() < 1e-4 and np.abs(want).max() > 0.1


@pytest.mark.shared_models
def test_wrong_weights_file_is_one_line_mismatch(shared_models):
    with pytest.raises(
        errors.ModelMismatch, match=f"mobilenet: weights file .*{MOBILENETV2_FILE} does not fit"
    ) as info:
        models.build_backbone("mobilenet", shared_models / MOBILENETV2_FILE, 32)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------- weights


def test_resolve_none_and_explicit_paths(tmp_path, offline_home):
    assert models.resolve_weights("resnet50", None) is None
    assert models.resolve_weights("resnet50", "None") is None
    file = tmp_path / "mine.h5"
    file.write_bytes(b"x")
    assert models.resolve_weights("resnet50", str(file)) == file.resolve()
    assert models.resolve_weights("resnet50", file) == file.resolve()
    with pytest.raises(errors.WeightsNotFound, match="resnet50: weights file not found: .*nope.h5"):
        models.resolve_weights("resnet50", tmp_path / "nope.h5")
    with pytest.raises(errors.ConfigError, match="u2netp is an ONNX model"):
        models.resolve_weights("u2netp", "none")


def test_resolve_finds_csearch_home_then_keras_cache(tmp_path, offline_home):
    (offline_home / MOBILENET_FILE).write_bytes(b"x")
    assert models.resolve_weights("mobilenet", "imagenet") == (offline_home / MOBILENET_FILE).resolve()
    keras_file = tmp_path / "keras" / "models" / models.get_spec("resnet50").keras_file
    keras_file.parent.mkdir(parents=True)
    keras_file.write_bytes(b"x")
    assert models.resolve_weights("resnet50", "imagenet") == keras_file.resolve()
    assert models.find_weights("resnet101v2") is None
    # Keras' own file name in $CSEARCH_HOME (what `csearch models fetch mobilenetv2` saves) counts too
    fetched = offline_home / models.get_spec("mobilenetv2").keras_file
    fetched.write_bytes(b"x")
    assert models.resolve_weights("mobilenetv2", "imagenet") == fetched.resolve()


def test_csearch_home_default(monkeypatch):
    monkeypatch.delenv("CSEARCH_HOME", raising=False)
    assert models.csearch_home() == Path.home() / ".cache" / "csearch"


def test_missing_onnx_file_names_it_and_the_fetch_command(offline_home):
    with pytest.raises(errors.WeightsNotFound) as info:
        models.resolve_weights("u2netp", "imagenet")
    message = str(info.value)
    assert "u2netp.onnx" in message and str(offline_home) in message and "\n" not in message
    assert "`csearch models fetch u2netp` (downloads https://github.com/danielgatis/rembg/" in message
    with pytest.raises(errors.WeightsNotFound, match=r"efficientnet_lite0_imagenet\.onnx.*csearch models fetch eff"):
        models.load_extractor("efficientnet_lite0")
    with pytest.raises(errors.WeightsNotFound, match="`csearch models fetch fba --from DIR`"):
        models.resolve_weights("fba")


def test_imagenet_weights_never_download(offline_home, tmp_path):
    """Library constructors only look files up (offline_home fails any Keras download): a
    missing Keras backbone file is one WeightsNotFound line naming the file, both places looked
    in and the command that gets it."""
    with pytest.raises(errors.WeightsNotFound) as info:
        models.resolve_weights("resnet50", "imagenet")
    message = str(info.value)
    spec = models.get_spec("resnet50")
    assert "\n" not in message
    assert message.startswith(f"resnet50: model file {spec.weights_file} not found in {offline_home} or Keras' cache")
    assert f"`csearch models fetch resnet50` (downloads {spec.keras_url})" in message
    with pytest.raises(errors.WeightsNotFound, match=f"mobilenet: model file {MOBILENET_FILE} not found"):
        models.build_backbone("mobilenet")  # the default is weights="imagenet"
    with pytest.raises(errors.WeightsNotFound, match="nope.h5 .*`csearch models fetch resnet50`"):
        models.resolve_weights("resnet50", tmp_path / "nope.h5")


def test_file_sha256_is_cached_by_size_and_mtime(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert models.file_sha256(path) == hashlib.sha256(b"abc").hexdigest()
    path.write_bytes(b"abcd")  # new size -> new cache key
    assert models.file_sha256(str(path)) == hashlib.sha256(b"abcd").hexdigest()


@pytest.mark.shared_models
def test_registered_sha256_match_shared_files(shared_models):
    for spec in models.REGISTRY.values():
        if spec.sha256 and (shared_models / spec.weights_file).is_file():
            assert models.file_sha256(shared_models / spec.weights_file) == spec.sha256, spec.name


def test_describe_models(offline_home):
    (offline_home / "u2netp.onnx").write_bytes(b"x")
    rows = {row["name"]: row for row in models.describe_models()}
    assert set(rows) == set(models.names())
    assert rows["u2netp"]["found"] == str(offline_home / "u2netp.onnx")
    assert rows["mobilenet"]["found"] is None and rows["mobilenet"]["weights_file"] == MOBILENET_FILE
    assert rows["mobilenet"]["put_in"] == str(offline_home)
    assert {"role", "dim", "input_size", "source", "description"} <= set(rows["resnet50"])
    assert rows["u2netp"]["fetch"] is None and rows["u2netp"]["url"] == models.get_spec("u2netp").url
    assert rows["mobilenet"]["fetch"].startswith("`csearch models fetch mobilenet` (downloads https://")


# ---------------------------------------------------------------------------------- ONNX


def lite0_like_onnx(path: Path, bake_batch: bool = False, size: int = 224) -> tuple[Path, np.ndarray]:
    """EfficientNet-Lite0's interface (input `input` [1,3,S,S], outputs `features` [1,1280] and
    `logits`): features = channel means @ W. `bake_batch` reshapes to a constant [1, 3], as
    some batch-1 exports do, so batches > 1 fail."""
    weights = np.random.default_rng(0).normal(size=(3, 1280)).astype(np.float32)
    flatten = (
        helper.make_node("Reshape", ["pooled", "shape"], ["flat"])
        if bake_batch
        else helper.make_node("Flatten", ["pooled"], ["flat"], axis=1)
    )
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            flatten,
            helper.make_node("MatMul", ["flat", "w"], ["features"]),
            helper.make_node("MatMul", ["features", "head"], ["logits"]),
        ],
        "lite0_like",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [
            helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 1280]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10]),
        ],
        initializer=[
            numpy_helper.from_array(weights, "w"),
            numpy_helper.from_array(np.ones((1280, 10), np.float32), "head"),
            numpy_helper.from_array(np.array([1, 3], np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path, weights


def lite0_reference(batch: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return ((batch.astype(np.float32) - 127) / 128).mean(axis=(1, 2)) @ weights


@pytest.mark.parametrize("bake_batch", [False, True])
def test_onnx_extractor_with_lite0_interface(tmp_path, bake_batch):
    path, weights = lite0_like_onnx(tmp_path / "lite0.onnx", bake_batch)
    extractor = models.load_extractor("efficientnet_lite0", path, image_size=224)
    assert (extractor.dim, extractor.input_size, extractor.files) == (1280, 224, [path.resolve()])
    assert extractor.batched is not bake_batch  # batch-1 graphs that cannot batch run per image
    batch = images(3, 224)
    np.testing.assert_allclose(extractor(batch), lite0_reference(batch, weights), rtol=1e-4, atol=1e-4)
    assert extractor(batch[:0]).shape == (0, 1280)
    with pytest.raises(errors.ModelMismatch, match="takes 224 px input, got image_size=192"):
        models.load_extractor("efficientnet_lite0", path, image_size=192)


def test_onnx_extractor_interface_mismatch(tmp_path):
    path, _ = lite0_like_onnx(tmp_path / "other.onnx")
    with pytest.raises(errors.ModelMismatch, match="has no input 'x' \\(inputs: input\\)"):
        models.OnnxExtractor("other", path, input_name="x")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(errors.ModelMismatch, match="not a readable ONNX file"):
        models.load_extractor("efficientnet_lite0", tmp_path / "junk.onnx")
    with pytest.raises(errors.ModelMismatch, match="not an extractor written by `csearch export`"):
        models.load_extractor(str(path))  # a plain ONNX file carries no csearch metadata


@pytest.mark.shared_models
def test_real_efficientnet_lite0(shared_models):
    import onnxruntime as ort

    path = shared_models / LITE0_FILE
    extractor = models.load_extractor("efficientnet_lite0", path)
    assert extractor.batched and extractor.dim == 1280
    batch = images(2, 224, seed=5)
    got = extractor(batch)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = ((batch.astype(np.float32) - 127) / 128).transpose(0, 3, 1, 2)
    want = np.concatenate([session.run(["features"], {"input": feed[i : i + 1]})[0] for i in range(2)])
    assert got.shape == (2, 1280) and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
