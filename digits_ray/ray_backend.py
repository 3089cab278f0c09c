"""Connecting to Ray: the running cluster when there is one, else an embedded local instance.

The same job script then works under ``ray job submit`` (RAY_ADDRESS is set), beside a
``ray start --head`` on this machine, and standalone on a laptop.
"""

from __future__ import annotations

import os

# What every Ray process of ours needs before TensorFlow loads (see digits_ray/__init__).
WORKER_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


def init_ray(num_cpus: float | None = None, address: str | None = None) -> str:
    """Connect to ``address`` (or a running cluster), else start a local instance with ``num_cpus``.

    Returns "cluster" or "local". A local instance's CPU count is set on purpose: training workers,
    Ray Data actors and Tune trials share it, and their fractional requests are sized to fit it.
    """
    import ray

    if ray.is_initialized():
        return "cluster" if address else "local"
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"])
        return "cluster"
    try:
        ray.init(address="auto")  # a `ray start --head` on this machine
        return "cluster"
    except ConnectionError:
        cpus = num_cpus if num_cpus is not None else os.cpu_count()
        ray.init(num_cpus=cpus, include_dashboard=False, runtime_env={"env_vars": WORKER_ENV})
        return "local"


def quiet_data_progress() -> None:
    """Ray Data's per-operator progress bars flood logs that are not a terminal."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
