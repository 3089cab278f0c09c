"""Command line: ``python -m digits_ray {train,evaluate,...}``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from digits_ray.config import MIXED_PRECISION_MODES, SCHEDULES, TrainConfig
from digits_ray.errors import ConfigError, DigitsError

DEFAULTS = TrainConfig()


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
    """Options of ``TrainConfig``; shared by ``train`` here and ``jobs/train.py``."""
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
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder with the MNIST IDX files (default: $DIGITS_DATA_DIR, else download)")


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


def cmd_train(args: argparse.Namespace) -> int:
    from digits_ray.data.split import load_train_val
    from digits_ray.inference.evaluate import keep
    from digits_ray.models.artifact import check_writable
    from digits_ray.train import tracking
    from digits_ray.train.distributed import DEFAULT_STORAGE
    from digits_ray.train.local import fit

    cfg = train_config(args)
    check_writable(args.out)
    track = tracking.resolve(args, DEFAULT_STORAGE, tracking.TRAIN_EXPERIMENT)
    fitted = fit(cfg, load_train_val(cfg.val_fraction, cfg.seed, args.data_dir), verbose=args.verbose)
    metadata = keep(fitted, args.out, args.data_dir)  # the one test evaluation, then the artifact
    print(json.dumps({k: metadata[k] for k in ("model", "training_seconds", "validation", "test_accuracy")},
                     indent=2))
    print(f"artifact written to {args.out}")
    run_id = tracking.log_training(track, args.out)
    print(tracking.describe(track, run_id))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from digits_ray.inference.evaluate import evaluate_artifact

    report = evaluate_artifact(args.artifact, args.data_dir, args.report_dir)
    test = report["test"]
    print(f"test accuracy {test['accuracy']:.4%}  loss {test['loss']:.4f}  ({test['count']} images)")
    print("class  precision  recall  support")
    for cls, row in test["per_class"].items():
        print(f"{cls:>5}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['support']:7d}")
    print(f"plots: {', '.join(report['plots'])} in {args.report_dir or Path(args.artifact) / 'report'}")
    return 0


def cmd_augment_preview(args: argparse.Namespace) -> int:
    import numpy as np

    from digits_ray import plots
    from digits_ray.config import AugmentConfig
    from digits_ray.data.mnist import load_split
    from digits_ray.data.pipeline import EpochSampler

    cfg = AugmentConfig.from_dict(dict(args.aug))
    train = load_split("train", args.data_dir)
    if not 1 <= args.count <= len(train) or args.epochs < 1:
        raise ConfigError(f"--count must be in 1..{len(train)} and --epochs >= 1; got {args.count}, {args.epochs}")
    picked = np.random.default_rng(args.seed).choice(len(train), size=args.count, replace=False)
    sampler = EpochSampler(train.images, train.labels, args.seed, cfg)
    n = len(train)
    # Stream rows whose epoch-shuffled position is each picked image, for epochs 0..k-1.
    columns = [train.images[picked]]
    for epoch in range(args.epochs):
        where = np.argsort(sampler.order(epoch))[picked]
        columns.append(sampler.rows(epoch * n + where)["image"])
    plots.augment_preview(columns, train.labels[picked], args.out, cfg)
    print(f"preview written to {args.out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from digits_ray.inference import batch
    from digits_ray.models.registry import model_to_serve

    if bool(args.images) == bool(args.dir):
        raise ConfigError("give image files or --dir FOLDER (one of the two)")
    if args.max_actors is not None and args.max_actors < 1:
        raise ConfigError(f"--max-actors must be >= 1, got {args.max_actors}")
    if args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a folder; name the CSV file to write")
    model_dir = model_to_serve(args.model)
    if args.dir:
        if not args.dir.is_dir():
            raise ConfigError(f"--dir {args.dir} is not a folder")
        if not batch.has_images(args.dir):
            raise ConfigError(f"--dir {args.dir} holds no image files (extensions read: "
                              f"{', '.join(batch.IMAGE_EXTENSIONS)})")
        from digits_ray.data.ray_backend import init_ray

        init_ray(args.num_cpus, args.address)
        rows = batch.predict_folder(model_dir, args.dir.resolve(), args.max_actors)
    else:
        rows = batch.predict_paths(model_dir, args.images)
    count = batch.write_rows(args.out, rows, batch.columns(model_dir))
    print(f"{count} predictions by {model_dir} written to {args.out}")
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    from digits_ray.models import registry

    if args.action == "list":
        rows = registry.entries_table(args.registry)
        if not rows:
            print(f"{registry.registry_path(args.registry).resolve()} has no entries yet")
            return 0
        def pct(value: Any) -> str:
            return f"{value:.2%}" if isinstance(value, float) else "-"

        print(f"{'entry':<44} {'model':<9} {'val':>7} {'test':>7}  {'published':<25} status")
        for row in rows:
            print(f"{row['entry']:<44} {row['model'] or '-':<9} {pct(row['val_accuracy']):>7} "
                  f"{pct(row['test_accuracy']):>7}  {row['published'] or '-':<25} {row['status']}")
        return 0
    if args.action == "history":
        for event in registry.read_index(args.registry)["history"]:
            print(f"{event['at']}  {event['event']:<8} {event['entry']:<44} served: {event['served']} "
                  f"(before: {event['previous']}) by {event['by']}")
        return 0
    if args.action == "promote":
        if not args.entry:
            raise ConfigError("promote needs the ENTRY to serve (see: registry list)")
        event = registry.promote(args.registry, args.entry)
    elif args.entry:
        raise ConfigError(f"{args.action} takes no ENTRY")
    else:
        event = (registry.rollback if args.action == "rollback" else registry.unpin)(args.registry)
    print(f"{registry.registry_path(args.registry).resolve()}: serves {event['served']} (was {event['previous']}); "
          f"Serve replicas that follow this registry swap to it within their poll interval")
    return 0


def cmd_swap(args: argparse.Namespace) -> int:
    from digits_ray.serve.swap import swap

    result = swap(args.model, args.registry, args.address, args.app, args.url, args.timeout)
    served = result.get("model", {})
    version = served.get("version") if isinstance(served, dict) else served
    print(f"{args.app} serves {version}" + ("" if args.url else f" (status {result['status']})"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from digits_ray.train import tracking

    parser = argparse.ArgumentParser(prog="python -m digits_ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one zoo model in this process and write an artifact folder")
    add_train_options(train)
    train.add_argument("--out", type=Path, default=Path("artifacts") / "model", help="artifact folder to write")
    train.add_argument("--verbose", type=int, default=2 if not sys.stdout.isatty() else 1, choices=(0, 1, 2),
                       help="Keras progress: 1 bar per step, 2 line per epoch")
    tracking.add_options(train)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="test-set metrics and plots for an artifact folder")
    evaluate.add_argument("artifact", type=Path)
    evaluate.add_argument("--data-dir", type=Path, default=None)
    evaluate.add_argument("--report-dir", type=Path, default=None, help="default: ARTIFACT/report")
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser("predict", help="predict image files (or a folder, through Ray Data) into a CSV")
    predict.add_argument("images", nargs="*", type=Path, help="image files (PNG, JPEG, ...)")
    predict.add_argument("--dir", type=Path, default=None, help="a folder of images, read through Ray Data")
    predict.add_argument("--model", type=Path, default=None,
                         help="model folder (default: $DIGITS_MODEL, else the registry's best)")
    predict.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write")
    predict.add_argument("--max-actors", type=int, default=None, help="--dir: predictor actors (default: 1 per CPU)")
    predict.add_argument("--num-cpus", type=float, default=None, help="--dir: CPUs of a local Ray instance")
    predict.add_argument("--address", default=None, help="--dir: Ray address (default: running cluster, else local)")
    predict.set_defaults(func=cmd_predict)

    preview = sub.add_parser("augment-preview", help="PNG of original digits beside augmented versions")
    preview.add_argument("--aug", type=parse_param, action="append", default=[], metavar="KEY=VALUE",
                         help="augmentation option, e.g. --aug elastic_alpha=2 (repeatable)")
    preview.add_argument("--count", type=int, default=8, help="digits (rows)")
    preview.add_argument("--epochs", type=int, default=5, help="augmented versions (columns), one per epoch")
    preview.add_argument("--seed", type=int, default=DEFAULTS.seed)
    preview.add_argument("--data-dir", type=Path, default=None)
    preview.add_argument("--out", type=Path, default=Path("artifacts") / "augment_preview.png")
    preview.set_defaults(func=cmd_augment_preview)

    reg = sub.add_parser("registry", help="list entries; promote one to be served, roll back, unpin")
    reg.add_argument("action", choices=("list", "history", "promote", "rollback", "unpin"))
    reg.add_argument("entry", nargs="?", default=None, help="promote: the entry to serve")
    reg.add_argument("--registry", default=None, help="registry folder (default: $DIGITS_REGISTRY, else ./models)")
    reg.set_defaults(func=cmd_registry)

    swap = sub.add_parser("swap", help="swap the model of a running Serve app in place (a config deploy)")
    swap.add_argument("model", nargs="?", default=None,
                      help="model folder or registry entry (omit: follow the registry's served entry)")
    swap.add_argument("--registry", default=None, help="registry folder (default: $DIGITS_REGISTRY, else ./models)")
    swap.add_argument("--address", default="http://127.0.0.1:8265", help="the Ray dashboard's address")
    swap.add_argument("--app", default="digits", help="Serve application name")
    swap.add_argument("--url", default=None, help="the service's URL: wait until /healthz names the new version")
    swap.add_argument("--timeout", type=float, default=120, help="seconds to wait for the swap")
    swap.set_defaults(func=cmd_swap)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DigitsError as err:  # the user can fix it: one line; anything else keeps its traceback
        parser.exit(2, f"error: {err}\n")
