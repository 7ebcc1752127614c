"""One training stage's fit(): the paper's SGD and callbacks, made to survive an interruption.

Progress goes to `say` one line per epoch, history.csv gets a row per epoch, and early stopping
and the learning-rate schedule keep their counters (and best weights) in RUN_DIR/backup/<stage>,
beside Keras' own BackupAndRestore state, so running the same command again resumes the stage.
This module imports Keras: the trainer imports it only when it trains.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from .config import TrainConfig
from .history import record_epoch


def learning_rate(model) -> float:
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


class EpochTimer(keras.callbacks.Callback):
    """Base of the per-epoch reporters: times each epoch."""

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.started


class EpochLog(EpochTimer):
    """One line per epoch on stderr (Keras' own progress bar is off: verbose=0)."""

    def __init__(self, say: Callable[[str], None], stage: str, epochs: int):
        super().__init__()
        self.say, self.stage, self.epochs = say, stage, epochs

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        nan = float("nan")
        self.say(
            f"[{self.stage}] epoch {epoch + 1}/{self.epochs} "
            f"loss {logs.get('loss', nan):.4f} acc {logs.get('accuracy', nan):.4f} "
            f"val_loss {logs.get('val_loss', nan):.4f} val_acc {logs.get('val_accuracy', nan):.4f} "
            f"lr {learning_rate(self.model):.2e} ({self.seconds():.1f}s)"
        )


class HistoryCSV(EpochTimer):
    """history.csv: one row per (stage, epoch); a resumed epoch replaces its row."""

    def __init__(self, path: Path, stage: str):
        super().__init__()
        self.path, self.stage = Path(path), stage

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        record_epoch(
            self.path,
            {
                "stage": self.stage,
                "epoch": epoch + 1,
                **{k: logs.get(k) for k in ("loss", "accuracy", "val_loss", "val_accuracy")},
                "learning_rate": learning_rate(self.model),
                "seconds": round(self.seconds(), 3),
            },
        )


def _best(value) -> float | None:
    return None if value is None else float(value)


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping whose counters and best weights survive an interruption."""

    def __init__(self, folder: Path, **kwargs):
        super().__init__(**kwargs)
        self.folder = Path(folder)
        self.state_path = self.folder / "early_stopping.json"
        self.weights_path = self.folder / "early_stopping.best.npz"

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.state_path.is_file():
            state = json.loads(self.state_path.read_text())
            self.wait, self.best, self.best_epoch = state["wait"], state["best"], state["best_epoch"]
            if self.weights_path.is_file():
                with np.load(self.weights_path) as data:
                    self.best_weights = [data[f"w{i}"] for i in range(len(data.files))]

    def on_epoch_end(self, epoch, logs=None):
        previous_best = self.best_epoch
        super().on_epoch_end(epoch, logs)
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.best_weights is not None and (self.best_epoch != previous_best or not self.weights_path.is_file()):
            tmp = self.weights_path.with_name("tmp-" + self.weights_path.name)
            np.savez(tmp, **{f"w{i}": w for i, w in enumerate(self.best_weights)})
            os.replace(tmp, self.weights_path)
        self.state_path.write_text(
            json.dumps({"wait": self.wait, "best": _best(self.best), "best_epoch": self.best_epoch})
        )


class ResumableReduceLR(keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau whose counters survive an interruption (the learning rate itself
    is an optimizer variable, restored by BackupAndRestore)."""

    def __init__(self, folder: Path, **kwargs):
        super().__init__(**kwargs)
        self.folder = Path(folder)
        self.state_path = self.folder / "reduce_lr.json"

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.state_path.is_file():
            state = json.loads(self.state_path.read_text())
            self.wait, self.best, self.cooldown_counter = state["wait"], state["best"], state["cooldown"]

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.state_path.write_text(
            json.dumps({"wait": self.wait, "best": _best(self.best), "cooldown": self.cooldown_counter})
        )


def compile_for_training(model, config: TrainConfig) -> None:
    """SGD with Nesterov momentum on sparse categorical cross-entropy (the paper's setup)."""
    optimizer = keras.optimizers.SGD(
        learning_rate=config.learning_rate, momentum=config.momentum, nesterov=config.nesterov
    )
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def fit_stage(
    model, stage: str, train_data, val_data, epochs: int, config: TrainConfig, run_dir: Path, say: Callable[[str], None]
) -> None:
    """Fit `model` for one stage with the paper's callbacks; resumable via RUN_DIR/backup."""
    backup = run_dir / "backup" / stage
    compile_for_training(model, config)
    mode = "min" if config.monitor == "val_loss" else "max"
    callbacks = [
        EpochLog(say, stage, epochs),
        HistoryCSV(run_dir / "history.csv", stage),
        ResumableReduceLR(
            backup, monitor=config.monitor, mode=mode, factor=config.lr_factor, patience=config.lr_patience
        ),
        ResumableEarlyStopping(
            backup, monitor=config.monitor, mode=mode, patience=config.patience, restore_best_weights=True
        ),
        # Last, so that its epoch counter (the commit point) is written after the others.
        keras.callbacks.BackupAndRestore(str(backup)),
    ]
    model.fit(train_data, validation_data=val_data, epochs=epochs, verbose=0, callbacks=callbacks)
