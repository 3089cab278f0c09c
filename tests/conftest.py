"""Shared fixtures: the small real MNIST subset, one local Ray instance per session, and models trained
once for every file that needs one.

Other Ray instances and other pytest sessions may run on the same machine (CI jobs, developers): this
session keeps to its own temp folders, its own Ray token file and its own Ray, and never looks for
"the" Ray on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

import digits_ray  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)

SMALL_MNIST = Path(__file__).parent / "data" / "mnist-small"
CANONICAL_FILES = Path(__file__).parent / "data" / "mnist-canonical"
# Variables that would point this session's Ray processes at another Ray, or at another token.
FOREIGN_RAY_VARIABLES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


_OWN_BASETEMP = pytest.StashKey[str]()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """A base temp folder of this session's own, unless one is given.

    pytest's default, /tmp/pytest-of-USER/pytest-N, is shared by every session of the user, and a
    session prunes the others' folders down to the newest few: with parallel sessions (CI jobs, or
    developers on one machine) a running session loses its folders. This one is removed at the end
    when every test passed, and kept (for its logs) otherwise.
    """
    if config.option.basetemp is None:
        config.option.basetemp = tempfile.mkdtemp(prefix="digits-ray-tests-")
        config.stash[_OWN_BASETEMP] = config.option.basetemp


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    own = session.config.stash.get(_OWN_BASETEMP, None)
    if own and exitstatus == 0:
        shutil.rmtree(own, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    own = config.stash.get(_OWN_BASETEMP, None)
    if own and exitstatus != 0:
        terminalreporter.write_line(f"test folders (logs of the failed tests) kept in {own}")


def run_without_ray(argv: list[str]) -> int:
    """The command line (``digits-ray ARGV``) with Ray's start replaced by a failure: bad input must stop
    earlier. Returns the exit code."""
    from digits_ray.cli import main
    from digits_ray.data import ray_backend

    def refuse(*args, **kwargs):
        pytest.fail("Ray was started for a bad command line")

    started, ray_backend.init_ray = ray_backend.init_ray, refuse
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code
    finally:
        ray_backend.init_ray = started


@pytest.fixture(scope="session", autouse=True)
def _own_digits_home(tmp_path_factory):
    """Default outputs (models, artifacts) go to a folder of the session, never to the real ~/digits-ray."""
    saved = os.environ.get("DIGITS_HOME")
    os.environ["DIGITS_HOME"] = str(tmp_path_factory.mktemp("digits-home"))
    yield
    if saved is None:
        os.environ.pop("DIGITS_HOME", None)
    else:
        os.environ["DIGITS_HOME"] = saved


@pytest.fixture(scope="session", autouse=True)
def _own_ray_token(tmp_path_factory):
    """Every Ray of this session (the local instance, `ray start`, jobs) uses a token file of the session.

    With token authentication on (Ray's default for a new local instance), Ray writes a missing token
    to ~/.ray/auth_token: a test would change the real home, and another Ray of the user would then
    take this session's token. RAY_AUTH_TOKEN_PATH makes Ray read this file instead and never write.
    """
    saved = {name: os.environ.pop(name, None) for name in FOREIGN_RAY_VARIABLES}
    token = tmp_path_factory.mktemp("ray-auth") / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    yield token
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def _isolated_data_env(monkeypatch, tmp_path_factory):
    """Tests name their data folder explicitly; the caller's data variables must not leak in."""
    for name in ("DIGITS_DATA_DIR", "DIGITS_OFFLINE", "DIGITS_MNIST_MIRRORS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DIGITS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session", autouse=True)
def _isolated_tracking(tmp_path_factory):
    """Runs that tests track go to MLflow in this session's temp folder, never to the caller's store or to
    the default one in ~/ray_results (session scope: module fixtures that train through the CLI come first;
    processes and clusters that tests start inherit it). A test that reads runs back names its own store."""
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
def _ray_context(_own_ray_token):
    """A 2-CPU local Ray instance of this session (as on the 2-core CI), never one that runs elsewhere.

    ``address="local"`` starts a new instance even when a cluster runs on this machine. Its processes
    get a temp folder of their own (RAY_TMPDIR, short: Ray's socket paths are limited), holding the
    file where Ray's own clients look for "the current cluster": Ray Train's placement-group cleaner
    asks the State API of whatever Ray it finds that way, and with two Rays on a machine and no such
    file it fails, the placement group of a stopped trial stays, and the next trial waits forever.
    """
    import ray

    from digits_ray.data.ray_backend import runtime_env
    from digits_ray.serve.settings import ray_start_env
    from tests.processes import free_ports

    own_tmp = tempfile.mkdtemp(prefix="dr-", dir="/tmp")
    saved_tmp = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = own_tmp  # inherited by this instance's raylet and workers
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    # Serve's start-up switches, as `python serve_app.py` sets them (HAProxy mode), in the environment Ray
    # starts with, and only there: subprocesses of later tests start their own Rays without them. HAProxy's
    # stats and metrics ports are fixed by default; this instance takes free ones.
    stats, metrics = free_ports(2)
    serve_env = {**ray_start_env(), "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
                 "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics)}
    before = {name: os.environ.get(name) for name in serve_env}
    os.environ.update(serve_env)
    try:
        try:
            # The dashboard serves the State API that Ray Train's placement-group cleaner needs (Tune tests).
            context = ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False,
                               runtime_env=runtime_env())
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        (Path(own_tmp) / "ray").mkdir(exist_ok=True)
        (Path(own_tmp) / "ray" / "ray_current_cluster").write_text(context.address_info["gcs_address"])
        yield context
    finally:
        ray.shutdown()
        if saved_tmp is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved_tmp
        shutil.rmtree(own_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local(_ray_context, tmp_path_factory) -> Path:
    """The session's local Ray instance (2 CPUs); the value is a storage folder for its runs."""
    return tmp_path_factory.mktemp("ray_storage")


@pytest.fixture(scope="session")
def ray_api(_ray_context) -> str:
    """The State API (dashboard) address of the session's Ray: what ``ray.util.state`` must be given,
    or it looks for a Ray on the machine, which may be another one."""
    return f"http://{_ray_context.dashboard_url}"


@pytest.fixture(scope="session")
def digit_model(tmp_path_factory) -> Path:
    """A small CNN with batch normalization (as Tune publishes them) trained for a few seconds on the
    small subset (about 95% test): an artifact folder to predict, serve and export with. Good enough to
    read digits drawn in a browser."""
    from digits_ray.config import TrainConfig
    from digits_ray.data.split import load_train_val
    from digits_ray.inference.evaluate import keep
    from digits_ray.train.local import fit

    cfg = TrainConfig(model="cnn_bn", epochs=4, batch_size=64, learning_rate=3e-3,
                      model_params={"pool_after_each": True}, augment={})
    folder = tmp_path_factory.mktemp("digit-model") / "cnn_bn"
    keep(fit(cfg, load_train_val(cfg.val_fraction, cfg.seed, SMALL_MNIST), verbose=0), folder, SMALL_MNIST)
    return folder


@pytest.fixture(scope="session")
def cli_model(tmp_path_factory) -> Path:
    """A cnn_basic trained by the CLI (`python -m digits_ray train`) on the small subset: the artifact
    tests/test_train_local.py checks, and a second architecture where a test needs two models."""
    from digits_ray.cli import main

    out = tmp_path_factory.mktemp("cli-model") / "cnn"
    code = main(["train", "--model", "cnn_basic", "--epochs", "3", "--batch-size", "128", "--lr", "2e-3",
                 "--param", "dense=64", "--data-dir", str(SMALL_MNIST), "--out", str(out), "--verbose", "0"])
    assert code == 0
    return out


# The Ray Train run that tests/test_ray_train.py checks, and the undisturbed twin of the run that
# tests/test_cluster.py kills a node of: cnn_bn with its defaults (and default augmentation), global
# batch 128 over 2 workers, so 35 steps per epoch on the 4,500 training images. The user's short run
# that once collapsed to chance (BN momentum 0.99).
RAY_TRAIN_EPOCHS, RAY_TRAIN_BATCH = 3, 128


@pytest.fixture(scope="session")
def ray_train_run(ray_local, small_mnist, tmp_path_factory):
    """(metadata, artifact folder, Ray Train run folder) of a 2-worker run on the session's Ray."""
    from digits_ray.config import TrainConfig
    from digits_ray.data.pipeline import StreamConfig
    from digits_ray.inference.evaluate import keep
    from digits_ray.train import distributed

    cfg = TrainConfig(model="cnn_bn", epochs=RAY_TRAIN_EPOCHS, batch_size=RAY_TRAIN_BATCH, augment={})
    scale = distributed.ScaleConfig(workers=2, cpus_per_worker=0.5, storage_path=str(ray_local),
                                    name="two_workers", keep_checkpoints=3,
                                    data=StreamConfig(block_rows=1024, concurrency=1, cpus_per_actor=0.5))
    out = tmp_path_factory.mktemp("ray_artifact") / "model"
    meta = keep(distributed.fit(cfg, scale, data_dir=small_mnist), out, small_mnist)
    return meta, out, ray_local / "two_workers"


@pytest.fixture(scope="session")
def cluster_head(tmp_path_factory):
    """One loopback Ray head started as the README starts it (cluster/start-local.sh, 2 CPUs, token auth),
    shared by the tests that submit jobs to it; tests/test_cluster.py stops it last, checking that
    stop-local.sh stopped it alone. Stopped here (without checks) when that test did not run."""
    from tests.clusters import local_cluster

    with local_cluster(tmp_path_factory.mktemp("cluster-head"), NUM_CPUS="2") as cluster:
        cluster.script("start-local.sh")
        yield cluster
