"""Explanations: which pixels of the 28x28 the model saw made it answer a digit, as a map in [0, 1].

- ``gradcam`` (the default): Grad-CAM on the last convolution, in its HiResCAM form (Draelos & Carin, 2020):
  every cell of every feature map times the gradient of the digit's logit at that cell, summed over the
  maps; the positive part, placed back on the pixels the cells look at. It marks strokes as regions, the
  way a person points at a drawing. Grad-CAM's original weighting (Selvaraju et al., 2017: each map times
  its mean gradient) cancels out on small models: on the test suite's small CNN it left 15% of the maps
  of MNIST test digits empty, and put less of the rest on the stroke.
- ``saliency``: |d logit / d pixel| (Simonyan et al., 2014). On the logit, not the probability: a softmax
  flattens once the model is sure, and its gradient with it.
- ``smoothgrad``: the saliency averaged over noisy copies of the image (Smilkov et al., 2017): less speckle.

An ensemble answers the mean of its members' probabilities; it is explained through the mean of their
logits (saliency: the gradient of that mean; Grad-CAM: the mean of the members' maps before the ReLU,
each placed on the input first, since members' convolutions can differ in size).
A model without a convolution (the zoo's ``dense``) gets saliency when Grad-CAM is asked, and a note says so.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from digits_ray.errors import DigitsError
from digits_ray.models import parts
from digits_ray.schema import IMAGE_SIZE, NUM_CLASSES

EXPLAIN_METHODS = ("gradcam", "saliency", "smoothgrad")
DEFAULT_EXPLAIN_METHOD = "gradcam"  # what the API's ``explain=true`` means
SMOOTHGRAD_SAMPLES = 24
SMOOTHGRAD_NOISE = 0.15  # Gaussian noise's standard deviation on the [0, 1] pixel scale (the paper: 10-20%)


class ExplainError(DigitsError):
    """An explanation that cannot be given: an unknown method or digit, or a model that is not a zoo model."""


@dataclass(frozen=True)
class Explanation:
    """``map``: float32 (28, 28) in [0, 1] on the image the model saw; ``method``: the one that ran;
    ``note``: why it is not the one asked for, or what is odd about the map (else None)."""

    map: np.ndarray
    method: str
    note: str | None = None


def check_method(method: str) -> str:
    if method not in EXPLAIN_METHODS:
        raise ExplainError(f"unknown explanation method {method!r}; accepted: {', '.join(EXPLAIN_METHODS)}")
    return method


def check_digit(digit: Any) -> int:
    if isinstance(digit, bool) or not isinstance(digit, int | np.integer) or not 0 <= digit < NUM_CLASSES:
        raise ExplainError(f"digit must be an integer from 0 to {NUM_CLASSES - 1} (or None: the predicted one); "
                           f"got {digit!r}")
    return int(digit)


def scaled(image: np.ndarray) -> np.ndarray:
    """uint8 (28, 28) -> float32 (28, 28) in [0, 1]: what a zoo model's ``channel`` layer reads."""
    return image.astype(np.float32) / 255.0


def normalized(values: np.ndarray) -> np.ndarray:
    """Scaled so the peak is 1 (an all-zero map stays zero)."""
    peak = float(values.max())
    return (values / peak if peak > 0 else np.zeros_like(values)).astype(np.float32)


def on_input(cam: np.ndarray, grid: parts.Grid) -> np.ndarray:
    """A feature map's values (h, w) at every input pixel, interpolated linearly between cell centres."""
    rows = (np.arange(IMAGE_SIZE) - grid.offset[0]) / grid.step[0]
    cols = (np.arange(IMAGE_SIZE) - grid.offset[1]) / grid.step[1]
    by_row = np.stack([np.interp(rows, np.arange(cam.shape[0]), cam[:, j]) for j in range(cam.shape[1])], axis=1)
    return np.stack([np.interp(cols, np.arange(cam.shape[1]), by_row[i]) for i in range(IMAGE_SIZE)])


