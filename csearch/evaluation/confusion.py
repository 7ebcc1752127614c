"""Classifier metrics: pure functions of a confusion matrix (rows = true class, columns =
predicted), the numbers of the paper's Tables 1 and 2.

Definitions (all fractions in [0, 1]), over the categories present in the data:
- top-1 accuracy: correct predictions / images.
- average accuracy (the paper's): the mean over classes of the one-vs-rest accuracy
  (TP + TN) / (TP + TN + FP + FN). TN dominates when there are many classes, so it sits close
  to 1 (about 1 - 2 * error / n_classes); read it next to top-1.
- per-class accuracy: the recall of the class, TP / (TP + FN); its variance (population,
  ddof=0) and minimum show how even the classifier is across categories.
- precision with no prediction of the class is 0 (scikit-learn's zero_division=0).

Invalid arrays raise ValueError: they are programming errors, not user input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np


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
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "accuracy": float(recall[i]),
            "one_vs_rest_accuracy": float(ovr[i]),
            "support": int(c["support"][i]),
        }
        for i, name in enumerate(class_names)
        if mask[i]
    }
    return {
        "n_images": int(matrix.sum()),
        "n_classes": int(mask.sum()),
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
