"""Geometric re-ranking (search.rerank: geometric) on the Grocery Store data: Recall@1 overall and
per group (Packages, Fruit, Vegetables), cost per query and bytes per item, ORB vs SIFT, for a
few keypoint counts K, candidate counts N and min_inliers. Results: docs/results/geometric.md.

    CSEARCH_HOME=../shared/models python benchmarks/bench_geometric.py --cache /work/cache/geometric

Gallery = train.txt (2,640 photos), queries = val.txt (296). Global search: EfficientNet-Lite0
features of the whole photo (no localization, no classifier), exact Euclidean KNN on L2-normalised
vectors. Local features: `csearch.geometric.extract` on the whole photo (no box: there is no
localizer here). SIFT keeps the strongest keypoints before describing them and records are
sorted strongest first, so the SIFT records of K < 512 are the first K keypoints of the K = 512
ones (the same set an extraction with K would give; its extraction time is the K = 512 one).
The top N of each query are re-ranked by `geometric.fuse` (verified first, by inliers, then the
KNN order) from the inliers `geometric` counts for every (query, top-20) pair; other orders and
the early stop are simulated on those counts, and the cost per query is timed separately by
calling `geometric.rerank_geometric` itself with the defaults. Everything runs on one thread
(OpenCV, BLAS), so the times are per core. Features and records are cached under --cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from csearch import geometric  # noqa: E402
from csearch.config import SearchConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GROCERY = REPO.parent / "shared" / "datasets" / "grocery-store"
GROUPS = ("Packages", "Fruit", "Vegetables")
FEATURES = (("orb", 256), ("orb", 512), ("sift", 128), ("sift", 256), ("sift", 512))
MAX_N = 20
DEFAULTS = SearchConfig()
# one change at a time to geometric's matching constants, at K = 512 (N 20, the default min_inliers)
ABLATIONS = ({"MUTUAL": False}, {"RATIO": 0.9}, {"RANSAC_PX": 3.0}, {"RANSAC_ITERS": 1000})


def read_list(name: str) -> tuple[list[str], np.ndarray, list[str]]:
    """(absolute paths, fine labels, groups) of a Grocery Store list file."""
    paths, labels, groups = [], [], []
    for line in (GROCERY / name).read_text().splitlines():
        if line.strip():
            path, fine, _ = (part.strip() for part in line.split(","))
            paths.append(str(GROCERY / path))
            labels.append(int(fine))
            groups.append(Path(path).parts[1])  # train/<group>/...
    return paths, np.array(labels), groups


def load_rgb(path: str) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def global_features(paths: list[str], cache: Path) -> tuple[np.ndarray, float]:
    """L2-normalised EfficientNet-Lite0 features of the whole photos; ms per image."""
    file = cache / "efficientnet_lite0_photo.npz"
    if file.is_file():
        data = np.load(file)
        return data["features"], float(data["ms"])
    from csearch.embed import embed_batches
    from csearch.models import load_extractor
    from csearch.preprocess import model_input

    extractor = load_extractor("efficientnet_lite0")
    started, chunks = time.perf_counter(), []
    for start in range(0, len(paths), 64):
        inputs = np.stack([model_input(load_rgb(p), 224, "rgb") for p in paths[start : start + 64]])
        chunks.append(embed_batches(extractor, inputs, 32, True))
    ms = (time.perf_counter() - started) * 1e3 / len(paths)
    features = np.concatenate(chunks)
    np.savez(file, features=features, ms=ms)
    return features, ms


def local_records(paths: list[str], kind: str, k: int, cache: Path) -> tuple[np.ndarray, float]:
    """Every image's local-features record and the mean extraction ms (decoding excluded)."""
    file = cache / f"{kind}_{k}.npz"
    if file.is_file():
        data = np.load(file)
        return data["records"], float(data["ms"])
    spec = geometric.LocalSpec(kind, k)
    if kind == "sift" and k < 512:  # the strongest k of the K = 512 records (module docstring)
        full, ms = local_records(paths, kind, 512, cache)
        records = np.stack([geometric.encode(*geometric.decode(r)[1:], spec) for r in full])
        return records, ms
    records, spent = np.zeros((len(paths), spec.record_bytes), np.uint8), 0.0
    for i, path in enumerate(paths):
        image = load_rgb(path)
        started = time.perf_counter()
        records[i] = geometric.extract(image, spec)
        spent += time.perf_counter() - started
    ms = spent * 1e3 / len(paths)
    np.savez(file, records=records, ms=ms)
    return records, ms


