"""The `csearch` command: index | add | remove | query | serve | export | models | demo.

Only machine-readable output goes to stdout (`--json`); logs, progress bars and the models' own
chatter go to stderr. Every user error ends in one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import CSearchError

log = logging.getLogger("csearch")

EPILOG = "Config precedence: built-in defaults < --config FILE < --set KEY=VALUE < explicit flags."


# ----------------------------------------------------------------------------- plumbing


def quiet_frameworks() -> None:
    """Keep TensorFlow/Keras chatter off stdout and out of the user's way."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
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

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0, smoothing=0.1)


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
    from .models import names

    group = parser.add_argument_group("models and preprocessing")
    group.add_argument("--config", metavar="FILE", help="YAML config with sections preprocess/localize/embed/"
                       "classify/search (every key: docs/config.md)")
    group.add_argument("--set", metavar="KEY=VALUE", action="append", help="override any config key, e.g. "
                       "--set localize.band=21 (repeatable)")
    group.add_argument("--extractor", help=f"feature extractor (default efficientnet_lite0): one of "
                       f"{', '.join(names('backbone') + names('onnx_extractor'))}, or an exported .onnx file")
    group.add_argument("--extractor-weights", metavar="PATH|imagenet", help="extractor weights file, or "
                       "'imagenet' (looked up in $CSEARCH_HOME, then Keras' cache, then downloaded)")
    group.add_argument("--localizer", choices=["none", "classical", "u2net"],
                       help="object localization backend (default u2net)")
    group.add_argument("--localizer-model", metavar="PATH", help="U²-Net / U²-Net-p ONNX file "
                       "(default: u2netp.onnx in $CSEARCH_HOME)")
    group.add_argument("--matting", choices=["none", "pymatting", "fba"],
                       help="alpha matting refinement of the saliency map (default none: pymatting "
                       "showed no retrieval gain here; the paper used FBA)")
    group.add_argument("--matting-model", metavar="PATH", help="FBA matting ONNX file, for --matting fba")
    group.add_argument("--classifier", metavar="RUN_DIR", help="trained category classifier "
                       "(python -m csearch.train classifier); queries then search only the predicted category")
    group.add_argument("--color", choices=["rgb", "gray"], help="extractor input colour (default rgb; the "
                       "paper used gray)")
    group.add_argument("--image-size", type=int, help="extractor input side in px (default 224)")
    group.add_argument("--batch-size", type=int, help="extractor batch size (default 32)")


def config_from_args(args: argparse.Namespace):
    from .config import load_config

    flags = {
        "embed.extractor": getattr(args, "extractor", None),
        "embed.weights": getattr(args, "extractor_weights", None),
        "embed.batch_size": getattr(args, "batch_size", None),
        "localize.backend": getattr(args, "localizer", None),
        "localize.model": getattr(args, "localizer_model", None),
        "localize.matting": getattr(args, "matting", None),
        "localize.matting_model": getattr(args, "matting_model", None),
        "classify.classifier": getattr(args, "classifier", None),
        "preprocess.color": getattr(args, "color", None),
        "preprocess.image_size": getattr(args, "image_size", None),
    }
    overrides = {**parse_sets(getattr(args, "set", None)), **{k: v for k, v in flags.items() if v is not None}}
    return load_config(getattr(args, "config", None), overrides)


def command_line(args: argparse.Namespace) -> str:
    """How this command was invoked, as a user would retype it."""
    return " ".join(["csearch", *args.argv])


def report_failures(failures, limit: int = 20) -> None:
    if not failures:
        return
    log.warning("%d image(s) skipped:", len(failures))
    for path, reason in list(failures)[:limit]:
        log.warning("  %s: %s", path, reason.replace(f"{path}: ", ""))
    if len(failures) > limit:
        log.warning("  ... and %d more", len(failures) - limit)


# ----------------------------------------------------------------------------- commands


