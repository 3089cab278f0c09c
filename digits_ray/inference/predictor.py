"""One predictor for evaluation, batch prediction and Serve: a model, its input contract and its answers.

``Predictor.from_artifact`` loads a model folder (Keras safe mode: nothing in the file runs as code) and
checks that the model reads what every digits-ray model reads, uint8 (28, 28) white-on-black in MNIST's
frame (``images.py`` turns real images into that). Inference runs through one traced ``tf.function``
with a variable batch dimension, which costs about a millisecond for one image where ``Model.predict``
costs tens; it gives the logits too (for an ensemble, the mean of its members'), for the abstain score.

Answers carry ``abstain`` and ``abstain_score`` when the artifact has an abstain rule (``models/abstain.py``);
``explain`` says which pixels made the answer (``explain.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from digits_ray.errors import DigitsError
from digits_ray.inference.explain import DEFAULT_EXPLAIN_METHOD, Explainer, Explanation, check_method
from digits_ray.models import abstain, artifact, parts
from digits_ray.models.abstain import AbstainRule
from digits_ray.schema import IMAGE_SIZE, INPUT_CONTRACT, NUM_CLASSES

CHUNK = 1024  # images per call into the model: bounds memory for large batches
TOP_K = 3


class PredictorError(DigitsError):
    pass


@dataclass(frozen=True)
class ModelInfo:
    """What a prediction names as its source."""

    name: str
    version: str
    created: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "created": self.created}


def describe(probs: np.ndarray, abstains: bool | None = None, abstain_score: float | None = None
             ) -> dict[str, Any]:
    """One image's ten probabilities -> digit, confidence, top 3 and all ten (JSON-ready); from a model with an
    abstain rule, also whether it abstains ("not a digit") and the image's not-a-digit score."""
    order = np.argsort(-probs, kind="stable")[:TOP_K]
    answer = {
        "digit": int(order[0]),
        "confidence": float(probs[order[0]]),
        "top3": [{"digit": int(d), "probability": float(probs[d])} for d in order],
        "probabilities": [float(p) for p in probs],
    }
    if abstains is not None:
        answer["abstain"] = bool(abstains)
        answer["abstain_score"] = float(abstain_score)
    return answer


