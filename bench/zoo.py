"""Train every zoo model on full MNIST with its published settings; table and comparison chart.

    python bench/zoo.py                      # all models (about 30 minutes on 2 cores)
    python bench/zoo.py --models cnn_bn cnn_nobn

Needs full MNIST: $DIGITS_DATA_DIR, or a download. Writes bench/results/zoo.{json,md,png};
trained models go to artifacts/bench/zoo/<model>.
"""

from __future__ import annotations

import argparse

from _common import RESULTS, ROOT, markdown_table, save, save_text

from digits_ray import plots
from digits_ray.config import TrainConfig
from digits_ray.data.split import load_train_val
from digits_ray.inference.evaluate import keep
from digits_ray.train.local import fit

# Settings and figures of the projects this repository replaces.
PUBLISHED = {
    "dense": ({"epochs": 5, "batch_size": 32}, 0.977, "TensorFlow beginner quickstart"),
    "cnn_basic": ({"epochs": 12, "batch_size": 128}, 0.9925, "Keras mnist_cnn example (12 epochs)"),
    "cnn_nobn": ({"epochs": 5, "batch_size": 64}, 0.99029, "BN comparison, without BN"),
    "cnn_bn": ({"epochs": 5, "batch_size": 64}, 0.99279, "BN comparison, with BN"),
    "cnn_deep": ({"epochs": 10, "batch_size": 128, "augment": {}, "early_stopping_patience": 3}, 0.993,
                 "3-block CNN with augmentation, early stopping, LR schedule"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(PUBLISHED), choices=list(PUBLISHED))
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    rows = []
    for name in args.models:
        settings, published, source = PUBLISHED[name]
        cfg = TrainConfig(model=name, **settings)
        fitted = fit(cfg, load_train_val(cfg.val_fraction, cfg.seed, args.data_dir))
        meta = keep(fitted, ROOT / "artifacts" / "bench" / "zoo" / name, args.data_dir)
        rows.append({
            "model": name, "epochs_run": meta["epochs_run"], "batch_size": cfg.batch_size,
            "augment": cfg.augment is not None, "test_accuracy": meta["test_accuracy"],
            "published_accuracy": published, "published_source": source,
            "training_seconds": meta["training_seconds"], "images_per_second": meta["train_images_per_second"],
            "best_epoch": meta["validation"]["best_epoch"], "val_accuracy": meta["validation"]["val_accuracy"],
        })
        print(rows[-1], flush=True)

    table = markdown_table(
        [{**r, "test": f"{r['test_accuracy']:.2%}", "pub": f"{r['published_accuracy']:.2%}",
          "secs": f"{r['training_seconds']:.0f}", "ips": f"{r['images_per_second']:,.0f}",
          "setting": f"{r['epochs_run']} ep x batch {r['batch_size']}" + (", augmented" if r["augment"] else "")}
         for r in rows],
        [("model", "model"), ("setting", "epochs x batch"), ("test", "test accuracy"), ("pub", "published"),
         ("secs", "training s"), ("ips", "images/s")],
    )
    print(table)
    save_text("zoo.md", table + "\n")
    plots.bar_chart([r["model"] for r in rows], [r["test_accuracy"] for r in rows], RESULTS / "zoo.png",
                    "Model zoo: test accuracy on full MNIST", "test accuracy",
                    reference=[r["published_accuracy"] for r in rows], value_format="{:.2%}")
    print(f"saved {save('zoo', {'rows': rows})}")


if __name__ == "__main__":
    main()
