"""Query latency per stage at gallery sizes 1k / 10k / 100k, exact search next to FAISS
IndexFlatL2, and the retrieval evaluation's own overhead.

    CSEARCH_HOME=../shared/models python benchmarks/bench_query.py --index INDEX_DIR \
        --queries ../shared/datasets/grocery-store/val.txt --out docs/results/retrieval

INDEX_DIR is a real index (e.g. the Grocery train gallery that bench_retrieval.py caches under
CACHE/index/); larger galleries are that index padded with synthetic unit vectors (masks and
boxes copied from real rows), so the search cost is real and the vectors are of the right kind.

- The image stages (decode, localize, prepare, embed) do not depend on the gallery: they are
  measured once, on `--n-images` real queries through the engine, one image at a time.
- search and rerank (Engine.search with engine numpy, engine faiss, and numpy with IoU
  re-ranking of the top 10) are measured at every size on the same query vectors.
- exact KNN throughput: csearch.knn.knn (numpy and faiss engines) and a bare
  faiss.IndexFlatL2, one query at a time and as a batch, in the same process.
- evaluation overhead: rank_queries (full-depth ranking + metrics) per query, against the
  search alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def percentiles(values) -> dict:
    values = np.asarray(values, np.float64)
    return {
        "p50": round(float(np.percentile(values, 50)), 3),
        "p95": round(float(np.percentile(values, 95)), 3),
        "mean": round(float(values.mean()), 3),
    }


def padded_store(base_store, size: int, folder: Path, seed: int = 0):
    """An index of `size` items: the first rows of `base_store`, then synthetic unit vectors."""
    from csearch.store import IndexStore

    base = base_store.snapshot
    if (folder / "manifest.json").is_file():
        store = IndexStore.open(folder)
        padded = store.snapshot
        if len(padded) == size and padded.dim == base.dim and padded.meta == base.meta:  # padded from this base
            return store
    store = IndexStore.create(folder, meta=dict(base.meta), dim=base.dim, mask_size=base.mask_size, overwrite=True)
    rng = np.random.default_rng(seed)
    real = min(size, len(base))
    chunk = 20000
    for start in range(0, size, chunk):
        stop = min(start + chunk, size)
        rows = np.arange(start, stop) % len(base)
        vectors = np.asarray(base.vectors[rows], np.float32).copy()
        synthetic = np.arange(start, stop) >= real
        if synthetic.any():
            noise = rng.standard_normal((int(synthetic.sum()), base.dim)).astype(np.float32)
            vectors[synthetic] = noise / np.linalg.norm(noise, axis=1, keepdims=True)
        store.add(
            vectors=vectors,
            masks=base.masks(rows),
            boxes=np.asarray(base.boxes[rows]),
            paths=[f"{base.paths[r]}#{i}" for i, r in zip(range(start, stop), rows)],
            categories=[base.categories[r] for r in rows],
            products=[base.products[r] for r in rows],
        )
    store.compact()
    return IndexStore.open(folder)


def image_stages(engine, records, n: int) -> tuple[dict, list]:
    """Per-stage latency of the gallery-independent stages; returns (stats, prepared queries)."""
    timings, prepared = [], []
    for record in records[:n]:
        p = engine.prepare(record.path)
        embed_start = time.perf_counter()
        vector = engine.embed(p)
        times = dict(p.timings_ms)
        times["embed"] = (time.perf_counter() - embed_start) * 1e3
        timings.append(times)
        prepared.append((vector, p.mask))
    stages = {k: percentiles([t[k] for t in timings]) for k in timings[0]}
    return stages, prepared


def search_stages(engine, prepared, config, repeats: int = 1) -> dict:
    timings = []
    for _ in range(repeats):
        for vector, mask in prepared:
            _, t = engine.search(vector, mask, config.search.k, None, config)
            timings.append(t)
    return {k: percentiles([t[k] for t in timings]) for k in timings[0]}


def knn_throughput(vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> dict:
    """Queries per second: csearch knn (numpy, faiss engines) and bare faiss.IndexFlatL2, single
    queries and one batch."""
    import faiss

    from csearch.knn import knn, squared_norms

    norms = squared_norms(vectors)
    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(vectors)
    out = {}
    runners = {
        "csearch_numpy": lambda q: knn(vectors, q, k, engine="numpy", sq_norms=norms),
        "csearch_faiss": lambda q: knn(vectors, q, k, engine="faiss"),
        "faiss_IndexFlatL2": lambda q: index.search(q, k),
    }
    for name, fn in runners.items():
        fn(queries[:1])  # warm-up
        started = time.perf_counter()
        for q in queries:
            fn(q[None])
        single = len(queries) / (time.perf_counter() - started)
        started = time.perf_counter()
        fn(queries)
        batch = len(queries) / (time.perf_counter() - started)
        out[name] = {"single_qps": round(single, 1), "batch_qps": round(batch, 1)}
    return out


def end_to_end(index: Path, base_store, records, size: int, work: Path, n: int, repeats: int) -> dict:
    """Issue 14's protocol: whole `Engine.query` calls (decode to hits) on an index of `size` items
    (the real index padded with synthetic vectors), `n` seeded val photos x `repeats`, one client,
    after 2 warm-up queries. Two engines on the same photos, one after the other: "now" as
    `csearch query` opens the index, then "before" as the code before issue 14 did (localizer on 1
    thread, the classifier in Keras). "now" runs first and alone: TensorFlow's thread pools keep
    spinning after a Keras call and would slow whatever runs next."""
    from csearch.classify import Classifier
    from csearch.pipeline import Engine, load_models
    from csearch.resolve import query_threads

    store = padded_store(base_store, size, work / f"pad-{size}")
    opened = Engine.open(index, verify=False)
    picked = np.random.default_rng(0).choice(len(records), min(n, len(records)), replace=False)
    paths = [records[i].path for i in picked]

    def measure(engine) -> list:
        for path in paths[:2]:
            engine.query(path)
        return [engine.query(path).timings_ms for _ in range(repeats) for path in paths]

    engines = {"now": Engine(store, opened.config, opened.models)}
    timings = {"now": measure(engines["now"])}
    before = load_models(opened.config, localizer_threads=1)
    if before.classifier is not None:
        before.classifier = Classifier.load(opened.config.classify.classifier, runtime="keras")
    engines["before"] = Engine(store, opened.config, before)
    timings["before"] = measure(engines["before"])
    return {
        "gallery": len(store),
        "queries": len(timings["now"]),
        "localizer_threads": {"now": query_threads(), "before": 1},
        "classifier_runtime": {
            name: e.models.classifier and e.models.classifier.runtime for name, e in engines.items()
        },
        "stages_ms": {name: {k: percentiles([t[k] for t in rows]) for k in rows[0]} for name, rows in timings.items()},
    }


def main(argv=None) -> int:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, type=Path, help="a real index to pad")
    parser.add_argument("--queries", required=True, help="query SPEC (real images)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "retrieval")
    parser.add_argument("--work", type=Path, default=Path("/work/runs/bench-query"), help="padded indexes go here")
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--n-images", type=int, default=40, help="queries timed through the image stages")
    parser.add_argument(
        "--end-to-end",
        type=int,
        metavar="SIZE",
        help="only issue 14's end-to-end protocol on a SIZE-item index (e.g. 5000): --n-images photos x 3, "
        "written to OUT/end_to_end.json",
    )
    args = parser.parse_args(argv)

    from csearch.config import merge
    from csearch.data import read_catalogue
    from csearch.evaluation.features import compute_query_features
    from csearch.evaluation.ranking import rank_queries
    from csearch.pipeline import Engine
    from csearch.store import IndexStore

    base = IndexStore.open(args.index)
    records = list(read_catalogue(args.queries).records)
    if args.end_to_end:
        report = end_to_end(args.index, base, records, args.end_to_end, args.work, args.n_images, 3)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "end_to_end.json").write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report, indent=1))
        return 0
    engine = Engine.open(args.index, verify=False)
    report = {"index": str(args.index), "gallery_base": len(base), "config": engine.config.to_dict()}
    stages, prepared = image_stages(engine, records, args.n_images)
    report["image_stages_ms"] = stages
    iou = merge(engine.config, {"search.rerank": "iou", "search.rerank_top": 10, "search.engine": "numpy"})
    plain = merge(engine.config, {"search.rerank": "none", "search.engine": "numpy"})
    plain_faiss = merge(plain, {"search.engine": "faiss"})
    query_vectors = np.stack([v for v, _ in prepared]).astype(np.float32)
    report["sizes"] = {}
    for size in (int(s) for s in args.sizes.split(",")):
        store = padded_store(base, size, args.work / f"pad-{size}")
        sized = Engine(store, engine.config, engine.models)
        entry = {
            "search_ms": search_stages(sized, prepared, plain, 3),
            "search_faiss_ms": search_stages(sized, prepared, plain_faiss, 3),
            "search_iou_top10_ms": search_stages(sized, prepared, iou, 3),
            "knn_qps": knn_throughput(np.asarray(store.snapshot.vectors), query_vectors),
        }
        report["sizes"][size] = entry
        print(size, json.dumps(entry), file=sys.stderr, flush=True)
    # the evaluation's own overhead: full-depth ranking + metrics per query vs the bare search
    features = compute_query_features(records[: args.n_images], engine.config, engine.models)
    started = time.perf_counter()
    result = rank_queries(base, features, plain, "off")
    ranking_ms = (time.perf_counter() - started) * 1e3 / max(len(result.kept), 1)
    report["evaluation_overhead_ms_per_query"] = {
        "rank_queries_full_depth_plus_metrics": round(ranking_ms, 3),
        "bare_engine_search_p50": report["sizes"][min(report["sizes"])]["search_ms"]["search"]["p50"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out / "speed.png")
    print(json.dumps(report, indent=1))
    return 0


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(int(s) for s in report["sizes"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (
        ("search_ms", "Engine.search, numpy"),
        ("search_faiss_ms", "Engine.search, faiss"),
        ("search_iou_top10_ms", "Engine.search, numpy + IoU top-10"),
    ):
        total = [report["sizes"][s][key]["search"]["p50"] + report["sizes"][s][key]["rerank"]["p50"] for s in sizes]
        axes[0].plot(sizes, total, marker="o", label=label)
    image = sum(v["p50"] for v in report["image_stages_ms"].values())
    axes[0].axhline(image, color="gray", linestyle="--", label=f"image stages p50 ({image:.0f} ms)")
    axes[0].set(xscale="log", yscale="log", xlabel="gallery size", ylabel="ms per query (p50)", title="query latency")
    axes[0].legend(fontsize=7)
    for name in report["sizes"][sizes[0]]["knn_qps"]:
        axes[1].plot(
            sizes,
            [report["sizes"][s]["knn_qps"][name]["single_qps"] for s in sizes],
            marker="o",
            label=f"{name} (one query at a time)",
        )
    axes[1].set(xscale="log", yscale="log", xlabel="gallery size", ylabel="queries / s", title="exact KNN throughput")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
