"""Ray Train: data-parallel tf-keras training under MultiWorkerMirroredStrategy.

The driver builds the augmented Ray Data stream (``digits_ray.data.pipeline``) and a
``TensorflowTrainer``; each worker reads its shard with ``ray.train.get_dataset_shard``, trains
with the same recipe as single-process training, and reports metrics plus a checkpoint (model
with optimizer state, and the history so far) every epoch. After a failure, workers restart
from the latest checkpoint and continue at the next epoch.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from digits_ray.config import TrainConfig
from digits_ray.data.pipeline import IMAGE_COLUMN, LABEL_COLUMN, StreamConfig, training_stream
from digits_ray.data.split import load_train_val
from digits_ray.train.finish import finish

CHECKPOINT_MODEL = "model.keras"
CHECKPOINT_STATE = "state.json"
DEFAULT_STORAGE = Path.home() / "ray_results" / "digits-ray"
FEED_CHUNK_BATCHES = 16  # training batches per Ray Data batch handed to a worker


@dataclass(frozen=True)
class ScaleConfig:
    """How the run is spread over the cluster; every field is a flag of ``jobs/train.py``."""

    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional: on 2 cores, 2 workers + 2 data actors fit in 2 CPUs
    data: StreamConfig = field(default_factory=StreamConfig)
    storage_path: str = str(DEFAULT_STORAGE)
    name: str | None = None
    max_failures: int = 2  # worker failures to recover from (from the latest checkpoint)
    keep_checkpoints: int = 2  # best by val_accuracy; Ray also keeps the latest for resuming
    resume_from: str | None = None  # a checkpoint folder of an earlier run: continue after its epoch

    def __post_init__(self) -> None:
        if self.workers < 1 or not self.cpus_per_worker > 0 or self.max_failures < -1 or self.keep_checkpoints < 1:
            raise ValueError(
                "need workers >= 1, cpus_per_worker > 0, max_failures >= -1 and keep_checkpoints >= 1; got "
                f"{self.workers}, {self.cpus_per_worker}, {self.max_failures}, {self.keep_checkpoints}"
            )


def steps_per_epoch(n_train: int, batch_size: int, workers: int) -> int:
    """Every worker runs the same number of steps (collectives need it): whole global batches only."""
    steps = n_train // (batch_size * workers)
    if steps < 1:
        raise ValueError(f"{n_train} training images do not fill one global batch of {batch_size} x {workers}")
    return steps


def improved_recently(history: list[dict[str, float]], patience: int) -> bool:
    """Early stopping on val_accuracy, decided from the history so that it survives a resume."""
    if not patience or len(history) <= patience:
        return True
    best_before = max(h["val_accuracy"] for h in history[:-patience])
    return max(h["val_accuracy"] for h in history[-patience:]) > best_before


# --- Inside each worker ---------------------------------------------------------------------


def _state_in(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / CHECKPOINT_STATE).read_text())


def _model_in(folder: str | Path) -> Any:
    from digits_ray.keras_api import keras

    return keras.models.load_model(Path(folder) / CHECKPOINT_MODEL, safe_mode=True)


def _read_state(checkpoint) -> dict[str, Any]:
    """History and attempt starts: small, read before TensorFlow sets up (the model comes later)."""
    with checkpoint.as_directory() as folder:
        return _state_in(folder)


def _load_model(checkpoint) -> Any:
    """The model with its optimizer state and step count (inside a strategy scope when training)."""
    with checkpoint.as_directory() as folder:
        return _model_in(folder)


def load_checkpoint(checkpoint) -> tuple[Any, dict[str, Any]]:
    """A reported checkpoint's model and state (history, attempt starts), for reading a run back."""
    with checkpoint.as_directory() as folder:  # one download when the storage is remote
        return _model_in(folder), _state_in(folder)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    from ray.train.tensorflow import prepare_dataset_shard

    from digits_ray.keras_api import keras, save_model, tf
    from digits_ray.models.zoo import build_model
    from digits_ray.train import recipe
    from digits_ray.train.feed import FreedInBackground, StartedEarly, even_shards, tf_dataset_from_chunks

    tf.get_logger().setLevel("WARNING")  # MultiWorkerMirroredStrategy logs every all-reduce at INFO
    tf.config.threading.set_intra_op_parallelism_threads(config["threads"])
    tf.config.threading.set_inter_op_parallelism_threads(config["threads"])
    cfg = TrainConfig.from_dict(config["train"])
    context = ray.train.get_context()
    workers, rank = context.get_world_size(), context.get_world_rank()
    steps = steps_per_epoch(config["n_train"], cfg.batch_size, workers)

    # Ray's latest checkpoint after a failure in this run; else the one this run was told to resume.
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config["resume_from"]:
        checkpoint = ray.train.Checkpoint.from_directory(config["resume_from"])
    state = _read_state(checkpoint) if checkpoint else {"history": [], "attempt_starts": []}
    start_epoch = len(state["history"])
    if start_epoch >= cfg.epochs or not improved_recently(state["history"], cfg.early_stopping_patience):
        return  # a resume of a run that had already finished or stopped early
    # Start reading the shard now: its actors and first blocks get ready while TF sets up below.
    rows = StartedEarly(ray.train.get_dataset_shard("train").iter_batches(
        batch_size=cfg.batch_size * FEED_CHUNK_BATCHES, batch_format="numpy", prefetch_batches=2))

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    recipe.set_precision(cfg.mixed_precision)
    keras.utils.set_random_seed(cfg.seed)
    with strategy.scope():
        if checkpoint:
            model = _load_model(checkpoint)
        else:
            model = build_model(cfg.model, cfg.model_params)
            # Linear scaling: the global batch is `workers` times larger, so is the learning rate.
            recipe.compile_model(model, cfg, steps, lr_scale=workers)
    state["attempt_starts"].append(start_epoch)  # kept in every later checkpoint: shows each resume

    def chunks():
        """This worker's batches for the epochs still to train, and not one more.

        Ray Data hands over ``FEED_CHUNK_BATCHES`` training batches at a time and tf.data cuts them
        (``tf_dataset_from_chunks``): per-batch Python costs more than a small model's step on a CPU.
        The batches of epochs a previous attempt trained are skipped. Stopping exactly at the run's
        last batch matters: a generator left waiting on the shard after ``fit`` ends would block the
        worker's exit until the other workers' streams time out.
        """
        size = cfg.batch_size
        skip, end, seen = start_epoch * steps, cfg.epochs * steps, 0
        for chunk in rows:
            whole = len(chunk[LABEL_COLUMN]) // size  # only the stream's last chunk can be short
            first, last = min(max(skip - seen, 0), whole), min(whole, end - seen)
            seen += whole
            if first < last:
                yield (chunk[IMAGE_COLUMN][first * size : last * size],
                       chunk[LABEL_COLUMN][first * size : last * size])
            if seen >= end:
                return

    def per_worker(make_dataset) -> FreedInBackground:
        """This worker's tf.data pipeline as the strategy's input; its iterators freed off this thread."""
        return FreedInBackground(strategy.distribute_datasets_from_function(
            lambda _: prepare_dataset_shard(make_dataset())))

    inputs = per_worker(lambda: tf_dataset_from_chunks(chunks, cfg.batch_size))
    # Each worker validates its own share (every worker the same number of steps), and Keras
    # all-reduces the metrics: the full set is evaluated once per epoch, not once per worker.
    x_val, y_val = ray.get(config["validation"])
    shares, val_batch, val_steps = even_shards(len(y_val), workers, recipe.VALIDATION_BATCH_SIZE)
    own = shares[rank]
    validation = per_worker(lambda: tf.data.Dataset.from_tensor_slices((x_val[own], y_val[own])).batch(val_batch))

    class Report(keras.callbacks.Callback):
        """Checkpoint and report every epoch; stop early consistently on every worker."""

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
            state["history"].append(row)
            with tempfile.TemporaryDirectory(prefix="digits-ckpt-") as folder:
                # Every worker saves (MultiWorkerMirroredStrategy expects it); rank 0's copy is kept.
                save_model(self.model, Path(folder) / CHECKPOINT_MODEL)
                (Path(folder) / CHECKPOINT_STATE).write_text(json.dumps(state))
                ray.train.report(
                    {**row, "images_per_second": steps * cfg.batch_size * workers / row["seconds"]},
                    checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None,
                    checkpoint_dir_name=f"epoch_{epoch + 1:04d}",
                )
            if not improved_recently(state["history"], cfg.early_stopping_patience):
                self.model.stop_training = True

    callbacks = [recipe.EpochLog(), *[c for c in recipe.schedule_callbacks(cfg)
                                      if not isinstance(c, keras.callbacks.EarlyStopping)], Report()]
    # The stream's cold start (a new augmentation actor process) is set-up, like building the
    # model: `fit`, and with it the first epoch's clock and images/s, starts once data is here.
    # The run's wall time, which the scaling bench also reports, still includes it.
    rows.wait()
    try:
        model.fit(inputs, epochs=cfg.epochs, initial_epoch=start_epoch, steps_per_epoch=steps,
                  validation_data=validation, validation_steps=val_steps,
                  callbacks=callbacks, verbose=2 if rank == 0 else 0)
    finally:
        inputs.release()
        validation.release()


