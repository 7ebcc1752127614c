"""`--ablate`: the same queries with one module varied at a time, around the evaluated pipeline.

Groups: localization (none / classical / u2net / u2net + matting, and the box crop), category
restriction (off / predicted top-1 / top-n / oracle), re-ranking (the paper's IoU at several
top-N, the library's cropped and fused variants, and the experimental shape re-rankers of
shape.py with weights tuned on the gallery by leave-one-out), views (the object cut-out alone,
or next to the whole photo: embed.views), colour, extractor, and the plain KNN
baseline. Features are computed once per feature setting (features.py), so a search-only
row costs a second or two.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from ..config import Config, merge
from ..errors import CatalogueError
from .cache import settings_digest
from .features import (
    default_cache_dir,
    gallery_index,
    localize_settings,
    query_features,
    query_settings,
    store_as_queries,
)
from .ranking import Reranker, category_accuracy, rank_queries
from .shape import make_reranker

log = logging.getLogger("csearch")

METRIC_KEYS = ("recall@1", "recall@5", "recall@10", "recall@20", "map@10", "r_precision", "mrr")
EXTRACTORS = ("mobilenet", "mobilenetv2", "efficientnet_lite0")
PLAIN = {
    "localize.method": "none",
    "localize.matting": "none",
    "preprocess.color": "rgb",
    "preprocess.image_size": 224,
    "embed.extractor": "mobilenet",
    "embed.weights": "imagenet",
}
# weights tried per re-ranker (shape.py kinds, and the library's fused methods at small weights)
SHAPE_GRID = {
    "fused": (0.05, 0.1, 0.2, 0.3),
    "fused_crop": (0.05, 0.1, 0.2, 0.3),
    "aspect_fused": (0.1, 0.2, 0.3, 0.5),
    "iou_rrf": (0.25, 0.5, 1.0),
    "iou_gate": (0.02, 0.05, 0.1),
}
TUNE_DEPTH = 100  # ranks scored while tuning (Recall@1 and mAP@10 need 10)
TUNE_QUERIES = 1000  # at most this many gallery images query the rest while tuning


@dataclass(frozen=True)
class Variant:
    """One ablation row: overrides of the evaluated config, and how the search is restricted."""

    group: str
    name: str
    features: tuple = ()  # ((dotted key, value), ...) that change features
    search: tuple = ()  # ((dotted key, value), ...) of search/classify
    restriction: Optional[str] = None  # None: as the evaluated pipeline
    shape: Optional[tuple] = None  # (kind, crop): an experimental re-ranker, weight tuned


def _predicted(top_n: int) -> tuple:
    # restrict=True too: the evaluated pipeline may run unrestricted (--restrict off)
    return (("classify.top_n", top_n), ("search.restrict", True))


def plan(base: Config, has_classifier: bool) -> list[Variant]:
    """The rows of the table, one module varied at a time around `base`."""
    rows = [
        Variant("pipeline", "evaluated pipeline (this command's settings)"),
        Variant(
            "baseline",
            "plain KNN: no localization, RGB, MobileNet, unrestricted, no re-ranking",
            tuple(PLAIN.items()),
            (("search.rerank", "none"),),
            "off",
        ),
    ]
    none_matting = ("localize.matting", "none")
    rows += [
        Variant("localization", "none (whole photo)", (("localize.method", "none"), none_matting)),
        Variant("localization", "classical (OpenCV)", (("localize.method", "classical"), none_matting)),
        Variant("localization", "u2net-p", (("localize.method", "u2net"), none_matting)),
        Variant(
            "localization", "u2net-p + pymatting", (("localize.method", "u2net"), ("localize.matting", "pymatting"))
        ),
        Variant("localization", f"{base.localize.method} without box crop", (("localize.crop", False),)),
    ]
    rows.append(Variant("restriction", "off", restriction="off"))
    if has_classifier:
        for sees in ("photo", "cutout"):
            what = "the whole photo" if sees == "photo" else "the cut-out (the paper)"
            rows += [
                Variant(
                    "restriction",
                    f"predicted top-{n}, classifier sees {what}",
                    (),
                    _predicted(n) + (("classify.input", sees),),
                    "predicted",
                )
                for n in (1, 3)
            ]
    rows.append(Variant("restriction", "oracle (true category; not a real result)", restriction="oracle"))
    rows.append(Variant("re-ranking", "none", search=(("search.rerank", "none"),)))
    for top in (5, 10, 20):
        rows.append(
            Variant(
                "re-ranking",
                f"iou, top {top} (the paper)",
                search=(("search.rerank", "iou"), ("search.rerank_top", top)),
            )
        )
    rows += [
        Variant("re-ranking", "iou_crop, top 10", search=(("search.rerank", "iou_crop"), ("search.rerank_top", 10))),
        Variant(
            "re-ranking",
            "fused w=0.5, top 10",
            search=(("search.rerank", "fused"), ("search.rerank_top", 10), ("search.rerank_weight", 0.5)),
        ),
        Variant(
            "re-ranking",
            "fused_crop w=0.5, top 10",
            search=(("search.rerank", "fused_crop"), ("search.rerank_top", 10), ("search.rerank_weight", 0.5)),
        ),
    ]
    for kind in SHAPE_GRID:
        rows.append(Variant("re-ranking", kind, shape=(kind, False)))
    rows += [
        Variant("views", "object cut-out only", (("embed.views", "cutout"),)),
        Variant(
            "views",
            "cut-out + whole photo, equal weight",
            (("embed.views", "cutout+photo"), ("embed.photo_weight", 0.5)),
        ),
    ]
    rows += [Variant("colour", c, (("preprocess.color", c),)) for c in ("rgb", "gray")]
    rows += [Variant("extractor", e, (("embed.extractor", e), ("embed.weights", "imagenet"))) for e in EXTRACTORS]
    return rows


@dataclass
class ModelPool:
    """Models shared by the variants: each extractor and localizer is built once."""

    classifier: object = None
    extractors: dict = field(default_factory=dict)
    localizers: dict = field(default_factory=dict)

    def models(self, config: Config):
        from ..localize import make_localizer
        from ..models import load_extractor
        from ..pipeline import Models

        e_key = (config.embed.extractor, config.embed.weights, config.preprocess.image_size)
        if e_key not in self.extractors:
            self.extractors[e_key] = load_extractor(*e_key)
        l_key = settings_digest(localize_settings(config))
        if l_key not in self.localizers:
            self.localizers[l_key] = make_localizer(config.localize)
        return Models(self.localizers[l_key], self.extractors[e_key], self.classifier)


def variant_config_overrides(variant: Variant) -> dict:
    return dict(variant.features) | dict(variant.search)


def variant_config(base: Config, variant: Variant) -> Config:
    from ..pipeline import resolve_config

    return resolve_config(merge(base, variant_config_overrides(variant)))


def default_restriction(config: Config, has_classifier: bool) -> str:
    return "predicted" if has_classifier and config.search.restrict else "off"


def run_variants(
    base: Config,
    gallery,
    queries,
    cache_dir: Path,
    classifier=None,
    progress=None,
    variants: Optional[list[Variant]] = None,
    workers: int = 2,
) -> list[dict]:
    """Evaluate every variant; returns one dict per row (metrics, settings, feature key)."""
    from .features import cached_models

    variants = variants if variants is not None else plan(base, classifier is not None)
    pool = ModelPool(classifier=classifier)
    features: dict = {}  # feature key -> (store, query features)
    tuned: dict = {}
    rows = []

    def features_for(config: Config) -> tuple[str, tuple]:
        key = settings_digest(query_settings(config, classifier))
        if key not in features:
            models = cached_models(pool.models(config), config, cache_dir)
            store = gallery_index(gallery, config, models, cache_dir, workers=workers)
            features[key] = (store, query_features(queries, config, models, cache_dir))
        return key, features[key]

    for variant in variants:
        log.info("ablation: %s / %s", variant.group, variant.name)
        config = variant_config(base, variant)
        key, (store, qf) = features_for(config)
        restriction = variant.restriction or default_restriction(config, classifier is not None)
        reranker, tuning = None, None
        if variant.shape:
            tune_key = (key, variant.shape)
            if tune_key not in tuned:
                tuned[tune_key] = tune_shape(store, config, *variant.shape)
            tuning = tuned[tune_key]
            kind, crop = variant.shape
            config, reranker = shape_search(kind, tuning["weight"], tuning["top"], store, qf, config, crop)
        result = rank_queries(store, qf, config, restriction, reranker=reranker)
        row = {
            "group": variant.group,
            "variant": variant.name,
            "restriction": restriction,
            **{k: round(result.metrics[k], 4) for k in METRIC_KEYS},
            "category_accuracy": category_accuracy(qf) if restriction == "predicted" else None,
            "n_queries": int(len(result.kept)),
            "n_gallery": len(store.snapshot),
            "feature_key": key,
            "overrides": dict(variant.features) | dict(variant.search),
            "localization_fallbacks": int(sum("empty->full" in b for b in qf.backends)),
        }
        if tuning:
            row["overrides"] = {
                **row["overrides"],
                "shape": variant.shape[0],
                "weight": tuning["weight"],
                "rerank_top": tuning["top"],
            }
            row["variant"] = f"{variant.name} w={tuning['weight']}, top {tuning['top']} (tuned on gallery LOO)"
            row["tuning"] = tuning
        rows.append(row)
        if progress:
            progress(1)
    return rows


def shape_search(
    kind: str, weight: float, top: int, store, queries, config: Config, crop: bool = False
) -> tuple[Config, Optional[Reranker]]:
    """(config, reranker) that re-rank the top `top` candidates by a kind of the shape study at
    `weight`: the library's fused methods through the config, the experimental kinds of shape.py
    as a reranker."""
    config = merge(config, {"search.rerank_top": top})
    if kind in ("fused", "fused_crop"):
        return merge(config, {"search.rerank": kind, "search.rerank_weight": weight}), None
    return config, make_reranker(kind, weight, store, queries, crop=crop)


def tune_shape(store, config: Config, kind: str, crop: bool = False) -> dict:
    """Pick the weight and top-N of an experimental re-ranker on the gallery itself
    (leave-one-out: each gallery image queries the rest), never on the evaluation queries.
    Objective: Recall@1 + mAP@10. Without a usable gallery (one image per product) the middle
    of the grid is used and the row says so."""
    loo = store_as_queries(store)
    step = -(-len(loo) // TUNE_QUERIES)  # every step-th gallery image queries: bounded cost
    loo = replace(
        loo,
        records=loo.records[::step],
        vectors=loo.vectors[::step],
        masks=loo.masks[::step],
        boxes=loo.boxes[::step],
        backends=loo.backends[::step],
    )
    weights = SHAPE_GRID[kind]
    fallback = {"weight": weights[len(weights) // 2], "top": 10, "tuned": False, "grid": []}
    try:
        baseline = rank_queries(store, loo, merge(config, {"search.rerank": "none"}), "off", depth=TUNE_DEPTH)
    except CatalogueError:  # no gallery product has two images
        return fallback
    grid = [{"weight": None, "top": None, **_objective(baseline.metrics)}]
    best = None
    for top in (5, 10, 20):
        for weight in weights:
            cfg, reranker = shape_search(kind, weight, top, store, loo, config, crop)
            result = rank_queries(store, loo, cfg, "off", reranker=reranker, depth=TUNE_DEPTH)
            entry = {"weight": weight, "top": top, **_objective(result.metrics)}
            grid.append(entry)
            if best is None or entry["objective"] > best["objective"]:
                best = entry
    return {"weight": best["weight"], "top": best["top"], "tuned": True, "grid": grid, "loo_baseline": grid[0]}


def _objective(metrics: dict) -> dict:
    return {
        "recall@1": round(metrics["recall@1"], 4),
        "map@10": round(metrics["map@10"], 4),
        "objective": metrics["recall@1"] + metrics["map@10"],
    }


# ----------------------------------------------------------------------------- output


def markdown_table(rows: list[dict], reference: Optional[dict] = None) -> str:
    """One Markdown table; ΔR@1 and ΔmAP@10 relative to `reference` (the evaluated pipeline)."""
    reference = reference or rows[0]
    head = (
        "| group | variant | R@1 | R@5 | R@10 | R@20 | mAP@10 | R-Prec | MRR | cat. acc | ΔR@1 | ΔmAP@10 |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for row in rows:
        acc = "-" if row.get("category_accuracy") is None else f"{row['category_accuracy']:.3f}"
        d1 = row["recall@1"] - reference["recall@1"]
        dm = row["map@10"] - reference["map@10"]
        lines.append(
            f"| {row['group']} | {row['variant']} | "
            + " | ".join(f"{row[k]:.3f}" for k in METRIC_KEYS)
            + f" | {acc} | {d1:+.3f} | {dm:+.3f} |"
        )
    return "\n".join(lines)


def run_ablation(
    config: Config, gallery, queries, cache_dir: Optional[Path], out: Path, workers: int = 2
) -> list[dict]:
    """--ablate: every row on the `queries` catalogue against the `gallery` catalogue (indexed
    per feature setting), with a progress bar; writes ablation.{md,json} into `out`."""
    from ..console import progress_bar

    cache_dir = cache_dir or default_cache_dir()
    classifier = None
    if config.classify.classifier:
        from ..classify import Classifier

        classifier = Classifier.load(config.classify.classifier)
    variants = plan(config, classifier is not None)
    with progress_bar(len(variants), "ablation", unit="row") as bar:
        rows = run_variants(config, gallery, queries, cache_dir, classifier, bar.update, variants, workers=workers)
    (out / "ablation.json").write_text(json.dumps({"rows": rows, "config": config.to_dict()}, indent=1, default=str))
    (out / "ablation.md").write_text(markdown_table(rows) + "\n")
    log.info("ablation:\n%s", markdown_table(rows))
    return rows
