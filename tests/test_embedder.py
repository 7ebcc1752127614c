"""The learned product embedding: pooling, the backbone trunk, training, export, and its use by the index."""

from __future__ import annotations

import json

import numpy as np
import pytest

from csearch.errors import CatalogueError, ConfigError, ModelMismatch


def test_rmac_regions_cover_the_map_at_every_scale():
    from csearch.embedder.layers import rmac_regions

    regions = rmac_regions(7, 7, 3)
    assert regions[0] == (0, 0, 7, 7)
    assert len(regions) == 1 + 4 + 9
    assert all(0 <= y0 < y1 <= 7 and 0 <= x0 < x1 <= 7 for y0, x0, y1, x1 in regions)
    assert {y1 - y0 for y0, _, y1, _ in regions[1:5]} == {5} and {y1 - y0 for y0, _, y1, _ in regions[5:]} == {4}
    wide = rmac_regions(4, 9, 2)  # a wide map gets more regions along its longer side
    assert len({x0 for _, x0, _, _ in wide[1:]}) > len({y0 for y0, _, _, _ in wide[1:]})


@pytest.mark.parametrize("method", ["gap", "gem", "rmac"])
def test_map_pooling_equals_its_definition(method):
    import keras

    from csearch.embedder.layers import MapPooling, rmac_regions

    maps = np.random.default_rng(0).uniform(0, 2, (2, 5, 7, 7)).astype(np.float32)  # N, C, H, W
    got = keras.ops.convert_to_numpy(MapPooling(method, levels=3, p=3.0)(maps))
    x = maps.transpose(0, 2, 3, 1)
    if method == "gap":
        expected = x.mean(axis=(1, 2))
    elif method == "gem":
        expected = (x**3).mean(axis=(1, 2)) ** (1 / 3)
    else:
        expected = 0
        for y0, x0, y1, x1 in rmac_regions(7, 7, 3):
            region = x[:, y0:y1, x0:x1].max(axis=(1, 2))
            expected = expected + region / np.linalg.norm(region, axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_trunk_is_the_extractor_before_its_pooling(tiny_extractor, tmp_path):
    import onnxruntime as ort

    from csearch.embedder.trunk import TrunkRunner, write_trunk

    info = write_trunk(tiny_extractor, tmp_path / "trunk.onnx", None, None)
    assert (info.layout, info.channels, info.height, info.width) == ("nchw", 24, 16, 16)
    images = np.random.default_rng(1).uniform(0, 255, (3, 3, 32, 32)).astype(np.float32)
    maps = TrunkRunner(tmp_path / "trunk.onnx", info)(images)
    pooled = ort.InferenceSession(str(tiny_extractor)).run(["features"], {"input": images})[0]
    np.testing.assert_allclose(maps.mean(axis=(2, 3)), pooled, rtol=1e-5, atol=1e-6)


def test_trunk_refuses_an_extractor_without_global_pooling(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["features"])],
        "no_pool",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    from csearch.embedder.trunk import write_trunk

    with pytest.raises(ModelMismatch, match="global pooling"):
        write_trunk(path, tmp_path / "trunk.onnx", None, None)


def _config(tiny_extractor, **changes):
    from csearch.train.embedder_config import load_embedder_config

    settings = {"extractor": str(tiny_extractor), "localizer": "classical", "dim": 16, "copies": 1}
    settings.update({"epochs": 6, "batch_size": 16, "patience": 6})
    settings.update(changes)
    return load_embedder_config(overrides=settings)


@pytest.fixture
def product_catalogue(tmp_path):
    from tests.conftest import write_catalogue

    return write_catalogue(tmp_path / "catalogue", products=3, images=4)


