"""How a Ray Train run is spread over the cluster: its options, checked before anything starts.

Apart from ``distributed`` (which imports TensorFlow and Ray) so that the command line shows and checks
these options at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from digits_ray.data.pipeline import StreamConfig
from digits_ray.errors import ConfigError
from digits_ray.paths import DEFAULT_STORAGE


@dataclass(frozen=True)
class ScaleConfig:
    """How the run is spread over the cluster; every field is a flag of ``digits-ray train --ray``."""

    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional: on 2 cores, 2 workers + 2 data actors fit in 2 CPUs
    data: StreamConfig = field(default_factory=StreamConfig)
    storage_path: str = str(DEFAULT_STORAGE)
    name: str | None = None
    max_failures: int = 2  # worker failures to recover from (from the latest checkpoint)
    keep_checkpoints: int = 2  # best by val_accuracy; Ray also keeps the latest for resuming
    resume_from: str | None = None  # a checkpoint folder of an earlier run: continue after its epoch

    def __post_init__(self) -> None:
        if self.workers < 1 or not self.cpus_per_worker > 0 or self.max_failures < -1 or self.keep_checkpoints < 1:
            raise ConfigError(
                "need workers >= 1, cpus_per_worker > 0, max_failures >= -1 and keep_checkpoints >= 1; got "
                f"{self.workers}, {self.cpus_per_worker}, {self.max_failures}, {self.keep_checkpoints}"
            )
        from digits_ray.train import checkpoint as ckpt  # Keras: only to check a checkpoint

        if self.resume_from and not ckpt.is_checkpoint(self.resume_from):
            raise ConfigError(f"--resume-from {self.resume_from} is not a checkpoint folder (it needs "
                              f"{ckpt.MODEL_FILE} and {ckpt.STATE_FILE}, as in RUN/epoch_0003)")


def per_worker_batch(batch_size: int, workers: int) -> int:
    """Each worker's part of the global batch; it must divide evenly, or workers would differ."""
    if batch_size % workers:
        raise ConfigError(f"batch_size {batch_size} (global) does not divide among {workers} workers; "
                          f"use a multiple of {workers}")
    return batch_size // workers
