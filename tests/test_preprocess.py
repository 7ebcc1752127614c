import io

import numpy as np
import pytest
from PIL import Image

from csearch.errors import ImageError
from csearch.preprocess import load_image, model_input, to_color


def encode(image: Image.Image, fmt="PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "I", "1"])
def test_every_mode_becomes_uint8_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I" else "PNG")
    image = load_image(encode(Image.new(mode, (20, 12)), fmt))
    assert image.shape == (12, 20, 3) and image.dtype == np.uint8


def test_transparency_becomes_white():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert (load_image(encode(rgba)) == 255).all()


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (30, 10), (0, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    assert load_image(encode(image, "JPEG", exif=exif.tobytes())).shape == (30, 10, 3)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty file"),
        (b"not an image at all", "not an image"),
    ],
)
def test_bad_bytes(data, message):
    with pytest.raises(ImageError, match=message):
        load_image(data)


def test_truncated_jpeg():
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    with pytest.raises(ImageError, match="truncated"):
        load_image(data[: len(data) // 2])


def test_size_guards(tmp_path):
    with pytest.raises(ImageError, match="too small"):
        load_image(encode(Image.new("RGB", (1, 1))))
    huge = encode(Image.new("L", (8000, 6250)))  # 50 MP, compresses to a few KB
    with pytest.raises(ImageError, match="too large"):
        load_image(huge)
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.jpg")


def test_model_input_crops_squares_and_greys():
    image = np.full((100, 60, 3), 255, np.uint8)
    image[20:80, 10:30] = (255, 0, 0)
    out = model_input(image, 32, "gray", box=(10, 20, 30, 80))
    assert out.shape == (32, 32, 3) and (out[..., 0] == out[..., 1]).all()
    assert out[16, 16, 0] < 128  # the red object fills the centre after cropping
    assert (to_color(image, "rgb") == image).all()
