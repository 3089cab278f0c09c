"""A search's options, the publish step's, and where searches live: checked and shown without TensorFlow or Ray.

Every search has its own folder, ``storage_path/name``, holding Tune's files and ``digits_search.json``
(what a resumed search must search again). A new search is named by the time it starts, as Ray Tune
names its own runs, so starting one twice never collides; ``latest_search`` finds the one to resume.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from digits_ray.config import TrainConfig
from digits_ray.errors import ConfigError, DigitsError
from digits_ray.paths import DEFAULT_STORAGE
from digits_ray.train import tracking
from digits_ray.tune.space import SpaceConfig

SEARCH_NAME_PREFIX = "tune-"


@dataclass(frozen=True)
class SearchConfig:
    """Budget and placement of one search; every field is a flag of ``digits-ray tune``."""

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
    name: str = "tune"  # the command line gives each new search its own: new_search_name()
    space: SpaceConfig = field(default_factory=SpaceConfig)
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
        return cls(**{**values, "space": SpaceConfig(**space_values),
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
        raise DigitsError(f"--resume: {path} has no {SETTINGS_FILE}; it was not started by digits-ray tune "
                          "(jobs/tune.py)")
    saved = json.loads(file.read_text())
    return SearchConfig.from_dict(saved["search"]), Path(saved["data_dir"]) if saved["data_dir"] else None


@dataclass(frozen=True)
class PublishConfig:
    """What happens to the winner: where it is published, the ensemble, an optional longer retraining."""

    registry: str | None = None  # None: $DIGITS_REGISTRY, else $DIGITS_HOME/models (paths.registry_default)
    top_k: int = 3  # ensemble members (1 or fewer trials: no ensemble)
    final_epochs: int = 0  # 0: keep the winning trial's best checkpoint; E: retrain it E epochs with Ray Train
    final_workers: int = 1
    final_use_gpu: bool = False
    final_cpus_per_worker: float | None = None  # None: an equal share of the cluster's CPUs, at most 1


def new_search_name() -> str:
    """``tune-YYYYmmdd-HHMMSS``: a new search's default name."""
    return SEARCH_NAME_PREFIX + datetime.now().strftime("%Y%m%d-%H%M%S")


def latest_search(storage_path: Path | str) -> str:
    """The name of the most recently started search under ``storage_path`` (``--resume`` without ``--name``)."""
    root = Path(storage_path).expanduser()
    searches = sorted((p for p in root.glob("*") if (p / SETTINGS_FILE).is_file()),
                      key=lambda p: (p / SETTINGS_FILE).stat().st_mtime)
    if not searches:
        raise DigitsError(f"--resume: {root} holds no search to continue (check --storage-path, or give --name)")
    return searches[-1].name
