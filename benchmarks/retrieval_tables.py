"""Write the tables of docs/results/retrieval.md from the files bench_retrieval.py produced.

    python benchmarks/retrieval_tables.py --results docs/results/retrieval --doc docs/results/retrieval.md

Each table sits between `<!-- BEGIN:name -->` and `<!-- END:name -->` in the document and is
replaced; the prose around it is left alone. Tables: `headline` (every case x pipeline, from
summary.json), `modules` (one module of the defaults changed at a time, from each case's
ablation.json) and `shape` (ΔR@1 / ΔmAP@10 of every re-ranker against the defaults).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

CASES = ("train-val", "train-val-packages", "catalogue", "catalogue-packages")
CASE_TITLES = ("train-val", "Packages", "catalogue", "catalogue Packages")
PIPELINES = {
    "plain": "plain (reference)",
    "photo": "photo: EffNet-Lite0 + classifier",
    "cutout": "cut-out: U²-Net-p + EffNet-Lite0 + classifier on the photo",
    "defaults": "**defaults**: cut-out + photo views + classifier on the photo",
    "paper": "paper: U²-Net-p + matting, gray, IoU top 10",
}
METRICS = ("recall@1", "recall@5", "recall@10", "recall@20", "map@10", "r_precision", "mrr")
# (group, variant name in ablation.json, label in the table)
MODULE_ROWS = (
    ("baseline", "plain KNN", "| | plain KNN (reference)"),
    ("localization", "none (whole photo)", "| localization | none (whole photo, one view)"),
    ("localization", "classical (OpenCV)", "|  | classical (OpenCV)"),
    ("localization", "u2net-p + pymatting", "|  | U²-Net-p + pymatting"),
    ("localization", "without box crop", "|  | U²-Net-p, no box crop"),
    ("views", "object cut-out only", "| views | cut-out only (the paper)"),
    ("restriction", "off", "| restriction | off (no classifier)"),
    ("restriction", "predicted top-3, classifier sees the whole photo", "|  | top-3 predicted categories"),
    (
        "restriction",
        "predicted top-1, classifier sees the cut-out",
        "|  | top-1, classifier sees the cut-out (the paper)",
    ),
    ("restriction", "oracle", "|  | oracle (true category; not a result)"),
    ("colour", "gray", "| colour | gray (the paper)"),
    ("extractor", "mobilenet", "| extractor | MobileNet"),
    ("extractor", "mobilenetv2", "|  | MobileNetV2"),
    ("re-ranking", "iou, top 10 (the paper)", "| re-ranking | IoU of the top 10 (the paper)"),
)
SHAPE_ROWS = (
    ("iou, top 5", "IoU, top 5 (the paper)"),
    ("iou, top 10", "IoU, top 10 (the paper)"),
    ("iou, top 20", "IoU, top 20 (the paper)"),
    ("iou_crop, top 10", "IoU of box-cropped masks, top 10"),
    ("fused w=0.5", "fused w=0.5, top 10"),
    ("fused_crop w=0.5", "fused_crop w=0.5, top 10"),
    ("fused w=*", "fused, w and N tuned ‡"),
    ("fused_crop w=*", "fused_crop, w and N tuned ‡"),
    ("aspect_fused", "box aspect-ratio agreement, fused, tuned ‡"),
    ("iou_rrf", "rank fusion (KNN rank + IoU rank), tuned ‡"),
    ("iou_gate", "IoU only among near-ties (gate), tuned ‡"),
)


def find_row(rows: list[dict], group: str, name: str) -> dict:
    """The first row of `group` whose variant equals `name` or starts with it (tuned rows carry
    their chosen weight in the name), else the first that contains it. A trailing `*` asks for
    the row tuned on the gallery."""
    in_group = [r for r in rows if r["group"] == group]
    if name.endswith("*"):
        name, in_group = name[:-1], [r for r in in_group if "tuned on gallery" in r["variant"]]
    for match in (lambda v: v == name, lambda v: v.startswith(name), lambda v: name in v):
        found = [r for r in in_group if match(r["variant"])]
        if found:
            return found[0]
    raise KeyError(f"no ablation row {group} / {name}")


def headline_table(summary: list[dict]) -> str:
    lines = [
        "| case | pipeline | R@1 | R@5 | R@10 | R@20 | mAP@10 | R-Prec | MRR | cat. acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    best = {}  # the best Recall@1 and mAP@10 of each case are bold
    for row in summary:
        for key in ("recall@1", "map@10"):
            best[row["case"], key] = max(best.get((row["case"], key), 0.0), row[key])
    for row in summary:
        acc = row["category_accuracy"]
        cells = [f"**{row[k]:.3f}**" if best.get((row["case"], k)) == row[k] else f"{row[k]:.3f}" for k in METRICS]
        lines.append(
            f"| {row['case']} | {PIPELINES.get(row['pipeline'], row['pipeline'])} | "
            + " | ".join(cells)
            + f" | {'-' if acc is None else format(acc, '.3f')} |"
        )
    return "\n".join(lines)


def modules_table(ablations: dict[str, list[dict]]) -> str:
    lines = ["| module | variant | " + " | ".join(CASE_TITLES) + " |", "|---|---|" + "---|" * len(CASES)]
    pairs = lambda r: f"{r['recall@1']:.3f} / {r['map@10']:.3f}"  # noqa: E731
    lines.append("| | **defaults** | " + " | ".join(pairs(ablations[c][0]) for c in CASES) + " |")
    for group, name, label in MODULE_ROWS:
        lines.append(f"{label} | " + " | ".join(pairs(find_row(ablations[c], group, name)) for c in CASES) + " |")
    return "\n".join(lines)


def shape_table(ablations: dict[str, list[dict]]) -> str:
    lines = ["| re-ranker (top N) | " + " | ".join(CASE_TITLES) + " |", "|---|" + "---|" * len(CASES)]
    for name, label in SHAPE_ROWS:
        cells = []
        for case in CASES:
            base, row = ablations[case][0], find_row(ablations[case], "re-ranking", name)
            cells.append(f"{row['recall@1'] - base['recall@1']:+.3f} / {row['map@10'] - base['map@10']:+.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_block(doc: str, name: str, table: str) -> str:
    pattern = re.compile(rf"(<!-- BEGIN:{name} -->\n).*?(\n<!-- END:{name} -->)", re.S)
    if not pattern.search(doc):
        raise SystemExit(f"the document has no <!-- BEGIN:{name} --> ... <!-- END:{name} --> block")
    return pattern.sub(lambda m: m.group(1) + table + m.group(2), doc)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("docs/results/retrieval"))
    parser.add_argument("--doc", type=Path, default=Path("docs/results/retrieval.md"))
    args = parser.parse_args(argv)
    summary = json.loads((args.results / "summary.json").read_text())
    ablations = {c: json.loads((args.results / c / "ablation.json").read_text())["rows"] for c in CASES}
    doc = args.doc.read_text()
    for name, table in (
        ("headline", headline_table(summary)),
        ("modules", modules_table(ablations)),
        ("shape", shape_table(ablations)),
    ):
        doc = replace_block(doc, name, table)
    args.doc.write_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
