""""Not a digit": the rule is fitted on the validation split, stored in the artifact, and answered with every
prediction; a blank image and a drawn letter abstain, a clear digit does not; old artifacts still predict."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from digits_ray.cli import main as cli
from digits_ray.data.mnist import load_split
from digits_ray.data.split import load_train_val
from digits_ray.inference.images import image_to_mnist, pixels_to_mnist, png_bytes
from digits_ray.inference.predictor import Predictor
from digits_ray.models import abstain, artifact
from digits_ray.models.abstain import AbstainError, AbstainRule

CANVAS, BRUSH = 280, 20  # the drawing page's canvas and pen


def drawn(*strokes: list[tuple[int, int]]) -> np.ndarray:
    """Pen strokes on the page's canvas (black on white, round caps), through the upload path."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (CANVAS, CANVAS), 255)
    draw = ImageDraw.Draw(canvas)
    for points in strokes:
        draw.line(points, fill=0, width=BRUSH, joint="curve")
        for x, y in (points[0], points[-1]):
            draw.ellipse((x - BRUSH / 2, y - BRUSH / 2, x + BRUSH / 2, y + BRUSH / 2), fill=0)
    return image_to_mnist(png_bytes(np.asarray(canvas)))


def test_the_rule_is_fitted_on_validation_and_round_trips_through_the_artifact(digit_model, small_mnist):
    metadata = artifact.read_metadata(digit_model)
    stored = abstain.rule_in(metadata)
    assert stored is not None and stored.score == abstain.DEFAULT_SCORE
    assert stored.validation_kept >= abstain.KEEP_RATE and stored.validation_count == 500
    assert AbstainRule.from_dict(json.loads(json.dumps(stored.to_dict()))).to_dict() == stored.to_dict()
    predictor = Predictor.from_artifact(digit_model)
    assert predictor.abstain_rule.to_dict() == stored.to_dict()
    # The stored rule is the one the validation split gives (the split the model was trained with).
    cfg = metadata["train_config"]
    data = load_train_val(cfg["val_fraction"], cfg["seed"], small_mnist)
    refit = predictor.fit_abstain(data.x_val, data.y_val)
    assert refit.threshold == pytest.approx(stored.threshold, rel=1e-5)
    assert refit.min_ink == pytest.approx(stored.min_ink)
    flags = [a["abstain"] for a in predictor.predict(data.x_val)]
    assert 1 - np.mean(flags) == pytest.approx(stored.validation_kept, abs=1e-9)


# Measured with the digit_model fixture (threshold 5.50 on logit_distance, ink floor 16.2): the drawn X
# scores 6.90 (with the fixture's recipe and seeds 1 and 2: 8.68 and 7.21, thresholds 5.75 and 6.17), the
# MNIST 7 3.27 and the drawn 1 1.18 (2.95 and 1.63); blank images have no ink.
def test_a_blank_image_and_a_drawn_letter_abstain_a_clear_digit_does_not(digit_model, small_mnist):
    predictor = Predictor.from_artifact(digit_model)
    test = load_split("test", small_mnist)
    images = {
        "blank": np.zeros((28, 28), np.uint8),
        "gray canvas": pixels_to_mnist(np.full((28, 28), 200)),
        "drawn X": drawn([(60, 50), (220, 240)], [(220, 50), (60, 240)]),
        "MNIST 7": test.images[0],
        "drawn 1": drawn([(140, 30), (140, 250)]),
    }
    assert test.labels[0] == 7
    answers = dict(zip(images, predictor.predict(np.stack(list(images.values())))))
    assert {name: a["abstain"] for name, a in answers.items()} == {
        "blank": True, "gray canvas": True, "drawn X": True, "MNIST 7": False, "drawn 1": False}
    assert answers["MNIST 7"]["digit"] == 7 and answers["drawn 1"]["digit"] == 1
    rule = predictor.abstain_rule
    assert answers["drawn X"]["abstain_score"] > rule.threshold > answers["MNIST 7"]["abstain_score"]
    assert all(isinstance(a["abstain_score"], float) for a in answers.values())


def test_an_artifact_without_the_rule_still_predicts_without_abstain_fields(digit_model, small_mnist, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(digit_model, old)
    metadata = json.loads((old / artifact.METADATA_FILE).read_text())
    del metadata[artifact.ABSTAIN_FIELD]
    artifact.write_json_atomic(old / artifact.METADATA_FILE, metadata)

    predictor = Predictor.from_artifact(old)
    assert predictor.abstain_rule is None
    images = load_split("test", small_mnist).images[:3]
    answers = predictor.predict(images)
    assert all("abstain" not in a and "abstain_score" not in a for a in answers)
    assert [a["digit"] for a in answers] == [a["digit"] for a in Predictor.from_artifact(digit_model).predict(images)]
    (tmp_path / "a.png").write_bytes(png_bytes(images[0]))
    assert cli(["predict", str(tmp_path / "a.png"), "--model", str(old), "--out", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv", newline="") as f:
        assert csv.DictReader(f).fieldnames == ["file", "digit", "confidence", "top3", "error"]


def test_fitting_keeps_the_share_asked_for_and_a_malformed_rule_is_refused():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 100)
    logits = rng.normal(0, 1, (1000, 10)) + 6 * np.eye(10)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    images = (rng.random((1000, 28, 28)) < rng.uniform(0.1, 0.2, (1000, 1, 1))).astype(np.uint8) * 255
    for score in abstain.SCORES:
        rule = abstain.fit(images, labels, probs, logits, score)
        flags, scores = rule.decide(images, probs, logits)
        assert 0.99 <= 1 - flags.mean() <= 0.995 and rule.validation_kept == 1 - flags.mean()
        assert rule.min_ink == pytest.approx(abstain.MIN_INK_FRACTION * abstain.ink(images).min())
        assert rule.decide(np.zeros((1, 28, 28), np.uint8), probs[:1], logits[:1])[0][0]  # no ink
        if score == "logit_distance":  # logits far from every class mean, however sure the softmax is
            assert rule.decide(images[:1], probs[:1], logits[:1] + 40)[0][0]
    gaussians = abstain.LogitGaussians.fit(logits, labels)
    assert gaussians.distance(gaussians.means).max() == pytest.approx(0, abs=1e-6)
    good = abstain.fit(images, labels, probs, logits).to_dict()
    for broken in ({**good, "threshold": "high"}, {k: v for k, v in good.items() if k != "min_ink"},
                   {**good, "score": "vibes"}, {**good, "precision": [[1.0]]}):
        with pytest.raises(AbstainError, match="malformed abstain rule"):
            AbstainRule.from_dict(broken)
