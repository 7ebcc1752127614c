"""The backbone's last feature map: an ONNX extractor cut just before its global pooling.

Regional pooling (R-MAC, GeM) needs the map, but an ONNX extractor such as EfficientNet-Lite0
outputs only the pooled vector. `write_trunk` finds the pooling node that produces the pooled
output (walking back through reshapes), extracts the sub-graph from the image input to that
node's input, and writes it as a new ONNX file (recorded by sha256 like any other model file).
`merge_head` joins such a trunk and an exported head into one image -> embedding model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ModelMismatch
from ..models.onnx_runtime import load_proto

PASS_THROUGH = {"Reshape", "Flatten", "Squeeze", "Identity", "Cast"}  # ops between the pooling and the output
POOLING = {"ReduceMean", "GlobalAveragePool"}


@dataclass(frozen=True)
class TrunkInfo:
    """Where a backbone's feature map is: the tensor, its layout and its shape per image."""

    input_name: str
    map_name: str
    layout: str  # nchw | nhwc
    channels: int
    height: int
    width: int


def _producers(graph) -> dict:
    return {output: node for node in graph.node for output in node.output}


def _reduce_axes(node, graph) -> Optional[tuple[int, ...]]:
    for attribute in node.attribute:
        if attribute.name == "axes":
            return tuple(attribute.ints)
    if len(node.input) > 1:  # opset >= 18: axes are an input (a constant initializer)
        from onnx import numpy_helper

        for init in graph.initializer:
            if init.name == node.input[1]:
                return tuple(int(a) for a in numpy_helper.to_array(init).reshape(-1))
        for other in graph.node:
            if node.input[1] in other.output and other.op_type == "Constant":
                return tuple(int(a) for a in numpy_helper.to_array(other.attribute[0].t).reshape(-1))
    return None


def find_feature_map(model, output_name: str) -> tuple[str, str]:
    """(the feature map tensor, its layout) that `output_name` global-pools."""
    graph = model.graph
    producers = _producers(graph)
    name = output_name
    for _ in range(16):
        node = producers.get(name)
        if node is None:
            break
        if node.op_type == "GlobalAveragePool":
            return node.input[0], "nchw"
        if node.op_type == "ReduceMean":
            axes = _reduce_axes(node, graph)
            if axes in ((2, 3), (-2, -1)):
                return node.input[0], "nchw"
            if axes in ((1, 2), (-3, -2)):
                return node.input[0], "nhwc"
            break
        if node.op_type not in PASS_THROUGH:
            break
        name = node.input[0]
    raise ModelMismatch(
        f"cannot find the global pooling that produces {output_name!r}: an embedder needs an extractor whose "
        f"output is a global average of its last feature map (efficientnet_lite0, or a `csearch export`ed backbone)"
    )


def write_trunk(source: Path, out: Path, input_name: Optional[str], output_name: Optional[str]) -> TrunkInfo:
    """Write the sub-graph image -> feature map of the ONNX extractor `source` to `out`
    (atomically), with a symbolic batch dim, and describe it."""
    import onnx
    import onnx.utils

    from ..store.durable import write_bytes_atomic

    model = load_proto(source, "an ONNX extractor")
    input_name = input_name or model.graph.input[0].name
    output_name = output_name or model.graph.output[0].name
    map_name, layout = find_feature_map(model, output_name)
    # the Extractor needs every tensor's shape (value_info), which exported files often omit
    trunk = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model)).extract_model([input_name], [map_name])
    for value in list(trunk.graph.input) + list(trunk.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    del trunk.graph.value_info[:]  # shapes inferred for batch 1 would contradict the symbolic batch
    shape = _probe_shape(trunk, input_name, map_name)  # static inference cannot follow computed pads
    channels, height, width = (shape[1], shape[2], shape[3]) if layout == "nchw" else (shape[3], shape[1], shape[2])
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, trunk.SerializeToString())
    return TrunkInfo(input_name, map_name, layout, int(channels), int(height), int(width))


def _probe_shape(trunk, input_name: str, map_name: str) -> tuple[int, ...]:
    from ..models.onnx_runtime import dims, onnx_session

    given = dims(next(v for v in trunk.graph.input if v.name == input_name))
    if not all(isinstance(d, int) and d > 0 for d in given[1:]):
        raise ModelMismatch(f"the extractor's input {input_name!r} has no fixed image size ({given})")
    session = onnx_session(trunk, "a backbone trunk", threads=1)
    probe = np.zeros([2] + given[1:], np.float32)
    try:
        return tuple(session.run([map_name], {input_name: probe})[0].shape)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types
        raise ModelMismatch(f"the backbone trunk does not run on a batch of two: {exc}".splitlines()[0]) from None


class TrunkRunner:
    """Runs a trunk file: preprocessed float32 images -> float32 feature maps, `batch` at a time."""

    def __init__(self, path: Path, info: TrunkInfo, threads: Optional[int] = None):
        from ..models.onnx_runtime import onnx_session

        self.info = info
        self.session = onnx_session(str(path), "a backbone trunk", threads=threads)

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        return self.session.run([self.info.map_name], {self.info.input_name: np.ascontiguousarray(inputs)})[0]


def merge_head(trunk_path: Path, head_path: Path, info: TrunkInfo, out: Path, metadata: dict) -> None:
    """One ONNX model image -> embedding: the trunk, then the head exported from Keras (its one
    input takes the feature map in the trunk's layout). Written atomically, with `metadata`."""
    import onnx
    import onnx.compose

    from ..store.durable import write_bytes_atomic

    trunk = load_proto(trunk_path, "a backbone trunk")
    head = onnx.compose.add_prefix(load_proto(head_path, "an embedding head"), "head/")
    head_opset = max(o.version for o in head.opset_import if o.domain in ("", "ai.onnx"))
    trunk_opset = max(o.version for o in trunk.opset_import if o.domain in ("", "ai.onnx"))
    if trunk_opset != head_opset:
        from onnx import version_converter

        trunk = version_converter.convert_version(trunk, head_opset)
    trunk.ir_version = head.ir_version = max(trunk.ir_version, head.ir_version)
    merged = onnx.compose.merge_models(
        trunk, head, io_map=[(info.map_name, head.graph.input[0].name)], outputs=[head.graph.output[0].name]
    )
    del merged.metadata_props[:]
    for key, value in metadata.items():
        entry = merged.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.checker.check_model(merged)
    write_bytes_atomic(out, merged.SerializeToString())