class Predictor:
    """A loaded model: ``predict(images)`` and ``probabilities(images)`` for a batch, ``explain(image, ...)``
    for one. Thread-safe: Serve calls it from several threads at once."""

    def __init__(self, model: Any, info: ModelInfo | None = None, metadata: dict[str, Any] | None = None) -> None:
        from digits_ray.keras_api import tf

        info = info or ModelInfo(model.name, "in memory")

        shape, dtype = tuple(model.input_shape[1:]), model.inputs[0].dtype
        if shape != (IMAGE_SIZE, IMAGE_SIZE) or dtype != tf.uint8 or model.output_shape[1:] != (NUM_CLASSES,):
            raise PredictorError(f"model {info.name!r} reads {shape} {dtype.name} and gives {model.output_shape[1:]}; "
                                 f"a digits-ray model reads {INPUT_CONTRACT} and gives {NUM_CLASSES} probabilities")
        self.model = model
        self.info = info
        self.metadata = metadata or {}
        self.abstain_rule: AbstainRule | None = abstain.rule_in(self.metadata)  # None: no abstain fields
        self.explainer = Explainer(model, info.name)
        self._forward, self.has_logits = _forward_function(model)
        if self.abstain_rule is not None and self.abstain_rule.score != "max_probability" and not self.has_logits:
            raise abstain.AbstainError(f"model {info.name!r}: its abstain rule's {self.abstain_rule.score} score "
                                       f"needs logits; it has no {parts.LOGITS_LAYER!r} layer")

    @classmethod
    def from_artifact(cls, folder: Path | str) -> Predictor:
        folder = Path(folder).resolve()
        metadata = artifact.read_metadata(folder)
        contract = metadata.get("input", INPUT_CONTRACT)  # artifacts from before the field: the zoo's contract
        if contract != INPUT_CONTRACT:
            raise PredictorError(f"{folder} declares input {contract}; this predictor reads {INPUT_CONTRACT}")
        info = ModelInfo(metadata["model"], folder.name, metadata.get("created"))
        return cls(artifact.load_model(folder), info, metadata)

    def outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 (N, 28, 28) -> probabilities and logits, float64 (N, 10) each; an ensemble's logits are the
        mean of its members'; None for a model that is neither a zoo model nor an ensemble of them."""
        images = _checked(images)
        if len(images) == 0:
            return np.zeros((0, NUM_CLASSES)), np.zeros((0, NUM_CLASSES)) if self.has_logits else None
        chunks = [self._forward(images[i: i + CHUNK]) for i in range(0, len(images), CHUNK)]
        probs = np.concatenate([c[0].numpy() for c in chunks]).astype(np.float64)
        logits = np.concatenate([c[1].numpy() for c in chunks]).astype(np.float64) if self.has_logits else None
        return probs, logits

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, 28, 28) -> float64 (N, 10)."""
        return self.outputs(images)[0]

    def predict(self, images: np.ndarray) -> list[dict[str, Any]]:
        """One answer per image (``describe``), with ``abstain`` and ``abstain_score`` where the model has a rule."""
        images = _checked(images)
        probs, logits = self.outputs(images)
        if self.abstain_rule is None:
            return [describe(p) for p in probs]
        flags, scores = self.abstain_rule.decide(images, probs, logits)
        return [describe(p, bool(f), float(s)) for p, f, s in zip(probs, flags, scores)]

    def fit_abstain(self, images: np.ndarray, labels: np.ndarray, score: str = abstain.DEFAULT_SCORE) -> AbstainRule:
        """An abstain rule for this model, fitted on the validation split's images and labels."""
        return abstain.fit(images, labels, *self.outputs(images), score=score)

    def explain(self, image: np.ndarray, digit: int | None = None,
                method: str = DEFAULT_EXPLAIN_METHOD) -> Explanation:
        """Which pixels of ``image`` (uint8 (28, 28)) made the answer ``digit`` (None: the predicted digit),
        by ``method`` (``explain.EXPLAIN_METHODS``); Grad-CAM falls back to saliency, with a note, on a
        model without a convolution."""
        check_method(method)
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.shape != (IMAGE_SIZE, IMAGE_SIZE):
            raise PredictorError(f"expected one uint8 image of shape ({IMAGE_SIZE}, {IMAGE_SIZE}), "
                                 f"got {image.dtype} {image.shape}")
        if digit is None:
            digit = int(self.probabilities(image[None])[0].argmax())
        return self.explainer.explain(image, digit, method)

    def saliency(self, image: np.ndarray, digit: int | None = None) -> np.ndarray:
        """The saliency map (|d logit / d pixel|, in [0, 1]); ``digit`` defaults to the predicted one."""
        return self.explain(image, digit, "saliency").map


def _checked(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise PredictorError(f"expected uint8 images of shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}), "
                             f"got {images.dtype} {images.shape}")
    return images


def _forward_function(model: Any) -> tuple[Any, bool]:
    """One traced function, uint8 (N, 28, 28) -> (probabilities (N, 10), logits (N, 10): the members' mean),
    and whether the logits are real (a model of unknown anatomy gives its probabilities only)."""
    from digits_ray.keras_api import keras, tf

    spec = [tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE], tf.uint8)]
    members = parts.members(model)
    if members is None:
        traced = tf.function(lambda x: (model(x, training=False),), input_signature=spec)
        traced.get_concrete_function()
        return traced, False
    heads = [keras.Model(m.input, [m.output, m.get_layer(parts.LOGITS_LAYER).output]) for m in members]
    combine = (lambda probs: probs[0]) if members[0] is model else model.layers[-1]  # an ensemble's Average

    def forward(x: Any) -> tuple[Any, Any]:
        outputs = [head(x, training=False) for head in heads]
        probs = combine([p for p, _ in outputs])
        logits = tf.add_n([tf.cast(logit, tf.float32) for _, logit in outputs]) / len(outputs)
        return tf.cast(probs, tf.float32), logits

    traced = tf.function(forward, input_signature=spec)
    traced.get_concrete_function()  # traced now, once: concurrent first calls would each trace it
    return traced, True
