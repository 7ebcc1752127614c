"""Classifier metrics on hand-made confusion matrices, and `python -m csearch.evaluate` end to end
on a tiny trained run (weights none, 32 px)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from csearch import evaluate
from csearch.errors import ModelMismatch
from csearch.evaluation import classifier as ev
from csearch.evaluation import confusion

# rows = true, columns = predicted; worked by hand in the comments
CM = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])  # N = 16, TP = 5, 3, 4; FP = 2, 1, 1; FN = 1, 3, 0; TN = 8, 9, 11


def test_counts_by_hand():
    c = confusion.counts(CM)
    assert c["tp"].tolist() == [5, 3, 4]
    assert c["fp"].tolist() == [2, 1, 1]
    assert c["fn"].tolist() == [1, 3, 0]
    assert c["tn"].tolist() == [8, 9, 11]
    assert c["support"].tolist() == [6, 6, 4]


def test_precision_recall_f1_by_hand():
    precision, recall, f1 = confusion.precision_recall_f1(CM)
    np.testing.assert_allclose(precision, [5 / 7, 3 / 4, 4 / 5])
    np.testing.assert_allclose(recall, [5 / 6, 1 / 2, 1.0])
    np.testing.assert_allclose(f1, [10 / 13, 6 / 10, 8 / 9])  # 2TP / (2TP + FP + FN)


def test_accuracies_by_hand():
    assert confusion.top1_accuracy(CM) == pytest.approx(12 / 16)
    np.testing.assert_allclose(confusion.one_vs_rest_accuracy(CM), [13 / 16, 12 / 16, 15 / 16])
    assert confusion.average_accuracy(CM) == pytest.approx(40 / 48)
    # the identity that explains why the paper's average accuracy sits near 1
    assert confusion.average_accuracy(CM) == pytest.approx(1 - 2 * (1 - 12 / 16) / 3)
    per_class = confusion.per_class_accuracy(CM)
    np.testing.assert_allclose(per_class, [5 / 6, 1 / 2, 1.0])
    s = confusion.summarize(CM, ["a", "b", "c"])
    assert s["per_class_accuracy_variance"] == pytest.approx(70 / 108 - (7 / 9) ** 2)
    assert s["per_class_accuracy_min"] == pytest.approx(0.5)
    assert s["macro_f1"] == pytest.approx((10 / 13 + 0.6 + 8 / 9) / 3)
    assert s["n_images"] == 16 and s["n_classes"] == 3
    assert s["per_class"]["b"] == {
        "precision": 0.75,
        "recall": 0.5,
        "f1": 0.6,
        "accuracy": 0.5,
        "one_vs_rest_accuracy": 0.75,
        "support": 6,
    }


def test_perfect_and_absent_classes():
    perfect = np.diag([3, 2, 0])  # class 2 absent from the data and never predicted
    s = confusion.summarize(perfect, ["a", "b", "c"])
    assert s["accuracy"] == 1.0 and s["average_accuracy"] == 1.0 and s["per_class_accuracy_min"] == 1.0
    assert s["n_classes"] == 2 and "c" not in s["per_class"]
    # predicting an absent class is an error for the true class (and costs its precision nothing)
    wrong = np.array([[2, 0, 1], [0, 2, 0], [0, 0, 0]])
    s = confusion.summarize(wrong, ["a", "b", "c"])
    assert s["accuracy"] == pytest.approx(4 / 5)
    assert s["per_class"]["a"]["recall"] == pytest.approx(2 / 3)
    assert s["per_class"]["a"]["precision"] == 1.0
    assert s["average_accuracy"] == pytest.approx(np.mean([4 / 5, 1.0]))


def test_confusion_matrix_and_validation():
    m = confusion.confusion_matrix([0, 0, 1, 2, 2], [0, 1, 1, 2, 0], 3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    with pytest.raises(ValueError):
        confusion.confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError):
        confusion.counts(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        confusion.summarize(CM, ["a", "b"])
    assert ev.run_names(["/x/run", "/y/run", "/z/other"]) == ["run", "run-2", "other"]


# --------------------------------------------------------------------------------------------
# End to end on a tiny run (shared by the tests below; see tests/test_train.py for the trainer)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import write_catalogue

    from csearch.train import TrainConfig, train_classifier

    root = tmp_path_factory.mktemp("evalrun")
    data = write_catalogue(root / "data", categories=("bottle", "jar", "tube"), products=1, images=4, size=(40, 40))
    config = TrainConfig(
        backbone="mobilenet", weights="none", image_size=32, epochs=1, copies=1, batch_size=4, unfreeze=0
    )
    train_classifier(config, str(data), root / "run", lambda _: None)
    return root / "run", data


def test_evaluate_cli_single(tiny_run, tmp_path, capfd):
    run_dir, data = tiny_run
    out = tmp_path / "eval"
    assert evaluate.main(["classifier", "--model", str(run_dir), "--data", str(data), "--out", str(out), "--json"]) == 0
    result = json.loads(capfd.readouterr().out)  # stdout holds the JSON only (logs go to stderr)
    saved = json.loads((out / "classification.json").read_text())
    assert saved["accuracy"] == result["accuracy"]
    for key in ("accuracy", "average_accuracy", "per_class_accuracy_variance", "per_class_accuracy_min"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["n_images"] == 12 and saved["n_classes"] == 3
    assert set(saved["per_class"]) == {"bottle", "jar", "tube"}
    assert all(0 <= v["f1"] <= 1 for v in saved["per_class"].values())
    for name in (
        "table1.csv",
        "table1.md",
        "table2.csv",
        "table2.md",
        "confusion_matrix.png",
        "history.png",
        "predictions.csv",
    ):
        assert (out / name).stat().st_size > 0, name
    assert (out / "table1.md").read_text().count("\n") == 2 + 3
    assert "| run | mobilenet |" in (out / "table2.md").read_text()  # the run's name, not its path
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_several_models(tiny_run, tmp_path):
    run_dir, data = tiny_run
    out = tmp_path / "cmp"
    results = ev.evaluate_classifiers([run_dir, run_dir], str(data), out)
    assert len(results) == 2
    assert (out / "run" / "classification.json").is_file() and (out / "run-2" / "classification.json").is_file()
    table = (out / "table2.md").read_text()
    assert table.count("\n") == 2 + 2 and "average accuracy" in table
    assert len(json.loads((out / "comparison.json").read_text())) == 2


def test_unknown_class_in_data_is_a_clear_error(tiny_run, tmp_path, capsys):
    from conftest import write_catalogue

    run_dir, _ = tiny_run
    other = write_catalogue(tmp_path / "other", categories=("bottle", "spoon"), products=1, images=1, size=(40, 40))
    with pytest.raises(ModelMismatch, match="spoon"):
        ev.evaluate_classifiers([run_dir], str(other), tmp_path / "o")
    assert (
        evaluate.main(["classifier", "--model", str(run_dir), "--data", str(other), "--out", str(tmp_path / "o")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("csearch: error:") and "spoon" in err[-1]


def test_retrieval_subcommand_keeps_its_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["retrieval", "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert "python -m csearch.evaluate retrieval" in shown
    for flag in (
        "--gallery",
        "--queries",
        "--out",
        "--index",
        "--subset",
        "--limit",
        "--restrict",
        "--top-n",
        "--rerank",
        "--rerank-top",
        "--rerank-weight",
        "--ablate",
        "--figures",
        "--cache-dir",
        "--cached-queries",
        "--workers",
        "--json",
        "--config",
        "--set",
        "--extractor",
        "--classifier",
    ):
        assert flag in shown, flag