def cmd_index(args) -> int:
    from .config import save_config
    from .data import read_catalogue
    from .pipeline import build_index

    config = config_from_args(args)
    catalogue = read_catalogue(args.catalogue)
    log.info("catalogue: %s", catalogue.summary())
    with progress_bar(len(catalogue.records), "indexing") as bar:
        report = build_index(catalogue, config, args.out, overwrite=args.overwrite, progress=bar.update,
                             workers=args.workers)
    report_failures(report.failures)
    save_config(report.config, Path(args.out) / "config.yaml", extra={"command": command_line(args)})
    log.info("indexed %d image(s) into %s in %.1f s (%.2f img/s)%s", report.added, args.out, report.seconds,
             report.images_per_second,
             f"; {report.skipped_existing} already indexed (resumed)" if report.skipped_existing else "")
    if args.json:
        args.stdout.write(json.dumps({"index": str(Path(args.out).resolve()), "added": report.added,
                                      "resumed": report.skipped_existing, "failed": len(report.failures),
                                      "seconds": round(report.seconds, 3)}) + "\n")
    return 0


def cmd_add(args) -> int:
    from .data import read_catalogue
    from .pipeline import Engine

    engine = Engine.open(args.index)
    catalogue = read_catalogue(args.catalogue)
    known = set(engine.store.paths)
    records = [r for r in catalogue.records if str(Path(r.path).resolve()) not in known]
    log.info("catalogue: %s; %d new", catalogue.summary(), len(records))
    with progress_bar(len(records), "adding") as bar:
        added, failures = engine.add(records, progress=bar.update)
    report_failures(list(failures) + list(catalogue.skipped))
    log.info("added %d image(s); the index now holds %d", added, len(engine.store))
    if args.json:
        args.stdout.write(json.dumps({"added": added, "failed": len(failures), "items": len(engine.store)}) + "\n")
    return 0


def cmd_remove(args) -> int:
    from .store import IndexStore

    store = IndexStore.open(args.index)
    removed = store.remove(args.ids)
    log.info("removed %d item(s); the index now holds %d", removed, len(store))
    if args.json:
        args.stdout.write(json.dumps({"removed": removed, "items": len(store)}) + "\n")
    return 0


def cmd_query(args) -> int:
    from .pipeline import Engine

    overrides = {"k": args.k, "rerank": args.rerank, "rerank_top": args.rerank_top,
                 "restrict": None if args.restrict is None else args.restrict == "on"}
    overrides.update({k.split(".", 1)[1]: v for k, v in parse_sets(args.set).items() if k.startswith("search.")})
    engine = Engine.open(args.index, search_overrides=overrides)
    result = engine.query(args.image, category=args.category)
    if args.json:
        args.stdout.write(json.dumps(result.to_dict()) + "\n")
    else:
        print_result(result, args.stdout)
    return 0


def print_result(result, out) -> None:
    out.write(f"category: {result.category or '(all)'}\n")
    out.write(f"{'#':>2}  {'id':>6}  {'distance':>8}  {'iou':>5}  {'score':>7}  product / path\n")
    for rank, hit in enumerate(result.hits, 1):
        iou = "-" if hit.iou is None else f"{hit.iou:.3f}"
        out.write(f"{rank:>2}  {hit.id:>6}  {hit.distance:8.4f}  {iou:>5}  {hit.score:7.4f}  "
                  f"{hit.product} ({hit.category})  {hit.path}\n")
    timings = ", ".join(f"{k} {v:.0f}" for k, v in result.timings_ms.items())
    out.write(f"timings (ms): {timings}\n")


def cmd_models(args) -> int:
    from .models import csearch_home, describe_models

    rows = describe_models()
    if args.json:
        args.stdout.write(json.dumps(rows, default=str) + "\n")
        return 0
    out = args.stdout
    out.write(f"weights are looked up in: explicit path > $CSEARCH_HOME ({csearch_home()}) > Keras' cache\n")
    for row in rows:
        status = f"found: {row['found']}" if row.get("found") else f"missing: put {row.get('weights_file')} in {csearch_home()}"
        out.write(f"{row['name']:<18} {row['role']:<15} {status}\n")
    return 0


