"""Tables and figures for results: Markdown/CSV tables, the confusion matrix (the paper's
Figure 8) and training curves (Figure 7).

Figures are drawn on `matplotlib.figure.Figure` objects and saved with the Agg canvas, never
through pyplot, so no global backend state changes (safe in servers, tests and notebooks).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

Column = tuple[str, str, str]  # (key, header, format spec such as ".4f" or "")


def _format(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if spec and isinstance(value, (int, float, np.integer, np.floating)):
        return format(value, spec)
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """A GitHub-flavoured Markdown table; numbers right-aligned, text left-aligned."""
    header = "| " + " | ".join(h for _, h, _ in columns) + " |"
    numeric = [
        bool(rows)
        and all(isinstance(r.get(k), (int, float, np.integer, np.floating)) or r.get(k) is None for r in rows)
        for k, _, _ in columns
    ]
    rule = "|" + "|".join("---:" if n else "---" for n in numeric) + "|"
    body = ["| " + " | ".join(_format(r.get(k), f).replace("|", "\\|") for k, _, f in columns) + " |" for r in rows]
    return "\n".join([header, rule, *body]) + "\n"


def write_csv(path: str | Path, rows: Sequence[dict], columns: Sequence[Column]) -> Path:
    """CSV with full precision (formatting is for Markdown only)."""
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([k for k, _, _ in columns])
        for row in rows:
            writer.writerow(["" if row.get(k) is None else row.get(k) for k, _, _ in columns])
    return path


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_confusion(
    matrix: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    title: str = "Confusion matrix",
    col_names: Optional[Sequence[str]] = None,
    dpi: int = 150,
) -> Path:
    """Rows = true class, columns = predicted class. Colour is the row-normalised fraction (so
    small classes are as visible as large ones); cells print their count when non-zero. The
    figure grows with the number of classes, so 40+ names stay readable."""
    matrix = np.asarray(matrix)
    col_names = list(col_names or class_names)
    rows, cols = matrix.shape
    if rows != len(class_names) or cols != len(col_names):
        raise ValueError(f"matrix {matrix.shape} does not match {len(class_names)} x {len(col_names)} names")
    side = max(5.0, 0.3 * max(rows, cols) + 2.5)
    font = 8 if max(rows, cols) <= 20 else 6
    fig = _figure(side * cols / max(rows, cols) + 1.5, side)
    ax = fig.add_subplot()
    support = matrix.sum(axis=1, keepdims=True)
    fraction = np.divide(matrix, support, out=np.zeros(matrix.shape, float), where=support > 0)
    image = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    for i, j in zip(*np.nonzero(matrix)):
        ax.text(
            j,
            i,
            str(int(matrix[i, j])),
            ha="center",
            va="center",
            fontsize=font - 1,
            color="white" if fraction[i, j] > 0.5 else "black",
        )
    ax.set_xticks(range(cols), col_names, rotation=90, fontsize=font)
    ax.set_yticks(range(rows), class_names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.6, label="fraction of the true class")
    fig.savefig(path, dpi=dpi)
    return Path(path)


def plot_history(history: Sequence[dict], path: str | Path, title: str = "Training history") -> Path:
    """Training and validation accuracy and loss per epoch (rows of a RUN_DIR's history.csv).
    Stages (e.g. warm-up, fine-tuning) are drawn one after another, split by a dotted line."""
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2)
    x = np.arange(1, len(history) + 1)
    for ax, metric in zip(axes, ("accuracy", "loss")):
        for key, label, style in (
            (metric, "train", "-"),
            (f"val_{metric}", "validation (split of the training data)", "--"),
        ):
            values = [_float(row.get(key)) for row in history]
            ax.plot(x, values, style, marker=".", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
        _mark_stages(ax, history)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    return Path(path)


def _mark_stages(ax, history: Sequence[dict]) -> None:
    stages = [row.get("stage") for row in history]
    for index in range(1, len(stages)):
        if stages[index] != stages[index - 1]:
            ax.axvline(index + 0.5, color="gray", linestyle=":")
            ax.text(index + 0.6, ax.get_ylim()[1], str(stages[index]), va="top", fontsize=8, color="gray")


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