def test_training_learns_exports_and_resumes(tiny_extractor, product_catalogue, tmp_path, monkeypatch):
    from csearch.train import embedder_fit
    from csearch.train.embedder import train_embedder
    from csearch.train.history import read_history

    config = _config(tiny_extractor, cache_dir=str(tmp_path / "cache"))
    run = tmp_path / "run"
    original = embedder_fit.HeldOutRecall.on_epoch_end

    def interrupt_after_third(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(embedder_fit.HeldOutRecall, "on_epoch_end", interrupt_after_third)
    with pytest.raises(KeyboardInterrupt):
        train_embedder(config, str(product_catalogue), run, lambda line: None)
    assert [int(r["epoch"]) for r in read_history(run / "history.csv")] == [1, 2, 3]
    assert not (run / "summary.json").exists()
    monkeypatch.setattr(embedder_fit.HeldOutRecall, "on_epoch_end", original)
    said = []
    summary = train_embedder(config, str(product_catalogue), run, said.append)
    rows = read_history(run / "history.csv")
    assert [int(r["epoch"]) for r in rows][:3] == [1, 2, 3] and len(rows) > 3  # resumed, not restarted
    assert not any("epoch 1/" in line for line in said)
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < losses[0]
    assert summary["export_max_abs_diff"] <= 1e-4
    for name in ("embedder.onnx", "embedder.keras", "trunk.onnx", "embedder.json", "curves.png", "config.yaml"):
        assert (run / name).is_file(), name
    marker = json.loads((run / "embedder.json").read_text())
    assert marker["dim"] == 16 and marker["image_size"] == 32
    assert train_embedder(config, str(product_catalogue), run, said.append) == summary  # finished: returned as is
    with pytest.raises(ConfigError, match="another config"):
        train_embedder(
            _config(tiny_extractor, cache_dir=str(tmp_path / "cache"), dim=8), str(product_catalogue), run, print
        )


def test_an_index_with_the_embedder_finds_each_product(tiny_extractor, product_catalogue, tmp_path, caplog):
    from csearch.config import load_config
    from csearch.data import read_catalogue
    from csearch.engine import Engine
    from csearch.indexing import build_index
    from csearch.preprocess import load_image
    from csearch.train.embedder import train_embedder

    run = tmp_path / "run"
    train_embedder(_config(tiny_extractor, cache_dir=str(tmp_path / "cache")), str(product_catalogue), run, print)
    config = load_config(overrides={"embed.embedder": str(run), "localize.method": "classical"})
    catalogue = read_catalogue(product_catalogue)
    build_index(catalogue, config, tmp_path / "index")
    import shutil

    shutil.move(str(run), str(tmp_path / "run-moved"))  # the index carries what queries need of the RUN_DIR
    engine = Engine.open(tmp_path / "index")
    assert engine.store.dim == 2 * 16  # the embedding, once per view
    assert (tmp_path / "index" / "models" / "embedder" / "embedder.onnx").is_file()
    image = sorted(product_catalogue.rglob("*.png"))[0]
    result = engine.query(load_image(str(image)), k=1)
    assert result.hits[0].path == str(image.resolve())
    # queries run the embedder in ONNX Runtime: no Keras, no TensorFlow
    import subprocess
    import sys

    code = (
        "import sys\nfrom csearch.engine import Engine\n"
        f"Engine.open({str(tmp_path / 'index')!r}).query({str(image)!r}, k=1)\n"
        "assert not [m for m in ('keras', 'tensorflow') if m in sys.modules]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    # a product the embedder never saw is added all the same, with a hint to retrain
    from csearch.types import Record

    before = len(engine.store)
    with caplog.at_level("WARNING", logger="csearch"):
        ids, failures = engine.add([Record(str(image), "bottle", "a-new-product")])
    assert len(ids) == 1 and not failures and len(engine.store) == before + 1
    assert "never saw (a-new-product)" in caplog.text and "retrain" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="csearch"):
        engine.add([Record(str(image), "bottle", "bottle-p0")])
    assert "never saw" not in caplog.text
    run = tmp_path / "run-moved"
    with pytest.raises(ConfigError, match="fixes the extractor"):
        build_index(catalogue, load_config(overrides={"embed.embedder": str(run), "embed.extractor": "mobilenet"}),
                    tmp_path / "other")  # fmt: skip
    with pytest.raises(ConfigError, match="takes 32 px"):
        build_index(catalogue, load_config(overrides={"embed.embedder": str(run), "preprocess.image_size": 64}),
                    tmp_path / "other2")  # fmt: skip


def test_one_line_errors(tiny_extractor, tmp_path):
    from csearch.embedder.run import read_embedder
    from csearch.train.embedder import train_embedder
    from tests.conftest import write_catalogue

    singles = write_catalogue(tmp_path / "singles", products=2, images=1)
    pairs = write_catalogue(tmp_path / "pairs", products=2, images=2)
    with pytest.raises(CatalogueError, match="no product has two images"):
        train_embedder(_config(tiny_extractor), str(singles), tmp_path / "run", print)
    # the studio images of a catalogue train together with in-use photos of the same products
    from csearch.train.embedder import _labelled

    records, products = _labelled([str(singles), str(pairs)], print)
    assert len(records) == 4 + 8 and len(products) == 4
    assert len(_labelled([str(pairs), str(pairs)], print)[0]) == 8  # an image given twice counts once
    with pytest.raises(ConfigError, match="Keras backbone"):
        train_embedder(_config(tiny_extractor, extractor="mobilenetv2"), str(pairs), tmp_path / "r", print)
    (tmp_path / "notrun").mkdir()
    with pytest.raises(ConfigError, match="not an embedder RUN_DIR"):
        read_embedder(tmp_path / "notrun")
    with pytest.raises(ConfigError, match="not found"):
        read_embedder(tmp_path / "missing")
