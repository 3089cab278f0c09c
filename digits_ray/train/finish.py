"""What every training path does once fitting is over: one test evaluation and the artifact.

Single-process training and the Ray Train job both end here, so evaluation and serving never care
how a model was trained.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd

from digits_ray import artifact
from digits_ray.config import TrainConfig
from digits_ray.data.mnist import load_split
from digits_ray.evaluate import test_metrics
from digits_ray.models.zoo import model_params


def history_frame(history: dict[str, list[float]]) -> pd.DataFrame:
    frame = pd.DataFrame(history)
    frame.insert(0, "epoch", range(1, len(frame) + 1))
    return frame


def best_epoch(frame: pd.DataFrame) -> pd.Series:
    """The epoch whose weights are kept: highest validation accuracy, earliest on ties."""
    return frame.loc[frame["val_accuracy"].idxmax()]


def finish(
    model,
    cfg: TrainConfig,
    history: pd.DataFrame,
    data_md5: dict[str, str],
    split_sizes: dict[str, int],
    training_seconds: float,
    out_dir: Path | str,
    data_dir: Path | str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (already holding its best weights) on the test set and write the artifact."""
    test = load_split("test", data_dir)
    metrics = test_metrics(model, test)
    best = best_epoch(history)
    images_seen = split_sizes["train"] * len(history)
    metadata = {
        "model": cfg.model,
        "model_params": dataclasses.asdict(model_params(cfg.model, cfg.model_params)),
        "train_config": cfg.to_dict(),
        "data_md5": {**data_md5, **test.md5},
        "split_sizes": {**split_sizes, "test": len(test)},
        "versions": artifact.library_versions(),
        "training_seconds": round(training_seconds, 2),
        "train_images_per_second": round(images_seen / training_seconds, 1),
        "epochs_run": len(history),
        "validation": {
            "best_epoch": int(best["epoch"]),
            "val_accuracy": float(best["val_accuracy"]),
            "val_loss": float(best["val_loss"]),
        },
        "test_accuracy": metrics["accuracy"],
        "test_loss": metrics["loss"],
        **(extra or {}),
    }
    artifact.write_artifact(out_dir, model, metadata, history)
    return metadata
