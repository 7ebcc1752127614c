"""Scale on a Milvus server (issue 13, part 5): csearch's MilvusStore on the 2.3.5-lite server of
the PyPI `milvus` package, with the data of `bench_scale.py` (the same clustered vectors, the same
queries, 100 categories of 1 %).

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/bench_milvus_server.py \
        --json docs/results/scale_milvus_server.json     # 100k x 1280, HNSW included
    python benchmarks/bench_milvus_server.py --n 5000 --queries 20 --no-hnsw   # a quick check

Measured, through `csearch.store.milvus.MilvusStore` (created with `store.open.create_store`,
`milvus://127.0.0.1:PORT/bench`):
- insert: `store.add` of `--batch` items at a time (each a csearch write: a Strong catch-up read,
  the rows in pages of 256, a change-log row, the added items read back into the snapshot);
- the snapshot search (`search.search_snapshot` over the store's in-memory snapshot: what
  `csearch query` and `csearch serve` run), exact and filtered to one category;
- Milvus' own search (`MilvusStore.search_server`, Strong consistency, FLAT), exact and filtered,
  plus the same call at Bounded consistency (pymilvus directly) to show what Strong costs;
- opening the index in a new process (what a replica does when it starts): seconds and peak RSS;
- with HNSW (`--no-hnsw` skips it): the collection's index rebuilt as HNSW (M 16, efConstruction
  200, csearch's `store.ann: hnsw`), build time, `search_server` latency and recall@10 against
  the exact snapshot search.
The server runs with a temporary data folder on a free port and is SIGKILLed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from bench_scale import MASK, PER_CLUSTER, category, clustered, fill, percentiles, recall, search_ids, timed_each  # noqa: E402
from local_milvus import milvus_server  # noqa: E402

from csearch.store.open import create_store  # noqa: E402

OPEN_IN_A_NEW_PROCESS = """
import json, resource, sys, time
from csearch.store.open import open_store
began = time.perf_counter()
store = open_store(sys.argv[1])
print(json.dumps({"items": len(store), "open_s": round(time.perf_counter() - began, 2),
                  "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def server_search(store, queries, query_cats, filtered: bool, level: str = "Strong"):
    """Per query: Milvus' own top-10 ids (search_server, or pymilvus at `level`) and its seconds."""

    def one(i):
        cats = [query_cats[i]] if filtered else None
        if level == "Strong":
            return store.search_server(queries[i][None], 10, cats)[0][0]
        hits = store._client.search(
            store.target.collection,
            data=[queries[i]],
            limit=10,
            filter=f'category in ["{query_cats[i]}"]' if filtered else "",
            output_fields=["id"],
            search_params={"metric_type": "L2"},
            consistency_level=level,
        )
        return np.array([h["id"] for h in hits[0]])

    return timed_each(one, list(range(len(queries))), warmup=2)


def server_rows(store, queries, query_cats, truth, filtered_truth) -> dict:
    """Milvus' own search at Strong (search_server) and Bounded consistency: latency and recall."""
    rows = {}
    for level in ("Strong", "Bounded"):
        found, seconds = server_search(store, queries, query_cats, False, level)
        found_f, seconds_f = server_search(store, queries, query_cats, True, level)
        rows[level] = {
            "exact": percentiles(seconds),
            "filtered_1pct": percentiles(seconds_f),
            "recall_at_10_vs_snapshot": recall(found, truth),
            "filtered_recall_vs_snapshot": recall(found_f, filtered_truth),
        }
    return rows


def rebuild_index(store, index_type: str, params: dict, timeout_s: float = 3600) -> float:
    """Seconds to replace the collection's vector index (flush, drop, create, wait, load)."""
    client, name = store._client, store.target.collection
    began = time.perf_counter()
    client.flush(name)
    client.release_collection(name)
    client.drop_index(name, "vector")
    index = client.prepare_index_params()
    index.add_index(field_name="vector", index_type=index_type, metric_type="L2", params={"params": params})
    client.create_index(name, index)
    deadline = time.monotonic() + timeout_s
    while True:
        described = client.describe_index(name, "vector")
        if int(described.get("pending_index_rows", 0)) == 0 and int(described.get("indexed_rows", 0)) >= len(store):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"the {index_type} index was not built in {timeout_s} s: {described}")
        time.sleep(1)
    client.load_collection(name)
    return time.perf_counter() - began


def run(args, root: Path, address: str) -> dict:
    clusters = max(1, args.n // PER_CLUSTER)
    index_dir = root / "index"
    store = create_store(index_dir, f"milvus://{address}/bench", {"config": {"store": {"ann": "none"}}}, args.dim, MASK)
    result = {"n": args.n, "dim": args.dim, "batch": args.batch, "queries": args.queries}
    result.update(fill(store, args.n, args.dim, args.batch, clusters))
    print(json.dumps(result), file=sys.stderr)
    queries, labels = clustered(args.queries, args.dim, seed=10**9 + args.n, clusters=clusters)
    query_cats = [category(label) for label in labels]

    exact, seconds = search_ids(store.snapshot, queries)
    filtered, filtered_seconds = search_ids(store.snapshot, queries, query_cats)
    result["snapshot"] = {"exact": percentiles(seconds), "filtered_1pct": percentiles(filtered_seconds)}
    truth, filtered_truth = np.array(exact), np.array(filtered)
    result["server_flat"] = server_rows(store, queries, query_cats, truth, filtered_truth)
    print(json.dumps(result), file=sys.stderr)

    opened = subprocess.run(
        [sys.executable, "-c", OPEN_IN_A_NEW_PROCESS, str(index_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(HERE.parent)},
        timeout=1800,
    )
    result["open_in_new_process"] = json.loads(opened.stdout) if opened.returncode == 0 else opened.stderr[-500:]
    print(json.dumps(result["open_in_new_process"]), file=sys.stderr)

    if args.hnsw:
        from csearch.store.milvus_io import INDEX_TYPES

        build = rebuild_index(store, "HNSW", INDEX_TYPES["HNSW"])
        described = store._client.describe_index(store.target.collection, "vector")
        result["server_hnsw"] = {
            "index": json.loads(json.dumps(described, default=str)),
            "build_s": round(build, 1),
            **server_rows(store, queries, query_cats, truth, filtered_truth),
        }
    store._client.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--batch", type=int, default=1024, help="items per store.add() (bench_scale's default)")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--no-hnsw", dest="hnsw", action="store_false", help="skip the HNSW rebuild")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    report = {"load_average_at_start": os.getloadavg(), "cpus": os.cpu_count(), "threads": threads}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-milvus-server-", dir="/tmp") as tmp:
        root = Path(tmp)
        with milvus_server(root / "milvus-data") as server:
            report["result"] = run(args, root, server.address)
            report["server_peak_rss_MB"] = server.peak_rss_mb()
    report["load_average_at_end"] = os.getloadavg()
    report["peak_rss_MB_this_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    report["total_seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
