"""Scale: insert throughput, exact / category-filtered / ANN search latency, ANN recall, Milvus Lite.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/bench_scale.py --embedded-only 1000000 \
        --json docs/results/scale.json        # 100k x 1280 everything, 1M the embedded store, real vectors
    python benchmarks/bench_scale.py --sizes 20000 --embedded-only 0 --milvus-queries 0   # a quick check

Synthetic clustered vectors: L2-normalised Gaussian blobs (16 items per cluster on average, like
a catalogue's several photos per product), 100 categories of 1 % of the items each (the
category-filtered searches), queries drawn from the same blobs. Every search goes through
`csearch.search.search_snapshot`, the path `csearch query` takes: "exact" on an index without
ANN, "hnsw"/"ivf" after `csearch.store.ann.optimize` (the ANN's candidates ranked exactly). Recall@10
is against exact search of the same snapshot. Milvus Lite (pymilvus MilvusClient on a local file,
FLAT index, Strong consistency) gets the same vectors and queries. `--embedded-only N` adds a size
for the embedded store's exact and filtered search only. Real csearch vectors: the Grocery
gallery index and the per-view vector cache, when found (`--real-index`, `--real-vectors`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from csearch.config import SearchConfig  # noqa: E402
from csearch.search import search_snapshot  # noqa: E402
from csearch.store import IndexStore  # noqa: E402
from csearch.store.ann import optimize  # noqa: E402

CATEGORIES = 100
PER_CLUSTER = 16
MASK = 8  # tiny masks: the search does not read them, and the insert rate is about the vectors
CACHE = Path("/work/cache/final11")


@functools.lru_cache(maxsize=1)
def centres_of(clusters: int, dim: int) -> np.ndarray:
    centres = np.random.default_rng(12345).standard_normal((clusters, dim), dtype=np.float32)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def clustered(n: int, dim: int, seed: int, clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors around `clusters` fixed centres (the same for every seed) and their cluster."""
    centres = centres_of(clusters, dim)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, clusters, n)
    vectors = centres[labels] + rng.standard_normal((n, dim), dtype=np.float32) * np.float32(0.6 / np.sqrt(dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, labels


def category(label) -> str:
    return f"cat-{int(label) % CATEGORIES:03d}"


def percentiles(samples: list) -> dict:
    ms = np.array(samples) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3)}


def timed_each(function, items, warmup: int = 3) -> tuple[list, list]:
    """(results, seconds per item) of function(item) for each item, after `warmup` untimed calls."""
    for item in items[:warmup]:
        function(item)
    results, seconds = [], []
    for item in items:
        start = time.perf_counter()
        results.append(function(item))
        seconds.append(time.perf_counter() - start)
    return results, seconds


def recall(found: list, truth: np.ndarray) -> float:
    return round(float(np.mean([len(set(map(int, f)) & set(map(int, t))) / len(t) for f, t in zip(found, truth)])), 4)


def fill(store, n: int, dim: int, batch: int, clusters: int) -> dict:
    """Add n clustered items (fixed seeds) to any csearch store, `batch` at a time; the add() calls
    are timed. bench_milvus_server.py fills its Milvus store with this too."""
    seconds = 0.0
    for start in range(0, n, batch):
        count = min(batch, n - start)
        vectors, labels = clustered(count, dim, seed=start + 1, clusters=clusters)
        args = (
            vectors,
            np.zeros((count, MASK, MASK), bool),
            np.zeros((count, 4), np.float32),
            [f"/catalogue/images/item-{start + i:08d}.jpg" for i in range(count)],
            [category(label) for label in labels],
            [f"product-{int(label):07d}" for label in labels],
        )
        began = time.perf_counter()
        store.add(*args)
        seconds += time.perf_counter() - began
    return {"insert_items_per_s": round(n / seconds), "insert_MB_per_s": round(n * dim * 4 / seconds / 1e6, 1)}


def fill_store(directory: Path, n: int, dim: int, batch: int, clusters: int) -> tuple[IndexStore, dict]:
    """A local store of n clustered items, added `batch` at a time; the add() calls are timed."""
    store = IndexStore.create(directory, {"config": {"store": {"ann": "none"}}}, dim=dim, mask_size=MASK)
    timing = fill(store, n, dim, batch, clusters)
    return store, {**timing, "batch": batch, "segments": len(store.snapshot.segment_rows())}


def search_ids(snapshot, queries, categories=None, k=10):
    settings = SearchConfig(k=k, mask_size=MASK)
    mask = np.zeros((MASK, MASK), bool)

    def one(i):
        cats = None if categories is None else [categories[i]]
        return search_snapshot(snapshot, queries[i], mask, k=k, settings=settings, categories=cats).ids

    return timed_each(one, list(range(len(queries))))


def bench_local(store, queries, query_cats) -> tuple[dict, np.ndarray, np.ndarray]:
    snapshot = store.snapshot
    exact, seconds = search_ids(snapshot, queries)
    filtered, filtered_seconds = search_ids(snapshot, queries, query_cats)
    result = {"exact": percentiles(seconds), "filtered_1pct": percentiles(filtered_seconds)}
    return result, np.array(exact), np.array(filtered)


