"""The parts of the Tune job that need no Ray: search space, registry, ensemble, TFLite export, options."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from digits_ray.config import TrainConfig
from digits_ray.models import artifact
from digits_ray.models.zoo import build_model
from digits_ray.tune import space
from tests.conftest import run_without_ray


def test_the_space_samples_valid_configs_with_conditional_hyperparameters():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen_models, batches = set(), set()
    for _ in range(80):
        trial = study.ask()
        space.define_space(trial, space.SpaceConfig())
        params = trial.params
        cfg = space.train_config(params, TrainConfig(epochs=3))
        seen_models.add(cfg.model)
        batches.add(cfg.batch_size)
        assert cfg.epochs == 3 and 1e-4 <= cfg.learning_rate <= 3e-2
        assert ("p_bn_momentum" in params) == (cfg.model in ("cnn_bn", "cnn_deep"))
        assert ("p_base_filters" in params) == (cfg.model in space.CNN_MODELS)
        assert ("p_l2" in params) == (cfg.model == "cnn_deep")
        assert (cfg.augment is None) == (params["augment"] == "off")
        assert ("warmup_epochs" in params) == (params["schedule"] == "cosine")
        if cfg.model == "cnn_deep":
            base = params["p_base_width"]
            assert cfg.model_params["widths"] == (base, 2 * base, 4 * base)
        study.tell(trial, 0.5)
    assert seen_models == {"dense", "cnn_basic", "cnn_nobn", "cnn_bn", "cnn_deep"}
    assert batches <= {32, 64, 128, 256, 512, 1024, 2048} and {32, 2048} <= batches


@pytest.mark.parametrize("kwargs, message", [
    ({"models": ("resnet",)}, "unknown model(s) ['resnet']"),
    ({"min_batch": 48}, "powers of two"),
    ({"min_lr": 0.1, "max_lr": 0.01}, "LR range"),
])
def test_bad_space_options(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        space.SpaceConfig(**kwargs)


# --- Registry ---------------------------------------------------------------------------------


# --- Ensemble and TFLite ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_models(digit_model, cli_model, small_mnist):
    """Two different trained models (the session's cnn_bn and the CLI's cnn_basic) and the test split."""
    from digits_ray.data.mnist import load_split

    return [artifact.load_model(digit_model), artifact.load_model(cli_model)], load_split("test", small_mnist)


def test_an_ensemble_saves_and_loads_like_any_model(two_models, tmp_path):
    from digits_ray.models.ensemble import build_ensemble

    members, test = two_models
    expected = np.mean([m.predict(test.images[:64], verbose=0) for m in members], axis=0)
    ensemble = build_ensemble(members)
    metadata = {"model": "ensemble", "model_params": {}, "train_config": {}, "data_md5": {}, "versions": {},
                "training_seconds": 0.0, "validation": {"best_epoch": None, "val_accuracy": 0.9, "val_loss": 0.1}}
    artifact.write_artifact(tmp_path / "ens", ensemble, metadata, pd.DataFrame({"member": [0, 1]}))
    loaded = artifact.load_model(tmp_path / "ens")  # safe mode
    np.testing.assert_allclose(loaded.predict(test.images[:64], verbose=0), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 members"):
        build_ensemble(members[:1])


def test_the_ensemble_size_is_the_best_on_validation():
    """Of the top trials (in their order), the first 2 .. k are averaged, as many as score best on the
    validation split: a confidently wrong third member is left out, one that fixes the others' mistakes
    is taken."""
    from digits_ray.tune.publish import ensemble_size

    labels = np.random.default_rng(0).integers(0, 10, 1000)

    def member(confidence: float, wrong_rows: slice, shift: int = 1) -> np.ndarray:
        """Probabilities with ``confidence`` on the label, or on label + ``shift`` in ``wrong_rows``."""
        predicted = labels.copy()
        predicted[wrong_rows] = (labels[wrong_rows] + shift) % 10
        probs = np.full((len(labels), 10), (1 - confidence) / 9)
        probs[np.arange(len(labels)), predicted] = confidence
        return probs

    first, second = member(0.9, slice(0, 100)), member(0.8, slice(100, 200))  # averaged: 90% right
    wrong_everywhere = member(0.99, slice(None), shift=5)  # with the first two: 80% right
    fixes_the_first = member(0.9, slice(900, 1000))  # with the first two: every digit right
    assert ensemble_size([first, second, wrong_everywhere], labels) == 2
    assert ensemble_size([first, second, fixes_the_first], labels) == 3
    assert ensemble_size([first, second, fixes_the_first, wrong_everywhere], labels) == 3
    with pytest.raises(ValueError, match="at least 2"):
        ensemble_size([first], labels)


def test_int8_tflite_of_a_batch_norm_model_keeps_its_accuracy(digit_model, small_mnist, tmp_path):
    """The int8 export of a cnn_bn model as Tune publishes one (BN layers, loaded back from its file),
    measured through the TFLite interpreter on the test split."""
    from digits_ray.data.mnist import load_split
    from digits_ray.inference.evaluate import predict_proba
    from digits_ray.models.export import export_tflite
    from digits_ray.models.metrics import classification_metrics

    model = artifact.load_model(digit_model)
    assert any(type(layer).__name__ == "BatchNormalization" for layer in model.layers)
    train, test = load_split("train", small_mnist), load_split("test", small_mnist)
    keras_accuracy = classification_metrics(predict_proba(model, test.images), test.labels)["accuracy"]
    report = export_tflite(model, tmp_path, train.images, test.images, test.labels, keras_accuracy)
    assert report["float32"]["test_accuracy"] == pytest.approx(keras_accuracy, abs=0.002)
    assert abs(report["int8"]["drop_vs_keras_points"]) <= INT8_DROP_POINTS  # calibrated on 500 images
    assert report["int8_size_ratio"] >= 3.0
    assert (tmp_path / "model_int8.tflite").stat().st_size == report["int8"]["bytes"]


# Measured on the session's cnn_bn (95.6% test): int8 0.0 points from Keras, 3.8x smaller.
INT8_DROP_POINTS = 0.5


# --- digits-ray tune (jobs/tune.py) refuses bad input before Ray starts -------------------------------------------


def run_job(argv):
    return run_without_ray(["tune", *argv])


def test_tune_job_rejects_bad_options_and_unresumable_folders(tmp_path, capsys):
    storage = ["--storage-path", str(tmp_path)]
    assert run_job(["--min-batch", "48", *storage]) == 2
    assert "powers of two" in capsys.readouterr().err
    assert run_job(["--final-workers", "0", *storage]) == 2
    assert "--final-workers" in capsys.readouterr().err
    assert run_job(["--num-samples", "0", *storage]) == 2  # refused, not replaced by the default
    assert "num_samples and max_epochs must be >= 1" in capsys.readouterr().err
    assert run_job(["--smoke", "--max-epochs", "0", *storage]) == 2
    assert "num_samples and max_epochs must be >= 1" in capsys.readouterr().err
    assert run_job(["--top-k", "0", *storage]) == 2
    assert "--top-k must be >= 1" in capsys.readouterr().err
    assert run_job(["--resume", "--name", "missing", *storage]) == 2
    assert "no search to resume" in capsys.readouterr().err
    # A driver killed before Tune's first snapshot leaves a tuner file and nothing to restore.
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "tuner.pkl").write_bytes(b"")
    assert run_job(["--resume", "--name", "early", *storage]) == 2
    assert "stopped before Tune saved its first snapshot" in capsys.readouterr().err
    assert run_job(["--name", "early", *storage]) == 2
    assert "already holds a search" in capsys.readouterr().err


def test_durations():
    from digits_ray.cli.tune import parse_duration

    assert [parse_duration(t) for t in ("90s", "60m", "1.5h", "120")] == [90, 3600, 5400, 120]
    with pytest.raises(Exception, match="duration"):
        parse_duration("an hour")


def test_each_epoch_is_published_with_a_checkpoint_and_the_best_so_far():
    """What Optuna learns from (``best_val_accuracy``); the history itself stays per epoch."""
    from digits_ray.train import checkpoint as ckpt
    from digits_ray.train.reporting import ReportEachEpoch

    published = []
    callback = ReportEachEpoch(ckpt.RunState(), lambda metrics, folder: published.append(
        (metrics, ckpt.is_checkpoint(folder))))
    callback.set_model(build_model("dense", {"hidden": 4}))
    for epoch, val in enumerate([0.5, 0.7, 0.6]):
        callback.on_epoch_end(epoch, {"val_accuracy": val, "loss": 1.0})
    assert [(m["epoch"], m["best_val_accuracy"], saved) for m, saved in published] == [
        (1, 0.5, True), (2, 0.7, True), (3, 0.7, True)]
    assert [row["val_accuracy"] for row in callback.state.history] == [0.5, 0.7, 0.6]
    assert "best_val_accuracy" not in callback.state.history[-1]
