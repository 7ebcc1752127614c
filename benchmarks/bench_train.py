"""Training cost of `python -m csearch.train classifier`: wall time, CPU time, peak memory.

    python benchmarks/bench_train.py --data ../shared/datasets/grocery-store/train.txt \
        --backbone mobilenet --weights ../shared/models/mobilenet_1.0_224_imagenet.weights.h5 \
        --out /work/runs/clf-mobilenet [--set KEY=VALUE ...] [--json FILE]

Runs the trainer in a child process (so its peak RSS is the trainer's own, read from
`resource.getrusage(RUSAGE_CHILDREN)`), and records the 1-minute load average before and after:
on a shared machine a high load explains a slow run. Numbers go to stderr, and as JSON to FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--out", required=True)
    parser.add_argument("--val", help="validation SPEC (default: split of --data)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train flags")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    args = parser.parse_args()
    command = [
        sys.executable,
        "-m",
        "csearch.train",
        "classifier",
        "--data",
        args.data,
        "--backbone",
        args.backbone,
        "--weights",
        args.weights,
        "--out",
        args.out,
        "--json",
    ]
    command += ["--val", args.val] if args.val else []
    for item in args.set:
        command += ["--set", item]
    command += args.extra
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        print(f"training failed with exit code {result.returncode}", file=sys.stderr)
        return result.returncode
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    row = {
        "command": " ".join(command[1:]),
        "backbone": args.backbone,
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "load_avg_before": round(load_before, 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "val_accuracy": summary.get("val_accuracy"),
        "mode": summary.get("mode"),
        "epochs_run": summary.get("epochs_run"),
        "feature_s": summary.get("feature_seconds"),
    }
    print(json.dumps(row, indent=2), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
