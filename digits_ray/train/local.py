"""Single-process Keras training: the reference path that Ray Train and Tune trials reproduce."""

from __future__ import annotations

import math
import time

from digits_ray.config import TrainConfig
from digits_ray.data.pipeline import local_batches
from digits_ray.data.split import TrainValData
from digits_ray.keras_api import keras
from digits_ray.models.zoo import build_model
from digits_ray.train import recipe
from digits_ray.train.feed import tf_dataset
from digits_ray.train.result import FitResult


def fit(
    cfg: TrainConfig,
    data: TrainValData,
    verbose: int | str = 2,
    extra_callbacks: list[keras.callbacks.Callback] = (),
) -> FitResult:
    """Train on ``data`` (training and validation splits only) and keep the best validation epoch.

    ``extra_callbacks`` run after the epoch's time is taken, so their work is not counted as training.
    """
    keras.utils.set_random_seed(cfg.seed)
    recipe.set_precision(cfg.mixed_precision)
    model = build_model(cfg.model, cfg.model_params)
    steps_per_epoch = math.ceil(len(data.y_train) / cfg.batch_size)
    recipe.compile_model(model, cfg, steps_per_epoch)
    keep_best = recipe.KeepBestWeights()
    callbacks = [recipe.EpochLog(), keep_best, *recipe.schedule_callbacks(cfg), *extra_callbacks]
    augment_cfg = cfg.augment_config()
    if augment_cfg is None:
        inputs = {"x": data.x_train, "y": data.y_train, "batch_size": cfg.batch_size, "shuffle": True}
    else:  # the same per-epoch shuffled, augmented stream that Ray Data produces, in this process
        stream = tf_dataset(lambda: local_batches(
            data.x_train, data.y_train, cfg.epochs, cfg.seed, augment_cfg, cfg.batch_size))
        inputs = {"x": stream, "steps_per_epoch": steps_per_epoch}
    start = time.perf_counter()
    model.fit(
        **inputs,
        epochs=cfg.epochs,
        validation_data=(data.x_val, data.y_val),
        validation_batch_size=recipe.VALIDATION_BATCH_SIZE,
        callbacks=callbacks,
        verbose=verbose,
    )
    result = FitResult.from_history(model, cfg, keep_best.history, data, {"runner": "keras", "workers": 1,
                                                                         "per_worker_batch": cfg.batch_size})
    result.training_seconds = time.perf_counter() - start
    return result
