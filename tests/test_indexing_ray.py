"""`csearch index --ray`: the Ray Data pipeline gives the plain path's index exactly (ids, vectors,
masks, boxes, categories, failures), resumes after an interruption, and turns a missing Ray or an
unreachable cluster into one line. One private local Ray per test session (fractional CPUs, its own
temp folder); weight-free models (tests/conftest.py)."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from csearch import indexing, indexing_ray
from csearch.cli import main
from csearch.data import read_catalogue
from csearch.pipeline import build_index
from csearch.store import IndexStore
from tests.conftest import draw_object, write_catalogue
from tests.test_cli import tiny_flags

CLASSES = ["bottle", "jar"]


@pytest.fixture(scope="session")
def local_ray():
    """One private local Ray for the session: 2 CPUs (the pools take fractions), its own temp dir."""
    ray = pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="csearch-ray-test-")
    ray.init(address="local", _temp_dir=temp, num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def write_classifier(run_dir: Path, size: int = 32) -> Path:
    """A tiny ONNX classifier RUN_DIR (no Keras model, so model.onnx runs): the mean colour of the
    photo -> 2 classes. Redder than blue is "bottle", bluer is "jar"."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    run_dir.mkdir(parents=True)
    weight = numpy_helper.from_array(np.array([[0.05, -0.05], [0.0, 0.0], [-0.05, 0.05]], np.float32), "w")
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["mean", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 2])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(run_dir / "model.onnx"))
    (run_dir / "classes.json").write_text(json.dumps(CLASSES))
    (run_dir / "config.yaml").write_text(f"image_size: {size}\ncolor: rgb\n")
    (run_dir / "export.json").write_text("{}")
    return run_dir


@pytest.fixture
def mixed_catalogue(tmp_path):
    """A CSV manifest of 18 images: 12 labelled, 4 unlabelled (classified: red, blue, blue, red)
    and 2 unreadable."""
    from PIL import Image

    root = write_catalogue(tmp_path / "images")
    lines = ["path,category,product"]
    for path in sorted(root.rglob("*.png")):
        lines.append(f"{path},{path.parent.parent.name},{path.parent.name}")
    for i, color in enumerate([(220, 20, 20), (20, 20, 220), (30, 40, 200), (200, 40, 30)]):
        image, _ = draw_object((64, 64), shape="rect", color=color, noise=4.0, seed=i)
        Image.fromarray(image).save(tmp_path / f"unlabelled{i}.png")
        lines.append(f"{tmp_path / f'unlabelled{i}.png'},,")
    good = sorted(root.rglob("*.png"))[0].read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    lines[3:3] = [f"{tmp_path / 'truncated.png'},jar,t", f"{tmp_path / 'empty.png'},jar,e"]
    manifest = tmp_path / "catalogue.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def assert_same_index(left: Path, right: Path) -> None:
    a, b = IndexStore.open(left).snapshot, IndexStore.open(right).snapshot
    assert len(a) == len(b) > 0
    np.testing.assert_array_equal(a.ids, b.ids)
    assert a.paths == b.paths and a.categories == b.categories and a.products == b.products
    np.testing.assert_array_equal(a.vectors, b.vectors)  # bit-identical, not merely close
    np.testing.assert_array_equal(a.mask_bits, b.mask_bits)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    failures = [folder / "failures.txt" for folder in (left, right)]
    assert [f.read_text() if f.is_file() else None for f in failures] == [
        f.read_text() if f.is_file() else None for f in reversed(failures)
    ]


def test_ray_index_is_the_plain_index(local_ray, tmp_path, mixed_catalogue, tiny_extractor, capfd):
    classifier = write_classifier(tmp_path / "run")
    flags = [*tiny_flags(tiny_extractor), "--classifier", str(classifier), "--json"]
    assert main(["index", str(mixed_catalogue), "--out", str(tmp_path / "plain"), *flags]) == 0
    plain = json.loads(capfd.readouterr().out)
    assert main(["index", str(mixed_catalogue), "--out", str(tmp_path / "ray"), *flags, "--ray"]) == 0
    ray = json.loads(capfd.readouterr().out)
    assert (plain["added"], plain["failed"], ray["added"], ray["failed"]) == (16, 2, 16, 2)
    assert_same_index(tmp_path / "plain", tmp_path / "ray")
    categories = IndexStore.open(tmp_path / "ray").snapshot.categories
    assert categories[-4:] == ["bottle", "jar", "jar", "bottle"]  # the unlabelled ones, classified
    assert IndexStore.open(tmp_path / "ray").meta["complete"] is True