def cmd_export(args) -> int:
    target = Path(args.target)
    if target.is_dir():
        from .classify import export_classifier

        path, diff = export_classifier(target, fmt=args.format)
    else:
        from .export import export_extractor

        out = Path(args.out or f"{args.target}.onnx")
        path, diff = export_extractor(args.target, args.weights, out)
    log.info("exported %s (max |onnxruntime - keras| = %.2e)", path, diff)
    if args.json:
        args.stdout.write(json.dumps({"path": str(path), "max_abs_diff": float(diff)}) + "\n")
    return 0


def cmd_serve(args) -> int:
    from .serve import run_server

    run_server(args.index, host=args.host, port=args.port, workers=args.workers, queue_limit=args.queue_limit,
               max_upload_bytes=int(args.max_upload_mb * 1024 * 1024))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), config_from_args(args), args.stdout)
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csearch", description="Find the same product in a catalogue from one photo "
        "(U²-Net localization, category restriction, exact KNN, mask-IoU re-ranking).", epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("index", help="offline stage: index a catalogue", epilog=EPILOG,
                       description="Localize every catalogue image, extract its feature vector and mask, "
                       "and store them with category and product in INDEX_DIR. Interrupted runs resume "
                       "when rerun with the same --out.")
    p.add_argument("catalogue", metavar="CATALOGUE", help="folder ROOT/<category>/[<product>/]<image>, a CSV "
                   "manifest (path,category,product) or a Grocery Store list file (see data_README.md)")
    p.add_argument("--out", required=True, metavar="INDEX_DIR", help="index directory to create (or resume)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    p.add_argument("--workers", type=int, default=2, help="threads decoding and localizing (default 2)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    add_model_flags(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("add", help="add catalogue images to an existing index (no rebuild)")
    p.add_argument("index", metavar="INDEX_DIR")
    p.add_argument("catalogue", metavar="CATALOGUE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("remove", help="remove items from an index by id")
    p.add_argument("index", metavar="INDEX_DIR")
    p.add_argument("ids", metavar="ID", nargs="+", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("query", help="online stage: find the catalogue items matching a photo",
                       description="Uses the models the index recorded; no model flags needed.")
    p.add_argument("index", metavar="INDEX_DIR")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("-k", type=int, help="number of results (default: the index's search.k, 5)")
    p.add_argument("--category", help="search this category instead of the predicted one")
    p.add_argument("--restrict", choices=["on", "off"], help="restrict to the predicted category (needs an "
                   "index built with --classifier)")
    p.add_argument("--rerank", choices=["none", "iou", "iou_crop", "fused", "fused_crop"],
                   help="re-rank the top candidates by mask IoU (the paper: iou)")
    p.add_argument("--rerank-top", type=int, help="how many KNN candidates to re-rank")
    p.add_argument("--set", metavar="search.KEY=VALUE", action="append", help="override a search setting")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("serve", help="HTTP API and web page for the online stage")
    p.add_argument("index", metavar="INDEX_DIR")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=2, help="search workers, each with its own model copies "
                   "(default 2)")
    p.add_argument("--queue-limit", type=int, default=32, help="requests that may wait for a worker before "
                   "new ones get 503 (default 32)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="upload size limit in MB (default 10)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="export a classifier RUN_DIR or a registered extractor to ONNX")
    p.add_argument("target", metavar="RUN_DIR|EXTRACTOR")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--weights", default="imagenet", help="extractor weights (for a registered extractor)")
    p.add_argument("--out", help="output file (extractor export)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("models", help="list the model registry and where each model's weights are")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="generate a small demo catalogue, index it and run a few queries")
    p.add_argument("--out", default="csearch-demo", help="folder for the demo catalogue and index")
    add_model_flags(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_frameworks()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except CSearchError as exc:
        parser.error(str(exc))
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    return run_command(args.func, args, "what was committed is safe (rerun `csearch index` to resume)")


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

if __name__ == "__main__":
    sys.exit(main())
