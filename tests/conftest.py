"""Shared fixtures: the small real MNIST subset and one local Ray instance per session."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

import digits_ray  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)

SMALL_MNIST = Path(__file__).parent / "data" / "mnist-small"
CANONICAL_FILES = Path(__file__).parent / "data" / "mnist-canonical"
JOBS = Path(__file__).resolve().parents[1] / "jobs"


def load_job(name: str) -> ModuleType:
    """A job script (jobs/NAME.py) as a module, without running it."""
    spec = importlib.util.spec_from_file_location(f"{name}_job", JOBS / f"{name}.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def run_job_without_ray(name: str, argv: list[str]) -> int:
    """A job's main, with Ray's start replaced by a failure: bad input must stop earlier."""
    job = load_job(name)
    job.init_ray = lambda *args: pytest.fail("Ray was started for a bad command line")
    return job.main(argv)


@pytest.fixture(autouse=True)
def _isolated_data_env(monkeypatch, tmp_path_factory):
    """Tests name their data folder explicitly; the caller's data variables must not leak in."""
    for name in ("DIGITS_DATA_DIR", "DIGITS_OFFLINE", "DIGITS_MNIST_MIRRORS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DIGITS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session", autouse=True)
def _isolated_tracking(tmp_path_factory):
    """Runs that tests track go to MLflow in this session's temp folder, never to the caller's store or to
    the default one in ~/ray_results (session scope: module fixtures that train through the CLI come first).
    A test that checks the default store removes the variable for itself."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    yield
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


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


@pytest.fixture(scope="session")
def digit_model(tmp_path_factory) -> Path:
    """A small CNN trained for a few seconds on the small subset (about 95% test): an artifact folder to
    predict and serve with. Good enough to read digits drawn in a browser."""
    from digits_ray.config import TrainConfig
    from digits_ray.data.split import load_train_val
    from digits_ray.evaluate import keep
    from digits_ray.train.local import fit

    cfg = TrainConfig(model="cnn_bn", epochs=4, batch_size=64, learning_rate=3e-3,
                      model_params={"pool_after_each": True}, augment={})
    folder = tmp_path_factory.mktemp("digit-model") / "cnn_bn"
    keep(fit(cfg, load_train_val(cfg.val_fraction, cfg.seed, SMALL_MNIST), verbose=0), folder, SMALL_MNIST)
    return folder
