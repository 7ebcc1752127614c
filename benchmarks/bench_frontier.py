"""The quality/speed frontier of whole pipelines: end-to-end query latency (decode, localize,
embed, classify, search, re-rank: `Engine.query`, one photo at a time) of several indexes, timed in
one process on the same val photos, round-robin so that a busy moment hurts every index alike;
plotted against each pipeline's Recall@1 from its `python -m csearch.evaluate retrieval` report.

    CSEARCH_HOME=../shared/models python benchmarks/bench_frontier.py \
        --pipeline "ImageNet + classifier" IDX_A RETRIEVAL_JSON_A \
        --pipeline "embedder (default)" IDX_B RETRIEVAL_JSON_B \
        --pipeline "embedder + geometric" IDX_C RETRIEVAL_JSON_C --set "embedder + geometric" search.rerank=geometric \
        --out docs/results/embedder
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GROCERY = REPO.parent / "shared" / "datasets" / "grocery-store"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", nargs=3, action="append", metavar=("NAME", "INDEX", "REPORT"), required=True)
    parser.add_argument("--set", nargs=2, action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                        help="a search setting for one pipeline's queries")  # fmt: skip
    parser.add_argument("--queries", default=str(GROCERY / "val.txt"))
    parser.add_argument("--n", type=int, default=60, help="photos timed per pipeline")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from csearch.data import read_catalogue
    from csearch.engine import Engine
    from csearch.preprocess import load_image

    records = list(read_catalogue(args.queries).records)
    chosen = [records[i] for i in np.linspace(0, len(records) - 1, args.n).astype(int)]
    images = [load_image(r.path) for r in chosen]
    settings = {name: {} for name, _, _ in args.pipeline}
    for name, pair in args.set:
        key, value = pair.split("=", 1)
        settings[name][key.removeprefix("search.")] = value
    engines = {name: Engine.open(index) for name, index, _ in args.pipeline}
    for name, engine in engines.items():  # warm up: first runs allocate
        for image in images[:3]:
            engine.query(image, k=5, **settings[name])
    times = {name: [] for name in engines}
    for image in images:
        for name, engine in engines.items():
            started = time.perf_counter()
            engine.query(image, k=5, **settings[name])
            times[name].append((time.perf_counter() - started) * 1e3)
    rows = []
    for name, index, report in args.pipeline:
        quality = json.loads(Path(report).read_text())
        values = np.array(times[name])
        rows.append({
            "pipeline": name,
            "p50_ms": round(float(np.percentile(values, 50)), 1),
            "p95_ms": round(float(np.percentile(values, 95)), 1),
            "recall@1": quality["recall@1"],
            "map@10": quality["map@10"],
            "index": index,
            "report": report,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontier.json").write_text(json.dumps({"n_queries": args.n, "rows": rows}, indent=1) + "\n")
    draw(rows, args.out / "frontier.png")
    return 0


def draw(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for row in rows:
        ax.errorbar(row["p50_ms"], row["recall@1"], xerr=[[0], [row["p95_ms"] - row["p50_ms"]]], fmt="o", capsize=3)
        ax.annotate(row["pipeline"], (row["p50_ms"], row["recall@1"]), textcoords="offset points", xytext=(6, 6))
    ax.axvline(200, color="grey", linestyle="--", linewidth=1)
    ax.text(201, ax.get_ylim()[0] + 0.01, "budget p50 200 ms", color="grey")
    ax.set_xlabel("query latency, ms (p50; bar to p95), 2-core CPU")
    ax.set_ylabel("Recall@1, Grocery train-val")
    ax.set_title("quality / speed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
