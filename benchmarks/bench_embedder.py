"""The learned embedding on the Grocery Store data: a one-factor ablation around the default
settings, and the open-set split (docs/results/embedder.md).

Every variant is trained with `csearch.train.embedder.train_embedder` on train.txt, then scored
on the val photos (queries) against the train photos (gallery) exactly as the index compares
them: the cut-out and whole-photo views of every image (the trainer's un-augmented copy 0, which
is what `csearch index` embeds), through the variant's head, combined as embed.views does,
exact KNN over the whole gallery (no classifier, no re-ranking). The frozen rows use the pooled
backbone features themselves.

Open set: the head is trained on the products of a seeded two thirds of train.txt; the queries are
the val photos of the other third, the gallery all of train.txt.

    CSEARCH_HOME=../shared/models python benchmarks/bench_embedder.py --cache-dir CACHE --out OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from csearch.data import read_catalogue  # noqa: E402
from csearch.embed import l2_normalize  # noqa: E402
from csearch.evaluation.metrics import average_precision_at_k, recall_at_k, relevance  # noqa: E402
from csearch.train.embedder_config import load_embedder_config  # noqa: E402

GROCERY = ROOT.parent / "shared" / "datasets" / "grocery-store"
VARIANTS = {  # one factor at a time around the defaults (csearch/train/embedder_config.py)
    "default": {},
    "pooling=gap": {"pooling": "gap"},
    "pooling=gem": {"pooling": "gem"},
    "views=cutout": {"views": "cutout"},
    "views=photo": {"views": "photo"},
    "copies=0": {"copies": 0},
    "copies=3": {"copies": 3},
    "dim=64": {"dim": 64},
    "dim=128": {"dim": 128},
    "dim=512": {"dim": 512},
    "margin=0": {"margin": 0.0},
    "margin=0.2": {"margin": 0.2},
    "scale=8": {"scale": 8.0},
    "scale=32": {"scale": 32.0},
    "refit=false": {"refit": False},
}


def combine(pooled: np.ndarray, photo_weight: float = 0.5) -> np.ndarray:
    """(n, 2, D) unit views -> (n, 2D), as csearch.embed.combine_views (embed.photo_weight)."""
    a, b = np.sqrt(1 - photo_weight), np.sqrt(photo_weight)
    return np.concatenate([a * pooled[:, 0], b * pooled[:, 1]], axis=1)


CATEGORIES: dict = {}  # product -> category (filled in main)


def score(gallery: np.ndarray, gallery_products, queries: np.ndarray, query_products, groups) -> dict:
    distances = (gallery**2).sum(1)[None] - 2 * queries @ gallery.T
    order = np.argsort(distances, axis=1, kind="stable")[:, :10]
    gallery_products = np.asarray(gallery_products)
    rankings = [gallery_products[row] for row in order]
    rel = relevance(rankings, list(query_products), 10)
    n_relevant = np.array([(gallery_products == p).sum() for p in query_products])
    result = {
        "recall@1": float(recall_at_k(rel, 1).mean()),
        "recall@5": float(recall_at_k(rel, 5).mean()),
        "map@10": float(average_precision_at_k(rel, n_relevant, 10).mean()),
    }
    if CATEGORIES:  # the search's own category prediction: the first result's, or a vote of the top 5
        truth = [CATEGORIES[p] for p in query_products]
        first = [CATEGORIES[r[0]] for r in rankings]
        result["category@1"] = float(np.mean([a == b for a, b in zip(first, truth)]))
        votes = []
        for ranking in rankings:
            tally: dict = {}
            for rank, product in enumerate(ranking[:5]):
                tally[CATEGORIES[product]] = tally.get(CATEGORIES[product], 0.0) + 1.0 / (rank + 1)
            votes.append(max(tally, key=tally.get))
        result["category vote@5"] = float(np.mean([a == b for a, b in zip(votes, truth)]))
    for group in ("Packages", "Fruit", "Vegetables"):
        chosen = np.array([g == group for g in groups])
        if chosen.any():
            result[f"recall@1 {group}"] = float(recall_at_k(rel[chosen], 1).mean())
    return result


def embed_pooled(run_dir: Path, pooled: np.ndarray, photo_weight: float = 0.5) -> np.ndarray:
    """(n, 2, C) pooled views -> (n, 2D) index vectors through RUN_DIR's trained head."""
    import keras

    model = keras.saving.load_model(run_dir / "embedder.keras")
    x = keras.Input((pooled.shape[-1],))
    y = model.get_layer("embedding")(model.get_layer("projection")(model.get_layer("pooled_unit")(x)))
    head = keras.Model(x, y)
    n = len(pooled)
    embedded = np.asarray(head.predict(pooled.reshape(n * 2, -1), batch_size=1024, verbose=0)).reshape(n, 2, -1)
    return combine(embedded, photo_weight)


