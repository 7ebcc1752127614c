"""`python -m csearch.train classifier|embedder`: train the category classifier or the product embedding.

    python -m csearch.train embedder --data SPEC --out RUN_DIR [--config FILE] [--set KEY=VALUE ...] [--json]
    python -m csearch.train classifier --data SPEC --backbone NAME --out RUN_DIR
        [--weights imagenet|none|PATH] [--config FILE] [--epochs N] [--batch-size N]
        [--image-size N] [--color rgb|gray] [--freeze-backbone | --unfreeze N] [--val SPEC]
        [--seed N] [--set KEY=VALUE ...] [--json]

An interrupted run resumes when the same command is run again with the same --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Optional

from ..console import parse_sets, quiet_frameworks, run_command
from .classifier import log, train_classifier
from .config import TrainConfig, load_train_config


def shown_value(value) -> str:
    """A default as YAML writes it (null, true, false)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def settings_epilog() -> str:
    """Every train setting with its default, for --config FILE and --set KEY=VALUE."""
    defaults = TrainConfig().to_dict()
    shown = ", ".join(f"{key}={shown_value(value)}" for key, value in defaults.items())
    return f"Train settings for --config FILE (YAML) and --set KEY=VALUE, with their defaults: {shown}."


def build_parser() -> argparse.ArgumentParser:
    from ..models import names

    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m csearch.train", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser(
        "classifier",
        help="train the category classifier (the paper's head on a backbone)",
        description="Train the category classifier that `csearch index --classifier RUN_DIR` uses to search "
        "only the predicted category: the paper's head on a pretrained backbone, SGD with early stopping. "
        "Writes model.keras, classes.json, the resolved config.yaml, history.csv and summary.json to RUN_DIR. "
        "An interrupted run "
        "resumes when the same command is run again with the same --out.",
        epilog=settings_epilog(),
    )
    p.add_argument("--data", required=True, metavar="SPEC", help="training catalogue (folder, CSV, Grocery .txt)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="output folder; the same --out resumes")
    p.add_argument("--backbone", help=f"one of {', '.join(names('backbone'))} (default {defaults.backbone})")
    p.add_argument(
        "--weights",
        metavar="imagenet|none|PATH",
        help=f"backbone weights: imagenet (looked up in $CSEARCH_HOME), none or a file (default {defaults.weights})",
    )
    p.add_argument("--config", metavar="FILE", help="YAML with train settings (listed below); flags override it")
    p.add_argument(
        "--epochs", type=int, help=f"maximum epochs; early stopping usually ends sooner (default {defaults.epochs})"
    )
    p.add_argument("--batch-size", type=int, help=f"images per training step (default {defaults.batch_size})")
    p.add_argument("--image-size", type=int, help="input side in px (default: the backbone's native size)")
    p.add_argument("--color", help=f"rgb | gray (default {defaults.color}; the paper: gray)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--freeze-backbone", action="store_true", default=None, help="train the head only")
    group.add_argument(
        "--unfreeze",
        type=int,
        metavar="N",
        help=f"also train the top N backbone layers (-1: all; default {defaults.unfreeze})",
    )
    p.add_argument("--val", metavar="SPEC", help="validation catalogue (default: stratified split of --data)")
    p.add_argument("--seed", type=int, help=f"random seed of the split and the augmentation (default {defaults.seed})")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="any other train setting, e.g. --set copies=2 (repeatable; every setting is listed below)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    _add_embedder_parser(sub)
    return parser


def embedder_epilog() -> str:
    from .embedder_config import EmbedderConfig

    shown = ", ".join(f"{key}={shown_value(value)}" for key, value in EmbedderConfig().to_dict().items())
    return f"Embedder settings for --config FILE (YAML) and --set KEY=VALUE, with their defaults: {shown}."


def _add_embedder_parser(sub) -> None:
    from .embedder_config import EmbedderConfig

    defaults = EmbedderConfig()
    p = sub.add_parser(
        "embedder",
        help="learn a product embedding from the catalogue's product labels (better than ImageNet features)",
        description="Learn a product embedding from the catalogue's own product labels: the frozen backbone's "
        "last feature map is pooled (R-MAC) and a linear head is trained (normalised-softmax loss) on the "
        "cut-out and whole-photo views of every image plus augmented copies, stopping on the Recall@1 of a "
        "held-out part of the catalogue. Use it with `csearch index CATALOGUE --out INDEX_DIR --embedder "
        "RUN_DIR`. Localizations and features are cached (--set cache_dir=DIR, default $CSEARCH_EVAL_CACHE "
        "or ~/.cache/csearch/eval), so reruns are fast. An interrupted run resumes when the same command is "
        "run again with the same --out.",
        epilog=embedder_epilog(),
    )
    p.set_defaults(kind="embedder")
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="SPEC",
        help="catalogue(s) with product labels (folder, CSV, Grocery .txt): give the catalogue images AND any "
        "in-use photos of the same products, e.g. --data CATALOGUE PHOTOS (far better than either alone)",
    )
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="output folder; the same --out resumes")
    p.add_argument("--config", metavar="FILE", help="YAML with embedder settings (listed below); flags override it")
    p.add_argument(
        "--epochs", type=int, help=f"maximum epochs; early stopping usually ends sooner (default {defaults.epochs})"
    )
    p.add_argument(
        "--seed", type=int, help=f"random seed of the split, the augmentation and the head (default {defaults.seed})"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="any setting listed below, e.g. --set dim=128 (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def _run_embedder(args: argparse.Namespace) -> int:
    from .embedder import train_embedder
    from .embedder_config import load_embedder_config

    overrides = {**parse_sets(args.set), "epochs": args.epochs, "seed": args.seed}
    config = load_embedder_config(args.config, overrides)
    data = args.data[0] if len(args.data) == 1 else args.data
    summary = train_embedder(config, data, args.out, log.info, args.command_line)
    log.info(
        "held-out Recall@1 %.3f (frozen features %.3f); use it: csearch index CATALOGUE --out INDEX_DIR --embedder %s",
        summary["held_out_recall_at_1"], summary["held_out_recall_at_1_frozen"], args.out,
    )  # fmt: skip
    if args.json:
        args.stdout.write(json.dumps(summary) + "\n")
    return 0


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "kind", None) == "embedder":
        return _run_embedder(args)
    overrides = {
        **parse_sets(args.set),
        "backbone": args.backbone,
        "weights": args.weights,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "color": args.color,
        "val": args.val,
        "seed": args.seed,
    }
    if args.freeze_backbone:
        overrides["freeze_backbone"] = True
    if args.unfreeze is not None:
        overrides.update(unfreeze=args.unfreeze, freeze_backbone=False)
    config = load_train_config(args.config, overrides)
    summary = train_classifier(config, args.data, args.out, log.info, args.command_line)
    if args.json:
        args.stdout.write(json.dumps(summary) + "\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """One-line errors (exit 2), Ctrl-C resumable (exit 130), stdout kept for --json: the
    shared csearch.console.run_command."""
    quiet_frameworks()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = "python -m csearch.train " + " ".join(argv)
    return run_command(_run, args, "run the same command again to resume")
