"""The classifier evaluation of `python -m csearch.evaluate classifier`: one or more RUN_DIRs
(python -m csearch.train classifier) on a labelled catalogue.

Outputs (one model: in DIR; several: DIR/<run name>/ each, plus the comparison in DIR): Table 1
(`table1.csv`/`.md`: per-class precision, recall, F1), Table 2 (`table2.csv`/`.md`: parameters,
the paper's average accuracy, top-1 accuracy, variance and minimum of per-class accuracy),
Figure 8 (`confusion_matrix.png`), Figure 7 (`history.png`, from the run's history.csv),
`predictions.csv` and `classification.json`. The metrics and their definitions are in
confusion.py.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import CatalogueError
from .confusion import DEFINITIONS, confusion_matrix, summarize
from .reports import markdown_table, plot_confusion, plot_history, write_csv

log = logging.getLogger("csearch.evaluate")

TABLE1_COLUMNS = [
    ("class", "class", ""),
    ("precision", "precision", ".3f"),
    ("recall", "recall", ".3f"),
    ("f1", "F1", ".3f"),
    ("support", "support", "d"),
]
TABLE2_COLUMNS = [
    ("model", "model", ""),
    ("backbone", "backbone", ""),
    ("params", "parameters", ",d"),
    ("average_accuracy", "average accuracy (paper)", ".4f"),
    ("accuracy", "top-1 accuracy", ".4f"),
    ("per_class_accuracy_variance", "per-class acc. variance", ".4f"),
    ("per_class_accuracy_min", "per-class acc. min", ".3f"),
    ("macro_f1", "macro F1", ".4f"),
    ("n_images", "images", "d"),
]


def _decode(records, size: int, color: str, workers: int = 4):
    from ..train import load_images

    paths = [r.path for r in records]
    images, kept, skipped = load_images(paths, size, color, workers, log.info)
    return images, kept, skipped


def evaluate_run(
    run_dir: str | Path,
    catalogue,
    out: str | Path,
    runtime: str = "auto",
    batch_size: int = 32,
    cache: Optional[dict] = None,
) -> dict:
    """Evaluate one classifier RUN_DIR on a catalogue; write its tables, figures and
    classification.json into `out`. Returns the classification.json content."""
    from ..classify import Classifier
    from ..train import read_history

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classifier = Classifier.load(run_dir, runtime=runtime)
    records = [r for r in catalogue.records if r.category is not None]
    if not records:
        raise CatalogueError(f"catalogue {catalogue.spec} has no labelled images to evaluate on")
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
    result.update(
        {
            "model": str(Path(run_dir).resolve()),
            "backbone": summary.get("backbone"),
            "params": summary.get("params") or _param_count(classifier),
            "runtime": classifier.runtime,
            "data": catalogue.spec,
            "n_skipped": len(skipped),
            "skipped": [{"path": p, "reason": r} for p, r in skipped],
            "predict_ms_per_image": round(1e3 * seconds / max(1, len(images)), 3),
            "definitions": DEFINITIONS,
        }
    )
    rows = [{"class": name, **values} for name, values in result["per_class"].items()]
    write_csv(out / "table1.csv", rows, TABLE1_COLUMNS)
    (out / "table1.md").write_text(markdown_table(rows, TABLE1_COLUMNS))
    row = {**result, "model": Path(run_dir).name}
    write_csv(out / "table2.csv", [row], TABLE2_COLUMNS)
    (out / "table2.md").write_text(markdown_table([row], TABLE2_COLUMNS))
    shown = _shown_classes(matrix)
    names = [classifier.class_names[i] for i in shown]
    plot_confusion(
        matrix[np.ix_(shown, shown)],
        names,
        out / "confusion_matrix.png",
        title=f"{Path(run_dir).name}: confusion matrix ({len(y_true)} images)",
    )
    history = read_history(Path(run_dir) / "history.csv")
    if history:
        plot_history(history, out / "history.png", title=f"{Path(run_dir).name}: training history")
    _write_predictions(out / "predictions.csv", [records[i].path for i in kept], y_true, probs, classifier.class_names)
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


def evaluate_classifiers(
    run_dirs: Sequence[str | Path], data: str, out: str | Path, runtime: str = "auto", batch_size: int = 32
) -> list[dict]:
    """One or several RUN_DIRs on one catalogue. Several: DIR/<run>/ each plus the comparison
    (table2.csv/.md, comparison.json) in DIR."""
    from ..data import read_catalogue

    out = Path(out)
    catalogue = read_catalogue(data)
    log.info("data: %s", catalogue.summary())
    if len(run_dirs) == 1:
        return [evaluate_run(run_dirs[0], catalogue, out, runtime, batch_size)]
    cache: dict = {}
    results = []
    for name, run_dir in zip(run_names(run_dirs), run_dirs):
        results.append(evaluate_run(run_dir, catalogue, out / name, runtime, batch_size, cache))
        log.info(
            "%s: top-1 %.4f, average accuracy %.4f", name, results[-1]["accuracy"], results[-1]["average_accuracy"]
        )
    rows = [{**r, "model": name} for name, r in zip(run_names(run_dirs), results)]
    write_csv(out / "table2.csv", rows, TABLE2_COLUMNS)
    (out / "table2.md").write_text(markdown_table(rows, TABLE2_COLUMNS))
    comparison = [
        {k: row.get(k) for k, _, _ in TABLE2_COLUMNS} | {"run_dir": result["model"]}
        for row, result in zip(rows, results)
    ]
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    return results
