"""Tiny ONNX graphs with the real models' interfaces, for tests that must not need weights.

- `u2net_onnx`: U²-Net(-p)'s signature (input `input.1` [1,3,S,S], 7 outputs [1,1,S,S]) whose
  fused saliency is a sigmoid of the pixel's distance from white, so a coloured object on white
  has a predictable map (`expected_u2net_saliency`).
- `fba_onnx`: FBA Matting's 4 inputs and [1,7,H,W] output; alpha is the trimap's foreground
  plus, in the unknown region, the same distance-from-white sigmoid. It fails on H or W not a
  multiple of 8, as the real network's strided layers would misalign.
- `classifier_onnx`: an unrelated model (input `input` -> [1,3]) for interface-mismatch tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 11  # the published U²-Net exports use opset 11
IR_VERSION = 7
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
GAIN, OFFSET = 20.0, 0.3  # sigmoid(GAIN * (sum(1 - rgb) - OFFSET)): white -> ~0, coloured -> ~1
U2NET_OUTPUTS = [str(n) for n in range(1959, 1966)]  # the real export's output names


def _const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="csearch-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def _whiteness_nodes(rgb: str, out: str) -> list[onnx.NodeProto]:
    """out = sigmoid(GAIN * (sum_c(1 - rgb) - OFFSET)), keepdims: [N,1,H,W]."""
    return [
        helper.make_node("Sub", ["one", rgb], [f"{out}_inv"]),
        helper.make_node("ReduceSum", [f"{out}_inv"], [f"{out}_d"], axes=[1], keepdims=1),
        helper.make_node("Sub", [f"{out}_d", "offset"], [f"{out}_c"]),
        helper.make_node("Mul", [f"{out}_c", "gain"], [f"{out}_z"]),
        helper.make_node("Sigmoid", [f"{out}_z"], [out]),
    ]


def _whiteness_constants() -> list[onnx.TensorProto]:
    return [_const("one", 1.0), _const("offset", OFFSET), _const("gain", GAIN)]


def u2net_onnx(path: Path, size: int = 320) -> Path:
    """U²-Net-signature model with fixed dims, like the published export (a stale fixed-size
    value_info included, which must be dropped to run other sizes)."""
    nodes = [
        helper.make_node("Mul", ["input.1", "std"], ["scaled"]),
        helper.make_node("Add", ["scaled", "mean"], ["rgb"]),
    ]
    nodes += _whiteness_nodes("rgb", U2NET_OUTPUTS[0])
    nodes += [helper.make_node("Identity", [U2NET_OUTPUTS[0]], [name]) for name in U2NET_OUTPUTS[1:]]
    graph = helper.make_graph(
        nodes,
        "u2net_like",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 1, size, size]) for name in U2NET_OUTPUTS],
        initializer=[
            _const("std", STD.reshape(1, 3, 1, 1)),
            _const("mean", MEAN.reshape(1, 3, 1, 1)),
            *_whiteness_constants(),
        ],
        value_info=[helper.make_tensor_value_info(f"{U2NET_OUTPUTS[0]}_d", TensorProto.FLOAT, [1, 1, size, size])],
    )
    return _save(graph, path)


def expected_u2net_saliency(rgb01: np.ndarray) -> np.ndarray:
    """What `u2net_onnx` outputs for an RGB image in [0, 1] (H, W, 3), before min-max scaling."""
    z = GAIN * ((1.0 - rgb01).sum(-1) - OFFSET)
    return 1.0 / (1.0 + np.exp(-z))


def fba_onnx(path: Path) -> Path:
    """FBA-signature model (dynamic H, W); alpha = fg + unknown * whiteness-sigmoid(image)."""
    dims = lambda c: [1, c, "height", "width"]  # noqa: E731
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, dims(c))
        for name, c in (("image", 3), ("two_chan_trimap", 2), ("image_n", 3), ("trimap_transformed", 6))
    ]
    nodes = [
        # identity only when H and W are multiples of 8, like the real network's stride
        helper.make_node("SpaceToDepth", ["image"], ["s2d"], blocksize=8),
        helper.make_node("DepthToSpace", ["s2d"], ["img"], blocksize=8),
        helper.make_node("Split", ["two_chan_trimap"], ["bg", "fg"], axis=1, split=[1, 1]),
        *_whiteness_nodes("img", "obj"),
        helper.make_node("Sub", ["one", "fg"], ["not_fg"]),
        helper.make_node("Sub", ["not_fg", "bg"], ["unknown"]),
        helper.make_node("Mul", ["unknown", "obj"], ["soft"]),
        helper.make_node("Add", ["fg", "soft"], ["alpha_raw"]),
        # consume the other two inputs without changing alpha
        helper.make_node("ReduceMean", ["trimap_transformed"], ["tt"], axes=[1], keepdims=1),
        helper.make_node("ReduceMean", ["image_n"], ["inn"], axes=[1], keepdims=1),
        helper.make_node("Add", ["tt", "inn"], ["extra"]),
        helper.make_node("Mul", ["extra", "zero"], ["nothing"]),
        helper.make_node("Add", ["alpha_raw", "nothing"], ["alpha"]),
        helper.make_node("Concat", ["alpha", "img", "img"], ["output"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "fba_like",
        inputs,
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, dims(7))],
        initializer=[*_whiteness_constants(), _const("zero", 0.0)],
    )
    return _save(graph, path)


def classifier_onnx(path: Path) -> Path:
    """An unrelated image classifier: input `input` [1,3,224,224] -> logits [1,3]."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["logits"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier_like",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
    )
    return _save(graph, path)
