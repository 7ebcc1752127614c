"""Feature extractors: ONNX extractors and `load_extractor`.

An extractor maps uint8 RGB images (N, S, S, 3) to float32 features (N, dim). Registered Keras
backbones become `keras_backbones.KerasExtractor` (Keras imported only then); registered ONNX
extractors and files written by `csearch export` become `OnnxExtractor`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from .. import errors
from .base import Extractor, extract
from .onnx_runtime import dims, graph_inputs, load_proto, onnx_session
from .preprocessing import preprocess_array
from .registry import EXTRACTOR_ROLES, PRETRAINED, REGISTRY, names
from .weights import WeightsArg, resolve_weights

log = logging.getLogger(__name__)

# Metadata keys written by csearch.export, read back by load_extractor(path).
META_ROLE = "csearch.role"
META_MODEL = "csearch.model"
META_LAYOUT = "csearch.layout"
META_PREPROCESSING = "csearch.preprocessing"


class OnnxExtractor:
    """An ONNX feature extractor. Many exports fix the batch dim at 1; it is then made symbolic
    in memory and checked once against per-image runs. Where batching would change the result,
    images run one at a time (`self.batched` records which)."""

    def __init__(
        self,
        name: str,
        path: Path,
        input_name: Optional[str] = None,
        output_name: Optional[str] = None,
        layout: str = "nchw",
        preprocessing: str = "raw",
        image_size: Optional[int] = None,
    ):
        self.name, self.path, self.files = name, Path(path), [Path(path)]
        self.layout, self.preprocessing = layout, preprocessing
        graph_model = load_proto(path, f"the {name} extractor")
        inputs = {v.name: v for v in graph_inputs(graph_model)}
        outputs = [o.name for o in graph_model.graph.output]
        self.input_name = input_name or next(iter(inputs), "")
        self.output_name = output_name or outputs[0]
        if self.input_name not in inputs:
            raise errors.ModelMismatch(f"{name}: {path} has no input {self.input_name!r} (inputs: {', '.join(inputs)})")
        if self.output_name not in outputs:
            raise errors.ModelMismatch(
                f"{name}: {path} has no output {self.output_name!r} (outputs: {', '.join(outputs)})"
            )
        input_dims = dims(inputs[self.input_name])
        self.input_size = self._input_size(input_dims, image_size)
        fixed_batch = isinstance(input_dims[0], int)
        if fixed_batch:  # try a symbolic batch dim; _batching_works decides whether to keep it
            inputs[self.input_name].type.tensor_type.shape.dim[0].dim_param = "batch"
        self.session = onnx_session(graph_model, f"the {name} extractor", origin=path)
        self.batched = False
        single = self._probe()
        self.dim = int(single.shape[-1])
        self.batched = self._batching_works(single) if fixed_batch else True

    def _input_size(self, input_dims: list, image_size: Optional[int]) -> int:
        if len(input_dims) != 4:
            raise errors.ModelMismatch(
                f"{self.name}: ONNX input {self.input_name!r} must be 4-d images, got shape {input_dims}"
            )
        spatial = input_dims[2:4] if self.layout == "nchw" else input_dims[1:3]
        fixed = spatial[0] if isinstance(spatial[0], int) else None
        if fixed and image_size and image_size != fixed:
            raise errors.ModelMismatch(
                f"{self.name}: the ONNX model takes {fixed} px input, got image_size={image_size}"
            )
        size = fixed or image_size
        if not size:
            raise errors.ConfigError(f"{self.name}: the ONNX input size is not fixed; pass image_size")
        return int(size)

    def _probe(self) -> np.ndarray:
        """Features of two seeded random images (per image unless self.batched)."""
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (2, self.input_size, self.input_size, 3), dtype=np.uint8)
        try:
            return self._run(images)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise errors.ModelMismatch(
                f"{self.name}: {self.path} does not run on {self.input_size} px images: {errors.one_line(exc, 160)}"
            ) from None

    def _batching_works(self, single: np.ndarray) -> bool:
        """A batch-1 export may bake batch 1 into reshapes: batched runs then fail or mix
        images. Keep batching only if a batch of two gives the per-image features."""
        self.batched = True
        try:
            batched = self._probe()
        except errors.ModelMismatch:
            batched = None
        exact = (
            batched is not None and batched.shape == single.shape and np.allclose(batched, single, rtol=1e-4, atol=1e-4)
        )
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
            out = np.concatenate(
                [self.session.run([self.output_name], {self.input_name: x[i : i + 1]})[0] for i in range(len(x))]
            )
        return np.asarray(out, np.float32).reshape(len(x), -1)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return extract(self, images, self._run)


def _load_exported(path: Path, weights: WeightsArg, image_size: Optional[int]) -> OnnxExtractor:
    """An extractor from an `.onnx` file written by `csearch export` (its metadata says how to
    feed it: NHWC float RGB in [0, 255] for exported Keras backbones)."""
    if weights is not None and not (isinstance(weights, str) and weights.lower() in PRETRAINED + ("none",)):
        raise errors.ConfigError(
            f"{path}: an exported ONNX extractor holds its weights; do not pass weights={weights!r}"
        )
    what = "an extractor written by `csearch export`"
    meta = {p.key: p.value for p in load_proto(path, what, load_external_data=False).metadata_props}
    if meta.get(META_ROLE) != "extractor":
        raise errors.ModelMismatch(f"{path}: not {what} (metadata {META_ROLE}={meta.get(META_ROLE)!r})")
    return OnnxExtractor(
        str(path),
        path.resolve(),
        layout=meta.get(META_LAYOUT, "nhwc"),
        preprocessing=meta.get(META_PREPROCESSING, "raw"),
        image_size=image_size,
    )


def load_extractor(name: str, weights: WeightsArg = "imagenet", image_size: Optional[int] = None) -> Extractor:
    """A registered extractor (Keras backbone or ONNX), or an `.onnx` file from `csearch export`.

    Nothing is downloaded: missing weights are a WeightsNotFound naming `csearch models fetch`.
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
    path = resolve_weights(name, weights)
    if spec.is_keras:
        from .keras_backbones import KerasExtractor, build_backbone  # Keras only for Keras backbones

        return KerasExtractor(name, build_backbone(name, path, image_size), [path] if path else [])
    return OnnxExtractor(
        name, path, spec.onnx_inputs[0], spec.onnx_outputs[0], spec.layout, spec.preprocessing, image_size
    )