# --- On the driver ----------------------------------------------------------------------------


def build_trainer(cfg: TrainConfig, scale: ScaleConfig, data_dir: Path | str | None = None):
    """A ``TensorflowTrainer`` over the augmented stream, and the split sizes and checksums it uses."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    if scale.resume_from and not (Path(scale.resume_from) / CHECKPOINT_STATE).is_file():
        raise ValueError(f"--resume-from {scale.resume_from} is not a checkpoint of this job (no {CHECKPOINT_STATE})")
    data = load_train_val(cfg.val_fraction, cfg.seed, data_dir)
    steps_per_epoch(len(data.y_train), cfg.batch_size, scale.workers)  # fail fast on a too-large batch
    stream = training_stream(data.x_train, data.y_train, cfg.epochs, cfg.seed, cfg.augment_config(), scale.data)
    resources = {"CPU": scale.cpus_per_worker, **({"GPU": 1} if scale.use_gpu else {})}
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.to_dict(),
            "n_train": len(data.y_train),
            "validation": ray.put((data.x_val, data.y_val)),
            "threads": max(1, math.ceil(scale.cpus_per_worker)),
            # Train V2 has no resume_from_checkpoint: the loop falls back to this when Ray has none.
            "resume_from": str(Path(scale.resume_from).resolve()) if scale.resume_from else None,
        },
        scaling_config=ScalingConfig(num_workers=scale.workers, use_gpu=scale.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=scale.name,
            storage_path=scale.storage_path,
            failure_config=FailureConfig(max_failures=scale.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=scale.keep_checkpoints,
                                               checkpoint_score_attribute="val_accuracy",
                                               checkpoint_score_order="max"),
        ),
        datasets={"train": stream},
    )
    sizes = {"train": len(data.y_train), "validation": len(data.y_val)}
    return trainer, sizes, data.md5


def best_checkpoint(result) -> tuple[Any, dict[str, Any]]:
    """The reported checkpoint with the highest validation accuracy (earliest on ties)."""
    ranked = sorted(result.best_checkpoints, key=lambda cm: (-cm[1]["val_accuracy"], cm[1]["epoch"]))
    if not ranked:
        raise RuntimeError(f"the run at {result.path} reported no checkpoint; see its logs")
    return ranked[0]


def train(cfg: TrainConfig, scale: ScaleConfig, out_dir: Path | str, data_dir: Path | str | None = None
          ) -> dict[str, Any]:
    """Train with Ray Train and write the same artifact folder as single-process training."""
    trainer, sizes, md5 = build_trainer(cfg, scale, data_dir)
    start = time.perf_counter()
    result = trainer.fit()
    wall_seconds = time.perf_counter() - start
    if result.error:
        raise RuntimeError(f"Ray Train run failed: {result.error}") from result.error
    best, _ = best_checkpoint(result)
    model = _load_model(best)
    latest_state = _read_state(result.checkpoint)  # the history of every epoch, up to the last
    history = pd.DataFrame(latest_state["history"])
    extra = {
        "trained_with": {"runner": "ray_train", "workers": scale.workers, "use_gpu": scale.use_gpu,
                         "cpus_per_worker": scale.cpus_per_worker, "run_path": str(result.path),
                         "attempt_start_epochs": latest_state["attempt_starts"]},
        "wall_seconds": round(wall_seconds, 2),
    }
    return finish(model, cfg, history, md5, sizes, float(np.sum(history["seconds"])), out_dir, data_dir,
                  extra=extra)
