"""Ray Train: data-parallel tf-keras training under MultiWorkerMirroredStrategy.

The driver builds the augmented Ray Data stream (``digits_ray.data.pipeline``) and a
``TensorflowTrainer``; each worker reads its shard with ``ray.train.get_dataset_shard``, trains
with the same recipe as single-process training, and reports metrics plus a checkpoint (model
with optimizer state, and the history so far) every epoch. After a failure, workers restart
from the latest checkpoint and continue at the next epoch.

``batch_size`` is the global batch: each of the W workers takes ``batch_size / W`` of every step,
and the peak LR is the configured one (no rescaling), exactly as in one process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from digits_ray.config import TrainConfig
from digits_ray.data.pipeline import training_stream
from digits_ray.data.split import TrainValData, load_train_val
from digits_ray.errors import ConfigError
from digits_ray.keras_api import keras
from digits_ray.schema import IMAGE_COLUMN, LABEL_COLUMN
from digits_ray.train import checkpoint as ckpt
from digits_ray.train import hold, recipe
from digits_ray.train.finished import best_checkpoint
from digits_ray.train.reporting import ReportEachEpoch
from digits_ray.train.result import FitResult
from digits_ray.train.scale import ScaleConfig, per_worker_batch  # noqa: F401  (callers name them here)

FEED_CHUNK_BATCHES = 16  # training batches per Ray Data batch handed to a worker


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Every worker runs the same number of steps (collectives need it): whole global batches only."""
    steps = n_train // batch_size
    if steps < 1:
        raise ConfigError(f"{n_train} training images do not fill one global batch of {batch_size}")
    return steps


# --- Inside each worker ---------------------------------------------------------------------


@dataclass(frozen=True)
class LoopConfig:
    """What ``train_loop_per_worker`` is given (as ``train_loop_config={"loop": LoopConfig(...)}``)."""

    train: TrainConfig
    n_train: int
    validation: Any  # ObjectRef of (x_val, y_val)
    threads: int  # TensorFlow threads per worker: the CPUs it holds
    resume_from: str | None = None  # Train V2 has no resume_from_checkpoint: used when Ray has none
    hold_gate: str | None = None  # tests only: hold.HOLD_ENV as the driver saw it (see digits_ray/train/hold.py)


def chunk_window(seen: int, whole: int, skip: int, end: int) -> tuple[int, int]:
    """Which of a chunk's ``whole`` batches to train on: [first, last), empty when first >= last.

    ``seen`` batches of the stream came before this chunk; the run trains stream batches
    [``skip``, ``end``): the epochs still to train, after those a previous attempt trained.
    """
    return min(max(skip - seen, 0), whole), min(whole, end - seen)


