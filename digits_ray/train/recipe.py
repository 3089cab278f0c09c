"""How a zoo model is trained: precision, optimizer, LR schedule, loss, callbacks, and the two rules
that end a run: which epoch is best, and when to stop early.

Shared by single-process training, Ray Train workers and Tune trials, so all of them train the same
thing and pick the same epoch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from digits_ray.config import TrainConfig
from digits_ray.keras_api import keras, tf

PLATEAU_FACTOR = 0.5  # ReduceLROnPlateau: halve the LR ...
PLATEAU_PATIENCE = 1  # ... after this many epochs without val_loss improvement
COSINE_FLOOR = 0.01  # cosine decays to this fraction of the peak LR
# Validation batch (global). Keras' default of 32 makes validating 6,000 images cost a sixth of a
# training epoch, and under MultiWorkerMirroredStrategy every one of those small steps synchronizes.
VALIDATION_BATCH_SIZE = 1024


def gpus_available() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


def set_precision(mode: str) -> str:
    """Apply the global Keras dtype policy and return its name.

    ``auto`` means mixed_float16 on a GPU (tensor cores) and float32 on a CPU, where float16
    math is emulated and slower.
    """
    use_mixed = mode == "on" or (mode == "auto" and gpus_available())
    policy = "mixed_float16" if use_mixed else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def learning_rate(cfg: TrainConfig, steps_per_epoch: int) -> Any:
    """A constant LR or a per-step cosine decay with optional linear warmup (one-cycle-like).

    ``cfg.learning_rate`` is the peak for the global batch, whatever runs it.
    """
    peak = cfg.learning_rate
    if cfg.schedule != "cosine":
        return peak
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)
    decay_steps = max(1, cfg.epochs * steps_per_epoch - warmup_steps)
    if warmup_steps:
        return keras.optimizers.schedules.CosineDecay(
            peak / 10, decay_steps, alpha=COSINE_FLOOR, warmup_target=peak, warmup_steps=warmup_steps
        )
    return keras.optimizers.schedules.CosineDecay(peak, decay_steps, alpha=COSINE_FLOOR)


def compile_model(model: keras.Model, cfg: TrainConfig, steps_per_epoch: int) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate(cfg, steps_per_epoch)),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        steps_per_execution=cfg.steps_per_execution,
    )


def current_lr(model: keras.Model) -> float:
    optimizer = model.optimizer
    lr = optimizer.learning_rate
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        lr = lr(optimizer.iterations)
    return float(tf.convert_to_tensor(lr))


class EpochLog(keras.callbacks.Callback):
    """Adds the learning rate (of the epoch's last step), the epoch's seconds and its end (unix time)
    to each epoch's logs.

    ``ended_at`` lines epochs up with a run's wall clock, start-up included (the scaling bench's
    wall seconds to a target accuracy).
    """

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["lr"] = current_lr(self.model)
            logs["seconds"] = time.perf_counter() - self._start
            logs["ended_at"] = time.time()


# --- Which epoch is kept, and when a run stops ---------------------------------------------------

Epochs = Sequence[dict[str, Any]]  # per-epoch logs, oldest first, each with "val_accuracy"


def best_epoch(history: Epochs) -> int:
    """Index of the epoch whose weights are kept: highest validation accuracy, earliest on ties."""
    if not len(history):
        raise ValueError("no epoch has been trained")
    scores = [float(row["val_accuracy"]) for row in history]
    return scores.index(max(scores))


def should_stop(history: Epochs, patience: int) -> bool:
    """Early stopping: ``patience`` epochs in a row without beating the best before them.

    Decided from the history alone, so a resumed run decides as the interrupted one would have.
    """
    if not patience or len(history) <= patience:
        return False
    return best_epoch(history) < len(history) - patience


class KeepBestWeights(keras.callbacks.Callback):
    """Holds the best epoch's weights (``best_epoch``'s rule) and restores them when training ends."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[dict[str, Any]] = []
        self.weights: list | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.history.append(dict(logs or {}))
        if best_epoch(self.history) == len(self.history) - 1:
            self.weights = self.model.get_weights()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.weights is not None:
            self.model.set_weights(self.weights)


class StopEarly(keras.callbacks.Callback):
    """``should_stop`` as a callback, on the history this callback has seen (plus any earlier epochs)."""

    def __init__(self, patience: int, earlier: Epochs = ()) -> None:
        super().__init__()
        self.patience = patience
        self.history = list(earlier)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.history.append(dict(logs or {}))
        if should_stop(self.history, self.patience):
            print(f"Epoch {epoch + 1}: early stopping, no val_accuracy gain in {self.patience} epochs")
            self.model.stop_training = True


def schedule_callbacks(cfg: TrainConfig, earlier: Epochs = ()) -> list[keras.callbacks.Callback]:
    """Epoch-level callbacks implied by the config (plateau LR, early stopping).

    ``earlier``: the epochs a resumed run trained before, which early stopping counts too.
    """
    callbacks: list[keras.callbacks.Callback] = []
    if cfg.schedule == "plateau":
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE, min_lr=1e-6
            )
        )
    if cfg.early_stopping_patience:
        callbacks.append(StopEarly(cfg.early_stopping_patience, earlier))
    return callbacks
