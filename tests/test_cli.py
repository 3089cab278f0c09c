"""The one command: its subcommands, instant and quiet help, the jobs as thin files over it, outputs that
outlive a Ray job, and new searches that never collide."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from digits_ray import paths
from digits_ray.cli import build_parser, main
from digits_ray.errors import ConfigError
from tests.conftest import run_without_ray

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["train", "tune", "serve", "swap", "evaluate", "predict", "registry", "augment-preview"]
HEAVY = ("tensorflow", "ray", "mlflow", "pandas", "matplotlib")


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, **env})


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    listed = capsys.readouterr().out
    assert all(f"    {name}" in listed for name in SUBCOMMANDS), listed


def test_help_and_argument_errors_load_neither_tensorflow_nor_ray():
    """Every subcommand's --help, and an argument error, in a fresh interpreter: nothing heavy is imported."""
    code = f"""
import contextlib, io, sys
from digits_ray.cli import main
for argv in [["--help"], *[[name, "--help"] for name in {SUBCOMMANDS!r}], ["tune", "--no-such-flag"]]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    done = python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_tensorflow_start_up_lines_are_held_back_and_other_lines_kept():
    done = python("import os, sys\n"
                  "from digits_ray.keras_api import startup_lines_held, tf\n"
                  "tf.constant(1.0) + 1\n"
                  "with startup_lines_held():\n"
                  "    os.write(2, b'a line of our own\\n')\n")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "a line of our own\n"


def options_in_help(text: str) -> set[str]:
    return {word.strip("[],") for word in text.split() if word.startswith(("--", "[--"))}


def test_the_jobs_and_serve_app_are_the_subcommands(capsys):
    """jobs/*.py and serve_app.py hold no options of their own: their help is the subcommand's."""
    for script, command in (("jobs/train.py", ["train"]), ("jobs/tune.py", ["tune"]), ("serve_app.py", ["serve"])):
        done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        ours = options_in_help(capsys.readouterr().out)
        assert {"--address", "--num-cpus"} <= ours and options_in_help(done.stdout) == ours, script


def test_ray_train_options_without_ray_are_refused(tmp_path, capsys):
    assert run_without_ray(["train", "--workers", "4", "--out", str(tmp_path / "m")]) == 2
    assert "--workers set how a Ray Train run is spread; add --ray" in capsys.readouterr().err


def test_outputs_inside_a_jobs_temporary_working_dir_are_refused(tmp_path, monkeypatch, capsys):
    """Under `ray job submit --working-dir .` the job runs in a copy Ray deletes: a relative output is refused."""
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv(paths.JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}}))
    assert paths.job_working_dir() == copy.resolve()
    with pytest.raises(ConfigError, match="temporary copy of its working directory"):
        paths.output_path("predictions.csv", "--out")
    outside = tmp_path / "results" / "p.csv"
    assert paths.output_path(outside, "--out") == outside.resolve()
    assert not paths.registry_default().is_relative_to(copy.resolve())  # defaults live elsewhere
    assert run_without_ray(["tune", "--smoke", "--registry", "models"]) == 2
    err = capsys.readouterr().err
    assert "--registry models would be written into this job's temporary copy" in err and str(paths.home()) in err
    monkeypatch.delenv(paths.JOB_CONFIG_ENV)
    assert paths.job_working_dir() is None and paths.output_path("p.csv", "--out") == copy.resolve() / "p.csv"


def test_defaults_are_absolute_and_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.delenv(paths.REGISTRY_ENV, raising=False)
    assert paths.registry_default() == (tmp_path / "home" / "models").resolve()
    assert paths.artifact_default("model") == (tmp_path / "home" / "artifacts" / "model").resolve()
    monkeypatch.setenv(paths.REGISTRY_ENV, str(tmp_path / "shared" / "models"))
    assert paths.registry_default() == (tmp_path / "shared" / "models").resolve()


def test_a_new_search_gets_a_new_name_and_resume_takes_the_latest(tmp_path, capsys):
    from digits_ray.cli.tune import configs
    from digits_ray.tune.config import SETTINGS_FILE, latest_search

    parse = build_parser().parse_args
    storage = ["--storage-path", str(tmp_path), "--registry", str(tmp_path / "models")]
    first, _, _ = configs(parse(["tune", "--smoke", *storage]))
    assert first.name.startswith("tune-") and first.experiment_path.parent == tmp_path
    for name, mtime in (("tune-20260101-000000", 1_000), ("tune-20260102-000000", 2_000), ("other", 500)):
        (tmp_path / name).mkdir()
        (tmp_path / name / SETTINGS_FILE).write_text("{}")
        os.utime(tmp_path / name / SETTINGS_FILE, (mtime, mtime))
    assert latest_search(tmp_path) == "tune-20260102-000000"
    # --resume without --name picks it (and is then refused: it holds no Tune snapshot, said clearly)
    assert run_without_ray(["tune", "--resume", *storage]) == 2
    assert f"no search to resume at {tmp_path / 'tune-20260102-000000'}" in capsys.readouterr().err
    assert run_without_ray(["tune", "--resume", "--storage-path", str(tmp_path / "empty")]) == 2
    assert "holds no search to continue" in capsys.readouterr().err
