"""The search: Optuna (define-by-run space, seeded) proposes, ASHA stops poor trials early, Tune runs them.

Resources come from the cluster: each trial asks for ``cpus_per_trial`` CPUs (a fraction is fine) and,
where the cluster has GPUs, one GPU (or its Ray Train workers do), and as many trials run at once as fit.
The experiment lives at ``storage_path/name`` (a local or shared filesystem path), with the search's
settings beside Tune's files; ``resume`` continues it with ``Tuner.restore`` and those settings.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digits_ray.config import TrainConfig
from digits_ray.data.pipeline import StreamConfig
from digits_ray.data.split import TrainValData
from digits_ray.errors import ConfigError, DigitsError
from digits_ray.train import tracking
from digits_ray.train.distributed import DEFAULT_STORAGE, ScaleConfig
from digits_ray.train.finished import reported_epochs
from digits_ray.train.reporting import BEST_METRIC
from digits_ray.tune import space, trial

METRIC, MODE = "val_accuracy", "max"
TIME_ATTR = "epoch"  # ASHA's clock: our own epoch count, which survives trial restarts
TRIAL_DRIVER_CPU = 0.01  # a Ray Train trial only waits on its controller (Tune refuses 0)


@dataclass(frozen=True)
class SearchConfig:
    """Budget and placement of one search; every field is a flag of ``jobs/tune.py``."""

    num_samples: int = 60
    max_epochs: int = 12  # per trial; ASHA stops most trials long before
    grace_epochs: int = 1  # ASHA judges a trial after this many epochs at the earliest
    reduction_factor: int = 3  # ASHA keeps the best 1/3 at each rung
    time_budget_s: float | None = 3600.0
    trials_at_once: int | None = None  # None: as many as the cluster's resources fit
    cpus_per_trial: float | None = None  # None: 1 per trial, or an equal share per Ray Train worker (<= 1)
    gpus_per_trial: float | None = None  # None: 1 where the cluster has GPUs, else 0
    workers_per_trial: int = 0  # 0: one process per trial; N: each trial is a Ray Train run with N workers
    seed: int = 0
    storage_path: str = str(DEFAULT_STORAGE)
    name: str = "tune"
    space: space.SpaceConfig = field(default_factory=space.SpaceConfig)
    base: TrainConfig = field(default_factory=TrainConfig)  # val split, seed, precision, patience

    def __post_init__(self) -> None:
        problems = []
        if self.num_samples < 1 or self.max_epochs < 1:
            problems.append(f"num_samples and max_epochs must be >= 1; got {self.num_samples}, {self.max_epochs}")
        if not 1 <= self.grace_epochs <= self.max_epochs:
            problems.append(f"grace_epochs must be in 1..max_epochs; got {self.grace_epochs}")
        if self.reduction_factor < 2:
            problems.append(f"reduction_factor must be >= 2; got {self.reduction_factor}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            problems.append(f"time budget must be positive; got {self.time_budget_s}")
        if self.cpus_per_trial is not None and not self.cpus_per_trial > 0:
            problems.append(f"cpus_per_trial must be > 0 (a fraction is fine); got {self.cpus_per_trial}")
        if self.trials_at_once is not None and self.trials_at_once < 1:
            problems.append(f"trials_at_once must be >= 1; got {self.trials_at_once}")
        if self.workers_per_trial < 0:
            problems.append(f"workers_per_trial must be >= 0; got {self.workers_per_trial}")
        elif self.workers_per_trial and self.space.min_batch % self.workers_per_trial:
            problems.append(f"every searched batch must divide among the {self.workers_per_trial} workers of a "
                            f"trial: use a power of two <= min_batch ({self.space.min_batch})")
        if problems:
            raise ConfigError("invalid search configuration: " + "; ".join(problems))

    @property
    def experiment_path(self) -> Path:
        return Path(self.storage_path).expanduser() / self.name

    @property
    def mlflow_experiment(self) -> str:
        return tracking.EXPERIMENT_PREFIX + self.name

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "space": dataclasses.asdict(self.space), "base": self.base.to_dict()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SearchConfig:
        space_values = {k: tuple(v) if isinstance(v, list) else v for k, v in values["space"].items()}
        return cls(**{**values, "space": space.SpaceConfig(**space_values),
                      "base": TrainConfig.from_dict(values["base"])})


SETTINGS_FILE = "digits_search.json"  # beside Tune's files: what a resumed search must search again


def save_settings(search: SearchConfig, data_dir: Path | None) -> None:
    from digits_ray.models.artifact import write_json_atomic

    search.experiment_path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(search.experiment_path / SETTINGS_FILE,
                      {"search": search.to_dict(), "data_dir": str(data_dir.resolve()) if data_dir else None})


def load_settings(path: Path) -> tuple[SearchConfig, Path | None]:
    """The settings a search was started with: a resume trains the same trials on the same data."""
    file = path / SETTINGS_FILE
    if not file.is_file():
        raise DigitsError(f"--resume: {path} has no {SETTINGS_FILE}; it was not started by jobs/tune.py")
    saved = json.loads(file.read_text())
    return SearchConfig.from_dict(saved["search"]), Path(saved["data_dir"]) if saved["data_dir"] else None


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def trainable(search: SearchConfig, data: TrainValData):
    """The trial function with its data (put in the object store once) and its resources."""
    import ray
    from ray import tune

    base = TrainConfig(**{**search.base.to_dict(), "epochs": search.max_epochs})
    gpus = search.gpus_per_trial if search.gpus_per_trial is not None else (1.0 if cluster_gpus() else 0.0)
    if search.workers_per_trial:
        # One augmentation actor per trial, a quarter CPU; each worker an equal share of what is
        # left (at most 1): on 2 cores a 2-worker trial fits, on a cluster trials at once scale.
        stream = StreamConfig(concurrency=1, cpus_per_actor=0.25)
        room = ray.cluster_resources().get("CPU", 1) - stream.cpus_per_actor - TRIAL_DRIVER_CPU
        cpus = search.cpus_per_trial or max(0.1, min(1.0, math.floor(100 * room / search.workers_per_trial) / 100))
        scale = ScaleConfig(workers=search.workers_per_trial, use_gpu=gpus > 0, cpus_per_worker=cpus,
                            keep_checkpoints=2, max_failures=1, data=stream)
        fn = tune.with_parameters(trial.ray_train_trial, data=data, base=base, scale=scale,
                                  experiment=str(search.experiment_path.resolve()))
        # The trial itself only waits on its Ray Train controller; the workers hold the resources.
        return tune.with_resources(fn, {"cpu": TRIAL_DRIVER_CPU}), scale, gpus
    cpus = search.cpus_per_trial or 1.0
    fn = tune.with_parameters(trial.single_process_trial, data=data, base=base, threads=max(1, math.ceil(cpus)))
    return tune.with_resources(fn, {"cpu": cpus, "gpu": gpus}), None, gpus


def trials_at_once(search: SearchConfig, scale: ScaleConfig | None, gpus_per_trial: float) -> int:
    """As many trials as the cluster's CPUs and GPUs hold, unless the search says how many.

    A trial that needs more than the whole cluster is an error here, not a search that waits forever.
    """
    import ray

    resources = ray.cluster_resources()
    if scale is not None:  # a Ray Train run per trial: its workers, its augmentation actor and itself
        cpus = (scale.workers * scale.cpus_per_worker + scale.data.concurrency * scale.data.cpus_per_actor
                + TRIAL_DRIVER_CPU)
        gpus = scale.workers if scale.use_gpu else 0
    else:
        cpus, gpus = search.cpus_per_trial or 1.0, gpus_per_trial
    fits = min(resources.get("CPU", 0) // cpus, resources.get("GPU", 0) // gpus if gpus else math.inf)
    if fits < 1:
        raise ConfigError(f"one trial needs {cpus:g} CPUs and {gpus:g} GPUs; the cluster has "
                          f"{resources.get('CPU', 0):g} and {resources.get('GPU', 0):g} (see --cpus-per-trial, "
                          f"--gpus-per-trial, --workers-per-trial)")
    return search.trials_at_once or int(fits)


def _trial_name(t: Any) -> str:
    return trial.trial_name_of(t.trial_id)


def has_snapshot(path: Path) -> bool:
    """Whether Tune wrote an experiment state here: without one, a tuner file alone cannot be restored."""
    return any(path.glob("experiment_state-*.json"))


def check_experiment_path(path: Path, resume: bool) -> None:
    """A new search needs a fresh folder; a resumed one, a folder Tune can restore (checked before Ray starts)."""
    from ray import tune

    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise DigitsError(f"--resume: no search to resume at {path} (check --storage-path and --name)")
        if not has_snapshot(path):
            raise DigitsError(
                f"--resume: the search at {path} stopped before Tune saved its first snapshot, so there is "
                f"nothing to continue; delete that folder and start the search again without --resume")
    elif path.exists() and any(path.iterdir()):
        raise DigitsError(f"{path} already holds a search: continue it with --resume, or give a new --name")


def make_tuner(search: SearchConfig, data: TrainValData, resume: bool = False, data_dir: Path | None = None,
               track: tracking.Tracking | None = None):
    """A new ``Tuner`` (its settings saved beside it), or, with ``resume``, the interrupted one at
    ``search.experiment_path`` (with the MLflow logger it was started with, if any). ``track``: log every
    trial to MLflow (Ray's logger goes in Tune's RunConfig: Train V2's refuses Tune callbacks)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    check_experiment_path(search.experiment_path, resume)
    fn, scale, gpus = trainable(search, data)
    at_once = trials_at_once(search, scale, gpus)
    if resume:
        return tune.Tuner.restore(str(search.experiment_path), trainable=fn, resume_unfinished=True,
                                  resume_errored=True)
    save_settings(search, data_dir)
    # Optuna learns from a trial's last report: the best epoch so far, so that a trial ASHA stopped,
    # or one whose last epoch dipped, is scored as trials_table ranks it.
    searcher = OptunaSearch(functools.partial(space.define_space, space=search.space),
                            metric=BEST_METRIC, mode=MODE, seed=search.seed)
    scheduler = ASHAScheduler(time_attr=TIME_ATTR, metric=METRIC, mode=MODE, max_t=search.max_epochs,
                              grace_period=search.grace_epochs, reduction_factor=search.reduction_factor)
    return tune.Tuner(
        fn,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=search.num_samples,
            max_concurrent_trials=at_once, time_budget_s=search.time_budget_s,
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=search.name,
            storage_path=str(Path(search.storage_path).expanduser().resolve()),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE),
            failure_config=tune.FailureConfig(max_failures=1),
            callbacks=[tracking.tune_callback(track)] if track else None,
        ),
    )


