"""Experiment tracking with MLflow (the optional ``track`` extra: ``pip install -e ".[track]"``).

Where runs go: ``--mlflow-uri``, else $MLFLOW_TRACKING_URI, else a local SQLite file beside Ray's storage,
``<storage path>/mlflow.db`` (``~/ray_results/digits-ray/mlflow.db`` by default), with the files runs log
in ``mlartifacts/`` beside it: no server needed, and ``mlflow ui --backend-store-uri sqlite:///<that file>``
shows them. Without MLflow installed, nothing is
tracked (a line says so) unless a URI was asked for, which is then an error.

What is logged: every Tune trial (its sampled config, every epoch's report, its end) by Ray's
``MLflowLoggerCallback`` on the search's driver; single training runs and a search's published winner from
the driver, with their parameters, per-epoch history, final figures, and the artifact folder (for the
winner, the whole registry entry: report plots, TFLite exports, ensemble).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digits_ray.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

URI_ENV = "MLFLOW_TRACKING_URI"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"  # beside a SQLite store (MLflow's own default is ./mlruns in the current folder)
EXPERIMENT_PREFIX = "digits-ray/"  # experiments: digits-ray/train, digits-ray/<search name>
TRAIN_EXPERIMENT = EXPERIMENT_PREFIX + "train"
ROLE_TAG = "digits_ray.role"  # "train", "trial" or "winner"
INSTALL = 'pip install -e ".[track]"'


@dataclass(frozen=True)
class Tracking:
    uri: str
    experiment: str


def add_options(parser: argparse.ArgumentParser) -> None:
    """``--mlflow-uri`` and ``--no-mlflow``; shared by ``digits_ray train`` and the jobs."""
    group = parser.add_argument_group("tracking (MLflow, the optional `track` extra)")
    group.add_argument("--mlflow-uri", default=None, metavar="URI",
                       help=f"MLflow tracking URI (default: ${URI_ENV}, else sqlite:///<storage path>/{DB_FILE})")
    group.add_argument("--no-mlflow", action="store_true", help="do not track this run in MLflow")


def store_uri(storage_path: Path | str) -> str:
    """The default store: a SQLite file in ``storage_path`` (created with it)."""
    folder = Path(storage_path).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / DB_FILE}"


def installed() -> bool:
    return importlib.util.find_spec("mlflow") is not None


def resolve(args: argparse.Namespace, storage_path: Path | str, experiment: str) -> Tracking | None:
    """Where this run is tracked (``add_options``' flags), or None: ``--no-mlflow``, or MLflow not installed."""
    if args.no_mlflow:
        return None
    if not installed():
        if args.mlflow_uri:
            raise ConfigError(f"--mlflow-uri needs MLflow, which is not installed: {INSTALL}")
        print(f"MLflow is not installed: this run is not tracked ({INSTALL} to track it)")
        return None
    return Tracking(args.mlflow_uri or os.environ.get(URI_ENV) or store_uri(storage_path), experiment)


def describe(tracking: Tracking | None, run_id: str | None = None) -> str:
    """One line for the end of a job: where its run went, or that it was not tracked."""
    if tracking is None:
        return "MLflow: not tracked"
    where = f"in {tracking.uri}, experiment {tracking.experiment!r}"
    return f"MLflow run {run_id} {where}" if run_id else f"MLflow: tracking {where}"


def experiment_id(tracking: Tracking) -> str:
    """The experiment's id, created if new; a SQLite store's files go beside it, not into the current folder."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.uri)
    found = client.get_experiment_by_name(tracking.experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking.uri.startswith("sqlite:///"):
        location = (Path(tracking.uri.removeprefix("sqlite:///")).resolve().parent / ARTIFACTS_DIR).as_uri()
    return client.create_experiment(tracking.experiment, artifact_location=location)


def tune_callback(tracking: Tracking) -> Any:
    """Ray's MLflow logger for Tune: one run per trial (config, every report, the end), from the driver."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    experiment_id(tracking)  # created here, with its artifact location, before Ray's logger looks it up
    return MLflowLoggerCallback(tracking_uri=tracking.uri, experiment_name=tracking.experiment,
                                tags={ROLE_TAG: "trial"})


def flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level, keys joined with '.'."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Run:
    """An open MLflow run, written through ``MlflowClient`` (no global "active run" state)."""

    BATCH = 100  # MLflow takes at most 100 params (and 1,000 metrics) per call

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.id = client, run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flat(params).items() if v is not None]
        for start in range(0, len(items), self.BATCH):
            self.client.log_batch(self.id, params=items[start: start + self.BATCH])

    def log_metrics(self, metrics: dict[str, Any], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in flat(metrics).items()
                 if isinstance(v, int | float) and not isinstance(v, bool)]
        for start in range(0, len(items), self.BATCH):
            self.client.log_batch(self.id, metrics=items[start: start + self.BATCH])

    def log_history(self, history: pd.DataFrame) -> None:
        """One step per epoch (the ``epoch`` column)."""
        for row in history.to_dict("records"):
            self.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "ended_at")}, step=int(row["epoch"]))

    def log_artifact(self, folder: Path | str) -> None:
        """An artifact folder's facts: parameters (what trained it), final figures, per-epoch history."""
        from digits_ray.models import artifact

        metadata = artifact.read_metadata(folder)
        self.log_params({k: metadata.get(k) for k in ("model", "model_params", "train_config", "trained_with")})
        self.log_metrics({
            **{k: metadata.get(k) for k in ("test_accuracy", "test_loss", "training_seconds", "epochs_run")},
            "validation": metadata.get("validation") or {},
            **{f"abstain.{k}": v for k, v in (metadata.get(artifact.ABSTAIN_FIELD) or {}).items()
               if k in ("threshold", "min_ink", "validation_kept")},
        })
        if "epoch" in (history := artifact.read_history(folder)):
            self.log_history(history)

    def log_folder(self, folder: Path | str, artifact_path: str) -> None:
        self.client.log_artifacts(self.id, str(folder), artifact_path)


@contextmanager
def run(tracking: Tracking, name: str, role: str, tags: dict[str, str] | None = None) -> Iterator[Run]:
    """A new run in ``tracking.experiment``: FINISHED when the block ends, FAILED if it raises."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.uri)
    created = client.create_run(experiment_id(tracking), run_name=name, tags={ROLE_TAG: role, **(tags or {})})
    try:
        yield Run(client, created.info.run_id)
    except BaseException:
        client.set_terminated(created.info.run_id, "FAILED")
        raise
    client.set_terminated(created.info.run_id, "FINISHED")


def log_training(tracking: Tracking | None, folder: Path | str) -> str | None:
    """A single training run (``digits_ray train``, ``jobs/train.py``): its artifact folder; the run's id."""
    if tracking is None:
        return None
    with run(tracking, Path(folder).resolve().name, "train") as tracked:
        tracked.log_artifact(folder)
        tracked.log_folder(folder, "artifact")
    return tracked.id
