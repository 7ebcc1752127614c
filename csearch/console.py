"""Console helpers shared by every entry point (csearch, python -m csearch.train / .evaluate).

Progress bars, the one-line error runner, `--set` parsing and result printing live here, so that
library modules never import the CLI. Only machine-readable output goes to stdout (`--json`);
logs, progress bars and the frameworks' own chatter go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Optional

from .errors import CSearchError

log = logging.getLogger("csearch")


def nvidia_driver_present() -> bool:
    """True when this machine exposes an NVIDIA driver (Linux device node, or WSL2's GPU bridge)."""
    return any(os.path.exists(node) for node in ("/dev/nvidiactl", "/dev/dxg"))


def quiet_frameworks() -> None:
    """Keep TensorFlow/Keras chatter off stdout and out of the user's way. Must run before
    TensorFlow is imported: its C++ logging reads TF_CPP_MIN_LOG_LEVEL once, at import.

    Without an NVIDIA driver, TensorFlow logs "failed call to cuInit" as an ERROR the first time
    it looks for a GPU, on every CPU-only machine, so its C++ errors are hidden there too (level 3;
    real failures still raise Python exceptions). With a driver that line means a broken CUDA
    setup, so level 2 keeps it. A value the user set is left alone."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if nvidia_driver_present() else "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)


@contextlib.contextmanager
def stdout_to_stderr():
    """Route everything written to fd 1 (Python or C libraries) to stderr while work runs, so
    `--json` output is the only thing on stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield os.fdopen(os.dup(saved), "w")
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def progress_bar(total: int, desc: str, unit: str = "img"):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
        smoothing=0.1,
    )


def parse_sets(values: Optional[Sequence[str]]) -> dict:
    overrides = {}
    for item in values or []:
        if "=" not in item:
            raise CSearchError(f"--set expects KEY=VALUE (e.g. search.rerank=iou), got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value.strip()
    return overrides


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the offline models (shared by index and evaluate retrieval)."""
    from .config import allowed_values
    from .models import names

    group = parser.add_argument_group("models and preprocessing")
    group.add_argument(
        "--config",
        metavar="FILE",
        help="YAML config with sections preprocess/localize/embed/classify/search (every key: docs/config.md)",
    )
    group.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        help="override any config key, e.g. --set localize.band=21 (repeatable)",
    )
    group.add_argument(
        "--extractor",
        help=f"feature extractor (default efficientnet_lite0): one of "
        f"{', '.join(names('backbone') + names('onnx_extractor'))}, or an exported .onnx file",
    )
    group.add_argument(
        "--extractor-weights",
        metavar="PATH|imagenet",
        help="extractor weights file, or 'imagenet' (looked up in $CSEARCH_HOME, then Keras' cache; "
        "get it with `csearch models fetch`)",
    )
    group.add_argument(
        "--localizer", choices=allowed_values("localize.method"), help="object localization backend (default u2net)"
    )
    group.add_argument(
        "--localizer-model", metavar="PATH", help="U²-Net / U²-Net-p ONNX file (default: u2netp.onnx in $CSEARCH_HOME)"
    )
    group.add_argument(
        "--matting",
        choices=allowed_values("localize.matting"),
        help="alpha matting refinement of the saliency map (default none: pymatting "
        "showed no retrieval gain here; the paper used FBA)",
    )
    group.add_argument("--matting-model", metavar="PATH", help="FBA matting ONNX file, for --matting fba")
    group.add_argument(
        "--embedder",
        metavar="RUN_DIR",
        help="learned product embedding (python -m csearch.train embedder): compares products by features "
        "learned from the catalogue's own labels instead of ImageNet features (it fixes the extractor and image size)",
    )
    group.add_argument(
        "--classifier",
        metavar="RUN_DIR",
        help="trained category classifier "
        "(python -m csearch.train classifier); queries then search only the predicted category",
    )
    group.add_argument(
        "--color",
        choices=allowed_values("preprocess.color"),
        help="extractor input colour (default rgb; the paper used gray)",
    )
    group.add_argument("--image-size", type=int, help="extractor input side in px (default 224)")
    group.add_argument("--batch-size", type=int, help="extractor batch size (default 32)")


def config_from_args(args: argparse.Namespace):
    from .config import load_config

    flags = {
        "embed.extractor": getattr(args, "extractor", None),
        "embed.weights": getattr(args, "extractor_weights", None),
        "embed.batch_size": getattr(args, "batch_size", None),
        "localize.method": getattr(args, "localizer", None),
        "localize.model": getattr(args, "localizer_model", None),
        "localize.matting": getattr(args, "matting", None),
        "localize.matting_model": getattr(args, "matting_model", None),
        "classify.classifier": getattr(args, "classifier", None),
        "embed.embedder": getattr(args, "embedder", None),
        "preprocess.color": getattr(args, "color", None),
        "preprocess.image_size": getattr(args, "image_size", None),
        "store.uri": getattr(args, "store", None),
    }
    overrides = {**parse_sets(getattr(args, "set", None)), **{k: v for k, v in flags.items() if v is not None}}
    return load_config(getattr(args, "config", None), overrides)


def failure_summary(failures, total: int, listing=None) -> str:
    """'3 of 120 images could not be indexed; see INDEX_DIR/failures.txt' (one line)."""
    text = f"{len(failures)} of {total} images could not be indexed"
    return f"{text}; see {listing}" if listing else text


def report_failures(failures, total: Optional[int] = None, listing=None, limit: int = 20) -> None:
    """Warn about images that could not be indexed: one line pointing to the file that lists
    them all (`listing`, e.g. INDEX_DIR/failures.txt) when there is one, else the first `limit`."""
    if not failures:
        return
    if listing is not None:
        log.warning("%s", failure_summary(failures, len(failures) if total is None else total, listing))
        return
    log.warning("%d image(s) skipped:", len(failures))
    for path, reason in list(failures)[:limit]:
        log.warning("  %s: %s", path, reason.replace(f"{path}: ", ""))
    if len(failures) > limit:
        log.warning("  ... and %d more", len(failures) - limit)


def print_result(result, out) -> None:
    out.write(f"category: {result.category or '(all)'}\n")
    out.write(f"{'#':>2}  {'id':>6}  {'distance':>8}  {'iou':>5}  {'score':>7}  product / path\n")
    for rank, hit in enumerate(result.hits, 1):
        iou = "-" if hit.iou is None else f"{hit.iou:.3f}"
        out.write(
            f"{rank:>2}  {hit.id:>6}  {hit.distance:8.4f}  {iou:>5}  {hit.score:7.4f}  "
            f"{hit.product} ({hit.category})  {hit.path}{'  (missing)' if hit.missing else ''}\n"
        )
    timings = ", ".join(f"{k} {v:.0f}" for k, v in result.timings_ms.items())
    out.write(f"timings (ms): {timings}\n")


def run_command(func, args: argparse.Namespace, on_interrupt: str) -> int:
    """Run a command with stdout reserved for its JSON, typed errors as one line (exit 2) and
    Ctrl-C as a one-line note (exit 130). Shared by every entry point."""
    try:
        with stdout_to_stderr() as real_stdout:
            args.stdout = real_stdout
            try:
                return func(args)
            finally:
                real_stdout.flush()
    except CSearchError as exc:
        print(f"csearch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"csearch: interrupted; {on_interrupt}", file=sys.stderr)
        return 130
