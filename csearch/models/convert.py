"""Building a model file that has no ready-made download, from its publisher's official release.

EfficientNet-Lite0 (the default extractor) is published by Google only as a TensorFlow
checkpoint plus TFLite files (`efficientnet-lite0.tar.gz`). `csearch models fetch` downloads that
archive and `convert` turns its fp32 TFLite file into the ONNX file csearch runs: input `input`
float32 [1, 3, 224, 224] ((x - 127) / 128, RGB), outputs `features` [1, 1280] (the pooled tensor
that feeds the classifier layer) and `logits` [1, 1000] (before the softmax).

A converted file cannot match a pinned sha256 (the converter's version changes the bytes), so
it is checked by its outputs instead: on a fixed input, ONNX Runtime must reproduce the TFLite
interpreter's pooled tensor and logits within TOLERANCE. The check, the source and the result's
sha256 go into the record that `fetch` writes beside the file (`<file>.json`).

TensorFlow and tf2onnx are imported inside the functions: only `csearch models fetch` loads
this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .. import __version__, errors
from .onnx_runtime import onnx_session
from .registry import ModelSpec
from .weights import file_sha256

OPSET = 17
TOLERANCE = 1e-3  # max abs difference allowed, relative to the reference's largest value (at least 1)
CHECK_SEED = 0
FEATURES, LOGITS, INPUT = "features", "logits", "input"  # the ONNX interface (registry: onnx_inputs/outputs)


@dataclass(frozen=True)
class Converted:
    """A built ONNX file (serialized) and the record of how it was made and checked."""

    data: bytes
    record: dict


def convert(spec: ModelSpec, archive: Path) -> Converted:
    """Build `spec.weights_file` from the downloaded `archive`; one-line errors on any failure."""
    converter = CONVERTERS.get(spec.converter or "")
    if converter is None:
        raise errors.ConfigError(f"no converter {spec.converter!r} (known: {', '.join(CONVERTERS)})")
    return converter(spec, archive)


def read_member(archive: Path, member: str) -> bytes:
    """One regular file out of a tar archive, read in memory (nothing is extracted to disk, so
    member paths cannot escape). `member` may also match by its base name when the archive
    lays its folder out differently."""
    try:
        with tarfile.open(archive) as tar:
            files = [m for m in tar.getmembers() if m.isfile()]
            found = [m for m in files if m.name.removeprefix("./") == member] or [
                m for m in files if Path(m.name).name == Path(member).name
            ]
            if len(found) != 1:
                listed = ", ".join(m.name for m in files if m.name.endswith(".tflite")) or "none"
                raise errors.ModelMismatch(f"{archive.name} has no single {member} (TFLite files in it: {listed})")
            return tar.extractfile(found[0]).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise errors.ModelMismatch(f"{archive}: not a readable tar archive: {errors.one_line(exc, 120)}") from None


# --------------------------------------------------------------------------------- EfficientNet-Lite


def convert_lite_tflite(spec: ModelSpec, archive: Path) -> Converted:
    """EfficientNet-Lite's fp32 TFLite file (inside the official archive) -> csearch's ONNX file."""
    tflite = read_member(archive, spec.archive_member or "")
    interpreter = tflite_interpreter(tflite)
    detail = interpreter.get_input_details()[0]
    want = [1, spec.input_size, spec.input_size, 3]
    if list(detail["shape"]) != want or detail["dtype"] != np.float32:
        raise errors.ModelMismatch(
            f"{spec.archive_member} takes {detail['dtype'].__name__} {list(detail['shape'])}, "
            f"expected float32 {want} (is it the fp32 file?)"
        )
    layer = classifier_layer(interpreter)
    model = tflite_to_onnx(tflite, detail["name"])
    bias = None if layer.bias is None else interpreter.get_tensor(layer.bias)
    set_interface(model, spec.dim, layer.classes, bias)
    model.doc_string = f"{spec.name}: {spec.archive_member} of {spec.url}, converted by csearch {__version__}"
    data = model.SerializeToString()
    diffs = check_outputs(data, interpreter, layer, spec)
    return Converted(data, provenance(spec, archive, tflite, diffs))


def tflite_interpreter(tflite: bytes):
    """A TFLite interpreter that keeps every tensor readable (no delegate fusing them away).
    LiteRT (`ai_edge_litert`) where installed, else TensorFlow's own `tf.lite`."""
    try:
        from ai_edge_litert import interpreter as lite
    except ImportError:
        with quiet_stderr():
            import tensorflow as tf
        lite = tf.lite
    resolver = getattr(lite, "OpResolverType", None) or lite.experimental.OpResolverType  # LiteRT's / TF's name
    try:
        with quiet_stderr():  # tf.lite.Interpreter's deprecation notice (LiteRT is used where installed)
            interpreter = lite.Interpreter(
                model_content=tflite,
                experimental_op_resolver_type=resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                experimental_preserve_all_tensors=True,
            )
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise errors.ModelMismatch(f"not a readable TFLite model: {errors.one_line(exc, 160)}") from None
    return interpreter


