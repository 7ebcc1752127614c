"""The `csearch` command: index | add | remove | query | serve | export | models | demo.

Only machine-readable output goes to stdout (`--json`); logs, progress bars and the models' own
chatter go to stderr. Every user error ends in one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from .console import (
    add_model_flags,
    config_from_args,
    parse_sets,
    print_result,
    progress_bar,
    quiet_frameworks,
    report_failures,
    run_command,
)
from .errors import CSearchError

log = logging.getLogger("csearch")

EPILOG = "Config precedence: built-in defaults < --config FILE < --set KEY=VALUE < explicit flags."


# ----------------------------------------------------------------------------- plumbing


def command_line(args: argparse.Namespace) -> str:
    """How this command was invoked, as a user would retype it."""
    return " ".join(["csearch", *args.argv])


# ----------------------------------------------------------------------------- commands


def cmd_index(args) -> int:
    from .config import save_config
    from .data import read_catalogue
    from .pipeline import build_index

    config = config_from_args(args)
    catalogue = read_catalogue(args.catalogue)
    log.info("catalogue: %s", catalogue.summary())
    with progress_bar(len(catalogue.records), "indexing") as bar:
        report = build_index(
            catalogue, config, args.out, overwrite=args.overwrite, progress=bar.update, workers=args.workers
        )
    report_failures(report.failures)
    save_config(report.config, Path(args.out) / "config.yaml", extra={"command": command_line(args)})
    log.info(
        "indexed %d image(s) into %s in %.1f s (%.2f img/s)%s",
        report.added,
        args.out,
        report.seconds,
        report.images_per_second,
        f"; {report.skipped_existing} already indexed (resumed)" if report.skipped_existing else "",
    )
    if args.json:
        args.stdout.write(
            json.dumps(
                {
                    "index": str(Path(args.out).resolve()),
                    "added": report.added,
                    "resumed": report.skipped_existing,
                    "failed": len(report.failures),
                    "seconds": round(report.seconds, 3),
                }
            )
            + "\n"
        )
    return 0


def cmd_add(args) -> int:
    from .data import read_catalogue
    from .pipeline import Engine

    engine = Engine.open(args.index)
    catalogue = read_catalogue(args.catalogue)
    known = set(engine.store.snapshot.paths)
    records = [r for r in catalogue.records if str(Path(r.path).resolve()) not in known]
    log.info("catalogue: %s; %d new", catalogue.summary(), len(records))
    with progress_bar(len(records), "adding") as bar:
        ids, failures = engine.add(records, progress=bar.update)
    report_failures(list(failures) + list(catalogue.skipped))
    items = len(engine.store.snapshot)
    log.info("added %d image(s); the index now holds %d", len(ids), items)
    if args.json:
        args.stdout.write(json.dumps({"added": len(ids), "failed": len(failures), "items": items}) + "\n")
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

    overrides = {
        "k": args.k,
        "rerank": args.rerank,
        "rerank_top": args.rerank_top,
        "restrict": None if args.restrict is None else args.restrict == "on",
    }
    overrides.update({k.split(".", 1)[1]: v for k, v in parse_sets(args.set).items() if k.startswith("search.")})
    engine = Engine.open(args.index, search_overrides=overrides)
    result = engine.query(args.image, category=args.category)
    if args.json:
        args.stdout.write(json.dumps(result.to_dict()) + "\n")
    else:
        print_result(result, args.stdout)
    return 0


def cmd_models(args) -> int:
    from .models import csearch_home, describe_models

    rows = describe_models()
    if args.json:
        args.stdout.write(json.dumps(rows, default=str) + "\n")
        return 0
    out = args.stdout
    out.write(f"weights are looked up in: explicit path > $CSEARCH_HOME ({csearch_home()}) > Keras' cache\n")
    for row in rows:
        status = (
            f"found: {row['found']}"
            if row.get("found")
            else f"missing: put {row.get('weights_file')} in {csearch_home()}"
        )
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

    run_server(
        args.index,
        host=args.host,
        port=args.port,
        workers=args.workers,
        queue_limit=args.queue_limit,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
    )
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), config_from_args(args), args.stdout)
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from .config import allowed_values

    parser = argparse.ArgumentParser(
        prog="csearch",
        description="Find the same product in a catalogue from one photo "
        "(U²-Net localization, category restriction, exact KNN, mask-IoU re-ranking).",
        epilog=EPILOG,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "index",
        help="offline stage: index a catalogue",
        epilog=EPILOG,
        description="Localize every catalogue image, extract its feature vector and mask, "
        "and store them with category and product in INDEX_DIR. Interrupted runs resume "
        "when rerun with the same --out.",
    )
    p.add_argument(
        "catalogue",
        metavar="CATALOGUE",
        help="folder ROOT/<category>/[<product>/]<image>, a CSV "
        "manifest (path,category,product) or a Grocery Store list file (see data_README.md)",
    )
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

    p = sub.add_parser(
        "query",
        help="online stage: find the catalogue items matching a photo",
        description="Uses the models the index recorded; no model flags needed.",
    )
    p.add_argument("index", metavar="INDEX_DIR")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("-k", type=int, help="number of results (default: the index's search.k, 5)")
    p.add_argument("--category", help="search this category instead of the predicted one")
    p.add_argument(
        "--restrict",
        choices=["on", "off"],
        help="restrict to the predicted category (needs an index built with --classifier)",
    )
    p.add_argument(
        "--rerank",
        choices=allowed_values("search.rerank"),
        help="re-rank the top candidates by mask IoU (the paper: iou)",
    )
    p.add_argument("--rerank-top", type=int, help="how many KNN candidates to re-rank")
    p.add_argument("--set", metavar="search.KEY=VALUE", action="append", help="override a search setting")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("serve", help="HTTP API and web page for the online stage")
    p.add_argument("index", metavar="INDEX_DIR")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=2, help="search workers, each with its own model copies (default 2)")
    p.add_argument(
        "--queue-limit",
        type=int,
        default=32,
        help="requests that may wait for a worker before new ones get 503 (default 32)",
    )
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


if __name__ == "__main__":
    sys.exit(main())
