"""The one predictor (evaluate, batch prediction and Serve use it) and batch prediction to a CSV."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from digits_ray.cli import main as cli
from digits_ray.data.mnist import load_split
from digits_ray.inference.images import png_bytes
from digits_ray.inference.predictor import Predictor, PredictorError
from digits_ray.models import artifact


def test_the_predictor_reads_an_artifact_and_answers_with_top3(digit_model, small_mnist):
    predictor = Predictor.from_artifact(digit_model)
    test = load_split("test", small_mnist)
    probs = predictor.probabilities(test.images)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    # Its accuracy is the artifact's recorded test accuracy: evaluate went through the same predictor.
    assert (probs.argmax(axis=1) == test.labels).mean() == pytest.approx(
        artifact.read_metadata(digit_model)["test_accuracy"], abs=1e-9)
    answer = predictor.predict(test.images[:1])[0]
    assert answer["digit"] == answer["top3"][0]["digit"] == int(probs[0].argmax())
    assert [t["probability"] for t in answer["top3"]] == sorted((t["probability"] for t in answer["top3"]),
                                                                reverse=True)
    assert len(answer["probabilities"]) == 10 and answer["confidence"] == answer["top3"][0]["probability"]
    assert predictor.info.name == "cnn_bn" and predictor.info.version == digit_model.name
    assert artifact.read_metadata(digit_model)["input"]["shape"] == [28, 28]
    with pytest.raises(PredictorError, match="uint8 images of shape"):
        predictor.probabilities(test.images[:2].astype(np.float32))


def test_saliency_marks_the_ink_of_models_and_ensembles(digit_model, small_mnist, tmp_path):
    from digits_ray.inference.explain import scaled
    from digits_ray.models.ensemble import build_ensemble

    image = load_split("test", small_mnist).images[0]
    predictor = Predictor.from_artifact(digit_model)
    saliency = predictor.saliency(image)
    assert saliency.shape == (28, 28) and saliency.max() == pytest.approx(1.0) and saliency.min() >= 0
    assert saliency[image > 0].mean() > saliency[image == 0].mean()  # the digit matters more than the margin

    first, second = artifact.load_model(digit_model), artifact.load_model(digit_model)
    logits = second.get_layer("logits")
    logits.set_weights([w * 0.4 for w in logits.get_weights()])  # a different member: softer probabilities
    metadata = {**artifact.read_metadata(digit_model), "model": "ensemble"}
    artifact.write_artifact(tmp_path / "ens", build_ensemble([first, second]), metadata,
                            pd.DataFrame({"member": [0, 1]}))
    ensemble = Predictor.from_artifact(tmp_path / "ens")
    one, two = Predictor(artifact.load_model(digit_model)), Predictor(second)
    digit = int(predictor.probabilities(image[None]).argmax())
    np.testing.assert_allclose(ensemble.probabilities(image[None]),
                               (one.probabilities(image[None]) + two.probabilities(image[None])) / 2, atol=1e-6)
    # The ensemble's logits are the mean of its members'; so is their gradient (each member through its own path).
    np.testing.assert_allclose(ensemble.outputs(image[None])[1],
                               (one.outputs(image[None])[1] + two.outputs(image[None])[1]) / 2, atol=1e-5)

    def gradient(p: Predictor) -> np.ndarray:
        return p.explainer.logit_gradient(scaled(image)[None], digit)[0]

    expected = (gradient(one) + gradient(two)) / 2
    assert not np.allclose(gradient(one), gradient(two), atol=1e-6)
    np.testing.assert_allclose(gradient(ensemble), expected, atol=1e-6)


def test_a_model_with_another_input_is_refused():
    from digits_ray.keras_api import keras

    inputs = keras.Input((784,))
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(inputs))
    with pytest.raises(PredictorError, match="digits-ray model reads"):
        Predictor(model)


def write_pngs(folder, images) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"digit_{i:03d}.png")
        paths[-1].write_bytes(png_bytes(image))
    return paths


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_files_writes_one_row_per_file_errors_included(digit_model, small_mnist, tmp_path, capsys):
    images = load_split("test", small_mnist).images[:20]
    paths = write_pngs(tmp_path / "pngs", images)
    (tmp_path / "pngs" / "notes.png").write_text("not an image")
    files = [*map(str, paths[:5]), str(tmp_path / "pngs" / "notes.png"), str(tmp_path / "missing.png")]
    assert cli(["predict", *files, "--model", str(digit_model), "--out", str(tmp_path / "p.csv")]) == 0
    rows = read_csv(tmp_path / "p.csv")
    assert [r["file"] for r in rows] == files  # the order given, nothing dropped
    expected = Predictor.from_artifact(digit_model).probabilities(images[:5]).argmax(axis=1)
    assert [int(r["digit"]) for r in rows[:5]] == expected.tolist()
    assert all(r["error"] == "" and len(r["top3"].split()) == 3 for r in rows[:5])
    # The model has an abstain rule: its answers are columns too (an artifact without one: tests/test_abstain.py).
    answers = Predictor.from_artifact(digit_model).predict(images[:5])
    assert [r["abstain"] for r in rows[:5]] == [str(a["abstain"]) for a in answers]
    assert [float(r["abstain_score"]) for r in rows[:5]] == pytest.approx([a["abstain_score"] for a in answers],
                                                                          abs=1e-4)
    assert rows[5]["abstain"] == rows[5]["abstain_score"] == ""
    assert "not an image" in rows[5]["error"] and rows[5]["digit"] == ""
    assert "No such file" in rows[6]["error"]
    assert "7 predictions" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "message"), [
    ([], "give image files or --dir"),
    (["--dir", "{tmp}/empty"], "holds no image files"),
    (["--dir", "{tmp}/empty", "--max-actors", "0"], "--max-actors must be >= 1"),
    (["some.png", "--out", "{tmp}"], "is a folder"),
    (["--dir", "{tmp}/missing"], "is not a folder"),
])
def test_predict_refuses_bad_options_in_one_line(digit_model, tmp_path, capsys, extra, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(SystemExit) as stop:
        cli(["predict", "--model", str(digit_model), *[a.format(tmp=tmp_path) for a in extra]])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_serve_app_refuses_zero_replicas(capsys):
    with pytest.raises(SystemExit) as stop:
        cli(["serve", "--replicas", "0", "--model", "/nonexistent"])
    assert stop.value.code == 2 and "replicas must be a positive integer" in capsys.readouterr().err


def test_the_model_to_serve_is_the_flag_then_the_environment_then_the_registry(tmp_path, monkeypatch, digit_model):
    from digits_ray.models.registry import RegistryError, model_to_serve

    monkeypatch.setenv("DIGITS_REGISTRY", str(tmp_path / "empty"))
    monkeypatch.delenv("DIGITS_MODEL", raising=False)
    with pytest.raises(RegistryError, match="no published model yet"):
        model_to_serve()
    (tmp_path / "reg").mkdir()
    (tmp_path / "reg" / "index.json").write_text(json.dumps({"best": "entry-1", "entries": {}}))
    monkeypatch.setenv("DIGITS_REGISTRY", str(tmp_path / "reg"))
    assert model_to_serve() == (tmp_path / "reg" / "entry-1").resolve()
    shutil.copytree(digit_model, tmp_path / "m")
    monkeypatch.setenv("DIGITS_MODEL", str(tmp_path / "m"))
    assert model_to_serve() == (tmp_path / "m").resolve()
    assert model_to_serve(digit_model) == digit_model.resolve()
    with pytest.raises(RegistryError, match="neither a model folder"):
        model_to_serve(tmp_path / "no-such-model")


@pytest.mark.slow
def test_a_folder_goes_through_ray_data_with_the_same_answers(ray_local, digit_model, small_mnist, tmp_path):
    images = load_split("test", small_mnist).images[:300]
    write_pngs(tmp_path / "pngs" / "a", images[:150])
    write_pngs(tmp_path / "pngs" / "b", images[150:])
    (tmp_path / "pngs" / "b" / "broken.png").write_bytes(png_bytes(images[0])[:50])
    (tmp_path / "pngs" / "README.txt").write_text("not an image extension: not read")
    out = tmp_path / "folder.csv"
    assert cli(["predict", "--dir", str(tmp_path / "pngs"), "--model", str(digit_model), "--out", str(out),
                "--max-actors", "2"]) == 0
    rows = read_csv(out)
    assert len(rows) == 301
    assert [r["file"] for r in rows] == sorted(r["file"] for r in rows)  # path order
    broken = [r for r in rows if r["file"].endswith("broken.png")]
    assert len(broken) == 1 and "could not be decoded" in broken[0]["error"]
    good = [r for r in rows if not r["error"]]
    expected = Predictor.from_artifact(digit_model).probabilities(images).argmax(axis=1)
    by_file = {r["file"]: int(r["digit"]) for r in good}
    for part, offset in (("a", 0), ("b", 150)):
        for i in range(150):
            assert by_file[str(tmp_path / "pngs" / part / f"digit_{i:03d}.png")] == expected[offset + i]