@dataclass(frozen=True)
class TfliteClassifier:
    """TFLite tensor indices around the classifier layer (the last FULLY_CONNECTED op; a softmax
    may follow it): its input is the pooled features, its output the logits."""

    features: int
    logits: int
    bias: Optional[int]  # None when the layer has no bias
    classes: int


def classifier_layer(interpreter) -> TfliteClassifier:
    layers = [op for op in interpreter._get_ops_details() if op["op_name"] == "FULLY_CONNECTED"]
    if not layers:
        raise errors.ModelMismatch("the TFLite model has no FULLY_CONNECTED (classifier) layer")
    inputs, logits = [int(i) for i in layers[-1]["inputs"]], int(layers[-1]["outputs"][0])
    shapes = {t["index"]: t["shape"] for t in interpreter.get_tensor_details()}
    bias = inputs[2] if len(inputs) > 2 and inputs[2] >= 0 else None
    return TfliteClassifier(inputs[0], logits, bias, int(shapes[logits][-1]))


def tflite_to_onnx(tflite: bytes, input_name: str):
    """tf2onnx's conversion, with the image input transposed to NCHW (the transposes it adds
    around each convolution then cancel out)."""
    try:
        with quiet_stderr():
            import tf2onnx
    except ImportError:
        raise errors.ConfigError("building this model needs tf2onnx: pip install 'tf2onnx>=1.17'") from None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.tflite"
        path.write_bytes(tflite)
        try:
            with quiet_stderr():
                model, _ = tf2onnx.convert.from_tflite(str(path), opset=OPSET, inputs_as_nchw=[input_name])
        except Exception as exc:  # noqa: BLE001 - tf2onnx raises bare Exceptions of many kinds
            raise errors.ModelMismatch(f"tf2onnx could not convert the TFLite model: {errors.one_line(exc)}") from None
    return model


