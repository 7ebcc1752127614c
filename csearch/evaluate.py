"""`python -m csearch.evaluate classifier|retrieval`: metrics, tables and figures.

    python -m csearch.evaluate classifier --model RUN_DIR [--model RUN_DIR2 ...] --data SPEC --out DIR
    python -m csearch.evaluate retrieval --gallery train.txt --queries val.txt --out runs/ret
    python -m csearch.evaluate retrieval --index INDEX_DIR --queries val.txt --out runs/ret
    ... retrieval --ablate      # every module varied, one table (ablation.md / ablation.json)
    ... retrieval --figures     # the paper's Figures 9, 4 and 6 as PNGs

This module is the command line only (arguments, progress bars, output files); the work is in
csearch.evaluation: classifier.py (Tables 1-2, Figures 7-8; metrics in confusion.py) and
retrieval.py (the headline; ablation.py, figures.py for --ablate, --figures).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from .classify import RUNTIMES
from .console import add_model_flags, config_from_args, progress_bar, quiet_frameworks, run_command

log = logging.getLogger("csearch.evaluate")

RETRIEVAL_DESCRIPTION = """Retrieval metrics: how often the right product comes back, and how fast.

Relevance is "same product". Headline numbers never use the queries' labels: the search is
unrestricted unless a classifier (--classifier, or one recorded by --index) predicts the
category; the oracle category only appears as an ablation row. Every query runs through the
online path (decode, localize, embed, classify, search) one image at a time, so the latencies
are those of `csearch query`; the gallery is indexed once per setting and cached."""
# flags that choose models or features: an --index has its own
MODEL_FLAGS = (
    "extractor",
    "extractor_weights",
    "localizer",
    "localizer_model",
    "matting",
    "matting_model",
    "classifier",
    "embedder",
    "color",
    "image_size",
    "config",
)


# ----------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m csearch.evaluate", description="Evaluate a classifier or the retrieval engine."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser(
        "classifier",
        help="Tables 1-2 and Figures 7-8 for one or more classifier runs",
        description="Classify every image of --data with each --model and write to --out, per model: accuracy, "
        "average (per-category) accuracy, the paper's Tables 1-2, Figures 7-8 (training history, confusion "
        "matrix) and every prediction.",
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="RUN_DIR",
        help="a RUN_DIR of python -m csearch.train classifier (repeat to compare)",
    )
    p.add_argument("--data", required=True, metavar="SPEC", help="labelled catalogue to report on")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for classification.json, tables and figures")
    p.add_argument(
        "--runtime",
        "--backend",  # its name before 0.2, kept so existing commands keep working
        dest="runtime",
        default="auto",
        choices=RUNTIMES,
        help="what runs the model: auto (ONNX when a current export exists, else Keras), keras or onnx (default auto)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    p.add_argument("--json", action="store_true", help="print classification.json(s) on stdout")
    p.set_defaults(func=run_classifier, on_interrupt="nothing was written that a rerun would not redo")
    r = sub.add_parser(
        "retrieval",
        help="retrieval metrics, --ablate, --figures",
        description=RETRIEVAL_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_retrieval_arguments(r)
    r.set_defaults(func=run_retrieval, on_interrupt="cached features are kept, rerun to resume")
    return parser


def add_retrieval_arguments(parser: argparse.ArgumentParser) -> None:
    from .config import allowed_values, default_value

    parser.add_argument(
        "--gallery",
        metavar="SPEC",
        help="catalogue to search (folder, CSV manifest, Grocery train.txt or classes.csv); not needed with --index",
    )
    parser.add_argument("--queries", metavar="SPEC", required=True, help="labelled query images (same SPEC forms)")
    parser.add_argument(
        "--out", metavar="DIR", required=True, help="writes retrieval.json, config.yaml, ablation.{md,json}, figures/"
    )
    parser.add_argument(
        "--index",
        metavar="INDEX_DIR",
        help="reuse this index (its recorded models and config) instead of indexing --gallery",
    )
    parser.add_argument(
        "--subset", metavar="TEXT", help="keep only gallery and query images whose path contains TEXT (e.g. /Packages/)"
    )
    parser.add_argument("--limit", type=int, help="only the first N queries (quick checks)")
    search = parser.add_argument_group("search")
    search.add_argument(
        "--restrict", choices=["on", "off"], help="search only the predicted category (needs --classifier; default on)"
    )
    search.add_argument(
        "--top-n", type=int, help=f"search the top-n predicted categories (default {default_value('classify.top_n')})"
    )
    search.add_argument(
        "--rerank",
        help=f"re-ranking of the top candidates: {' | '.join(allowed_values('search.rerank'))} "
        f"(default {default_value('search.rerank')}; docs/config.md)",
    )
    search.add_argument(
        "--rerank-top",
        type=int,
        help=f"how many KNN candidates to re-rank (default {default_value('search.rerank_top')})",
    )
    search.add_argument(
        "--rerank-weight",
        type=float,
        help=f"weight of the shape term of the fused methods (default {default_value('search.rerank_weight')})",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--ablate", action="store_true", help="also vary every module (ablation.md/.json)")
    run.add_argument("--figures", action="store_true", help="also draw Figures 9, 4 and 6 (figures/*.png)")
    run.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="feature/localization cache (default $CSEARCH_EVAL_CACHE or ~/.cache/csearch/eval)",
    )
    run.add_argument(
        "--cached-queries",
        action="store_true",
        help="reuse cached query localizations (fast reruns; the localize latency then measures a cache read)",
    )
    run.add_argument("--workers", type=int, default=2, help="threads localizing the gallery (default 2)")
    run.add_argument("--json", action="store_true", help="print retrieval.json on stdout")
    add_model_flags(parser)


def search_flags(args: argparse.Namespace) -> dict:
    flags = {
        "search.restrict": None if args.restrict is None else args.restrict == "on",
        "search.rerank": args.rerank,
        "search.rerank_top": args.rerank_top,
        "search.rerank_weight": args.rerank_weight,
    }
    return {k: v for k, v in flags.items() if v is not None}


def retrieval_config(args: argparse.Namespace):
    """The model flags plus the search flags, as one Config."""
    from .config import merge

    flags = search_flags(args)
    if args.top_n is not None:
        flags["classify.top_n"] = args.top_n
    return merge(config_from_args(args), flags)


# ----------------------------------------------------------------------------- classifier


def run_classifier(args: argparse.Namespace) -> int:
    from .evaluation.classifier import evaluate_classifiers

    results = evaluate_classifiers(args.model, args.data, args.out, args.runtime, args.batch_size)
    for result in results:
        log.info(
            "%s: top-1 accuracy %.4f, average accuracy %.4f on %d images -> %s",
            Path(result["model"]).name,
            result["accuracy"],
            result["average_accuracy"],
            result["n_images"],
            args.out,
        )
    if args.json:
        args.stdout.write(json.dumps(results if len(results) > 1 else results[0]) + "\n")
    return 0


# ----------------------------------------------------------------------------- retrieval


def open_engine(args: argparse.Namespace, config, cache_dir: Path):
    """The Engine evaluated: an existing --index (its recorded models and config; search flags
    still apply), or --gallery indexed into the cache with `config`'s models."""
    from .errors import CatalogueError
    from .evaluation.retrieval import gallery_engine, index_engine, read_subset

    if args.index:
        ignored = [flag for flag in MODEL_FLAGS if getattr(args, flag, None) is not None]
        if ignored:
            log.warning(
                "--index uses the models and config it was built with; ignoring --%s",
                ", --".join(f.replace("_", "-") for f in ignored),
            )
        search = {k.split(".", 1)[1]: v for k, v in search_flags(args).items()}
        return index_engine(args.index, search, args.top_n)
    if not args.gallery:
        raise CatalogueError("pass --gallery SPEC (or --index INDEX_DIR)")
    gallery = read_subset(args.gallery, args.subset)
    log.info("gallery: %s", gallery.summary())
    with progress_bar(len(gallery.records), "gallery") as bar:
        engine = gallery_engine(gallery, config, cache_dir, bar.update, args.workers)
    if engine.models.classifier is None and not engine.config.embed.embedder:
        log.info(
            "no --embedder: products are compared through ImageNet features. The best measured pipeline uses "
            "a product embedding learned from the catalogue (python -m csearch.train embedder; "
            "docs/results/embedder.md)"
        )
    return engine


