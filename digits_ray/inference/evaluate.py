"""Final evaluation on MNIST's test set: metrics, per-class figures and the report plots.

The test set is read here and nowhere else, by the entry points that keep a model: once for that
model, never while fitting or selecting one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from digits_ray import plots
from digits_ray.data.mnist import MnistSplit, load_split
from digits_ray.inference.predictor import Predictor
from digits_ray.models import artifact
from digits_ray.models.metrics import classification_metrics


def predict_proba(model, images: np.ndarray) -> np.ndarray:
    """The ten probabilities per image, through the predictor that batch prediction and Serve use."""
    return Predictor(model).probabilities(images)


def test_metrics(model, test: MnistSplit) -> dict[str, Any]:
    return classification_metrics(predict_proba(model, test.images), test.labels)


def test_figures(model, test: MnistSplit) -> tuple[dict[str, Any], np.ndarray]:
    """The figures an artifact records from its one test evaluation, and the probabilities behind them."""
    probs = predict_proba(model, test.images)
    metrics = classification_metrics(probs, test.labels)
    return {"test_accuracy": metrics["accuracy"], "test_loss": metrics["loss"], "test_count": metrics["count"],
            "data_md5": test.md5}, probs


def test_evaluation(model, data_dir: Path | str | None = None) -> dict[str, Any]:
    """The one test evaluation of a model that is kept: the figures its artifact records."""
    return test_figures(model, load_split("test", data_dir))[0]


def abstain_rule(model, validation: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """The abstain rule of a kept model, fitted on the validation split (images, labels), as the artifact
    stores it."""
    return Predictor(model).fit_abstain(*validation).to_dict()


def keep(fitted, out_dir: Path | str, data_dir: Path | str | None = None) -> dict[str, Any]:
    """What an entry point does with the model it keeps: its one test evaluation and its abstain rule, then
    its artifact.

    ``fitted``: a ``train.result.FitResult``. Returns the artifact's metadata.
    """
    return fitted.write_artifact(out_dir, test=test_evaluation(fitted.model, data_dir),
                                 abstain=abstain_rule(fitted.model, fitted.validation))


def evaluate_artifact(
    folder: Path | str, data_dir: Path | str | None = None, report_dir: Path | str | None = None
) -> dict[str, Any]:
    """Evaluate an artifact on the test set, write the report and record the figures in its metadata."""
    folder = Path(folder)
    predictor = Predictor.from_artifact(folder)  # a folder that is not an artifact fails before any data loads
    test = load_split("test", data_dir)
    probs = predictor.probabilities(test.images)
    metrics = classification_metrics(probs, test.labels)
    out = Path(report_dir) if report_dir else folder / artifact.REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    predicted = probs.argmax(axis=1)
    plots.history(artifact.read_history(folder), out / "history.png")
    plots.confusion(np.asarray(metrics["confusion_matrix"]), out / "confusion_matrix.png")
    plots.digit_grid(test.images, test.labels, probs, np.arange(min(25, len(test))), out / "samples.png",
                     "Sample test predictions")
    wrong = np.flatnonzero(predicted != test.labels)
    plots.digit_grid(test.images, test.labels, probs, wrong[:25], out / "misclassified.png",
                     f"Misclassified: {len(wrong)} of {len(test)} test digits")
    report = {"test": metrics, "data_md5": test.md5, "plots": sorted(p.name for p in out.glob("*.png"))}
    artifact.write_json_atomic(out / "report.json", report)
    artifact.update_metadata(folder, {"test_accuracy": metrics["accuracy"], "test_loss": metrics["loss"]})
    return report
