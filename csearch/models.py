"""The one registry of models: Keras backbones and ONNX models.

A model is added in exactly one place (a `register(ModelSpec(...))` call below); the CLI
choices, the HTTP validation and `csearch models` all read `REGISTRY`.

Roles:
  backbone        a `keras.applications` network without its top, used as the feature extractor
                  and as the classifier's backbone (`build_backbone`)
  onnx_extractor  a feature extractor shipped as an ONNX file (`load_extractor`)
  saliency        U²-Net family (ONNX), used by csearch.localize
  matting         FBA matting (ONNX), used by csearch.localize

Weights are resolved in this order (`resolve_weights`): an explicit path, `$CSEARCH_HOME`
(default `~/.cache/csearch`), Keras' own cache, and - for Keras backbones only - Keras' own
download. Nothing downloads at import or while an object is constructed: only inside
`resolve_weights(name, "imagenet")`. Keras/TensorFlow and onnxruntime are imported lazily so
that `csearch models` and config validation stay fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

import numpy as np

from . import errors

log = logging.getLogger(__name__)

ROLES = ("backbone", "onnx_extractor", "saliency", "matting")
EXTRACTOR_ROLES = ("backbone", "onnx_extractor")
BACKBONE_LAYER = "backbone"  # model.get_layer(BACKBONE_LAYER): the keras.applications network
PREPROCESS_LAYER = "preprocess"  # model.get_layer(PREPROCESS_LAYER): the [0, 255] -> model range step
PRETRAINED = ("imagenet", "default")  # weights values meaning "the registered pretrained file"
KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
MIN_IMAGE_SIZE = 32  # keras.applications refuse smaller inputs

WeightsArg = Union[None, str, os.PathLike]

# --------------------------------------------------------------------------------------------
# Preprocessing: every model's input step as (flip RGB->BGR, per-channel scale, per-channel
# offset), y = x * scale + offset on float RGB in [0, 255]. One table serves the Keras layer
# (keras.ops, exportable) and the numpy path for ONNX models, so the two cannot drift apart.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSING: dict[str, tuple[bool, tuple[float, ...], tuple[float, ...]]] = {
    "raw": (False, (1.0,) * 3, (0.0,) * 3),  # the model normalises itself (EfficientNetV2, exports)
    "tf": (False, (1 / 127.5,) * 3, (-1.0,) * 3),  # MobileNet, MobileNetV2, ResNetV2: [-1, 1]
    "caffe": (True, (1.0,) * 3, (-103.939, -116.779, -123.68)),  # ResNet50: BGR minus mean
    "lite": (False, (1 / 128,) * 3, (-127 / 128,) * 3),  # EfficientNet-Lite: (x - 127) / 128
    "imagenet": (False, tuple(1 / (255 * s) for s in IMAGENET_STD),
                 tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))),  # torch-style
}


def preprocess_array(images: np.ndarray, mode: str) -> np.ndarray:
    """Numpy version of the `Preprocess` layer: uint8/float RGB (..., 3) -> float32."""
    flip, scale, offset = _preprocessing(mode)
    x = np.asarray(images, np.float32)
    if flip:
        x = x[..., ::-1]
    return x * np.asarray(scale, np.float32) + np.asarray(offset, np.float32)


def _preprocessing(mode: str):
    if mode not in PREPROCESSING:
        raise errors.unknown_name("preprocessing", mode, PREPROCESSING)
    return PREPROCESSING[mode]


# --------------------------------------------------------------------------------------------
# The registry

@dataclass(frozen=True)
class ModelSpec:
    """Everything csearch knows about one model: how to build it, which file holds its weights
    and where to get that file, and its input/output interface."""

    name: str
    role: str  # one of ROLES
    input_size: int  # native square input side
    dim: Optional[int]  # feature size (extractors), None for localization models
    preprocessing: str  # a PREPROCESSING key: how RGB [0, 255] becomes the model's input
    weights_file: str  # the file name looked up in $CSEARCH_HOME
    description: str
    source: str  # how to get the file (URL or instructions), shown in WeightsNotFound
    sha256: Optional[str] = None  # of weights_file, where known
    builder: Optional[str] = None  # keras.applications constructor name (backbones)
    builder_kwargs: tuple = ()  # extra constructor arguments as (key, value) pairs
    keras_file: Optional[str] = None  # the no-top file name keras.applications caches/downloads
    keras_hash: Optional[str] = None  # Keras' own hash for that file (None where Keras has none)
    keras_dir: Optional[str] = None  # sub-folder of KERAS_URL holding keras_file
    onnx_inputs: tuple[str, ...] = ()  # ONNX input names, in the order the model takes them
    onnx_outputs: tuple[str, ...] = ()  # ONNX output names used ((): the first output)
    layout: str = "nhwc"  # ONNX image input layout: nchw | nhwc

    @property
    def is_keras(self) -> bool:
        return self.role == "backbone"

    @property
    def keras_url(self) -> Optional[str]:
        return f"{KERAS_URL}{self.keras_dir}/{self.keras_file}" if self.keras_file else None


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a model to the registry (names are unique; roles and preprocessing are checked)."""
    if spec.name in REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    if spec.role not in ROLES:
        raise ValueError(f"model {spec.name!r}: role must be one of {ROLES}, got {spec.role!r}")
    _preprocessing(spec.preprocessing)
    REGISTRY[spec.name] = spec
    return spec


