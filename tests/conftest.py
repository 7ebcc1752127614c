"""Shared fixtures: synthetic images with known masks, paths to the optional real assets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_MODELS = SHARED / "models"
GROCERY = SHARED / "datasets" / "grocery-store"


def pytest_collection_modifyitems(config, items):
    skip_models = pytest.mark.skip(reason=f"real weights not found in {SHARED_MODELS}")
    skip_data = pytest.mark.skip(reason=f"Grocery Store dataset not found in {GROCERY}")
    for item in items:
        if "shared_models" in item.keywords and not (SHARED_MODELS / "README.md").is_file():
            item.add_marker(skip_models)
        if "shared_data" in item.keywords and not (GROCERY / "train.txt").is_file():
            item.add_marker(skip_data)


@pytest.fixture(scope="session")
def shared_models() -> Path:
    return SHARED_MODELS


@pytest.fixture(scope="session")
def grocery() -> Path:
    return GROCERY


def draw_object(size=(96, 128), shape="ellipse", color=(200, 30, 30), background=(255, 255, 255),
                noise=0.0, seed=0, box=None):
    """A synthetic product photo: one filled shape on a plain (or noisy) background.

    Returns (image uint8 (H, W, 3), mask bool (H, W)) with the exact object mask.
    """
    import cv2

    height, width = size
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = background
    if noise:
        image = np.clip(image + rng.normal(0, noise, image.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((height, width), np.uint8)
    x0, y0, x1, y1 = box or (width // 4, height // 5, 3 * width // 4, 4 * height // 5)
    if shape == "ellipse":
        cv2.ellipse(mask, ((x0 + x1) // 2, (y0 + y1) // 2), ((x1 - x0) // 2, (y1 - y0) // 2), 0, 0, 360, 1, -1)
    elif shape == "rect":
        cv2.rectangle(mask, (x0, y0), (x1 - 1, y1 - 1), 1, -1)
    elif shape == "triangle":
        pts = np.array([[(x0 + x1) // 2, y0], [x0, y1 - 1], [x1 - 1, y1 - 1]], np.int32)
        cv2.fillPoly(mask, [pts], 1)
    else:
        raise ValueError(shape)
    image[mask.astype(bool)] = color
    return image, mask.astype(bool)


@pytest.fixture
def synthetic_object():
    return draw_object


def write_catalogue(root: Path, categories=("bottle", "jar"), products=2, images=3, size=(64, 64), seed=0):
    """Write ROOT/<category>/<product>/<image>.png with distinct shapes/colours per product."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shapes = ["ellipse", "rect", "triangle"]
    for ci, category in enumerate(categories):
        for pi in range(products):
            folder = root / category / f"{category}-p{pi}"
            folder.mkdir(parents=True, exist_ok=True)
            color = tuple(int(c) for c in rng.integers(0, 200, 3))
            for ii in range(images):
                h, w = size
                jitter = int(rng.integers(0, 4))
                image, _ = draw_object(size, shape=shapes[(ci + pi) % 3], color=color, noise=4.0,
                                       seed=int(rng.integers(1 << 30)),
                                       box=(w // 4 + jitter, h // 5, 3 * w // 4 + jitter, 4 * h // 5))
                Image.fromarray(image).save(folder / f"img{ii}.png")
    return root


@pytest.fixture
def tiny_catalogue(tmp_path):
    return write_catalogue(tmp_path / "catalogue")
