""""Not a digit": a rule, fitted on the validation split, that says when a model should abstain.

A classifier trained on digits answers a digit for anything: a letter, a scribble, a blank canvas (a
trained ``cnn_bn`` calls a blank image "1" at over 99%). The rule abstains on an image when either

- its not-a-digit ``score`` is above ``threshold``, or
- it holds less ink than ``min_ink`` (``ink``: a blank, uniform or near-blank image carries no digit, and
  no score computed from the model's answer catches it: the model is sure of its "1").

Both limits come from the validation digits: the ink floor is ``MIN_INK_FRACTION`` of the faintest one's
ink (MNIST's thin 1s are faint; a floor that refused some of them would refuse a user's 1 too), and the
threshold keeps ``keep_rate`` of them. Scores:

- ``logit_distance``: the Mahalanobis distance of the logits to the nearest class mean, with one shared
  covariance (Lee et al., 2018, on the logits): a letter the model calls "8" has logits unlike a real 8's
  even when the softmax is sure. Its means and precision matrix (10x10 each) are part of the rule.
- ``energy``: -logsumexp(logits) (Liu et al., 2020).
- ``max_probability``: 1 - the top probability (Hendrycks & Gimpel, 2017).

An ensemble's logits are the mean of its members'. ``bench/abstain.py`` compares the scores on MNIST's
test digits, non-digits and other handwriting; the best is ``DEFAULT_SCORE``. The rule is stored in the
artifact's metadata (``artifact.ABSTAIN_FIELD``) and nowhere else: an artifact written before rules
existed gives answers without abstain fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from digits_ray.errors import DigitsError
from digits_ray.models.artifact import ABSTAIN_FIELD
from digits_ray.schema import NUM_CLASSES

SCORES = ("logit_distance", "energy", "max_probability")
DEFAULT_SCORE = "logit_distance"
KEEP_RATE = 0.99  # the share of validation digits the fitted rule lets through
MIN_INK_FRACTION = 0.5  # the ink floor: this fraction of the faintest validation digit's ink


class AbstainError(DigitsError):
    """A rule that cannot be used: a malformed one in an artifact, or one that needs logits a model lacks."""


def ink(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N,) the brightness above each image's darkest pixel, summed, / 255: about the
    number of inked pixels (0 for a uniform image, whatever its gray)."""
    images = np.asarray(images, dtype=np.float64)
    return (images - images.min(axis=(1, 2), keepdims=True)).sum(axis=(1, 2)) / 255.0


def _need(logits: np.ndarray | None, score: str) -> np.ndarray:
    if logits is None:
        raise AbstainError(f"the {score} score needs the model's logits; this model exposes none")
    return logits


def energy(logits: np.ndarray) -> np.ndarray:
    """-logsumexp over the classes, computed stably."""
    peak = logits.max(axis=-1)
    return -(peak + np.log(np.exp(logits - peak[:, None]).sum(axis=-1)))


@dataclass(frozen=True)
class LogitGaussians:
    """Class means of the validation logits and the precision matrix of their shared covariance."""

    means: np.ndarray  # (10, 10): one row per class
    precision: np.ndarray  # (10, 10)

    @classmethod
    def fit(cls, logits: np.ndarray, labels: np.ndarray) -> LogitGaussians:
        missing = sorted(set(range(NUM_CLASSES)) - set(np.unique(labels).tolist()))
        if missing:
            raise ValueError(f"the validation split has no image of class(es) {missing}")
        means = np.stack([logits[labels == c].mean(axis=0) for c in range(NUM_CLASSES)])
        centred = logits - means[labels]
        covariance = centred.T @ centred / len(logits)
        ridge = 1e-6 * np.trace(covariance) / len(covariance)  # a degenerate direction must not blow up
        return cls(means, np.linalg.inv(covariance + ridge * np.eye(len(covariance))))

    def distance(self, logits: np.ndarray) -> np.ndarray:
        """(N, 10) -> (N,) the Mahalanobis distance to the nearest class mean."""
        diff = logits[:, None, :] - self.means[None]
        squared = np.einsum("ncd,de,nce->nc", diff, self.precision, diff)
        return np.sqrt(np.maximum(squared.min(axis=1), 0))


