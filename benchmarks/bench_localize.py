"""Cost and agreement of the localization stage on real Grocery Store photos.

    python benchmarks/bench_localize.py --images 20 --json docs/results/localize.json

Per image (medians over --images in-store Packages photos, 348x348), all on this machine's CPU:
  - U²-Net-p at 320 / 256 / 224 (symbolic dims), and 1 vs 2 intra-op threads at 320: wall and
    CPU seconds per image (CPU time is what survives a machine shared with other jobs), and the
    mask IoU of 256/224 against 320;
  - on 10 photos, 2 images at a time on 2 threads of 1 ONNX thread each vs one after another with
    2 threads (indexing throughput; the pipeline localizes in 2 worker threads);
  - closed-form matting (pymatting) of the 320 saliency at bands 5/11/21/31 px, and band 11
    solved at half size: seconds, unknown pixels, IoU of the matted mask vs the saliency mask,
    and how much of U²-Net's own uncertain zone (0.05 < s < 0.95) the band covers;
  - the classical backend: seconds, fallback rate, IoU vs U²-Net-p (in-store and iconic images);
  - quality against a known mask: --composites iconic products (cut out by the classical backend,
    which is reliable on their white backgrounds) pasted with a soft edge (Gaussian sigma 0.5-2.5
    px, sharp to defocused) onto other in-store photos; IoU with the pasted mask and alpha MAE
    for U²-Net-p at each size and each band.
Warm-up calls (session creation, numba JIT of pymatting) are excluded. Configurations are
interleaved per image, in rotating order, so load from other processes hits them evenly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from csearch.localize import ClassicalSaliency, U2NetSaliency, alpha_pymatting, make_trimap  # noqa: E402
from csearch.preprocess import load_image  # noqa: E402

SIZES = (320, 256, 224)
THREADS = (1, 2)  # compared at 320 only: the ratio is what matters, and it keeps the run short
U2NET_CONFIGS = [(320, 1), (320, 2), (256, 1), (224, 1)]
BANDS = (5, 11, 21, 31)
HALF = ("11@0.5", 11, 0.5)  # band 11 trimap, solved at half resolution


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def timed(fn, *args):
    """(result, wall seconds, CPU seconds of the whole process, all threads)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - start, time.process_time() - cpu


