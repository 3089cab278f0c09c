"""After the search: choose the winner by validation accuracy, optionally retrain it longer with Ray
Train, test it once, export it (TFLite float32 and int8), ensemble the top trials, write the report,
and publish all of it as one registry entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from digits_ray import plots
from digits_ray.config import TrainConfig
from digits_ray.data.mnist import MnistSplit, load_split
from digits_ray.data.pipeline import StreamConfig
from digits_ray.data.split import TrainValData
from digits_ray.errors import DigitsError
from digits_ray.inference.evaluate import abstain_rule, predict_proba, test_figures
from digits_ray.models import artifact, registry
from digits_ray.models.metrics import classification_metrics
from digits_ray.train import distributed, finished, tracking
from digits_ray.train.result import FitResult
from digits_ray.tune import report, space
from digits_ray.tune.config import PublishConfig, SearchConfig
from digits_ray.tune.search import METRIC, trials_table


def _by_path(results: Any) -> dict[str, Any]:
    return {result.path: result for result in results}


def winner_fit(table: pd.DataFrame, results: Any, search: SearchConfig, publish: PublishConfig,
               data: TrainValData) -> FitResult:
    """The best trial's model, or (``final_epochs``) its config retrained longer with Ray Train."""
    best = _by_path(results)[table.iloc[0]["path"]]
    base = TrainConfig(**{**search.base.to_dict(), "epochs": search.max_epochs})
    cfg = space.train_config(best.config, base)
    if not publish.final_epochs:
        workers = max(1, search.workers_per_trial)
        trained_with = {"runner": "tune_trial", "trial_path": best.path, "workers": workers,
                        "per_worker_batch": cfg.batch_size // workers}
        return finished.fit_result(best, cfg, data, trained_with)
    import ray

    cfg = dataclasses.replace(cfg, epochs=publish.final_epochs)
    stream = StreamConfig(concurrency=1, cpus_per_actor=0.25)
    share = (ray.cluster_resources().get("CPU", 1) - stream.cpus_per_actor) / publish.final_workers
    cpus = publish.final_cpus_per_worker or max(0.1, min(1.0, math.floor(100 * share) / 100))  # never over
    scale = distributed.ScaleConfig(
        workers=publish.final_workers, use_gpu=publish.final_use_gpu, cpus_per_worker=cpus, data=stream,
        storage_path=search.storage_path, name=registry.entry_name(f"{search.name}-final"), keep_checkpoints=2,
        max_failures=1)
    distributed.per_worker_batch(cfg.batch_size, scale.workers)
    return distributed.fit(cfg, scale, data)


def ensemble_size(val_probs: list[np.ndarray], labels: np.ndarray) -> int:
    """How many of the top trials (2 .. all, in rank order) to average: the most accurate average on the
    validation split, the lower validation loss on a tie (then the larger ensemble)."""
    if len(val_probs) < 2:
        raise ValueError(f"an ensemble needs at least 2 candidates, got {len(val_probs)}")
    scored = []
    for k in range(2, len(val_probs) + 1):
        metrics = classification_metrics(np.mean(val_probs[:k], axis=0), labels)
        scored.append((metrics["accuracy"], -metrics["loss"], k))
    return max(scored)[2]


def ensemble_artifact(table: pd.DataFrame, results: Any, top_k: int, data: TrainValData, test: MnistSplit,
                      out: Path, winner_metadata: dict[str, Any]) -> dict[str, Any] | None:
    """The best of the top trials' best epochs, averaged, as an artifact folder; its one test evaluation included.

    How many of the top ``top_k`` to average (2 .. top_k) is chosen on the validation split: a weak
    third trial would otherwise pull the average down.
    """
    from digits_ray.models.ensemble import build_ensemble

    rows = table[table["error"] == ""].head(top_k)
    if len(rows) < 2:
        return None
    by_path = _by_path(results)
    candidates = [finished.best_model(by_path[path]) for path in rows["path"]]
    size = ensemble_size([predict_proba(m, data.x_val) for m in candidates], data.y_val)
    rows, members = rows.head(size), candidates[:size]
    model = build_ensemble(members)
    val = classification_metrics(predict_proba(model, data.x_val), data.y_val)
    tested, _ = test_figures(model, test)
    metadata = {
        "model": "ensemble",
        "model_params": {"members": rows[["trial_id", "model", "val_accuracy", "path"]].to_dict("records"),
                         "combination": "mean of probabilities"},
        "train_config": None,  # each member's is in its trial folder (model_params.members[].path)
        "data_md5": {**winner_metadata["data_md5"]},
        "split_sizes": winner_metadata["split_sizes"],
        "versions": artifact.library_versions(),
        "training_seconds": float(rows["training_seconds"].sum()),
        "validation": {"best_epoch": None, "val_accuracy": val["accuracy"], "val_loss": val["loss"]},
        "trained_with": {"runner": "ensemble", "members": len(members), "candidates": len(candidates),
                         "size_chosen_on": "validation accuracy of the average of the top 2..k trials"},
        "test_accuracy": tested["test_accuracy"],
        "test_loss": tested["test_loss"],
        artifact.ABSTAIN_FIELD: abstain_rule(model, (data.x_val, data.y_val)),
    }
    history = rows[["trial_id", "model", "val_accuracy", "val_loss", "best_epoch"]]
    artifact.write_artifact(out, model, metadata, history)
    return metadata


def publish_search(results: Any, search: SearchConfig, publish: PublishConfig, data: TrainValData,
                   data_dir: Path | str | None, settings: dict[str, Any],
                   track: tracking.Tracking | None = None) -> Path:
    """Everything after the search, as one registry entry; returns its folder. ``track``: the winner becomes
    an MLflow run (parameters, history, figures, the whole entry folder), whose id the entry records."""
    from digits_ray.models.export import export_tflite

    table = trials_table(results)
    if table.empty:
        raise DigitsError(f"no trial of the search at {search.experiment_path} reported a validation accuracy; "
                          f"see the trials' error.txt files there")
    fitted = winner_fit(table, results, search, publish, data)
    test = load_split("test", data_dir)  # the test set, read once, for the models this entry keeps

    def build(entry: Path) -> dict[str, Any]:
        tested, probs = test_figures(fitted.model, test)
        metadata = fitted.write_artifact(entry, test=tested, abstain=abstain_rule(fitted.model, fitted.validation))
        plots.history(fitted.history, entry / registry.SEARCH_DIR / "winner_history.png")
        plots.confusion(np.asarray(classification_metrics(probs, test.labels)["confusion_matrix"]),
                        entry / registry.SEARCH_DIR / "winner_confusion_matrix.png")
        by_path = _by_path(results)
        histories = {trial_id: finished.reported_epochs(by_path[path])[["epoch", METRIC]]
                     for trial_id, path in zip(table["trial_id"], table["path"])}
        report.write(table, histories, entry / registry.SEARCH_DIR)
        tflite = export_tflite(fitted.model, entry / registry.TFLITE_DIR, data.x_train, test.images, test.labels,
                               metadata["test_accuracy"], seed=search.seed)
        artifact.write_json_atomic(entry / registry.TFLITE_DIR / "tflite.json", tflite)
        ensemble = ensemble_artifact(table, results, publish.top_k, data, test, entry / registry.ENSEMBLE_DIR,
                                     metadata)
        summary = {
            "model": metadata["model"],
            "val_accuracy": metadata["validation"]["val_accuracy"],
            "test_accuracy": metadata["test_accuracy"],
            "tflite_int8_test_accuracy": tflite["int8"]["test_accuracy"],
            "ensemble_test_accuracy": ensemble["test_accuracy"] if ensemble else None,
            "trials": len(table),
            "experiment_path": str(search.experiment_path),
        }
        winner_run = (tracking.run(track, f"winner {name}", "winner", {"registry_entry": name}) if track
                      else contextlib.nullcontext())
        with winner_run as tracked:
            summary["mlflow_run_id"] = tracked.id if tracked else None
            artifact.write_json_atomic(entry / registry.SEARCH_DIR / "search.json", {
                **summary, "settings": settings, "winner_config": by_path[table.iloc[0]["path"]].config,
                "trained_with": metadata["trained_with"], "tflite": tflite,
                "ensemble_members": ensemble["model_params"]["members"] if ensemble else [],
            })
            if tracked:
                tracked.log_artifact(entry)
                tracked.log_params({"winner_trial": table.iloc[0]["trial_id"], "registry_entry": name})
                tracked.log_metrics({k: summary[k] for k in ("tflite_int8_test_accuracy", "ensemble_test_accuracy",
                                                             "trials")})
                tracked.log_folder(entry, "entry")
        return summary

    name = registry.entry_name(search.name)
    return registry.publish(publish.registry, name, build)
