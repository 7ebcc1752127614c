"""`python -m csearch.evaluate classifier|retrieval`: metrics, tables and figures.

    python -m csearch.evaluate classifier --model RUN_DIR [--model RUN_DIR2 ...] --data SPEC --out DIR
    python -m csearch.evaluate retrieval ...   (csearch.retrieval_eval, its own options)

Classifier outputs (one model: in DIR; several: DIR/<run name>/ each, plus the comparison in
DIR): Table 1 (`table1.csv`/`.md`: per-class precision, recall, F1), Table 2 (`table2.csv`/`.md`:
parameters, the paper's average accuracy, top-1 accuracy, variance and minimum of per-class
accuracy), Figure 8 (`confusion_matrix.png`), Figure 7 (`history.png`, from the run's
history.csv), `predictions.csv` and `classification.json`.

Definitions (all fractions in [0, 1]), over the categories present in the data:
- top-1 accuracy: correct predictions / images.
- average accuracy (the paper's): the mean over classes of the one-vs-rest accuracy
  (TP + TN) / (TP + TN + FP + FN). TN dominates when there are many classes, so it sits close
  to 1 (about 1 - 2 * error / n_classes); read it next to top-1.
- per-class accuracy: the recall of the class, TP / (TP + FN); its variance (population,
  ddof=0) and minimum show how even the classifier is across categories.
- precision with no prediction of the class is 0 (scikit-learn's zero_division=0).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import errors

log = logging.getLogger("csearch.evaluate")

# --------------------------------------------------------------------------------------------
# Metrics: pure functions of a confusion matrix (rows = true class, columns = predicted).


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """Counts (n_classes, n_classes), int64."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-d of equal length, got {y_true.shape} and {y_pred.shape}")
    if len(y_true) and (min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= n_classes):
        raise ValueError(f"labels must be in [0, {n_classes})")
    matrix = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def _check_matrix(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {matrix.shape}")
    if (matrix < 0).any():
        raise ValueError("a confusion matrix holds counts >= 0")
    return matrix


def counts(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class TP, FP, FN, TN and support (true count)."""
    matrix = _check_matrix(matrix)
    tp = np.diag(matrix).astype(np.int64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    total = int(matrix.sum())
    fp, fn = predicted - tp, support - tp
    return {"tp": tp, "fp": fp, "fn": fn, "tn": total - tp - fp - fn, "support": support}


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(np.shape(num), float), where=np.asarray(den) > 0)


def precision_recall_f1(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 (0 where undefined)."""
    c = counts(matrix)
    precision = _ratio(c["tp"], c["tp"] + c["fp"])
    recall = _ratio(c["tp"], c["tp"] + c["fn"])
    f1 = _ratio(2 * precision * recall, precision + recall)
    return precision, recall, f1


def one_vs_rest_accuracy(matrix: np.ndarray) -> np.ndarray:
    """Per class (TP + TN) / (TP + TN + FP + FN) = 1 - (FP + FN) / N."""
    c = counts(matrix)
    total = c["tp"] + c["tn"] + c["fp"] + c["fn"]
    return _ratio(c["tp"] + c["tn"], total)


def top1_accuracy(matrix: np.ndarray) -> float:
    matrix = _check_matrix(matrix)
    total = matrix.sum()
    return float(np.trace(matrix) / total) if total else 0.0


def _present(matrix: np.ndarray, classes: Optional[np.ndarray]) -> np.ndarray:
    """The classes the averages run over: those given, else those with support > 0."""
    if classes is not None:
        return np.asarray(classes, bool)
    return _check_matrix(matrix).sum(axis=1) > 0


def average_accuracy(matrix: np.ndarray, classes: Optional[np.ndarray] = None) -> float:
    """The paper's average accuracy: the mean over classes of the one-vs-rest accuracy."""
    mask = _present(matrix, classes)
    return float(one_vs_rest_accuracy(matrix)[mask].mean()) if mask.any() else 0.0


def per_class_accuracy(matrix: np.ndarray) -> np.ndarray:
    """Per-class accuracy as used for its variance and minimum: the recall of each class."""
    return precision_recall_f1(matrix)[1]


def summarize(matrix: np.ndarray, class_names: Sequence[str]) -> dict:
    """Every metric of Tables 1-2 from one confusion matrix (averages over present classes)."""
    matrix = _check_matrix(matrix)
    if len(class_names) != matrix.shape[0]:
        raise ValueError(f"{len(class_names)} names for a {matrix.shape[0]}-class matrix")
    c = counts(matrix)
    precision, recall, f1 = precision_recall_f1(matrix)
    ovr = one_vs_rest_accuracy(matrix)
    mask = c["support"] > 0
    per_class = {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                        "accuracy": float(recall[i]), "one_vs_rest_accuracy": float(ovr[i]),
                        "support": int(c["support"][i])}
                 for i, name in enumerate(class_names) if mask[i]}
    return {
        "n_images": int(matrix.sum()), "n_classes": int(mask.sum()),
        "accuracy": top1_accuracy(matrix),
        "average_accuracy": average_accuracy(matrix, mask),
        "per_class_accuracy_mean": float(recall[mask].mean()) if mask.any() else 0.0,
        "per_class_accuracy_variance": float(recall[mask].var()) if mask.any() else 0.0,
        "per_class_accuracy_min": float(recall[mask].min()) if mask.any() else 0.0,
        "macro_precision": float(precision[mask].mean()) if mask.any() else 0.0,
        "macro_recall": float(recall[mask].mean()) if mask.any() else 0.0,
        "macro_f1": float(f1[mask].mean()) if mask.any() else 0.0,
        "per_class": per_class,
    }


DEFINITIONS = {
    "accuracy": "top-1: correct / images",
    "average_accuracy": "the paper's: mean over classes of (TP+TN)/(TP+TN+FP+FN)",
    "per_class_accuracy": "recall of the class, TP/(TP+FN); variance is the population variance",
    "classes": "averages run over the categories present in the data",
}

TABLE1_COLUMNS = [("class", "class", ""), ("precision", "precision", ".3f"), ("recall", "recall", ".3f"),
                  ("f1", "F1", ".3f"), ("support", "support", "d")]
TABLE2_COLUMNS = [("model", "model", ""), ("backbone", "backbone", ""), ("params", "parameters", ",d"),
                  ("average_accuracy", "average accuracy (paper)", ".4f"), ("accuracy", "top-1 accuracy", ".4f"),
                  ("per_class_accuracy_variance", "per-class acc. variance", ".4f"),
                  ("per_class_accuracy_min", "per-class acc. min", ".3f"), ("macro_f1", "macro F1", ".4f"),
                  ("n_images", "images", "d")]


# --------------------------------------------------------------------------------------------
# Evaluating a RUN_DIR on a catalogue

def _decode(records, size: int, color: str, workers: int = 4):
    from .train import load_images

    paths = [r.path for r in records]
    images, kept, skipped = load_images(paths, size, color, workers, log.info)
    return images, kept, skipped


def evaluate_run(run_dir: str | Path, catalogue, out: str | Path, backend: str = "auto",
                 batch_size: int = 32, cache: Optional[dict] = None) -> dict:
    """Evaluate one classifier RUN_DIR on a catalogue; write its tables, figures and
    classification.json into `out`. Returns the classification.json content."""
    from .classify import Classifier
    from .reports import markdown_table, plot_confusion, plot_history, write_csv
    from .train import read_history

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classifier = Classifier.load(run_dir, backend=backend)
    records = [r for r in catalogue.records if r.category is not None]
    if not records:
        raise errors.CatalogueError(f"catalogue {catalogue.spec} has no labelled images to evaluate on")
    classifier.check_classes({r.category for r in records})
    key = (classifier.image_size, classifier.color)
    cache = {} if cache is None else cache
    if key not in cache:  # several models of the same input size and colour decode once
        cache[key] = _decode(records, *key)
    images, kept, skipped = cache[key]
    started = time.perf_counter()
    probs = classifier.predict(images, batch_size=batch_size)
    seconds = time.perf_counter() - started
    index = {name: i for i, name in enumerate(classifier.class_names)}
    y_true = np.array([index[records[i].category] for i in kept], np.int64)
    y_pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    matrix = confusion_matrix(y_true, y_pred, len(classifier.class_names))
    result = summarize(matrix, classifier.class_names)
    summary = _run_summary(run_dir)
    result.update({
        "model": str(Path(run_dir).resolve()), "backbone": summary.get("backbone"),
        "params": summary.get("params") or _param_count(classifier), "backend": classifier.backend,
        "data": catalogue.spec, "n_skipped": len(skipped),
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "predict_ms_per_image": round(1e3 * seconds / max(1, len(images)), 3),
        "definitions": DEFINITIONS,
    })
    rows = [{"class": name, **values} for name, values in result["per_class"].items()]
    write_csv(out / "table1.csv", rows, TABLE1_COLUMNS)
    (out / "table1.md").write_text(markdown_table(rows, TABLE1_COLUMNS))
    row = {**result, "model": Path(run_dir).name}
    write_csv(out / "table2.csv", [row], TABLE2_COLUMNS)
    (out / "table2.md").write_text(markdown_table([row], TABLE2_COLUMNS))
    shown = _shown_classes(matrix)
    names = [classifier.class_names[i] for i in shown]
    plot_confusion(matrix[np.ix_(shown, shown)], names, out / "confusion_matrix.png",
                   title=f"{Path(run_dir).name}: confusion matrix ({len(y_true)} images)")
    history = read_history(Path(run_dir) / "history.csv")
    if history:
        plot_history(history, out / "history.png", title=f"{Path(run_dir).name}: training history")
    _write_predictions(out / "predictions.csv", [records[i].path for i in kept], y_true, probs,
                       classifier.class_names)
    (out / "classification.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _shown_classes(matrix: np.ndarray) -> np.ndarray:
    """Classes with a true or predicted image: a model class seen nowhere adds only blank space."""
    return np.flatnonzero((matrix.sum(axis=0) + matrix.sum(axis=1)) > 0)


def _run_summary(run_dir) -> dict:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _param_count(classifier) -> Optional[int]:
    model = getattr(classifier._runner, "model", None)
    return int(model.count_params()) if model is not None else None


def _write_predictions(path: Path, paths, y_true, probs, class_names) -> None:
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "true", "predicted", "probability"])
        for p, t, row in zip(paths, y_true, probs):
            best = int(np.argmax(row))
            writer.writerow([p, class_names[t], class_names[best], f"{row[best]:.6f}"])