class Explainer:
    """Explanations of one loaded model, computed by traced functions (``tf.function``). Serve explains from
    several threads at once: TensorFlow's eager gradient tapes corrupt memory when threads run them
    concurrently (seen here as ``malloc(): unaligned tcache chunk``), traced graphs do not. The functions
    are built on first use, once, under a lock."""

    def __init__(self, model: Any, name: str) -> None:
        self.name = name
        self.members = parts.members(model)
        self._lock = threading.Lock()
        self._gradient: Any = None
        self._cam: tuple[Any, list[parts.Grid]] | None = None
        self._no_cam: str | None = None  # why Grad-CAM is not available, once known

    def explain(self, image: np.ndarray, digit: int, method: str) -> Explanation:
        """``image``: uint8 (28, 28); ``digit``: the class to explain."""
        check_method(method)
        digit = check_digit(digit)
        if method == "gradcam":
            cam = self.gradcam(image, digit)
            if cam is None:
                return Explanation(self.saliency(image, digit), "saliency", self._no_cam)
            note = None if cam.any() else f"Grad-CAM found nothing in favour of {digit}: the map is empty"
            return Explanation(cam, "gradcam", note)
        if method == "smoothgrad":
            return Explanation(self.smoothgrad(image, digit), "smoothgrad")
        return Explanation(self.saliency(image, digit), "saliency")

    def logit_gradient(self, images: np.ndarray, digit: int) -> np.ndarray:
        """d (mean of the members' logit of ``digit``) / d pixel for float images (n, 28, 28) in [0, 1]."""
        return self._gradient_function()(np.asarray(images, dtype=np.float32), np.int32(digit)).numpy()

    def saliency(self, image: np.ndarray, digit: int) -> np.ndarray:
        return normalized(np.abs(self.logit_gradient(scaled(image)[None], digit)[0]))

    def smoothgrad(self, image: np.ndarray, digit: int) -> np.ndarray:
        noise = np.random.default_rng(0).normal(0, SMOOTHGRAD_NOISE, (SMOOTHGRAD_SAMPLES, IMAGE_SIZE, IMAGE_SIZE))
        grads = self.logit_gradient(scaled(image)[None] + noise, digit)
        return normalized(np.abs(grads).mean(axis=0))

    def gradcam(self, image: np.ndarray, digit: int) -> np.ndarray | None:
        """The Grad-CAM map, or None (the reason in ``_no_cam``) for a model without a convolution."""
        built = self._cam_function()
        if built is None:
            return None
        function, grids = built
        cams = function(scaled(image)[None], np.int32(digit))
        total = sum(on_input(cam.numpy(), grid) for cam, grid in zip(cams, grids))
        return normalized(np.maximum(total / len(grids), 0))

    # --- Traced functions, built once -----------------------------------------------------------------

    def _zoo_members(self) -> list[Any]:
        if self.members is None:
            raise ExplainError(f"model {self.name!r} has no {parts.SCALED_INPUT_LAYER!r} and "
                               f"{parts.LOGITS_LAYER!r} layers; explanations need a zoo model or an "
                               f"ensemble of them")
        return self.members

    def _gradient_function(self) -> Any:
        """(float images (n, 28, 28), digit) -> the gradient of the members' mean logit of the digit."""
        from digits_ray.keras_api import keras, tf

        with self._lock:
            if self._gradient is None:
                paths = [keras.Model(m.get_layer(parts.SCALED_INPUT_LAYER).input,
                                     m.get_layer(parts.LOGITS_LAYER).output) for m in self._zoo_members()]

                @tf.function(input_signature=[tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE], tf.float32),
                                              tf.TensorSpec([], tf.int32)])
                def gradient(x: Any, digit: Any) -> Any:
                    with tf.GradientTape() as tape:
                        tape.watch(x)
                        logits = tf.add_n([tf.cast(path(x, training=False), tf.float32) for path in paths])
                        target = tf.reduce_sum(tf.gather(logits, digit, axis=1)) / len(paths)
                    return tape.gradient(target, x)

                gradient.get_concrete_function()  # traced here, once: concurrent first calls would each trace
                self._gradient = gradient
            return self._gradient

    def _cam_function(self) -> tuple[Any, list[parts.Grid]] | None:
        """(float image (1, 28, 28), digit) -> each member's map on its last convolution's grid, and the
        grids; None when a member has no convolution."""
        from digits_ray.keras_api import keras, tf

        with self._lock:
            if self._cam is None and self._no_cam is None:
                paths, grids = [], []
                for member in self._zoo_members():
                    found = parts.last_convolution(member)
                    if found is None:
                        who = self.name if len(self.members) == 1 else member.name
                        self._no_cam = f"{who} has no convolution for Grad-CAM: saliency shown instead"
                        return None
                    layer, grid = found
                    paths.append(keras.Model(member.get_layer(parts.SCALED_INPUT_LAYER).input,
                                             [member.get_layer(layer).output,
                                              member.get_layer(parts.LOGITS_LAYER).output]))
                    grids.append(grid)

                @tf.function(input_signature=[tf.TensorSpec([1, IMAGE_SIZE, IMAGE_SIZE], tf.float32),
                                              tf.TensorSpec([], tf.int32)])
                def cams(x: Any, digit: Any) -> list[Any]:
                    found = []
                    for path in paths:
                        with tf.GradientTape() as tape:
                            features, logits = path(x, training=False)
                            target = tf.cast(tf.gather(logits[0], digit), tf.float32)
                        grads = tf.cast(tape.gradient(target, features)[0], tf.float32)  # (h, w, channels)
                        found.append(tf.reduce_sum(tf.cast(features[0], tf.float32) * grads, axis=-1))
                    return found

                cams.get_concrete_function()
                self._cam = cams, grids
            return self._cam
