"""Single-process Keras training: the reference path that Ray Train and Tune trials reproduce."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from digits_ray.config import TrainConfig
from digits_ray.data.pipeline import local_batches
from digits_ray.data.split import TrainValData
from digits_ray.keras_api import keras
from digits_ray.models.zoo import build_model
from digits_ray.train import recipe
from digits_ray.train.feed import tf_dataset
from digits_ray.train.result import FitResult


def steps_per_epoch(cfg: TrainConfig, data: TrainValData) -> int:
    return math.ceil(len(data.y_train) / cfg.batch_size)


def new_model(cfg: TrainConfig, data: TrainValData) -> keras.Model:
    """The zoo model, compiled with the recipe (seeded, in the configured precision)."""
    keras.utils.set_random_seed(cfg.seed)
    recipe.set_precision(cfg.mixed_precision)
    model = build_model(cfg.model, cfg.model_params)
    recipe.compile_model(model, cfg, steps_per_epoch(cfg, data))
    return model


def train_epochs(model: keras.Model, cfg: TrainConfig, data: TrainValData, callbacks: Sequence,
                 start_epoch: int = 0, verbose: int | str = 2) -> None:
    """Epochs ``start_epoch`` .. ``cfg.epochs`` of ``model`` on the training split, validating each one.

    With augmentation, the input is the same per-epoch shuffled, augmented stream that Ray Data
    produces, made in this process, from ``start_epoch`` on (so a resumed trial sees what it would have).
    """
    steps = steps_per_epoch(cfg, data)
    augment_cfg = cfg.augment_config()
    if augment_cfg is None:
        inputs = {"x": data.x_train, "y": data.y_train, "batch_size": cfg.batch_size, "shuffle": True}
    else:
        stream = tf_dataset(lambda: local_batches(
            data.x_train, data.y_train, cfg.epochs, cfg.seed, augment_cfg, cfg.batch_size, start_epoch))
        inputs = {"x": stream, "steps_per_epoch": steps}
    model.fit(
        **inputs,
        epochs=cfg.epochs,
        initial_epoch=start_epoch,
        validation_data=(data.x_val, data.y_val),
        validation_batch_size=recipe.VALIDATION_BATCH_SIZE,
        callbacks=list(callbacks),
        verbose=verbose,
    )


def fit(
    cfg: TrainConfig,
    data: TrainValData,
    verbose: int | str = 2,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
) -> FitResult:
    """Train on ``data`` (training and validation splits only) and keep the best validation epoch.

    ``extra_callbacks`` run after the epoch's time is taken, so their work is not counted as training.
    """
    model = new_model(cfg, data)
    keep_best = recipe.KeepBestWeights()
    callbacks = [recipe.EpochLog(), keep_best, *recipe.schedule_callbacks(cfg), *extra_callbacks]
    start = time.perf_counter()
    train_epochs(model, cfg, data, callbacks, verbose=verbose)
    result = FitResult.from_history(model, cfg, keep_best.history, data,
                                    {"runner": "keras", "workers": 1, "per_worker_batch": cfg.batch_size})
    result.training_seconds = time.perf_counter() - start
    return result
