"""Retrieval results on the Grocery Store dataset (real weights), as recorded in
docs/results/retrieval.md.

Cases (val photos are always the queries; nothing is tuned on anything else):
    train-val            gallery train.txt (2,640 in-store photos), queries val.txt (296)
    train-val-packages   the same, Packages group only (--subset /Packages/)
    catalogue            gallery = the 81 iconic product images (classes.csv), queries val.txt
    catalogue-packages   the same, Packages group only

Pipelines per case:
    plain     global KNN over MobileNet ImageNet features: no localization, RGB, unrestricted,
              no re-ranking (the issue's reference baseline)
    photo     EfficientNet-Lite0 on the whole photo, and with --classifier RUN_DIR the search
              restricted to the predicted category (top-1)
    cutout    U²-Net-p cut-out only (no matting, cropped to its box), EfficientNet-Lite0, the
              classifier (if given) on the whole photo
    defaults  the command's defaults (csearch/config.py), no model flags: the cut-out and the
              whole photo as two views, the classifier (if given) on the whole photo; the ablation
              (--ablate) and figures (--figures) run around it
    paper     the paper's choices: U²-Net-p + matting, grayscale, MobileNet, IoU re-ranking of
              the top 10 (unrestricted)

    CSEARCH_HOME=../shared/models python benchmarks/bench_retrieval.py --classifier RUN_DIR --ablate --figures
    python benchmarks/bench_retrieval.py --cases train-val --pipelines plain      # one cell

Each cell is one `python -m csearch.evaluate retrieval` command, run as a subprocess and
recorded verbatim (with its runtime) in OUT/summary.{json,md}. Only the first case runs its
queries live; the others reuse the cached query localizations (--cached-queries), so their
localize latency is a cache read (their accuracy is unaffected).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GROCERY = REPO.parent / "shared" / "datasets" / "grocery-store"
MODELS = REPO.parent / "shared" / "models"

CASES = {
    "train-val": ("train.txt", None),
    "train-val-packages": ("train.txt", "/Packages/"),
    "catalogue": ("classes.csv", None),
    "catalogue-packages": ("classes.csv", "/Packages/"),
}
PLAIN = ["--localizer", "none", "--matting", "none", "--color", "rgb", "--extractor", "mobilenet", "--rerank", "none"]
PHOTO = [
    "--localizer",
    "none",
    "--matting",
    "none",
    "--color",
    "rgb",
    "--extractor",
    "efficientnet_lite0",
    "--rerank",
    "none",
]
CUTOUT = [
    "--localizer",
    "u2net",
    "--matting",
    "none",
    "--color",
    "rgb",
    "--extractor",
    "efficientnet_lite0",
    "--set",
    "localize.crop=true",
    "--rerank",
    "none",
]
CUTOUT += ["--set", "embed.views=cutout"]
PAPER = [
    "--localizer",
    "u2net",
    "--matting",
    "pymatting",
    "--color",
    "gray",
    "--extractor",
    "mobilenet",
    "--rerank",
    "iou",
    "--rerank-top",
    "10",
    "--set",
    "embed.views=cutout",
    "--set",
    "classify.input=cutout",
]
PIPELINES = {
    "plain": PLAIN,
    "photo": PHOTO,
    "cutout": CUTOUT,
    "defaults": [],
    "paper": PAPER,
    "embedder": [],  # the defaults with --embedder RUN_DIR (and the classifier)
    "embedder-only": [],  # the defaults with --embedder RUN_DIR and no classifier: the embedding's own category
    "embedder-geometric": ["--rerank", "geometric", "--rerank-top", "20"],  # + geometric verification of the top 20
}
WITH_CLASSIFIER = {"photo": [], "cutout": [], "defaults": [], "embedder": []}  # pipelines given --classifier
WITH_EMBEDDER = ("embedder", "embedder-only", "embedder-geometric")  # pipelines given --embedder
ABLATED = "defaults"  # the pipeline --ablate / --figures run around
PUBLISHED_FIGURES = {"train-val": "*.png", "catalogue": "figure9_*.png"}  # glob per case
KEYS = ("recall@1", "recall@5", "recall@10", "recall@20", "map@10", "r_precision", "mrr")


def entry_point() -> list[str]:
    """The command each cell runs (its arguments follow)."""
    return [sys.executable, "-m", "csearch.evaluate", "retrieval"]


def command(
    case: str,
    pipeline: str,
    out: Path,
    cache: Path,
    live: bool,
    ablate: bool,
    figures: bool,
    classifier: str | None = None,
    embedder: str | None = None,
) -> list[str]:
    gallery, subset = CASES[case]
    cmd = entry_point() + [
        "--gallery",
        str(GROCERY / gallery),
        "--queries",
        str(GROCERY / "val.txt"),
        "--out",
        str(out / case / pipeline),
        "--cache-dir",
        str(cache),
    ]
    if subset:
        cmd += ["--subset", subset]
    if not live:
        cmd.append("--cached-queries")
    cmd += PIPELINES[pipeline]
    if classifier and pipeline in WITH_CLASSIFIER:
        cmd += ["--classifier", classifier] + WITH_CLASSIFIER[pipeline]
    if pipeline in WITH_EMBEDDER:
        if not embedder:
            raise SystemExit(f"pipeline {pipeline} needs --embedder RUN_DIR")
        cmd += ["--embedder", embedder]
    if ablate:
        cmd.append("--ablate")
    if figures:
        cmd.append("--figures")
    return cmd


def run(cmd: list[str], env: dict) -> float:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    return time.perf_counter() - started


def _shown(value) -> str:
    return "-" if value is None else format(value, ".3f")


def summary_table(rows: list[dict]) -> str:
    lines = [
        "| case | pipeline | R@1 | R@5 | R@10 | R@20 | mAP@10 | R-Prec | MRR | cat. acc | top-1 cat. acc | p50 ms | "
        "p95 ms | queries | gallery | runtime s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['pipeline']} | "
            + " | ".join(f"{r[k]:.3f}" for k in KEYS)
            + f" | {'-' if r['category_accuracy'] is None else format(r['category_accuracy'], '.3f')}"
            + f" | {_shown(r.get('nearest_category_accuracy'))}"
            + f" | {r['latency_ms_p50']:.0f} | {r['latency_ms_p95']:.0f} | {r['n_queries']} | "
            f"{r['n_gallery']} | {r['runtime_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "retrieval")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(os.environ.get("CSEARCH_EVAL_CACHE", "/work/cache/csearch-eval"))
    )
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help=f"comma-separated: {', '.join(PIPELINES)}")
    parser.add_argument(
        "--classifier", metavar="RUN_DIR", help="category classifier for the photo and cutout pipelines"
    )
    parser.add_argument("--embedder", metavar="RUN_DIR", help="learned embedding for the embedder pipelines")
    parser.add_argument("--ablate", action="store_true", help=f"ablation table for each case (around {ABLATED})")
    parser.add_argument("--figures", action="store_true", help=f"figures for each case ({ABLATED} pipeline)")
    parser.add_argument("--resume", action="store_true", help="skip cells whose identical command already ran")
    parser.add_argument("--live", default="train-val", help="the case whose queries run uncached (honest latency)")
    parser.add_argument(
        "--publish",
        type=Path,
        metavar="DIR",
        help="copy the results into DIR the way "
        "docs/results/retrieval/ holds them (then run benchmarks/retrieval_tables.py)",
    )
    args = parser.parse_args(argv)
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    # OpenBLAS threads spin on the tiny per-query matrix products (mask resize, one-query KNN):
    # on a shared 2-core box they made them 100x slower (0.2 ms -> 30-60 ms). One thread per process.
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("CSEARCH_HOME", str(MODELS))
    rows = []
    summary_path = args.out / "summary.json"
    for case in args.cases.split(","):
        for pipeline in args.pipelines.split(","):
            extra = pipeline == ABLATED
            cmd = command(
                case,
                pipeline,
                args.out,
                args.cache_dir,
                case == args.live,
                extra and args.ablate,
                extra and args.figures,
                args.classifier,
                args.embedder,
            )
            cell = args.out / case / pipeline
            done = cell / "bench_cell.json"
            if args.resume and done.is_file() and json.loads(done.read_text())["command"] == cmd:
                seconds = json.loads(done.read_text())["seconds"]  # same command already ran
            else:
                seconds = run(cmd, env)
                done.write_text(json.dumps({"command": cmd, "seconds": seconds}))
            report = json.loads((cell / "retrieval.json").read_text())
            rows.append(
                {
                    "case": case,
                    "pipeline": pipeline,
                    **{k: report[k] for k in KEYS},
                    "category_accuracy": report["category_accuracy"],
                    "nearest_category_accuracy": report.get("nearest_category_accuracy"),
                    "restriction": report["restriction"],
                    "latency_ms_p50": report["latency_ms_p50"],
                    "latency_ms_p95": report["latency_ms_p95"],
                    "n_queries": report["n_queries"],
                    "n_gallery": report["n_gallery"],
                    "runtime_s": round(seconds, 1),
                    "command": " ".join(shlex.quote(c) for c in cmd).replace(str(REPO.parent), ".."),
                }
            )
    args.out.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(rows, indent=1))
    (args.out / "summary.md").write_text(
        summary_table(rows) + "\n\nCommands:\n\n" + "\n".join(f"    {r['command']}" for r in rows) + "\n"
    )
    print(summary_table(rows))
    if args.publish:
        publish(args.out, args.publish, [r["case"] for r in rows], [r["pipeline"] for r in rows])
    return 0


def publish(out: Path, dest: Path, cases: list[str], pipelines: list[str]) -> None:
    """OUT/<case>/<pipeline>/retrieval.json -> DEST/<case>/<pipeline>.retrieval.json, the ablation
    and figures of the ablated pipeline, and the summary, with this machine's paths shortened."""
    import shutil

    for case, pipeline in zip(cases, pipelines):
        (dest / case).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / case / pipeline / "retrieval.json", dest / case / f"{pipeline}.retrieval.json")
        if pipeline == ABLATED:
            for name in ("ablation.json", "ablation.md"):
                if (out / case / pipeline / name).is_file():
                    shutil.copyfile(out / case / pipeline / name, dest / case / name)
            for figure in sorted((out / case / pipeline / "figures").glob(PUBLISHED_FIGURES.get(case, "-"))):
                shutil.copyfile(figure, dest / case / figure.name)
    for name in ("summary.json", "summary.md"):
        text = (out / name).read_text().replace(sys.executable, "python").replace(str(REPO.parent) + "/", "../")
        (dest / name).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
