"""Offline-stage throughput and online-stage latency with the real models (issue: search core).

Measures, in one run on the same machine state:
  1. the bare models' forward speed: U²-Net-p session.run on a prepared tensor, and the
     extractor on batches (the upper bound for indexing: 1 / (t_u2net + t_extractor));
  2. `build_index` throughput on real photos (decode, localize, matting, extract, store);
  3. query latency p50/p95 per stage on an index padded with synthetic entries to --gallery;
  4. bytes stored per image beyond its vector.

    python benchmarks/bench_index.py --images 64 --gallery 5000 --queries 30 \
        --out docs/results/index.json          # csearch's defaults; --extractor/--matting/--views vary them

Needs ../shared/models and ../shared/datasets/grocery-store.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from csearch.config import Config, load_config  # noqa: E402
from csearch.data import Catalogue, read_catalogue  # noqa: E402
from csearch.pipeline import Engine, build_index, load_models, resolve_config, vector_dim  # noqa: E402
from csearch.preprocess import load_image, model_input  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GROCERY = SHARED / "datasets" / "grocery-store"
WORKERS = 2  # build_index's decode+localize threads (its default)


def real_config(args):
    """csearch's defaults (U²-Net-p, views cut-out + photo), with the models in ../shared/models."""
    os.environ.setdefault("CSEARCH_HOME", str(SHARED / "models"))
    return load_config(
        overrides={
            "embed.extractor": args.extractor,
            "localize.method": "u2net",
            "localize.matting": args.matting,
            "embed.views": args.views,
        }
    )


