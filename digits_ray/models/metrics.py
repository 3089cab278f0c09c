"""How well class probabilities match labels: accuracy, loss, per-class figures, the confusion matrix.

Pure numpy on (probabilities, labels), so that export (TFLite files), evaluation and the Tune publish
step measure a model the same way without importing one another.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from digits_ray.schema import NUM_CLASSES


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(matrix, (labels.astype(np.int64), predicted.astype(np.int64)), 1)
    return matrix


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    predicted = probs.argmax(axis=1)
    matrix = confusion_matrix(labels, predicted)
    true_pos = np.diag(matrix).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(matrix.sum(axis=0) > 0, true_pos / matrix.sum(axis=0), 0.0)
        recall = np.where(matrix.sum(axis=1) > 0, true_pos / matrix.sum(axis=1), 0.0)
    picked = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    return {
        "accuracy": float((predicted == labels).mean()),
        "loss": float(-np.log(picked).mean()),
        "count": int(len(labels)),
        "per_class": {
            str(c): {"precision": float(precision[c]), "recall": float(recall[c]), "support": int(matrix[c].sum())}
            for c in range(NUM_CLASSES)
        },
        "confusion_matrix": matrix.tolist(),
    }
