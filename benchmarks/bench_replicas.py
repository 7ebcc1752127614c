"""Service throughput with 1 and 2 `csearch serve` replicas on one Milvus server (issue 13, parts 3
and 5): each replica serves its own copy of a Milvus-backed index folder, and a client balances
POST /search round-robin over them, from a thread pool of concurrent clients (httpx).

    # a Milvus-server index, e.g. the one bench_backends_grocery.py builds (WORK/server)
    python benchmarks/bench_replicas.py --index /tmp/backends/server --layouts 1x1,2x1,1x2 \
        --rounds 2 --clients 4 --requests 64 --json docs/results/replicas.json

A layout RxW is R replicas of `csearch serve --workers W` (each replica on 127.0.0.1, a free
port, its own copy of the index folder). Layouts run in the order given, `--rounds` times over,
so a drift in the machine's load shows up as a difference between rounds. Before the load, every
replica answers each query photo once (a warm-up), and their top-k are compared: the replicas
must agree (ids and distances within 1e-5). Query photos: the first `--queries` val.txt photos of
the Grocery Store data (or any CSV/list via --photos). Servers are killed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_service import percentile, start_server  # noqa: E402

GROCERY = HERE.parent.parent / "shared" / "datasets" / "grocery-store"


def photos(list_file: Path, count: int) -> list[bytes]:
    """The first `count` images of a Grocery list file (path, fine, coarse) or a one-path-per-line file."""
    paths = [line.split(",")[0].strip() for line in list_file.read_text().splitlines() if line.strip()]
    return [(list_file.parent / path).read_bytes() for path in paths[:count]]


def search(http, base: str, photo: bytes, k: int = 10) -> tuple[int, float, list]:
    began = time.perf_counter()
    response = http.post(f"{base}/search", files={"file": ("q.jpg", photo, "image/jpeg")}, data={"k": str(k)})
    seconds = time.perf_counter() - began
    hits = response.json().get("results", []) if response.status_code == 200 else []
    return response.status_code, seconds, [(h["id"], h["distance"]) for h in hits]


def agree(bases: list[str], queries: list[bytes]) -> dict:
    """Each query on every replica (also the warm-up): do all replicas return the first one's top-k?"""
    import httpx

    same, worst = 0, 0.0
    with httpx.Client(timeout=300) as http:
        for photo in queries:
            replies = [search(http, base, photo) for base in bases]
            answers = [hits for _, _, hits in replies]
            first = answers[0]
            ok = all(status == 200 for status, _, _ in replies) and all(
                [i for i, _ in a] == [i for i, _ in first] for a in answers
            )
            gap = max([abs(d - e) for a in answers for (_, d), (_, e) in zip(a, first)], default=0.0)
            worst = max(worst, gap)
            same += ok and gap <= 1e-5
    return {"queries": len(queries), "replicas_agree": same, "max_distance_difference": worst}


def load(bases: list[str], queries: list[bytes], clients: int, requests: int) -> dict:
    """`requests` POST /search from `clients` threads, request i to replica i mod R (round-robin)."""
    import httpx

    local, made = threading.local(), []

    def one(i: int):
        if not hasattr(local, "http"):  # one connection pool per client thread
            local.http = httpx.Client(timeout=300)
            made.append(local.http)
        return search(local.http, bases[i % len(bases)], queries[i % len(queries)])[:2]

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        samples = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - began
    for http in made:
        http.close()
    ok = sorted(seconds * 1e3 for status, seconds in samples if status == 200)
    return {
        "requests": requests,
        "ok": len(ok),
        "seconds": round(wall, 2),
        "queries_per_s": round(len(ok) / wall, 3),
        "p50_ms": round(percentile(ok, 50), 1) if ok else None,
        "p95_ms": round(percentile(ok, 95), 1) if ok else None,
    }


def run_layout(index: Path, work: Path, replicas: int, workers: int, queries, args) -> dict:
    servers = []
    try:
        for r in range(replicas):
            copy = work / f"replica-{r + 1}" / "index"
            if not copy.exists():
                shutil.copytree(index, copy)  # each replica its own copy of the folder
            servers.append(start_server(copy, workers, work / f"serve-{replicas}x{workers}-{r + 1}.log"))
        bases = [base for _, base in servers]
        agreed = agree(bases, queries)
        result = {"layout": f"{replicas}x{workers}", "replicas": replicas, "workers": workers, "clients": args.clients}
        result.update(load(bases, queries, args.clients, args.requests))
        result["agreement"] = agreed
        result["load_average"] = os.getloadavg()
        print(json.dumps(result), file=sys.stderr)
        return result
    finally:
        for process, _ in servers:
            process.kill()
            process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True, help="a Milvus-server-backed INDEX_DIR")
    parser.add_argument("--photos", type=Path, default=GROCERY / "val.txt", help="query photos (a Grocery list)")
    parser.add_argument("--queries", type=int, default=16, help="distinct query photos (default 16)")
    parser.add_argument("--layouts", default="1x1,2x1", help="REPLICASxWORKERS, comma-separated (default 1x1,2x1)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    parser.add_argument("--requests", type=int, default=64, help="requests per layout and round")
    parser.add_argument("--work", type=Path, help="where the replicas' folders go (default: a temp dir)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from csearch.store.open import store_uri

    uri = store_uri(args.index)
    if not (uri or "").startswith("milvus://"):
        raise SystemExit(f"{args.index} is not an index on a Milvus server (its store: {uri})")
    queries = photos(args.photos, args.queries)
    layouts = [tuple(int(x) for x in layout.split("x")) for layout in args.layouts.split(",")]
    report = {"index": str(args.index), "store": uri, "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()}
    report["queries"], report["runs"] = len(queries), []
    began = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-replicas-")))
        for round_ in range(args.rounds):
            for replicas, workers in layouts:
                report["runs"].append(
                    {"round": round_ + 1, **run_layout(args.index, work, replicas, workers, queries, args)}
                )
    report["total_seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report["runs"]), file=sys.stderr)


def markdown(runs: list[dict]) -> str:
    lines = ["| round | replicas × workers | clients | requests | queries/s | p50 ms | p95 ms | replicas agree |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in runs:
        agreed = f"{r['agreement']['replicas_agree']}/{r['agreement']['queries']}" if r["replicas"] > 1 else "-"
        lines.append(
            f"| {r['round']} | {r['replicas']} × {r['workers']} | {r['clients']} | {r['ok']}/{r['requests']} | "
            f"{r['queries_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {agreed} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