def packages(spec: str, n: int) -> Catalogue:
    catalogue = read_catalogue(GROCERY / spec)
    records = [r for r in catalogue.records if "/Packages/" in r.path]
    step = max(1, len(records) // n)
    return Catalogue(f"{spec} (Packages, every {step}th)", tuple(records[::step][:n]))


def median_ms(samples):
    return statistics.median(samples) * 1e3


def bare_forward(models, records, batch: int, views: int) -> dict:
    """Per-image seconds of the bare networks on already-prepared inputs; the extractor runs
    once per view."""
    saliency = models.localizer.saliency
    images = [load_image(r.path) for r in records]
    tensors = [saliency.preprocess(im) for im in images]
    saliency.session.run([saliency.output_name], {saliency.session.get_inputs()[0].name: tensors[0]})
    u2 = []
    for tensor in tensors:
        start = time.perf_counter()
        saliency.session.run([saliency.output_name], {saliency.session.get_inputs()[0].name: tensor})
        u2.append(time.perf_counter() - start)
    crops = np.stack([model_input(im, 224, "rgb") for im in images])
    crops = np.concatenate([crops] * (batch // len(crops) + 1))[:batch]
    models.extractor(crops)  # warm-up / tracing
    ex = []
    for _ in range(5):
        start = time.perf_counter()
        models.extractor(crops)
        ex.append((time.perf_counter() - start) / batch)
    return {
        "u2netp_ms": median_ms(u2),
        "extractor_ms_per_image": median_ms(ex),
        "views": views,
        "bound_images_per_s": 1.0 / (statistics.median(u2) + views * statistics.median(ex)),
    }


def pad_with_synthetic(engine: Engine, total: int, seed: int = 0) -> int:
    """Fill the index up to `total` items with random unit vectors and blob masks."""
    store = engine.store
    missing = total - len(store)
    if missing <= 0:
        return 0
    rng = np.random.default_rng(seed)
    size = store.mask_size
    yy, xx = np.mgrid[:size, :size]
    categories = sorted(set(store.snapshot.categories))
    for start in range(0, missing, 1000):
        n = min(1000, missing - start)
        vectors = rng.normal(size=(n, store.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        centres = rng.uniform(0.3, 0.7, (n, 2)) * size
        radii = rng.uniform(0.15, 0.4, (n, 2)) * size
        masks = (
            ((xx[None] - centres[:, 0, None, None]) / radii[:, 0, None, None]) ** 2
            + ((yy[None] - centres[:, 1, None, None]) / radii[:, 1, None, None]) ** 2
        ) <= 1
        boxes = np.concatenate([(centres - radii) / size, (centres + radii) / size], axis=1).clip(0, 1)
        store.add(
            vectors=vectors,
            masks=masks,
            boxes=boxes.astype(np.float32),
            paths=[f"/synthetic/{start + i}.jpg" for i in range(n)],
            categories=[categories[i % len(categories)] for i in range(n)],
            products=[f"synthetic-{start + i}" for i in range(n)],
        )
    return missing


def query_latency(engine: Engine, records, warmup: int = 2) -> dict:
    for record in records[:warmup]:
        engine.query(record.path)
    per_stage: dict[str, list] = {}
    for record in records:
        for stage, ms in engine.query(record.path).timings_ms.items():
            per_stage.setdefault(stage, []).append(ms)
    return {
        stage: {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95))}
        for stage, v in per_stage.items()
    }


def bytes_per_image(index_dir: Path, n: int, dim: int) -> float:
    total = sum(p.stat().st_size for p in index_dir.rglob("*") if p.is_file())
    return (total - n * dim * 4) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="real photos to index")
    parser.add_argument("--gallery", type=int, default=5000, help="index size for the latency test")
    parser.add_argument("--queries", type=int, default=30)
    defaults = Config()
    parser.add_argument("--extractor", default=defaults.embed.extractor)
    parser.add_argument("--matting", default=defaults.localize.matting)
    parser.add_argument("--views", default=defaults.embed.views)
    parser.add_argument("--workdir", default="/tmp/csearch-bench-index")
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "index.json"))
    args = parser.parse_args()
    if not (GROCERY / "train.txt").is_file():
        print(f"needs the Grocery Store dataset at {GROCERY}", file=sys.stderr)
        return 2

    config = resolve_config(real_config(args))
    models = load_models(config)
    gallery = packages("train.txt", args.images)
    dim = vector_dim(config, models.extractor)
    bare = bare_forward(models, gallery.records[:16], config.embed.batch_size, dim // models.extractor.dim)
    print(f"bare models: {bare}", file=sys.stderr)

    index_dir = Path(args.workdir) / "index"
    report = build_index(gallery, config, index_dir, overwrite=True, models=models, workers=WORKERS)
    indexing = report.images_per_second
    # build_index localizes WORKERS images at once, each U²-Net-p session on one thread: on a
    # machine with that many cores the ceiling is that many times the serial bound
    parallel = min(WORKERS, os.cpu_count() or 1)
    print(f"indexing: {indexing:.2f} img/s ({report.added} images)", file=sys.stderr)
    extra = bytes_per_image(index_dir, report.added, dim)

    engine = Engine(Engine.open(index_dir, verify=False).store, config, models)
    padded = pad_with_synthetic(engine, args.gallery)
    queries = packages("val.txt", args.queries).records
    latency = query_latency(engine, list(queries))
    print(f"query latency on {len(engine.store)} items: {latency['total']}", file=sys.stderr)

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_at_end": os.getloadavg(),
        "config": {
            "extractor": args.extractor,
            "localizer": "u2netp@320",
            "matting": args.matting,
            "views": args.views,
            "vector_dim": dim,
        },
        "bare_models": bare,
        "indexing_images_per_s": indexing,
        "indexing_vs_bound": indexing / bare["bound_images_per_s"],
        "parallel_localizers": parallel,
        "parallel_bound_images_per_s": parallel * bare["bound_images_per_s"],
        "indexing_vs_parallel_bound": indexing / (parallel * bare["bound_images_per_s"]),
        "indexed_images": report.added,
        "bytes_per_image_beyond_vector": extra,
        "gallery_items": len(engine.store),
        "synthetic_padding": padded,
        "query_latency_ms": latency,
        "command": "python " + " ".join(sys.argv),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
