"""U²-Net / U²-Net-p salient object detection with ONNX Runtime.

The exported models take one input `input.1` of shape [1, 3, S, S] (RGB / 255, then ImageNet
mean/std) and return 7 side outputs [1, 1, S, S]; the first is the fused saliency map. The
published exports fix S = 320; to run another size the input/output dims are made symbolic in
memory (the network is fully convolutional), so no converted file is needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np

from ..errors import ModelMismatch, WeightsNotFound

INPUT_NAME = "input.1"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
# Measured on the 2-core dev box (docs/results/localize.md): one intra-op thread is as fast as
# two per image and leaves the other core to a second worker (the pipeline localizes in 2 threads).
DEFAULT_THREADS = 1

Shape = Sequence[object]  # ints for fixed dims, str/None for symbolic ones


def session_options(threads: Optional[int]):
    """Intra-op threads capped at the CPU count; no spinning, so idle threads don't steal the
    shared cores from other workers."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    threads = DEFAULT_THREADS if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    options.intra_op_num_threads = min(threads, os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def check_file(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFound(f"{what} model file not found: {path}")
    return path


def load_proto(path: Path, what: str):
    """Parse an ONNX file; anything unparsable is a ModelMismatch naming the file."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelMismatch(f"{path}: not an ONNX model (expected the {what} network): "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _dims(value_info) -> list[object]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value_info.type.tensor_type.shape.dim]


def graph_io(model) -> tuple[list[tuple[str, list]], list[tuple[str, list]]]:
    """(name, dims) of the graph's real inputs (initializers excluded) and of its outputs."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [(v.name, _dims(v)) for v in model.graph.input if v.name not in initializers]
    outputs = [(v.name, _dims(v)) for v in model.graph.output]
    return inputs, outputs


def dim_matches(dim: object, value: int) -> bool:
    """True when a dim equals value or is symbolic (unknown until run time)."""
    return not isinstance(dim, int) or dim in (0, value)


def check_u2net_io(inputs: list[tuple[str, Shape]], outputs: list[tuple[str, Shape]], path: Path) -> None:
    expected = f"one input {INPUT_NAME!r} [1,3,H,W] and a first output [N,1,H,W]"
    names = [name for name, _ in inputs]
    if len(inputs) != 1 or names[0] != INPUT_NAME:
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
    """

    name = "u2net"

    def __init__(self, model_path: str | Path, input_size: int = 320, threads: Optional[int] = None):
        import onnxruntime as ort

        if input_size < 32 or input_size % 32:
            raise ValueError(f"input_size must be a positive multiple of 32, got {input_size}")
        path = check_file(model_path, "U²-Net")
        self.files = [path.resolve()]
        self.input_size = int(input_size)
        model = load_proto(path, "U²-Net")
        inputs, outputs = graph_io(model)
        check_u2net_io(inputs, outputs, path)
        source: object = str(path)  # unchanged: let ONNX Runtime read the file itself
        if inputs[0][1][2:] != [input_size, input_size]:
            make_spatial_dims_symbolic(model)
            source = model.SerializeToString()
        try:
            self.session = ort.InferenceSession(source, session_options(threads), providers=providers())
        except Exception as exc:  # onnxruntime's errors (Fail, InvalidGraph...) derive from Exception only
            raise ModelMismatch(f"{path}: ONNX Runtime cannot load it as U²-Net: "
                                f"{str(exc).splitlines()[0]}") from None
        self.output_name = self.session.get_outputs()[0].name

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB (H, W, 3) -> float32 [1, 3, S, S]; /255 (the reference divides by the image
        max, which brightens dark photos unpredictably), then ImageNet mean/std."""
        size = self.input_size
        shrink = max(image.shape[:2]) > size
        resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        x = (resized.astype(np.float32) / 255.0 - MEAN) / STD
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None])

    def predict(self, image: np.ndarray) -> np.ndarray:
        raw = self.session.run([self.output_name], {INPUT_NAME: self.preprocess(image)})[0][0, 0]
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
