"""Per-stage query latency with the localizer on 1 ONNX Runtime thread vs the query policy's
threads (every core: `csearch.resolve.query_threads()`), interleaved on the same photos in one
process, plus a check that both give the same masks.

    CSEARCH_HOME=../shared/models python benchmarks/bench_query_threads.py --index INDEX_DIR \
        --queries ../shared/datasets/grocery-store/val.txt --n 40
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from csearch.data import read_catalogue
    from csearch.localize import make_localizer
    from csearch.pipeline import Engine
    from csearch.resolve import query_threads

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True)
    parser.add_argument("--queries", required=True, help="catalogue SPEC of query photos")
    parser.add_argument("--n", type=int, default=40, help="photos (a seeded sample; default 40)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    records = read_catalogue(args.queries).records
    picked = [records[i].path for i in np.random.default_rng(0).choice(len(records), args.n, replace=False)]
    engine = Engine.open(args.index)
    policy = query_threads()
    localizers = {1: make_localizer(engine.config.localize, threads=1), policy: engine.models.localizer}
    for path in picked[:2]:  # warm-up
        engine.query(path)
    rows = {threads: [] for threads in localizers}
    masks_differ = 0
    for i, path in enumerate(picked):
        order = sorted(localizers) if i % 2 else sorted(localizers, reverse=True)  # neither always first
        results = {}
        for threads in order:
            engine.models.localizer = localizers[threads]
            results[threads] = engine.query(path)
            rows[threads].append(results[threads].timings_ms)
        masks_differ += int((results[1].localization.mask != results[policy].localization.mask).sum())
    report = {"n": len(picked), "policy_threads": policy, "cpus": os.cpu_count(), "mask_pixels_differing": masks_differ}
    for threads, timings in rows.items():
        report[f"threads_{threads}"] = {
            stage: round(float(np.median([t[stage] for t in timings])), 1) for stage in timings[0]
        } | {"total_p95": round(float(np.percentile([t["total"] for t in timings], 95)), 1)}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
