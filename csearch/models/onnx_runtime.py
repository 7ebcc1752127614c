"""The one place that opens ONNX files and builds onnxruntime sessions.

Every ONNX model in csearch (extractors, the U²-Net and FBA localizers, exported classifiers,
export checks) gets its session from `onnx_session`, so threading, providers and the one-line
errors for unreadable files are decided here once. onnx/onnxruntime are imported on first use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from ..errors import ConfigError, ModelMismatch, WeightsNotFound, one_line

ModelSource = Union[str, os.PathLike, bytes, "onnx.ModelProto"]  # noqa: F821 - onnx is imported lazily
Dims = list  # per dim: an int when fixed, a str/None when symbolic


def providers() -> list[str]:
    """CUDA first when this onnxruntime build has it (onnxruntime-gpu), CPU always."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def session_options(threads: Optional[int] = None):
    """All graph optimisations, and no spinning: a query runs several sessions in turn (localizer,
    extractor, classifier), and threads that spin-wait after one session's run steal the cores
    from the next (measured: docs/results/query_speed.md). Intra-op threads = cores when `threads`
    is None; with `threads`, capped at the CPU count, with one inter-op thread (the localizers run
    one session per worker thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings such as unused initializers are not the user's
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        if int(threads) < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads = min(int(threads), os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


def onnx_session(
    model: ModelSource,
    what: str = "an ONNX model",
    threads: Optional[int] = None,
    origin: Union[None, str, os.PathLike] = None,
):
    """An onnxruntime InferenceSession for a file path, serialized bytes or an in-memory ModelProto.

    A file onnxruntime cannot load is a one-line ModelMismatch naming `origin` (default: the
    path) and `what` the caller expected it to be.
    """
    import onnxruntime as ort

    if isinstance(model, (str, os.PathLike)):
        source, origin = str(model), origin or model
    else:
        source = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(source, session_options(threads), providers=providers())
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors (Fail, InvalidGraph...) derive from Exception only
        raise ModelMismatch(
            f"{origin or 'in-memory model'}: ONNX Runtime cannot load it as {what}: {one_line(exc, 160)}"
        ) from None


# --------------------------------------------------------------------------------------------
# Reading graphs (interface checks before a session is built)


def check_file(path: Union[str, os.PathLike], what: str) -> Path:
    """The path of an existing model file, else a WeightsNotFound naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFound(f"{what} model file not found: {path}")
    return path


def load_proto(path: Union[str, os.PathLike], what: str, load_external_data: bool = True):
    """Parse an ONNX file; anything unparsable is a one-line ModelMismatch naming the file."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ModelMismatch(f"{path}: not a readable ONNX file (expected {what}): {one_line(exc, 120)}") from None


def dims(value_info) -> Dims:
    """The shape of a graph input/output: ints for fixed dims, the symbol (or None) otherwise."""
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value_info.type.tensor_type.shape.dim
    ]


def graph_inputs(model) -> list:
    """The graph's real inputs (value_infos): old IRs list the weights (initializers) as inputs too."""
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def graph_io(model) -> tuple[list[tuple[str, Dims]], list[tuple[str, Dims]]]:
    """(name, dims) of the graph's real inputs and of its outputs."""
    return ([(v.name, dims(v)) for v in graph_inputs(model)], [(v.name, dims(v)) for v in model.graph.output])


def dim_matches(dim: object, value: int) -> bool:
    """True when a dim equals value or is symbolic (unknown until run time)."""
    return not isinstance(dim, int) or dim in (0, value)