def run(search: SearchConfig, data: TrainValData, resume: bool = False, data_dir: Path | None = None,
        track: tracking.Tracking | None = None) -> Any:
    """Run (or continue) the search; returns Tune's ``ResultGrid``. ``data_dir``: where ``data`` was read,
    saved with the settings so that a resume reads the same files; ``track``: MLflow, one run per trial."""
    return make_tuner(search, data, resume, data_dir, track).fit()


def trials_table(results: Any) -> Any:
    """One row per trial: its sampled config, best epoch's validation figures, epochs run, status."""
    import pandas as pd

    rows = []
    for result in results:
        history = reported_epochs(result)
        if history is None or METRIC not in history:
            continue
        best = history.loc[history[METRIC].idxmax()]
        config = result.config
        rows.append({
            "trial_id": result.metrics.get("trial_id", Path(result.path).name),
            "model": config["model"],
            "batch_size": 2 ** int(config["log2_batch_size"]),
            "learning_rate": config["learning_rate"],
            "schedule": config.get("schedule"),
            "augment": config.get("augment"),
            "val_accuracy": float(best[METRIC]),
            "val_loss": float(best["val_loss"]),
            "best_epoch": int(best["epoch"]),
            "epochs_run": int(history["epoch"].max()),
            "training_seconds": float(history["seconds"].sum()),
            "error": str(result.error).splitlines()[0] if result.error else "",
            "path": result.path,
            **{k: v for k, v in config.items() if k.startswith((space.MODEL_PREFIX, space.AUGMENT_PREFIX))
               or k == "warmup_epochs"},
        })
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table.sort_values(["val_accuracy", "val_loss"], ascending=[False, True]).reset_index(drop=True)
    return table
