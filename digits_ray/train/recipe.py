"""How a zoo model is trained: precision, optimizer, LR schedule, loss, callbacks.

Shared by single-process training and Ray Train workers, so both train the same thing.
"""

from __future__ import annotations

import time
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


def learning_rate(cfg: TrainConfig, steps_per_epoch: int, lr_scale: float = 1.0) -> Any:
    """A constant LR or a per-step cosine decay with optional linear warmup (one-cycle-like)."""
    peak = cfg.learning_rate * lr_scale
    if cfg.schedule != "cosine":
        return peak
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)
    decay_steps = max(1, cfg.epochs * steps_per_epoch - warmup_steps)
    if warmup_steps:
        return keras.optimizers.schedules.CosineDecay(
            peak / 10, decay_steps, alpha=COSINE_FLOOR, warmup_target=peak, warmup_steps=warmup_steps
        )
    return keras.optimizers.schedules.CosineDecay(peak, decay_steps, alpha=COSINE_FLOOR)


def compile_model(model: keras.Model, cfg: TrainConfig, steps_per_epoch: int, lr_scale: float = 1.0) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate(cfg, steps_per_epoch, lr_scale)),
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
    """Adds the learning rate, the epoch's seconds and its end (unix time) to each epoch's logs.

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


def schedule_callbacks(cfg: TrainConfig) -> list[keras.callbacks.Callback]:
    """Epoch-level callbacks implied by the config (plateau LR, early stopping)."""
    callbacks: list[keras.callbacks.Callback] = []
    if cfg.schedule == "plateau":
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE, min_lr=1e-6
            )
        )
    if cfg.early_stopping_patience:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy", mode="max", patience=cfg.early_stopping_patience, verbose=1
            )
        )
    return callbacks
