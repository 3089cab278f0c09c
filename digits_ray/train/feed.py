"""Turning a stream of numpy batches into what Keras ``fit`` consumes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from digits_ray.data.mnist import IMAGE_SIZE
from digits_ray.keras_api import tf

Batches = Iterable[tuple[np.ndarray, np.ndarray]]

SIGNATURE = (
    tf.TensorSpec(shape=(None, IMAGE_SIZE, IMAGE_SIZE), dtype=tf.uint8),
    tf.TensorSpec(shape=(None,), dtype=tf.uint8),
)


def tf_dataset(make_batches: Callable[[], Batches], prefetch: int = 2) -> tf.data.Dataset:
    """A tf.data pipeline over a Python batch stream; the stream runs once, across all epochs.

    Keras keeps one iterator across epochs when ``steps_per_epoch`` is given, so a stream that
    covers every epoch feeds the whole run.
    """

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield from make_batches()

    return tf.data.Dataset.from_generator(generate, output_signature=SIGNATURE).prefetch(prefetch)
