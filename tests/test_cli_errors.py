"""Entry points reject bad input with one clear line, before loading data or starting Ray."""

import importlib.util
from pathlib import Path

import pytest

from digits_ray.cli import main

JOB = Path(__file__).resolve().parents[1] / "jobs" / "train.py"


def run_job(argv):
    """jobs/train.py's main, with Ray's start replaced by a failure: bad input must stop earlier."""
    spec = importlib.util.spec_from_file_location("train_job", JOB)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    job.init_ray = lambda *args: pytest.fail("Ray was started for a bad command line")
    return job.main(argv)


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
])
def test_train_job_rejects_bad_options_before_starting_ray(argv, message, capsys):
    assert run_job(argv) == 2
    assert message in capsys.readouterr().err
