"""Entry points reject bad input with one clear line, before loading data or starting Ray."""

from pathlib import Path

import pytest

from digits_ray.cli import main
from tests.conftest import run_without_ray


def run_job(argv):
    return run_without_ray(["train", "--ray", *argv])


@pytest.mark.parametrize("argv, message", [
    (["--aug", "tilt=3"], "unknown augmentation option(s) ['tilt']"),
    (["--count", "0"], "--count must be in 1..5000"),
])
def test_augment_preview_rejects_bad_options(small_mnist, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["augment-preview", "--data-dir", str(small_mnist), "--out", str(tmp_path / "p.png"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--param", "widthh=3"], "has no hyperparameter(s) ['widthh']"),
    (["--aug", "tilt=3"], "unknown augmentation option(s)"),
    (["--workers", "0"], "need workers >= 1"),
    (["--workers", "2", "--batch-size", "65"], "batch_size 65 (global) does not divide among 2 workers"),
    (["--resume-from", "/nonexistent/epoch_0001"], "is not a checkpoint folder"),
])
def test_train_job_rejects_bad_options_before_starting_ray(argv, message, capsys):
    assert run_job(argv) == 2
    assert message in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """Only DigitsError becomes a one-line exit 2: any other exception (a bug, TensorFlow's, Ray's) propagates."""
    from digits_ray.train import local

    def broken_fit(*args, **kwargs):
        raise RuntimeError("an internal failure")

    monkeypatch.setattr(local, "fit", broken_fit)
    with pytest.raises(RuntimeError, match="an internal failure"):
        main(["train", "--model", "dense", "--data-dir", str(Path(__file__).parent / "data" / "mnist-small"),
              "--out", str(tmp_path / "m")])


def test_the_runtime_env_forwards_the_data_folder_and_defers_to_a_submitted_job(monkeypatch):
    import json

    from digits_ray.data.ray_backend import runtime_env

    monkeypatch.setenv("DIGITS_DATA_DIR", "/data/mnist")
    env = runtime_env()["env_vars"]
    assert env["TF_USE_LEGACY_KERAS"] == "1" and env["DIGITS_DATA_DIR"] == "/data/mnist"
    # Under `ray job submit --runtime-env-json`, Ray refuses to merge two runtime envs that set the same
    # variable: the job's own setting wins, and is left out here.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"env_vars": {"DIGITS_DATA_DIR": "/job/data"}}}))
    env = runtime_env()["env_vars"]
    assert "DIGITS_DATA_DIR" not in env and env["TF_USE_LEGACY_KERAS"] == "1"