def pick(folder: Path, pattern: str, count: int) -> list[Path]:
    """Evenly spaced over the sorted list, so every product group is represented."""
    files = sorted(folder.glob(pattern))
    if not files:
        raise SystemExit(f"no images match {folder}/{pattern}")
    step = max(1, len(files) // count)
    return files[::step][:count]


def bench_u2net(models: dict, image: np.ndarray, rotation: int, rec: dict) -> np.ndarray:
    keys = list(models)
    keys = keys[rotation % len(keys) :] + keys[: rotation % len(keys)]
    maps = {}
    for key in keys:
        maps[key], seconds, cpu = timed(models[key].predict, image)
        rec.setdefault(f"u2net_{key[0]}_t{key[1]}_s", []).append(seconds)
        rec.setdefault(f"u2net_{key[0]}_t{key[1]}_cpu_s", []).append(cpu)
    reference = maps[(320, 1)] > 0.5
    for size in SIZES[1:]:
        rec.setdefault(f"iou_{size}_vs_320", []).append(iou(maps[(size, 1)] > 0.5, reference))
    return maps[(320, 1)]


def uncertain_zone(saliency: np.ndarray) -> tuple[np.ndarray, float]:
    """U²-Net's soft transition (0.05 < s < 0.95) and its mean width in px (area / boundary length)."""
    import cv2

    zone = (saliency > 0.05) & (saliency < 0.95)
    contours, _ = cv2.findContours((saliency > 0.5).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    length = sum(cv2.arcLength(c, True) for c in contours)
    return zone, float(zone.sum() / max(length, 1.0))


def bench_matting(image: np.ndarray, saliency: np.ndarray, rotation: int, rec: dict) -> None:
    zone, width = uncertain_zone(saliency)
    rec.setdefault("uncertain_width_px", []).append(width)
    reference = saliency > 0.5
    configs = [(str(b), b, 1.0) for b in BANDS] + [HALF]
    configs = configs[rotation % len(configs) :] + configs[: rotation % len(configs)]
    for label, band, scale in configs:
        start, cpu = time.perf_counter(), time.process_time()
        trimap = make_trimap(saliency, 0.5, band)
        alpha = alpha_pymatting(image, trimap, scale)
        rec.setdefault(f"matting_{label}_s", []).append(time.perf_counter() - start)
        rec.setdefault(f"matting_{label}_cpu_s", []).append(time.process_time() - cpu)
        unknown = trimap == 128
        rec.setdefault(f"matting_{label}_unknown_frac", []).append(float(unknown.mean()))
        rec.setdefault(f"matting_{label}_iou_vs_saliency", []).append(iou(alpha > 0.5, reference))
        rec.setdefault(f"matting_{label}_covers_uncertain", []).append(
            float((zone & unknown).sum() / max(1, zone.sum()))
        )


def bench_classical(classical, image: np.ndarray, saliency: np.ndarray, rec: dict, prefix: str) -> None:
    mask, seconds, _ = timed(classical.predict, image)
    mask = mask > 0.5
    rec.setdefault(f"{prefix}_s", []).append(seconds)
    rec.setdefault(f"{prefix}_empty", []).append(float(not mask.any()))
    if mask.any():
        rec.setdefault(f"{prefix}_iou_vs_u2net", []).append(iou(mask, saliency > 0.5))


def bench_throughput(model_path: Path, images: list[np.ndarray], rec: dict) -> None:
    """Images per second: 2 workers x 1 thread (as the indexing pipeline runs) vs 1 x 2 threads."""
    single = [U2NetSaliency(model_path, 320, threads=1) for _ in range(2)]
    double = U2NetSaliency(model_path, 320, threads=2)
    for model in (*single, double):
        model.predict(images[0])
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda job: single[job[0] % 2].predict(job[1]), enumerate(images)))
    rec["throughput_2workers_x1thread_img_per_s"] = len(images) / (time.perf_counter() - start)
    start = time.perf_counter()
    for image in images:
        double.predict(image)
    rec["throughput_1worker_x2threads_img_per_s"] = len(images) / (time.perf_counter() - start)


def composite(product: np.ndarray, background: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """Paste the product (classical cut-out of an iconic image) onto a real in-store photo.
    Returns (image, true alpha); None when the cut-out is ragged (a white carton on white loses
    parts; solidity < 0.9), which would make an unnatural object."""
    import cv2

    from csearch.masks import pixel_box

    mask = ClassicalSaliency().predict(product) > 0.5
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull_area = sum(cv2.contourArea(cv2.convexHull(c)) for c in contours)
    if not mask.any() or mask.sum() < 0.9 * hull_area:
        return None
    x0, y0, x1, y1 = pixel_box(mask)
    height, width = background.shape[:2]
    scale = rng.uniform(0.55, 0.75) * height / max(y1 - y0, x1 - x0)
    size = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
    crop = cv2.resize(product[y0:y1, x0:x1], size, interpolation=cv2.INTER_AREA)
    soft = cv2.resize(mask[y0:y1, x0:x1].astype(np.float32), size, interpolation=cv2.INTER_AREA)
    soft = cv2.GaussianBlur(soft, (0, 0), rng.uniform(0.5, 2.5))  # anti-aliased to defocused edges
    top = (height - size[1]) // 2 + int(rng.integers(-height // 10, height // 10 + 1))
    left = (width - size[0]) // 2 + int(rng.integers(-width // 10, width // 10 + 1))
    top, left = int(np.clip(top, 0, height - size[1])), int(np.clip(left, 0, width - size[0]))
    alpha = np.zeros((height, width), np.float32)
    alpha[top : top + size[1], left : left + size[0]] = soft
    image = background.astype(np.float32).copy()
    window = image[top : top + size[1], left : left + size[0]]
    window[:] = soft[:, :, None] * crop + (1 - soft[:, :, None]) * window
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), alpha


