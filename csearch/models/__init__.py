"""Models: the registry, weights files, preprocessing, extractors and ONNX Runtime sessions.

    registry         ModelSpec, REGISTRY, names(role), get_spec: what each model is
    weights          resolve_weights / find_weights ($CSEARCH_HOME, Keras' cache; never downloads), file_sha256
    fetch, convert   `csearch models fetch`: downloads (resumable, sha256-checked) and the EfficientNet-Lite0 conversion
    preprocessing    the per-model input scaling table and its numpy version
    onnx_runtime     the one place building onnxruntime sessions, plus ONNX graph helpers
    base             the Extractor protocol and the batch check all extractors share
    extractors       OnnxExtractor, load_extractor
    keras_backbones  build_backbone, the Preprocess layer, KerasExtractor (imports Keras)

Importing this package does not import Keras/TensorFlow (nor onnxruntime): the Keras names
below are loaded from `keras_backbones` on first access.
"""

from __future__ import annotations

from importlib import import_module

from .base import Extractor
from .extractors import META_LAYOUT, META_MODEL, META_PREPROCESSING, META_ROLE, OnnxExtractor, load_extractor
from .onnx_runtime import onnx_session
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, PREPROCESSING, preprocess_array
from .registry import (
    BACKBONE_LAYER,
    EXTRACTOR_ROLES,
    KERAS_URL,
    PREPROCESS_LAYER,
    PRETRAINED,
    REGISTRY,
    ROLES,
    ModelSpec,
    get_spec,
    names,
    register,
)
from .weights import (
    WeightsArg,
    csearch_home,
    describe_models,
    file_sha256,
    find_weights,
    keras_cache_dir,
    resolve_weights,
)

_KERAS_NAMES = (
    "KerasExtractor",
    "Preprocess",
    "build_backbone",
    "custom_objects",
    "load_backbone_weights",
    "preprocess_layer",
)

__all__ = [
    "BACKBONE_LAYER",
    "EXTRACTOR_ROLES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KERAS_URL",
    "META_LAYOUT",
    "META_MODEL",
    "META_PREPROCESSING",
    "META_ROLE",
    "PREPROCESSING",
    "PREPROCESS_LAYER",
    "PRETRAINED",
    "REGISTRY",
    "ROLES",
    "Extractor",
    "ModelSpec",
    "OnnxExtractor",
    "WeightsArg",
    "csearch_home",
    "describe_models",
    "file_sha256",
    "find_weights",
    "get_spec",
    "keras_cache_dir",
    "load_extractor",
    "names",
    "onnx_session",
    "preprocess_array",
    "register",
    "resolve_weights",
    *_KERAS_NAMES,
]


def __getattr__(name: str):
    """The Keras-needing names, imported on first use (PEP 562)."""
    if name in _KERAS_NAMES:
        return getattr(import_module(".keras_backbones", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
