"""`python -m csearch.train classifier`: config, split, bad input, RUN_DIR contents, the three
training modes and resuming. Tiny: MobileNet with weights=None at 32 px, a dozen images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import write_catalogue

from csearch import errors, train
from csearch.train import TrainConfig, load_train_config, stratified_split, train_classifier
from csearch.train import cli as train_cli

TINY = {"backbone": "mobilenet", "weights": "none", "image_size": 32, "epochs": 2, "batch_size": 4, "copies": 1}


def tiny(**changes) -> TrainConfig:
    return TrainConfig(**{**TINY, **changes})


def quiet(_message: str) -> None:
    pass


# --------------------------------------------------------------------------------------------
# Config


def test_config_yaml_flat_or_sectioned_and_overrides(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("backbone: mobilenetv2\ncolor: gray\nepochs: 5\n")
    sectioned = tmp_path / "sec.yaml"
    sectioned.write_text(yaml.safe_dump({"train": {"backbone": "mobilenetv2", "color": "gray", "epochs": 5}}))
    for path in (flat, sectioned):
        config = load_train_config(path, {"epochs": "7", "seed": None})
        assert (config.backbone, config.color, config.epochs, config.seed) == ("mobilenetv2", "gray", 7, 0)


def test_unknown_config_key_names_close_matches(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learning_rat: 0.1\n")
    with pytest.raises(errors.ConfigError, match="learning_rate"):
        load_train_config(path)
    with pytest.raises(errors.ConfigError, match="expects int"):
        load_train_config(None, {"epochs": "many"})


def test_validate_resolves_image_size_and_rejects_bad_values():
    assert train.validate(TrainConfig(backbone="mobilenet")).image_size == 224
    with pytest.raises(errors.UnknownNameError, match="resnet50"):
        train.validate(TrainConfig(backbone="resnet5"))
    with pytest.raises(errors.UnknownNameError, match="gray"):
        train.validate(TrainConfig(color="grey"))
    with pytest.raises(errors.ConfigError, match="val_fraction"):
        train.validate(TrainConfig(val_fraction=1.5))
    assert TrainConfig(freeze_backbone=True, unfreeze=5).effective_unfreeze() == 0
    assert TrainConfig(unfreeze=-1).effective_unfreeze() is None


# --------------------------------------------------------------------------------------------
# Split


def test_stratified_split_is_seeded_disjoint_and_keeps_singletons():
    labels = ["a"] * 10 + ["b"] * 5 + ["c"] + ["d"] * 2
    train_idx, val_idx, notes = stratified_split(labels, 0.2, seed=3)
    assert sorted(train_idx + val_idx) == list(range(len(labels)))
    assert not set(train_idx) & set(val_idx)
    val_labels = [labels[i] for i in val_idx]
    assert val_labels.count("a") == 2 and val_labels.count("b") == 1 and val_labels.count("d") == 1
    assert "c" not in val_labels and labels.index("c") in train_idx
    assert len(notes) == 1 and "'c'" in notes[0] and "1 image" in notes[0]
    assert stratified_split(labels, 0.2, seed=3) == (train_idx, val_idx, notes)
    assert stratified_split(labels, 0.2, seed=4)[1] != val_idx


# --------------------------------------------------------------------------------------------
# Training end to end


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """3 categories x 2 products x 3 images, one empty category folder, one single-image
    category and one unreadable file."""
    root = write_catalogue(
        tmp_path_factory.mktemp("train") / "data",
        categories=("bottle", "jar", "tube"),
        products=2,
        images=3,
        size=(40, 40),
    )
    (root / "empty-category").mkdir()
    lonely = write_catalogue(root.parent / "lonely", categories=("box",), products=1, images=1, size=(40, 40))
    (root / "box").mkdir()
    next((lonely / "box").rglob("*.png")).rename(root / "box" / "only.png")
    (root / "jar" / "broken.png").write_bytes(b"not a png at all")
    return root


@pytest.fixture(scope="module")
def frozen_run(catalogue, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "frozen"
    code = train_cli.main(
        [
            "classifier",
            "--data",
            str(catalogue),
            "--backbone",
            "mobilenet",
            "--weights",
            "none",
            "--out",
            str(out),
            "--image-size",
            "32",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--freeze-backbone",
            "--set",
            "copies=1",
            "--seed",
            "1",
        ]
    )
    assert code == 0
    return out


def test_a_finished_run_is_exported_to_onnx_and_queries_need_no_tensorflow(
    frozen_run, catalogue, tiny_extractor, tmp_path
):
    """The trainer exports model.onnx (checked against Keras); an index built with the run then
    answers `csearch query` in ONNX Runtime alone: the process never imports TensorFlow or Keras."""
    import subprocess
    import sys
    from pathlib import Path

    from csearch.classify import Classifier

    summary = json.loads((frozen_run / "summary.json").read_text())
    assert (frozen_run / "model.onnx").is_file() and summary["onnx_max_abs_diff"] < 1e-4
    assert Classifier.load(frozen_run).runtime == "onnx"
    photo = next(p for p in sorted(Path(catalogue).rglob("*.png")) if "broken" not in p.name)
    index = tmp_path / "idx"
    settings = ["--set", f"embed.extractor={tiny_extractor}", "--localizer", "classical", "--image-size", "32"]
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "csearch",
            "index",
            str(catalogue),
            "--out",
            str(index),
            "--classifier",
            str(frozen_run),
            *settings,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    code = (
        "import sys\n"
        "from csearch.cli import main\n"
        f"rc = main(['query', {str(index)!r}, {str(photo)!r}, '--json'])\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)\n"
        "assert rc == 0 and not heavy, (rc, heavy)\n"
    )
    queried = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert queried.returncode == 0, queried.stderr[-2000:]


def test_run_dir_contents(frozen_run):
    for name in ("model.keras", "classes.json", "history.csv", "config.yaml", "summary.json"):
        assert (frozen_run / name).is_file(), name
    assert not (frozen_run / "backup").exists() and not (frozen_run / "cache").exists()
    # the empty category folder is absent; the single-image category is trained on
    assert json.loads((frozen_run / "classes.json").read_text()) == ["bottle", "box", "jar", "tube"]
    config = yaml.safe_load((frozen_run / "config.yaml").read_text())
    assert config["train"]["image_size"] == 32 and config["train"]["color"] == "rgb"
    assert config["train"]["backbone"] == "mobilenet" and config["train"]["freeze_backbone"] is True
    assert config["weights_file"] is None and config["weights_sha256"] is None
    assert (
        config["command"].startswith("python -m csearch.train classifier") and "--freeze-backbone" in config["command"]
    )
    summary = json.loads((frozen_run / "summary.json").read_text())
    assert summary["mode"] == "features" and summary["n_classes"] == 4
    assert summary["n_skipped"] == 1 and summary["skipped"][0]["path"].endswith("broken.png")
    assert any("'box'" in note for note in summary["notes"])
    assert 0 <= summary["val_accuracy"] <= 1 and summary["params"] > summary["trainable_params"] > 0
    assert summary["epochs_run"] == {"head": 2} and summary["peak_rss_mb"] > 0
    rows = train.read_history(frozen_run / "history.csv")
    assert [(r["stage"], r["epoch"]) for r in rows] == [("head", "1"), ("head", "2")]
    assert all(np.isfinite(float(r["loss"])) and float(r["learning_rate"]) > 0 for r in rows)


def test_json_summary_is_alone_on_stdout(frozen_run, catalogue, capfd):
    args = [
        "classifier",
        "--data",
        str(catalogue),
        "--backbone",
        "mobilenet",
        "--weights",
        "none",
        "--out",
        str(frozen_run),
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--freeze-backbone",
        "--set",
        "copies=1",
        "--seed",
        "1",
        "--json",
    ]
    assert train_cli.main(args) == 0  # the finished run: summary only
    summary = json.loads(capfd.readouterr().out)
    assert summary["n_classes"] == 4 and summary["mode"] == "features"


def test_trained_run_loads_as_classifier(frozen_run):
    from csearch.classify import Classifier

    clf = Classifier.load(frozen_run)
    assert clf.class_names == ["bottle", "box", "jar", "tube"] and clf.image_size == 32
    probs = clf.predict(np.zeros((2, 32, 32, 3), np.uint8))
    assert probs.shape == (2, 4)


def test_rerun_finished_and_conflicting_config(frozen_run, catalogue, capsys):
    args = [
        "classifier",
        "--data",
        str(catalogue),
        "--backbone",
        "mobilenet",
        "--weights",
        "none",
        "--out",
        str(frozen_run),
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--freeze-backbone",
        "--set",
        "copies=1",
        "--seed",
        "1",
    ]
    before = (frozen_run / "model.keras").stat().st_mtime_ns
    assert train_cli.main(args) == 0
    assert (frozen_run / "model.keras").stat().st_mtime_ns == before  # nothing retrained
    capsys.readouterr()
    assert train_cli.main(args[:-2] + ["--seed", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("csearch: error:") and "seed" in err[-1]


def test_finetune_on_cached_activations_moves_only_the_top(catalogue, tmp_path, monkeypatch):
    """Warm-up then fine-tuning on cached activations: weights below the cut stay exactly as
    built, the unfrozen top layers change, and the RUN_DIR loads as a classifier."""
    from csearch import classifier_model, classify

    built = {}
    original = classifier_model.build_classifier

    def spy(*args, **kwargs):
        model = original(*args, **kwargs)
        network = classifier_model.backbone_network(model)
        # a randomly initialised MobileNet in inference mode outputs ~0 at 32 px; a positive
        # shift below the cut gives the unfrozen layers a signal (and so a gradient)
        bn = network.get_layer("conv_pw_12_bn")
        bn.beta.assign(np.ones(bn.beta.shape, np.float32))
        built["low"] = np.array(network.get_layer("conv_pw_12").kernel)
        built["top"] = np.array(network.get_layer("conv_pw_13").kernel)
        return model

    monkeypatch.setattr(classifier_model, "build_classifier", spy)
    summary = train_classifier(tiny(unfreeze=7, warmup_epochs=1, epochs=1), str(catalogue), tmp_path / "ft", quiet)
    assert summary["mode"] == "cached activations (1, 1, 1024)"
    assert summary["epochs_run"] == {"warmup": 1, "finetune": 1}
    assert [r["stage"] for r in train.read_history(tmp_path / "ft" / "history.csv")] == ["warmup", "finetune"]
    network = classifier_model.backbone_network(classifier_model.load_keras_model(tmp_path / "ft" / "model.keras"))
    assert not network.get_layer("conv_pw_12").trainable and network.get_layer("conv_pw_13").trainable
    np.testing.assert_array_equal(np.array(network.get_layer("conv_pw_12").kernel), built["low"])
    assert not np.allclose(np.array(network.get_layer("conv_pw_13").kernel), built["top"])
    clf = classify.Classifier.load(tmp_path / "ft")
    assert clf.predict(np.zeros((1, 32, 32, 3), np.uint8)).shape == (1, 4)


def test_end_to_end_on_images(catalogue, tmp_path):
    summary = train_classifier(tiny(cache="none", epochs=1), str(catalogue), tmp_path / "img", quiet)
    assert summary["mode"] == "images" and (tmp_path / "img" / "model.keras").is_file()


def test_resume_after_interruption(catalogue, tmp_path):
    out = tmp_path / "resume"
    seen = []

    def interrupt_in_epoch_2(message: str) -> None:
        seen.append(message)
        if "epoch 2/3" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_classifier(tiny(epochs=3, unfreeze=0), str(catalogue), out, interrupt_in_epoch_2)
    assert (out / "backup" / "head").is_dir() and not (out / "summary.json").exists()
    messages = []
    summary = train_classifier(tiny(epochs=3, unfreeze=0), str(catalogue), out, messages.append)
    epochs = [m.split()[2] for m in messages if m.startswith("[head] epoch")]
    assert epochs == ["2/3", "3/3"]  # epoch 1 was not repeated
    assert any("cached" in m for m in messages if m.startswith("activations"))  # features reused
    rows = train.read_history(out / "history.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert summary["epochs_run"] == {"head": 3}


# --------------------------------------------------------------------------------------------
# Bad input: one-line errors, no traceback


def _one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("csearch: error:")]
    assert len(err) == 1
    return err[0]


def test_unknown_backbone_lists_names(catalogue, tmp_path, capsys):
    code = train_cli.main(
        ["classifier", "--data", str(catalogue), "--backbone", "mobilenetv3", "--out", str(tmp_path / "x")]
    )
    assert code == 2
    line = _one_line_error(capsys)
    assert "mobilenetv3" in line and "efficientnetv2l" in line and "resnet101v2" in line
    assert not (tmp_path / "x").exists()


def test_empty_catalogue(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = train_cli.main(
        [
            "classifier",
            "--data",
            str(tmp_path / "empty"),
            "--backbone",
            "mobilenet",
            "--weights",
            "none",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2 and "no images" in _one_line_error(capsys)


def test_weights_imagenet_offline(catalogue, tmp_path, capsys, monkeypatch):
    # the trainer never downloads: missing ImageNet weights are one line naming the file and the fetch command
    monkeypatch.setenv("CSEARCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    code = train_cli.main(
        [
            "classifier",
            "--data",
            str(catalogue),
            "--backbone",
            "mobilenet",
            "--weights",
            "imagenet",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2
    line = _one_line_error(capsys)
    assert "mobilenet_1.0_224_imagenet.weights.h5" in line and str(tmp_path / "home") in line
    assert "csearch models fetch mobilenet" in line


def test_single_category_is_an_error(tmp_path, capsys):
    data = write_catalogue(tmp_path / "one", categories=("bottle",), products=1, images=3, size=(40, 40))
    code = train_cli.main(
        [
            "classifier",
            "--data",
            str(data),
            "--backbone",
            "mobilenet",
            "--weights",
            "none",
            "--image-size",
            "32",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2 and "at least 2" in _one_line_error(capsys)


@pytest.mark.shared_models
def test_real_weights_fingerprint_guards_resume(shared_models, tmp_path):
    """The resolved config records the weights file's sha256; resuming the RUN_DIR with the same
    file is allowed, with another file (or other data) it is refused."""
    from csearch.models import file_sha256
    from csearch.train.classifier import check_run_dir

    path = shared_models / "mobilenet_1.0_224_imagenet.weights.h5"
    config = train.validate(TrainConfig(backbone="mobilenet", weights=str(path)))
    resolved = {"train": config.to_dict(), "data": "/data/train.txt", "weights_sha256": file_sha256(path)}
    assert resolved["weights_sha256"] == "4f1d1877afe9e2fb3334ace425ae95151cf407d1a47f82c9f214dee516b1a006"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(resolved))
    assert check_run_dir(tmp_path, resolved) is None  # same run, not finished: resume
    with pytest.raises(errors.ConfigError, match="weights_sha256"):
        check_run_dir(tmp_path, {**resolved, "weights_sha256": "0" * 64})
    with pytest.raises(errors.ConfigError, match="data"):
        check_run_dir(tmp_path, {**resolved, "data": "/data/other.txt"})
