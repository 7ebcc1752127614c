"""`python -m csearch.evaluate retrieval`: how often the right product comes back, and how fast.

    python -m csearch.evaluate retrieval --gallery train.txt --queries val.txt --out runs/ret
    python -m csearch.evaluate retrieval --index INDEX_DIR --queries val.txt --out runs/ret
    ... --ablate      # every module varied, one table (ablation.md / ablation.json)
    ... --figures     # the paper's Figures 9, 4 and 6 as PNGs

Relevance is "same product". Headline numbers never use the queries' labels: the search is
unrestricted unless a classifier (--classifier, or one recorded by --index) predicts the
category; the oracle category only appears as an ablation row. Every query runs through the
online path (decode, localize, embed, classify, search) one image at a time, so the latencies
are those of `csearch query`; the gallery is indexed once per setting and cached.

This module is the CLI layer (argparse, progress bars, tables); the work is in csearch.evaluation.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger("csearch")

HEADLINE_KEYS = ("recall@1", "recall@5", "recall@10", "recall@20", "map@10", "r_precision", "mrr")


# ----------------------------------------------------------------------------- arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `retrieval` subcommand's arguments (csearch.evaluate calls this)."""
    from .console import add_model_flags

    parser.add_argument("--gallery", metavar="SPEC", help="catalogue to search (folder, CSV manifest, "
                        "Grocery train.txt or classes.csv); not needed with --index")
    parser.add_argument("--queries", metavar="SPEC", required=True, help="labelled query images (same SPEC forms)")
    parser.add_argument("--out", metavar="DIR", required=True, help="writes retrieval.json, config.yaml, "
                        "ablation.{md,json}, figures/")
    parser.add_argument("--index", metavar="INDEX_DIR", help="reuse this index (its recorded models and "
                        "config) instead of indexing --gallery")
    parser.add_argument("--subset", metavar="TEXT", help="keep only gallery and query images whose path "
                        "contains TEXT (e.g. /Packages/)")
    parser.add_argument("--limit", type=int, help="only the first N queries (quick checks)")
    search = parser.add_argument_group("search")
    search.add_argument("--restrict", choices=["on", "off"], help="search only the predicted category "
                        "(needs --classifier; default on)")
    search.add_argument("--top-n", type=int, help="search the top-n predicted categories (default 1)")
    search.add_argument("--rerank", help="re-ranking of the top candidates: none | iou | fused | ... "
                        "(see csearch.search)")
    search.add_argument("--rerank-top", type=int, help="how many KNN candidates to re-rank")
    search.add_argument("--rerank-weight", type=float, help="weight of the shape term (fused methods)")
    run = parser.add_argument_group("run")
    run.add_argument("--ablate", action="store_true", help="also vary every module (ablation.md/.json)")
    run.add_argument("--figures", action="store_true", help="also draw Figures 9, 4 and 6 (figures/*.png)")
    run.add_argument("--cache-dir", metavar="DIR", help="feature/localization cache (default "
                     "$CSEARCH_EVAL_CACHE or ~/.cache/csearch/eval)")
    run.add_argument("--cached-queries", action="store_true", help="reuse cached query localizations "
                     "(fast reruns; the localize latency then measures a cache read)")
    run.add_argument("--workers", type=int, default=2, help="threads localizing the gallery (default 2)")
    run.add_argument("--json", action="store_true", help="print retrieval.json on stdout")
    add_model_flags(parser)


def config_from(args: argparse.Namespace):
    """The `csearch index` model flags plus the search flags, as one Config."""
    from .console import config_from_args
    from .config import merge

    flags = _search_flags(args)
    if args.top_n is not None:
        flags["classify.top_n"] = args.top_n
    return merge(config_from_args(args), flags)


def read_subset(spec: str, subset: Optional[str], limit: Optional[int] = None):
    """read_catalogue, filtered to paths containing `subset`, optionally the first `limit`."""
    from dataclasses import replace

    from .data import read_catalogue
    from .errors import CatalogueError

    catalogue = read_catalogue(spec)
    records = catalogue.records
    if subset:
        records = tuple(r for r in records if subset in r.path)
        if not records:
            raise CatalogueError(f"no image of {spec} has {subset!r} in its path (--subset)")
    if limit:
        records = records[:limit]
    return replace(catalogue, records=records)


# ----------------------------------------------------------------------------- headline


