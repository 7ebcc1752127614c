"""`csearch demo`: a self-contained tour of the engine on a generated catalogue.

It draws a small catalogue of look-alike "products" (same shapes, different prints) on white,
indexes it, then queries with photo-like variants (cluttered background, shifted, rescaled)
and prints whether each query found its product. Without --out it works in a new temporary folder,
which it keeps and names at the end (and removes if the demo fails), so nothing lands in the
current folder.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
from PIL import Image

from .config import Config, save_config
from .data import read_catalogue

log = logging.getLogger("csearch")

SHAPES = {"bottle": "rect", "jar": "ellipse", "tube": "triangle"}
PRINTS = [((200, 40, 40), (255, 230, 0)), ((40, 90, 200), (255, 255, 255)), ((30, 150, 60), (240, 240, 240))]


def draw_product(
    shape: str, colors, size: int = 256, background=None, shift=(0, 0), scale=1.0, seed: int = 0
) -> np.ndarray:
    """A product on a background: a filled shape in a body colour with a printed band."""
    rng = np.random.default_rng(seed)
    if background is None:
        canvas = np.full((size, size, 3), 255, np.uint8)
    else:
        canvas = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        canvas = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_CUBIC)
    mask = np.zeros((size, size), np.uint8)
    half = int(size * 0.3 * scale)
    cx, cy = size // 2 + shift[0], size // 2 + shift[1]
    if shape == "rect":
        cv2.rectangle(mask, (cx - half // 2, cy - half), (cx + half // 2, cy + half), 1, -1)
    elif shape == "ellipse":
        cv2.ellipse(mask, (cx, cy), (half, int(half * 0.8)), 0, 0, 360, 1, -1)
    else:
        cv2.fillPoly(mask, [np.array([[cx, cy - half], [cx - half, cy + half], [cx + half, cy + half]])], 1)
    body, band = colors
    canvas[mask == 1] = body
    stripe = np.zeros_like(mask)
    stripe[cy - half // 5 : cy + half // 5] = 1
    canvas[(mask == 1) & (stripe == 1)] = band
    return canvas


def write_demo_catalogue(root: Path) -> tuple[Path, list[tuple[Path, str]]]:
    """Catalogue images on white plus photo-like query images; returns (catalogue, queries)."""
    catalogue, queries = root / "catalogue", []
    (root / "queries").mkdir(parents=True, exist_ok=True)
    for category, shape in SHAPES.items():
        for number, colors in enumerate(PRINTS):
            product = f"{category}-{number}"
            folder = catalogue / category / product
            folder.mkdir(parents=True, exist_ok=True)
            for view, scale in enumerate((1.0, 0.9)):
                Image.fromarray(draw_product(shape, colors, scale=scale)).save(folder / f"view{view}.png")
            query = root / "queries" / f"{product}.jpg"
            photo = draw_product(shape, colors, background="clutter", shift=(12, -8), scale=0.8, seed=number)
            Image.fromarray(photo).save(query, quality=90)
            queries.append((query, product))
    return catalogue, queries


@contextlib.contextmanager
def demo_folder(out: Optional[str] = None) -> Iterator[Path]:
    """`out`, or a new temporary folder that is kept after a successful demo and removed after a
    failed one (a half-written folder in /tmp helps nobody)."""
    if out:
        yield Path(out).expanduser()
        return
    folder = Path(tempfile.mkdtemp(prefix="csearch-demo-"))
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _found_first(engine, queries) -> int:
    return sum(
        bool(r.hits) and r.hits[0].product == product
        for r, product in ((engine.query(p, k=1), product) for p, product in queries)
    )


def demo_embedder(out: Path, config: Config, catalogue_dir: Path, queries, found: int, stdout) -> None:
    """Train a small embedder on the demo catalogue (under a minute here), index with it and
    compare: what `python -m csearch.train embedder` does for a real catalogue."""
    import time

    from .config import merge
    from .models import names
    from .pipeline import Engine, build_index

    if config.embed.extractor in names("backbone"):
        stdout.write(f"\n(no embedder demo: it trains on ONNX extractors, not {config.embed.extractor})\n")
        return
    from .train.embedder import train_embedder
    from .train.embedder_config import load_embedder_config

    settings = {
        "extractor": config.embed.extractor,
        "localizer": config.localize.method,
        "epochs": 40,
        "patience": 10,
        "cache_dir": str(out / "cache"),
    }
    started = time.perf_counter()
    stdout.write("\nTraining a product embedding on the demo catalogue (python -m csearch.train embedder) ...\n")
    stdout.flush()
    train_embedder(load_embedder_config(overrides=settings), str(catalogue_dir), out / "embedder", log.info)
    seconds = time.perf_counter() - started
    learned = merge(config, {"embed.embedder": str(out / "embedder")})
    index_dir = out / "index-embedder"
    build_index(read_catalogue(catalogue_dir), learned, index_dir, overwrite=True)
    learned_found = _found_first(Engine.open(index_dir), queries)
    stdout.write(
        f"With the learned embedding (trained in {seconds:.0f} s): {learned_found}/{len(queries)} queries found "
        f"their product first, against {found}/{len(queries)} with ImageNet features. Index: {index_dir}\n"
        f"For your catalogue: python -m csearch.train embedder --data CATALOGUE --out RUN_DIR, then "
        f"csearch index CATALOGUE --out INDEX_DIR --embedder RUN_DIR\n"
    )


def run_demo(out: Path, config: Config, stdout, embedder: bool = True) -> None:
    from .console import print_result, progress_bar
    from .pipeline import Engine, build_index

    catalogue_dir, queries = write_demo_catalogue(out)
    catalogue = read_catalogue(catalogue_dir)
    log.info("demo catalogue: %s", catalogue.summary())
    index_dir = out / "index"
    with progress_bar(len(catalogue.records), "indexing") as bar:
        report = build_index(catalogue, config, index_dir, overwrite=True, progress=bar.update)
    save_config(report.config, index_dir / "config.yaml", extra={"command": "csearch demo"})
    engine = Engine.open(index_dir)
    found = 0
    for path, product in queries:
        result = engine.query(path, k=3)
        found += bool(result.hits) and result.hits[0].product == product
        stdout.write(f"\nquery {path.name} (true product {product})\n")
        print_result(result, stdout)
    stdout.write(f"\n{found}/{len(queries)} queries found their product first. Index: {index_dir}\n")
    if embedder and not config.embed.embedder:
        demo_embedder(out, config, catalogue_dir, queries, found, stdout)
    stdout.write(
        f"Try: csearch query {index_dir} {queries[0][0]}\n"
        f"The demo's files are in {out} (kept; delete the folder when done).\n"
    )
