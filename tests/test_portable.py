"""Indexes that can move: model files found again by name and sha256, trained models carried
inside the index, and hits whose catalogue image has gone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from csearch.config import merge
from csearch.data import read_catalogue
from csearch.errors import ModelMismatch
from csearch.pipeline import Engine, build_index
from tests.conftest import write_catalogue, write_tiny_extractor

CLASSES = ["bottle", "jar"]


def write_onnx_run(run_dir: Path, size: int = 32) -> Path:
    """A classifier RUN_DIR exported to ONNX, as `csearch export RUN_DIR` leaves it (without the
    Keras model): NHWC float [0, 255] -> channel means -> 2 logits -> softmax."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.array([[0.02, -0.02], [-0.01, 0.01], [0.0, 0.01]], np.float32), "w")
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["mean", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", len(CLASSES)])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    run_dir.mkdir(parents=True)
    onnx.save(model, str(run_dir / "model.onnx"))
    (run_dir / "classes.json").write_text(json.dumps(CLASSES))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"image_size": size, "color": "rgb"}}))
    (run_dir / "export.json").write_text(json.dumps({"format": "onnx", "file": "model.onnx"}))
    (run_dir / "history.csv").write_text("epoch,loss\n")  # a RUN_DIR's other files stay behind
    return run_dir


