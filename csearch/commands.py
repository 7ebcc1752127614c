"""The bodies of the `csearch` subcommands (csearch/cli.py builds the parser and dispatches here).

Each takes the parsed arguments, writes machine-readable output to `args.stdout` (only with
`--json`) and logs to stderr; user errors are CSearchError subclasses, which the runner prints as
one line (exit 2).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .console import (
    config_from_args,
    parse_sets,
    print_result,
    progress_bar,
    report_failures,
)
from .errors import CSearchError

log = logging.getLogger("csearch")


# ----------------------------------------------------------------------------- plumbing


def command_line(args: argparse.Namespace) -> str:
    """How this command was invoked, as a user would retype it."""
    return " ".join(["csearch", *args.argv])


# ----------------------------------------------------------------------------- commands


def cmd_index(args) -> int:
    from .config import save_config
    from .console import failure_summary
    from .data import read_catalogue
    from .errors import ImageError
    from .indexing import check_same_catalogue
    from .pipeline import build_index

    config = config_from_args(args)
    catalogue = read_catalogue(args.catalogue)
    if not args.overwrite:
        check_same_catalogue(Path(args.out), catalogue)  # before any model or progress bar
    adder = None
    if getattr(args, "ray", None) is not None:
        from .indexing_ray import ray_adder

        adder = ray_adder(args.ray)  # Ray installed, the address answers: checked before any model loads
    log.info("catalogue: %s", catalogue.summary())
    if not config.embed.embedder:
        log.info(
            "hint: a product embedding learned from your labels finds the right product far more often "
            "(docs/results/embedder.md): python -m csearch.train embedder --data CATALOGUE --out RUN_DIR, "
            "then index with --embedder RUN_DIR"
        )
    with progress_bar(len(catalogue.records), "indexing") as bar:
        report = build_index(
            catalogue,
            config,
            args.out,
            overwrite=args.overwrite,
            progress=bar.update,
            workers=args.workers,
            on_commit=lambda items: bar.set_postfix_str(f"{items} saved", refresh=False),
            adder=adder,
        )
    save_config(report.config, Path(args.out) / "config.yaml", extra={"command": command_line(args)})
    entries = len(catalogue.records) + len(catalogue.skipped)
    if report.failures and (args.strict or not report.items):
        # after indexing, on purpose: what could be indexed is kept, and a rerun resumes
        raise ImageError(
            f"{failure_summary(report.failures, entries, report.failures_file)}"
            + (" (--strict; the others are indexed)" if report.items else "")
        )
    report_failures(report.failures, entries, report.failures_file)
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
                    "failures_file": report.failures_file,
                    "items": report.items,
                    "seconds": round(report.seconds, 3),
                }
            )
            + "\n"
        )
    return 0


def cmd_list(args) -> int:
    from .store.open import open_store

    snapshot = open_store(args.index).snapshot
    items = [
        {"id": int(item_id), "product": product, "category": category, "path": path}
        for item_id, product, category, path in zip(
            snapshot.ids.tolist(), snapshot.products, snapshot.categories, snapshot.paths
        )
    ]
    if args.json:
        args.stdout.write(json.dumps({"items": items, "count": len(items)}) + "\n")
        return 0
    rows = [[str(i["id"]), i["product"] or "-", i["category"] or "-", i["path"]] for i in items]
    widths = [max(map(len, column)) for column in zip(["id", "product", "category", "path"], *rows)]
    for row in [["id", "product", "category", "path"], *rows]:
        cells = [row[0].rjust(widths[0]), row[1].ljust(widths[1]), row[2].ljust(widths[2]), row[3]]
        args.stdout.write("  ".join(cells) + "\n")
    log.info("%d item(s) in %s", len(items), args.index)
    return 0


def cmd_add(args) -> int:
    from .data import read_catalogue
    from .pipeline import Engine

    catalogue = read_catalogue(args.catalogue)  # checked before any model is loaded
    engine = Engine.open(args.index)
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
    from .store.open import open_store

    store = open_store(args.index)
    removed = store.remove(args.ids)
    log.info("removed %d item(s); the index now holds %d", removed, len(store))
    if args.json:
        args.stdout.write(json.dumps({"removed": removed, "items": len(store)}) + "\n")
    return 0


def cmd_optimize(args) -> int:
    from .errors import StoreError
    from .store import IndexStore
    from .store.ann import optimize
    from .store.open import is_local, store_uri

    uri = store_uri(args.index)
    if uri is not None and not is_local(uri):  # checked without connecting to Milvus
        raise StoreError(
            f"{args.index} keeps its items in {uri}: its ANN index is the collection's own (store.ann when it was "
            "built); csearch optimize builds the local store's"
        )
    store = IndexStore.open(args.index)
    summary = optimize(store, args.ann)
    if summary["ann"] == "none":
        log.info("%s has no ANN index (store.ann: none); every search is exact", args.index)
    else:
        log.info(
            "built the %s ANN index over %d item(s) in %.1f s: %s",
            summary["ann"],
            summary["items"],
            summary["seconds"],
            summary["file"],
        )
    if args.json:
        args.stdout.write(json.dumps({**summary, "seconds": round(summary["seconds"], 3)}) + "\n")
    return 0


def cmd_query(args) -> int:
    from .engine import Engine, query_settings
    from .errors import ImageError

    flags = {"k": args.k, "rerank": args.rerank, "rerank_top": args.rerank_top, "restrict": args.restrict}
    settings = query_settings(parse_sets(args.set), flags)  # judged before any model is loaded
    if not Path(args.image).is_file():
        raise ImageError(f"{args.image}: {'not a file' if Path(args.image).exists() else 'file not found'}")
    result = Engine.open(args.index).query(args.image, category=args.category, **settings)
    for hit in (hit for hit in result.hits if hit.missing):
        log.warning("hit %d: its catalogue image %s has gone (the hit is marked missing)", hit.id, hit.path)
    if args.json:
        args.stdout.write(json.dumps(result.to_dict()) + "\n")
    else:
        print_result(result, args.stdout)
    return 0


def cmd_models(args) -> int:
    from .models import csearch_home, describe_models, keras_cache_dir
    from .models.fetch import default_names

    rows, defaults = describe_models(), default_names()
    if args.json:
        rows = [{**row, "default": row["name"] in defaults} for row in rows]
        args.stdout.write(json.dumps(rows, default=str) + "\n")
        return 0
    out = args.stdout
    out.write(
        f"Model files are looked up in: a path you pass > $CSEARCH_HOME ({csearch_home()}) > Keras' cache "
        f"({keras_cache_dir()}).\n`csearch models fetch` gets the default models ({', '.join(defaults)}); "
        "`csearch models fetch NAME` any other.\n"
    )
    for row in rows:
        status = f"found: {row['found']}" if row["found"] else f"missing: {row['fetch']}"
        mark = "*" if row["name"] in defaults else " "
        out.write(f"{mark} {row['name']:<18} {row['role']:<15} {status}\n")
    out.write("(* the default models)\n")
    return 0


def cmd_models_fetch(args) -> int:
    from .models.fetch import fetch_models

    fetched = fetch_models(args.names, source=args.source, force=args.force)
    if args.json:
        args.stdout.write(json.dumps([f.to_dict() for f in fetched]) + "\n")
        return 0
    for f in fetched:
        args.stdout.write(f"{f.name}: {f.action} {f.path} (sha256 {f.sha256})\n")
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
    from .serve.auth import load_api_key

    if not args.max_upload_mb > 0:
        raise CSearchError(f"--max-upload-mb: must be a positive number of MiB, got {args.max_upload_mb}")
    api_key = load_api_key(args.api_key_file)  # from the environment or a file, never from argv
    run_server(
        args.index,
        host=args.host,
        port=args.port,
        workers=args.workers,
        queue_limit=args.queue_limit,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        api_key=api_key,
        read_only=args.read_only,
    )
    return 0


def cmd_demo(args) -> int:
    from .demo import demo_folder, run_demo

    config = config_from_args(args)  # a bad flag fails before any folder is made
    with demo_folder(args.out) as out:
        run_demo(out, config, args.stdout, embedder=not args.no_embedder)
    return 0


# ----------------------------------------------------------------------------- parser
