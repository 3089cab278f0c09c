"""The augmented stream on a local 2-CPU Ray instance and as a plain iterator."""

import hashlib

import numpy as np
import pytest

from digits_ray.config import AugmentConfig
from digits_ray.data.mnist import load_split
from digits_ray.data.pipeline import EpochSampler, StreamConfig, local_batches, training_stream


@pytest.fixture(scope="module")
def train_split(small_mnist):
    split = load_split("train", small_mnist)
    return split.images[:1200], split.labels[:1200]


def digests(images):
    return sorted(hashlib.md5(im.tobytes()).hexdigest() for im in images)


def test_every_epoch_is_a_fresh_shuffle_of_every_label(train_split):
    images, labels = train_split
    sampler = EpochSampler(images, labels, seed=1, augment_cfg=AugmentConfig())
    n = len(labels)
    epoch0, epoch1 = sampler.rows(np.arange(n)), sampler.rows(np.arange(n, 2 * n))
    for rows in (epoch0, epoch1):
        np.testing.assert_array_equal(np.bincount(rows["label"], minlength=10), np.bincount(labels, minlength=10))
    assert not np.array_equal(epoch0["label"], epoch1["label"])  # reshuffled
    assert not set(digests(epoch0["image"])) & set(digests(epoch1["image"]))  # re-augmented


def test_labels_travel_with_their_images(train_split):
    images, labels = train_split
    sampler = EpochSampler(images, labels, seed=0, augment_cfg=None)
    rows = sampler.rows(np.arange(len(labels)))
    lookup = {hashlib.md5(im.tobytes()).hexdigest(): lab for im, lab in zip(images, labels)}
    assert all(lookup[hashlib.md5(im.tobytes()).hexdigest()] == lab for im, lab in zip(rows["image"], rows["label"]))


def test_local_iterator_batches_epochs(train_split):
    images, labels = train_split
    batches = list(local_batches(images, labels, epochs=2, seed=0, augment_cfg=AugmentConfig(), batch_size=500))
    assert [len(b[1]) for b in batches] == [500, 500, 200] * 2
    assert batches[0][0].dtype == np.uint8 and batches[0][0].shape == (500, 28, 28)


@pytest.mark.slow
def test_ray_stream_matches_the_local_iterator(ray_local, train_split):
    images, labels = train_split
    cfg = AugmentConfig(elastic_alpha=1.0)
    stream = training_stream(images, labels, epochs=2, seed=5, augment_cfg=cfg,
                             stream=StreamConfig(block_rows=256, concurrency=2, cpus_per_actor=0.5))
    rows = list(stream.iter_batches(batch_size=400, batch_format="numpy"))
    ray_images = np.concatenate([r["image"] for r in rows])
    ray_labels = np.concatenate([r["label"] for r in rows])
    assert len(ray_labels) == 2 * len(labels)
    local = list(local_batches(images, labels, epochs=2, seed=5, augment_cfg=cfg, batch_size=400))
    local_images = np.concatenate([b[0] for b in local])
    # Same seed, same images: the parallel stream reproduces the single-process one exactly.
    assert digests(ray_images) == digests(local_images)
    np.testing.assert_array_equal(np.bincount(ray_labels), 2 * np.bincount(labels))


@pytest.mark.slow
def test_data_cpu_cap_is_applied(ray_local, train_split):
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    before = options.resource_limits
    try:
        stream = training_stream(*train_split, epochs=1, seed=0, augment_cfg=None,
                                 stream=StreamConfig(block_rows=600, concurrency=1, max_data_cpus=1.0))
        assert options.resource_limits.cpu == 1.0
        assert sum(len(b["label"]) for b in stream.iter_batches(batch_size=600)) == 1200
    finally:
        options.resource_limits = before


def test_bad_stream_options():
    with pytest.raises(ValueError, match="block_rows and concurrency"):
        StreamConfig(concurrency=0)
