"""Single-process training end to end on the small subset: CLI, artifact, evaluation, plots."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from digits_ray.cli import main
from digits_ray.config import TrainConfig
from digits_ray.data.split import load_train_val
from digits_ray.inference.evaluate import predict_proba
from digits_ray.keras_api import keras
from digits_ray.models import artifact
from digits_ray.models.metrics import classification_metrics


@pytest.fixture(scope="module")
def trained(cli_model):
    """The session's CLI run (conftest's ``cli_model``): `train --model cnn_basic --epochs 3 --batch-size 128
    --lr 2e-3 --param dense=64`."""
    return cli_model


def test_artifact_is_complete(trained):
    meta = artifact.read_metadata(trained)
    assert set(artifact.REQUIRED_METADATA) <= set(meta)
    assert meta["model"] == "cnn_basic" and meta["model_params"]["dense"] == 64
    assert meta["train_config"]["epochs"] == 3 and meta["epochs_run"] == 3
    assert meta["split_sizes"] == {"train": 4500, "validation": 500, "test": 1000}
    assert meta["data_md5"]["t10k-images-idx3-ubyte.gz"] == "37e201e31ad415f0b749e7ef3110f616"
    assert meta["versions"]["tf_keras"].startswith("2.")
    assert meta["training_seconds"] > 0 and meta["train_images_per_second"] > 0
    assert 0.85 < meta["test_accuracy"] <= 1.0  # 3 epochs on 4,500 images learn real digits
    assert meta[artifact.ABSTAIN_FIELD]["validation_kept"] >= 0.99  # the abstain rule, fitted on validation
    history = artifact.read_history(trained)
    assert list(history["epoch"]) == [1, 2, 3]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds", "ended_at"} <= set(history.columns)
    # The per-step cosine schedule: "lr" is the LR of each epoch's last step (ceil(4500 / 128) = 36 steps).
    schedule = keras.optimizers.schedules.CosineDecay(2e-3, 3 * 36, alpha=0.01)
    np.testing.assert_allclose(history["lr"], [float(schedule(36 * k - 1)) for k in (1, 2, 3)], rtol=1e-5)
    assert (history["ended_at"].diff().dropna() >= history["seconds"].iloc[1:] * 0.99).all()  # epochs end in order


def test_artifact_holds_the_best_validation_epoch(trained, small_mnist):
    meta = artifact.read_metadata(trained)
    cfg = TrainConfig.from_dict(meta["train_config"])
    data = load_train_val(cfg.val_fraction, cfg.seed, small_mnist)
    model = artifact.load_model(trained)
    val_accuracy = classification_metrics(predict_proba(model, data.x_val), data.y_val)["accuracy"]
    assert val_accuracy == pytest.approx(meta["validation"]["val_accuracy"], abs=1e-6)
    assert meta["validation"]["val_accuracy"] == artifact.read_history(trained)["val_accuracy"].max()


def test_evaluate_writes_report_and_updates_metadata(trained, small_mnist, tmp_path, capsys):
    trained = Path(shutil.copytree(trained, tmp_path / "cnn"))  # the session's artifact stays as it was
    artifact.update_metadata(trained, {"test_accuracy": -1.0, "test_loss": -1.0})
    assert main(["evaluate", str(trained), "--data-dir", str(small_mnist)]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "precision" in printed
    report_dir = trained / artifact.REPORT_DIR
    for name in ("history.png", "confusion_matrix.png", "samples.png", "misclassified.png"):
        assert (report_dir / name).read_bytes()[:4] == b"\x89PNG"
    report = json.loads((report_dir / "report.json").read_text())
    matrix = np.array(report["test"]["confusion_matrix"])
    assert matrix.sum() == 1000 and matrix.trace() / 1000 == pytest.approx(report["test"]["accuracy"])
    meta = artifact.read_metadata(trained)
    assert meta["test_accuracy"] == report["test"]["accuracy"] and meta["test_loss"] == report["test"]["loss"]


def test_train_refuses_to_overwrite_a_folder_that_is_not_an_artifact(small_mnist, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "dense", "--epochs", "1", "--data-dir", str(small_mnist),
              "--out", str(tmp_path), "--verbose", "0"])
    assert exit_info.value.code == 2
    assert "not a model artifact" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--param", "widthh=3"], "no hyperparameter"),
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--val-fraction", "1.2"], "val_fraction must be in"),
        (["--warmup-epochs", "9"], "warmup_epochs"),
    ],
)
def test_bad_options_get_clear_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "dense", "--out", str(tmp_path / "x"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_evaluate_rejects_a_folder_that_is_not_an_artifact(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", str(tmp_path)])
    assert "is not a model artifact" in capsys.readouterr().err


def test_early_stopping_and_plateau_schedule(small_mnist):
    from digits_ray.train import recipe
    from digits_ray.train.local import fit

    # 450 training images overfit within a few epochs: val_loss stalls (plateau halves the LR) and
    # val_accuracy stops improving (early stopping ends the run before the epoch budget).
    cfg = TrainConfig(model="dense", epochs=15, batch_size=32, learning_rate=3e-3, schedule="plateau",
                      early_stopping_patience=3, val_fraction=0.9, model_params={"dropout": 0.0})
    data = load_train_val(cfg.val_fraction, cfg.seed, small_mnist)
    fitted = fit(cfg, data, verbose=0)
    history = fitted.history
    assert len(history) < 15
    # Stopped by the rule: the best epoch is exactly `patience` epochs before the last ...
    best = recipe.best_epoch(history.to_dict("records"))
    assert best == len(history) - 1 - 3
    # ... and the model came back with that epoch's weights, not the last epoch's.
    val_accuracy = classification_metrics(predict_proba(fitted.model, data.x_val), data.y_val)["accuracy"]
    assert val_accuracy == pytest.approx(history["val_accuracy"].iloc[best], abs=1e-6)
    assert history["lr"].iloc[0] == pytest.approx(3e-3)
    assert history["lr"].min() <= 3e-3 * recipe.PLATEAU_FACTOR * 1.0001  # the plateau callback halved it


def test_a_trial_style_fit_never_opens_the_test_files(train_only_mnist, monkeypatch):
    """Fitting (what a Tune trial runs) reads the training split only; the test split is for entry points."""
    from digits_ray.data import mnist
    from digits_ray.train.local import fit

    real_locate = mnist.locate
    opened: list[str] = []

    def locate_train_only(spec, data_dir=None):  # every split, from every caller, is located here
        opened.append(spec.name)
        assert not spec.name.startswith("t10k"), f"{spec.name} was opened during a trial-style run"
        return real_locate(spec, data_dir)

    monkeypatch.setattr(mnist, "locate", locate_train_only)
    monkeypatch.setenv("DIGITS_DATA_DIR", str(train_only_mnist))  # no test files anywhere this run could look
    cfg = TrainConfig(model="dense", epochs=1, batch_size=128, augment={})
    fitted = fit(cfg, load_train_val(cfg.val_fraction, cfg.seed), verbose=0)
    assert fitted.best["val_accuracy"] > 0.7  # measured: 0.788 (seeded; the same in repeated runs)
    assert "test_accuracy" not in fitted.metadata()
    assert sorted(set(opened)) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


def test_best_epoch_and_early_stopping_rules():
    from digits_ray.train.recipe import best_epoch, should_stop

    rows = [{"val_accuracy": v} for v in (0.5, 0.7, 0.7, 0.6)]
    assert best_epoch(rows) == 1  # highest, earliest on ties
    assert not should_stop(rows[:3], 2) and should_stop(rows, 2)  # 2 epochs after the best without a gain
    assert not should_stop(rows, 0)  # patience 0: never
    with pytest.raises(ValueError, match="no epoch"):
        best_epoch([])