def bench_composites(models: dict, products: list, backgrounds: list, count: int, rec: dict) -> None:
    rng = np.random.default_rng(0)
    made = [composite(p, backgrounds[(i * 7 + 3) % len(backgrounds)], rng) for i, p in enumerate(products)]
    made = [m for m in made if m is not None]
    chosen = np.unique(np.linspace(0, len(made) - 1, min(count, len(made))).round().astype(int))
    for image, truth in (made[i] for i in chosen):  # spread over fruit / packages / vegetables
        true_mask = truth > 0.5
        maps = {size: models[(size, 1)].predict(image) for size in SIZES}
        for size, saliency in maps.items():
            rec.setdefault(f"gt_u2net{size}_iou", []).append(iou(saliency > 0.5, true_mask))
            rec.setdefault(f"gt_u2net{size}_mae", []).append(float(np.abs(saliency - truth).mean()))
        for label, band, scale in [(str(b), b, 1.0) for b in BANDS] + [HALF]:
            alpha = alpha_pymatting(image, make_trimap(maps[320], 0.5, band), scale)
            rec.setdefault(f"gt_band{label}_iou", []).append(iou(alpha > 0.5, true_mask))
            rec.setdefault(f"gt_band{label}_mae", []).append(float(np.abs(alpha - truth).mean()))


def summarize(rec: dict) -> dict:
    out = {}
    for key, values in rec.items():
        if isinstance(values, list) and values:
            out[key] = {
                "median": statistics.median(values),
                "mean": float(np.mean(values)),
                "p90": float(np.percentile(values, 90)),
                "n": len(values),
            }
        else:
            out[key] = values
    return out