def not_digit_scores(score: str, probabilities: np.ndarray, logits: np.ndarray | None,
                     gaussians: LogitGaussians | None = None) -> np.ndarray:
    """(N,) scores, higher: less like a digit. ``probabilities`` and ``logits``: (N, 10)."""
    if score == "max_probability":
        return 1.0 - probabilities.max(axis=1)
    if score == "energy":
        return energy(_need(logits, score))
    if score == "logit_distance":
        if gaussians is None:
            raise ValueError("the logit_distance score needs the rule's class means and precision")
        return gaussians.distance(_need(logits, score))
    raise AbstainError(f"unknown abstain score {score!r}; known: {', '.join(SCORES)}")


@dataclass(frozen=True)
class AbstainRule:
    """Abstain when an image's ``score`` is above ``threshold`` or its ink is below ``min_ink``."""

    score: str
    threshold: float
    min_ink: float
    keep_rate: float  # the share of validation digits it was fitted to keep
    validation_kept: float  # the share it keeps (ties can make it more)
    validation_count: int
    gaussians: LogitGaussians | None = None  # logit_distance only

    def scores(self, probabilities: np.ndarray, logits: np.ndarray | None) -> np.ndarray:
        return not_digit_scores(self.score, probabilities, logits, self.gaussians)

    def decide(self, images: np.ndarray, probabilities: np.ndarray, logits: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(abstain (N,) bool, score (N,)) for uint8 ``images`` (N, 28, 28) and the model's outputs on them."""
        scores = self.scores(probabilities, logits)
        return (scores > self.threshold) | (ink(images) < self.min_ink), scores

    def to_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {"score": self.score, "threshold": self.threshold, "min_ink": self.min_ink,
                                  "keep_rate": self.keep_rate, "validation_kept": self.validation_kept,
                                  "validation_count": self.validation_count}
        if self.gaussians is not None:
            values["class_means"] = self.gaussians.means.tolist()
            values["precision"] = self.gaussians.precision.tolist()
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AbstainRule:
        try:
            gaussians = None
            if values["score"] == "logit_distance":
                gaussians = LogitGaussians(np.asarray(values["class_means"], dtype=np.float64),
                                           np.asarray(values["precision"], dtype=np.float64))
            rule = cls(score=str(values["score"]), threshold=float(values["threshold"]),
                       min_ink=float(values["min_ink"]), keep_rate=float(values["keep_rate"]),
                       validation_kept=float(values["validation_kept"]),
                       validation_count=int(values["validation_count"]), gaussians=gaussians)
        except (KeyError, TypeError, ValueError) as err:
            raise AbstainError(f"malformed abstain rule ({type(err).__name__}: {err}); expected score, threshold, "
                               f"min_ink, keep_rate, validation_kept, validation_count (and class_means, "
                               f"precision for logit_distance)") from None
        shapes_ok = gaussians is None or gaussians.means.shape == gaussians.precision.shape == (NUM_CLASSES,) * 2
        if rule.score not in SCORES or not math.isfinite(rule.threshold) or not shapes_ok:
            raise AbstainError(f"malformed abstain rule: score must be one of {', '.join(SCORES)}, the threshold "
                               f"finite, class_means and precision {NUM_CLASSES}x{NUM_CLASSES}")
        return rule


def rule_in(metadata: dict[str, Any]) -> AbstainRule | None:
    """The artifact's rule, or None for an artifact written before rules existed."""
    values = metadata.get(ABSTAIN_FIELD)
    return None if values is None else AbstainRule.from_dict(values)


def fit(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, logits: np.ndarray | None,
        score: str = DEFAULT_SCORE, keep_rate: float = KEEP_RATE) -> AbstainRule:
    """The rule that keeps ``keep_rate`` of the validation digits ``images`` (with their ``labels`` and the
    model's outputs on them)."""
    if not len(images) or not 0 < keep_rate <= 1:
        raise ValueError(f"need validation images and 0 < keep_rate <= 1; got {len(images)}, {keep_rate}")
    gaussians = LogitGaussians.fit(_need(logits, score), labels) if score == "logit_distance" else None
    scores = not_digit_scores(score, probabilities, logits, gaussians)
    min_ink = MIN_INK_FRACTION * float(ink(images).min())
    threshold = float(np.quantile(scores, keep_rate, method="higher"))
    kept = float(((scores <= threshold) & (ink(images) >= min_ink)).mean())
    return AbstainRule(score, threshold, min_ink, keep_rate, kept, len(images), gaussians)