_RESNET_NOTE = "ImageNet weights via Keras' own download (~/.keras/models)"

register(ModelSpec(
    name="resnet50", role="backbone", input_size=224, dim=2048, preprocessing="caffe",
    builder="ResNet50", weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    keras_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", keras_dir="resnet",
    keras_hash="4d473c1dd8becc155b73f8504c6f6626",
    description="ResNet50 (the paper's extractor), 2048-d average-pooled",
    source=_RESNET_NOTE))
register(ModelSpec(
    name="resnet101v2", role="backbone", input_size=224, dim=2048, preprocessing="tf",
    builder="ResNet101V2", weights_file="resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
    keras_file="resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5", keras_dir="resnet",
    keras_hash="c0ed64b8031c3730f411d2eb4eea35b5",
    description="ResNet101V2, 2048-d average-pooled", source=_RESNET_NOTE))
register(ModelSpec(
    name="efficientnetv2l", role="backbone", input_size=480, dim=1280, preprocessing="raw",
    builder="EfficientNetV2L", builder_kwargs=(("include_preprocessing", True),),
    weights_file="efficientnetv2-l_notop.h5", keras_file="efficientnetv2-l_notop.h5",
    keras_dir="efficientnet_v2", keras_hash="b0b66b5c863aef5b46e8608fe1711615",
    description="EfficientNetV2-L (normalises inside), 1280-d average-pooled; native 480 px",
    source=_RESNET_NOTE))
register(ModelSpec(
    name="mobilenetv2", role="backbone", input_size=224, dim=1280, preprocessing="tf",
    builder="MobileNetV2", weights_file="mobilenet_v2_1.0_224_imagenet.weights.h5",
    sha256="0c5f5bc50d19e13d43afd27d7608cc75d817459b7e1bb7a145a0b4b8a84b135d",
    keras_file="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
    keras_dir="mobilenet_v2",
    description="MobileNetV2 1.0, 1280-d average-pooled (keep training=False: see README)",
    source="Keras' own download, or the Keras 3 weights file of MobileNetV2(alpha=1.0)"))
register(ModelSpec(
    name="mobilenet", role="backbone", input_size=224, dim=1024, preprocessing="tf",
    builder="MobileNet", weights_file="mobilenet_1.0_224_imagenet.weights.h5",
    sha256="4f1d1877afe9e2fb3334ace425ae95151cf407d1a47f82c9f214dee516b1a006",
    keras_file="mobilenet_1_0_224_tf_no_top.h5", keras_dir="mobilenet",
    description="MobileNetV1 1.0, 1024-d average-pooled",
    source="Keras' own download, or the Keras 3 weights file of MobileNet(alpha=1.0)"))
