"""Feeding Keras: chunks of whole batches are cut into batches inside tf.data, in order."""

import numpy as np
import pytest

from digits_ray.train.feed import tf_dataset_from_chunks


def _chunks(sizes: list[int]):
    start = 0
    for size in sizes:
        images = (np.arange(start, start + size) % 256).astype(np.uint8)[:, None, None] * np.ones((1, 28, 28), np.uint8)
        yield images, (np.arange(start, start + size) % 10).astype(np.uint8)
        start += size


def test_chunks_become_batches_in_order():
    batches = list(tf_dataset_from_chunks(lambda: _chunks([32, 16, 48]), batch_size=16).as_numpy_iterator())
    assert len(batches) == 6
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    assert all(b[0].shape == (16, 28, 28) and b[1].shape == (16,) for b in batches)
    np.testing.assert_array_equal(labels, np.arange(96) % 10)
    np.testing.assert_array_equal(images[:, 5, 5], np.arange(96) % 256)


def test_a_chunk_that_is_not_whole_batches_is_an_error():
    dataset = tf_dataset_from_chunks(lambda: _chunks([20]), batch_size=16)
    with pytest.raises(Exception, match="whole batches of 16; got 20 images"):
        list(dataset.as_numpy_iterator())
