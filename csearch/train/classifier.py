"""`train_classifier`: one training run, from a catalogue to a RUN_DIR.

How training stays fast on a CPU: every image is decoded and resized once (thread pool), then
the frozen bottom of the backbone runs once per image and per *copy* - copy 0 is the image
itself, copies 1..K are random augmentations (the classifier's own RandomFlip/RandomRotation/
RandomZoom layers) - and the activations are cached on disk. Each epoch then shows every image
as one randomly chosen copy, and only the trainable top (the head, plus the unfrozen top
backbone layers) runs forward and backward. With K copies, augmentation is K-fold instead of
fresh every epoch: the price of training in minutes instead of hours (measured in
docs/results/classifier.md). Where the unfrozen part cannot be cut off as one tensor (or the
cache would be too large) the whole model trains on images, with augmentation fresh per batch.

Early stopping and the learning-rate schedule watch a validation split carved from the
training data (a seeded stratified split, or --val SPEC), never the data you report on.
An interrupted run resumes when the same call is made again with the same RUN_DIR.

Keras is imported only here, inside `train_classifier` (via .batches, .callbacks, .cut and
csearch.classifier_model), so importing csearch.train stays cheap.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from .. import __version__, errors
from ..data import read_catalogue
from .config import TrainConfig, validate
from .data import prepare_data
from .history import read_history

log = logging.getLogger("csearch.train")

Stage = tuple[str, Optional[int], int]  # (name, unfreeze, epochs)


def resolved_run_config(config: TrainConfig, data: str, command: Optional[str], weights_path: Optional[Path]) -> dict:
    """What RUN_DIR/config.yaml records: the resolved settings plus what else fixes the result."""
    from ..models import file_sha256

    return {
        "train": config.to_dict(),
        "data": str(Path(data).expanduser().resolve()),
        "command": command,
        "csearch_version": __version__,
        "weights_file": None if weights_path is None else str(weights_path),
        "weights_sha256": None if weights_path is None else file_sha256(weights_path),
    }


def check_run_dir(run_dir: Path, resolved: dict, identity: tuple = ("data", "weights_sha256")) -> Optional[dict]:
    """Resume rules (every trainer's): the same config resumes (or returns the finished summary);
    another config, or other `identity` entries (data, model file digests), in the same RUN_DIR
    is an error rather than a silent mix of two runs."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return None
    saved = yaml.safe_load(config_path.read_text()) or {}
    previous, current = saved.get("train", {}), resolved["train"]
    changed = [
        (k, previous.get(k), current.get(k))
        for k in sorted(set(previous) | set(current))
        if previous.get(k) != current.get(k)
    ]
    changed += [(k, saved.get(k), resolved.get(k)) for k in identity if saved.get(k) != resolved.get(k)]
    if changed:
        key, old, new = changed[0]
        raise errors.ConfigError(
            f"{run_dir} holds a run with another config ({key}: {old!r} -> {new!r}); use a new --out or delete it"
        )
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else None


def _export_onnx(run_dir: Path, notes: list, say) -> Optional[float]:
    """Export the finished model to RUN_DIR/model.onnx (checked against Keras), so that queries and
    indexes run it in ONNX Runtime and never import TensorFlow. A failed export leaves a working
    Keras RUN_DIR and says so (in the log and the summary's notes)."""
    from ..classify import export_classifier

    try:
        _, diff = export_classifier(run_dir)
    except Exception as exc:  # noqa: BLE001 (any exporter failure: the Keras model still serves)
        message = (
            f"ONNX export failed ({errors.one_line(exc)}); queries will load Keras. Retry: csearch export {run_dir}"
        )
        log.warning(message)
        notes.append(message)
        return None
    say(f"exported model.onnx (max |onnxruntime - keras| = {diff:.1e})")
    return diff


def stages(config: TrainConfig, unfreeze: Optional[int]) -> list[Stage]:
    """An optional head-only warm-up, then the main stage."""
    if unfreeze == 0:
        return [("head", 0, config.epochs)]
    warmup = [("warmup", 0, config.warmup_epochs)] if config.warmup_epochs else []
    return warmup + [("finetune", unfreeze, config.epochs)]


def _count_weights(weights) -> int:
    return sum(int(np.prod(w.shape)) for w in weights)


def train_classifier(
    config: TrainConfig,
    data: str,
    out: str | Path,
    say: Callable[[str], None] = log.info,
    command: Optional[str] = None,
) -> dict:
    """Train and write RUN_DIR (model.keras, classes.json, history.csv, config.yaml,
    summary.json). Returns the summary."""
    started = time.perf_counter()
    config = validate(config)
    catalogue = read_catalogue(data)  # cheap: a wrong SPEC fails before weights are looked up
    from ..models import resolve_weights

    weights_path = resolve_weights(config.backbone, config.weights)  # fail fast: offline, typo
    run_dir = Path(out).expanduser().resolve()
    resolved = resolved_run_config(config, data, command, weights_path)
    finished = check_run_dir(run_dir, resolved)
    if finished is not None:
        say(f"{run_dir} already holds this finished run; nothing to do")
        return finished
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    import keras

    from ..classifier_model import build_classifier, set_trainable
    from .batches import cached_batches, image_batches
    from .callbacks import fit_stage
    from .cut import plan_cut, trainable_part

    keras.utils.set_random_seed(config.seed)
    prepared = prepare_data(config, catalogue, say)
    class_names, train, val = prepared.class_names, prepared.train, prepared.val
    (run_dir / "classes.json").write_text(json.dumps(class_names, indent=1) + "\n")
    say(f"{len(class_names)} classes; {len(train.labels)} training and {len(val.labels)} validation images")

    unfreeze = config.effective_unfreeze()
    model = build_classifier(
        config.backbone,
        len(class_names),
        weights_path,
        config.image_size,
        unfreeze,
        rotation=config.rotation,
        zoom=config.zoom,
        flip=config.flip,
        seed=config.seed,
    )
    plan = plan_cut(model, config, unfreeze, len(train.labels) + len(val.labels), say)
    cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else run_dir / "cache"
    feature_seconds = 0.0
    if plan is None:
        (train_data, val_data), fitted, mode = image_batches(train, val, config), model, "images"
    else:
        bottom, top = plan
        t0 = time.perf_counter()
        train_data, val_data, cut_shape = cached_batches(
            bottom, train, val, config, cache_dir, resolved["weights_sha256"], say
        )
        feature_seconds = time.perf_counter() - t0
        fitted = trainable_part(model, top, cut_shape)
        mode = "features" if top is None else f"cached activations {tuple(cut_shape)}"

    run_stages = stages(config, unfreeze)
    for stage, stage_unfreeze, epochs in run_stages:
        done = run_dir / "backup" / f"{stage}.done.weights.h5"
        set_trainable(model, stage_unfreeze)
        if done.is_file():
            model.load_weights(done)
            say(f"[{stage}] finished before; weights restored")
            continue
        say(
            f"[{stage}] training {_count_weights(fitted.trainable_weights):,} parameters for up to "
            f"{epochs} epochs ({mode})"
        )
        fit_stage(fitted, stage, train_data, val_data, epochs, config, run_dir, say)
        model.save_weights(done)
    set_trainable(model, unfreeze)

    val_loss, val_accuracy = (float(v) for v in fitted.evaluate(val_data, verbose=0))
    model.save(run_dir / "model.keras")
    history = read_history(run_dir / "history.csv")
    summary = {
        "backbone": config.backbone,
        "weights": config.weights,
        "image_size": config.image_size,
        "color": config.color,
        "mode": mode,
        "unfreeze": unfreeze,
        "val_accuracy": val_accuracy,
        "val_loss": val_loss,
        "val_source": config.val or f"stratified {config.val_fraction:.0%} of --data (seed {config.seed})",
        "n_classes": len(class_names),
        "n_train": int(len(train.labels)),
        "n_val": int(len(val.labels)),
        "epochs_run": {s: sum(1 for r in history if r["stage"] == s) for s, _, _ in run_stages},
        "params": int(model.count_params()),
        "trainable_params": _count_weights(model.trainable_weights),
        "train_seconds": round(time.perf_counter() - started, 1),
        "feature_seconds": round(feature_seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "skipped": [{"path": p, "reason": r} for p, r in prepared.skipped],
        "n_skipped": len(prepared.skipped),
        "notes": prepared.notes,
    }
    summary["onnx_max_abs_diff"] = _export_onnx(run_dir, summary["notes"], say)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(run_dir / "backup", ignore_errors=True)
    if not config.cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)
    say(f"done in {summary['train_seconds']:.0f}s: validation accuracy {val_accuracy:.4f} -> {run_dir}")
    return summary
