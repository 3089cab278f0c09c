"""Shared fixtures: the small real MNIST subset and one local Ray instance per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import digits_ray  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)

SMALL_MNIST = Path(__file__).parent / "data" / "mnist-small"
CANONICAL_FILES = Path(__file__).parent / "data" / "mnist-canonical"


@pytest.fixture(autouse=True)
def _isolated_data_env(monkeypatch, tmp_path_factory):
    """Tests name their data folder explicitly; the caller's data variables must not leak in."""
    for name in ("DIGITS_DATA_DIR", "DIGITS_OFFLINE", "DIGITS_MNIST_MIRRORS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DIGITS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def small_mnist() -> Path:
    return SMALL_MNIST


@pytest.fixture(scope="session")
def train_only_mnist(tmp_path_factory) -> Path:
    """The small subset without its test files: a run that opens the test split fails on it."""
    folder = tmp_path_factory.mktemp("train-only")
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "checksums.md5"):
        (folder / name).write_bytes((SMALL_MNIST / name).read_bytes())
    return folder


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A 2-CPU local Ray instance shared by every test that needs one (as on the 2-core CI)."""
    import ray

    from digits_ray.ray_backend import runtime_env

    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    # The dashboard serves the State API that Ray Train's placement-group cleaner needs (Tune tests).
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False, runtime_env=runtime_env())
    yield tmp_path_factory.mktemp("ray_storage")
    ray.shutdown()
