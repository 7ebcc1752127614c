"""Catalogue readers: one loader for every command (index, train, evaluate).

A catalogue SPEC is any of:
- a folder ``ROOT/<category>/<product>/<image>`` or ``ROOT/<category>/<image>`` (product = stem);
- a CSV manifest with header ``path,category,product`` (paths absolute or relative to the CSV;
  category and product may be empty for unlabelled images);
- a Grocery Store list file (``train.txt``: ``path, fine_id, coarse_id``, with ``classes.csv``
  beside it): category = coarse class name, product = fine class name;
- a Grocery Store ``classes.csv``: its iconic (catalogue) images, one per product.

Files that are missing or not images by extension are listed with a reason and skipped;
decoding problems are found (and listed) later, when the images are read.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import CatalogueError
from .types import Record

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Catalogue:
    """The records of a catalogue, plus the entries skipped and why."""

    spec: str
    records: tuple[Record, ...]
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def categories(self) -> list[str]:
        return sorted({r.category for r in self.records if r.category is not None})

    @property
    def products(self) -> list[str]:
        return sorted({r.product for r in self.records if r.product is not None})

    def category_counts(self) -> Counter:
        return Counter(r.category for r in self.records)

    def summary(self) -> str:
        text = (
            f"{len(self.records)} images, {len(self.categories)} categories, "
            f"{len(self.products)} products from {self.spec}"
        )
        if self.skipped:
            text += f"; {len(self.skipped)} skipped"
        return text


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _finish(spec: str, candidates: Iterable[Record], skipped: list[tuple[str, str]]) -> Catalogue:
    records = []
    for record in candidates:
        path = Path(record.path)
        if not path.is_file():
            skipped.append((record.path, "file not found"))
        elif not _is_image_name(path):
            skipped.append((record.path, f"not an image file extension ({path.suffix or 'none'})"))
        else:
            records.append(record)
    if not records:
        reason = f" ({len(skipped)} entries skipped, e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise CatalogueError(f"catalogue {spec} has no images{reason}")
    return Catalogue(spec=spec, records=tuple(records), skipped=tuple(skipped))


def read_folder(root: Path) -> Catalogue:
    candidates, skipped = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        parts = path.relative_to(root).parts
        if path.name.startswith("."):
            continue
        if not _is_image_name(path):
            skipped.append((str(path), f"not an image file extension ({path.suffix or 'none'})"))
        elif len(parts) == 2:
            candidates.append(Record(str(path.resolve()), parts[0], path.stem))
        elif len(parts) == 3:
            candidates.append(Record(str(path.resolve()), parts[0], parts[1]))
        else:
            skipped.append((str(path), "not at ROOT/<category>/[<product>/]<image>"))
    return _finish(str(root), candidates, skipped)


def _cell(row: dict, key: str) -> Optional[str]:
    value = (row.get(key) or "").strip()
    return value or None


def read_manifest(path: Path) -> Catalogue:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if "path" not in header:
            raise CatalogueError(
                f"{path}: a CSV manifest needs a header with 'path' (and 'category', "
                f"'product'); found {header or 'no header'}"
            )
        candidates = []
        for row in reader:
            row = {k.strip(): v for k, v in row.items() if k is not None}
            image = _cell(row, "path")
            if image is None:
                continue
            image_path = Path(image) if Path(image).is_absolute() else path.parent / image
            product = _cell(row, "product") or (image_path.stem if _cell(row, "category") else None)
            candidates.append(Record(str(image_path.resolve()), _cell(row, "category"), product))
    return _finish(str(path), candidates, [])


def _grocery_classes(classes_csv: Path) -> list[dict]:
    with classes_csv.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows or not rows[0] or not rows[0][0].startswith("Class Name"):
        raise CatalogueError(f"{classes_csv}: not a Grocery Store classes.csv")
    return [
        {
            "fine": r[0].strip(),
            "fine_id": int(r[1]),
            "coarse": r[2].strip(),
            "coarse_id": int(r[3]),
            "iconic": r[4].strip(),
        }
        for r in rows[1:]
        if len(r) >= 5
    ]


def read_grocery_list(list_file: Path) -> Catalogue:
    classes_csv = list_file.parent / "classes.csv"
    if not classes_csv.is_file():
        raise CatalogueError(f"{list_file}: a Grocery Store list file needs classes.csv beside it")
    classes = _grocery_classes(classes_csv)
    fine = {c["fine_id"]: c for c in classes}
    coarse = {c["coarse_id"]: c["coarse"] for c in classes}
    candidates, skipped = [], []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        try:
            rel, fine_id, coarse_id = parts[0], int(parts[1]), int(parts[2])
            product, category = fine[fine_id]["fine"], coarse[coarse_id]
        except (IndexError, ValueError, KeyError):
            skipped.append((f"{list_file}:{number}", f"malformed line {line.strip()!r}"))
            continue
        candidates.append(Record(str((list_file.parent / rel).resolve()), category, product))
    return _finish(str(list_file), candidates, skipped)


def read_grocery_iconic(classes_csv: Path) -> Catalogue:
    root = classes_csv.parent
    candidates = [
        Record(str((root / c["iconic"].lstrip("/")).resolve()), c["coarse"], c["fine"])
        for c in _grocery_classes(classes_csv)
    ]
    return _finish(str(classes_csv), candidates, [])


def _looks_like_grocery_classes(path: Path) -> bool:
    with path.open(encoding="utf-8-sig") as handle:
        return handle.readline().startswith("Class Name")


def read_catalogue(spec: str | Path) -> Catalogue:
    """Read any catalogue SPEC (see the module docstring)."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise CatalogueError(f"catalogue not found: {spec}")
    if path.is_dir():
        return read_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_grocery_iconic(path) if _looks_like_grocery_classes(path) else read_manifest(path)
    if suffix == ".txt":
        return read_grocery_list(path)
    raise CatalogueError(f"catalogue {spec}: expected a folder, a .csv manifest or a Grocery Store .txt list file")
