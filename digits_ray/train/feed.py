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


def tf_dataset_from_chunks(make_chunks: Callable[[], Batches], batch_size: int, prefetch: int = 2) -> tf.data.Dataset:
    """Training batches cut inside tf.data from chunks of whole batches: one Python call per chunk.

    Each chunk is (k * batch_size images, k * batch_size labels); it is reshaped to k batches here
    and sliced in C++, so the training loop never waits on Python (or its lock) between steps.
    """
    chunk_signature = (
        tf.TensorSpec(shape=(None, batch_size, IMAGE_SIZE, IMAGE_SIZE), dtype=tf.uint8),
        tf.TensorSpec(shape=(None, batch_size), dtype=tf.uint8),
    )

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for images, labels in make_chunks():
            if len(labels) % batch_size or len(images) != len(labels):
                raise ValueError(f"a chunk must hold whole batches of {batch_size}; got {len(images)} images, "
                                 f"{len(labels)} labels")
            yield images.reshape(-1, batch_size, IMAGE_SIZE, IMAGE_SIZE), labels.reshape(-1, batch_size)

    chunks = tf.data.Dataset.from_generator(generate, output_signature=chunk_signature)
    return chunks.flat_map(lambda x, y: tf.data.Dataset.from_tensor_slices((x, y))).prefetch(prefetch)
