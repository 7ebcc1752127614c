"""How RGB in [0, 255] becomes each model's input.

Every mode is (flip RGB->BGR, per-channel scale, per-channel offset): y = x * scale + offset on
float RGB in [0, 255]. One table serves the Keras layer (keras_backbones.Preprocess, exported
with the model) and the numpy path for ONNX extractors, so the two cannot drift apart.
"""

from __future__ import annotations

import numpy as np

from .. import errors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSING: dict[str, tuple[bool, tuple[float, ...], tuple[float, ...]]] = {
    "raw": (False, (1.0,) * 3, (0.0,) * 3),  # the model normalises itself (EfficientNetV2, exports)
    "tf": (False, (1 / 127.5,) * 3, (-1.0,) * 3),  # MobileNet, MobileNetV2, ResNetV2: [-1, 1]
    "caffe": (True, (1.0,) * 3, (-103.939, -116.779, -123.68)),  # ResNet50: BGR minus mean
    "lite": (False, (1 / 128,) * 3, (-127 / 128,) * 3),  # EfficientNet-Lite: (x - 127) / 128
    "imagenet": (
        False,
        tuple(1 / (255 * s) for s in IMAGENET_STD),
        tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)),
    ),  # torch-style
}
# Modes that the ONNX localizers apply as (x / 255 - mean) / std, in that order of operations:
# the same value as the table's scale/offset, but the exact float32 arithmetic their reference
# code uses (the U²-Net and FBA exports were checked against it).
UNIT_MEAN_STD = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def preprocessing_step(mode: str) -> tuple[bool, tuple[float, ...], tuple[float, ...]]:
    """(flip, scale, offset) of a mode; an unknown mode is an UnknownNameError listing the valid ones."""
    if mode not in PREPROCESSING:
        raise errors.unknown_name("preprocessing", mode, PREPROCESSING)
    return PREPROCESSING[mode]


def preprocess_array(images: np.ndarray, mode: str) -> np.ndarray:
    """Numpy version of the Keras `Preprocess` layer: uint8/float RGB (..., 3) -> float32."""
    flip, scale, offset = preprocessing_step(mode)
    x = np.asarray(images, np.float32)
    if flip:
        x = x[..., ::-1]
    return x * np.asarray(scale, np.float32) + np.asarray(offset, np.float32)


def unit_mean_std(mode: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 (mean, std) of a mode applied to RGB / 255 (see UNIT_MEAN_STD)."""
    if mode not in UNIT_MEAN_STD:
        raise errors.unknown_name("mean/std preprocessing", mode, UNIT_MEAN_STD)
    mean, std = UNIT_MEAN_STD[mode]
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)