def run_names(run_dirs: Sequence[str | Path]) -> list[str]:
    """Unique, readable sub-folder names for several runs (the folder name, numbered on clashes)."""
    names, seen = [], {}
    for run_dir in run_dirs:
        base = Path(run_dir).resolve().name or "model"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def evaluate_classifiers(run_dirs: Sequence[str | Path], data: str, out: str | Path,
                         backend: str = "auto", batch_size: int = 32) -> list[dict]:
    """One or several RUN_DIRs on one catalogue. Several: DIR/<run>/ each plus the comparison
    (table2.csv/.md, comparison.json) in DIR."""
    from .data import read_catalogue
    from .reports import markdown_table, write_csv

    out = Path(out)
    catalogue = read_catalogue(data)
    log.info("data: %s", catalogue.summary())
    if len(run_dirs) == 1:
        return [evaluate_run(run_dirs[0], catalogue, out, backend, batch_size)]
    cache: dict = {}
    results = []
    for name, run_dir in zip(run_names(run_dirs), run_dirs):
        results.append(evaluate_run(run_dir, catalogue, out / name, backend, batch_size, cache))
        log.info("%s: top-1 %.4f, average accuracy %.4f", name, results[-1]["accuracy"],
                 results[-1]["average_accuracy"])
    rows = [{**r, "model": name} for name, r in zip(run_names(run_dirs), results)]
    write_csv(out / "table2.csv", rows, TABLE2_COLUMNS)
    (out / "table2.md").write_text(markdown_table(rows, TABLE2_COLUMNS))
    comparison = [{k: row.get(k) for k, _, _ in TABLE2_COLUMNS} | {"run_dir": result["model"]}
                  for row, result in zip(rows, results)]
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    return results


