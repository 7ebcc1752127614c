"""Issue 13's "Done when" on the real data: the same Grocery Store catalogue indexed through the
local store, Milvus Lite and a Milvus server gives the same top-10 for every val.txt photo.

    CSEARCH_HOME=/work/shared/models python benchmarks/bench_backends_grocery.py \
        --work /tmp/backends --every 4 --json docs/results/backends_grocery.json

1. A subset of train.txt (every `--every`-th line) is written to WORK/grocery/train_every4.txt
   beside links to the data set's classes.csv and train/ (a Grocery list needs classes.csv beside it).
2. `python -m csearch index SUBSET --out WORK/local --store local`, then `--store
   milvus-lite:items.db` (WORK/lite) and `--store milvus://ADDRESS/grocery` (WORK/server), each
   timed, with the default models. The server is the one at `--milvus HOST:PORT`, else a server
   this script starts on a free port with a temporary data folder and SIGKILLs at the end.
   An index folder already built with the same STORE is reused (csearch index resumes, adding
   nothing), so with `--work` and `--milvus` a rerun only queries.
3. Every val.txt photo is queried against the three indexes (`Engine.open(INDEX).query(path,
   k=10)`, one process, the indexes opened in turn); a query agrees when its ids are the local
   store's up to distance ties within 1e-5 and its distances are within 1e-5 (issue 13's "same
   top-k"). The stored items are compared too: ids, paths, categories, vectors, masks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
from local_milvus import milvus_server  # noqa: E402

GROCERY = REPO.parent / "shared" / "datasets" / "grocery-store"
TIE = 1e-5


def write_subset(grocery: Path, every: int, out: Path) -> Path:
    """train.txt's every `every`-th line as a list file beside links to classes.csv and train/."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("classes.csv", "train"):
        link = out / name
        if not link.exists():
            link.symlink_to(grocery / name, target_is_directory=(name == "train"))
    lines = [line for line in (grocery / "train.txt").read_text().splitlines() if line.strip()]
    subset = out / f"train_every{every}.txt"
    subset.write_text("\n".join(lines[::every]) + "\n")
    return subset


def index(subset: Path, out: Path, store: str) -> dict:
    """`csearch index SUBSET --out OUT --store STORE --json`, timed."""
    command = [sys.executable, "-m", "csearch", "index", str(subset), "--out", str(out), "--store", store, "--json"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    print(f"{store}: {seconds:.1f} s {summary}", file=sys.stderr)
    return {"store": store, "seconds": round(seconds, 1), "summary": summary}


def same_top_k(ids, distances, ref_ids, ref_distances) -> bool:
    """Issue 13's definition: the same ids up to distance ties within 1e-5 (and the distances)."""
    ids, ref_ids = np.asarray(ids), np.asarray(ref_ids)
    distances, ref_distances = np.asarray(distances), np.asarray(ref_distances)
    if ids.shape != ref_ids.shape or not np.allclose(distances, ref_distances, rtol=0, atol=TIE):
        return False
    return all(
        a == b or a in ref_ids[np.abs(ref_distances - ref_distances[i]) <= TIE]
        for i, (a, b) in enumerate(zip(ids, ref_ids))
    )


def stored_items(store) -> dict:
    snapshot = store.snapshot
    rows = np.arange(len(snapshot))
    return {
        "ids": snapshot.gather("ids", rows),
        "vectors": snapshot.gather("vectors", rows),
        "masks": snapshot.gather("masks", rows),
        "records": snapshot.records(rows),
    }


def compare(indexes: dict, queries: list[Path], k: int) -> dict:
    """Query every photo against each index (opened one after another); compare with the first."""
    from csearch.engine import Engine

    results, items, seconds = {}, {}, {}
    for name, directory in indexes.items():
        engine = Engine.open(directory)
        items[name] = stored_items(engine.store)
        began = time.perf_counter()
        results[name] = []
        for path in queries:
            hits = engine.query(path, k=k).hits
            results[name].append(([h.id for h in hits], [h.distance for h in hits]))
        seconds[name] = round(time.perf_counter() - began, 1)
        with contextlib.suppress(AttributeError):
            engine.store.close()  # Milvus Lite: one process per database; a server: disconnect
        print(f"{name}: {len(queries)} queries in {seconds[name]} s", file=sys.stderr)
    reference = next(iter(indexes))
    report = {"queries": len(queries), "k": k, "reference": reference, "query_seconds": seconds, "backends": {}}
    for name in indexes:
        if name == reference:
            continue
        agree = [same_top_k(*got, *ref) for got, ref in zip(results[name], results[reference])]
        identical = [got[0] == ref[0] for got, ref in zip(results[name], results[reference])]
        gaps = [np.max(np.abs(np.subtract(got[1], ref[1]))) for got, ref in zip(results[name], results[reference])]
        a, b = items[name], items[reference]
        report["backends"][name] = {
            "same_top_k": int(sum(agree)),
            "identical_id_lists": int(sum(identical)),
            "max_distance_difference": float(max(gaps)),
            "disagreeing_queries": [str(queries[i]) for i, ok in enumerate(agree) if not ok][:20],
            "items": len(a["ids"]),
            "same_ids": bool(np.array_equal(a["ids"], b["ids"])),
            "same_records": a["records"] == b["records"],  # path, category, product, box
            "max_vector_difference": float(np.max(np.abs(a["vectors"] - b["vectors"]))) if len(a["ids"]) else 0.0,
            "same_masks": bool(np.array_equal(a["masks"], b["masks"])),
        }
    return report


def val_photos(grocery: Path) -> list[Path]:
    lines = [line for line in (grocery / "val.txt").read_text().splitlines() if line.strip()]
    return [grocery / line.split(",")[0].strip() for line in lines]


def run(args, address: str) -> dict:
    subset = write_subset(args.grocery, args.every, args.work / "grocery")
    stores = {
        "local": "local",
        "milvus-lite": "milvus-lite:items.db",
        "milvus-server": f"milvus://{address}/{args.collection}",
    }
    folders = {"local": "local", "milvus-lite": "lite", "milvus-server": "server"}
    indexes = {name: args.work / folders[name] for name in stores}
    built = {name: index(subset, indexes[name], uri) for name, uri in stores.items()}
    report = {"subset": str(subset), "images": len(subset.read_text().splitlines()), "indexing": built}
    report.update(compare(indexes, val_photos(args.grocery)[: args.queries or None], args.k))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grocery", type=Path, default=GROCERY)
    parser.add_argument("--work", type=Path, help="folder for the subset and the three indexes (default: a temp dir)")
    parser.add_argument("--every", type=int, default=4, help="take every N-th line of train.txt (default 4)")
    parser.add_argument("--milvus", help="HOST:PORT of a running Milvus server (default: start one)")
    parser.add_argument("--collection", default="grocery")
    parser.add_argument("--queries", type=int, default=0, help="only the first N val photos (default: all)")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    began = time.perf_counter()
    report = {"load_average_at_start": os.getloadavg(), "CSEARCH_HOME": os.environ.get("CSEARCH_HOME")}
    with contextlib.ExitStack() as stack:
        if args.work is None:
            args.work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-backends-")))
        if args.milvus:
            address = args.milvus
        else:
            address = stack.enter_context(milvus_server(args.work / "milvus-data")).address
        report.update(run(args, address))
    report["load_average_at_end"] = os.getloadavg()
    report["total_seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