register(ModelSpec(
    name="efficientnet_lite0", role="onnx_extractor", input_size=224, dim=1280,
    preprocessing="lite", layout="nchw", weights_file="efficientnet_lite0_imagenet.onnx",
    sha256="c8c9c433812a4addd58cba204c06c1662240aac7ca321841a0756519f0ba9431",
    onnx_inputs=("input",), onnx_outputs=("features",),
    description="EfficientNet-Lite0 (ONNX), 1280-d pooled",
    source="export an ImageNet EfficientNet-Lite0 (e.g. timm's tf_efficientnet_lite0) to ONNX with input "
           "'input' float32 [1,3,224,224] ((x-127)/128, RGB) and output 'features' [1,1280] (the pooled "
           "features); or use --extractor mobilenetv2, whose weights Keras downloads itself (slightly "
           "lower Recall@1, docs/results/retrieval.md)"))
register(ModelSpec(
    name="u2netp", role="saliency", input_size=320, dim=None, preprocessing="imagenet",
    layout="nchw", weights_file="u2netp.onnx",
    sha256="309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8",
    onnx_inputs=("input.1",),
    description="U²-Net-p salient object detection (4.7 MB); first output is the fused map",
    source="https://github.com/danielgatis/rembg/releases/download/v0.0.0/u2netp.onnx"))
register(ModelSpec(
    name="u2net", role="saliency", input_size=320, dim=None, preprocessing="imagenet",
    layout="nchw", weights_file="u2net.onnx", onnx_inputs=("input.1",),
    description="U²-Net salient object detection (176 MB); first output is the fused map",
    source="https://github.com/danielgatis/rembg/releases/download/v0.0.0/u2net.onnx"))
register(ModelSpec(
    name="fba", role="matting", input_size=0, dim=None, preprocessing="imagenet", layout="nchw",
    weights_file="fba_matting.onnx",
    onnx_inputs=("image", "two_chan_trimap", "image_n", "trimap_transformed"),
    description="FBA matting: inputs image [1,3,H,W] in [0,1], trimap [1,2,H,W], ImageNet-"
                "normalised image [1,3,H,W], distance-transformed trimap [1,6,H,W]; output "
                "[1,7,H,W] = alpha, fg(3), bg(3); any H, W (input_size 0)",
    source="export FBA Matting (github.com/MarcoForte/FBA_Matting, non-commercial licence) to "
           "ONNX with those four inputs"))


def names(role: Optional[str] = None) -> list[str]:
    """Registered names (of one role, or of several: a tuple of roles), sorted: CLI choices."""
    roles = (role,) if isinstance(role, str) else role
    return sorted(n for n, s in REGISTRY.items() if roles is None or s.role in roles)


def get_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise errors.unknown_name("model", name, names())
    return REGISTRY[name]


# --------------------------------------------------------------------------------------------
# Weights files

def csearch_home() -> Path:
    """Where csearch looks for model files: $CSEARCH_HOME or ~/.cache/csearch."""
    return Path(os.environ.get("CSEARCH_HOME") or "~/.cache/csearch").expanduser()


def keras_cache_dir() -> Path:
    """Keras' own download cache (what `weights="imagenet"` uses): $KERAS_HOME/models."""
    return Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser() / "models"


def find_weights(name: str) -> Optional[Path]:
    """The registered file if it is already on disk ($CSEARCH_HOME, then Keras' cache); no
    download."""
    spec = get_spec(name)
    candidates = [csearch_home() / spec.weights_file]
    if spec.keras_file:
        candidates.append(keras_cache_dir() / spec.keras_file)
    return next((p for p in candidates if p.is_file()), None)


def resolve_weights(name: str, weights: WeightsArg = "imagenet") -> Optional[Path]:
    """Turn a `weights` argument into a file path, or None for random initialisation.

    `None`/"none": random init (Keras backbones only). A path: that file (it must exist).
    "imagenet" (or "default"): `find_weights`, then - Keras backbones only - Keras' own
    download. Every failure is a one-line `WeightsNotFound` naming the file and where to put it.
    """
    spec = get_spec(name)
    if weights is None or (isinstance(weights, str) and weights.lower() == "none"):
        if not spec.is_keras:
            raise errors.ConfigError(f"{name} is an ONNX model: weights must be 'imagenet' "
                                     f"(the file {spec.weights_file}) or a file path, not none")
        return None
    if isinstance(weights, str) and weights.lower() in PRETRAINED:
        return find_weights(name) or _download(spec)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise errors.WeightsNotFound(f"{name}: weights file not found: {path}")
    return path.resolve()