# --------------------------------------------------------------------------------------------
# CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m csearch.evaluate",
                                     description="Evaluate a classifier or the retrieval engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("classifier", help="Tables 1-2 and Figures 7-8 for one or more classifier runs")
    p.add_argument("--model", action="append", required=True, metavar="RUN_DIR",
                   help="a RUN_DIR of python -m csearch.train classifier (repeat to compare)")
    p.add_argument("--data", required=True, metavar="SPEC", help="labelled catalogue to report on")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--backend", default="auto", choices=("auto", "keras", "onnx"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print classification.json(s) on stdout")
    # The retrieval evaluation owns its options: everything after `retrieval` is passed on.
    r = sub.add_parser("retrieval", help="retrieval metrics (csearch.retrieval_eval)", add_help=False)
    r.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _retrieval(args: Sequence[str]) -> int:
    try:
        from . import retrieval_eval
    except ModuleNotFoundError as exc:
        if exc.name != "csearch.retrieval_eval":
            raise
        print("csearch: error: retrieval evaluation is not available (module csearch.retrieval_eval is missing)",
              file=sys.stderr)
        return 2
    return retrieval_eval.main(list(args))


def _run_classifier(args: argparse.Namespace) -> int:
    results = evaluate_classifiers(args.model, args.data, args.out, args.backend, args.batch_size)
    for result in results:
        log.info("%s: top-1 accuracy %.4f, average accuracy %.4f on %d images -> %s",
                 Path(result["model"]).name, result["accuracy"], result["average_accuracy"],
                 result["n_images"], args.out)
    if args.json:
        args.stdout.write(json.dumps(results if len(results) > 1 else results[0]) + "\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["retrieval"]:  # before argparse, so `retrieval --help` reaches its owner
        return _retrieval(argv[1:])
    from .console import quiet_frameworks, run_command

    quiet_frameworks()
    args = build_parser().parse_args(argv)
    return run_command(_run_classifier, args, "nothing was written that a rerun would not redo")


if __name__ == "__main__":
    sys.exit(main())