def test_an_interrupted_ray_run_resumes(local_ray, tmp_path, tiny_catalogue, tiny_config, monkeypatch):
    catalogue = read_catalogue(tiny_catalogue)
    build_index(catalogue, tiny_config, tmp_path / "plain")
    monkeypatch.setattr(indexing, "CHUNK", 5)  # commit every 5 images
    seen = []

    def stop_after_seven(n):
        seen.append(n)
        if len(seen) == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(catalogue, tiny_config, tmp_path / "ray", progress=stop_after_seven, adder=indexing_ray.ray_adder())
    store = IndexStore.open(tmp_path / "ray")
    assert len(store) == 5 and store.meta["complete"] is False  # the first commit held
    report = build_index(catalogue, tiny_config, tmp_path / "ray", adder=indexing_ray.ray_adder())
    assert (report.skipped_existing, report.added, report.items) == (5, 7, 12)
    assert_same_index(tmp_path / "plain", tmp_path / "ray")


def test_a_model_missing_on_the_workers_is_its_own_one_line_error(local_ray, tmp_path, tiny_catalogue, tiny_config):
    """The driver has the models, the actors do not find the extractor (as on a node without the
    shared model folder): the actor's csearch error comes back, not a Ray traceback."""
    from csearch.errors import WeightsNotFound
    from csearch.resolve import load_models, resolve_config

    config = resolve_config(tiny_config)
    models = load_models(config)
    gone = replace(config, embed=replace(config.embed, extractor=str(tmp_path / "gone.onnx")))
    catalogue, adder = read_catalogue(tiny_catalogue), indexing_ray.ray_adder()
    with pytest.raises(WeightsNotFound, match="gone.onnx") as info:
        build_index(catalogue, gone, tmp_path / "idx", models=models, adder=adder)
    assert "\n" not in str(info.value)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("address", ["closed", "no-port-here"])
def test_a_bad_address_is_one_line_before_any_work(tmp_path, tiny_catalogue, tiny_extractor, capsys, address):
    pytest.importorskip("ray")
    address = f"127.0.0.1:{closed_port()}" if address == "closed" else address
    out = tmp_path / "idx"
    assert main(["index", str(tiny_catalogue), "--out", str(out), *tiny_flags(tiny_extractor), "--ray", address]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("csearch: error: ") and "\n" not in err and address in err
    assert "ray start --head" in err or "HOST:PORT" in err
    assert not out.exists()  # refused before any model loaded or anything was written


def test_without_ray_installed_the_error_says_how_to_install(
    tmp_path, tiny_catalogue, tiny_extractor, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    code = main(["index", str(tiny_catalogue), "--out", str(tmp_path / "idx"), *tiny_flags(tiny_extractor), "--ray"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and 'pip install -e ".[ray]"' in err


@pytest.mark.parametrize("cpus", [1, 2, 16, 256])
@pytest.mark.parametrize("workers", [1, 2, 8])
def test_the_pools_leave_cpus_for_ray_datas_own_tasks(cpus, workers):
    pools = indexing_ray.plan_pools(workers, cpus, classify=True, batch_size=8)
    assert [p.stage for p in pools] == ["localize", "classify", "embed"]
    assert pools[0].actors == workers and all(p.actors >= 1 for p in pools)
    assert sum(p.actors * p.num_cpus for p in pools) <= indexing_ray.CPU_SHARE * cpus + 1e-9
    assert all(0 < p.num_cpus <= 1 for p in pools)
    assert pools[-1].batch_size == 8
    assert [p.stage for p in indexing_ray.plan_pools(workers, cpus, classify=False, batch_size=8)] == [
        "localize",
        "embed",
    ]