def _download(spec: ModelSpec) -> Path:
    """Keras' own download (the same call `weights="imagenet"` makes); ONNX files never
    download. Any failure (offline, proxy, bad hash) becomes one WeightsNotFound line."""
    home = csearch_home()
    if not spec.is_keras or not spec.keras_file:
        raise errors.WeightsNotFound(
            f"{spec.name}: model file not found. Put {spec.weights_file} in {home} (or pass a "
            f"file path, or set CSEARCH_HOME to its folder); "
            f"{'download it from' if spec.source.startswith('http') else 'to make it:'} {spec.source}")
    import keras

    try:
        # Broad on purpose: get_file raises bare Exception for network errors; the reason is
        # kept in the message, so nothing is swallowed.
        with contextlib.redirect_stdout(sys.stderr):  # Keras prints progress; stdout is for --json
            got = keras.utils.get_file(spec.keras_file, spec.keras_url, cache_subdir="models",
                                       file_hash=spec.keras_hash)
    except Exception as exc:  # noqa: BLE001
        raise errors.WeightsNotFound(
            f"{spec.name}: ImageNet weights not found. Put {spec.weights_file} in {home} (or "
            f"pass a file path); download of {spec.keras_file} failed: {_one_line(exc)}") from None
    return Path(got).resolve()


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """sha256 of a file, cached by (absolute path, size, mtime) so repeated checks are free."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def describe_models() -> list[dict]:
    """One row per registered model for `csearch models` (no download, no hashing)."""
    rows = []
    for name in names():
        spec = REGISTRY[name]
        found = find_weights(name)
        rows.append({
            "name": name, "role": spec.role, "dim": spec.dim, "input_size": spec.input_size,
            "weights_file": spec.weights_file, "found": str(found) if found else None,
            "put_in": str(csearch_home()), "source": spec.source,
            "description": spec.description,
        })
    return rows


# --------------------------------------------------------------------------------------------
# Keras backbones

_PREPROCESS_CLASS = None


def _preprocess_layer_class():
    """The `Preprocess` layer class, defined on first use so importing csearch.models does not
    import Keras/TensorFlow."""
    global _PREPROCESS_CLASS
    if _PREPROCESS_CLASS is None:
        import keras

        @keras.saving.register_keras_serializable(package="csearch")
        class Preprocess(keras.layers.Layer):
            """RGB [0, 255] -> the backbone's input range, in keras.ops (backend-agnostic and
            exported with the model, so ONNX/saved models need no separate preprocessing)."""

            def __init__(self, mode: str = "raw", **kwargs):
                super().__init__(**kwargs)
                self.mode = mode
                self._flip, self._scale, self._offset = _preprocessing(mode)

            def call(self, x):
                ops = keras.ops
                x = ops.cast(x, "float32")
                if self._flip:
                    x = ops.flip(x, axis=-1)
                if self.mode == "raw":
                    return x
                return x * ops.convert_to_tensor(self._scale, "float32") + \
                    ops.convert_to_tensor(self._offset, "float32")

            def compute_output_shape(self, input_shape):
                return input_shape

            def get_config(self):
                return {**super().get_config(), "mode": self.mode}

        _PREPROCESS_CLASS = Preprocess
    return _PREPROCESS_CLASS


def custom_objects() -> dict:
    """Pass to `keras.saving.load_model(..., custom_objects=...)` for models holding a
    csearch `Preprocess` layer (calling this also registers the class)."""
    cls = _preprocess_layer_class()
    return {"csearch>Preprocess": cls, "Preprocess": cls}


def preprocess_layer(mode: str, name: str = PREPROCESS_LAYER):
    """A Keras layer applying PREPROCESSING[mode] (registered as csearch>Preprocess)."""
    return _preprocess_layer_class()(mode, name=name)


def _check_image_size(name: str, image_size: int) -> int:
    if not isinstance(image_size, (int, np.integer)) or image_size < MIN_IMAGE_SIZE:
        raise errors.ConfigError(f"{name}: image_size must be an integer >= {MIN_IMAGE_SIZE}, "
                                 f"got {image_size!r}")
    return int(image_size)


def build_backbone(name: str, weights: WeightsArg = "imagenet", image_size: Optional[int] = None,
                   trainable: bool = False):
    """A `keras.Model`: float32 RGB in [0, 255], shape (S, S, 3) -> pooled features (D,).

    Layers: input "image" -> "preprocess" (model-specific scaling, `PREPROCESS_LAYER`) ->
    "backbone" (the keras.applications network with average pooling, `BACKBONE_LAYER`).
    A classifier freezes/unfreezes `model.get_layer("backbone")` and should call the backbone
    with `training=False` (MobileNetV2's shared weights have identity batch-norm).
    `trainable` is the backbone's initial state (frozen by default). Weights are checked: a
    file that does not fit, or leaves any weight unset, raises `ModelMismatch`. ImageNet
    weights are the 224 px release at every `image_size` (convolution weights do not depend
    on the input size).
    """
    spec = get_spec(name)
    if not spec.is_keras:
        raise errors.unknown_name("backbone", name, names("backbone"))
    size = _check_image_size(name, image_size or spec.input_size)
    path = resolve_weights(name, weights)  # before building: fail fast, cheaply
    import keras

    inner = getattr(keras.applications, spec.builder)(
        include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg",
        **dict(spec.builder_kwargs))
    # Renamed afterwards: EfficientNetV2 uses its `name` argument to pick its architecture.
    inner.name = BACKBONE_LAYER
    if path is not None:
        load_backbone_weights(inner, path, name)
    inner.trainable = trainable
    image = keras.Input((size, size, 3), name="image", dtype="float32")
    features = inner(preprocess_layer(spec.preprocessing)(image))
    return keras.Model(image, features, name=f"csearch_{name}")


def load_backbone_weights(inner, path: Path, name: str) -> None:
    """Load a weights file into a keras.applications network, and prove every weight came
    from the file: weights are first set to NaN, so any the file did not provide stay NaN.
    (Keras raises for most mismatches but skips some gaps with only a warning, and legacy
    `.h5` files load by layer order, so the result is checked rather than trusted.)"""
    import keras

    for variable in inner.weights:
        if np.issubdtype(np.dtype(variable.dtype), np.floating):
            variable.assign(np.full(variable.shape, np.nan, dtype=variable.dtype))
    try:
        with warnings.catch_warnings():
            # Harmless for Functional models (the check below catches real gaps).
            warnings.filterwarnings("ignore", message=".*Skipping nested container.*")
            inner.load_weights(str(path))
    except (ValueError, KeyError, OSError) as exc:
        raise errors.ModelMismatch(f"{name}: weights file {path} does not fit the {name} "
                                   f"backbone: {_one_line(exc, 160)}") from None
    unset = [v.path for v in inner.weights
             if np.isnan(keras.ops.convert_to_numpy(v)).any()]
    if unset:
        raise errors.ModelMismatch(f"{name}: weights file {path} left {len(unset)} of "
                                   f"{len(inner.weights)} weights unset (e.g. {unset[0]}); "
                                   f"is it a {name} file?")


# --------------------------------------------------------------------------------------------
# Extractors

class Extractor(Protocol):
    """uint8 RGB images (N, S, S, 3) -> float32 features (N, dim)."""

    name: str
    dim: int
    input_size: int
    files: list[Path]  # weights/model files used, for the index to record with their sha256

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


def _check_batch(images: np.ndarray, size: int, name: str) -> np.ndarray:
    """Validate where data enters a model: uint8 (N, size, size, 3)."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise errors.ImageError(f"{name}: images must be a uint8 numpy array, got "
                                f"{getattr(images, 'dtype', type(images).__name__)}")
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise errors.ImageError(f"{name}: images must have shape (N, {size}, {size}, 3), got "
                                f"{images.shape}")
    return images


