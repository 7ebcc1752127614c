"""Exact search latency: csearch.knn.knn, numpy engine vs FAISS, measured in the same run.

    python benchmarks/bench_search.py                       # 1k, 10k, 100k, 1M x 2048-d
    python benchmarks/bench_search.py --sizes 1000,10000 --dim 512 --repeats 5

The gallery is synthetic unit-norm float32 generated once, in chunks, into one file-backed
memory map (1M x 2048 is 8 GB: no second copy is made, and the page cache can be reclaimed
under pressure instead of the process being killed); smaller sizes are its prefixes. The
"faiss" engine calls faiss.knn on the same array (an IndexFlatL2 would copy it). Each timing
interleaves the two engines on the same queries, so a busy machine slows both alike; the table
reports medians and the numpy/faiss ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from csearch.knn import knn, squared_norms  # noqa: E402


def available_bytes() -> int:
    with open("/proc/meminfo") as handle:
        info = dict(line.split(":", 1) for line in handle)
    return int(info["MemAvailable"].split()[0]) * 1024


def make_gallery(path: Path, n: int, dim: int, seed: int = 0, chunk: int = 8192) -> np.ndarray:
    gallery = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        gallery[start : start + len(block)] = block
    gallery.flush()
    return np.load(path, mmap_mode="r")


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return (time.perf_counter() - start) * 1000, result


def compare(vectors, norms, queries_list, k, rows=None, warm=True) -> dict:
    """Median ms per call for each engine over the same queries, interleaved, plus agreement."""
    times = {"numpy": [], "faiss": []}
    identical = equivalent = True
    if warm:
        knn(vectors, np.atleast_2d(queries_list[0])[:1], k, rows=rows, sq_norms=norms)  # page cache, BLAS threads
        knn(vectors, np.atleast_2d(queries_list[0])[:1], k, rows=rows, engine="faiss")
    for i, queries in enumerate(queries_list):
        run_numpy = lambda: timed(lambda: knn(vectors, queries, k, rows=rows, sq_norms=norms))  # noqa: B023, E731
        run_faiss = lambda: timed(lambda: knn(vectors, queries, k, rows=rows, engine="faiss"))  # noqa: B023, E731
        if i % 2:  # alternate which engine goes first, so neither always meets a colder cache
            t_faiss, (rows_faiss, d_faiss) = run_faiss()
            t_numpy, (rows_numpy, d_numpy) = run_numpy()
        else:
            t_numpy, (rows_numpy, d_numpy) = run_numpy()
            t_faiss, (rows_faiss, d_faiss) = run_faiss()
        times["numpy"].append(t_numpy)
        times["faiss"].append(t_faiss)
        identical &= bool(np.array_equal(rows_numpy, rows_faiss))
        # float32 rounding differs between the engines, so rows whose distances differ by
        # ~1e-6 may swap: "equivalent" = the same distances, hence an equally correct answer
        equivalent &= bool(np.allclose(d_numpy, d_faiss, rtol=1e-5, atol=1e-5))
    numpy_ms, faiss_ms = statistics.median(times["numpy"]), statistics.median(times["faiss"])
    return {
        "numpy_ms": numpy_ms,
        "faiss_ms": faiss_ms,
        "ratio": numpy_ms / faiss_ms,
        "identical": identical,
        "equivalent": equivalent,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32, help="queries per batched call")
    parser.add_argument("--subset", type=float, default=0.1, help="fraction searched when restricted")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--headroom-gb", type=float, default=4.0, help="skip sizes whose gallery would leave less memory than this"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    sizes = [int(s) for s in args.sizes.split(",")]
    fits = [n for n in sizes if n * args.dim * 4 + args.headroom_gb * 2**30 < available_bytes()]
    skipped = sorted(set(sizes) - set(fits))
    if skipped:
        print(f"skipping sizes {skipped}: not enough free memory", file=sys.stderr)
    rng = np.random.default_rng(1)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        start = time.perf_counter()
        gallery = make_gallery(Path(tmp) / "gallery.npy", max(fits), args.dim)
        print(f"generated {gallery.shape} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        for n in fits:
            vectors = gallery[:n]
            norms = squared_norms(vectors)  # the index stores these
            repeats = args.repeats if n < 1_000_000 else max(3, args.repeats // 2)
            single = [
                vectors[rng.integers(n)] + rng.normal(0, 0.05, args.dim).astype(np.float32) for _ in range(repeats)
            ]
            batch = [
                vectors[rng.integers(n, size=args.batch)]
                + rng.normal(0, 0.05, (args.batch, args.dim)).astype(np.float32)
                for _ in range(repeats)
            ]
            subset = np.sort(rng.choice(n, max(1, int(n * args.subset)), replace=False))
            for case, queries, rows in [
                ("single", single, None),
                (f"batch{args.batch}", batch, None),
                (f"single, {args.subset:.0%} rows", single, subset),
            ]:
                row = {
                    "n": n,
                    "dim": args.dim,
                    "case": case,
                    "k": args.k,
                    **compare(vectors, norms, queries, args.k, rows, warm=case == "single"),
                }
                if case.startswith("batch"):
                    row["numpy_ms_per_query"] = row["numpy_ms"] / args.batch
                    row["faiss_ms_per_query"] = row["faiss_ms"] / args.batch
                results.append(row)
                print(json.dumps(row), file=sys.stderr)
            del vectors
    threads = {v: os.environ.get(v, "unset") for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {threads}")
    print("| N | case | numpy ms | faiss ms | numpy/faiss | same rows | same distances |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['n']:,} | {r['case']} | {r['numpy_ms']:.2f} | {r['faiss_ms']:.2f} | {r['ratio']:.2f} | "
            f"{'yes' if r['identical'] else 'no'} | {'yes' if r['equivalent'] else 'NO'} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"skipped_sizes": skipped, "threads": os.cpu_count(), "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
