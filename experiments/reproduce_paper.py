"""Reproduce the paper's classifier results (Tables 1-2, Figures 7-8) on your data.

    python experiments/reproduce_paper.py --data TRAIN_SPEC --test TEST_SPEC --out RESULTS
        [--config experiments/classifier_X.yaml ...] [--set KEY=VALUE ...]

Trains one classifier per config (default: the three Table-2 models, experiments/classifier_*.yaml:
EfficientNetV2L proposed, MobileNetV2 and ResNet101V2 baselines, ImageNet weights, 224 px, gray)
into RESULTS/runs/<config name>, then evaluates all of them on TEST_SPEC into RESULTS/evaluation:
Table 1 per model (<run>/table1.md), Table 2 comparing them (table2.md), Figure 7
(<run>/history.png) and Figure 8 (<run>/confusion_matrix.png). `--set` overrides any train
setting of every config (e.g. `--set weights=none --set image_size=32` for a smoke test).
Re-running the same command resumes unfinished runs and skips finished ones.
Everything here calls the csearch package; this script only wires it together.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIGS = sorted(HERE.glob("classifier_*.yaml"))


def run_name(config_path: Path) -> str:
    return config_path.stem.removeprefix("classifier_")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, metavar="SPEC", help="training catalogue")
    parser.add_argument("--test", required=True, metavar="SPEC", help="catalogue the tables are reported on")
    parser.add_argument("--out", required=True, metavar="RESULTS")
    parser.add_argument("--config", action="append", type=Path, help="train config(s); default: the three of Table 2")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every config")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from csearch import errors
    from csearch.console import parse_sets
    from csearch.evaluation.classifier import evaluate_classifiers
    from csearch.train import load_train_config, train_classifier

    out = Path(args.out)
    configs = args.config or DEFAULT_CONFIGS
    say = logging.getLogger("reproduce").info
    try:
        overrides = parse_sets(args.set)
        run_dirs = []
        for path in configs:
            config = load_train_config(path, overrides)
            run_dir = out / "runs" / run_name(path)
            say(f"== {run_name(path)}: {config.backbone}, {config.weights}, {config.color} -> {run_dir}")
            command = f"python experiments/reproduce_paper.py {' '.join(sys.argv[1:] if argv is None else argv)}"
            train_classifier(config, args.data, run_dir, say, command)
            run_dirs.append(run_dir)
        results = evaluate_classifiers(run_dirs, args.test, out / "evaluation")
    except errors.CSearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        run_name(p): {k: r[k] for k in ("accuracy", "average_accuracy", "per_class_accuracy_min")}
        for p, r in zip(configs, results)
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(f"Table 2 ({out / 'evaluation' / 'table2.md'}):\n" + (out / "evaluation" / "table2.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
