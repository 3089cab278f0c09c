"""Options more than one command takes: a training run's, a Ray Train run's scaling, and output paths.

Defaults come from the config dataclasses (``TrainConfig``, ``ScaleConfig``, ``StreamConfig``), never
restated here; nothing imported here loads TensorFlow or Ray.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from digits_ray.config import MIXED_PRECISION_MODES, SCHEDULES, TrainConfig
from digits_ray.data.pipeline import StreamConfig
from digits_ray.paths import DEFAULT_STORAGE, output_path
from digits_ray.train.scale import ScaleConfig

DEFAULTS, SCALE, STREAM = TrainConfig(), ScaleConfig(), StreamConfig()


def parse_param(text: str) -> tuple[str, Any]:
    """``key=value`` with a JSON value (``dropout=0.3``, ``filters=[32,64]``); bare words are strings."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """Options of ``TrainConfig``: one run's model, recipe and data."""
    from digits_ray.models.zoo import MODELS

    parser.add_argument("--model", default=DEFAULTS.model, choices=sorted(MODELS))
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--learning-rate", "--lr", type=float, default=DEFAULTS.learning_rate)
    parser.add_argument("--schedule", default=DEFAULTS.schedule, choices=SCHEDULES)
    parser.add_argument("--warmup-epochs", type=float, default=DEFAULTS.warmup_epochs)
    parser.add_argument("--early-stopping", type=int, default=DEFAULTS.early_stopping_patience, metavar="PATIENCE",
                        help="stop after PATIENCE epochs without val_accuracy gain (0: off)")
    parser.add_argument("--val-fraction", type=float, default=DEFAULTS.val_fraction)
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--mixed-precision", default=DEFAULTS.mixed_precision, choices=MIXED_PRECISION_MODES)
    parser.add_argument("--steps-per-execution", type=int, default=DEFAULTS.steps_per_execution,
                        help="training steps per call into the compiled graph (fewer Python round trips and, "
                             "under Ray Train, fewer metric all-reduces)")
    parser.add_argument("--param", type=parse_param, action="append", default=[], metavar="KEY=VALUE",
                        help="model hyperparameter, e.g. --param dropout=0.3 (repeatable)")
    parser.add_argument("--augment", action="store_true",
                        help="train on a fresh random rotation/shift/zoom of every image each epoch")
    parser.add_argument("--aug", type=parse_param, action="append", default=[], metavar="KEY=VALUE",
                        help="augmentation option, e.g. --aug rotation_deg=15 --aug elastic_alpha=2 "
                             "(implies --augment; repeatable)")
    add_data_dir(parser)


def add_data_dir(parser: argparse.ArgumentParser | Any) -> None:
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder with the MNIST IDX files (default: $DIGITS_DATA_DIR, else download)")


def add_ray_options(parser: argparse.ArgumentParser | Any, local_cpus: str) -> None:
    """Where to run: a cluster's address, else an embedded local Ray with some CPUs."""
    parser.add_argument("--num-cpus", type=float, default=None,
                        help=f"CPUs of the embedded local Ray, {local_cpus} (ignored when a cluster is running)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS, else a running cluster, else local); "
                             "'local' always starts an embedded Ray")


def add_scale_options(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Options of ``ScaleConfig`` and the Ray Data stream: a Ray Train run (``train --ray``). Returns each
    option's destination and default, so that a command can tell which of them were given."""
    scale = parser.add_argument_group("Ray Train (with --ray: ScalingConfig, RunConfig, Ray Data)")
    scale.add_argument("--workers", type=int, default=SCALE.workers,
                       help="training workers (one GPU each); each takes --batch-size / WORKERS of every step")
    scale.add_argument("--use-gpu", action="store_true", help="give each worker a GPU")
    scale.add_argument("--cpus-per-worker", type=float, default=SCALE.cpus_per_worker)
    scale.add_argument("--data-actors", type=int, default=STREAM.concurrency, help="augmentation actors")
    scale.add_argument("--cpus-per-data-actor", type=float, default=STREAM.cpus_per_actor)
    scale.add_argument("--block-rows", type=int, default=STREAM.block_rows)
    scale.add_argument("--max-data-cpus", type=float, default=STREAM.max_data_cpus,
                       help="cap on the CPUs Ray Data may hold in all (default: no cap)")
    scale.add_argument("--storage-path", type=Path, default=DEFAULT_STORAGE, help="where Ray keeps checkpoints")
    scale.add_argument("--name", default=None, help="run name; the same name resumes that run")
    scale.add_argument("--max-failures", type=int, default=SCALE.max_failures)
    scale.add_argument("--keep-checkpoints", type=int, default=SCALE.keep_checkpoints)
    scale.add_argument("--resume-from", default=None, metavar="CHECKPOINT_DIR",
                       help="continue after the epoch of this checkpoint (e.g. RUN/epoch_0003)")
    add_ray_options(scale, "default: every CPU of the machine")
    return {action.dest: action.default for action in scale._group_actions}


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The run's config, fully checked (model hyperparameters too) before any data is loaded."""
    from digits_ray.models.zoo import model_params

    cfg = TrainConfig(
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        schedule=args.schedule,
        warmup_epochs=args.warmup_epochs,
        early_stopping_patience=args.early_stopping,
        val_fraction=args.val_fraction,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        steps_per_execution=args.steps_per_execution,
        model_params=dict(args.param),
        augment=dict(args.aug) if (args.augment or args.aug) else None,
    )
    model_params(cfg.model, cfg.model_params)
    return cfg


def scale_config(args: argparse.Namespace) -> ScaleConfig:
    return ScaleConfig(
        workers=args.workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
        data=StreamConfig(block_rows=args.block_rows, concurrency=args.data_actors,
                          cpus_per_actor=args.cpus_per_data_actor, max_data_cpus=args.max_data_cpus),
        storage_path=str(output_path(args.storage_path, "--storage-path")), name=args.name,
        max_failures=args.max_failures, keep_checkpoints=args.keep_checkpoints, resume_from=args.resume_from,
    )


def keras_verbosity() -> int:
    """Keras progress: a bar per step on a terminal, a line per epoch in a log."""
    return 1 if sys.stdout.isatty() else 2
