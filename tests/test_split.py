"""The train/validation split is stratified, disjoint, complete and reproducible."""

import hashlib

import numpy as np
import pytest

from digits_ray.data.mnist import load_split
from digits_ray.data.split import stratified_indices, train_val_split


def test_split_is_stratified_disjoint_and_complete(small_mnist):
    labels = load_split("train", small_mnist).labels
    train_idx, val_idx = stratified_indices(labels, 0.2, seed=3)
    assert len(np.intersect1d(train_idx, val_idx)) == 0
    assert len(train_idx) + len(val_idx) == len(labels)
    for cls in range(10):
        in_class = (labels == cls).sum()
        assert abs((labels[val_idx] == cls).sum() - 0.2 * in_class) <= 0.5


def test_same_seed_same_split_other_seed_other_split(small_mnist):
    labels = load_split("train", small_mnist).labels
    a, b, c = (stratified_indices(labels, 0.1, seed)[1] for seed in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_split_carries_checksums_and_never_the_test_set(small_mnist):
    data = train_val_split(load_split("train", small_mnist), 0.1, 0)
    assert len(data.y_train) == 4500 and len(data.y_val) == 500
    # The checksums of the files it was read from (computed here), and nothing of the test split's.
    assert data.md5 == {name: hashlib.md5((small_mnist / name).read_bytes()).hexdigest()
                        for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")}
    assert data.md5["train-images-idx3-ubyte.gz"] == "7d9bf810e5ec0cf034f1ad79eb20bf00"


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_bad_fraction(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_indices(np.zeros(10, dtype=np.uint8), fraction, 0)