def open_gallery(args, config, cache_dir: Path):
    """The Engine evaluated: an existing --index (its recorded models and config; search flags
    still apply), or --gallery indexed into the cache with the configured models."""
    from .config import merge
    from .errors import CatalogueError
    from .evaluation.features import cached_models, gallery_index
    from .pipeline import Engine, load_models, resolve_config

    if args.index:
        ignored = [flag for flag in ("extractor", "extractor_weights", "localizer", "localizer_model", "matting",
                                     "matting_model", "classifier", "color", "image_size", "config")
                   if getattr(args, flag, None) is not None]
        if ignored:
            log.warning("--index uses the models and config it was built with; ignoring --%s",
                        ", --".join(f.replace("_", "-") for f in ignored))
        search = {k.split(".", 1)[1]: v for k, v in _search_flags(args).items()}
        engine = Engine.open(args.index, search_overrides=search)
        if args.top_n is not None:
            engine.config = merge(engine.config, {"classify.top_n": args.top_n})
        return engine
    if not args.gallery:
        raise CatalogueError("pass --gallery SPEC (or --index INDEX_DIR)")
    config = resolve_config(config)
    models = load_models(config)
    if models.classifier is None:
        log.info("no --classifier: the search is unrestricted. The best measured pipeline restricts it to "
                 "the category a classifier predicts (python -m csearch.train classifier; docs/results/retrieval.md)")
    gallery = read_subset(args.gallery, args.subset)
    log.info("gallery: %s", gallery.summary())
    with _bar(len(gallery.records), "gallery") as bar:
        store = gallery_index(gallery, config, cached_models(models, config, cache_dir), cache_dir,
                              progress=bar.update, workers=args.workers)
    return Engine(store, config, models)


def _search_flags(args) -> dict:
    flags = {"search.restrict": None if args.restrict is None else args.restrict == "on",
             "search.rerank": args.rerank, "search.rerank_top": args.rerank_top,
             "search.rerank_weight": args.rerank_weight}
    return {k: v for k, v in flags.items() if v is not None}


def run_queries(engine, queries, cache_dir: Path, read_cache: bool, progress=None):
    """Every query through the online path, one image at a time, timed per stage.

    Returns (QueryFeatures, per-query timings, per-query hits of the timed search)."""
    from .evaluation.features import QueryFeatures, cached_models, flush_caches
    from .evaluation.ranking import self_rows
    from .pipeline import embed_prepared, prepare_image, searched_categories
    from .preprocess import load_image

    config, store = engine.config, engine.store
    models = cached_models(engine.models, config, cache_dir, read=read_cache)
    excluded = self_rows(store, queries.records)
    vectors, masks, boxes, backends, probs, timings, hits_all = [], [], [], [], [], [], []
    for q, record in enumerate(queries.records):
        started = time.perf_counter()
        image = load_image(record.path, config.preprocess.max_pixels, config.preprocess.min_side)
        decoded = time.perf_counter()
        prepared = prepare_image(image, config, models.localizer, models.classifier)
        times = {"decode": (decoded - started) * 1e3, **prepared.timings_ms}
        started = time.perf_counter()
        vector = embed_prepared(models.extractor, [prepared], config)[0]
        times["embed"] = (time.perf_counter() - started) * 1e3
        prediction = None
        started = time.perf_counter()
        if models.classifier is not None:
            p = np.asarray(models.classifier.predict(prepared.classifier_input[None]), np.float32)[0]
            probs.append(p)
            prediction = _prediction(p, models.classifier.class_names, config.classify.top_n)
        times["classify"] = (time.perf_counter() - started) * 1e3
        categories = searched_categories(prediction, None, config)
        hits, search_times = engine.search(vector, prepared.mask, config.search.k, categories, config,
                                           exclude_ids=store.ids[excluded[q]], box=prepared.box)
        times.update(search_times)
        times["total"] = sum(times.values())
        vectors.append(vector)
        masks.append(prepared.mask)
        boxes.append(prepared.box)
        backends.append(prepared.localization.backend)
        timings.append(times)
        hits_all.append(hits)
        if progress:
            progress(1)
    flush_caches(models)
    features = QueryFeatures(
        list(queries.records), np.stack(vectors).astype(np.float32), np.stack(masks),
        np.stack(boxes).astype(np.float32), backends, np.stack(probs) if probs else None,
        list(models.classifier.class_names) if models.classifier is not None else None)
    return features, timings, hits_all


def _prediction(probs: np.ndarray, names, top_n: int):
    from .types import Prediction

    order = np.argsort(-probs, kind="stable")[: max(1, top_n)]
    top = tuple((names[i], float(probs[i])) for i in order)
    return Prediction(top[0][0], top[0][1], top)


