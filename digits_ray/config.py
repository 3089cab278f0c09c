"""One place for every default: where data lives, and the training hyperparameters.

The CLI, the Ray Train job and (later) Tune all start from ``TrainConfig`` so a default
changes in exactly one line.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --- Data locations -------------------------------------------------------------------------
DATA_DIR_ENV = "DIGITS_DATA_DIR"  # folder with the four IDX files; read first, never downloaded into
CACHE_DIR_ENV = "DIGITS_CACHE_DIR"  # where downloads are cached (default ~/.cache/digits-ray)
OFFLINE_ENV = "DIGITS_OFFLINE"  # "1": never touch the network
MIRRORS_ENV = "DIGITS_MNIST_MIRRORS"  # comma-separated base URLs overriding the public mirrors

# Public mirrors of the original IDX files: the one TensorFlow Datasets uses, then torchvision's.
MNIST_MIRRORS: tuple[str, ...] = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)


def cache_dir() -> Path:
    """Folder where downloaded MNIST files are kept between runs."""
    default = Path.home() / ".cache" / "digits-ray"
    return Path(os.environ.get(CACHE_DIR_ENV, default)).expanduser() / "mnist"


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes"}


# --- Training -------------------------------------------------------------------------------
SCHEDULES = ("constant", "cosine", "plateau")
MIXED_PRECISION_MODES = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """Hyperparameters of one training run; the single source of their defaults."""

    model: str = "cnn_bn"
    epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 2e-3  # BN tolerates it; peak LR, per worker batch (scaled for Ray Train)
    schedule: str = "cosine"  # constant | cosine (per step, optional warmup) | plateau
    warmup_epochs: float = 0.0
    early_stopping_patience: int = 0  # epochs without val_accuracy gain; 0 turns it off
    val_fraction: float = 0.1
    seed: int = 0
    mixed_precision: str = "auto"  # auto: mixed_float16 on GPU, float32 on CPU
    model_params: dict[str, Any] = field(default_factory=dict)  # builder hyperparameters
    augment: dict[str, Any] | None = None  # None: no augmentation; {}: AugmentConfig defaults; or overrides
    # Training steps per call into the compiled graph. Above 1, Python and, under Ray Train, the
    # all-reduces that read the loss/accuracy metrics run once per call instead of every step.
    steps_per_execution: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if not 0 <= self.warmup_epochs < self.epochs:
            problems.append(f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs}")
        if self.steps_per_execution < 1:
            problems.append(f"steps_per_execution must be >= 1, got {self.steps_per_execution}")
        if self.early_stopping_patience < 0:
            problems.append(f"early_stopping_patience must be >= 0, got {self.early_stopping_patience}")
        if not 0 < self.val_fraction < 1:
            problems.append(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.mixed_precision not in MIXED_PRECISION_MODES:
            problems.append(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION_MODES)}; "
                f"got {self.mixed_precision!r}"
            )
        if problems:
            raise ValueError("invalid training configuration: " + "; ".join(problems))
        self.augment_config()  # reject bad augmentation options now, not mid-training

    def augment_config(self):
        """The run's ``AugmentConfig``, or None when it trains on the images as they are."""
        from digits_ray.data.augment import AugmentConfig

        return None if self.augment is None else AugmentConfig.from_dict(self.augment)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; accepted: {sorted(known)}")
        return cls(**values)
