"""Single-process Keras training: the reference path that Ray Train and Tune reproduce at scale."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

from digits_ray.config import TrainConfig
from digits_ray.data.pipeline import local_batches
from digits_ray.data.split import TrainValData, load_train_val
from digits_ray.keras_api import keras
from digits_ray.models.zoo import build_model
from digits_ray.train import recipe
from digits_ray.train.feed import tf_dataset
from digits_ray.train.finish import finish, history_frame


def fit(
    cfg: TrainConfig,
    data: TrainValData,
    verbose: int | str = 2,
    extra_callbacks: list[keras.callbacks.Callback] = (),
) -> tuple[keras.Model, Any, float]:
    """Train on ``data``; return the model holding its best-validation-accuracy weights,
    the history frame and the seconds spent in ``fit``. ``extra_callbacks`` run after the epoch's
    time is taken, so their work is not counted as training."""
    keras.utils.set_random_seed(cfg.seed)
    recipe.set_precision(cfg.mixed_precision)
    model = build_model(cfg.model, cfg.model_params)
    steps_per_epoch = math.ceil(len(data.y_train) / cfg.batch_size)
    recipe.compile_model(model, cfg, steps_per_epoch)
    with tempfile.TemporaryDirectory(prefix="digits-best-") as tmp:
        best_path = str(Path(tmp) / "best.weights.h5")
        callbacks = [
            recipe.EpochLog(),
            keras.callbacks.ModelCheckpoint(
                best_path, monitor="val_accuracy", mode="max", save_best_only=True, save_weights_only=True
            ),
            *recipe.schedule_callbacks(cfg),
            *extra_callbacks,
        ]
        augment_cfg = cfg.augment_config()
        if augment_cfg is None:
            inputs = {"x": data.x_train, "y": data.y_train, "batch_size": cfg.batch_size, "shuffle": True}
        else:  # the same per-epoch shuffled, augmented stream that Ray Data produces, in this process
            stream = tf_dataset(lambda: local_batches(
                data.x_train, data.y_train, cfg.epochs, cfg.seed, augment_cfg, cfg.batch_size))
            inputs = {"x": stream, "steps_per_epoch": steps_per_epoch}
        start = time.perf_counter()
        history = model.fit(
            **inputs,
            epochs=cfg.epochs,
            validation_data=(data.x_val, data.y_val),
            validation_batch_size=recipe.VALIDATION_BATCH_SIZE,
            callbacks=callbacks,
            verbose=verbose,
        )
        seconds = time.perf_counter() - start
        model.load_weights(best_path)
    return model, history_frame(history.history), seconds


def train(
    cfg: TrainConfig, out_dir: Path | str, data_dir: Path | str | None = None, verbose: int | str = 2
) -> dict[str, Any]:
    """Train one zoo model and write its artifact folder; returns the artifact's metadata."""
    data = load_train_val(cfg.val_fraction, cfg.seed, data_dir)
    model, history, seconds = fit(cfg, data, verbose)
    sizes = {"train": len(data.y_train), "validation": len(data.y_val)}
    return finish(model, cfg, history, data.md5, sizes, seconds, out_dir, data_dir,
                  extra={"trained_with": {"runner": "keras", "workers": 1}})
