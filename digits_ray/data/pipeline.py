"""The augmented training stream: Ray Data across the cluster, or a plain iterator in one process.

One stream covers every epoch. Row ``i`` of the stream is epoch ``i // n``, position ``i % n`` of
that epoch's seeded shuffle, augmented with randomness keyed on (seed, epoch, image index). So:
- each epoch is a fresh shuffle with fresh augmentation, and the same seed reproduces it exactly;
- blocks are augmented in parallel by Ray Data actors and streamed to training; no augmented
  epoch is ever materialized;
- a consumer (a Ray Train worker) counts its batches per epoch, and a resumed run skips the batches
  of the epochs it already trained.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from digits_ray.config import AugmentConfig
from digits_ray.data.augment import augment, limit_kernel_threads
from digits_ray.errors import ConfigError
from digits_ray.schema import IMAGE_COLUMN, LABEL_COLUMN


@dataclass(frozen=True)
class StreamConfig:
    """How the stream is produced (not what it contains)."""

    block_rows: int = 8192  # rows per Ray Data block and per augmentation call
    concurrency: int = 2  # augmentation actors (each holds a read-only view of the images)
    cpus_per_actor: float = 0.5  # fractional, so training workers keep CPUs on a small machine
    max_data_cpus: float | None = None  # cap on the CPUs Ray Data may use in all (None: no cap)

    def __post_init__(self) -> None:
        if self.block_rows < 1 or self.concurrency < 1 or not self.cpus_per_actor > 0:
            raise ConfigError(
                f"block_rows and concurrency must be >= 1 and cpus_per_actor > 0; got {self.block_rows}, "
                f"{self.concurrency}, {self.cpus_per_actor}"
            )


class EpochSampler:
    """Maps stream row ids to (augmented image, label) batches.

    Used as a Ray Data callable class (one per actor) and directly by ``local_batches``.
    """

    def __init__(
        self, images: Any, labels: Any, seed: int, augment_cfg: AugmentConfig | None, kernel_threads: int | None = None
    ):
        import ray

        if kernel_threads is not None and augment_cfg is not None and augment_cfg.kernel == "tf":
            limit_kernel_threads(kernel_threads)  # only the TF kernel has threads (and imports TF)
        # Arrays arrive as object refs in Ray (read zero-copy from the object store) or as arrays.
        self.images = ray.get(images) if isinstance(images, ray.ObjectRef) else images
        self.labels = ray.get(labels) if isinstance(labels, ray.ObjectRef) else labels
        self.seed = seed
        self.augment_cfg = augment_cfg
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        """This epoch's shuffle of the training set (cached: a block rarely spans two epochs)."""
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))
        return self._orders[epoch]

    def rows(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        n = len(self.labels)
        epochs, positions = np.divmod(ids.astype(np.int64), n)
        images = np.empty((len(ids), *self.images.shape[1:]), dtype=np.uint8)
        labels = np.empty(len(ids), dtype=np.uint8)
        for epoch in np.unique(epochs):
            rows = epochs == epoch
            index = self.order(int(epoch))[positions[rows]]
            batch = self.images[index]
            if self.augment_cfg is not None:
                batch = augment(batch, index, int(epoch), self.seed, self.augment_cfg)
            images[rows], labels[rows] = batch, self.labels[index]
        return {IMAGE_COLUMN: images, LABEL_COLUMN: labels}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.rows(batch["data"])  # from_numpy's column name


def training_stream(
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int,
    seed: int,
    augment_cfg: AugmentConfig | None,
    stream: StreamConfig = StreamConfig(),
):
    """A Ray Dataset of ``epochs * len(labels)`` rows, shuffled and augmented per epoch.

    Pass it to a trainer as ``datasets={"train": ...}`` and read it with ``get_dataset_shard``,
    or iterate it directly with ``iter_batches``.
    """
    import ray

    if len(images) != len(labels) or len(labels) == 0:
        raise ValueError(f"need as many images as labels, and some: got {len(images)} and {len(labels)}")
    total = epochs * len(labels)
    if stream.max_data_cpus is not None:
        limit_data_cpus(stream.max_data_cpus)
    # Row ids as ready-made blocks (8 bytes a row): no read tasks, which would each claim a whole CPU.
    ids = ray.data.from_numpy(
        [np.arange(start, min(start + stream.block_rows, total)) for start in range(0, total, stream.block_rows)]
    )
    return ids.map_batches(
        EpochSampler,
        fn_constructor_args=(ray.put(images), ray.put(labels), seed, augment_cfg, math.ceil(stream.cpus_per_actor)),
        batch_size=stream.block_rows,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=stream.concurrency),
        num_cpus=stream.cpus_per_actor,
    )


def limit_data_cpus(cpus: float) -> None:
    """Cap the CPUs Ray Data's executor may hold, leaving the rest to training workers."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    options.resource_limits = options.resource_limits.copy(cpu=cpus)


def local_batches(
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int,
    seed: int,
    augment_cfg: AugmentConfig | None,
    batch_size: int,
    start_epoch: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The same stream as ``training_stream``, as a plain single-process iterator of batches.

    Batches never straddle an epoch boundary, so ``ceil(n / batch_size)`` batches make one epoch.
    """
    sampler = EpochSampler(images, labels, seed, augment_cfg)
    n = len(labels)
    for epoch in range(start_epoch, epochs):
        for start in range(0, n, batch_size):
            ids = np.arange(epoch * n + start, epoch * n + min(start + batch_size, n))
            rows = sampler.rows(ids)
            yield rows[IMAGE_COLUMN], rows[LABEL_COLUMN]
