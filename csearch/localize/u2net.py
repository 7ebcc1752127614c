"""U²-Net / U²-Net-p salient object detection with ONNX Runtime.

The exported models take one input (`input.1`: the registry spec's `onnx_inputs`) of shape
[1, 3, S, S] (RGB / 255, then the spec's mean/std: ImageNet's) and return 7 side outputs
[1, 1, S, S]; the first is the fused saliency map. The published exports fix S = 320; to run
another size the input/output dims are made symbolic in memory (the network is fully
convolutional), so no converted file is needed. Sessions come from csearch.models.onnx_runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from ..errors import ConfigError, ModelMismatch, unknown_name
from ..models.onnx_runtime import check_file, dim_matches, graph_io, load_proto, onnx_session
from ..models.preprocessing import unit_mean_std
from ..models.registry import get_spec, names

# Measured on the 2-core dev box (docs/results/localize.md): one intra-op thread is as fast as
# two per image and leaves the other core to a second worker (the pipeline localizes in 2 threads).
DEFAULT_THREADS = 1

Shape = Sequence[object]  # ints for fixed dims, str/None for symbolic ones


def check_u2net_io(
    inputs: list[tuple[str, Shape]], outputs: list[tuple[str, Shape]], path: Path, input_name: str
) -> None:
    expected = f"one input {input_name!r} [1,3,H,W] and a first output [N,1,H,W]"
    names = [name for name, _ in inputs]
    if len(inputs) != 1 or names[0] != input_name:
        raise ModelMismatch(f"{path}: not a U²-Net model: inputs {names}; expected {expected}")
    shape = list(inputs[0][1])
    if len(shape) != 4 or not dim_matches(shape[1], 3):
        raise ModelMismatch(f"{path}: not a U²-Net model: input shape {shape}; expected {expected}")
    out = list(outputs[0][1]) if outputs else []
    if len(out) != 4 or not dim_matches(out[1], 1):
        raise ModelMismatch(f"{path}: not a U²-Net model: first output shape {out}; expected {expected}")


def make_spatial_dims_symbolic(model) -> None:
    """Mark H and W of every graph input/output symbolic and drop the stored intermediate shapes,
    so ONNX Runtime re-infers them for the size actually fed (in place)."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 4:
            dims[2].dim_param, dims[3].dim_param = "height", "width"
    del model.graph.value_info[:]


class U2NetSaliency:
    """Saliency map of the most salient object: `predict(image) -> float32 (H, W) in [0, 1]`.

    `input_size` is the square side the network sees (320 as trained; 256/224 are faster, see
    docs/results/localize.md). `threads`: ONNX Runtime intra-op threads (None: DEFAULT_THREADS).
    `model` is the registry entry whose interface the file has (its ONNX input name and its
    mean/std normalisation); u2netp and u2net share one.
    """

    name = "u2net"

    def __init__(
        self, model_path: str | Path, input_size: int = 320, threads: Optional[int] = None, model: str = "u2netp"
    ):
        if input_size < 32 or input_size % 32:
            raise ConfigError(f"input_size must be a positive multiple of 32, got {input_size}")
        spec = get_spec(model)
        if spec.role != "saliency":
            raise unknown_name("U²-Net model", model, names("saliency"))
        self.input_name = spec.onnx_inputs[0]
        self.mean, self.std = unit_mean_std(spec.preprocessing)
        path = check_file(model_path, "U²-Net")
        self.files = [path.resolve()]
        self.input_size = int(input_size)
        proto = load_proto(path, "the U²-Net network")
        inputs, outputs = graph_io(proto)
        check_u2net_io(inputs, outputs, path, self.input_name)
        source: object = path  # unchanged: let ONNX Runtime read the file itself
        if inputs[0][1][2:] != [input_size, input_size]:
            make_spatial_dims_symbolic(proto)
            source = proto
        threads = DEFAULT_THREADS if threads is None else threads
        self.session = onnx_session(source, "U²-Net", threads, origin=path)
        self.output_name = self.session.get_outputs()[0].name

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB (H, W, 3) -> float32 [1, 3, S, S]; /255 (the reference divides by the image
        max, which brightens dark photos unpredictably), then the spec's mean/std."""
        size = self.input_size
        shrink = max(image.shape[:2]) > size
        resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        x = (resized.astype(np.float32) / 255.0 - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None])

    def predict(self, image: np.ndarray) -> np.ndarray:
        raw = self.session.run([self.output_name], {self.input_name: self.preprocess(image)})[0][0, 0]
        saliency = normalize_min_max(raw)
        height, width = image.shape[:2]
        saliency = cv2.resize(saliency, (width, height), interpolation=cv2.INTER_LINEAR)
        return np.clip(saliency, 0.0, 1.0)

    def __repr__(self) -> str:
        return f"U2NetSaliency({str(self.files[0])!r}, input_size={self.input_size})"


# Below this fraction of confident pixels (network output > 0.5) there is no single salient object,
# e.g. a crate of apples. Measured on 126 in-store photos (every 14th of train): 6 crates had
# 0 to 0.3 % (one sticker or highlight), every photo with a subject had >= 1.8 %.
MIN_OBJECT_AREA = 0.005


def normalize_min_max(saliency: np.ndarray, min_area: float = MIN_OBJECT_AREA) -> np.ndarray:
    """Stretch to [0, 1] as the reference implementation does, but only when the network is
    confident about enough of the image: otherwise stretching would promote a sticker to "the
    object". The map is then all zeros and the localizer reports an explicit empty->full."""
    saliency = saliency.astype(np.float32)
    low, high = float(saliency.min()), float(saliency.max())
    if not np.isfinite(low) or not np.isfinite(high) or high - low < 1e-6:
        return np.zeros_like(saliency)
    if (saliency > 0.5).mean() < min_area:
        return np.zeros_like(saliency)
    return (saliency - low) / (high - low)