class KerasExtractor:
    """A Keras backbone as an extractor.

    On the TensorFlow backend it runs through one `tf.function` with a batch-polymorphic input
    signature. Measured at batch 32 on the 2-core CPU (benchmarks/bench_models.py --calls):
    as fast as `predict_on_batch` (0-15% faster, within the noise of a shared machine),
    1.4-2x faster than the eager call, and 10x faster than an XLA-compiled function for the
    MobileNets (XLA's CPU depthwise convolutions are slow). It is traced once for every batch
    size, where `predict_on_batch` retraces on a new one (seconds for large backbones).
    Other backends use `predict_on_batch`.
    """

    def __init__(self, name: str, model, files: Sequence[Path] = ()):
        self.name = name
        self.model = model
        self.files = [Path(f) for f in files]
        self.input_size = int(model.input_shape[1])
        self.dim = int(model.output_shape[-1])
        self._run = _compiled_forward(model, self.input_size)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = _check_batch(images, self.input_size, self.name)
        if len(x) == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self._run(x.astype(np.float32)), np.float32)


def _compiled_forward(model, size: int):
    """The fastest inference call for `model` on the active Keras backend (traced lazily)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return model.predict_on_batch
    import tensorflow as tf

    spec = tf.TensorSpec([None, size, size, 3], tf.float32)
    forward = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    return lambda x: forward(x).numpy()


def onnx_session(model: Union[str, os.PathLike, bytes], threads: Optional[int] = None):
    """An onnxruntime session: CUDA first when this onnxruntime has it, else CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # warnings such as unused initializers are not the user's
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in ort.get_available_providers()]
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=providers)


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value_info.type.tensor_type.shape.dim]


