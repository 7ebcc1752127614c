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


def draw_object(
    size=(96, 128), shape="ellipse", color=(200, 30, 30), background=(255, 255, 255), noise=0.0, seed=0, box=None
):
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
                image, _ = draw_object(
                    size,
                    shape=shapes[(ci + pi) % 3],
                    color=color,
                    noise=4.0,
                    seed=int(rng.integers(1 << 30)),
                    box=(w // 4 + jitter, h // 5, 3 * w // 4 + jitter, 4 * h // 5),
                )
                Image.fromarray(image).save(folder / f"img{ii}.png")
    return root


@pytest.fixture
def tiny_catalogue(tmp_path):
    return write_catalogue(tmp_path / "catalogue")


def write_tiny_extractor(path: Path, size: int = 32, features: int = 24, seed: int = 0) -> Path:
    """A tiny deterministic ONNX feature extractor with `csearch export`'s metadata:
    NCHW float RGB in [0, 255] -> conv 3x3/2 -> relu -> global average pool -> (N, features)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.normal(0, 0.05, (features, 3, 3, 3)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.normal(0, 0.1, (features,)).astype(np.float32), "b")
    shape = numpy_helper.from_array(np.array([0, -1], np.int64), "shape")
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["conv"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Reshape", ["pool", "shape"], ["features"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_extractor",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", features])],
        [weight, bias, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for key, value in {"csearch.role": "extractor", "csearch.layout": "nchw", "csearch.preprocessing": "raw"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_extractor(tmp_path_factory) -> Path:
    return write_tiny_extractor(tmp_path_factory.mktemp("models") / "tiny_extractor.onnx")


@pytest.fixture
def tiny_config(tiny_extractor):
    """A fast, weight-free pipeline config: classical localization + the tiny ONNX extractor."""
    from csearch.config import load_config

    return load_config(
        overrides={
            "embed.extractor": str(tiny_extractor),
            "localize.method": "classical",
            "localize.matting": "none",
            "preprocess.image_size": 32,
            "embed.batch_size": 4,
        }
    )
