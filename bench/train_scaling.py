"""Single-process Keras against Ray Train with 1 and 2 workers: same model, epochs and global batch.

    python bench/train_scaling.py                 # about 6 minutes on 2 cores
    python bench/train_scaling.py --use-gpu --mixed-precision on   # on a GPU machine

For each: images/s (median over epochs after the first, which traces the graph), training seconds
until the test accuracy first reaches 99.0% (the test set is evaluated after every epoch for this
report only; nothing is selected on it), the wall seconds from the start of the run (``fit`` or
``trainer.fit``, so Ray's start-up included) to the end of that epoch, final test accuracy, and
Ray's overhead (wall time of the whole run against the time spent in epochs). ``--batch-size`` and
``--learning-rate`` are the global batch and its peak LR for every runner (Ray Train workers each take
their part of the batch).
Writes bench/results/train_scaling.{json,md,png}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from _common import RESULTS, ROOT, markdown_table, save, save_text

from digits_ray import plots
from digits_ray.cli.options import parse_param
from digits_ray.config import TrainConfig
from digits_ray.data.mnist import load_split
from digits_ray.data.pipeline import StreamConfig
from digits_ray.data.ray_backend import init_ray, quiet_data_progress
from digits_ray.data.split import TrainValData, load_train_val
from digits_ray.inference.evaluate import test_metrics
from digits_ray.keras_api import keras
from digits_ray.models.zoo import model_params
from digits_ray.train import checkpoint as ckpt
from digits_ray.train import distributed
from digits_ray.train.local import fit

TARGET = 0.99
# The fastest CPU recipe found for 99.0%: cnn_bn pooling after each conv, BN momentum 0.9 (the
# moving statistics keep up with a 3-epoch, high-LR run), lighter dropout (0.25 dense, 0.1 conv: a
# 3-epoch run underfits more than it overfits), global batch 512 (on CPUs each step's all-reduce
# costs as much as a small batch's compute; 256 per worker with 2 workers), warmup + cosine, 16
# steps per graph call.
RECIPE = {"model": "cnn_bn", "batch_size": 512, "learning_rate": 1.2e-2, "warmup_epochs": 0.3,
          "schedule": "cosine", "steps_per_execution": 16,
          "model_params": {"pool_after_each": True, "bn_momentum": 0.9, "dropout": 0.25, "conv_dropout": 0.1}}


def summarize(name: str, history: list[dict], test_acc: list[float], images_per_epoch: int,
              started_at: float, wall_seconds: float) -> dict:
    """``started_at``: unix time the run was started (``fit`` or ``trainer.fit``)."""
    seconds = np.cumsum([h["seconds"] for h in history])
    reached = next((i for i, acc in enumerate(test_acc) if acc >= TARGET), None)
    steady = [h["seconds"] for h in history[1:]] or [history[0]["seconds"]]
    return {
        "runner": name,
        "epochs": len(history),
        "images_per_second": images_per_epoch / statistics.median(steady),
        "seconds_to_target": float(seconds[reached]) if reached is not None else None,
        "epoch_reaching_target": reached + 1 if reached is not None else None,
        "wall_seconds_to_target": history[reached]["ended_at"] - started_at if reached is not None else None,
        "final_test_accuracy": test_acc[-1],
        "test_accuracy_per_epoch": test_acc,
        "training_seconds": float(seconds[-1]),
        "wall_seconds": wall_seconds,
        "overhead_seconds": wall_seconds - float(seconds[-1]),
    }


def single_process(cfg: TrainConfig, data: TrainValData, data_dir) -> dict:
    test = load_split("test", data_dir)
    test_acc: list[float] = []

    class TestEachEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            test_acc.append(test_metrics(self.model, test)["accuracy"])

    started_at, start = time.time(), time.perf_counter()
    history = fit(cfg, data, verbose=2, extra_callbacks=[TestEachEpoch()]).history
    wall = time.perf_counter() - start
    return summarize("keras, 1 process", history.to_dict("records"), test_acc, len(data.y_train), started_at, wall)


def ray_train(cfg: TrainConfig, workers: int, use_gpu: bool, data: TrainValData, data_dir, storage: str) -> dict:
    name = f"scaling_{workers}w_{int(time.time())}"
    scale = distributed.ScaleConfig(workers=workers, use_gpu=use_gpu, cpus_per_worker=1.5 / workers,
                                    data=StreamConfig(concurrency=1, cpus_per_actor=0.5),
                                    storage_path=storage, name=name, keep_checkpoints=cfg.epochs, max_failures=0)
    trainer = distributed.build_trainer(cfg, scale, data)
    started_at, start = time.time(), time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - start
    test = load_split("test", data_dir)
    test_acc = []
    for checkpoint, _ in sorted(result.best_checkpoints, key=lambda cm: cm[1]["epoch"]):
        model, state = ckpt.load(checkpoint)
        test_acc.append(test_metrics(model, test)["accuracy"])
    steps = distributed.steps_per_epoch(len(data.y_train), cfg.batch_size)
    label = f"Ray Train, {workers} worker{'s' if workers > 1 else ''}" + (" (GPU)" if use_gpu else "")
    return summarize(label, state.history, test_acc, steps * cfg.batch_size, started_at, wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="Ray Train runs (none: single only)")
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--mixed-precision", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--steps-per-execution", type=int, default=RECIPE["steps_per_execution"])
    parser.add_argument("--batch-size", type=int, default=RECIPE["batch_size"], help="global batch")
    parser.add_argument("--learning-rate", type=float, default=RECIPE["learning_rate"],
                        help="peak, for the global batch")
    parser.add_argument("--param", type=parse_param, action="append", default=[], metavar="KEY=VALUE",
                        help="model hyperparameter over the recipe's, e.g. --param dense=64 (repeatable)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--storage-path", default=str(ROOT / "artifacts" / "bench" / "ray_runs"))
    args = parser.parse_args()

    cfg = TrainConfig(**{**RECIPE, "steps_per_execution": args.steps_per_execution, "batch_size": args.batch_size,
                         "learning_rate": args.learning_rate,
                         "model_params": {**RECIPE["model_params"], **dict(args.param)}},
                      epochs=args.epochs, mixed_precision=args.mixed_precision)
    model_params(cfg.model, cfg.model_params)  # a bad --param fails here, before any training
    for workers in args.workers:
        distributed.per_worker_batch(cfg.batch_size, workers)
    data = load_train_val(cfg.val_fraction, cfg.seed, args.data_dir)
    rows = [single_process(cfg, data, args.data_dir)]
    print(rows[-1], flush=True)
    if args.workers:
        init_ray(num_cpus=None if args.use_gpu else 2)
        quiet_data_progress()
    for workers in args.workers:
        rows.append(ray_train(cfg, workers, args.use_gpu, data, args.data_dir, args.storage_path))
        print(rows[-1], flush=True)

    base = rows[0]["images_per_second"]
    for row in rows:
        row["throughput_vs_single"] = row["images_per_second"] / base
    table = markdown_table(
        [{**r, "ips": f"{r['images_per_second']:,.0f}", "rel": f"{r['throughput_vs_single']:.0%}",
          "tt": f"{r['seconds_to_target']:.1f} (epoch {r['epoch_reaching_target']})"
          if r["seconds_to_target"] is not None else "not reached",
          "wtt": f"{r['wall_seconds_to_target']:.0f}" if r["wall_seconds_to_target"] is not None else "-",
          "acc": f"{r['final_test_accuracy']:.2%}", "wall": f"{r['wall_seconds']:.0f}",
          "over": f"{r['overhead_seconds']:.0f}"} for r in rows],
        [("runner", "runner"), ("ips", "images/s"), ("rel", "vs 1 process"), ("tt", "training s to 99.0%"),
         ("wtt", "wall s to 99.0%"),
         ("acc", "final test accuracy"), ("wall", "wall s"), ("over", "overhead s (wall - epochs)")],
    )
    print(table)
    save_text("train_scaling.md", table + "\n")
    plots.bar_chart([r["runner"] for r in rows], [r["images_per_second"] for r in rows],
                    RESULTS / "train_scaling.png", "Training throughput, same model and global batch",
                    "images/s (median epoch)", value_format="{:,.0f}")
    print(f"saved {save('train_scaling', {'recipe': cfg.to_dict(), 'target': TARGET, 'rows': rows})}")


if __name__ == "__main__":
    main()