def extract_ms(paths: list[str], kind: str, k: int) -> float:
    """Mean ms of `geometric.extract` (decoding excluded) over every 20th image, measured in this
    run for every kind and K alike (the cached records may come from a run on a busier machine)."""
    spec, spent, images = geometric.LocalSpec(kind, k), 0.0, [load_rgb(p) for p in paths[::20]]
    for image in images:
        started = time.perf_counter()
        geometric.extract(image, spec)
        spent += time.perf_counter() - started
    return spent * 1e3 / len(images)


def pair_inliers(query_records, gallery_records, top: np.ndarray, min_inliers: int) -> tuple[np.ndarray, float]:
    """Inliers of every (query, top-MAX_N candidate) pair with no early stop; ms per pair
    (the candidate's decoding included, as in `rerank_geometric`)."""
    counts = np.zeros(top.shape, np.int32)
    started = time.perf_counter()
    for q, row in enumerate(top):
        query = geometric._prepare(query_records[q])
        for j, item in enumerate(row):
            counts[q, j] = geometric._verify(query, geometric._prepare(gallery_records[item]), min_inliers)[0]
    return counts, (time.perf_counter() - started) * 1e3 / top.size


def simulate(distances, counts, n: int, min_inliers: int, stop, order_by: str) -> tuple[np.ndarray, float]:
    """The first result of every query after re-ranking its top n; mean pairs matched per query."""
    firsts, matched = np.zeros(len(counts), np.int64), 0
    for q in range(len(counts)):
        c = counts[q, :n].copy()
        if stop is not None:
            hit = np.flatnonzero(c >= stop * min_inliers)
            if len(hit):
                c[hit[0] + 1 :] = -1
        matched += int((c >= 0).sum()) if stop is not None else n
        if order_by == "inliers":  # csearch: verified first, by inliers, then KNN order
            order, _ = geometric.fuse(distances[q, :n], c, min_inliers)
        elif order_by == "knn":  # verified first in KNN order, then the rest
            order = np.lexsort((np.arange(n), c < min_inliers))
        else:  # "all": every candidate by inliers (no verification gate)
            order = np.lexsort((np.arange(n), -c))
        firsts[q] = order[0]
    return firsts, matched / len(counts)


def recall_at_1(labels_first: np.ndarray, labels: np.ndarray, groups: list[str]) -> dict:
    right = labels_first == labels
    out = {"all": float(right.mean())}
    for group in GROUPS:
        mask = np.array([g == group for g in groups])
        out[group] = float(right[mask].mean())
    return out