class OnnxExtractor:
    """An ONNX feature extractor. Many exports fix the batch dim at 1; it is then made symbolic
    in memory and checked once against per-image runs. Where batching would change the result,
    images run one at a time (`self.batched` records which)."""

    def __init__(self, name: str, path: Path, input_name: Optional[str] = None,
                 output_name: Optional[str] = None, layout: str = "nchw",
                 preprocessing: str = "raw", image_size: Optional[int] = None):
        import onnx

        self.name, self.path, self.files = name, Path(path), [Path(path)]
        self.layout, self.preprocessing = layout, preprocessing
        try:
            graph_model = onnx.load(str(path))
        except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError, OSError, ...
            raise errors.ModelMismatch(f"{name}: {path} is not a readable ONNX file: "
                                       f"{_one_line(exc, 120)}") from None
        graph = graph_model.graph
        initializers = {t.name for t in graph.initializer}  # old IRs list weights as inputs too
        inputs = {i.name: i for i in graph.input if i.name not in initializers}
        self.input_name = input_name or next(iter(inputs), "")
        self.output_name = output_name or graph.output[0].name
        if self.input_name not in inputs:
            raise errors.ModelMismatch(f"{name}: {path} has no input {self.input_name!r} "
                                       f"(inputs: {', '.join(inputs)})")
        if self.output_name not in {o.name for o in graph.output}:
            raise errors.ModelMismatch(f"{name}: {path} has no output {self.output_name!r} "
                                       f"(outputs: {', '.join(o.name for o in graph.output)})")
        self.input_size = self._input_size(_dims(inputs[self.input_name]), image_size)
        fixed_batch = isinstance(_dims(inputs[self.input_name])[0], int)
        if fixed_batch:  # try a symbolic batch dim; _batching_works decides whether to keep it
            inputs[self.input_name].type.tensor_type.shape.dim[0].dim_param = "batch"
        self.session = onnx_session(graph_model.SerializeToString())
        self.batched = False
        single = self._probe()
        self.dim = int(single.shape[-1])
        self.batched = self._batching_works(single) if fixed_batch else True

    def _input_size(self, dims: list, image_size: Optional[int]) -> int:
        if len(dims) != 4:
            raise errors.ModelMismatch(f"{self.name}: ONNX input {self.input_name!r} must be 4-d "
                                       f"images, got shape {dims}")
        spatial = dims[2:4] if self.layout == "nchw" else dims[1:3]
        fixed = spatial[0] if isinstance(spatial[0], int) else None
        if fixed and image_size and image_size != fixed:
            raise errors.ModelMismatch(f"{self.name}: the ONNX model takes {fixed} px input, "
                                       f"got image_size={image_size}")
        size = fixed or image_size
        if not size:
            raise errors.ConfigError(f"{self.name}: the ONNX input size is not fixed; pass "
                                     "image_size")
        return int(size)

    def _probe(self) -> np.ndarray:
        """Features of two seeded random images (per image unless self.batched)."""
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (2, self.input_size, self.input_size, 3), dtype=np.uint8)
        try:
            return self._run(images)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise errors.ModelMismatch(f"{self.name}: {self.path} does not run on "
                                       f"{self.input_size} px images: {_one_line(exc, 160)}") from None

    def _batching_works(self, single: np.ndarray) -> bool:
        """A batch-1 export may bake batch 1 into reshapes: batched runs then fail or mix
        images. Keep batching only if a batch of two gives the per-image features."""
        self.batched = True
        try:
            batched = self._probe()
        except errors.ModelMismatch:
            batched = None
        exact = batched is not None and batched.shape == single.shape and \
            np.allclose(batched, single, rtol=1e-4, atol=1e-4)
        if not exact:
            log.info("%s: the batch dim is fixed at 1; running images one at a time", self.name)
        return exact

    def _feed(self, images: np.ndarray) -> np.ndarray:
        x = preprocess_array(images, self.preprocessing)
        if self.layout == "nchw":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x, np.float32)

    def _run(self, images: np.ndarray) -> np.ndarray:
        x = self._feed(images)
        if self.batched:
            out = self.session.run([self.output_name], {self.input_name: x})[0]
        else:
            out = np.concatenate([self.session.run([self.output_name], {self.input_name: x[i:i + 1]})[0]
                                  for i in range(len(x))])
        return np.asarray(out, np.float32).reshape(len(x), -1)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = _check_batch(images, self.input_size, self.name)
        if len(x) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._run(x)