def csearch(*argv, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CSEARCH_HOME": str(home), "KERAS_HOME": str(home / "no-keras")}
    return subprocess.run([sys.executable, "-m", "csearch", *map(str, argv)], capture_output=True, text=True, env=env)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("csearch: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def without_timings(payload: dict) -> dict:
    return {key: value for key, value in payload.items() if key != "timings_ms"}


@pytest.fixture
def moved(tmp_path):
    """An index built with CSEARCH_HOME=models2 and a classifier RUN_DIR, then moved: the index
    to another folder, `mv models2 models3` with CSEARCH_HOME=models3, the RUN_DIR deleted."""
    catalogue = write_catalogue(tmp_path / "catalogue")
    home = tmp_path / "models2"
    home.mkdir()
    extractor = write_tiny_extractor(home / "tiny_extractor.onnx")
    run_dir = write_onnx_run(tmp_path / "run")
    index = tmp_path / "place1" / "idx"
    flags = ["--extractor", extractor, "--localizer", "classical", "--image-size", 32, "--classifier", run_dir]
    built = csearch("index", catalogue, "--out", index, *flags, home=home)
    assert built.returncode == 0, built.stderr
    carried = index / "models" / "classifier"
    assert sorted(p.name for p in carried.iterdir()) == ["classes.json", "config.yaml", "export.json", "model.onnx"]
    query = next(catalogue.rglob("*.png"))
    before = csearch("query", index, query, "-k", 5, "--json", home=home)
    assert before.returncode == 0, before.stderr
    shutil.rmtree(run_dir)
    shutil.move(tmp_path / "place1", tmp_path / "place2")
    shutil.move(home, tmp_path / "models3")
    return {
        "index": tmp_path / "place2" / "idx",
        "home": tmp_path / "models3",
        "query": query,
        "before": json.loads(before.stdout),
    }


def test_a_moved_index_and_model_folder_answer_as_before(moved):
    manifest = (moved["index"] / "manifest.json").read_bytes()
    after = csearch("query", moved["index"], moved["query"], "-k", 5, "--json", home=moved["home"])
    assert after.returncode == 0, after.stderr
    assert without_timings(json.loads(after.stdout)) == without_timings(moved["before"])
    assert json.loads(after.stdout)["category"] in CLASSES  # the carried classifier predicted it
    assert (moved["index"] / "manifest.json").read_bytes() == manifest  # opening never rewrites the index


def test_a_changed_model_file_is_refused(moved):
    extractor = moved["home"] / "tiny_extractor.onnx"
    extractor.write_bytes(extractor.read_bytes() + b"\0")
    line = one_error_line(csearch("query", moved["index"], moved["query"], home=moved["home"]))
    assert "tiny_extractor.onnx changed since the index was built" in line
    assert str(moved["home"]) in line and "rebuild the index" in line
    extractor.unlink()
    line = one_error_line(csearch("query", moved["index"], moved["query"], home=moved["home"]))
    assert "tiny_extractor.onnx recorded by the index is missing" in line and str(moved["home"]) in line


def test_a_changed_carried_classifier_is_refused(moved):
    classes = moved["index"] / "models" / "classifier" / "classes.json"
    classes.write_text(json.dumps(list(reversed(CLASSES))))
    line = one_error_line(csearch("query", moved["index"], moved["query"], home=moved["home"]))
    assert "classes.json changed since the index was built" in line


def test_model_files_are_found_by_name_and_sha256(tmp_path, tiny_catalogue, tiny_config, monkeypatch):
    """The recorded path first, then CSEARCH_HOME; a same-named file with other bytes never counts."""
    models = tmp_path / "models"
    models.mkdir()
    extractor = write_tiny_extractor(models / "tiny.onnx", seed=3)
    config = merge(tiny_config, {"embed.extractor": str(extractor)})
    build_index(read_catalogue(tiny_catalogue), config, tmp_path / "idx")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CSEARCH_HOME", str(home))
    write_tiny_extractor(home / "tiny.onnx", seed=4)  # same name, other weights
    assert Engine.open(tmp_path / "idx").config.embed.extractor == str(extractor.resolve())
    extractor.rename(tmp_path / "elsewhere.onnx")
    with pytest.raises(ModelMismatch, match="tiny.onnx changed since the index was built"):
        Engine.open(tmp_path / "idx")
    (tmp_path / "elsewhere.onnx").replace(home / "tiny.onnx")
    engine = Engine.open(tmp_path / "idx")
    assert engine.config.embed.extractor == str(home / "tiny.onnx")
    record = read_catalogue(tiny_catalogue).records[0]
    assert engine.query(record.path, k=1).hits[0].path == str(Path(record.path).resolve())


def test_resuming_a_build_keeps_the_carried_classifier(tmp_path, tiny_catalogue, tiny_config):
    config = merge(tiny_config, {"classify.classifier": str(write_onnx_run(tmp_path / "run"))})
    catalogue = read_catalogue(tiny_catalogue)

    def interrupt(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(catalogue, config, tmp_path / "idx", progress=interrupt)
    carried = tmp_path / "idx" / "models" / "classifier"
    (carried / "model.onnx").unlink()  # as if interrupted while copying: the resumed build completes it
    (carried / "model.keras").write_bytes(b"an older model, which Classifier.load would prefer")
    report = build_index(catalogue, config, tmp_path / "idx")
    assert report.added + report.skipped_existing == 12
    engine = Engine.open(tmp_path / "idx")
    assert engine.config.classify.classifier == str(carried.resolve())
    assert engine.models.classifier.runtime == "onnx" and len(engine.store) == 12
    assert not (carried / "model.keras").exists()
    assert engine.store.meta["classifier"] == str((tmp_path / "run").resolve())  # where it came from


def test_a_hit_whose_image_has_gone_is_marked_missing(
    tmp_path, tiny_catalogue, tiny_config, monkeypatch, capfd, caplog
):
    build_index(read_catalogue(tiny_catalogue), tiny_config, tmp_path / "idx")
    record = read_catalogue(tiny_catalogue).records[0]
    query = tmp_path / "query.png"
    shutil.copy(record.path, query)
    Path(record.path).unlink()
    result = Engine.open(tmp_path / "idx").query(query, k=3)
    assert result.hits[0].path == str(Path(record.path).resolve()) and result.hits[0].missing
    assert [h.missing for h in result.hits[1:]] == [False, False]
    assert result.to_dict()["results"][0]["missing"] is True

    from csearch.cli import main

    monkeypatch.setenv("CSEARCH_HOME", str(tmp_path / "home"))
    capfd.readouterr()
    assert main(["query", str(tmp_path / "idx"), str(query), "-k", "3"]) == 0
    shown = capfd.readouterr()
    assert str(Path(record.path).resolve()) in shown.out
    assert "missing" in shown.out or "marked missing" in caplog.text  # on the row, or a warning on stderr
