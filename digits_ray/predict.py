"""One predictor for evaluation, batch prediction and Serve: a model, its input contract and its answers.

``Predictor.from_artifact`` loads a model folder (Keras safe mode: nothing in the file runs as code) and
checks that the model reads what every digits-ray model reads, uint8 (28, 28) white-on-black in MNIST's
frame (``images.py`` turns real images into that). Inference runs through one traced ``tf.function``
with a variable batch dimension, which costs about a millisecond for one image where ``Model.predict``
costs tens.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from digits_ray import artifact
from digits_ray.errors import DigitsError
from digits_ray.schema import IMAGE_SIZE, INPUT_CONTRACT, NUM_CLASSES

CHUNK = 1024  # images per call into the model: bounds memory for large batches
SCALED_INPUT_LAYER = "channel"  # zoo models: the layer whose input is the scaled float image (saliency)
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


def describe(probs: np.ndarray) -> dict[str, Any]:
    """One image's ten probabilities -> digit, confidence, top 3 and all ten (JSON-ready)."""
    order = np.argsort(-probs, kind="stable")[:TOP_K]
    return {
        "digit": int(order[0]),
        "confidence": float(probs[order[0]]),
        "top3": [{"digit": int(d), "probability": float(probs[d])} for d in order],
        "probabilities": [float(p) for p in probs],
    }


class Predictor:
    """A loaded model: ``probabilities(images)`` for a batch, ``saliency(image)`` for one."""

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
        self._forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True,
                                    input_signature=[tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE], tf.uint8)])
        self._saliency_paths: list[Any] | None = None
        self._paths_lock = threading.Lock()  # Serve calls saliency from several threads at once

    @classmethod
    def from_artifact(cls, folder: Path | str) -> Predictor:
        folder = Path(folder).resolve()
        metadata = artifact.read_metadata(folder)
        contract = metadata.get("input", INPUT_CONTRACT)  # artifacts from before the field: the zoo's contract
        if contract != INPUT_CONTRACT:
            raise PredictorError(f"{folder} declares input {contract}; this predictor reads {INPUT_CONTRACT}")
        info = ModelInfo(metadata["model"], folder.name, metadata.get("created"))
        return cls(artifact.load_model(folder), info, metadata)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, 28, 28) -> float64 (N, 10)."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise PredictorError(f"expected uint8 images of shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}), "
                                 f"got {images.dtype} {images.shape}")
        if len(images) == 0:
            return np.zeros((0, NUM_CLASSES))
        chunks = [self._forward(images[i: i + CHUNK]).numpy() for i in range(0, len(images), CHUNK)]
        return np.concatenate(chunks).astype(np.float64)

    def predict(self, images: np.ndarray) -> list[dict[str, Any]]:
        return [describe(p) for p in self.probabilities(images)]

    def gradient(self, image: np.ndarray, digit: int) -> np.ndarray:
        """d p(digit) / d pixel, shape (28, 28), taken at the scaled float image (the uint8 input has none).

        An ensemble's probability is its members' mean, so its gradient is the mean of theirs.
        """
        from digits_ray.keras_api import tf

        paths = self._scaled_paths()
        scaled = tf.constant(image[None].astype(np.float32) / 255.0)
        with tf.GradientTape() as tape:
            tape.watch(scaled)
            prob = tf.add_n([path(scaled, training=False)[0, digit] for path in paths]) / len(paths)
        return tape.gradient(prob, scaled).numpy()[0]

    def saliency(self, image: np.ndarray, digit: int | None = None) -> np.ndarray:
        """|gradient| scaled to [0, 1]; ``digit`` defaults to the predicted one."""
        if digit is None:
            digit = int(self.probabilities(image[None])[0].argmax())
        grad = np.abs(self.gradient(image, digit))
        peak = float(grad.max())
        return grad / peak if peak > 0 else grad

    def _scaled_paths(self) -> list[Any]:
        """Built once, under a lock: concurrent first calls must not build them twice."""
        with self._paths_lock:
            if self._saliency_paths is None:
                self._saliency_paths = self._build_scaled_paths()
        return self._saliency_paths

    def _build_scaled_paths(self) -> list[Any]:
        """Sub-models from the scaled float image to the probabilities: the model's, or each member's."""
        from digits_ray.keras_api import keras

        def path(model: Any) -> Any:
            return keras.Model(model.get_layer(SCALED_INPUT_LAYER).input, model.output)

        if SCALED_INPUT_LAYER in {layer.name for layer in self.model.layers}:
            return [path(self.model)]
        members = [m for m in self.model.layers if isinstance(m, keras.Model)]
        if not members or any(SCALED_INPUT_LAYER not in {x.name for x in m.layers} for m in members):
            raise PredictorError(f"model {self.info.name!r} has no {SCALED_INPUT_LAYER!r} layer; saliency "
                                 f"needs a zoo model or an ensemble of them")
        return [path(m) for m in members]