def bench_ann(store, kind, queries, query_cats, truth, filtered_truth, build_threads: int) -> dict:
    import faiss

    searching = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(build_threads)  # the build may use every core; searches keep the setting
    began = time.perf_counter()
    summary = optimize(store, kind)
    build = time.perf_counter() - began
    faiss.omp_set_num_threads(searching)
    reopened = IndexStore.open(store.directory)
    began = time.perf_counter()
    view = reopened.snapshot.ann  # loads the file
    load = time.perf_counter() - began
    found, seconds = search_ids(reopened.snapshot, queries)
    filtered, filtered_seconds = search_ids(reopened.snapshot, queries, query_cats)
    _, raw_seconds = timed_each(lambda q: view.candidates(q, 10), list(queries))
    size = os.path.getsize(summary["file"])
    return {
        "build_s": round(build, 1),
        "file_MB": round(size / 1e6, 1),
        "file_bytes_per_item_beyond_vector": round(size / len(reopened) - reopened.dim * 4, 1),
        "load_ms": round(load * 1e3, 1),
        "csearch_search": percentiles(seconds),
        "faiss_only": percentiles(raw_seconds),
        "recall_at_10": recall(found, truth),
        "filtered_1pct_csearch": percentiles(filtered_seconds),  # exact by design
        "filtered_1pct_recall": recall(filtered, filtered_truth),
        "faiss_filtered_1pct_recall": faiss_filtered_recall(
            view, reopened.snapshot, queries, query_cats, filtered_truth
        ),
    }


def faiss_filtered_recall(view, snapshot, queries, query_cats, truth) -> float:
    """Recall@10 of the raw FAISS index restricted to the query's category by an IDSelectorBatch:
    what csearch does not do (category-restricted searches stay exact)."""
    import faiss

    found = []
    for query, cat in zip(queries, query_cats):
        ids = snapshot.gather("ids", snapshot.rows_for_categories([cat]))
        positions = np.ascontiguousarray(np.searchsorted(view.ann.ids, ids))  # the ANN searches by position
        selector = faiss.IDSelectorBatch(len(positions), faiss.swig_ptr(positions))
        params = (
            faiss.SearchParametersHNSW(efSearch=64, sel=selector)
            if view.kind == "hnsw"
            else faiss.SearchParametersIVF(nprobe=32, sel=selector)
        )
        _, labels = view.ann.index.search(query[None], 10, params=params)
        found.append(view.ann.ids[labels[0][labels[0] >= 0]])
    return recall(found, truth)


def bench_milvus_lite(root: Path, snapshot, queries, query_cats, truth, filtered_truth, batch: int) -> dict:
    from pymilvus import DataType, MilvusClient

    client = MilvusClient(str(root / "milvus-lite.db"))
    try:
        schema = client.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=snapshot.dim)
        schema.add_field("category", DataType.VARCHAR, max_length=32)
        index = client.prepare_index_params()
        index.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
        client.create_collection("items", schema=schema, index_params=index, consistency_level="Strong")
        seconds = 0.0
        for start in range(0, len(snapshot), batch):
            rows = np.arange(start, min(start + batch, len(snapshot)))
            vectors, ids = snapshot.gather("vectors", rows), snapshot.gather("ids", rows)
            cats = [snapshot.categories[r] for r in rows]
            began = time.perf_counter()  # the client-side conversion is part of what an insert costs
            data = [{"id": int(i), "vector": v.tolist(), "category": c} for i, v, c in zip(ids, vectors, cats)]
            client.insert("items", data)
            seconds += time.perf_counter() - began
        client.load_collection("items")

        def one(i, filtered):
            kwargs = {"filter": f'category == "{query_cats[i]}"'} if filtered else {}
            params = {"metric_type": "L2"}
            hits = client.search("items", [queries[i].tolist()], limit=10, search_params=params, **kwargs)
            return [hit["id"] for hit in hits[0]]

        found, exact_seconds = timed_each(lambda i: one(i, False), list(range(len(queries))), warmup=1)
        filtered, filtered_seconds = timed_each(lambda i: one(i, True), list(range(len(queries))), warmup=1)
        return {
            "insert_items_per_s": round(len(snapshot) / seconds),
            "batch": batch,
            "queries": len(queries),
            "exact": percentiles(exact_seconds),
            "filtered_1pct": percentiles(filtered_seconds),
            "recall_at_10_vs_csearch_exact": recall(found, truth[: len(queries)]),
            "filtered_recall_vs_csearch": recall(filtered, filtered_truth[: len(queries)]),
        }
    finally:
        client.close()