def features(source, records) -> np.ndarray:
    got = source(records, lambda n: None, copies=0)
    if not got.ok.all():
        raise SystemExit(f"{int((~got.ok).sum())} images failed: {got.failures[:3]}")
    return got.vectors[:, 0]


def group_of(record) -> str:
    parts = Path(record.path).parts
    return parts[parts.index("train" if "train" in parts else "val") + 1]


def run_variant(name, overrides, train_spec, gallery, queries, args, log) -> dict:
    from csearch.train.embedder import FeatureSource, frozen_extractor, train_embedder

    config = load_embedder_config(overrides={**overrides, "cache_dir": str(args.cache_dir)})
    run_dir = args.out / "runs" / name.replace("=", "-")
    started = time.perf_counter()
    summary = train_embedder(config, str(train_spec), run_dir, log)
    seconds = time.perf_counter() - started
    source = FeatureSource(replace(config, copies=0), frozen_extractor(config), run_dir)
    g, q = features(source, gallery.records), features(source, queries.records)
    groups = [group_of(r) for r in queries.records]
    products_g, products_q = [r.product for r in gallery.records], [r.product for r in queries.records]
    learned = score(embed_pooled(run_dir, g), products_g, embed_pooled(run_dir, q), products_q, groups)
    frozen = score(combine(l2_normalize(g)), products_g, combine(l2_normalize(q)), products_q, groups)
    weights = {}
    if name == "default":  # the views' weights in the index vector (embed.photo_weight), same head
        for w in (0.3, 0.4, 0.6, 0.7):
            weights[str(w)] = score(embed_pooled(run_dir, g, w), products_g, embed_pooled(run_dir, q, w), products_q,
                                    groups)  # fmt: skip
    return {"variant": name, "learned": learned, "frozen": frozen, "train_seconds": round(seconds, 1),
            "summary": summary, "photo_weight": weights}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=GROCERY, help="the Grocery Store folder (train.txt, val.txt)")
    parser.add_argument("--cache-dir", type=Path, required=True, help="localization and feature cache")
    parser.add_argument("--out", type=Path, required=True, help="runs and results.json go here")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--open-set", action="store_true", help="also the open-set split")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gallery, queries = read_catalogue(args.data / "train.txt"), read_catalogue(args.data / "val.txt")
    CATEGORIES.update({r.product: r.category for r in gallery.records + queries.records})
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    for name in args.variants:
        results[name] = run_variant(name, VARIANTS[name], args.data / "train.txt", gallery, queries, args, log)
        log(f"{name}: {json.dumps(results[name]['learned'])} (frozen {results[name]['frozen']['recall@1']:.3f})")
        results_path.write_text(json.dumps(results, indent=2))
    if args.open_set:
        results["open-set"] = open_set(args, gallery, queries, log)
        results_path.write_text(json.dumps(results, indent=2))
    return 0


def open_set(args, gallery, queries, log) -> dict:
    """Train on two thirds of the products; query with the val photos of the rest."""
    products = sorted({r.product for r in gallery.records})
    rng = np.random.default_rng(0)
    seen = set(rng.permutation(products)[: round(len(products) * 2 / 3)].tolist())
    lines = [
        line
        for line in (args.data / "train.txt").read_text().splitlines()
        if line.strip() and _product_of_line(line, gallery) in seen
    ]
    spec = args.out / "open-set" / "train-seen.txt"
    spec.parent.mkdir(parents=True, exist_ok=True)
    for name in ("train", "classes.csv"):
        link = spec.parent / name
        if not link.exists():
            link.symlink_to(args.data / name)
    spec.write_text("\n".join(lines) + "\n")
    unseen_queries = replace(queries, records=tuple(r for r in queries.records if r.product not in seen))
    result = run_variant("open-set", {}, spec, gallery, unseen_queries, args, log)
    result.update(seen_products=len(seen), unseen_products=len(products) - len(seen))
    result["queries"] = len(unseen_queries.records)
    log(f"open set: learned {result['learned']['recall@1']:.3f} frozen {result['frozen']['recall@1']:.3f}")
    return result


_BY_PATH: dict = {}


def _product_of_line(line: str, gallery) -> str:
    if not _BY_PATH:
        _BY_PATH.update({Path(r.path).as_posix().split("/train/", 1)[-1]: r.product for r in gallery.records})
    return _BY_PATH[line.split(",")[0].strip().split("train/", 1)[-1]]


if __name__ == "__main__":
    raise SystemExit(main())
