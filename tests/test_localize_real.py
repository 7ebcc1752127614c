"""The real U²-Net-p on real Grocery Store photos (skipped when the shared files are absent)."""

from __future__ import annotations

import pytest

from csearch.config import LocalizeConfig
from csearch.localize import make_localizer
from csearch.preprocess import load_image

pytestmark = [pytest.mark.shared_models, pytest.mark.shared_data]

PHOTOS = [
    "train/Packages/Juice/Bravo-Apple-Juice/Bravo-Apple-Juice_001.jpg",
    "train/Packages/Milk/Arla-Standard-Milk/Arla-Standard-Milk_001.jpg",
]


@pytest.fixture(scope="module")
def localizer(shared_models):
    cfg = LocalizeConfig(method="u2net", model=str(shared_models / "u2netp.onnx"), matting="pymatting")
    return make_localizer(cfg, threads=1)


@pytest.mark.parametrize("photo", PHOTOS)
def test_u2netp_finds_the_product(localizer, grocery, photo):
    path = grocery / photo
    if not path.is_file():
        pytest.skip(f"{path} not in this copy of the dataset")
    image = load_image(path)
    loc = localizer(image)
    height, width = image.shape[:2]
    assert loc.produced_by == "u2net+pymatting"
    assert loc.mask.shape == (height, width) and 0.02 < loc.mask.mean() < 0.95
    x0, y0, x1, y1 = loc.box
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert (x1 - x0) * (y1 - y0) < width * height  # a real box, not the whole-image fallback


def test_u2netp_no_single_object_is_explicit_fallback(localizer, grocery):
    """A crate full of apples has no salient object: the whole image, said so, not a speck."""
    path = grocery / "train/Fruit/Apple/Royal-Gala/Royal-Gala_008.jpg"
    if not path.is_file():
        pytest.skip(f"{path} not in this copy of the dataset")
    loc = localizer(load_image(path))
    assert loc.produced_by == "u2net+pymatting(empty->full)" and loc.mask.all()