def print_tables(summary: dict) -> None:
    med = lambda key: summary[key]["median"] if key in summary else float("nan")  # noqa: E731
    print(
        "\n| U²-Net-p input | 1 thread: wall (s) | CPU (s) | 2 threads: wall (s) | CPU (s) | mask IoU vs 320 |\n"
        "|---|---|---|---|---|---|"
    )
    for size in SIZES:
        agreement = "1" if size == 320 else f"{med(f'iou_{size}_vs_320'):.3f}"
        cells = " | ".join(
            f"{med(f'u2net_{size}_t{t}{kind}'):.3f}" if (size, t) in U2NET_CONFIGS else "-"
            for t in THREADS
            for kind in ("_s", "_cpu_s")
        )
        print(f"| {size} | {cells} | {agreement} |")
    print(
        f"\nthroughput at 320: 2 workers x 1 thread {summary['throughput_2workers_x1thread_img_per_s']:.2f} img/s, "
        f"1 worker x 2 threads {summary['throughput_1worker_x2threads_img_per_s']:.2f} img/s"
    )
    print(f"U²-Net-p uncertain zone (0.05<s<0.95) mean width: median {med('uncertain_width_px'):.1f} px")
    print(
        "\n| band | matting wall (s) | p90 (s) | CPU (s) | unknown px | IoU vs saliency | covers uncertain zone |\n"
        "|---|---|---|---|---|---|---|"
    )
    for label in [str(b) for b in BANDS] + [HALF[0]]:
        key = f"matting_{label}"
        print(
            f"| {label} | {med(key + '_s'):.3f} | {summary[key + '_s']['p90']:.3f} | {med(key + '_cpu_s'):.3f} | "
            f"{med(key + '_unknown_frac'):.1%} | {med(key + '_iou_vs_saliency'):.3f} | "
            f"{med(key + '_covers_uncertain'):.1%} |"
        )
    if "gt_u2net320_iou" in summary:
        print(
            f"\nagainst the true mask ({summary['gt_u2net320_iou']['n']} composites)\n"
            "| localization | IoU median | IoU mean | alpha MAE |\n|---|---|---|---|"
        )
        rows = [(f"U²-Net-p {s}, no matting", f"gt_u2net{s}") for s in SIZES]
        rows += [(f"U²-Net-p 320 + pymatting band {b}", f"gt_band{b}") for b in [*map(str, BANDS), HALF[0]]]
        for label, key in rows:
            print(
                f"| {label} | {med(key + '_iou'):.3f} | {summary[key + '_iou']['mean']:.3f} | "
                f"{summary[key + '_mae']['mean']:.4f} |"
            )
    for prefix in ("classical_instore", "classical_iconic"):
        if f"{prefix}_s" in summary:
            agreement = (
                f"median {med(prefix + '_iou_vs_u2net'):.3f}"
                if prefix + "_iou_vs_u2net" in summary
                else "n/a (no mask)"
            )
            empty = np.mean(summary[prefix + "_empty_all"])
            print(
                f"\n{prefix}: {med(prefix + '_s'):.3f} s, empty->full rate {empty:.0%}, "
                f"IoU vs U²-Net-p (non-empty) {agreement}"
            )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20, help="in-store Packages photos (default 20)")
    parser.add_argument("--iconic", type=int, default=10, help="iconic images for the classical check (default 10)")
    parser.add_argument("--composites", type=int, default=16, help="iconic products pasted on photos (default 16)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/datasets/grocery-store")
    parser.add_argument("--model", type=Path, default=REPO.parent / "shared/models/u2netp.onnx")
    parser.add_argument("--json", type=Path, help="also write the raw per-image numbers and medians here")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    load_before = os.getloadavg()
    photos = [load_image(p) for p in pick(args.data / "train" / "Packages", "*/*/*.jpg", args.images)]
    iconic = [load_image(p) for p in pick(args.data / "iconic-images-and-descriptions", "*/*/*/*.jpg", args.iconic)]
    models = {(s, t): U2NetSaliency(args.model, s, threads=t) for s, t in U2NET_CONFIGS}
    classical = ClassicalSaliency()
    warm = models[(320, 1)].predict(photos[0])  # warm-up: sessions, numba JIT, caches
    for model in models.values():
        model.predict(photos[0])
    alpha_pymatting(photos[0], make_trimap(warm, 0.5, 11))
    classical.predict(photos[0])

    rec: dict = {}
    for i, image in enumerate(photos):
        saliency = bench_u2net(models, image, i, rec)
        bench_matting(image, saliency, i, rec)
        bench_classical(classical, image, saliency, rec, "classical_instore")
    for image in iconic:
        bench_classical(classical, image, models[(320, 1)].predict(image), rec, "classical_iconic")
    products = [
        load_image(p) for p in pick(args.data / "iconic-images-and-descriptions", "*/*/*/*.jpg", 2 * args.composites)
    ]
    backgrounds = [load_image(p) for p in pick(args.data / "train", "*/*/*/*.jpg", 40)]
    bench_composites(models, products, backgrounds, args.composites, rec)
    bench_throughput(args.model, photos[:10], rec)

    summary = summarize(rec)
    for prefix in ("classical_instore", "classical_iconic"):
        summary[prefix + "_empty_all"] = rec[prefix + "_empty"]
    summary["meta"] = {
        "images": len(photos),
        "iconic": len(iconic),
        "composites": len(rec.get("gt_u2net320_iou", [])),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "total_s": time.perf_counter() - started,
        "argv": sys.argv,
    }
    print_tables(summary)
    print(
        f"\nload average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
        f"total {summary['meta']['total_s']:.0f} s",
        file=sys.stderr,
    )
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "per_image": rec}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
