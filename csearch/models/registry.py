"""The one registry of models: what csearch knows about each Keras backbone and ONNX model.

A model is added in exactly one place (a `register(ModelSpec(...))` call below); the CLI
choices, the HTTP validation and `csearch models` all read `REGISTRY`. This module is plain
data: it imports neither Keras nor onnxruntime.

Roles:
  backbone        a `keras.applications` network without its top, used as the feature extractor
                  and as the classifier's backbone (`keras_backbones.build_backbone`)
  onnx_extractor  a feature extractor shipped as an ONNX file (`extractors.load_extractor`)
  saliency        U²-Net family (ONNX), used by csearch.localize
  matting         FBA matting (ONNX), used by csearch.localize
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

from .. import errors
from .preprocessing import preprocessing_step

ROLES = ("backbone", "onnx_extractor", "saliency", "matting")
EXTRACTOR_ROLES = ("backbone", "onnx_extractor")
BACKBONE_LAYER = "backbone"  # model.get_layer(BACKBONE_LAYER): the keras.applications network
PREPROCESS_LAYER = "preprocess"  # model.get_layer(PREPROCESS_LAYER): the [0, 255] -> model range step
PRETRAINED = ("imagenet", "default")  # weights values meaning "the registered pretrained file"
KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
REMBG_URL = "https://github.com/danielgatis/rembg/releases/download/v0.0.0/"  # rembg's ONNX exports of U²-Net
LITE_URL = "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientnet/lite/"  # tensorflow/tpu's release


@dataclass(frozen=True)
class ModelSpec:
    """Everything csearch knows about one model: how to build it, which file holds its weights
    and where to get that file, and its input/output interface."""

    name: str
    role: str  # one of ROLES
    input_size: int  # native square input side
    dim: Optional[int]  # feature size (extractors), None for localization models
    preprocessing: str  # a preprocessing.PREPROCESSING key: how RGB [0, 255] becomes the model's input
    weights_file: str  # the file name looked up in $CSEARCH_HOME
    description: str
    source: str  # where the file comes from (publisher, licence, or how to make it), shown by `csearch models`
    sha256: Optional[str] = None  # of weights_file, where known (`csearch models fetch` checks it)
    url: Optional[str] = None  # official download of weights_file or, with `converter`, of what it is built from
    url_md5: Optional[str] = None  # the publisher's md5 of that download, where no sha256 is pinned (rembg)
    converter: Optional[str] = None  # a models.convert.CONVERTERS key: builds weights_file from the download
    archive_member: Optional[str] = None  # the file inside the downloaded archive that the converter reads
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

    @property
    def download_url(self) -> Optional[str]:
        """What `csearch models fetch` downloads: `url`, else (Keras backbones) Keras' own file."""
        return self.url or self.keras_url


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a model to the registry (names are unique; roles and preprocessing are checked)."""
    if spec.name in REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    if spec.role not in ROLES:
        raise ValueError(f"model {spec.name!r}: role must be one of {ROLES}, got {spec.role!r}")
    preprocessing_step(spec.preprocessing)  # an unknown mode fails here
    REGISTRY[spec.name] = spec
    return spec


_KERAS_NOTE = 'ImageNet weights from Keras Applications (the file `weights="imagenet"` downloads)'

register(
    ModelSpec(
        name="resnet50",
        role="backbone",
        input_size=224,
        dim=2048,
        preprocessing="caffe",
        builder="ResNet50",
        weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        keras_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        keras_dir="resnet",
        keras_hash="4d473c1dd8becc155b73f8504c6f6626",
        description="ResNet50 (the paper's extractor), 2048-d average-pooled",
        source=_KERAS_NOTE,
    )
)
register(
    ModelSpec(
        name="resnet101v2",
        role="backbone",
        input_size=224,
        dim=2048,
        preprocessing="tf",
        builder="ResNet101V2",
        weights_file="resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        keras_file="resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        keras_dir="resnet",
        keras_hash="c0ed64b8031c3730f411d2eb4eea35b5",
        description="ResNet101V2, 2048-d average-pooled",
        source=_KERAS_NOTE,
    )
)
register(
    ModelSpec(
        name="efficientnetv2l",
        role="backbone",
        input_size=480,
        dim=1280,
        preprocessing="raw",
        builder="EfficientNetV2L",
        builder_kwargs=(("include_preprocessing", True),),
        weights_file="efficientnetv2-l_notop.h5",
        keras_file="efficientnetv2-l_notop.h5",
        keras_dir="efficientnet_v2",
        keras_hash="b0b66b5c863aef5b46e8608fe1711615",
        description="EfficientNetV2-L (normalises inside), 1280-d average-pooled; native 480 px",
        source=_KERAS_NOTE,
    )
)
register(
    ModelSpec(
        name="mobilenetv2",
        role="backbone",
        input_size=224,
        dim=1280,
        preprocessing="tf",
        builder="MobileNetV2",
        weights_file="mobilenet_v2_1.0_224_imagenet.weights.h5",
        sha256="0c5f5bc50d19e13d43afd27d7608cc75d817459b7e1bb7a145a0b4b8a84b135d",
        keras_file="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
        keras_dir="mobilenet_v2",
        description="MobileNetV2 1.0, 1280-d average-pooled (keep training=False: see README)",
        source=f"{_KERAS_NOTE}, or the Keras 3 weights file of MobileNetV2(alpha=1.0)",
    )
)
register(
    ModelSpec(
        name="mobilenet",
        role="backbone",
        input_size=224,
        dim=1024,
        preprocessing="tf",
        builder="MobileNet",
        weights_file="mobilenet_1.0_224_imagenet.weights.h5",
        sha256="4f1d1877afe9e2fb3334ace425ae95151cf407d1a47f82c9f214dee516b1a006",
        keras_file="mobilenet_1_0_224_tf_no_top.h5",
        keras_dir="mobilenet",
        description="MobileNetV1 1.0, 1024-d average-pooled",
        source=f"{_KERAS_NOTE}, or the Keras 3 weights file of MobileNet(alpha=1.0)",
    )
)
register(
    ModelSpec(
        name="efficientnet_lite0",
        role="onnx_extractor",
        input_size=224,
        dim=1280,
        preprocessing="lite",
        layout="nchw",
        weights_file="efficientnet_lite0_imagenet.onnx",
        sha256="c8c9c433812a4addd58cba204c06c1662240aac7ca321841a0756519f0ba9431",
        onnx_inputs=("input",),
        onnx_outputs=("features",),
        description="EfficientNet-Lite0 (ONNX), 1280-d pooled",
        source="Google's official EfficientNet-Lite0 release (tensorflow/tpu, Apache-2.0): its fp32 TFLite file, "
        "converted to ONNX by `csearch models fetch` (needs tf2onnx) and checked against the TFLite interpreter",
        # sha256 above: the reference export in ../shared/models (`--from` checks it); a converted file
        # differs, so fetch checks it by its outputs and records its sha256 in <weights_file>.json
        url=f"{LITE_URL}efficientnet-lite0.tar.gz",
        converter="efficientnet_lite_tflite",
        archive_member="efficientnet-lite0/efficientnet-lite0-fp32.tflite",
    )
)
register(
    ModelSpec(
        name="u2netp",
        role="saliency",
        input_size=320,
        dim=None,
        preprocessing="imagenet",
        layout="nchw",
        weights_file="u2netp.onnx",
        sha256="309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8",
        onnx_inputs=("input.1",),
        description="U²-Net-p salient object detection (4.7 MB); first output is the fused map",
        source=f"the U²-Net authors' U²-Net-p (Apache-2.0) as ONNX, published by rembg: {REMBG_URL}u2netp.onnx",
        url=f"{REMBG_URL}u2netp.onnx",
        url_md5="8e83ca70e441ab06c318d82300c84806",
    )
)
register(
    ModelSpec(
        name="u2net",
        role="saliency",
        input_size=320,
        dim=None,
        preprocessing="imagenet",
        layout="nchw",
        weights_file="u2net.onnx",
        onnx_inputs=("input.1",),
        description="U²-Net salient object detection (176 MB); first output is the fused map",
        source=f"the U²-Net authors' U²-Net (Apache-2.0) as ONNX, published by rembg: {REMBG_URL}u2net.onnx",
        url=f"{REMBG_URL}u2net.onnx",
        url_md5="60024c5c889badc19c04ad937298a77b",
    )
)
register(
    ModelSpec(
        name="fba",
        role="matting",
        input_size=0,
        dim=None,
        preprocessing="imagenet",
        layout="nchw",
        weights_file="fba_matting.onnx",
        onnx_inputs=("image", "two_chan_trimap", "image_n", "trimap_transformed"),
        description="FBA matting: inputs image [1,3,H,W] in [0,1], trimap [1,2,H,W], ImageNet-"
        "normalised image [1,3,H,W], distance-transformed trimap [1,6,H,W]; output "
        "[1,7,H,W] = alpha, fg(3), bg(3); any H, W (input_size 0)",
        source="no download: export FBA Matting (github.com/MarcoForte/FBA_Matting, non-commercial licence) "
        "to ONNX with experiments/export_onnx.py",
    )
)


def names(role: Union[None, str, Sequence[str]] = None) -> list[str]:
    """Registered names (of one role, or of several: a tuple of roles), sorted: CLI choices."""
    roles = (role,) if isinstance(role, str) else role
    return sorted(n for n, s in REGISTRY.items() if roles is None or s.role in roles)


def get_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise errors.unknown_name("model", name, names())
    return REGISTRY[name]
