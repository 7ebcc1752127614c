"""Load benchmark of `csearch serve`: throughput and p50/p95/p99 latency of POST /search at several
numbers of concurrent clients, against 127.0.0.1 only.

    # 1. a small real catalogue (Grocery Store train photos) and held-out query photos
    python benchmarks/bench_service.py manifest --out /work/runs/svc --images 200 --queries 24
    # 2. index it with the real models (see docs/results/service.md for the exact command)
    python -m csearch index /work/runs/svc/manifest.csv --out /work/runs/svc-index ...
    # 3. start a server, load it at 1, 4 and 16 clients, stop it
    python benchmarks/bench_service.py run --index /work/runs/svc-index --queries /work/runs/svc/queries.csv

The load generator is closed-loop and bounded: each of C clients sends its share of
`--requests` one after another (asyncio + httpx), so at most C requests are ever in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import platform
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


# ----------------------------------------------------------------------------- data


def grocery_rows(root: Path, split: str) -> list[tuple[Path, str, str]]:
    """(image, coarse class = category, fine class = product) of a Grocery Store split."""
    with (root / "classes.csv").open(newline="") as handle:
        classes = {int(r[1]): (r[2], r[0]) for r in list(csv.reader(handle))[1:]}
    rows = []
    for line in (root / f"{split}.txt").read_text().splitlines():
        if line.strip():
            path, fine, _ = (part.strip() for part in line.split(","))
            category, product = classes[int(fine)]
            rows.append((root / path, category, product))
    return rows


def cmd_manifest(args) -> None:
    rng = random.Random(args.seed)
    train = rng.sample(grocery_rows(args.grocery, "train"), args.images)
    products = {product for _, _, product in train}
    queries = rng.sample([r for r in grocery_rows(args.grocery, "val") if r[2] in products], args.queries)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("manifest.csv", train), ("queries.csv", queries)):
        with (args.out / name).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "category", "product"])
            writer.writerows((str(p.resolve()), c, pr) for p, c, pr in rows)
    print(f"{len(train)} catalogue images ({len(products)} products), {len(queries)} queries in {args.out}")


# ----------------------------------------------------------------------------- load


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def one_client(http, queries: list, count: int, offset: int, out: list) -> None:
    for i in range(count):
        data, product = queries[(offset + i) % len(queries)]
        started = time.perf_counter()
        try:
            response = await http.post("/search", files={"file": ("q.jpg", data, "image/jpeg")}, data={"k": "5"})
            status = response.status_code
            body = response.json() if status == 200 else {}
        except Exception as exc:  # noqa: BLE001 - every failure is counted, by kind
            status, body = type(exc).__name__, {}
        elapsed = (time.perf_counter() - started) * 1e3
        top = body.get("results", [{}])[0].get("product") if body.get("results") else None
        out.append(
            {
                "status": status,
                "ms": elapsed,
                "top1": top == product,
                "queue_ms": body.get("timings_ms", {}).get("queue"),
                "engine_ms": body.get("timings_ms", {}).get("total"),
            }
        )


async def load_level(base: str, queries: list, clients: int, requests: int) -> dict:
    import httpx

    per_client = max(1, math.ceil(requests / clients))
    samples: list = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(one_client(http, queries, per_client, c * per_client, samples) for c in range(clients)))
        wall = time.perf_counter() - started
    ok = sorted(s["ms"] for s in samples if s["status"] == 200)
    errors: dict = {}
    for s in samples:
        if s["status"] != 200:
            errors[str(s["status"])] = errors.get(str(s["status"]), 0) + 1

    def mean(key):
        values = [s[key] for s in samples if s[key] is not None]
        return round(sum(values) / len(values), 1) if values else None

    return {
        "clients": clients,
        "requests": len(samples),
        "ok": len(ok),
        "errors": errors,
        "seconds": round(wall, 2),
        "throughput_rps": round(len(ok) / wall, 3),
        "p50_ms": round(percentile(ok, 50), 1) if ok else None,
        "p95_ms": round(percentile(ok, 95), 1) if ok else None,
        "p99_ms": round(percentile(ok, 99), 1) if ok else None,
        "max_ms": round(ok[-1], 1) if ok else None,
        "mean_queue_ms": mean("queue_ms"),
        "mean_engine_ms": mean("engine_ms"),
        "top1_product": round(sum(s["top1"] for s in samples) / len(samples), 3),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(index: Path, workers: int, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "csearch",
            "serve",
            str(index),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
        cwd=REPO,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: see {log}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return process, base
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"server did not become healthy in 300 s: see {log}")


def local_only(url: str) -> str:
    host = urlparse(url).hostname
    if host not in LOCAL_HOSTS:
        raise SystemExit(f"refusing to load {url}: this benchmark only targets 127.0.0.1")
    return url.rstrip("/")


def read_queries(path: Path) -> list[tuple[bytes, str]]:
    with path.open(newline="") as handle:
        return [(Path(r["path"]).read_bytes(), r["product"]) for r in csv.DictReader(handle)]


def cmd_run(args) -> None:
    queries = read_queries(args.queries)
    process = None
    if args.url:
        base = local_only(args.url)
    else:
        process, base = start_server(args.index, args.workers, args.log)
    try:
        import httpx

        stats = httpx.get(f"{base}/stats", timeout=30).json()
        asyncio.run(load_level(base, queries, 1, args.warmup))  # first calls build TF/ORT state
        levels = [asyncio.run(load_level(base, queries, c, args.requests)) for c in args.clients]
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "workers": stats["service"]["workers"],
        "items": stats["items"],
        "models": stats["models"],
        "levels": levels,
    }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(levels), file=sys.stderr)


def markdown(levels: list[dict]) -> str:
    lines = [
        "| clients | requests | errors | throughput (req/s) | p50 (ms) | p95 (ms) | p99 (ms) | p99/p50 | "
        "mean queue (ms) | mean engine (ms) | top-1 product |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in levels:
        ratio = f"{r['p99_ms'] / r['p50_ms']:.2f}" if r["p50_ms"] else "-"
        lines.append(
            f"| {r['clients']} | {r['requests']} | {sum(r['errors'].values())} | {r['throughput_rps']:.2f} | "
            f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {ratio} | "
            f"{r['mean_queue_ms']:.0f} | {r['mean_engine_ms']:.0f} | {r['top1_product']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("manifest", help="sample a catalogue manifest and query photos from Grocery Store")
    p.add_argument("--grocery", type=Path, default=REPO.parent / "shared" / "datasets" / "grocery-store")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--queries", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_manifest)
    p = sub.add_parser("run", help="serve an index and load it")
    p.add_argument("--index", type=Path, help="INDEX_DIR to serve (a server is started and stopped)")
    p.add_argument("--url", help="load an already running local server instead")
    p.add_argument("--queries", type=Path, required=True, help="CSV path,category,product (from `manifest`)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=48, help="requests per level, split among the clients")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--log", type=Path, default=Path("bench_service_server.log"))
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.set_defaults(func=cmd_run)
    args = parser.parse_args(argv)
    if args.command == "run" and not (args.index or args.url):
        parser.error("run needs --index or --url")
    args.func(args)


if __name__ == "__main__":
    main()
