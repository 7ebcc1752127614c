"""Index store costs: add throughput, open time, bytes per image, single add/remove, refresh, compact.

    python benchmarks/bench_store.py                      # 5k and 100k items x 2048-d, 64x64 masks
    python benchmarks/bench_store.py --sizes 5000 --dim 512

Writes go to a temporary folder on the same disk as /tmp, with every fsync the store does, so
the numbers include durability. Vectors are random; paths look like a real catalogue's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from csearch.knn import knn  # noqa: E402
from csearch.masks import normalized_box  # noqa: E402
from csearch.store import IndexStore  # noqa: E402


def batch_items(start: int, n: int, dim: int, size: int, rng: np.random.Generator):
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    masks = np.zeros((n, size, size), bool)
    corners = rng.integers(0, size // 2, (n, 2))
    for i, (x0, y0) in enumerate(corners):
        masks[i, y0 : y0 + size // 2, x0 : x0 + size // 3] = True
    boxes = np.stack([normalized_box(m) for m in masks])
    paths = [
        f"/data/catalogues/grocery-store/train/Packages/Juice/Bravo-Apple-Juice/IMG_{start + i:07d}.jpg"
        for i in range(n)
    ]
    categories = [f"category-{(start + i) % 43:02d}" for i in range(n)]
    products = [f"product-{(start + i) % 81:03d}" for i in range(n)]
    return vectors, masks, boxes, paths, categories, products


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def median_ms(function, repeats: int) -> float:
    return ms(statistics.median(timed(function)[0] for _ in range(repeats)))


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def bench(n: int, dim: int, size: int, batch: int, root: Path) -> dict:
    rng = np.random.default_rng(0)
    directory = root / f"index-{n}"
    store = IndexStore.create(directory, {"bench": True}, dim=dim, mask_size=size)
    result = {"n": n, "dim": dim, "mask_size": size, "batch": batch}

    add_seconds, slowest = 0.0, 0.0
    for start in range(0, n, batch):
        items = batch_items(start, min(batch, n - start), dim, size, rng)
        seconds, _ = timed(lambda: store.add(*items))  # generating the data is not timed  # noqa: B023 (called at once, in this iteration)
        add_seconds += seconds
        slowest = max(slowest, seconds)
    result["add_items_per_s"] = round(n / add_seconds)
    result["add_vector_MB_per_s"] = round(n * dim * 4 / add_seconds / 1e6, 1)
    result["slowest_batch_add_ms"] = ms(slowest)  # a batch that completed a merge tier
    result["segments_after_build"] = len(store.snapshot.segment_rows())
    result["bytes_per_item_beyond_vector"] = round((disk_bytes(directory) - n * dim * 4) / n, 1)

    result["open_ms"] = ms(timed(lambda: IndexStore.open(directory))[0])
    opened = IndexStore.open(directory)
    first_query = np.ones(dim, np.float32)
    result["first_search_after_open_ms"] = ms(timed(lambda: knn(opened.snapshot.blocks(), first_query, 10))[0])
    result["refresh_unchanged_ms"] = median_ms(opened.refresh, 200)

    singles = []
    for i in range(20):
        items = batch_items(n + i, 1, dim, size, rng)
        singles.append(timed(lambda: store.add(*items))[0])  # noqa: B023 (called at once, in this iteration)
    result["single_add_ms"] = ms(statistics.median(singles))
    reader = IndexStore.open(directory)
    query = rng.standard_normal(dim).astype(np.float32)

    def first_search():  # what a server pays for its first query after another process's change
        reader.refresh()
        return knn(reader.snapshot.blocks(), query, 10, engine="numpy")

    store.add(*batch_items(n + 20, 1, dim, size, rng))
    result["refresh_and_search_after_add_ms"] = ms(timed(first_search)[0])
    result["next_search_ms"] = ms(timed(first_search)[0])
    result["whole_vectors_column_after_add_ms"] = ms(timed(lambda: reader.snapshot.vectors)[0])  # a copy

    live = store.snapshot.ids
    removals = [timed(lambda: store.remove([int(live[i * 97])]))[0] for i in range(10)]  # noqa: B023 (called at once, in this iteration)
    result["single_remove_ms"] = ms(statistics.median(removals))
    some = store.snapshot.ids[rng.choice(len(store), len(store) // 100, replace=False)]
    result["remove_1pct_ms"] = ms(timed(lambda: store.remove(some))[0])
    result["refresh_and_search_after_remove_ms"] = ms(timed(first_search)[0])
    result["whole_vectors_column_after_remove_ms"] = ms(timed(lambda: reader.snapshot.vectors)[0])  # a copy

    result["compact_ms"] = ms(timed(store.compact)[0])
    result["open_after_compact_ms"] = ms(timed(lambda: IndexStore.open(directory))[0])
    compacted = IndexStore.open(directory)
    result["vectors_after_compact_ms"] = ms(timed(lambda: compacted.snapshot.vectors)[0])  # a memory map: no copy
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,100000")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--mask-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1000, help="items per add() while building")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-store-", dir="/tmp") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            results.append(bench(n, args.dim, args.mask_size, args.batch, Path(tmp)))
            print(json.dumps(results[-1]), file=sys.stderr)
    keys = [k for k in results[0] if k not in ("n",)]
    print("| metric | " + " | ".join(f"{r['n']:,} items" for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for key in keys:
        print(f"| {key} | " + " | ".join(str(r[key]) for r in results) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
