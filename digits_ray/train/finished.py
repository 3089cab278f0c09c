"""A finished Ray run read back: its kept checkpoints, its reported epochs, the model of its best epoch.

Ray Train runs and Tune trials both end as a Ray ``Result`` whose checkpoints and metrics live in Ray's
storage. This module is where they are read: ``fit_result`` turns a finished trial into the ``FitResult``
every runner returns (whose ``write_artifact`` makes the artifact folder), so that the Tune publish step
needs one call, not the checkpoint format and the best-epoch rule.
"""

from __future__ import annotations

from typing import Any

from digits_ray.config import TrainConfig
from digits_ray.data.split import TrainValData
from digits_ray.train import checkpoint as ckpt
from digits_ray.train import recipe
from digits_ray.train.result import FitResult

# The per-epoch columns a FitResult's history keeps of what a run reported.
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds", "ended_at")


def kept_checkpoints(result: Any) -> list[tuple[Any, dict[str, Any]]]:
    """A finished run's checkpoints with their metrics, whichever kind of run reported them.

    Ray keeps the checkpoints of a Ray Train run and of a one-process Tune trial; a Ray Train run inside a
    Tune trial reports each checkpoint's path as the metric ``checkpoint_path`` (``TuneReportCallback``),
    and Ray Train keeps the best of them.
    """
    from ray.tune import Checkpoint

    found = list(result.best_checkpoints)
    history = result.metrics_dataframe
    if not found and history is not None and "checkpoint_path" in history:
        for row in history.dropna(subset=["checkpoint_path"]).to_dict("records"):
            if ckpt.is_checkpoint(row["checkpoint_path"]):  # Ray Train deletes all but the best few
                found.append((Checkpoint.from_directory(row["checkpoint_path"]), row))
    return found


def best_checkpoint(kept: list[tuple[Any, dict[str, Any]]], run_path: str) -> Any:
    """Of a run's kept (checkpoint, metrics), the best epoch's by ``recipe.best_epoch`` (highest
    val_accuracy, earliest on ties)."""
    kept = sorted(kept, key=lambda cm: cm[1]["epoch"])
    if not kept:
        raise RuntimeError(f"the run at {run_path} kept no checkpoint; see its logs")
    return kept[recipe.best_epoch([metrics for _, metrics in kept])][0]


def reported_epochs(result: Any) -> Any:
    """A run's reported epochs, once each: a run restarted from an older checkpoint reports some again."""
    history = result.metrics_dataframe
    if history is None or history.empty or "epoch" not in history:
        return None
    return history.sort_values("epoch").drop_duplicates("epoch", keep="last").reset_index(drop=True)


def best_model(result: Any) -> Any:
    """A finished run's model at its best epoch (``recipe.best_epoch`` over the checkpoints it kept)."""
    model, _ = ckpt.load(best_checkpoint(kept_checkpoints(result), result.path))
    return model


def fit_result(result: Any, cfg: TrainConfig, data: TrainValData, trained_with: dict[str, Any]) -> FitResult:
    """A finished trial as a kept model: its best epoch's model and the epochs it reported, trained with
    ``cfg`` on ``data``; ``trained_with`` says how (runner, workers, ...)."""
    history = reported_epochs(result)
    rows = history[[c for c in HISTORY_COLUMNS if c in history]].to_dict("records")
    return FitResult.from_history(best_model(result), cfg, rows, data, trained_with)
