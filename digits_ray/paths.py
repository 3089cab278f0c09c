"""Where outputs go by default, and the check that keeps any output out of a Ray job's temporary folder.

Under ``ray job submit --working-dir .`` the job runs inside a copy of the working directory that Ray
deletes with the job, so a relative output path (``models/``, ``predictions.csv``) would vanish with it.
Every default here is therefore absolute: a per-user folder (``$DIGITS_HOME``, default ``~/digits-ray``)
for models and artifacts, Ray's own ``~/ray_results`` for Train and Tune runs. An output the user names
is resolved to an absolute path and refused when it lies inside the job's copy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from digits_ray.errors import ConfigError

HOME_ENV = "DIGITS_HOME"  # the per-user folder of models and artifacts
REGISTRY_ENV = "DIGITS_REGISTRY"  # the model registry, when not $DIGITS_HOME/models
DEFAULT_STORAGE = Path.home() / "ray_results" / "digits-ray"  # Ray Train runs and Tune searches
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job manager for a submitted job's driver


def home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / "digits-ray").expanduser().resolve()


def registry_default() -> Path:
    """The model registry: $DIGITS_REGISTRY, else $DIGITS_HOME/models."""
    return Path(os.environ.get(REGISTRY_ENV) or home() / "models").expanduser().resolve()


def artifact_default(name: str) -> Path:
    """A folder for one trained model, named by what trained it (``model``, ``ray_model``)."""
    return home() / "artifacts" / name


def job_working_dir() -> Path | None:
    """The temporary copy of ``--working-dir`` a submitted Ray job runs in; None outside such a job."""
    config = os.environ.get(JOB_CONFIG_ENV)
    if not config:
        return None
    runtime_env = json.loads(config).get("runtime_env") or {}
    return Path.cwd().resolve() if runtime_env.get("working_dir") else None


def output_path(path: Path | str, flag: str) -> Path:
    """``path`` made absolute; refused if it would land in the job's temporary copy of its working dir."""
    resolved = Path(path).expanduser().resolve()
    copy = job_working_dir()
    if copy is not None and resolved.is_relative_to(copy):
        raise ConfigError(f"{flag} {path} would be written into this job's temporary copy of its working "
                          f"directory ({copy}), which Ray deletes with the job; pass an absolute path outside "
                          f"it (for example under {home()}), or leave {flag} out for the default")
    return resolved
