"""An embedder RUN_DIR as the index and the query path read it (no Keras): its ONNX model, the image
size it fixes, and the products it was trained on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, ModelMismatch

MARKER = "embedder.json"
PRODUCTS = "products.json"
TRAIN_HINT = "train one with `python -m csearch.train embedder --data CATALOGUE --out RUN_DIR`"


@dataclass(frozen=True)
class EmbedderRun:
    folder: Path
    model: Path  # image -> embedding (ONNX), loaded as an extractor
    image_size: int
    dim: int
    extractor: str  # the frozen backbone it was trained on
    sha256: str

    def products(self) -> set[str]:
        """The products the embedder was trained on (empty when the list is missing)."""
        path = self.folder / PRODUCTS
        try:
            return set(json.loads(path.read_text())["products"])
        except (OSError, ValueError, KeyError, TypeError):
            return set()


def read_embedder(run_dir: str | Path) -> EmbedderRun:
    """The embedder in `run_dir`; a one-line error when it is not one, or is incomplete."""
    folder = Path(run_dir).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"embedder folder not found: {folder} ({TRAIN_HINT})")
    marker = folder / MARKER
    if not marker.is_file():
        raise ConfigError(f"{folder} is not an embedder RUN_DIR (no {MARKER}; {TRAIN_HINT})")
    try:
        data = json.loads(marker.read_text())
        model = folder / data["model"]
        run = EmbedderRun(
            folder, model, int(data["image_size"]), int(data["dim"]), str(data["extractor"]), str(data["sha256"])
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{marker} is unreadable or incomplete ({type(exc).__name__}: {exc}); retrain") from None
    if not model.is_file():
        raise ModelMismatch(f"embedder model {model} is missing; retrain ({TRAIN_HINT})")
    return run