def ann_recall_on(root: Path, name: str, gallery: np.ndarray, queries: np.ndarray, exclude_self: bool) -> dict:
    """Recall@10 of HNSW and IVF through csearch on real vectors; with `exclude_self` the
    queries are gallery rows 0..Q-1, each searched without itself (leave-one-out)."""
    store = IndexStore.create(root / name, {}, dim=gallery.shape[1], mask_size=MASK)
    n = len(gallery)
    store.add(gallery, np.zeros((n, MASK, MASK), bool), np.zeros((n, 4), np.float32), [f"/{i}" for i in range(n)])
    snapshot = store.snapshot
    settings, mask = SearchConfig(k=10, mask_size=MASK), np.zeros((MASK, MASK), bool)

    def ranked(snap):
        return [
            search_snapshot(snap, q, mask, k=10, settings=settings, exclude_ids=[i] if exclude_self else ()).ids
            for i, q in enumerate(queries)
        ]

    truth = np.array(ranked(snapshot))
    result = {"items": n, "dim": int(gallery.shape[1]), "queries": len(queries)}
    for kind in ("hnsw", "ivf"):
        optimize(store, kind)
        result[f"{kind}_recall_at_10"] = recall(ranked(IndexStore.open(root / name).snapshot), truth)
    return result


def bench_real(root: Path, index_dir: Path, vectors_dir: Path, queries: int) -> dict:
    out = {}
    if (index_dir / "manifest.json").is_file():
        gallery = np.ascontiguousarray(IndexStore.open(index_dir).snapshot.vectors)  # read only
        picked = np.random.default_rng(0).permutation(len(gallery))
        gallery = gallery[picked]  # leave-one-out queries: the first rows, in random order
        out["grocery_gallery"] = ann_recall_on(root, "real-gallery", gallery, gallery[:queries], exclude_self=True)
        out["grocery_gallery"]["source"] = str(index_dir)
    else:
        out["grocery_gallery"] = f"not measured: {index_dir} not found"
    files = sorted(vectors_dir.glob("*.npz")) if vectors_dir.is_dir() else []
    if files:
        cached = np.stack([np.load(f)["vector"] for f in files]).astype(np.float32)
        cached = cached[np.random.default_rng(1).permutation(len(cached))]
        held_out = min(queries, len(cached) // 5)
        gallery, held = cached[held_out:], cached[:held_out]
        out["view_vectors"] = ann_recall_on(root, "real-views", gallery, held, exclude_self=False)
        out["view_vectors"]["source"] = str(vectors_dir)
    else:
        out["view_vectors"] = f"not measured: no vectors in {vectors_dir}"
    return out


def bench_size(root: Path, n: int, args, full: bool) -> dict:
    started = time.perf_counter()
    clusters = max(1, n // PER_CLUSTER)
    store, result = fill_store(root / f"index-{n}", n, args.dim, args.batch, clusters)
    result = {"n": n, "dim": args.dim, **result}
    count = args.queries if full else args.embedded_only_queries
    queries, labels = clustered(count, args.dim, seed=10**9 + n, clusters=clusters)
    query_cats = [category(label) for label in labels]
    result["queries"] = count
    local, truth, filtered_truth = bench_local(store, queries, query_cats)
    result["embedded"] = local
    if full:
        for kind in ("hnsw", "ivf"):
            result[kind] = bench_ann(store, kind, queries, query_cats, truth, filtered_truth, args.build_threads)
            print(json.dumps({kind: result[kind]}), file=sys.stderr)
        optimize(store, "none")
        if args.milvus_queries:
            m = args.milvus_queries
            result["milvus_lite"] = bench_milvus_lite(
                root, store.snapshot, queries[:m], query_cats[:m], truth, filtered_truth, args.milvus_batch
            )
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000", help="sizes with every measurement (default 100000)")
    parser.add_argument("--embedded-only", default="", help="sizes with the embedded store's search only, e.g. 1000000")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--batch", type=int, default=1024, help="items per store add() (default 1024)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--embedded-only-queries", type=int, default=50)
    parser.add_argument("--milvus-queries", type=int, default=30, help="0: skip Milvus Lite")
    parser.add_argument("--milvus-batch", type=int, default=2000)
    parser.add_argument("--real-index", type=Path, default=next(CACHE.glob("index/*-563964a1d376c8ef"), CACHE))
    parser.add_argument("--real-vectors", type=Path, default=CACHE / "vec" / "xd")
    parser.add_argument("--real-queries", type=int, default=500)
    parser.add_argument("--build-threads", type=int, default=os.cpu_count(), help="FAISS threads building")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    report = {"load_average_at_start": os.getloadavg(), "cpus": os.cpu_count(), "threads": threads, "sizes": []}
    report["build_threads"] = args.build_threads
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir="/tmp") as tmp:
        root = Path(tmp)
        report["real_vectors"] = bench_real(root, args.real_index, args.real_vectors, args.real_queries)
        print(json.dumps(report["real_vectors"]), file=sys.stderr)
        plan = [(int(s), True) for s in args.sizes.split(",") if s] + [
            (int(s), False) for s in args.embedded_only.split(",") if s
        ]
        for n, full in plan:
            report["sizes"].append(bench_size(root, n, args, full))
            print(json.dumps(report["sizes"][-1]), file=sys.stderr)
            for leftover in root.glob("index-*"):  # one store on disk at a time
                shutil.rmtree(leftover)
    report["load_average_at_end"] = os.getloadavg()
    report["total_seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