def run_retrieval(args: argparse.Namespace) -> int:
    from .config import save_config
    from .errors import CatalogueError
    from .evaluation.features import default_cache_dir
    from .evaluation.retrieval import evaluate_headline, format_table, read_subset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    engine = open_engine(args, retrieval_config(args), cache_dir)  # the flags are checked even with --index
    queries = read_subset(args.queries, args.subset, args.limit)
    log.info("queries: %s", queries.summary())
    provenance = {"gallery": str(args.index or args.gallery), "queries": str(args.queries), "subset": args.subset}
    with progress_bar(len(queries.records), "queries") as bar:
        report, features, evaluation = evaluate_headline(
            engine, queries, cache_dir, args.cached_queries, bar.update, provenance
        )
    report["command"] = " ".join(sys.argv)
    (out / "retrieval.json").write_text(json.dumps(report, indent=1))
    save_config(engine.config, out / "config.yaml", extra={"command": " ".join(sys.argv)})
    print(format_table(report), file=sys.stderr)
    if args.ablate:
        from .evaluation.ablation import run_ablation

        if not args.gallery:
            raise CatalogueError("--ablate re-indexes the gallery per setting: pass --gallery SPEC")
        run_ablation(engine.config, read_subset(args.gallery, args.subset), queries, cache_dir, out, args.workers)
    if args.figures:
        from .evaluation.figures import draw_all

        draw_all(engine, features, evaluation, out / "figures", cache_dir)
    if args.json:
        args.stdout.write(json.dumps(report) + "\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_frameworks()
    args = build_parser().parse_args(None if argv is None else list(argv))
    return run_command(args.func, args, args.on_interrupt)


if __name__ == "__main__":
    sys.exit(main())