def set_interface(model, dim: int, classes: int, bias: Optional[np.ndarray]) -> None:
    """Rename the image input to `input` and expose `features` (the classifier layer's input)
    and `logits` (its output, before any softmax) as the only graph outputs. `bias`: the TFLite
    classifier layer's bias, restored where tf2onnx dropped it (1.17 does when the layer's input
    has rank > 2, as after the release's 7x7 average pool; the output check would catch it)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    producers = {name: node for node in graph.node for name in node.output}
    constants = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}

    def data_input(node) -> str:  # the one input of `node` that is not a weight
        inputs = [name for name in node.input if name and name not in constants]
        if len(inputs) != 1:
            raise errors.ModelMismatch(f"unexpected classifier layer in the converted graph: {node.op_type}{inputs}")
        return inputs[0]

    logits = graph.output[0].name
    if producers[logits].op_type == "Softmax":
        logits = producers[logits].input[0]
    layer = producers[logits]
    if layer.op_type == "Add":  # MatMul + bias
        layer = producers[data_input(layer)]
    if layer.op_type not in ("MatMul", "Gemm"):
        raise errors.ModelMismatch(f"the converted graph ends in {layer.op_type}, not a classifier layer")
    features = data_input(layer)
    if bias is not None and layer.op_type == "MatMul" and logits == layer.output[0]:
        graph.initializer.append(numpy_helper.from_array(np.asarray(bias, np.float32).reshape(-1), "classifier_bias"))
        graph.node.append(helper.make_node("Add", [logits, "classifier_bias"], ["classifier_logits"]))
        logits = "classifier_logits"
    old_input = graph.input[0].name
    for node in graph.node:
        node.input[:] = [INPUT if name == old_input else name for name in node.input]
    graph.input[0].name = INPUT
    graph.node.extend(
        [helper.make_node("Identity", [features], [FEATURES]), helper.make_node("Identity", [logits], [LOGITS])]
    )
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, [1, dim]),
            helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, [1, classes]),
        ]
    )
    drop_unused_nodes(graph)


def drop_unused_nodes(graph) -> None:
    """Remove nodes nothing reads any more (the softmax once `logits` is the output)."""
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        unused = [node for node in graph.node if not any(name in used for name in node.output)]
        if not unused:
            return
        for node in unused:
            graph.node.remove(node)


def check_input(size: int) -> np.ndarray:
    """The fixed check input, as the model takes it: two seeded images (noise, and a smooth
    gradient with noise) scaled by (x - 127) / 128, NHWC."""
    rng = np.random.default_rng(CHECK_SEED)
    noise = rng.integers(0, 256, (size, size, 3))
    ramp = np.linspace(0, 255, size)[None, :, None] * np.ones((size, 1, 3)) * 0.8 + rng.integers(0, 50, (size, size, 3))
    return ((np.stack([noise, ramp]).astype(np.float32)) - 127) / 128


def check_outputs(data: bytes, interpreter, layer: TfliteClassifier, spec: ModelSpec) -> dict:
    """ONNX Runtime against the TFLite interpreter on the fixed input: the largest difference
    of each output, relative to the reference's scale; ModelMismatch past TOLERANCE."""
    session = onnx_session(data, f"the converted {spec.name}")
    batch = check_input(spec.input_size)
    input_index = interpreter.get_input_details()[0]["index"]
    diffs = {FEATURES: 0.0, LOGITS: 0.0}
    for image in batch:
        interpreter.set_tensor(input_index, image[None])
        interpreter.invoke()
        want = {FEATURES: interpreter.get_tensor(layer.features), LOGITS: interpreter.get_tensor(layer.logits)}
        got = dict(zip((FEATURES, LOGITS), session.run([FEATURES, LOGITS], {INPUT: image[None].transpose(0, 3, 1, 2)})))
        for key in diffs:
            reference = want[key].reshape(1, -1)
            if got[key].shape != reference.shape:
                raise errors.ModelMismatch(f"converted {key} has shape {got[key].shape}, TFLite {reference.shape}")
            scale = max(1.0, float(np.abs(reference).max()))
            diffs[key] = max(diffs[key], float(np.abs(got[key] - reference).max()) / scale)
    if got[FEATURES].shape[-1] != spec.dim:
        raise errors.ModelMismatch(f"converted features are {got[FEATURES].shape[-1]}-d, expected {spec.dim}")
    worst = max(diffs, key=diffs.get)
    if diffs[worst] > TOLERANCE:
        raise errors.ModelMismatch(
            f"the converted model's {worst} differ from the TFLite model's by {diffs[worst]:.2e} "
            f"(relative; tolerance {TOLERANCE:.0e})"
        )
    return diffs


def provenance(spec: ModelSpec, archive: Path, tflite: bytes, diffs: dict) -> dict:
    """How the file was made and checked (fetch adds the result's sha256 and writes it as JSON)."""
    import onnx
    import tensorflow as tf
    import tf2onnx

    return {
        "model": spec.name,
        "source": {
            "url": spec.url,
            "archive": archive.name,
            "archive_sha256": file_sha256(archive),
            "member": spec.archive_member,
            "member_sha256": hashlib.sha256(tflite).hexdigest(),
        },
        "check": {
            "reference": "TFLite interpreter on the release's own file",
            "input": f"2 fixed images (seed {CHECK_SEED}), (x - 127) / 128",
            "max_relative_diff": diffs,
            "tolerance": TOLERANCE,
        },
        "built_with": {
            "csearch": __version__,
            "tf2onnx": tf2onnx.__version__,
            "tensorflow": tf.__version__,
            "onnx": onnx.__version__,
            "opset": OPSET,
        },
    }


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """TensorFlow's C++ start-up lines (CUDA probing, oneDNN notes) go to fd 2 before any log
    level applies; tf2onnx and tf.lite add their own lines and deprecation warnings. Hidden
    here; failures still surface as exceptions (the progress bar is not running meanwhile)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


CONVERTERS = {"efficientnet_lite_tflite": convert_lite_tflite}