def batches_to_train(rows: Iterable[dict[str, np.ndarray]], batch_size: int, skip: int, end: int
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks of whole batches (images, labels) for stream batches [``skip``, ``end``), and not one more.

    Stopping exactly at the run's last batch matters: a generator left waiting on the shard after
    ``fit`` ends would block the worker's exit until the other workers' streams time out.
    """
    seen = 0
    for chunk in rows:
        whole = len(chunk[LABEL_COLUMN]) // batch_size  # only the stream's last chunk can be short
        first, last = chunk_window(seen, whole, skip, end)
        seen += whole
        if first < last:
            part = slice(first * batch_size, last * batch_size)
            yield chunk[IMAGE_COLUMN][part], chunk[LABEL_COLUMN][part]
        if seen >= end:
            return


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    from ray.train.tensorflow import prepare_dataset_shard

    from digits_ray.keras_api import tf
    from digits_ray.models.zoo import build_model
    from digits_ray.train.feed import FreedInBackground, StartedEarly, even_shards, tf_dataset_from_chunks

    loop: LoopConfig = config["loop"]
    cfg = loop.train
    tf.get_logger().setLevel("WARNING")  # MultiWorkerMirroredStrategy logs every all-reduce at INFO
    tf.config.threading.set_intra_op_parallelism_threads(loop.threads)
    tf.config.threading.set_inter_op_parallelism_threads(loop.threads)
    context = ray.train.get_context()
    workers, rank = context.get_world_size(), context.get_world_rank()
    batch = per_worker_batch(cfg.batch_size, workers)
    steps = steps_per_epoch(loop.n_train, cfg.batch_size)

    # Ray's latest checkpoint after a failure in this run; else the one this run was told to resume.
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop.resume_from:
        checkpoint = ray.train.Checkpoint.from_directory(loop.resume_from)
    state = ckpt.read_state(checkpoint) if checkpoint else ckpt.RunState()
    if state.epochs_done >= cfg.epochs or recipe.should_stop(state.history, cfg.early_stopping_patience):
        return  # a resume of a run that had already finished or stopped early
    # Start reading the shard now: its actors and first blocks get ready while TF sets up below.
    rows = StartedEarly(ray.train.get_dataset_shard("train").iter_batches(
        batch_size=batch * FEED_CHUNK_BATCHES, batch_format="numpy", prefetch_batches=2))

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    recipe.set_precision(cfg.mixed_precision)
    keras.utils.set_random_seed(cfg.seed)
    with strategy.scope():
        if checkpoint:
            model = ckpt.load_model(checkpoint)
        else:
            model = build_model(cfg.model, cfg.model_params)
            recipe.compile_model(model, cfg, steps)
    state.attempt_starts.append(state.epochs_done)  # kept in every later checkpoint: shows each resume

    def per_worker(make_dataset) -> FreedInBackground:
        """This worker's tf.data pipeline as the strategy's input; its iterators freed off this thread."""
        return FreedInBackground(strategy.distribute_datasets_from_function(
            lambda _: prepare_dataset_shard(make_dataset())))

    # Ray Data hands over FEED_CHUNK_BATCHES batches at a time and tf.data cuts them: per-batch
    # Python costs more than a small model's step on a CPU.
    skip, end = state.epochs_done * steps, cfg.epochs * steps
    inputs = per_worker(lambda: tf_dataset_from_chunks(lambda: batches_to_train(rows, batch, skip, end), batch))
    # Each worker validates its own share (every worker the same number of steps), and Keras
    # all-reduces the metrics: the full set is evaluated once per epoch, not once per worker.
    x_val, y_val = ray.get(loop.validation)
    shares, val_batch, val_steps = even_shards(len(y_val), workers, recipe.VALIDATION_BATCH_SIZE)
    own = shares[rank]
    validation = per_worker(lambda: tf.data.Dataset.from_tensor_slices((x_val[own], y_val[own])).batch(val_batch))

    def publish(row: dict[str, Any], folder: str) -> None:
        ray.train.report(
            {**row, "images_per_second": steps * cfg.batch_size / row["seconds"], "per_worker_batch": batch},
            checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None,
            checkpoint_dir_name=f"epoch_{row['epoch']:04d}",
        )
        hold.after_checkpoint(loop.hold_gate, row["epoch"], cfg.epochs, who=f"rank{rank}")

    callbacks = [recipe.EpochLog(), *recipe.schedule_callbacks(cfg, earlier=list(state.history)),
                 ReportEachEpoch(state, publish)]
    # The stream's cold start (a new augmentation actor process) is set-up, like building the
    # model: `fit`, and with it the first epoch's clock and images/s, starts once data is here.
    rows.wait()
    try:
        model.fit(inputs, epochs=cfg.epochs, initial_epoch=state.epochs_done, steps_per_epoch=steps,
                  validation_data=validation, validation_steps=val_steps,
                  callbacks=callbacks, verbose=2 if rank == 0 else 0)
    finally:
        inputs.release()
        validation.release()


# --- On the driver ----------------------------------------------------------------------------


def build_trainer(cfg: TrainConfig, scale: ScaleConfig, data: TrainValData, callbacks: list | None = None):
    """A ``TensorflowTrainer`` over the augmented stream of ``data``'s training split.

    ``callbacks``: Ray Train callbacks (a Tune trial passes ``TuneReportCallback``).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    per_worker_batch(cfg.batch_size, scale.workers)  # fail fast, before any worker starts
    steps_per_epoch(len(data.y_train), cfg.batch_size)
    stream = training_stream(data.x_train, data.y_train, cfg.epochs, cfg.seed, cfg.augment_config(), scale.data)
    resources = {"CPU": scale.cpus_per_worker, **({"GPU": 1} if scale.use_gpu else {})}
    loop = LoopConfig(
        train=cfg, n_train=len(data.y_train), validation=ray.put((data.x_val, data.y_val)),
        threads=max(1, math.ceil(scale.cpus_per_worker)),
        resume_from=str(Path(scale.resume_from).resolve()) if scale.resume_from else None,
        hold_gate=hold.gate_from_env(),
    )
    return TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop},
        scaling_config=ScalingConfig(num_workers=scale.workers, use_gpu=scale.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=scale.name,
            storage_path=scale.storage_path,
            failure_config=FailureConfig(max_failures=scale.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=scale.keep_checkpoints,
                                               checkpoint_score_attribute="val_accuracy",
                                               checkpoint_score_order="max"),
            callbacks=callbacks,
        ),
        datasets={"train": stream},
    )


def fit(cfg: TrainConfig, scale: ScaleConfig, data: TrainValData | None = None,
        data_dir: Path | str | None = None) -> FitResult:
    """Train with Ray Train on the training split; the model of the best validation epoch comes back."""
    data = data if data is not None else load_train_val(cfg.val_fraction, cfg.seed, data_dir)
    trainer = build_trainer(cfg, scale, data)
    start = time.perf_counter()
    result = trainer.fit()
    wall_seconds = time.perf_counter() - start
    if result.error:  # a worker's exception, after FailureConfig's restarts: a bug, with its traceback
        raise result.error
    model = ckpt.load_model(best_checkpoint(result.best_checkpoints, result.path))
    latest = ckpt.read_state(result.checkpoint)  # the history of every epoch, up to the last
    trained_with = {
        "runner": "ray_train", "workers": scale.workers, "per_worker_batch": result.metrics["per_worker_batch"],
        "use_gpu": scale.use_gpu, "cpus_per_worker": scale.cpus_per_worker, "run_path": str(result.path),
        "attempt_start_epochs": latest.attempt_starts, "wall_seconds": round(wall_seconds, 2),
    }
    return FitResult.from_history(model, cfg, latest.history, data, trained_with)
