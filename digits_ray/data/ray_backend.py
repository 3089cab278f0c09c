"""Connecting to Ray: the running cluster when there is one, else an embedded local instance.

The same job script then works under ``ray job submit`` (RAY_ADDRESS is set), beside a
``ray start --head`` on this machine, and standalone on a laptop; every Ray process it starts gets
the same environment (``runtime_env``) either way.

It sits in the data layer because that environment forwards this process's data locations
(``locations``); every layer above may connect to Ray through it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from digits_ray.data.locations import CACHE_DIR_ENV, DATA_DIR_ENV, MIRRORS_ENV, OFFLINE_ENV
from digits_ray.paths import JOB_CONFIG_ENV

# What every Ray process of ours needs before TensorFlow loads (see digits_ray/__init__), and quiet logs.
WORKER_ENV = {
    "TF_USE_LEGACY_KERAS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # per-operator bars from every trial and worker flood the logs
}
# Data locations of this process, forwarded so that workers read (or refuse to download) the same files.
FORWARDED = (DATA_DIR_ENV, CACHE_DIR_ENV, OFFLINE_ENV, MIRRORS_ENV)


def runtime_env() -> dict[str, Any]:
    """The ``runtime_env`` for ``ray.init``: the Keras switch, log levels and this process's data folder.

    Under ``ray job submit`` the job's own ``runtime_env`` wins: Ray refuses to merge two that set the
    same variable, so variables the job already sets are left out here.
    """
    env = {**WORKER_ENV, **{name: os.environ[name] for name in FORWARDED if os.environ.get(name)}}
    if JOB_CONFIG_ENV in os.environ:
        job_env = (json.loads(os.environ[JOB_CONFIG_ENV]).get("runtime_env") or {}).get("env_vars") or {}
        env = {k: v for k, v in env.items() if k not in job_env}
    return {"env_vars": env}


def init_ray(num_cpus: float | None = None, address: str | None = None) -> str:
    """Connect to ``address`` (or a running cluster), else start a local instance with ``num_cpus``.

    Returns "cluster" or "local". ``address="local"`` always starts a new local instance (tests, and
    runs that must not join a cluster running on this machine). A local instance's CPU count is set
    on purpose: training workers, Ray Data actors and Tune trials share it, and their fractional
    requests are sized to fit it.
    """
    import ray

    if ray.is_initialized():
        return "cluster" if address else "local"
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, runtime_env=runtime_env())
        return "cluster"
    if address != "local":
        try:
            ray.init(address="auto", runtime_env=runtime_env())  # a `ray start --head` on this machine
            return "cluster"
        except ConnectionError:
            pass
    cpus = num_cpus if num_cpus is not None else os.cpu_count()
    # The dashboard (on 127.0.0.1) serves Ray's State API, which Ray Train's placement-group cleaner
    # needs to free the resources of a run whose controller was killed (a trial Tune stopped).
    ray.init(num_cpus=cpus, include_dashboard=True, runtime_env=runtime_env())
    return "local"


def quiet_data_progress() -> None:
    """Ray Data's per-operator progress bars flood logs that are not a terminal."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
