"""MLflow tracking (the `track` extra): where runs go, and a training run as MLflow records it. A search's
trials and winner are checked on the smoke search in tests/test_tune.py."""

from __future__ import annotations

import argparse

import pytest

from digits_ray.cli import main as cli
from digits_ray.models import artifact
from digits_ray.train import tracking

pytest.importorskip("mlflow", reason='MLflow is the optional `track` extra: pip install -e ".[dev,track]"')


def flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    tracking.add_options(parser)
    return parser.parse_args(argv)


def test_runs_go_to_the_flag_then_the_environment_then_sqlite_beside_the_storage(tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.URI_ENV, "http://127.0.0.1:5000")
    assert tracking.resolve(flags("--mlflow-uri", "sqlite:////x/m.db"), tmp_path, "e").uri == "sqlite:////x/m.db"
    assert tracking.resolve(flags(), tmp_path, "e") == tracking.Tracking("http://127.0.0.1:5000", "e")
    monkeypatch.delenv(tracking.URI_ENV)
    assert tracking.resolve(flags(), tmp_path / "runs", "e").uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert tracking.resolve(flags("--no-mlflow"), tmp_path, "e") is None


def test_a_training_run_is_tracked_with_its_parameters_history_figures_and_artifact(small_mnist, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri, out = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", tmp_path / "dense"
    assert cli(["train", "--model", "dense", "--epochs", "2", "--data-dir", str(small_mnist), "--out", str(out),
                "--verbose", "0", "--mlflow-uri", uri]) == 0
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(tracking.TRAIN_EXPERIMENT)
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id in capsys.readouterr().out
    assert run.info.status == "FINISHED" and run.info.run_name == "dense"
    assert run.data.tags[tracking.ROLE_TAG] == "train"
    metadata = artifact.read_metadata(out)
    assert run.data.params["model"] == "dense" and run.data.params["train_config.epochs"] == "2"
    assert run.data.params["model_params.hidden"] == str(metadata["model_params"]["hidden"])
    assert run.data.metrics["test_accuracy"] == pytest.approx(metadata["test_accuracy"])
    assert run.data.metrics["abstain.threshold"] == pytest.approx(metadata["abstain"]["threshold"])
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx(list(artifact.read_history(out)["val_accuracy"]))
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "artifact")}
    assert logged == {"artifact/model.keras", "artifact/metadata.json", "artifact/history.csv"}
    assert (tmp_path / "store" / tracking.ARTIFACTS_DIR).is_dir()  # beside the store, not in the current folder
