"""The search: Optuna (define-by-run space, seeded) proposes, ASHA stops poor trials early, Tune runs them.

Resources come from the cluster: each trial asks for ``cpus_per_trial`` CPUs (a fraction is fine) and,
where the cluster has GPUs, one GPU (or its Ray Train workers do), and as many trials run at once as fit.
The experiment lives at ``storage_path/name`` (a local or shared filesystem path), with the search's
settings beside Tune's files; ``resume`` continues it with ``Tuner.restore`` and those settings.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

from digits_ray.config import TrainConfig
from digits_ray.data.pipeline import StreamConfig
from digits_ray.data.split import TrainValData
from digits_ray.errors import ConfigError, DigitsError
from digits_ray.train import tracking
from digits_ray.train.finished import reported_epochs
from digits_ray.train.reporting import BEST_METRIC
from digits_ray.train.scale import ScaleConfig
from digits_ray.tune import space, trial
from digits_ray.tune.config import SearchConfig, save_settings

METRIC, MODE = "val_accuracy", "max"
TIME_ATTR = "epoch"  # ASHA's clock: our own epoch count, which survives trial restarts
TRIAL_DRIVER_CPU = 0.01  # a Ray Train trial only waits on its controller (Tune refuses 0)


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
