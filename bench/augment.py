"""Single-process against parallel augmentation: throughput, then the end-to-end effect on training.

    python bench/augment.py                       # throughput + end-to-end (about 30 minutes on 2 cores)
    python bench/augment.py --skip-training       # throughput only (about 3 minutes)

Throughput, all in this one run on the same images and augmentation settings:
  (a) a single-threaded per-image loop, (b) a Python thread pool over images (the "multi-threaded"
  approach of the original projects), both with the numpy sampler, (c) the vectorized function in
  one process on one thread, with the numpy sampler and with TensorFlow's compiled warp kernel (the
  default), (d) Ray Data with 1 and 2 augmentation actors on a local Ray (steady state, after the
  actors have started).
End to end: training seconds and test accuracy of cnn_basic and cnn_deep with and without
augmentation. Writes bench/results/augment_throughput.{json,md,png} and augment_training.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from _common import RESULTS, ROOT, markdown_table, save, save_text

from digits_ray import plots
from digits_ray.config import AugmentConfig, TrainConfig
from digits_ray.data.augment import KERNELS, augment, limit_kernel_threads
from digits_ray.data.mnist import load_split
from digits_ray.data.pipeline import StreamConfig, training_stream
from digits_ray.data.ray_backend import init_ray, quiet_data_progress

CFG = AugmentConfig()


def rate(fn, images: int, repeats: int) -> float:
    """Median images/s over ``repeats`` timed runs of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return images / statistics.median(times)


def per_image(images: np.ndarray) -> None:
    for i in range(len(images)):
        augment(images[i : i + 1], np.array([i]), 0, 0, CFG, kernel="numpy")


def thread_pool(images: np.ndarray, threads: int) -> None:
    def one(i: int) -> np.ndarray:
        return augment(images[i : i + 1], np.array([i]), 0, 0, CFG, kernel="numpy")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(len(images))))


def vectorized(images: np.ndarray, labels: np.ndarray, block_rows: int, kernel: str) -> None:
    for start in range(0, len(labels), block_rows):
        index = np.arange(start, min(start + block_rows, len(labels)))
        augment(images[index], index, 0, 0, CFG, kernel=kernel)


def ray_data(images: np.ndarray, labels: np.ndarray, actors: int, epochs: int) -> tuple[float, float]:
    """(steady images/s after the first batch, seconds until the first batch)."""
    stream = training_stream(images, labels, epochs, 0, CFG,
                             StreamConfig(concurrency=actors, cpus_per_actor=2 / actors))
    start = time.perf_counter()
    first, count = None, 0
    for batch in stream.iter_batches(batch_size=4096, batch_format="numpy", prefetch_batches=4):
        if first is None:
            first = time.perf_counter()
        else:
            count += len(batch["label"])
    return count / (time.perf_counter() - first), first - start


def throughput(images: np.ndarray, labels: np.ndarray, repeats: int) -> list[dict]:
    limit_kernel_threads(1)  # (c) is one process on one core, like (a)
    small = images[:3000]
    threads = os.cpu_count() or 2
    rows = [
        {"method": "(a) per-image loop, 1 thread", "images_per_second": rate(lambda: per_image(small), 3000, repeats)},
        {"method": f"(b) thread pool, {threads} threads",
         "images_per_second": rate(lambda: thread_pool(small, threads), 3000, repeats)},
        *({"method": f"(c) vectorized, {kernel} kernel, 1 thread",
           "images_per_second": rate(lambda k=kernel: vectorized(images, labels, 8192, k), len(labels), repeats)}
          for kernel in KERNELS),
    ]
    init_ray(num_cpus=2)
    quiet_data_progress()
    for actors in (1, 2):
        runs = [ray_data(images, labels, actors, epochs=3) for _ in range(repeats)]
        rows.append({"method": f"(d) Ray Data, {actors} actor{'s' if actors > 1 else ''}",
                     "images_per_second": statistics.median(r[0] for r in runs),
                     "startup_seconds": statistics.median(r[1] for r in runs)})
    base = rows[0]["images_per_second"]
    for row in rows:
        row["speedup_vs_loop"] = row["images_per_second"] / base
    return rows


def end_to_end(epochs: dict[str, int], data_dir) -> list[dict]:
    from digits_ray.data.split import load_train_val
    from digits_ray.inference.evaluate import keep
    from digits_ray.train.local import fit

    rows = []
    for model, n_epochs in epochs.items():
        for augmented in (False, True):
            cfg = TrainConfig(model=model, epochs=n_epochs, batch_size=128, augment={} if augmented else None)
            out = ROOT / "artifacts" / "bench" / "augment" / f"{model}_{'aug' if augmented else 'plain'}"
            meta = keep(fit(cfg, load_train_val(cfg.val_fraction, cfg.seed, data_dir)), out, data_dir)
            rows.append({"model": model, "augmented": augmented, "epochs": n_epochs,
                         "training_seconds": meta["training_seconds"],
                         "images_per_second": meta["train_images_per_second"],
                         "val_accuracy": meta["validation"]["val_accuracy"], "test_accuracy": meta["test_accuracy"]})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--epochs", type=int, nargs=2, default=[8, 8], metavar=("CNN_BASIC", "CNN_DEEP"))
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    train = load_split("train", args.data_dir)
    rows = throughput(train.images, train.labels, args.repeats)
    table = markdown_table(
        [{**r, "ips": f"{r['images_per_second']:,.0f}", "x": f"{r['speedup_vs_loop']:.1f}x",
          "start": f"{r['startup_seconds']:.1f}" if "startup_seconds" in r else ""} for r in rows],
        [("method", "method"), ("ips", "images/s (median)"), ("x", "vs per-image loop"), ("start", "startup s")],
    )
    print(table)
    save_text("augment_throughput.md", table + "\n")
    labels = ["(a) loop", "(b) threads", *(f"(c) {k}" for k in KERNELS), "(d) 1 actor", "(d) 2 actors"]
    plots.bar_chart(labels, [r["images_per_second"] for r in rows],
                    RESULTS / "augment_throughput.png", "Augmentation throughput on this machine",
                    "images/s (median)", value_format="{:,.0f}")
    print(f"saved {save('augment_throughput', {'augment_config': CFG.__dict__, 'rows': rows})}")
    if args.skip_training:
        return

    training = end_to_end(dict(zip(("cnn_basic", "cnn_deep"), args.epochs)), args.data_dir)
    fastest = max(r["images_per_second"] for r in training)
    ray_best = max(r["images_per_second"] for r in rows if r["method"].startswith("(d)"))
    table = markdown_table(
        [{**r, "aug": "yes" if r["augmented"] else "no", "secs": f"{r['training_seconds']:.0f}",
          "ips": f"{r['images_per_second']:,.0f}", "test": f"{r['test_accuracy']:.2%}",
          "val": f"{r['val_accuracy']:.2%}"} for r in training],
        [("model", "model"), ("aug", "augmented"), ("epochs", "epochs"), ("secs", "training s"),
         ("ips", "train images/s"), ("val", "val accuracy"), ("test", "test accuracy")],
    )
    table += (f"\n\nRay Data (2 actors) feeds {ray_best / fastest:.0f}x the fastest training throughput "
              f"measured here ({fastest:,.0f} images/s).\n")
    print(table)
    save_text("augment_training.md", table)
    print(f"saved {save('augment_training', {'augment_config': CFG.__dict__, 'rows': training})}")


if __name__ == "__main__":
    main()