# Metadata keys written by csearch.export, read back by load_extractor(path).
META_ROLE = "csearch.role"
META_MODEL = "csearch.model"
META_LAYOUT = "csearch.layout"
META_PREPROCESSING = "csearch.preprocessing"


def _load_exported(path: Path, weights: WeightsArg, image_size: Optional[int]) -> OnnxExtractor:
    """An extractor from an `.onnx` file written by `csearch export` (its metadata says how to
    feed it: NHWC float RGB in [0, 255] for exported Keras backbones)."""
    import onnx

    if weights is not None and not (isinstance(weights, str) and
                                    weights.lower() in PRETRAINED + ("none",)):
        raise errors.ConfigError(f"{path}: an exported ONNX extractor holds its weights; "
                                 f"do not pass weights={weights!r}")
    try:
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError, OSError, ...
        raise errors.ModelMismatch(f"{path} is not a readable ONNX file: {_one_line(exc, 120)}") from None
    if meta.get(META_ROLE) != "extractor":
        raise errors.ModelMismatch(f"{path}: not an extractor written by `csearch export` "
                                   f"(metadata {META_ROLE}={meta.get(META_ROLE)!r})")
    return OnnxExtractor(str(path), path.resolve(), layout=meta.get(META_LAYOUT, "nhwc"),
                         preprocessing=meta.get(META_PREPROCESSING, "raw"), image_size=image_size)


def load_extractor(name: str, weights: WeightsArg = "imagenet",
                   image_size: Optional[int] = None) -> Extractor:
    """A registered extractor (Keras backbone or ONNX), or an `.onnx` file from `csearch export`.

    Resolving weights may download (Keras backbones with weights="imagenet" not cached yet);
    nothing else does.
    """
    if str(name).endswith(".onnx") or (name not in REGISTRY and Path(name).is_file()):
        path = Path(name).expanduser()
        if not path.is_file():
            raise errors.WeightsNotFound(f"extractor file not found: {path}")
        return _load_exported(path, weights, image_size)
    extractors = names(EXTRACTOR_ROLES)
    if name not in extractors:
        raise errors.unknown_name("extractor", name, extractors)
    spec = REGISTRY[name]
    if spec.is_keras:
        path = resolve_weights(name, weights)
        model = build_backbone(name, path, image_size)
        return KerasExtractor(name, model, [path] if path else [])
    path = resolve_weights(name, weights)
    return OnnxExtractor(name, path, spec.onnx_inputs[0], spec.onnx_outputs[0], spec.layout,
                         spec.preprocessing, image_size)