def timed_rerank(distances, query_records, gallery_records, top, n: int, min_inliers: int) -> float:
    """ms per query of `geometric.rerank_geometric` itself over the top n (its STOP_FACTOR)."""
    started = time.perf_counter()
    for q in range(len(top)):
        geometric.rerank_geometric(distances[q, :n], query_records[q], gallery_records[top[q, :n]], min_inliers)
    return (time.perf_counter() - started) * 1e3 / len(top)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("/work/cache/geometric"))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "geometric.json")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    args.cache.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    g_paths, g_labels, _ = read_list("train.txt")
    q_paths, q_labels, q_groups = read_list("val.txt")
    features, embed_ms = global_features(g_paths + q_paths, args.cache)
    gallery, queries = features[: len(g_paths)], features[len(g_paths) :]
    squared = (queries**2).sum(1)[:, None] - 2 * queries @ gallery.T + (gallery**2).sum(1)[None]
    top = np.argsort(squared, axis=1, kind="stable")[:, :MAX_N]
    distances = np.sqrt(np.maximum(np.take_along_axis(squared, top, 1), 0))
    result = {
        "embed_ms_per_image": embed_ms,
        "knn": recall_at_1(g_labels[top[:, 0]], q_labels, q_groups),
        "ceiling": {
            str(n): recall_at_1(
                np.where((g_labels[top[:, :n]] == q_labels[:, None]).any(1), q_labels, -1), q_labels, q_groups
            )
            for n in (5, 10, 20)
        },
        "features": {},
    }
    for kind, k in FEATURES:
        records, _ = local_records(g_paths + q_paths, kind, k, args.cache)
        g_records, q_records = records[: len(g_paths)], records[len(g_paths) :]
        found = np.array([len(geometric.decode(r)[1]) for r in records])
        counts, pair_ms = pair_inliers(q_records, g_records, top, 10)
        entry = {
            "record_bytes": geometric.record_bytes(kind, k),
            "mean_keypoints": float(found.mean()),
            "extract_ms": extract_ms(g_paths + q_paths, kind, k),
            "match_ms_per_candidate": pair_ms,
            "variants": [],
            "timed": {},
        }
        for n in (5, 10, 20):
            for min_inliers in (10, 15, 20):
                for stop in (None, 2, 4):
                    for order_by in ("inliers", "knn", "all"):
                        if order_by != "inliers" and stop is not None:
                            continue
                        firsts, matched = simulate(distances, counts, n, min_inliers, stop, order_by)
                        entry["variants"].append(
                            {
                                "n": n,
                                "min_inliers": min_inliers,
                                "stop": stop,
                                "order": order_by,
                                "pairs_per_query": matched,
                                "r1": recall_at_1(g_labels[top[np.arange(len(top)), firsts]], q_labels, q_groups),
                            }
                        )
        entry["timed"]["20"] = timed_rerank(distances, q_records, g_records, top, 20, DEFAULTS.min_inliers)
        if k == 512:
            entry["ablations"] = []
            for change in ABLATIONS:
                saved = {name: getattr(geometric, name) for name in change}
                vars(geometric).update(change)
                try:
                    changed, _ = pair_inliers(q_records, g_records, top, 10)
                finally:
                    vars(geometric).update(saved)
                firsts, _ = simulate(distances, changed, MAX_N, DEFAULTS.min_inliers, None, "inliers")
                r1 = recall_at_1(g_labels[top[np.arange(len(top)), firsts]], q_labels, q_groups)
                entry["ablations"].append({"change": change, "r1": r1})
        result["features"][f"{kind}-{k}"] = entry
        print(f"{kind}-{k}: done at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    result["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(report(result))
    return result


def report(result: dict) -> str:
    """The markdown tables of docs/results/geometric.md."""
    groups = ("all", *GROUPS)
    row = lambda r: " | ".join(f"{r[g]:.3f}" for g in groups)  # noqa: E731
    lines = [
        f"Global KNN only: {row(result['knn'])} (R@1 all / Packages / Fruit / Vegetables); "
        f"a correct item within the top 10: {row(result['ceiling']['10'])}, top 20: {row(result['ceiling']['20'])}",
        "",
        f"Defaults: min_inliers {DEFAULTS.min_inliers}, no early stop, verified first by inliers.",
        "",
        "| features | bytes/item | keypoints found | extract ms | match ms/candidate | N | R@1 all | Packages | Fruit "
        "| Vegetables | rerank ms/query (timed, N 20) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in result["features"].items():
        for variant in entry["variants"]:
            shown = (variant["min_inliers"], variant["order"], variant["stop"])
            if shown == (DEFAULTS.min_inliers, "inliers", None) and variant["n"] in (10, 20):
                lines.append(
                    f"| {name} | {entry['record_bytes']:,} | {entry['mean_keypoints']:.0f} | "
                    f"{entry['extract_ms']:.1f} | {entry['match_ms_per_candidate']:.2f} | {variant['n']} | "
                    f"{row(variant['r1'])} | {entry['timed']['20']:.1f} |"
                )
    header = f"| features | change (N 20, min_inliers {DEFAULTS.min_inliers}) | R@1 all | Packages | Fruit | Veg. |"
    lines += ["", header]
    lines.append("|---|---|---|---|---|---|")
    for name, entry in result["features"].items():
        for ablation in entry.get("ablations", []):
            change = ", ".join(f"{key} = {value}" for key, value in ablation["change"].items())
            lines.append(f"| {name} | {change} | {row(ablation['r1'])} |")
    lines += [
        "",
        "| features | N | min_inliers | order | early stop | R@1 all | Packages | Fruit | Vegetables | pairs/query |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in result["features"].items():
        for v in entry["variants"]:
            lines.append(
                f"| {name} | {v['n']} | {v['min_inliers']} | {v['order']} | {v['stop'] or '-'} | {row(v['r1'])} "
                f"| {v['pairs_per_query']:.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