def evaluate_headline(args, engine, cache_dir: Path) -> tuple[dict, object, object]:
    """Run the queries and score them; returns (report dict, QueryFeatures, Evaluation)."""
    from .evaluation.ranking import category_accuracy, rank_queries

    queries = read_subset(args.queries, args.subset, args.limit)
    log.info("queries: %s", queries.summary())
    with _bar(len(queries.records), "queries") as bar:
        features, timings, hits = run_queries(engine, queries, cache_dir, args.cached_queries, bar.update)
    restriction = "predicted" if features.probs is not None and engine.config.search.restrict else "off"
    evaluation = rank_queries(engine.store, features, engine.config, restriction)
    mismatches = _check_consistency(engine, evaluation, hits)
    latency = _latency(timings, evaluation.kept)
    report = {key: round(evaluation.metrics[key], 4) for key in HEADLINE_KEYS}
    report.update({
        "category_accuracy": category_accuracy(features),
        "latency_ms_p50": round(latency["total"]["p50"], 2),
        "latency_ms_p95": round(latency["total"]["p95"], 2),
        "n_queries": int(len(evaluation.kept)),
        "n_gallery": int(len(engine.store)),
        "n_queries_without_relevant": int(len(features) - len(evaluation.kept)),
        "restriction": restriction,
        "latency_ms": {k: {s: round(v, 2) for s, v in row.items()} for k, row in latency.items()},
        "latency_note": ("localize times are cache reads (--cached-queries)" if args.cached_queries
                         else "every query localized, embedded and searched live, one at a time"),
        "localization_fallbacks": int(sum("empty->full" in b for b in features.backends)),
        "top1_errors_in_query_category": top1_error_breakdown(engine.store, features, evaluation),
        "ranking_mismatches_vs_engine": mismatches,
        "gallery": str(args.index or args.gallery), "queries": str(args.queries), "subset": args.subset,
        "config": engine.config.to_dict(),
        "command": " ".join(sys.argv),
    })
    return report, features, evaluation


def top1_error_breakdown(store, features, evaluation) -> dict:
    """Of the queries whose first result is another product, how many got a product of their own
    category: shape (or category restriction) can only fix the others."""
    wrong = same = 0
    for q, ranking in zip(evaluation.kept, evaluation.rankings):
        if len(ranking) and store.products[ranking[0]] != features.records[q].product:
            wrong += 1
            same += store.categories[ranking[0]] == features.records[q].category
    return {"top1_errors": wrong, "same_category": same}


def _latency(timings, kept) -> dict:
    from .metrics import latency_percentiles

    return latency_percentiles([timings[q] for q in kept])


def _check_consistency(engine, evaluation, hits) -> int:
    """The evaluation's rankings must start with what Engine.search returned (ties aside)."""
    mismatches = 0
    for q, ranking in zip(evaluation.kept, evaluation.rankings):
        returned = [h.id for h in hits[q]]
        expected = [int(i) for i in engine.store.ids[ranking[: len(returned)]]]
        mismatches += returned != expected
    if mismatches:
        log.warning("%d queries: the evaluation's ranking differs from Engine.search's top-k (ties?)", mismatches)
    return mismatches


# ----------------------------------------------------------------------------- output


def format_table(report: dict) -> str:
    """The headline numbers and per-stage latency as a small text table."""
    lines = [f"retrieval: {report['n_queries']} queries vs {report['n_gallery']} gallery images "
             f"(restriction: {report['restriction']})"]
    for key in HEADLINE_KEYS + ("category_accuracy",):
        value = report.get(key)
        lines.append(f"  {key:<18} {'-' if value is None else f'{value:.4f}'}")
    lines.append(f"  {'stage':<18} {'p50 ms':>9} {'p95 ms':>9}")
    for stage, row in report["latency_ms"].items():
        lines.append(f"  {stage:<18} {row['p50']:9.2f} {row['p95']:9.2f}")
    return "\n".join(lines)


def _bar(total: int, desc: str):
    from .console import progress_bar

    return progress_bar(total, desc)


def run(args: argparse.Namespace) -> int:
    """The evaluation for parsed arguments (see `main` for the command line)."""
    from .config import save_config
    from .evaluation.features import default_cache_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    config = config_from(args)
    engine = open_gallery(args, config, cache_dir)
    report, features, evaluation = evaluate_headline(args, engine, cache_dir)
    (out / "retrieval.json").write_text(json.dumps(report, indent=1))
    save_config(engine.config, out / "config.yaml", extra={"command": " ".join(sys.argv)})
    print(format_table(report), file=sys.stderr)
    if args.ablate:
        from .evaluation.ablation import run_ablation

        run_ablation(args, engine.config, cache_dir, out)
    if args.figures:
        from .figures import draw_all

        draw_all(engine, features, evaluation, out / "figures", cache_dir)
    if args.json:
        stdout = getattr(args, "stdout", sys.stdout)
        stdout.write(json.dumps(report) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m csearch.evaluate retrieval",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m csearch.evaluate retrieval ARGS` (csearch.evaluate passes ARGS here) or
    `python -m csearch.retrieval_eval ARGS`: parse, run, one-line errors, stdout kept for --json."""
    from .console import quiet_frameworks, run_command

    quiet_frameworks()
    args = build_parser().parse_args(None if argv is None else list(argv))
    return run_command(run, args, "cached features are kept, rerun to resume")


if __name__ == "__main__":
    sys.exit(main())
