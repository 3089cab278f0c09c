"""The search: Optuna (define-by-run space, seeded) proposes, ASHA stops poor trials early, Tune runs them.

Resources come from the cluster: each trial asks for ``cpus_per_trial`` CPUs (a fraction is fine) and,
where the cluster has GPUs, one GPU (or its Ray Train workers do), and as many trials run at once as fit.
The experiment lives at ``storage_path/name``; ``resume`` continues it with ``Tuner.restore``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digits_ray.config import TrainConfig
from digits_ray.data.pipeline import StreamConfig
from digits_ray.data.split import TrainValData
from digits_ray.errors import ConfigError, DigitsError
from digits_ray.train.distributed import DEFAULT_STORAGE, ScaleConfig
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
    cpus_per_trial: float = 1.0
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
        if not self.cpus_per_trial > 0:
            problems.append(f"cpus_per_trial must be > 0 (a fraction is fine); got {self.cpus_per_trial}")
        if self.trials_at_once is not None and self.trials_at_once < 1:
            problems.append(f"trials_at_once must be >= 1; got {self.trials_at_once}")
        if self.workers_per_trial < 0:
            problems.append(f"workers_per_trial must be >= 0; got {self.workers_per_trial}")
        if problems:
            raise ConfigError("invalid search configuration: " + "; ".join(problems))

    @property
    def experiment_path(self) -> Path:
        return Path(self.storage_path).expanduser() / self.name


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def trainable(search: SearchConfig, data: TrainValData):
    """The trial function with its data (put in the object store once) and its resources."""
    from ray import tune

    base = TrainConfig(**{**search.base.to_dict(), "epochs": search.max_epochs})
    gpus = search.gpus_per_trial if search.gpus_per_trial is not None else (1.0 if cluster_gpus() else 0.0)
    if search.workers_per_trial:
        # One augmentation actor per trial, a quarter CPU: on 2 cores a 2 x 0.5-CPU trial then fits
        # with room to spare, and on a cluster trials at once scale with the CPUs.
        scale = ScaleConfig(workers=search.workers_per_trial, use_gpu=gpus > 0,
                            cpus_per_worker=search.cpus_per_trial, keep_checkpoints=2, max_failures=1,
                            data=StreamConfig(concurrency=1, cpus_per_actor=0.25))
        fn = tune.with_parameters(trial.ray_train_trial, data=data, base=base, scale=scale,
                                  experiment=str(search.experiment_path.resolve()))
        # The trial itself only waits on its Ray Train controller; the workers hold the resources.
        return tune.with_resources(fn, {"cpu": TRIAL_DRIVER_CPU}), scale
    threads = max(1, math.ceil(search.cpus_per_trial))
    fn = tune.with_parameters(trial.single_process_trial, data=data, base=base, threads=threads)
    return tune.with_resources(fn, {"cpu": search.cpus_per_trial, "gpu": gpus}), None


def trials_at_once(search: SearchConfig, scale: ScaleConfig | None) -> int:
    """As many trials as the cluster's CPUs (or GPUs) hold, unless the search says how many."""
    import ray

    if search.trials_at_once:
        return search.trials_at_once
    resources = ray.cluster_resources()
    if scale is not None:  # a Ray Train run per trial: its workers, its augmentation actor and itself
        per_trial = (scale.workers * scale.cpus_per_worker + scale.data.concurrency * scale.data.cpus_per_actor
                     + TRIAL_DRIVER_CPU)
        by_gpu = resources.get("GPU", 0) // scale.workers if scale.use_gpu else math.inf
    else:
        per_trial = search.cpus_per_trial
        by_gpu = math.inf
    return int(max(1, min(resources.get("CPU", 1) // per_trial, by_gpu)))


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


def make_tuner(search: SearchConfig, data: TrainValData, resume: bool = False):
    """A new ``Tuner``, or, with ``resume``, the interrupted one at ``search.experiment_path``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    check_experiment_path(search.experiment_path, resume)
    fn, scale = trainable(search, data)
    if resume:
        return tune.Tuner.restore(str(search.experiment_path), trainable=fn, resume_unfinished=True,
                                  resume_errored=True)
    searcher = OptunaSearch(functools.partial(space.define_space, space=search.space),
                            metric=METRIC, mode=MODE, seed=search.seed)
    scheduler = ASHAScheduler(time_attr=TIME_ATTR, metric=METRIC, mode=MODE, max_t=search.max_epochs,
                              grace_period=search.grace_epochs, reduction_factor=search.reduction_factor)
    return tune.Tuner(
        fn,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=search.num_samples,
            max_concurrent_trials=trials_at_once(search, scale), time_budget_s=search.time_budget_s,
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=search.name,
            storage_path=str(Path(search.storage_path).expanduser().resolve()),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE),
            failure_config=tune.FailureConfig(max_failures=1),
        ),
    )


def run(search: SearchConfig, data: TrainValData, resume: bool = False) -> Any:
    """Run (or continue) the search; returns Tune's ``ResultGrid``."""
    return make_tuner(search, data, resume).fit()


def trials_table(results: Any) -> Any:
    """One row per trial: its sampled config, best epoch's validation figures, epochs run, status."""
    import pandas as pd

    rows = []
    for result in results:
        history = result.metrics_dataframe
        if history is None or history.empty or METRIC not in history:
            continue
        history = history.sort_values("epoch")
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
