"""RUN_DIR/history.csv: one row per (stage, epoch), rewritten atomically after every epoch
(read by csearch.evaluate and the notebooks, so this module does not import Keras)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from ..store.durable import write_bytes_atomic

FIELDS = ("stage", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds")


def read_history(path: Path) -> list[dict]:
    """The rows of a history.csv as dicts of strings ([] when there is none yet)."""
    if not Path(path).is_file():
        return []
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_history(path: Path, rows: list[dict], fields: Sequence[str] = FIELDS) -> None:
    """Replace history.csv atomically: a reader (or a crash) never sees half a file."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(fields))
    writer.writeheader()
    writer.writerows({k: row.get(k) for k in fields} for row in rows)
    write_bytes_atomic(path, text.getvalue().encode())


def record_epoch(path: Path, row: dict, fields: Sequence[str] = FIELDS) -> None:
    """Add an epoch's row; a resumed epoch replaces the row it wrote before the interruption."""
    key = (row["stage"], int(row["epoch"]))
    rows = [r for r in read_history(path) if (r["stage"], int(r["epoch"])) != key]
    write_history(path, rows + [row], fields)
