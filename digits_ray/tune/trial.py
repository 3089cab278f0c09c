"""Tune trials: one process per trial (the default), or a Ray Train run per trial.

Both report every epoch with a checkpoint (model + optimizer state + history), resume from
``ray.tune.get_checkpoint()`` when Tune restarts them, and see the training and validation splits
only: the data comes in through ``tune.with_parameters``, and the test files are never opened.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from digits_ray.config import TrainConfig
from digits_ray.data.split import TrainValData
from digits_ray.train import checkpoint as ckpt
from digits_ray.tune import space


def trial_name_of(trial_id: str) -> str:
    """A trial's name and folder (Tune's default packs every sampled value into it)."""
    return f"trial_{trial_id}"


def single_process_trial(config: dict[str, Any], data: TrainValData, base: TrainConfig, threads: int) -> None:
    """A function trainable: the shared single-process recipe, reporting to Tune every epoch."""
    from ray import tune

    from digits_ray.keras_api import tf
    from digits_ray.train import hold, local, recipe
    from digits_ray.train.reporting import ReportEachEpoch

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    for gpu in tf.config.list_physical_devices("GPU"):  # trials may share a GPU (--gpus-per-trial 0.5)
        tf.config.experimental.set_memory_growth(gpu, True)
    cfg = space.train_config(config, base)
    checkpoint = tune.get_checkpoint()
    if checkpoint:  # Tune restarted this trial (a failure, or a resumed search): go on from its last epoch
        recipe.set_precision(cfg.mixed_precision)
        model, state = ckpt.load(checkpoint)
    else:
        model, state = local.new_model(cfg, data), ckpt.RunState()
    if state.epochs_done >= cfg.epochs or recipe.should_stop(state.history, cfg.early_stopping_patience):
        return
    state.attempt_starts.append(state.epochs_done)

    gate, name = hold.gate_from_env(), trial_name_of(tune.get_context().get_trial_id())

    def publish(row: dict[str, Any], folder: str) -> None:
        tune.report(row, checkpoint=tune.Checkpoint.from_directory(folder))
        hold.after_checkpoint(gate, row["epoch"], cfg.epochs, who=name)

    callbacks = [recipe.EpochLog(), *recipe.schedule_callbacks(cfg, earlier=list(state.history)),
                 ReportEachEpoch(state, publish)]
    local.train_epochs(model, cfg, data, callbacks, start_epoch=state.epochs_done, verbose=0)


TRAIN_RUN = "train"  # the Ray Train run of a trial: <experiment>/<trial folder>/train


def ray_train_trial(config: dict[str, Any], data: TrainValData, base: TrainConfig, scale: Any,
                    experiment: str) -> None:
    """A function trainable that runs Ray Train (Train V2: the trainer is built here and ``fit()`` called).

    ``TuneReportCallback`` forwards the workers' reports to Tune, each with the path of its checkpoint
    (``checkpoint_path``), which Ray Train keeps in the experiment's storage, beside the trial's results.
    A restarted trial finds the same Ray Train run there and continues from its latest checkpoint.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from digits_ray.train import distributed

    cfg = space.train_config(config, base)
    trial_folder = trial_name_of(tune.get_context().get_trial_id())
    scale = dataclasses.replace(scale, name=TRAIN_RUN, storage_path=f"{experiment}/{trial_folder}")
    trainer = distributed.build_trainer(cfg, scale, data, callbacks=[TuneReportCallback()])
    result = trainer.fit()
    if result.error:
        raise result.error
