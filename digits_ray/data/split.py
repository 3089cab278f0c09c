"""A deterministic, stratified train/validation split of MNIST's training set.

The test set never takes part: validation metrics choose checkpoints and hyperparameters, and the
test set is touched once, for the final figure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from digits_ray.data.mnist import MnistSplit, load_split
from digits_ray.errors import ConfigError


@dataclass(frozen=True)
class TrainValData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    md5: dict[str, str]


def stratified_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices with each class split in the same proportion.

    The same labels, fraction and seed always give the same indices (sorted, so order does not
    depend on the class loop).
    """
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    val_parts = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n_val = int(round(len(members) * val_fraction))
        val_parts.append(rng.permutation(members)[:n_val])
    val_idx = np.sort(np.concatenate(val_parts))
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask), val_idx


def train_val_split(split: MnistSplit, val_fraction: float, seed: int) -> TrainValData:
    train_idx, val_idx = stratified_indices(split.labels, val_fraction, seed)
    return TrainValData(
        split.images[train_idx], split.labels[train_idx], split.images[val_idx], split.labels[val_idx], split.md5
    )


def load_train_val(val_fraction: float, seed: int, data_dir=None) -> TrainValData:
    return train_val_split(load_split("train", data_dir), val_fraction, seed)
