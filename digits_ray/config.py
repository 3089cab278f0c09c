"""One place for every training default: ``TrainConfig``, and the ``AugmentConfig`` its ``augment`` names.

The CLI, the Ray Train job and Tune all start from it, so a default changes in exactly one line, and
``batch_size`` and ``learning_rate`` mean the same on every runner: the global batch, and the peak LR
for that batch. Ray Train divides the batch among its workers; nothing rescales the LR.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from digits_ray.errors import ConfigError
from digits_ray.schema import IMAGE_SIZE

# --- Augmentation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms of ``data.augment`` (the published MNIST recipes use about these).

    Here, beside ``TrainConfig``, so that a training configuration is checked without loading the data layer.
    """

    rotation_deg: float = 12.0  # uniform in [-r, r]
    shift: float = 0.1  # fraction of the image size, uniform in [-s, s] per axis
    zoom: float = 0.1  # scale uniform in [1 - z, 1 + z]
    elastic_alpha: float = 0.0  # peak elastic displacement in pixels; 0 turns it off
    elastic_grid: int = 4  # control points per side of the smooth random displacement field
    margin: float = 1.5  # minimum distance in pixels between transformed ink and the edge

    def __post_init__(self) -> None:
        checks = {
            "rotation_deg": 0 <= self.rotation_deg <= 180,
            "shift": 0 <= self.shift < 0.5,
            "zoom": 0 <= self.zoom < 1,
            "elastic_alpha": 0 <= self.elastic_alpha <= 5,
            "elastic_grid": 2 <= self.elastic_grid <= IMAGE_SIZE,
            "margin": 0 <= self.margin < 5,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                f"augmentation option(s) out of range: {', '.join(f'{b}={getattr(self, b)}' for b in bad)}; "
                "accepted: rotation_deg 0-180, shift [0, 0.5), zoom [0, 1), elastic_alpha 0-5, "
                "elastic_grid 2-28, margin [0, 5)"
            )

    @property
    def kernel(self) -> str:
        """The warp kernel ``augment`` uses: TensorFlow's, unless elastic distortion needs numpy's."""
        return "numpy" if self.elastic_alpha > 0 else "tf"

    @classmethod
    def from_dict(cls, values: dict) -> AugmentConfig:
        """Options from a config file or the command line, with a clear error for unknown ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown augmentation option(s) {unknown}; accepted: {sorted(known)}")
        return cls(**values)


# --- Training -------------------------------------------------------------------------------
SCHEDULES = ("constant", "cosine", "plateau")
MIXED_PRECISION_MODES = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """Hyperparameters of one training run; the single source of their defaults."""

    model: str = "cnn_bn"
    epochs: int = 5
    batch_size: int = 64  # global: split evenly among Ray Train workers
    learning_rate: float = 2e-3  # peak LR for the global batch (BN tolerates it)
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
            raise ConfigError("invalid training configuration: " + "; ".join(problems))
        self.augment_config()  # reject bad augmentation options now, not mid-training

    def augment_config(self) -> AugmentConfig | None:
        """The run's ``AugmentConfig``, or None when it trains on the images as they are."""
        return None if self.augment is None else AugmentConfig.from_dict(self.augment)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; accepted: {sorted(known)}")
        return cls(**values)
